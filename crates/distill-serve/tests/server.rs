//! The server in process on the tiny fixture model (Flex CPU backend), spoken to over real
//! HTTP: its answers against distill-eval's engine and teacher forcing on the same model.

use std::path::PathBuf;
use std::time::Duration;

use burn::backend::Flex;
use distill_data::examples::{Example, IGNORE};
use distill_hf::template::Message;
use distill_hf::tokenizer::TextTokenizer;
use distill_infer::generate::{GenerationConfig, Request, Sampling, eos_ids, generate};
use distill_infer::score::teacher_force;
use distill_models::CausalLm;
use distill_serve::tokens::Vocab;
use distill_serve::{ServeError, ServeOptions, Server};
use serde_json::{Value, json};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-qwen2")
}

fn options(batch_window: Duration) -> ServeOptions {
    ServeOptions {
        host: "127.0.0.1".into(),
        port: 0,
        batch_size: 8,
        served_model_name: "tiny".into(),
        max_model_len: None,
        batch_window,
    }
}

fn start() -> Server {
    Server::start::<Flex>(
        fixture(),
        options(ServeOptions::DEFAULT_BATCH_WINDOW),
        Default::default(),
    )
    .unwrap()
}

/// The fixture as the test's own reference: model, tokenizer, vocabulary bytes.
struct Reference {
    model: CausalLm<Flex>,
    tokenizer: TextTokenizer,
    vocab: Vocab,
}

impl Reference {
    fn load() -> Reference {
        let dir = fixture();
        let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
        Reference {
            model: CausalLm::load(&dir, &Default::default()).unwrap(),
            vocab: Vocab::new(&tokenizer),
            tokenizer,
        }
    }

    fn chat_prompt(&self, user: &str) -> Vec<u32> {
        self.tokenizer
            .encode_chat(&[Message::new("user", user)], true)
            .unwrap()
    }

    fn generate(
        &self,
        prompt: &[u32],
        seeds: &[u64],
        sampling: Sampling,
        max_new_tokens: usize,
        k: usize,
    ) -> Vec<distill_infer::generate::Generation> {
        let requests: Vec<Request> = seeds
            .iter()
            .map(|&seed| Request {
                prompt: prompt.to_vec(),
                seed,
            })
            .collect();
        let cfg = GenerationConfig {
            max_new_tokens,
            sampling,
            stop: vec![],
            eos: eos_ids(&self.model, &self.tokenizer),
            batch_size: 8,
            logprobs: Some(k),
        };
        generate(
            &self.model,
            &self.tokenizer,
            &requests,
            &cfg,
            &Default::default(),
            |_, _| {},
        )
        .unwrap()
        .0
    }

    /// log p(token | previous) and the top-k at every position after the first.
    fn force(&self, ids: &[u32], k: usize) -> distill_infer::score::Forced {
        let mut labels: Vec<i64> = ids[1..].iter().map(|&t| i64::from(t)).collect();
        labels.push(IGNORE);
        let ex = Example {
            input_ids: ids.to_vec(),
            labels,
            prompt_id: "p".into(),
            key: "k".into(),
        };
        teacher_force(&self.model, &ex, k, None, &Default::default()).unwrap()
    }

    fn bytes_of(&self, tokens: &[u32]) -> Vec<Vec<u8>> {
        tokens.iter().map(|&t| self.vocab.bytes(t).to_vec()).collect()
    }
}

async fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", server.url()))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

fn f32_of(v: &Value) -> f32 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")) as f32
}

fn bytes_list(logprobs: &Value) -> Vec<Vec<u8>> {
    logprobs["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect()
        })
        .collect()
}

fn assert_close(a: f32, b: f32, what: &str) {
    assert!((a - b).abs() < 1e-4, "{what}: {a} vs {b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn models_and_unknown_routes() {
    let server = start();
    let v: Value = reqwest::get(format!("{}/models", server.url()))
        .await
        .unwrap()
        .json_text()
        .await;
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny");
    assert_eq!(v["data"][0]["max_model_len"], 512);
    let (status, v) = post(&server, "/embeddings", json!({})).await;
    assert_eq!(status, 404);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("/v1/embeddings"),
        "{v}"
    );
}

/// reqwest without its `json` feature: parse the text.
trait JsonText {
    async fn json_text(self) -> Value;
}

impl JsonText for reqwest::Response {
    async fn json_text(self) -> Value {
        serde_json::from_str(&self.text().await.unwrap()).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn greedy_chat_equals_the_engine_token_for_token() {
    let server = start();
    let r = Reference::load();
    let user = "What is 2+3? Think step by step.";
    let (status, v) = post(
        &server,
        "/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": user}],
               "temperature": 0, "max_tokens": 12, "logprobs": true, "top_logprobs": 3}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let prompt = r.chat_prompt(user);
    let want = &r.generate(&prompt, &[0], Sampling::GREEDY, 12, 3)[0];
    assert!(!want.tokens.is_empty());
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], want.text.as_str());
    assert!(
        choice["message"].get("reasoning_content").is_none(),
        "the fixture does not think"
    );
    assert_eq!(bytes_list(&choice["logprobs"]), r.bytes_of(&want.tokens));
    let finish = if want.tokens.len() == 12 { "length" } else { "stop" };
    assert_eq!(choice["finish_reason"], finish);
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], want.tokens.len());
    assert_eq!(v["usage"]["total_tokens"], prompt.len() + want.tokens.len());
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    for (got, lp) in choice["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .zip(want.logprobs.as_ref().unwrap())
    {
        assert_close(f32_of(&got["logprob"]), lp.logprob, "logprob");
        assert_eq!(got["token"], r.vocab.text(lp.token).as_str());
        let top = got["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["bytes"], got["bytes"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn seeded_choices_are_reproducible_differ_and_carry_the_models_logprobs() {
    let server = start();
    let r = Reference::load();
    let user = "Tell me a story.";
    let body = json!({"messages": [{"role": "user", "content": user}], "n": 2, "seed": 42,
                      "temperature": 1.0, "max_tokens": 16, "logprobs": true, "top_logprobs": 4});
    let (status, first) = post(&server, "/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{first}");
    let (_, again) = post(&server, "/chat/completions", body).await;
    assert_eq!(first["choices"], again["choices"], "same seed, same choices");
    let choices = first["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_ne!(
        bytes_list(&choices[0]["logprobs"]),
        bytes_list(&choices[1]["logprobs"])
    );

    // Choice i samples with seed + i, as the engine does for that seed.
    let prompt = r.chat_prompt(user);
    let sampling = Sampling {
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
    };
    let want = r.generate(&prompt, &[42, 43], sampling, 16, 4);
    let mut completion_tokens = 0;
    for (choice, g) in choices.iter().zip(&want) {
        let content = choice["logprobs"]["content"].as_array().unwrap();
        assert_eq!(bytes_list(&choice["logprobs"]), r.bytes_of(&g.tokens));
        assert_eq!(content.len(), g.tokens.len());
        completion_tokens += g.tokens.len();
        // Each sampled token's logprob is the model's own: teacher forcing agrees.
        let full: Vec<u32> = prompt.iter().chain(&g.tokens).copied().collect();
        let forced = r.force(&full, 4);
        for (i, t) in content.iter().enumerate() {
            assert_close(
                f32_of(&t["logprob"]),
                forced.label_logprobs[prompt.len() - 1 + i],
                "sampled token",
            );
            let top: Vec<f32> = t["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| f32_of(&x["logprob"]))
                .collect();
            assert_eq!(top.len(), 4);
            assert!(top.windows(2).all(|w| w[0] >= w[1]), "sorted: {top:?}");
            assert_close(
                top[0],
                forced.top.as_ref().unwrap().logprobs[(prompt.len() - 1 + i) * 4],
                "best",
            );
        }
    }
    assert_eq!(first["usage"]["completion_tokens"], completion_tokens);
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_echo_and_prompt_logprobs_equal_teacher_forcing() {
    let server = start();
    let r = Reference::load();
    let text = "Natalia sold clips to 48 of her friends in April.";
    let (status, v) = post(
        &server,
        "/completions",
        json!({"model": "tiny", "prompt": text, "max_tokens": 0, "echo": true, "logprobs": 5}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let ids = r.tokenizer.encode(text, true).unwrap();
    let forced = r.force(&ids, 5);
    let choice = &v["choices"][0];
    assert_eq!(choice["text"], text);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 0);
    let lp = &choice["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), text);
    assert_eq!(tokens.len(), ids.len());
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    let offsets: Vec<usize> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(offsets[1], tokens[0].len());
    let top = forced.top.as_ref().unwrap();
    for i in 1..ids.len() {
        assert_close(
            f32_of(&lp["token_logprobs"][i]),
            forced.label_logprobs[i - 1],
            "prompt token",
        );
        let alternatives = lp["top_logprobs"][i].as_object().unwrap();
        assert!(
            alternatives.len() == 5 || alternatives.len() == 6,
            "k plus the token itself"
        );
        let best = r.vocab.text(top.ids[(i - 1) * 5]);
        assert_close(f32_of(&alternatives[&best]), top.logprobs[(i - 1) * 5], "top-1");
    }

    // vLLM's re-scoring form: ids in, one new token, prompt_logprobs out.
    let (status, v) = post(
        &server,
        "/completions",
        json!({"prompt": ids, "max_tokens": 1, "prompt_logprobs": 3}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let pl = v["choices"][0]["prompt_logprobs"].as_array().unwrap();
    assert_eq!(pl.len(), ids.len());
    assert!(pl[0].is_null());
    let forced = r.force(&ids, 3);
    let top = forced.top.as_ref().unwrap();
    for (i, entry) in pl.iter().enumerate().skip(1) {
        let entry = entry.as_object().unwrap();
        let own = &entry[&ids[i].to_string()];
        assert_close(
            f32_of(&own["logprob"]),
            forced.label_logprobs[i - 1],
            "prompt logprob",
        );
        assert_eq!(own["decoded_token"], r.vocab.text(ids[i]).as_str());
        let rank = own["rank"].as_u64().unwrap() as usize;
        match top.ids[(i - 1) * 3..i * 3].iter().position(|&t| t == ids[i]) {
            Some(j) => assert_eq!(rank, j + 1, "position {i}"),
            None => assert!(rank > 3 && entry.len() == 4, "position {i}: rank {rank}"),
        }
        for j in 0..3 {
            let alt = &entry[&top.ids[(i - 1) * 3 + j].to_string()];
            assert_close(
                f32_of(&alt["logprob"]),
                top.logprobs[(i - 1) * 3 + j],
                "alternative",
            );
        }
    }
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 1);
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_are_batched() {
    // The burst is one round however the threads are scheduled: the round starts when the
    // sixth request fills the batch of six, within a window no machine outlasts (a 500 ms
    // one was a bet on the scheduler).
    let mut o = options(Duration::from_secs(600));
    o.batch_size = 6;
    let server = Server::start::<Flex>(fixture(), o, Default::default()).unwrap();
    let before = server.stats().generate_calls;
    let url = server.url();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..6 {
        let url = url.clone();
        tasks.spawn(async move {
            let body = json!({"messages": [{"role": "user", "content": format!("Question number {i}?")}],
                              "temperature": 0, "max_tokens": 8});
            let response = reqwest::Client::new()
                .post(format!("{url}/chat/completions"))
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            (i, response.status().as_u16(), response.text().await.unwrap())
        });
    }
    let mut answers = vec![String::new(); 6];
    while let Some(done) = tasks.join_next().await {
        let (i, status, text) = done.unwrap();
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        answers[i] = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
    }
    let calls = server.stats().generate_calls - before;
    assert_eq!(calls, 1, "6 requests took {calls} generate calls");
    // Batched greedy output is what the request gets alone (from a server that does not wait
    // for company).
    let (_, alone) = post(
        &start(),
        "/chat/completions",
        json!({"messages": [{"role": "user", "content": "Question number 3?"}], "temperature": 0, "max_tokens": 8}),
    )
    .await;
    assert_eq!(alone["choices"][0]["message"]["content"], answers[3].as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_openai_errors_naming_the_field() {
    let server = start();
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        ("/chat/completions", json!({"messages": msgs, "n": 0}), 400, "n"),
        (
            "/chat/completions",
            json!({"messages": msgs, "logprobs": true, "top_logprobs": 21}),
            400,
            "top_logprobs",
        ),
        (
            "/chat/completions",
            json!({"messages": msgs, "max_tokens": 100000}),
            400,
            "max_tokens",
        ),
        (
            "/chat/completions",
            json!({"messages": msgs, "stream": true}),
            400,
            "stream",
        ),
        ("/chat/completions", json!({"messages": "hi"}), 400, "messages"),
        (
            "/completions",
            json!({"prompt": "x".repeat(3000), "max_tokens": 1}),
            400,
            "max_tokens",
        ),
        ("/completions", json!({"prompt": [1, 99999]}), 400, "prompt"),
        (
            "/completions",
            json!({"prompt": "a", "logprobs": 50}),
            400,
            "logprobs",
        ),
        ("/completions", json!({"model": "other", "prompt": "a"}), 404, ""),
    ];
    for (path, body, status, field) in cases {
        let (got, v) = post(&server, path, body.clone()).await;
        assert_eq!(got, status, "{path} {body}: {v}");
        let err = &v["error"];
        let message = err["message"].as_str().unwrap();
        assert!(message.contains(field), "{message}");
        assert_eq!(err["param"].as_str().unwrap_or(""), field, "{v}");
        assert!(err["type"].is_string() && err.get("code").is_some(), "{v}");
    }
    let response = reqwest::Client::new()
        .post(format!("{}/chat/completions", server.url()))
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    // The server still serves after all that.
    let (status, _) = post(
        &server,
        "/chat/completions",
        json!({"messages": msgs, "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200);
}

#[test]
fn start_errors_say_what_is_wrong() {
    let mut o = options(Duration::ZERO);
    o.max_model_len = Some(100_000);
    let err = Server::start::<Flex>(fixture(), o, Default::default())
        .err()
        .unwrap();
    assert!(
        matches!(err, ServeError::Options { .. }) && err.to_string().contains("512"),
        "{err}"
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut o = options(Duration::ZERO);
    o.port = taken.local_addr().unwrap().port();
    let err = Server::start::<Flex>(fixture(), o, Default::default())
        .err()
        .unwrap();
    assert!(
        err.to_string().starts_with("cannot listen on 127.0.0.1:"),
        "{err}"
    );
}

/// A copy of the fixture whose chat template opens `<think>` after the assistant header, as
/// R1-Distill templates do.
fn thinking_fixture() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}\
                    {% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}";
    std::fs::write(tmp.path().join("chat_template.jinja"), template).unwrap();
    tmp
}

#[tokio::test(flavor = "multi_thread")]
async fn gen_data_clients_read_what_the_server_sends() {
    // A thinking model cut off while thinking: all reasoning, no answer, as DeepSeek sends it.
    let dir = thinking_fixture();
    let server = Server::start::<Flex>(
        dir.path().to_path_buf(),
        options(Duration::ZERO),
        Default::default(),
    )
    .unwrap();
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "What is 2+3?"}],
                      "temperature": 0, "max_tokens": 6});
    let response = reqwest::Client::new()
        .post(format!("{}/chat/completions", server.url()))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let message = &v["choices"][0]["message"];
    let reasoning = message["reasoning_content"]
        .as_str()
        .unwrap_or_else(|| panic!("no reasoning: {v}"));
    assert_eq!(message["content"], "");
    assert!(!reasoning.is_empty());
    let parsed = distill_teacher::api::parse_body(&text).unwrap();
    assert_eq!(
        (parsed.reasoning.as_deref(), parsed.answer.as_str()),
        (Some(reasoning), "")
    );
    assert_eq!(parsed.model, "tiny");
    assert_eq!(
        parsed.usage.completion_tokens,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    drop(server);

    // gen-data's vLLM re-scoring client gets teacher forcing's top-k.
    let server = start();
    let r = Reference::load();
    let ids = r
        .tokenizer
        .encode("Weng earns $12 an hour for babysitting.", false)
        .unwrap();
    let got = distill_teacher::prompt_logprobs::prompt_logprobs(
        &reqwest::Client::new(),
        &server.url(),
        None,
        "tiny",
        &ids,
        3,
    )
    .await
    .unwrap();
    let forced = r.force(&ids, 3);
    let top = forced.top.as_ref().unwrap();
    assert_eq!(got.len(), ids.len());
    assert!(got[0].is_none());
    for (i, position) in got.iter().enumerate().skip(1) {
        let position = position.as_ref().unwrap();
        let want: Vec<u32> = top.ids[(i - 1) * 3..i * 3].to_vec();
        assert_eq!(
            position.iter().map(|p| p.0).collect::<Vec<_>>(),
            want,
            "position {i}"
        );
        for (j, &(_, lp)) in position.iter().enumerate() {
            assert_close(lp, top.logprobs[(i - 1) * 3 + j], "top logprob");
        }
    }
}
