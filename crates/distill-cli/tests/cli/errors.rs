//! Error messages as printed: each cause once.

use super::*;

/// Every command that reads a file the user names prints the OS's reason once, after the
/// path: the message shows it and no cause in the chain repeats it.
#[test]
fn a_missing_file_is_reported_with_its_reason_once() {
    let tmp = tempfile::tempdir().unwrap();
    let path = |name: &str| tmp.path().join(name).to_str().unwrap().to_owned();
    let preds = path("preds.jsonl");
    std::fs::write(&preds, "{\"id\": \"0\", \"output\": \"72\"}\n").unwrap();
    // A model directory without its files.
    let empty = path("empty");
    std::fs::create_dir(&empty).unwrap();
    let gsm8k = repo_root().join("data/gsm8k/train-200.jsonl");
    let gsm8k = gsm8k.to_str().unwrap();
    let cases: [(&[&str], &str); 7] = [
        (&["train", "--recipe", &path("missing.toml")], "missing.toml"),
        (
            &[
                "eval",
                "--predictions",
                &path("missing.jsonl"),
                "--tasks",
                gsm8k,
                "--out",
                &path("e1"),
            ],
            "missing.jsonl",
        ),
        (
            &[
                "eval",
                "--predictions",
                &preds,
                "--tasks",
                &path("no-tasks.jsonl"),
                "--out",
                &path("e2"),
            ],
            "no-tasks.jsonl",
        ),
        (&["inspect", &empty], "empty/config.json"),
        (&["generate", &empty, "--prompt", "hi"], "empty/tokenizer.json"),
        (
            &["import", "gguf", &path("missing.gguf"), "--out", &path("m")],
            "missing.gguf",
        ),
        (
            &["export", "gguf", "--model", &empty, "--out", &path("m.gguf")],
            "empty/config.json",
        ),
    ];
    for (args, names) in cases {
        let o = distill(args);
        assert_clean_failure(&o, &[names]);
        let err = stderr(&o);
        assert_eq!(err.matches("(os error 2)").count(), 1, "{args:?}: {err}");
    }
}
