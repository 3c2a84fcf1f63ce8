//! The server in process on the tiny fixture model (Flex CPU backend), spoken to over real
//! HTTP: its answers against distill-eval's engine and teacher forcing on the same model.

use std::path::PathBuf;
use std::time::Duration;

use burn::backend::Flex;
use distill_data::examples::{Example, IGNORE};
use distill_hf::template::Message;
use distill_hf::tokenizer::TextTokenizer;
use distill_infer::generate::{Decoding, GenerationConfig, Request, Sampling, eos_ids, generate};
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
        kv_cache_gib: None,
        batch_window,
        api_key: None,
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
            decoding: Decoding {
                max_new_tokens,
                sampling,
                stop: vec![],
                eos: eos_ids(&self.model, &self.tokenizer),
                logprobs: Some(k),
            },
            batch_size: 8,
            kv_cache_tokens: None,
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

/// A choice's logprob entries beside the engine's, one per token: each logprob equal to the
/// engine's and `top` alternatives listed; the pairs come back for checks of their own.
fn logprob_entries<'a>(
    choice: &'a Value,
    want: &'a distill_infer::generate::Generation,
    top: usize,
) -> Vec<(&'a Value, &'a distill_infer::generate::TokenLogprob)> {
    let entries = choice["logprobs"]["content"].as_array().unwrap();
    let want = want.logprobs.as_ref().unwrap();
    assert_eq!(entries.len(), want.len(), "one logprob entry per token");
    entries
        .iter()
        .zip(want)
        .inspect(|(got, lp)| {
            assert_close(f32_of(&got["logprob"]), lp.logprob, "logprob");
            assert_eq!(got["top_logprobs"].as_array().unwrap().len(), top);
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
    for (got, lp) in logprob_entries(choice, want, 3) {
        assert_eq!(got["token"], r.vocab.text(lp.token).as_str());
        // Greedy: the chosen token is the most likely one.
        assert_eq!(got["top_logprobs"][0]["bytes"], got["bytes"]);
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

/// Posts every body to `/chat/completions` at once; each task gives (its index, status, text).
fn chat_all(url: &str, bodies: impl Iterator<Item = Value>) -> tokio::task::JoinSet<(usize, u16, String)> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, body) in bodies.enumerate() {
        let url = url.to_string();
        tasks.spawn(async move {
            let response = reqwest::Client::new()
                .post(format!("{url}/chat/completions"))
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            (i, response.status().as_u16(), response.text().await.unwrap())
        });
    }
    tasks
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
    let mut tasks = chat_all(
        &url,
        (0..6).map(|i| {
            json!({"messages": [{"role": "user", "content": format!("Question number {i}?")}],
               "temperature": 0, "max_tokens": 8})
        }),
    );
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
            json!({"messages": msgs, "stream": true, "n": 0}),
            400,
            "n",
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

const GIB: f64 = (1u64 << 30) as f64;

/// With a KV cache budget of three pages (one sequence of --max-model-len 128 and a page of
/// slack), six concurrent requests whose rows grow past a page take turns in the cache, rows
/// are set aside and recomputed, and each gets what it gets alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_kv_cache_budget_holds_requests_back_without_changing_answers() {
    let mut o = options(Duration::from_secs(600));
    o.batch_size = 6;
    o.max_model_len = Some(128);
    o.kv_cache_gib = Some(200.0 * 512.0 / GIB);
    let server = Server::start::<Flex>(fixture(), o, Default::default()).unwrap();
    let body = |i: usize| json!({"messages": [{"role": "user", "content": format!("n{i}")}], "temperature": 0, "max_tokens": 60});
    let mut tasks = chat_all(&server.url(), (0..6).map(body));
    let alone = start();
    while let Some(done) = tasks.join_next().await {
        let (i, status, text) = done.unwrap();
        assert_eq!(status, 200, "{text}");
        let got: Value = serde_json::from_str(&text).unwrap();
        let (_, want) = post(&alone, "/chat/completions", body(i)).await;
        assert_eq!(
            got["choices"][0]["message"], want["choices"][0]["message"],
            "request {i}"
        );
    }
    // The counters are added when the generate call returns, after its last answer.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while server.stats().preemptions == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(server.stats().preemptions > 0, "{:?}", server.stats());
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
    // tiny-qwen2's cache takes 512 bytes a position (2 layers, 2 KV heads of 16, f32).
    let mut o = options(Duration::ZERO);
    o.kv_cache_gib = Some(100.0 * 512.0 / GIB);
    let err = Server::start::<Flex>(fixture(), o, Default::default())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains(
            "--kv-cache-gib: 0.0000476837158203125 GiB holds 100 positions, fewer than one sequence of 512 needs (576) (--max-model-len)"
        ),
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

/// POSTs `body` with `stream: true` and reads the whole event stream: the `data:` payloads in
/// order, `[DONE]` last.
async fn sse(server: &Server, path: &str, mut body: Value) -> Vec<String> {
    body["stream"] = json!(true);
    let mut response = reqwest::Client::new()
        .post(format!("{}{path}", server.url()))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut raw = Vec::new();
    while let Some(bytes) = response.chunk().await.unwrap() {
        raw.extend_from_slice(&bytes);
    }
    let text = String::from_utf8(raw).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    text.split_terminator("\n\n")
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {event:?}"))
                .to_string()
        })
        .collect()
}

/// The JSON chunks of an event stream (all but `[DONE]`).
fn parse_chunks(events: &[String]) -> Vec<Value> {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}")))
        .collect()
}

/// Per choice index, the concatenation of `delta[field]` (chat) or `text` (completions).
fn joined(chunks: &[Value], field: &str, index: usize) -> String {
    chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().iter())
        .filter(|c| c["index"] == index)
        .filter_map(|c| {
            let v = if field == "text" {
                &c["text"]
            } else {
                &c["delta"][field]
            };
            v.as_str().map(str::to_string)
        })
        .collect()
}

/// Per choice index, the finish reasons its chunks carry (one, on its last chunk).
fn finishes(chunks: &[Value], index: usize) -> Vec<(usize, String)> {
    let mine: Vec<&Value> = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().iter())
        .filter(|c| c["index"] == index)
        .collect();
    mine.iter()
        .enumerate()
        .filter_map(|(i, c)| {
            c["finish_reason"]
                .as_str()
                .map(|f| (mine.len() - 1 - i, f.to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_chat_is_the_whole_answer_in_openai_chunks() {
    let server = start();
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "What is 2+3? Think step by step."}],
                      "n": 2, "seed": 5, "temperature": 1.0, "max_tokens": 24, "logprobs": true, "top_logprobs": 2});
    let (status, whole) = post(&server, "/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{whole}");
    let mut streamed = body.clone();
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = parse_chunks(&sse(&server, "/chat/completions", streamed).await);
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert_eq!((c["id"].as_str(), &c["model"]), (Some(id), &json!("tiny")));
        assert!(
            c.get("usage").is_some(),
            "usage: null on every chunk when asked for"
        );
    }
    // The first chunk of each choice announces the role, with empty content.
    for (i, c) in chunks[..2].iter().enumerate() {
        assert_eq!(c["choices"][0]["index"], i);
        assert_eq!(
            c["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
    }
    for (index, choice) in whole["choices"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            joined(&chunks, "content", index),
            choice["message"]["content"].as_str().unwrap()
        );
        assert_eq!(
            finishes(&chunks, index),
            [(0, choice["finish_reason"].as_str().unwrap().to_string())]
        );
        // Each token's logprobs ride on exactly one chunk, in order.
        let streamed_lp: Vec<Value> = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap().iter())
            .filter(|c| c["index"] == index && !c["logprobs"].is_null())
            .flat_map(|c| c["logprobs"]["content"].as_array().unwrap().clone())
            .collect();
        assert_eq!(&Value::from(streamed_lp), &choice["logprobs"]["content"]);
    }
    // The last chunk: no choices, the usage of the whole answer.
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], whole["usage"]);
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()));

    // Without stream_options: no usage anywhere.
    let chunks_plain = parse_chunks(&sse(&server, "/chat/completions", body).await);
    assert!(chunks_plain.iter().all(|c| c.get("usage").is_none()));
    assert_eq!(joined(&chunks_plain, "content", 1), joined(&chunks, "content", 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_completions_and_stop_strings_that_never_leak() {
    let server = start();
    let body = json!({"prompt": "Once upon a time", "temperature": 0, "max_tokens": 40, "ignore_eos": true});
    let (_, whole) = post(&server, "/completions", body.clone()).await;
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(
        whole["usage"]["completion_tokens"], 40,
        "ignore_eos decodes to max_tokens"
    );
    let chunks = parse_chunks(&sse(&server, "/completions", body.clone()).await);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert!(chunks[0]["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(joined(&chunks, "text", 0), text);
    assert_eq!(finishes(&chunks, 0), [(0, "length".to_string())]);

    // A stop string from the middle of that text: the stream ends before it, and no chunk
    // ever carried any of it, even as a prefix split over tokens.
    let mut with_stop = body.clone();
    let (stop, want) = stop_from_the_middle(&text);
    with_stop["stop"] = json!([stop.clone(), "never appears"]);
    let chunks = parse_chunks(&sse(&server, "/completions", with_stop).await);
    check_no_leak(&chunks, "text", &stop, &want);
    // The same through chat's reasoning splitter (the fixture does not think: content is
    // the text untouched).
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0,
                      "max_tokens": 40, "ignore_eos": true});
    let (_, whole) = post(&server, "/chat/completions", chat.clone()).await;
    let (stop, want) = stop_from_the_middle(whole["choices"][0]["message"]["content"].as_str().unwrap());
    let mut with_stop = chat;
    with_stop["stop"] = json!(stop.clone());
    let chunks = parse_chunks(&sse(&server, "/chat/completions", with_stop).await);
    check_no_leak(&chunks, "content", &stop, &want);

    // Scoring fields do not stream.
    let (status, v) = post(
        &server,
        "/completions",
        json!({"prompt": "a", "stream": true, "echo": true}),
    )
    .await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("echo")));
}

/// Three characters from the middle of `text` as a stop string, and the text before its first
/// occurrence.
fn stop_from_the_middle(text: &str) -> (String, String) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let (at, _) = chars[chars.len() / 2];
    let stop: String = text[at..].chars().take(3).collect();
    let want = text[..text.find(&stop).unwrap()].to_string();
    (stop, want)
}

fn check_no_leak(chunks: &[Value], field: &str, stop: &str, want: &str) {
    let mut sent = String::new();
    for c in chunks {
        for choice in c["choices"].as_array().unwrap() {
            let piece = if field == "text" {
                &choice["text"]
            } else {
                &choice["delta"][field]
            };
            sent.push_str(piece.as_str().unwrap_or(""));
            assert!(
                want.starts_with(&sent),
                "sent {sent:?}, which is not a prefix of {want:?} (stop {stop:?})"
            );
        }
    }
    assert_eq!(sent, want, "stop {stop:?}");
    assert_eq!(finishes(chunks, 0), [(0, "stop".to_string())]);
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_reasoning_goes_to_reasoning_content() {
    // The thinking template, cut off while thinking: every delta is reasoning.
    let dir = thinking_fixture();
    let server = Server::start::<Flex>(
        dir.path().to_path_buf(),
        options(Duration::ZERO),
        Default::default(),
    )
    .unwrap();
    let body = json!({"messages": [{"role": "user", "content": "What is 2+3?"}], "temperature": 0,
                      "max_tokens": 20, "ignore_eos": true});
    let (_, whole) = post(&server, "/chat/completions", body.clone()).await;
    let message = &whole["choices"][0]["message"];
    let reasoning = message["reasoning_content"].as_str().unwrap();
    assert!(!reasoning.is_empty());
    let chunks = parse_chunks(&sse(&server, "/chat/completions", body).await);
    assert_eq!(joined(&chunks, "reasoning_content", 0), reasoning);
    assert_eq!(
        joined(&chunks, "content", 0),
        "",
        "only the role chunk's empty content"
    );
    assert!(
        chunks[1..]
            .iter()
            .all(|c| c["choices"][0]["delta"].get("content").is_none()),
        "{chunks:?}"
    );
    assert_eq!(finishes(&chunks, 0), [(0, "length".to_string())]);
}

/// A server on the tiny fixture decoding at most `rows` sequences at once, no batch window.
fn start_with_rows(rows: usize) -> Server {
    let mut o = options(Duration::ZERO);
    o.batch_size = rows;
    Server::start::<Flex>(fixture(), o, Default::default()).unwrap()
}

/// `n` streamed choices of the rest of the context each (EOS ignored), once their first chunk
/// has come: the generation is running.
async fn long_stream(server: &Server, n: usize) -> reqwest::Response {
    let long = json!({"messages": [{"role": "user", "content": "Tell me a long story."}],
                      "temperature": 0, "ignore_eos": true, "stream": true, "n": n});
    let mut response = reqwest::Client::new()
        .post(format!("{}/chat/completions", server.url()))
        .body(long.to_string())
        .send()
        .await
        .unwrap();
    assert!(response.chunk().await.unwrap().is_some());
    response
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_whose_client_left_frees_its_row() {
    // One row: the second request can only run once the first has left it.
    let server = start_with_rows(1);
    // A long generation, streamed: 64 choices of the rest of the 512-token context each, EOS
    // ignored (about 31k tokens, one row at a time). The client reads the first chunk and
    // goes away; the engine notices at the next token it sends, whichever row that is.
    drop(long_stream(&server, 64).await);
    let (status, v) = post(
        &server,
        "/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 4, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let stats = server.stats();
    assert!(stats.cancelled >= 1, "{stats:?}");
    // Half the long request's tokens would take far longer than noticing a closed socket.
    assert!(
        stats.new_tokens < 64 * 480 / 2,
        "the dropped stream stopped early: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_api_key_guards_every_endpoint_but_health() {
    let mut o = options(Duration::ZERO);
    o.api_key = distill_serve::ApiKey::new("sk-test-key");
    let server = Server::start::<Flex>(fixture(), o, Default::default()).unwrap();
    let client = reqwest::Client::new();
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let call = |path: &str, auth: Option<&str>| {
        let mut r = if path == "/models" {
            client.get(format!("{}{path}", server.url()))
        } else {
            client
                .post(format!("{}{path}", server.url()))
                .body(chat.to_string())
        };
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    for path in ["/chat/completions", "/completions", "/models", "/embeddings"] {
        for auth in [
            None,
            Some("Bearer wrong-key"),
            Some("Basic sk-test-key"),
            Some("Bearer sk-test-ke"),
        ] {
            let response = call(path, auth).await.unwrap();
            assert_eq!(response.status().as_u16(), 401, "{path} {auth:?}");
            let v = response.json_text().await;
            assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert!(
                !v.to_string().contains("wrong-key") && !v.to_string().contains("sk-test"),
                "{v}"
            );
        }
    }
    for path in ["/chat/completions", "/models"] {
        let response = call(path, Some("Bearer sk-test-key")).await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
    }
    // The health check answers anyone.
    let health = reqwest::get(format!("http://{}/health", server.addr))
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

/// The official `openai` Python client against the server (tests/openai_client.py), when
/// `python3` (or `$DISTILL_PYTHON`) can import it; CI has no openai package and skips.
#[test]
fn the_openai_python_client_streams_and_reads_everything() {
    let python = std::env::var("DISTILL_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_openai = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openai {
        println!("SKIPPED: {python} cannot import openai (pip install openai to run this test)");
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let thinking = thinking_fixture();
    for (dir, key, extra) in [
        (fixture(), Some("sk-local"), None),
        (thinking.path().to_path_buf(), None, Some("--thinking")),
    ] {
        let mut o = options(Duration::ZERO);
        o.api_key = key.and_then(distill_serve::ApiKey::new);
        let server = Server::start::<Flex>(dir, o, Default::default()).unwrap();
        let out = std::process::Command::new(&python)
            .arg(&script)
            .args([server.url().as_str(), "tiny"])
            .args(key)
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        println!("{}", stdout.trim());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn generation_config_supplies_the_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    let config = tmp.path().join("generation_config.json");
    std::fs::write(
        &config,
        r#"{"eos_token_id": 2, "temperature": 0.0, "max_new_tokens": 5}"#,
    )
    .unwrap();
    let server = Server::start::<Flex>(
        tmp.path().to_path_buf(),
        options(Duration::ZERO),
        Default::default(),
    )
    .unwrap();
    let ask = json!({"messages": [{"role": "user", "content": "Tell me a story."}], "ignore_eos": true});
    let (_, defaulted) = post(&server, "/chat/completions", ask.clone()).await;
    assert_eq!(defaulted["usage"]["completion_tokens"], 5, "{defaulted}");
    // Greedy from the file: what an explicit temperature 0 gives, on the stock fixture too.
    let mut explicit = ask.clone();
    explicit["temperature"] = json!(0);
    explicit["max_tokens"] = json!(5);
    let (_, want) = post(&start(), "/chat/completions", explicit).await;
    assert_eq!(defaulted["choices"], want["choices"]);
    // The request's own fields win.
    let mut own = ask;
    own["max_tokens"] = json!(3);
    let (_, v) = post(&server, "/chat/completions", own).await;
    assert_eq!(v["usage"]["completion_tokens"], 3);
    drop(server);

    std::fs::write(&config, r#"{"top_p": 1.5}"#).unwrap();
    let err = Server::start::<Flex>(
        tmp.path().to_path_buf(),
        options(Duration::ZERO),
        Default::default(),
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("generation_config.json") && err.to_string().contains("top_p"),
        "{err}"
    );
}

/// A short request that arrives while a long generation runs joins it at the next step (same
/// decoding settings, its own max_tokens) and is answered while the long one still decodes.
#[tokio::test(flavor = "multi_thread")]
async fn a_short_request_during_a_long_one_finishes_first() {
    let server = start_with_rows(16);
    // 8 choices of the rest of the 512-token context each, streamed so that we know it runs.
    let response = long_stream(&server, 8).await;
    let (status, v) = post(
        &server,
        "/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 4,
               "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
    // A call's finished sequences are counted when it returns: none yet, so the short request
    // ran inside the long one's call.
    let stats = server.stats();
    assert_eq!((stats.generate_calls, stats.sequences), (1, 0), "{stats:?}");
    drop(response);
}

/// A request with other decoding settings than the running call's (sampled, with
/// log-probabilities, EOS honoured) joins it all the same: it is answered while the long
/// greedy generation still decodes, with what the engine gives it alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_with_other_settings_joins_the_running_call() {
    let server = start_with_rows(16);
    let r = Reference::load();
    let response = long_stream(&server, 8).await;
    let (status, v) = post(
        &server,
        "/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0.8, "top_p": 0.9,
               "seed": 7, "max_tokens": 4, "logprobs": true, "top_logprobs": 2}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // As in the test above: no call has returned, so the request ran inside the long one's.
    let stats = server.stats();
    assert_eq!((stats.generate_calls, stats.sequences), (1, 0), "{stats:?}");
    drop(response);
    let sampling = Sampling {
        temperature: 0.8,
        top_p: 0.9,
        top_k: 0,
    };
    let want = &r.generate(&r.chat_prompt("Hi"), &[7], sampling, 4, 2)[0];
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["content"], want.text.as_str());
    assert_eq!(bytes_list(&choice["logprobs"]), r.bytes_of(&want.tokens));
    let finish = if want.tokens.len() == 4 { "length" } else { "stop" };
    assert_eq!(choice["finish_reason"], finish);
    assert_eq!(v["usage"]["completion_tokens"], want.tokens.len());
    logprob_entries(choice, want, 2);
}
