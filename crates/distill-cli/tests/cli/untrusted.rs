//! A model directory from an untrusted source, as `distill inspect` meets it: a chat template
//! that would build terabytes, a tokenizer.json or config.json with absurd sizes, are refused in
//! one line naming the file and the limit, instead of taking the machine's memory.

use super::{assert_clean_failure, copy_fixture, distill};

#[test]
fn inspect_refuses_a_template_that_would_exhaust_memory() {
    let tmp = copy_fixture("tiny-llama");
    // Forty doublings: a terabyte string in under a hundred instructions.
    std::fs::write(
        tmp.path().join("chat_template.jinja"),
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    )
    .unwrap();
    let dir = tmp.path().to_str().unwrap();
    assert_clean_failure(
        &distill(&["inspect", dir]),
        &[
            "chat_template.jinja",
            "needed more than 256 MiB of memory and was stopped",
        ],
    );
}

#[test]
fn inspect_refuses_absurd_sizes_in_config_and_tokenizer() {
    let tmp = copy_fixture("tiny-qwen2");
    let config = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["num_hidden_layers"] = serde_json::json!(1_000_000);
    std::fs::write(&config, json.to_string()).unwrap();
    let dir = tmp.path().to_str().unwrap();
    assert_clean_failure(
        &distill(&["inspect", dir]),
        &[
            "config.json",
            "`num_hidden_layers` is 1000000, over the limit of 1024",
        ],
    );
    std::fs::write(&config, text).unwrap();
    let tokenizer = tmp.path().join("tokenizer.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&tokenizer).unwrap()).unwrap();
    json["model"]["vocab"]["evil"] = serde_json::json!(4_000_000_000u64);
    std::fs::write(&tokenizer, json.to_string()).unwrap();
    assert_clean_failure(
        &distill(&["inspect", dir]),
        &["tokenizer.json", "token id 4000000000 is over the limit"],
    );
}
