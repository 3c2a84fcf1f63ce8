//! `distill init-student`: a student made from a fixture teacher by layer selection loads in
//! `distill inspect`, and bad selections or an occupied --out fail in one line.

use std::path::Path;

use super::{assert_clean_failure, distill, fixtures, stderr, stdout};

fn init_student(from: &Path, out: &Path, selection: &[&str]) -> std::process::Output {
    let args = [
        &[
            "init-student",
            "--from",
            from.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ][..],
        selection,
    ]
    .concat();
    distill(&args)
}

/// `distill inspect --json` on `dir`, which must succeed.
fn inspect(dir: &Path) -> serde_json::Value {
    let o = distill(&["inspect", "--json", dir.to_str().unwrap()]);
    assert!(o.status.success(), "student does not inspect: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

#[test]
fn init_student_keeps_every_other_layer_and_the_result_inspects() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("student");
    let teacher = fixtures().join("tiny-llama");
    let o = init_student(&teacher, &out, &["--keep-every", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("kept layers  0,2 of 3"), "{text}");
    assert!(text.contains("BF16"), "{text}");

    let (before, after) = (inspect(&teacher), inspect(&out));
    assert_eq!(after["num_hidden_layers"], 2);
    assert_eq!(after["architecture"], before["architecture"]);
    assert_eq!(after["tokenizer_sha256"], before["tokenizer_sha256"]);
    let params = |v: &serde_json::Value| v["parameters"].as_u64().unwrap();
    assert!(params(&after) < params(&before));
    assert!(
        text.contains(&format!("({}) -> ", params(&before)))
            && text.contains(&format!("({}),", params(&after))),
        "printed counts differ from inspect's: {text}"
    );
}

#[test]
fn init_student_with_a_list_filters_layer_types() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("student");
    let o = init_student(&fixtures().join("tiny-qwen2"), &out, &["--layers", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(inspect(&out)["num_hidden_layers"], 1);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["layer_types"], serde_json::json!(["full_attention"]));
}

#[test]
fn init_student_refuses_bad_selections_and_an_occupied_out() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("student");
    let teacher = fixtures().join("tiny-llama");
    let o = init_student(&teacher, &out, &["--layers", "0,3"]);
    assert_clean_failure(&o, &["--layers", "layer 3 is out of range", "3 layers"]);
    let o = init_student(&teacher, &out, &["--layers", "2,1"]);
    assert_clean_failure(&o, &["--layers", "not increasing"]);
    let o = init_student(&teacher, &out, &["--keep-every", "0"]);
    assert_clean_failure(&o, &["--keep-every", "at least 1"]);
    assert!(!out.exists(), "a failed run left {}", out.display());

    let o = init_student(&teacher, &out, &["--keep-every", "2", "--keep-last"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = init_student(&teacher, &out, &["--layers", "1"]);
    assert_clean_failure(&o, &["student", "--force"]);
    let o = init_student(&teacher, &out, &["--layers", "1", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(inspect(&out)["num_hidden_layers"], 1);
}
