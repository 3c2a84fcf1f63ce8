//! `distill bench` on the tiny fixture on CPU: every benchmark runs in its child process and
//! writes sane JSON rows. Nothing here asserts a time.

use serde_json::Value;

use super::{distill, fixtures, stderr, stdout};

fn rows_of(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn num(row: &Value, key: &str) -> f64 {
    row.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number `{key}` in {row}"))
}

#[test]
fn bench_runs_every_benchmark_on_the_tiny_model_and_writes_sane_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("rows.jsonl");
    let config = fixtures().join("tiny-qwen2");
    #[rustfmt::skip]
    let o = distill(&[
        "--device", "cpu", "bench", "gemm", "loss", "train", "memory", "generate",
        "--config", config.to_str().unwrap(),
        "--batch", "2", "--seq", "16", "--warmup", "1", "--steps", "2", "--iters", "2",
        "--peak-tflops", "0.5",
        "--gen-batch", "1,2", "--prompt-len", "8", "--new-tokens", "4",
        "--mem-start", "16", "--mem-max", "64", "--mem-step", "16", "--mem-cap-gib", "100",
        "--json", json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = rows_of(&json);
    let of = |bench: &str| -> Vec<&Value> { rows.iter().filter(|r| r["bench"] == bench).collect() };

    // Counts: B1 = (6 projections/head + 3 LoRA shapes + the square) x (fwd, bwd); B2 =
    // chunked and naive; one training row each; B5 one row; B6 one per batch size.
    assert_eq!(of("B1").len(), 2 * (6 + 3 + 1), "{rows:#?}");
    assert_eq!(of("B2").len(), 3);
    let b2: Vec<&str> = of("B2").iter().map(|r| r["case"].as_str().unwrap()).collect();
    assert_eq!(b2, ["chunked 32", "chunked 32 autodiff", "naive full logits"]);
    assert_eq!(of("B3").len(), 1);
    assert_eq!(of("B4").len(), 1);
    assert_eq!(of("B5").len(), 1);
    assert_eq!(of("B6").len(), 2);
    assert!(of("peak").is_empty(), "--peak-tflops given: no peak case");
    assert_eq!(rows.len(), 20 + 3 + 1 + 1 + 1 + 2);

    for row in &rows {
        assert_eq!(row["framework"], "distill");
        assert_eq!(row["model"], "tiny-qwen2");
        assert!(row.get("error").is_none(), "{row}");
        assert!(num(row, "peak_gib") > 0.0, "{row}");
        assert_eq!(row["mem_method"], "VmHWM (process peak RSS)");
    }
    for row in rows
        .iter()
        .filter(|r| r["bench"] == "B1" && r["case"].as_str().unwrap().ends_with("fwd"))
    {
        let tflops = num(row, "tflops");
        assert!(tflops > 0.0, "{row}");
        assert!((num(row, "mfu") - tflops / 0.5).abs() < 1e-12, "{row}");
    }
    for bench in ["B2", "B3", "B4", "B6"] {
        for row in of(bench) {
            let (tps, tflops) = (num(row, "tokens_per_s"), num(row, "tflops"));
            assert!(tps > 0.0 && tps.is_finite(), "{row}");
            assert!(tflops > 0.0, "{row}");
            assert!((num(row, "mfu") - tflops / 0.5).abs() < 1e-12, "{row}");
            assert!(num(row, "ms") > 0.0, "{row}");
        }
    }
    for bench in ["B3", "B4"] {
        let row = of(bench)[0];
        assert_eq!(row["config"]["batch"], 2);
        assert_eq!(row["config"]["seq"], 16);
        assert_eq!(
            row["step_ms"].as_array().unwrap().len(),
            2,
            "--steps 2 timed, warm-up excluded"
        );
        let losses = row["losses"].as_array().unwrap();
        assert_eq!(losses.len(), 2);
        // Random init over a vocabulary of 384: the loss starts near ln(384) ~ 5.95 (CE and KL mixed).
        assert!(losses.iter().all(|l| l.as_f64().unwrap().is_finite()), "{row}");
        // Model FLOPs per token x tokens per second = TFLOP/s.
        assert!(num(row, "tflops") * 1e12 / num(row, "tokens_per_s") > 0.0);
    }
    // LoRA does 4N + adapters, full fine-tuning 6N: fewer FLOPs per token for LoRA.
    let per_token = |b: &str| num(of(b)[0], "tflops") / num(of(b)[0], "tokens_per_s");
    assert!(per_token("B3") < per_token("B4"));

    let b6: Vec<u64> = of("B6")
        .iter()
        .map(|r| r["new_tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(b6, [4, 8], "no EOS: every sequence generates --new-tokens");

    let b5 = of("B5")[0];
    assert_eq!(
        b5["seq"], 64,
        "everything fits under 100 GiB up to --mem-max: {b5}"
    );
    assert_eq!(b5["resolved"], true);
    let probes: Vec<u64> = b5["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(probes, [16, 32, 64], "doubling from --mem-start");

    // The table on stdout names every benchmark.
    let table = stdout(&o);
    for bench in ["B1", "B2", "B3", "B4", "B5", "B6"] {
        assert!(table.contains(bench), "{bench} missing:\n{table}");
    }
}

#[test]
fn bench_memory_search_brackets_a_cap_and_rejects_unknown_names() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("rows.jsonl");
    let config = fixtures().join("tiny-qwen2");
    // A cap below the weights alone: one probe at --mem-step measures it, nothing fits.
    #[rustfmt::skip]
    let o = distill(&[
        "--device", "cpu", "bench", "--only", "B5",
        "--config", config.to_str().unwrap(), "--peak-tflops", "1",
        "--mem-start", "32", "--mem-max", "64", "--mem-step", "16", "--mem-cap-gib", "0.000001",
        "--json", json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = rows_of(&json);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["seq"], 0);
    assert_eq!(rows[0]["first_failing_seq"], 16);
    let probes = rows[0]["probes"].as_array().unwrap();
    assert!(probes.iter().all(|p| p["ok"] == false), "{probes:?}");

    let o = distill(&["bench", "B9", "--config", config.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown benchmark `b9`"), "{}", stderr(&o));
}

#[test]
fn bench_profile_times_every_phase_of_the_step_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("rows.jsonl");
    let config = fixtures().join("tiny-qwen2");
    #[rustfmt::skip]
    let o = distill(&[
        "--device", "cpu", "bench", "full", "--profile",
        "--config", config.to_str().unwrap(), "--peak-tflops", "1",
        "--batch", "2", "--seq", "16", "--warmup", "1", "--steps", "2",
        "--json", json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = rows_of(&json);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let phases = rows[0]["phases"].as_array().expect("--profile adds phases");
    let names: Vec<&str> = phases.iter().map(|p| p["phase"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "inputs",
            "forward",
            "teacher",
            "loss",
            "backward",
            "grad_norm",
            "optimizer"
        ]
    );
    let (mut sum, step) = (0.0, num(&rows[0], "ms"));
    for p in phases {
        let (host, total) = (num(p, "host_ms"), num(p, "ms"));
        assert!(host >= 0.0 && total > 0.0, "{p}");
        sum += total;
    }
    // The phases tile the step: together they are the step's time, less the untimed gaps.
    assert!(
        sum > 0.5 * step && sum <= step * 1.001,
        "phases {sum} ms, step {step} ms"
    );
    assert!(stderr(&o).contains("phase optimizer"), "{}", stderr(&o));
}
