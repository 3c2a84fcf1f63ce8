//! Soft labels end to end: `distill gen-data` against a scripted teacher that returns logprobs
//! in the tiny-qwen2 vocabulary, then `distill inspect DATASET` validating what it wrote.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use distill_data::soft::{SoftLabels, soft_dir};
use distill_hf::token_map::TokenMap;
use distill_hf::tokenizer::TextTokenizer;
use distill_teacher::testing::{FakeTeacher, Reply, Seen, sum_in};
use serde_json::{Value, json};

use super::{assert_clean_failure, fixtures, stdout};

fn student() -> PathBuf {
    fixtures().join("tiny-qwen2")
}

/// "Case i: what is a+b?" prompts with their references.
fn write_prompts(dir: &Path, count: usize) -> PathBuf {
    let path = dir.join("prompts.jsonl");
    let lines: String = (0..count)
        .map(|i| {
            format!(
                "{}\n",
                json!({"question": format!("Case {i}: what is {i}+{}?", i + 1), "answer": format!("#### {}", 2 * i + 1)})
            )
        })
        .collect();
    std::fs::write(&path, lines).unwrap();
    path
}

fn write_recipe(dir: &Path, url: &str, prompts: &Path) -> PathBuf {
    let path = dir.join("soft.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"soft-test\"\n\n[teacher]\nmodel = \"fake-r1\"\nbase_url = \"{url}\"\napi_key_env = \"\"\n\n[student]\nmodel = \"{}\"\n\n[data]\nprompts = \"{}\"\ndataset = \"{}\"\n\n[gen]\nrequest_timeout_s = 20\nmax_retries = 1\nretry_base_delay_s = 0.01\nretry_max_delay_s = 0.05\nconcurrency = 2\n\n[soft_labels]\nenabled = true\nk = 4\n",
            student().display(),
            prompts.display(),
            dir.join("out").display()
        ),
    )
    .unwrap();
    path
}

fn distill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run distill")
}

/// What the teacher "generates" for a prompt: its reasoning and answer, as one token stream.
fn response_text(seen: &Seen) -> (String, String) {
    let sum = sum_in(&seen.prompt()).unwrap_or(0);
    let reasoning = format!("We add the two numbers: the sum is {sum}. Check: {sum} is right.");
    (reasoning, format!("The answer is \\boxed{{{sum}}}."))
}

/// A chat completion whose logprobs.content holds `tokens` (token text, true bytes) with a
/// top-2 of (the token, "#") each.
fn completion_with_logprobs(reasoning: &str, answer: &str, tokens: &[(String, Vec<u8>)]) -> String {
    let content: Vec<Value> = tokens
        .iter()
        .map(|(t, b)| {
            json!({"token": t, "logprob": -0.25, "bytes": b, "top_logprobs": [
                {"token": t, "logprob": -0.25, "bytes": b},
                {"token": "#", "logprob": -1.75, "bytes": b"#".to_vec()},
            ]})
        })
        .collect();
    json!({
        "model": "fake-r1",
        "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": answer, "reasoning_content": reasoning},
            "logprobs": {"content": content}}],
        "usage": {"prompt_tokens": 20, "completion_tokens": tokens.len()}
    })
    .to_string()
}

/// The generated token stream a server with a reasoning parser reports: reasoning, the
/// closing tag, the answer (the tiny vocabulary has no special think tokens: it is text).
fn generated(reasoning: &str, answer: &str) -> String {
    format!("{reasoning}\n</think>\n\n{answer}")
}

/// A teacher sharing the student's vocabulary: canonical tokens with their true bytes.
fn same_vocab_teacher() -> FakeTeacher {
    let tok = TextTokenizer::from_dir(&student()).unwrap();
    let map = TokenMap::new(&tok).unwrap();
    FakeTeacher::start(move |seen| {
        let (reasoning, answer) = response_text(seen);
        let ids = tok.encode(&generated(&reasoning, &answer), false).unwrap();
        let tokens: Vec<(String, Vec<u8>)> = ids
            .iter()
            .map(|&id| {
                let b = map.bytes_of(id).unwrap().to_vec();
                (String::from_utf8_lossy(&b).into_owned(), b)
            })
            .collect();
        Reply::ok(completion_with_logprobs(&reasoning, &answer, &tokens))
    })
}

#[test]
fn gen_data_writes_soft_labels_that_inspect_validates() {
    let server = same_vocab_teacher();
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write_prompts(tmp.path(), 6);
    let recipe = write_recipe(tmp.path(), &server.url(), &prompts);
    let recipe_arg = recipe.to_str().unwrap();
    let out = tmp.path().join("out");

    let o = distill(&["gen-data", "--recipe", recipe_arg, "--set", "data.max_prompts=4"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("top-4 at"), "{}", stdout(&o));
    assert!(
        server
            .requests()
            .iter()
            .all(|r| r.body["logprobs"] == true && r.body["top_logprobs"] == 4)
    );
    // Resuming adds the rest to the same store.
    let o = distill(&["gen-data", "--recipe", recipe_arg]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let tok = TextTokenizer::from_dir(&student()).unwrap();
    let labels = SoftLabels::open(&soft_dir(&out)).unwrap();
    let m = labels.manifest();
    assert_eq!(
        (m.k, m.source.as_str(), m.temperature),
        (4, "api-top-logprobs", 0.6)
    );
    assert_eq!(m.tokenizer_hash, tok.hash);
    assert_eq!(m.counts.samples, 6);
    assert!(m.bytes_per_token > 0.0);
    let samples = distill_data::shards::read_samples(&out).unwrap();
    assert_eq!(samples.len(), 6);
    for s in &samples {
        let rec = labels.get(&s.key).unwrap().expect("every sample has soft labels");
        assert_eq!(
            rec.ids,
            tok.encode(&generated(&s.reasoning, &s.answer), false).unwrap()
        );
        let (ids, lps) = rec.position(0);
        assert_eq!(ids[0], rec.ids[0]);
        assert!((lps[0] + 0.25).abs() < 1e-3 && (lps[1] + 1.75).abs() < 1e-2);
        assert_eq!(ids[2..], [u32::MAX, u32::MAX]);
    }
    let manifest: Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["soft_labels"]["samples"], 6);
    assert_eq!(manifest["soft_labels"]["mismatch_rate"], 0.0);

    let student_arg = student().to_str().unwrap().to_string();
    let o = distill(&["inspect", out.to_str().unwrap(), "--student", &student_arg]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = stdout(&o);
    for want in [
        "6 in 1 shard(s)",
        "api-top-logprobs, top-4 f16",
        "bytes/token",
        "validation      ok",
    ] {
        assert!(text.contains(want), "`{want}` not in:\n{text}");
    }
    println!("{text}");

    // A sample without soft labels (appended by hand) fails validation in one line.
    let mut extra = samples[0].clone();
    extra.key = "0".repeat(64);
    let mut shard = std::fs::read_to_string(out.join("samples-00000.jsonl")).unwrap();
    shard.push_str(&format!("{}\n", serde_json::to_string(&extra).unwrap()));
    std::fs::write(out.join("samples-00000.jsonl"), shard).unwrap();
    let o = distill(&["inspect", out.to_str().unwrap(), "--student", &student_arg]);
    assert_clean_failure(
        &o,
        &[
            "fail validation",
            "1 samples without soft labels",
            &"0".repeat(64),
        ],
    );
}

#[test]
fn gen_data_refuses_a_teacher_whose_tokens_do_not_map() {
    // Whole words as single tokens: a vocabulary the 384-token student does not share.
    let server = FakeTeacher::start(|seen| {
        let (_, answer) = response_text(seen);
        let reasoning: String = (0..120).map(|j| format!(" considering {j} marbles")).collect();
        let text = generated(&reasoning, &answer);
        let tokens: Vec<(String, Vec<u8>)> = text
            .split_inclusive(' ')
            .map(|w| (w.to_string(), w.as_bytes().to_vec()))
            .collect();
        Reply::ok(completion_with_logprobs(&reasoning, &answer, &tokens))
    });
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write_prompts(tmp.path(), 8);
    let recipe = write_recipe(tmp.path(), &server.url(), &prompts);
    let o = distill(&["gen-data", "--recipe", recipe.to_str().unwrap()]);
    assert_clean_failure(
        &o,
        &[
            "do not carry over",
            "fake-r1",
            "tiny-qwen2",
            "max_mismatch_rate = 0.01",
            "HINT",
            "--rescore",
        ],
    );
    // What was recorded before the refusal has its soft labels; nothing else was recorded.
    let out = tmp.path().join("out");
    let samples = distill_data::shards::read_samples(&out).unwrap();
    assert!(samples.len() < 8, "{}", samples.len());
    let labels = SoftLabels::open(&soft_dir(&out)).unwrap();
    assert!(samples.iter().all(|s| labels.contains(&s.key)));

    // A server that returns no logprobs at all.
    let plain = FakeTeacher::start(|seen| Reply::ok(distill_teacher::testing::echo_completion(seen)));
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write_prompts(tmp.path(), 2);
    let recipe = write_recipe(tmp.path(), &plain.url(), &prompts);
    let o = distill(&["gen-data", "--recipe", recipe.to_str().unwrap()]);
    assert_clean_failure(&o, &["returned no logprobs", "soft_labels.enabled = false"]);
    // Re-scoring is its own command.
    let o = distill(&[
        "gen-data",
        "--recipe",
        recipe.to_str().unwrap(),
        "--set",
        "soft_labels.source=local-rescore",
    ]);
    assert_clean_failure(&o, &["--rescore"]);
}
