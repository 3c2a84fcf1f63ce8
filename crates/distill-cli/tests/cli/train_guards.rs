//! `distill train`'s guards as users meet them: every bad recipe value named with its file
//! and line (or its `--set`) before anything is written; a second run over an earlier one,
//! `--resume` without a checkpoint and `--resume` with a changed recipe refused in one line
//! with the earlier run's files untouched; a torn last dataset line reported, not fatal.

use distill_core::testing::snapshot;

use super::{assert_clean_failure, copy_fixture, stderr, stdout, train};

#[test]
fn train_lists_every_bad_setting_with_its_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("bad.toml");
    std::fs::write(
        &recipe,
        "name = \"bad\"\n\n[train]\nepochs = -1\nlr = 0.0\nbeta2 = 1.0\ncheckpoint_every = 0\n\n[lora]\nr = 0\ndropout = 1.5\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let out_set = format!("train.out={:?}", out.to_str().unwrap());
    let o = train(&[
        "--recipe",
        recipe.to_str().unwrap(),
        "--set",
        &out_set,
        "--set",
        "train.max_steps=0",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let path = recipe.display();
    let want = [
        format!("error: {path}: 7 invalid settings:"),
        format!("  {path}:4: train.epochs: must be > 0, got -1"),
        format!("  {path}:5: train.lr: must be > 0, got 0"),
        format!("  {path}:6: train.beta2: must be in [0, 1), got 1"),
        format!("  {path}:7: train.checkpoint_every: must be at least 1, got 0"),
        format!("  {path}:10: lora.r: must be at least 1, got 0"),
        format!("  {path}:11: lora.dropout: must be in [0, 1), got 1.5"),
        format!(
            "  {path}: --set train.max_steps=0: train.max_steps: must be at least 1 (or left out), got 0"
        ),
    ];
    assert_eq!(stderr(&o).lines().collect::<Vec<_>>(), want);
    assert!(!out.exists(), "a refused recipe wrote {}", out.display());

    // One bad value: one line, as every other error.
    std::fs::write(&recipe, "name = \"bad\"\n[train]\nepochs = 0\n").unwrap();
    let o = train(&["--recipe", recipe.to_str().unwrap(), "--set", &out_set]);
    assert_clean_failure(&o, &[&format!("{path}:3: train.epochs: must be > 0, got 0")]);
    assert!(!out.exists());
}

#[test]
fn a_second_run_or_a_changed_resume_is_refused_and_touches_nothing() {
    let out = tempfile::tempdir().unwrap();
    let out_set = format!("train.out={:?}", out.path().to_str().unwrap());
    let base = [
        "--recipe",
        "recipes/tiny.toml",
        "--set",
        &out_set,
        "--set",
        "train.seq_len=256",
        "--set",
        "train.max_steps=1",
    ];
    let o = train(&base);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = out.path().join("tiny");
    assert!(run.join("step-1/state.json").exists() && run.join("final/config.json").exists());
    let before = snapshot(out.path());

    // The same command again: refused before any work.
    let o = train(&base);
    assert_clean_failure(
        &o,
        &[
            &format!("{} already holds a run", run.display()),
            "HINT: continue it with --resume",
            "--set train.out=",
            "--set name=",
        ],
    );
    assert_eq!(
        snapshot(out.path()),
        before,
        "the refused run touched the earlier one"
    );

    // --resume with a key that changes the run: refused, naming it.
    let o = train(&[&base[..], &["--resume", "--set", "train.lr=1e-3"]].concat());
    assert_clean_failure(
        &o,
        &[
            "step-1/recipe.toml",
            "--resume with a changed recipe: train.lr was 0.003, is 0.001",
            "HINT: set it back",
        ],
    );
    assert_eq!(snapshot(out.path()), before, "the refused resume touched the run");

    // --resume somewhere nothing was saved: refused, nothing created.
    let elsewhere = out.path().join("elsewhere");
    let o = train(
        &[
            &base[..],
            &[
                "--resume",
                "--set",
                &format!("train.out={:?}", elsewhere.to_str().unwrap()),
            ],
        ]
        .concat(),
    );
    assert_clean_failure(
        &o,
        &[
            "--resume: no checkpoint",
            "nothing has been saved there",
            "run without --resume",
        ],
    );
    assert!(!elsewhere.exists());
}

#[test]
fn a_torn_last_dataset_line_is_reported_and_the_rest_trains() {
    let data = copy_fixture("dataset");
    let shard = data.path().join("samples-00000.jsonl");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes.extend_from_slice(b"{\"key\": \"cut off by kill -9");
    std::fs::write(&shard, &bytes).unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = train(&[
        "--recipe",
        "recipes/tiny.toml",
        "--set",
        &format!("train.out={:?}", out.path().to_str().unwrap()),
        "--set",
        &format!("data.dataset={:?}", data.path().to_str().unwrap()),
        "--set",
        "train.seq_len=256",
        "--set",
        "train.max_steps=1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!(
            "warning: {}: dropped 1 torn last line (27 bytes, a write cut off by a crash)",
            shard.display()
        )),
        "{}",
        stderr(&o)
    );
    // All 48 whole samples were read: train + held-out + cut off by max_tokens + over seq_len.
    let text = stdout(&o);
    let counts: Vec<usize> = text
        .lines()
        .find(|l| l.starts_with("data: "))
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(counts[..4].iter().sum::<usize>(), 48, "{text}");
}

/// `--gpus`: a count of 0, a `--device` it would contradict, and (in a build without CUDA)
/// the build itself, each refused in one line before anything is written.
#[test]
fn train_on_gpus_refuses_what_it_cannot_run() {
    let out = tempfile::tempdir().unwrap();
    let out_set = format!("train.out={:?}", out.path().to_str().unwrap());
    let base = ["--recipe", "recipes/tiny.toml", "--set", &out_set];
    let with = |extra: &[&str]| train(&[&base[..], extra].concat());
    assert_clean_failure(&with(&["--gpus", "0"]), &["--gpus 0: give the number of GPUs"]);
    let recipe = super::repo_root().join("recipes/tiny.toml");
    let o = super::distill(&[
        "--device",
        "cpu",
        "train",
        "--recipe",
        recipe.to_str().unwrap(),
        "--set",
        &out_set,
        "--gpus",
        "2",
    ]);
    assert_clean_failure(
        &o,
        &[
            "--gpus 2 trains on GPUs 0..2, not on --device cpu",
            "CUDA_VISIBLE_DEVICES",
        ],
    );
    if !cfg!(feature = "cuda") {
        assert_clean_failure(
            &with(&["--gpus", "2"]),
            &["--gpus 2: this distill was built without CUDA"],
        );
    }
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "nothing written"
    );
}
