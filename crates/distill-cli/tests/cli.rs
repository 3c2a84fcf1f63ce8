//! The `distill` binary as users run it: exit codes, one-line errors, output on fixtures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn distill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env(
            "HF_HUB_CACHE",
            std::env::temp_dir().join("distill-empty-hf-cache"),
        )
        .output()
        .expect("run distill")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure as users should meet it: non-zero exit, one line on stderr, no panic.
fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

#[test]
fn help_lists_the_commands() {
    let o = distill(&["--help"]);
    assert!(o.status.success());
    let out = stdout(&o);
    for cmd in ["gen-data", "train", "eval", "inspect", "--device"] {
        assert!(out.contains(cmd), "{cmd} missing from --help:\n{out}");
    }
}

#[test]
fn unbuilt_commands_say_so_and_fail() {
    for cmd in ["gen-data", "train", "eval"] {
        let o = distill(&[cmd, "--recipe", "recipes/qwen7b.toml"]);
        assert_clean_failure(&o, &[cmd, "not built yet"]);
    }
}

#[test]
fn inspect_describes_the_fixtures() {
    let o = distill(&["inspect", fixtures().join("tiny-llama").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "LlamaForCausalLM",
        "147.9K (147904)",
        "BF16",
        "vocab size       384",
        "2048 tokens",
        "llama3 x8",
        "tied to lm_head",
        "eos <|im_end|> (2)",
        "yes (chat_template.jinja)",
        "model.safetensors.index.json",
        "model-00007-of-00007.safetensors",
    ] {
        assert!(out.contains(needle), "`{needle}` missing:\n{out}");
    }

    let o = distill(&[
        "inspect",
        "--json",
        fixtures().join("tiny-qwen2").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["architecture"], "Qwen2ForCausalLM");
    assert_eq!(json["tie_word_embeddings"], false);
    assert_eq!(json["chat_template"], "tokenizer_config.json");
    assert_eq!(json["dtypes"]["F32"], 27);
}

#[test]
fn inspect_on_broken_model_dirs_fails_cleanly() {
    let tmp = copy_fixture("tiny-qwen2");
    let dir = tmp.path().to_str().unwrap().to_string();
    std::fs::write(
        tmp.path().join("config.json"),
        "{\"architectures\": [\"Qwen2ForCausalLM\"],\n oops}",
    )
    .unwrap();
    assert_clean_failure(&distill(&["inspect", &dir]), &["config.json", "line 2"]);

    let tmp = copy_fixture("tiny-qwen2");
    let dir = tmp.path().to_str().unwrap().to_string();
    let weights = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..1000]).unwrap();
    assert_clean_failure(
        &distill(&["inspect", &dir]),
        &["model.safetensors", "not a valid safetensors"],
    );

    let tmp = copy_fixture("tiny-llama");
    let dir = tmp.path().to_str().unwrap().to_string();
    std::fs::remove_file(tmp.path().join("model-00003-of-00007.safetensors")).unwrap();
    assert_clean_failure(
        &distill(&["inspect", &dir]),
        &["model-00003-of-00007.safetensors"],
    );

    let tmp = copy_fixture("tiny-qwen2");
    let dir = tmp.path().to_str().unwrap().to_string();
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    assert_clean_failure(&distill(&["inspect", &dir]), &["tokenizer.json"]);

    assert_clean_failure(
        &distill(&["inspect", "org/not-cached"]),
        &["HF_HUB_OFFLINE", "config.json"],
    );
}

#[test]
fn generate_decodes_greedily_and_is_deterministic() {
    let model = fixtures().join("tiny-llama");
    let args = [
        "--device",
        "cpu",
        "generate",
        model.to_str().unwrap(),
        "--prompt",
        "Natalia",
        "--max-new-tokens",
        "12",
    ];
    let a = distill(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(!stdout(&a).trim().is_empty());
    assert_eq!(stdout(&a), stdout(&distill(&args)));
    let chat = distill(&[
        "generate",
        model.to_str().unwrap(),
        "--chat",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "4",
    ]);
    assert!(chat.status.success(), "{}", stderr(&chat));
}

#[test]
fn device_errors_are_one_line() {
    let o = distill(&["--device", "tpu", "inspect", "x"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("`tpu` is not a device"), "{}", stderr(&o));
    if !cfg!(feature = "cuda") {
        let model = fixtures().join("tiny-qwen2");
        let o = distill(&[
            "--device",
            "cuda",
            "generate",
            model.to_str().unwrap(),
            "--prompt",
            "a",
        ]);
        assert_clean_failure(&o, &["built without CUDA", "--features cuda"]);
    }
}
