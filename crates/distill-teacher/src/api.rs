//! The OpenAI `/chat/completions` wire format as R1 servers speak it, normalised to one form.
//!
//! Where each server puts the reasoning:
//!
//! | server | field |
//! |---|---|
//! | DeepSeek API (`deepseek-reasoner`) | `message.reasoning_content` |
//! | vLLM / SGLang with an R1 reasoning parser | `message.reasoning_content` or `message.reasoning` |
//! | Ollama `/v1` | `message.reasoning`, or `<think>…</think>` inline in `content` |
//! | llama.cpp server | `message.reasoning_content` (`--reasoning-format deepseek`), else inline |
//! | any server without a parser | inline `<think>…</think>` (or only `</think>`, when the chat template opened it) |
//!
//! Bodies may start with blank lines (the DeepSeek API sends them while a non-streaming request
//! waits) or SSE comment lines (`: keep-alive`); a body of `data:` lines is read as a stream.

use distill_core::{TokenLogprob, TopLogprob};
use distill_data::{Message, Usage};
use serde::Serialize;
use serde_json::Value;

/// Sampling parameters: part of every request and of its ledger key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Base seed; sample i is sent with `seed + i` so samples of one prompt differ.
    pub seed: Option<u64>,
}

/// The JSON body of one request.
pub fn request_body(
    model: &str,
    messages: &[Message],
    sampling: &Sampling,
    sample_index: u32,
    stream: bool,
) -> Value {
    let mut body = serde_json::json!({
        "model": model,
        "messages": messages,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "stream": stream,
    });
    if !sampling.stop.is_empty() {
        body["stop"] = serde_json::json!(sampling.stop);
    }
    if let Some(seed) = sampling.seed {
        body["seed"] = serde_json::json!(seed.wrapping_add(u64::from(sample_index)));
    }
    if stream {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    body
}

/// Asks for the sampled tokens' log-probabilities and the top `k` alternatives at each position
/// (OpenAI's `logprobs: true, top_logprobs: k`; vLLM, SGLang, Ollama >= 0.12.11 and llama.cpp
/// accept it, at most 20).
pub fn request_logprobs(body: &mut Value, k: usize) {
    body["logprobs"] = Value::Bool(true);
    body["top_logprobs"] = serde_json::json!(k);
}

/// `base_url` + `/chat/completions`, as the OpenAI SDKs build it: give vLLM/SGLang/Ollama/
/// llama.cpp bases with their `/v1` (`http://host:8000/v1`); the DeepSeek API takes
/// `https://api.deepseek.com`. A URL already ending in `/chat/completions` is used as is.
pub fn completions_url(base_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    if base.ends_with("/chat/completions") {
        base.to_string()
    } else {
        format!("{base}/chat/completions")
    }
}

/// A finished response, normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The model as the server named it.
    pub model: String,
    /// `None` when the response carried no reasoning in any form (no reasoning field, no
    /// `<think>` tags): a model that does not think. `Some("")` when it chose not to.
    pub reasoning: Option<String>,
    pub answer: String,
    pub finish_reason: String,
    pub usage: Usage,
    /// `choices[0].logprobs.content`, one entry per generated token, when the server sent it.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// Why a 2xx body could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Not JSON / not the expected shape (retried: proxies truncate, servers hiccup).
    Malformed(String),
    /// The server put an `error` object in the body.
    Server(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Malformed(m) => write!(f, "malformed response: {m}"),
            BodyError::Server(m) => write!(f, "server error in response body: {m}"),
        }
    }
}

/// Parses a response body: one JSON object (after any keep-alive lines) or an SSE stream.
pub fn parse_body(body: &str) -> Result<Completion, BodyError> {
    let meaningful: Vec<&str> = body
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(':'))
        .collect();
    if meaningful.first().is_some_and(|l| l.starts_with("data:")) {
        return parse_stream(&meaningful);
    }
    let json = meaningful.join("\n");
    let v: Value = serde_json::from_str(&json).map_err(|e| BodyError::Malformed(short(&e.to_string())))?;
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        return Err(BodyError::Server(error_text(err)));
    }
    let choice = v
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or_else(|| BodyError::Malformed("no choices[0]".into()))?;
    let message = choice
        .get("message")
        .ok_or_else(|| BodyError::Malformed("no choices[0].message".into()))?;
    let content = str_field(message, "content");
    let reasoning = str_field(message, "reasoning_content").or_else(|| str_field(message, "reasoning"));
    let (reasoning, answer) = split_reasoning(reasoning.as_deref(), content.as_deref().unwrap_or(""));
    let logprobs = match choice.pointer("/logprobs/content") {
        Some(c) if !c.is_null() => Some(parse_logprobs(c)?),
        _ => None,
    };
    Ok(Completion {
        model: str_field(&v, "model").unwrap_or_default(),
        reasoning,
        answer,
        finish_reason: str_field(choice, "finish_reason").unwrap_or_else(|| "unknown".into()),
        usage: v.get("usage").map(parse_usage).unwrap_or_default(),
        logprobs,
    })
}

/// `logprobs.content`: `[{token, logprob, bytes?, top_logprobs: [{token, logprob, bytes?}]}]`
/// (OpenAI, vLLM, SGLang, Ollama, llama.cpp; llama.cpp adds an `id`, ignored: it is the
/// teacher's id). A null logprob is -inf.
pub fn parse_logprobs(content: &Value) -> Result<Vec<TokenLogprob>, BodyError> {
    let bad = |what: &str, i: usize| BodyError::Malformed(format!("logprobs.content[{i}]: {what}"));
    let items = content.as_array().ok_or_else(|| bad("not a list", 0))?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let (token, bytes, logprob) = token_fields(item).ok_or_else(|| bad("no token or logprob", i))?;
        let top = match item.get("top_logprobs") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(alts)) => alts
                .iter()
                .map(|a| {
                    token_fields(a).map(|(token, bytes, logprob)| TopLogprob {
                        token,
                        bytes,
                        logprob,
                    })
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("a top_logprobs entry without token or logprob", i))?,
            Some(_) => return Err(bad("top_logprobs is not a list", i)),
        };
        out.push(TokenLogprob {
            token,
            bytes,
            logprob,
            top_logprobs: top,
        });
    }
    Ok(out)
}

/// (token, bytes, logprob) of one entry.
fn token_fields(v: &Value) -> Option<(String, Option<Vec<u8>>, f32)> {
    let token = v.get("token")?.as_str()?.to_string();
    let logprob = match v.get("logprob")? {
        Value::Null => f32::NEG_INFINITY,
        x => x.as_f64()? as f32,
    };
    let bytes = match v.get("bytes") {
        Some(Value::Array(b)) => Some(
            b.iter()
                .map(|x| x.as_u64().and_then(|n| u8::try_from(n).ok()))
                .collect::<Option<Vec<u8>>>()?,
        ),
        _ => None,
    };
    Some((token, bytes, logprob))
}

/// `data: {chunk}` lines up to `data: [DONE]`: deltas are concatenated.
fn parse_stream(lines: &[&str]) -> Result<Completion, BodyError> {
    let (mut content, mut reasoning) = (String::new(), String::new());
    let (mut model, mut finish, mut usage) = (String::new(), None, Usage::default());
    let mut logprobs: Option<Vec<TokenLogprob>> = None;
    let mut done = false;
    for line in lines {
        let Some(payload) = line.strip_prefix("data:").map(str::trim) else {
            continue; // `event:`, `id:`, `retry:` lines
        };
        if payload == "[DONE]" {
            done = true;
            break;
        }
        let chunk: Value =
            serde_json::from_str(payload).map_err(|e| BodyError::Malformed(short(&e.to_string())))?;
        if let Some(err) = chunk.get("error").filter(|e| !e.is_null()) {
            return Err(BodyError::Server(error_text(err)));
        }
        if let Some(m) = str_field(&chunk, "model") {
            model = m;
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = parse_usage(u);
        }
        if let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) {
            if let Some(delta) = choice.get("delta") {
                content.push_str(&str_field(delta, "content").unwrap_or_default());
                let r = str_field(delta, "reasoning_content").or_else(|| str_field(delta, "reasoning"));
                reasoning.push_str(&r.unwrap_or_default());
            }
            if let Some(f) = str_field(choice, "finish_reason") {
                finish = Some(f);
            }
            if let Some(c) = choice.pointer("/logprobs/content").filter(|c| !c.is_null()) {
                logprobs.get_or_insert_default().extend(parse_logprobs(c)?);
            }
        }
    }
    if !done && finish.is_none() {
        return Err(BodyError::Malformed(
            "stream ended before a finish_reason or [DONE]".into(),
        ));
    }
    let r = (!reasoning.is_empty()).then_some(reasoning.as_str());
    let (reasoning, answer) = split_reasoning(r, &content);
    Ok(Completion {
        model,
        reasoning,
        answer,
        finish_reason: finish.unwrap_or_else(|| "unknown".into()),
        usage,
        logprobs,
    })
}

/// (reasoning, answer) from a separate reasoning field or `<think>` tags inline in content.
/// The reasoning is `None` only when neither is there: the model does not think, and its
/// sample must not be taught an empty think block it never wrote.
pub fn split_reasoning(reasoning_field: Option<&str>, content: &str) -> (Option<String>, String) {
    const OPEN: &str = "<think>";
    const CLOSE: &str = "</think>";
    if let Some(r) = reasoning_field.filter(|r| !r.trim().is_empty()) {
        // Some servers also leave the closing tag in content.
        let answer = content.rsplit_once(CLOSE).map_or(content, |(_, a)| a);
        return (Some(r.trim().to_string()), answer.trim().to_string());
    }
    if let Some((before, after)) = content.split_once(CLOSE) {
        let r = before.trim_start();
        let r = r.strip_prefix(OPEN).unwrap_or(r);
        return (Some(r.trim().to_string()), after.trim().to_string());
    }
    if let Some(rest) = content.trim_start().strip_prefix(OPEN) {
        // Opened and never closed: cut off while reasoning.
        return (Some(rest.trim().to_string()), String::new());
    }
    // A reasoning field that is there but empty: a thinking model that skipped thinking.
    (reasoning_field.map(|_| String::new()), content.trim().to_string())
}

fn parse_usage(u: &Value) -> Usage {
    let num = |v: Option<&Value>| v.and_then(Value::as_u64);
    Usage {
        prompt_tokens: num(u.get("prompt_tokens")).unwrap_or(0),
        completion_tokens: num(u.get("completion_tokens")).unwrap_or(0),
        reasoning_tokens: num(u.pointer("/completion_tokens_details/reasoning_tokens")),
        cached_tokens: num(u.pointer("/prompt_tokens_details/cached_tokens"))
            .or_else(|| num(u.get("prompt_cache_hit_tokens"))),
    }
}

fn str_field(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

/// The message of an `error` value (`{"message": ...}` or a string).
pub fn error_text(err: &Value) -> String {
    let text = err
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| err.as_str().map(str::to_string))
        .unwrap_or_else(|| err.to_string());
    short(&text)
}

/// The useful part of an error body: its `error.message` when JSON, else its start.
pub fn error_body_text(body: &str) -> String {
    match serde_json::from_str::<Value>(body.trim()) {
        Ok(v) => match v.get("error") {
            Some(e) => error_text(e),
            None => v
                .get("message")
                .or_else(|| v.get("detail"))
                .map(error_text)
                .unwrap_or_else(|| short(body.trim())),
        },
        Err(_) => short(body.trim()),
    }
}

fn short(s: &str) -> String {
    const MAX: usize = 300;
    let s = s.replace(['\n', '\r'], " ");
    if s.chars().count() <= MAX {
        s
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_server_form_normalises_to_reasoning_and_answer() {
        let deepseek = r#"{"id":"x","model":"deepseek-reasoner","choices":[{"index":0,"message":{"role":"assistant","content":"The answer is \\boxed{72}.","reasoning_content":"48/2 = 24; 48 + 24 = 72."},"finish_reason":"stop"}],"usage":{"prompt_tokens":30,"completion_tokens":50,"prompt_cache_hit_tokens":10,"prompt_cache_miss_tokens":20,"completion_tokens_details":{"reasoning_tokens":40}}}"#;
        let c = parse_body(&format!("\n\n\n{deepseek}")).unwrap();
        assert_eq!(c.reasoning.as_deref(), Some("48/2 = 24; 48 + 24 = 72."));
        assert_eq!(c.answer, "The answer is \\boxed{72}.");
        assert_eq!(c.model, "deepseek-reasoner");
        assert_eq!(
            c.usage,
            Usage {
                prompt_tokens: 30,
                completion_tokens: 50,
                reasoning_tokens: Some(40),
                cached_tokens: Some(10)
            }
        );

        let vllm = r#"{"model":"r1","choices":[{"message":{"content":"\n\n42","reasoning":"think hard"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":1}}}"#;
        let c = parse_body(vllm).unwrap();
        assert_eq!(
            (c.reasoning.as_deref(), c.answer.as_str()),
            (Some("think hard"), "42")
        );
        assert_eq!(c.usage.cached_tokens, Some(1));

        let ollama_inline = r#"{"model":"deepseek-r1:7b","choices":[{"message":{"content":"<think>\nhmm\n</think>\n\nIt is 5."},"finish_reason":"stop"}]}"#;
        let c = parse_body(ollama_inline).unwrap();
        assert_eq!(
            (c.reasoning.as_deref(), c.answer.as_str()),
            (Some("hmm"), "It is 5.")
        );

        // R1-Distill chat templates open <think> in the prompt: only the close appears.
        let (r, a) = split_reasoning(None, "step 1\nstep 2\n</think>\n\nDone.");
        assert_eq!((r.as_deref(), a.as_str()), (Some("step 1\nstep 2"), "Done."));
        // Cut off mid-thought.
        let (r, a) = split_reasoning(None, "<think>still going");
        assert_eq!((r.as_deref(), a.as_str()), (Some("still going"), ""));
        // Reasoning field plus a stray close tag in content.
        let (r, a) = split_reasoning(Some("R"), "R</think>A");
        assert_eq!((r.as_deref(), a.as_str()), (Some("R"), "A"));
        // A thinking model that skipped thinking: an empty reasoning field.
        let (r, a) = split_reasoning(Some(""), " plain ");
        assert_eq!((r.as_deref(), a.as_str()), (Some(""), "plain"));
        // A model that does not think (SmolLM2, Llama through `distill serve`): no field, no tags.
        let (r, a) = split_reasoning(None, " plain ");
        assert_eq!((r, a.as_str()), (None, "plain"));
    }

    #[test]
    fn streams_and_keep_alive_comments_are_read() {
        let sse = ": keep-alive\n\n: keep-alive\n\ndata: {\"model\":\"deepseek-reasoner\",\"choices\":[{\"delta\":{\"reasoning_content\":\"a \"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"reasoning_content\":\"b\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"ans\"},\"finish_reason\":\"length\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n";
        let c = parse_body(sse).unwrap();
        assert_eq!(c.reasoning.as_deref(), Some("a b"));
        assert_eq!(c.answer, "ans");
        assert_eq!(c.finish_reason, "length");
        assert_eq!(c.usage.completion_tokens, 4);
        assert!(matches!(
            parse_body("data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n"),
            Err(BodyError::Malformed(_))
        ));
    }

    #[test]
    fn logprobs_are_read_in_every_server_form() {
        // OpenAI / Ollama: true bytes (a character split across tokens), a null logprob.
        let openai = r#"{"model":"m","choices":[{"message":{"content":"é"},"finish_reason":"stop",
            "logprobs":{"content":[
              {"token":"\ufffd","logprob":-0.5,"bytes":[195],"top_logprobs":[{"token":"\ufffd","logprob":-0.5,"bytes":[195]},{"token":"e","logprob":-1.5,"bytes":[101]}]},
              {"token":"\ufffd","logprob":null,"bytes":[169],"top_logprobs":[]}]}}]}"#;
        let c = parse_body(openai).unwrap();
        let lp = c.logprobs.unwrap();
        assert_eq!(lp.len(), 2);
        assert_eq!(lp[0].bytes.as_deref(), Some(&[195u8][..]));
        assert_eq!(lp[0].top_logprobs[1].token, "e");
        assert_eq!(lp[1].logprob, f32::NEG_INFINITY);
        // llama.cpp adds ids; vLLM without bytes on a token; servers without logprobs send null.
        let llama = r#"{"choices":[{"message":{"content":"a"},"finish_reason":"stop","logprobs":{"content":[{"id":64,"token":"a","logprob":-0.1,"top_logprobs":[{"id":64,"token":"a","logprob":-0.1}]}]}}]}"#;
        let lp = parse_body(llama).unwrap().logprobs.unwrap();
        assert_eq!((lp[0].token.as_str(), lp[0].bytes.is_none()), ("a", true));
        let none = r#"{"choices":[{"message":{"content":"a"},"finish_reason":"stop","logprobs":null}]}"#;
        assert_eq!(parse_body(none).unwrap().logprobs, None);
        // Streams carry them chunk by chunk.
        let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"logprobs\":{\"content\":[{\"token\":\"a\",\"logprob\":-0.1,\"top_logprobs\":[]}]}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"},\"logprobs\":{\"content\":[{\"token\":\"b\",\"logprob\":-0.2,\"top_logprobs\":[]}]},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n";
        let lp = parse_body(sse).unwrap().logprobs.unwrap();
        assert_eq!(lp.iter().map(|t| t.token.as_str()).collect::<String>(), "ab");
        // A broken entry is a malformed body (retried), naming the position.
        let broken = r#"{"choices":[{"message":{"content":"a"},"logprobs":{"content":[{"token":"a","logprob":-0.1},{"logprob":-1}]}}]}"#;
        let err = parse_body(broken).unwrap_err().to_string();
        assert!(err.contains("logprobs.content[1]"), "{err}");
        let mut body = request_body(
            "m",
            &[],
            &Sampling {
                temperature: 0.6,
                top_p: 1.0,
                max_tokens: 5,
                stop: vec![],
                seed: None,
            },
            0,
            false,
        );
        request_logprobs(&mut body, 20);
        assert_eq!(
            (body["logprobs"].clone(), body["top_logprobs"].clone()),
            (Value::Bool(true), serde_json::json!(20))
        );
    }

    #[test]
    fn bad_bodies_are_told_apart() {
        assert!(matches!(
            parse_body("{\"choices\": [{\"mess"),
            Err(BodyError::Malformed(_))
        ));
        assert!(matches!(parse_body(""), Err(BodyError::Malformed(_))));
        assert!(matches!(
            parse_body("{\"choices\": []}"),
            Err(BodyError::Malformed(_))
        ));
        assert_eq!(
            parse_body("\n{\"error\": {\"message\": \"overloaded\"}}"),
            Err(BodyError::Server("overloaded".into()))
        );
        assert_eq!(
            error_body_text("{\"error\":{\"message\":\"Insufficient Balance\"}}"),
            "Insufficient Balance"
        );
        assert_eq!(error_body_text("{\"detail\":\"Not Found\"}"), "Not Found");
        assert_eq!(
            error_body_text("<html>bad gateway</html>"),
            "<html>bad gateway</html>"
        );
    }

    #[test]
    fn request_bodies_and_urls() {
        let s = Sampling {
            temperature: 0.6,
            top_p: 0.95,
            max_tokens: 100,
            stop: vec![],
            seed: Some(10),
        };
        let b = request_body("m", &[Message::new("user", "hi")], &s, 3, false);
        assert_eq!(b["seed"], 13);
        assert_eq!(b["messages"][0]["content"], "hi");
        assert!(b.get("stop").is_none() && b.get("stream_options").is_none());
        let b = request_body(
            "m",
            &[],
            &Sampling {
                seed: None,
                stop: vec!["x".into()],
                ..s
            },
            0,
            true,
        );
        assert!(b.get("seed").is_none());
        assert_eq!(b["stop"][0], "x");
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(
            completions_url("https://api.deepseek.com/"),
            "https://api.deepseek.com/chat/completions"
        );
        assert_eq!(
            completions_url("http://h:8000/v1"),
            "http://h:8000/v1/chat/completions"
        );
        assert_eq!(
            completions_url("http://h/v1/chat/completions"),
            "http://h/v1/chat/completions"
        );
    }
}
