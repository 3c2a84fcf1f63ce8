//! `distill gen-data --rescore` then `distill train` on the stored soft labels.

use super::*;

fn run_in_repo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        .current_dir(repo_root())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run distill")
}

#[test]
fn rescored_soft_labels_feed_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for e in std::fs::read_dir(fixtures().join("dataset")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), data.join(e.file_name())).unwrap();
    }
    let body = format!(
        "[student]\nmodel = \"tests/fixtures/tiny-qwen2\"\n[data]\ndataset = {:?}\n[soft_labels]\nk = 8\n\
         [train]\nout = {:?}\nmax_steps = 2\nseq_len = 1024\nmicro_batch = 2\ngrad_accum = 1\n[loss]\nkd_ratio = 0.5\n",
        data.to_str().unwrap(),
        tmp.path().join("ckpt").to_str().unwrap()
    );
    let recipe = tmp.path().join("r.toml");
    let teacher = "[teacher]\nlocal_model = \"tests/fixtures/tiny-llama\"\n";
    std::fs::write(&recipe, format!("name = \"soft\"\n{teacher}{body}")).unwrap();
    let no_teacher = tmp.path().join("no-teacher.toml");
    std::fs::write(&no_teacher, format!("name = \"soft2\"\n{body}")).unwrap();
    let r = recipe.to_str().unwrap();
    let o = run_in_repo(&["gen-data", "--recipe", r, "--rescore"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("re-scored 48 samples"), "{}", stdout(&o));
    assert!(data.join("soft/manifest.json").exists());
    // Interrupted or not, a second run has nothing left to do.
    let o = run_in_repo(&["gen-data", "--recipe", r, "--rescore"]);
    assert!(
        stdout(&o).contains("re-scored 0 samples") && stdout(&o).contains("48 were already scored"),
        "{}",
        stdout(&o)
    );

    // Eval measures KL and agreement against the stored labels when no live teacher is
    // given: the teacher that made them agrees with itself (to f16 rounding and the rest
    // bucket of its top-8).
    let eval_out = tmp.path().join("eval");
    let o = run_in_repo(&[
        "eval",
        "--model",
        "tests/fixtures/tiny-llama",
        "--held-out",
        data.to_str().unwrap(),
        "--held-out-share",
        "1",
        "--seq-len",
        "1024",
        "--max-examples",
        "6",
        "--out",
        eval_out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval_out.join("report.json")).unwrap()).unwrap();
    let held = &report["models"][0]["held_out"];
    assert_eq!(held["examples"], 6);
    assert!(held["kl_to_teacher"]["value"].as_f64().unwrap() < 5e-3, "{held}");
    assert_eq!(held["top1_agreement"]["value"].as_f64().unwrap(), 1.0, "{held}");

    // Training prefers the stored soft labels to loading the live teacher (the 3 samples
    // cut off by max_tokens are not trained on).
    let o = run_in_repo(&["train", "--recipe", r]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("soft labels: 45 samples aligned, 0 without a record, 0 misaligned"),
        "{}",
        stdout(&o)
    );

    // No teacher distribution at all: KD is refused, not silently CE.
    std::fs::remove_dir_all(data.join("soft")).unwrap();
    let o = run_in_repo(&["train", "--recipe", no_teacher.to_str().unwrap()]);
    assert_clean_failure(&o, &["kd_ratio = 0.5", "soft labels", "--rescore"]);
    // And --rescore without a teacher says how to name one.
    let o = run_in_repo(&["gen-data", "--recipe", no_teacher.to_str().unwrap(), "--rescore"]);
    assert_clean_failure(&o, &["local teacher", "--teacher"]);
}

/// The vLLM route (`source = "vllm-prompt-logprobs"`) against `distill serve`, which answers
/// `prompt_logprobs` as vLLM does, gives the soft labels local re-scoring gives.
#[test]
fn server_prompt_logprobs_rescoring_equals_local_rescoring() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(fixtures().join("dataset")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        dir
    };
    let (local, remote) = (copy("local"), copy("remote"));
    let (_server, url) = super::soft_roundtrip::serve(&fixtures().join("tiny-llama"));
    let recipe = |name: &str, dataset: &Path, teacher: &str, source: &str| {
        let path = tmp.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "name = \"{name}\"\n[teacher]\n{teacher}\n[student]\nmodel = \"tests/fixtures/tiny-qwen2\"\n\
                 [data]\ndataset = {:?}\n[gen]\nconcurrency = 4\n[soft_labels]\nsource = \"{source}\"\nk = 8\n[train]\nseq_len = 1024\n",
                dataset.to_str().unwrap()
            ),
        )
        .unwrap();
        path
    };
    let local_recipe = recipe(
        "local",
        &local,
        "local_model = \"tests/fixtures/tiny-llama\"",
        "local-rescore",
    );
    let remote_recipe = recipe(
        "remote",
        &remote,
        &format!("model = \"tiny-llama\"\nbase_url = \"{url}\"\napi_key_env = \"\""),
        "vllm-prompt-logprobs",
    );
    for r in [&local_recipe, &remote_recipe] {
        let o = run_in_repo(&["gen-data", "--recipe", r.to_str().unwrap(), "--rescore"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains("re-scored 48 samples"), "{}", stdout(&o));
    }
    let a = distill_data::soft::SoftLabels::open(&local.join("soft")).unwrap();
    let b = distill_data::soft::SoftLabels::open(&remote.join("soft")).unwrap();
    assert_eq!(
        b.manifest().source,
        distill_core::recipe::SoftLabelSource::VllmPromptLogprobs
    );
    let mut positions = 0;
    for key in a.keys() {
        let (ra, rb) = (a.get(key).unwrap().unwrap(), b.get(key).unwrap().unwrap());
        assert_eq!(ra.ids, rb.ids, "sample {key}: label tokens");
        for t in 0..ra.len() {
            let ((ia, la), (ib, lb)) = (ra.position(t), rb.position(t));
            for j in 0..8 {
                // Near-ties may swap places between two computations; their values agree.
                assert!(
                    (la[j] - lb[j]).abs() < 5e-3,
                    "sample {key} position {t} rank {j}: {} vs {}",
                    la[j],
                    lb[j]
                );
                if j == 0 || (la[j - 1] - la[j]).abs() > 1e-2 {
                    assert_eq!(ia[j], ib[j], "sample {key} position {t} rank {j}");
                }
            }
            positions += 1;
        }
    }
    assert!(positions > 1000, "{positions}");
}
