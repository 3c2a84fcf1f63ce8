//! On-policy distillation as users run it (recipes/tiny-on-policy.toml): with the teacher
//! behind `distill serve` on loopback, and killed with SIGKILL mid-run then resumed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{repo_root, stderr, stdout, train};

/// The "held-out reverse KL to the teacher A -> B" of a run's summary.
fn reverse_kl(out: &str) -> (f64, f64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("on-policy:"))
        .unwrap_or_else(|| panic!("no on-policy line: {out}"));
    let tail = line.rsplit("teacher ").next().unwrap();
    let (a, b) = tail.split_once(" -> ").unwrap();
    (a.trim().parse().unwrap(), b.trim().parse().unwrap())
}

/// The last step's loss from "loss: A -> B over N steps".
fn last_loss(out: &str) -> String {
    let line = out
        .lines()
        .find(|l| l.starts_with("loss:"))
        .unwrap_or_else(|| panic!("no loss line: {out}"));
    line.split(" -> ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn on_policy_with_a_served_teacher_lowers_the_reverse_kl() {
    let (_server, url) = super::soft_roundtrip::serve(&super::fixtures().join("tiny-llama"));
    let out = tempfile::tempdir().unwrap();
    let sets = [
        format!("train.out={:?}", out.path().to_str().unwrap()),
        "on_policy.teacher=\"server\"".into(),
        "on_policy.divergence=\"sampled_reverse_kl\"".into(),
        format!("teacher.base_url={url:?}"),
        "teacher.model=\"tiny-llama\"".into(),
        "teacher.api_key_env=\"\"".into(),
        "gen.concurrency=4".into(),
    ];
    let mut args = vec!["--recipe", "recipes/tiny-on-policy.toml"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let o = train(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("on-policy: 12 of 12 steps"), "{text}");
    let (before, after) = reverse_kl(&text);
    assert!(
        after < 0.8 * before,
        "held-out reverse KL {before} -> {after}\n{text}"
    );
}

#[test]
fn on_policy_killed_mid_run_resumes_to_the_same_final_loss() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let out_of = |dir: &Path| format!("train.out={:?}", dir.to_str().unwrap());
    let base = [
        "--recipe",
        "recipes/tiny-on-policy.toml",
        "--set",
        "on_policy.share=0.5",
    ];
    let whole = train(&[&base[..], &["--set", &out_of(a.path())]].concat());
    assert!(whole.status.success(), "{}", stderr(&whole));

    // step-3 holds half a buffer window; the kill lands after it, before the run ends.
    let set_b = out_of(b.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_distill"))
        .arg("train")
        .args(base)
        .args(["--set", &set_b])
        .current_dir(repo_root())
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let checkpoint = b.path().join("tiny-on-policy/step-3/state.json");
    let started = Instant::now();
    while !checkpoint.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint at step 3"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before step 3 was saved"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let resumed = train(&[&base[..], &["--set", &set_b, "--resume"]].concat());
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert_eq!(last_loss(&stdout(&resumed)), last_loss(&stdout(&whole)));
}

/// Sampling under `[on_policy] kv_cache_gib` (one sample's worth of cache, so the 32 rows of
/// a window take turns) trains on the same samples: every step's loss is the unbudgeted
/// run's. A budget below one sample of train.seq_len is refused
/// by name.
#[test]
fn on_policy_under_a_kv_cache_budget_trains_the_same_and_refuses_one_too_small() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let run = |dir: &Path, budget: Option<&str>| {
        let out = format!("train.out={:?}", dir.to_str().unwrap());
        let mut args = vec![
            "--recipe",
            "recipes/tiny-on-policy.toml",
            "--set",
            "train.max_steps=4",
            "--set",
            &out,
        ];
        let budget = budget.map(|gib| format!("on_policy.kv_cache_gib={gib}"));
        if let Some(b) = &budget {
            args.extend(["--set", b.as_str()]);
        }
        train(&args)
    };
    let losses = |dir: &Path| {
        let text = std::fs::read_to_string(dir.join("tiny-on-policy/runs/metrics.jsonl")).unwrap();
        let values: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        values
            .iter()
            .filter_map(|v| v["loss"].as_f64())
            .collect::<Vec<f64>>()
    };
    let plain = run(a.path(), None);
    assert!(plain.status.success(), "{}", stderr(&plain));
    // tiny-qwen2's cache takes 512 bytes a position; train.seq_len 256 needs 320 positions.
    let budgeted = run(b.path(), Some("0.000152587890625"));
    assert!(budgeted.status.success(), "{}", stderr(&budgeted));
    assert_eq!(losses(b.path()), losses(a.path()));
    assert_eq!(losses(a.path()).len(), 4);

    let small = run(tempfile::tempdir().unwrap().path(), Some("0.0001"));
    assert!(!small.status.success());
    let err = stderr(&small);
    assert!(
        err.contains("on_policy.kv_cache_gib: 0.0001 GiB holds 209 positions, fewer than one sequence of 256 needs (320) (train.seq_len): raise it"),
        "{err}"
    );
}
