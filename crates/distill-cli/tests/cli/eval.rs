//! `distill eval` on the fixture models: the files it writes, determinism, predictions
//! scoring and its refusals.

use super::*;

fn eval_in_repo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .arg("eval")
        .args(args)
        .current_dir(repo_root())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run distill eval")
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn eval_scores_models_on_tasks_held_out_samples_and_probes() {
    let out = tempfile::tempdir().unwrap();
    let run = |dir: &Path, extra: &[&str]| {
        let o = eval_in_repo(
            &[
                &[
                    "--model",
                    "student=tests/fixtures/tiny-qwen2",
                    "--model",
                    "tests/fixtures/tiny-llama",
                    "--tasks",
                    "data/gsm8k/train-200.jsonl",
                    "--max-examples",
                    "3",
                    "--max-new-tokens",
                    "6",
                    "--held-out",
                    "tests/fixtures/dataset",
                    "--held-out-share",
                    "1",
                    "--teacher",
                    "tests/fixtures/tiny-llama",
                    "--out",
                    dir.to_str().unwrap(),
                ][..],
                extra,
            ]
            .concat(),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        o
    };
    let o = run(
        out.path(),
        &[
            "-n",
            "2",
            "--temperature",
            "1.0",
            "--seed",
            "5",
            "--baseline",
            "tiny-llama",
        ],
    );
    assert!(stdout(&o).contains("accuracy"), "{}", stdout(&o));

    let report = read_json(&out.path().join("report.json"));
    let models = report["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    assert_eq!(models[0]["label"], "student");
    assert_eq!(models[1]["label"], "tiny-llama");
    let task = &models[0]["tasks"][0];
    assert_eq!(task["task"], "gsm8k-train-200");
    assert_eq!(task["examples"], 3);
    assert_eq!(task["samples_per_prompt"], 2);
    for field in ["accuracy", "maj_at_n", "pass_at_n"] {
        let e = &task[field];
        assert_eq!(e["n"], 3, "{field}: {e}");
        assert!(e["ci95"].as_array().unwrap().len() == 2, "{field}: {e}");
    }
    // Held-out: the first 3 samples (--max-examples); the teacher agrees with itself exactly.
    let student = &models[0]["held_out"];
    let teacher = &models[1]["held_out"];
    assert_eq!(student["examples"], 3);
    assert!(student["nll"]["value"].as_f64().unwrap() > 0.0);
    assert!(student["kl_to_teacher"]["value"].as_f64().unwrap() > 0.0);
    assert!(
        teacher["kl_to_teacher"]["value"].as_f64().unwrap() < 1e-4,
        "{teacher}"
    );
    assert_eq!(teacher["top1_agreement"]["value"].as_f64().unwrap(), 1.0);

    let examples = std::fs::read_to_string(out.path().join("examples.jsonl")).unwrap();
    assert_eq!(examples.lines().count(), 2 * 3 * 2, "models x prompts x samples");
    let first: serde_json::Value = serde_json::from_str(examples.lines().next().unwrap()).unwrap();
    for field in [
        "prompt",
        "output",
        "extracted",
        "correct",
        "reference",
        "reasoning_tokens",
    ] {
        assert!(first.get(field).is_some(), "{field} missing: {first}");
    }
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(md.contains("| student |") && md.contains("Held-out"), "{md}");

    // Per-example held-out rows, and the student compared with the baseline on them.
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.path().join("heldout.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2 * 3, "models x held-out examples");
    let mean_of = |model: &str, field: &str| {
        let v: Vec<f64> = rows
            .iter()
            .filter(|r| r["model"] == model)
            .map(|r| r[field].as_f64().unwrap())
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let nll = student["nll"]["value"].as_f64().unwrap();
    assert!((mean_of("student", "nll") - nll).abs() < 1e-9);
    assert!(md.contains("Paired against `tiny-llama`"), "{md}");
    let paired = md
        .lines()
        .skip_while(|l| !l.starts_with("Paired against"))
        .find(|l| l.starts_with("| student |"))
        .unwrap_or_else(|| panic!("no paired row: {md}"));
    // Same examples on both sides: the mean difference is the difference of the means.
    let kl_diff = mean_of("student", "kl_to_teacher") - mean_of("tiny-llama", "kl_to_teacher");
    assert!(paired.contains(&format!("{kl_diff:.3}")), "{paired} vs {kl_diff}");
    assert!(out.path().join("accuracy.png").exists());

    // Same seed, same outputs, whatever the batch size.
    let again = tempfile::tempdir().unwrap();
    run(
        again.path(),
        &[
            "-n",
            "2",
            "--temperature",
            "1.0",
            "--seed",
            "5",
            "--batch-size",
            "1",
        ],
    );
    let examples_again = std::fs::read_to_string(again.path().join("examples.jsonl")).unwrap();
    assert_eq!(examples, examples_again);
}

#[test]
fn eval_runs_the_probes_and_can_exclude_contaminated_prompts() {
    let out = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let metrics = logs.path().join("metrics.jsonl");
    let line = |step: u32| {
        format!(
            "{{\"step\":{step},\"loss\":3.1,\"kl\":0.03,\"ce\":5.9,\"lr\":0.003,\"grad_norm\":1.0,\"tokens_per_s\":100.0,\"mem_gb\":null}}\n"
        )
    };
    std::fs::write(&metrics, line(1) + &line(2)).unwrap();
    let o = eval_in_repo(&[
        "--model",
        "tests/fixtures/tiny-qwen2",
        "--tasks",
        "data/gsm8k/train-200.jsonl",
        "--max-examples",
        "4",
        "--max-new-tokens",
        "3",
        "--train-data",
        "tests/fixtures/dataset",
        "--exclude-contaminated",
        "--probes",
        "--metrics",
        &format!("kd={}", metrics.display()),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_report_links_its_plots(out.path());
    let report = read_json(&out.path().join("report.json"));
    let model = &report["models"][0];
    // The fixture dataset's prompts wrap the first GSM8K questions (all count as training
    // prompts here: no held-out share given): every task prompt is contaminated and left out.
    let c = &report["contamination"]["gsm8k-train-200"];
    assert_eq!(c["contaminated"].as_array().unwrap().len(), 4, "{c}");
    assert_eq!(model["tasks"][0]["examples"], 0);
    let probes = model["probes"].as_object().unwrap();
    assert_eq!(probes.len(), 22, "one row per subject");
    assert_eq!(probes["China"]["probes"], 4);
    assert!(out.path().join("probes_refusal.png").exists());
    assert!(out.path().join("training_curves-kd.png").exists());
}

/// report.md links every plot in the output directory, by a relative link that resolves to
/// it, and is as readable as the plots beside it.
fn assert_report_links_its_plots(out: &Path) {
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let mut pngs: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png"))
        .collect();
    pngs.sort();
    assert!(!pngs.is_empty());
    let mut linked: Vec<String> = md
        .lines()
        .filter_map(|l| l.strip_prefix("![")?.split_once("](")?.1.strip_suffix(')'))
        .map(|target| target.trim_start_matches('<').trim_end_matches('>').to_owned())
        .collect();
    linked.sort();
    assert_eq!(linked, pngs, "{md}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |name: &str| std::fs::metadata(out.join(name)).unwrap().permissions().mode() & 0o777;
        for file in ["report.md", "report.json", "examples.jsonl"] {
            assert_eq!(mode(file), mode(&pngs[0]), "{file}");
        }
    }
}

#[test]
fn eval_scores_predictions_without_a_model() {
    let tmp = tempfile::tempdir().unwrap();
    let preds = tmp.path().join("preds.jsonl");
    // GSM8K train 0 is 72, 1 is 10: one right, one wrong, one right by prompt lookup.
    let lines = [
        r#"{"id": "0", "output": "<think>48/2=24, 48+24=72</think> The answer is \\boxed{72}."}"#,
        "{\"id\": \"1\", \"output\": \"#### 11\", \"model\": \"m\"}",
        r#"{"prompt": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?", "output": "She earned $10.", "model": "m"}"#,
    ];
    std::fs::write(&preds, lines.join("\n")).unwrap();
    let out = tmp.path().join("out");
    let o = eval_in_repo(&[
        "--predictions",
        preds.to_str().unwrap(),
        "--tasks",
        "data/gsm8k/train-200.jsonl",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = read_json(&out.join("report.json"));
    let models = report["models"].as_array().unwrap();
    assert_eq!(models[0]["label"], "predictions");
    assert_eq!(models[0]["tasks"][0]["accuracy"]["value"], 1.0);
    assert_eq!(models[1]["label"], "m");
    assert_eq!(models[1]["tasks"][0]["accuracy"]["value"], 0.5);
    assert_eq!(models[1]["tasks"][0]["accuracy"]["n"], 2);
    // No model ran: no sampling settings, in report.json or report.md.
    assert!(
        report["settings"].get("sampling").is_none(),
        "{}",
        report["settings"]
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        !md.contains("Sampling") && md.contains("Scored predictions from"),
        "{md}"
    );
    assert_report_links_its_plots(&out);
}

#[test]
fn eval_refusals_are_one_line() {
    // A recipe whose student was never trained.
    let o = eval_in_repo(&["--recipe", "recipes/qwen7b.toml"]);
    assert_clean_failure(&o, &["final", "distill train"]);
    let o = eval_in_repo(&["--model", "tests/fixtures/tiny-qwen2"]);
    assert_clean_failure(&o, &["nothing to evaluate"]);
    let o = eval_in_repo(&["--model", "tests/fixtures/tiny-qwen2", "--tasks", "no/such.jsonl"]);
    assert_clean_failure(&o, &["no/such.jsonl"]);
    let o = eval_in_repo(&[
        "--model",
        "tests/fixtures/tiny-qwen2",
        "--held-out",
        "tests/fixtures/dataset",
        "--baseline",
        "nobody",
    ]);
    assert_clean_failure(&o, &["--baseline nobody", "tiny-qwen2"]);
    let tmp = tempfile::tempdir().unwrap();
    let preds = tmp.path().join("p.jsonl");
    std::fs::write(&preds, "{\"id\": \"0\"}\n").unwrap();
    let o = eval_in_repo(&[
        "--predictions",
        preds.to_str().unwrap(),
        "--tasks",
        "data/gsm8k/train-200.jsonl",
    ]);
    assert_clean_failure(&o, &["p.jsonl", "line 1", "output"]);
    // An id the tasks file does not have: which id, on which line of which file, and which
    // tasks file was searched.
    std::fs::write(
        &preds,
        "{\"id\": \"0\", \"output\": \"72\"}\n{\"id\": \"nope\", \"output\": \"1\"}\n",
    )
    .unwrap();
    let o = eval_in_repo(&[
        "--predictions",
        preds.to_str().unwrap(),
        "--tasks",
        "data/gsm8k/train-200.jsonl",
    ]);
    assert_clean_failure(
        &o,
        &[
            "p.jsonl",
            "line 2",
            "id `nope` is not in data/gsm8k/train-200.jsonl",
        ],
    );
    assert!(!stderr(&o).contains("pass --tasks"), "{}", stderr(&o));
}

/// `--kv-cache-gib`: a budget below the longest prompt and --max-new-tokens is refused, by
/// name; one that holds exactly that (so 4 prompts x 4 samples take turns in the cache) writes
/// the outputs the unbudgeted run writes.
#[test]
fn eval_under_a_kv_cache_budget_writes_the_same_outputs() {
    let run = |dir: &Path, budget: Option<String>| {
        let mut args = vec![
            "--model",
            "tests/fixtures/tiny-qwen2",
            "--tasks",
            "data/gsm8k/train-200.jsonl",
            "--max-examples",
            "4",
            "-n",
            "4",
            "--temperature",
            "1.0",
            "--max-new-tokens",
            "40",
            "--out",
            dir.to_str().unwrap(),
        ];
        if let Some(b) = &budget {
            args.extend(["--kv-cache-gib", b.as_str()]);
        }
        eval_in_repo(&args)
    };
    let outputs = |dir: &Path| -> Vec<String> {
        let text = std::fs::read_to_string(dir.join("examples.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["output"].to_string())
            .collect()
    };
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let small = run(c.path(), Some("0.00001".into()));
    assert_clean_failure(
        &small,
        &["--kv-cache-gib: 0.00001 GiB holds 20 positions, fewer than one sequence of"],
    );
    // What one sequence needs, as the refusal says: "needs (N)".
    let err = stderr(&small);
    let needed: f64 = err
        .split("needs (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let plain = run(a.path(), None);
    assert!(plain.status.success(), "{}", stderr(&plain));
    // tiny-qwen2's cache takes 512 bytes a position.
    let budgeted = run(
        b.path(),
        Some(format!("{}", needed * 512.0 / (1u64 << 30) as f64)),
    );
    assert!(budgeted.status.success(), "{}", stderr(&budgeted));
    assert_eq!(outputs(b.path()), outputs(a.path()));
    assert_eq!(outputs(a.path()).len(), 16);
}
