//! vLLM's prompt logprobs: the teacher's top-k at every position of a token sequence it is
//! given (teacher-forced), through `/v1/completions` with token-id prompts — a vLLM extension
//! (`prompt_logprobs`), for re-scoring responses that a teacher sharing the student's
//! tokenizer did not generate with logprobs.
//!
//! Request: `{"model", "prompt": [ids], "max_tokens": 1, "prompt_logprobs": k}`. Response:
//! `choices[0].prompt_logprobs`, one entry per prompt token: null for the first (nothing
//! predicts it), then `{"<id>": {"logprob", "rank", "decoded_token"}}` with the k most likely
//! ids and, when the actual token is not among them, that token as one more entry (its rank
//! above k). vLLM clamps -inf to -9999; the server's `--max-logprobs` (default 20) caps k.

use serde_json::Value;

use crate::api::{BodyError, error_body_text};
use crate::{ApiKey, TeacherError, redact};

/// Entry i: None for position 0, else the top-k (id, logprob) predicted for token i, most
/// likely first.
pub type PromptLogprobs = Vec<Option<Vec<(u32, f32)>>>;

/// `base_url` + `/completions` (bases carry their `/v1`, as for chat).
pub fn completions_v1_url(base_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    if base.ends_with("/completions") {
        base.to_string()
    } else {
        format!("{base}/completions")
    }
}

pub fn prompt_logprobs_body(model: &str, token_ids: &[u32], k: usize) -> Value {
    serde_json::json!({
        "model": model,
        "prompt": token_ids,
        "max_tokens": 1,
        "prompt_logprobs": k,
    })
}

/// Asks the vLLM server at `base_url` for the top `k` logprobs at every position of
/// `token_ids`.
pub async fn prompt_logprobs(
    client: &reqwest::Client,
    base_url: &str,
    key: Option<&ApiKey>,
    model: &str,
    token_ids: &[u32],
    k: usize,
) -> Result<PromptLogprobs, TeacherError> {
    let n = token_ids.len();
    request(client, base_url, key, model, token_ids, k, |body| {
        parse_prompt_logprobs(body, n, k)
    })
    .await
}

/// POSTs the prompt-logprobs request for `token_ids` and reads a 2xx answer with `parse`;
/// failures name the URL and status, never the key.
pub(crate) async fn request<T>(
    client: &reqwest::Client,
    base_url: &str,
    key: Option<&ApiKey>,
    model: &str,
    token_ids: &[u32],
    k: usize,
    parse: impl FnOnce(&str) -> Result<T, BodyError>,
) -> Result<T, TeacherError> {
    let url = completions_v1_url(base_url);
    let secrets: Vec<ApiKey> = key.into_iter().cloned().collect();
    let fail = |status: Option<u16>, msg: String| TeacherError::Request {
        url: url.clone(),
        status,
        msg: redact(&msg, &secrets),
    };
    let mut req = client
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&prompt_logprobs_body(model, token_ids, k)).expect("bodies serialize"));
    if let Some(k) = key {
        req = req.bearer_auth(k.expose());
    }
    let resp = req
        .send()
        .await
        .map_err(|e| fail(None, format!("request failed: {e}")))?;
    let status = resp.status().as_u16();
    let text = resp
        .text()
        .await
        .map_err(|e| fail(Some(status), format!("reading the response: {e}")))?;
    if !(200..300).contains(&status) {
        return Err(fail(Some(status), format!("{status} {}", error_body_text(&text))));
    }
    parse(&text).map_err(|e| fail(Some(status), e.to_string()))
}

/// Reads `choices[0].prompt_logprobs` for a prompt of `n` tokens, keeping the `k` best ranks.
pub fn parse_prompt_logprobs(body: &str, n: usize, k: usize) -> Result<PromptLogprobs, BodyError> {
    let bad = |m: String| BodyError::Malformed(m);
    let v: Value = serde_json::from_str(body.trim()).map_err(|e| bad(e.to_string()))?;
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        return Err(BodyError::Server(crate::api::error_text(err)));
    }
    let entries = v
        .pointer("/choices/0/prompt_logprobs")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            bad("no choices[0].prompt_logprobs (is this vLLM, and was prompt_logprobs accepted?)".into())
        })?;
    if entries.len() != n {
        return Err(bad(format!(
            "prompt_logprobs has {} entries for a prompt of {n} tokens",
            entries.len()
        )));
    }
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| match e {
            Value::Null => Ok(None),
            Value::Object(m) => position(m, k).map(Some).ok_or_else(|| {
                bad(format!(
                    "prompt_logprobs[{i}]: entries must be {{\"<id>\": {{\"logprob\", \"rank\"}}}}"
                ))
            }),
            _ => Err(bad(format!("prompt_logprobs[{i}] is neither null nor an object"))),
        })
        .collect()
}

/// One position's `{"<id>": {"logprob", "rank"}}`: the k best by rank (by logprob where a
/// rank is missing).
fn position(m: &serde_json::Map<String, Value>, k: usize) -> Option<Vec<(u32, f32)>> {
    let mut alts = m
        .iter()
        .map(|(id, info)| {
            let id: u32 = id.parse().ok()?;
            let logprob = info.get("logprob")?.as_f64()? as f32;
            let rank = info.get("rank").and_then(Value::as_u64).unwrap_or(u64::MAX);
            Some((rank, id, logprob))
        })
        .collect::<Option<Vec<_>>>()?;
    alts.sort_by(|a, b| a.0.cmp(&b.0).then(b.2.total_cmp(&a.2)));
    Some(alts.into_iter().take(k).map(|(_, id, lp)| (id, lp)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeTeacher, Reply};

    fn vllm_body() -> String {
        serde_json::json!({
            "id": "cmpl-1", "object": "text_completion", "model": "r1",
            "choices": [{"index": 0, "text": "x", "finish_reason": "length",
                "prompt_logprobs": [
                    null,
                    {"17": {"logprob": -0.25, "rank": 1, "decoded_token": "a"},
                     "4": {"logprob": -1.75, "rank": 2, "decoded_token": "b"}},
                    // The actual token (90) is outside the top 2 and comes as an extra entry.
                    {"90": {"logprob": -6.5, "rank": 40, "decoded_token": "z"},
                     "5": {"logprob": -1.0, "rank": 2, "decoded_token": "c"},
                     "3": {"logprob": -0.5, "rank": 1, "decoded_token": "d"}}
                ]}]
        })
        .to_string()
    }

    #[tokio::test]
    async fn prompt_logprobs_are_asked_for_and_read_from_vllm() {
        let server = FakeTeacher::start(|_| Reply::ok(vllm_body()));
        let client = reqwest::Client::new();
        let key = ApiKey::new("sk-prompt-logprobs-SECRET");
        let got = prompt_logprobs(&client, &server.url(), Some(&key), "r1", &[1, 17, 90], 2)
            .await
            .unwrap();
        assert_eq!(
            got,
            vec![
                None,
                Some(vec![(17, -0.25), (4, -1.75)]),
                Some(vec![(3, -0.5), (5, -1.0)])
            ]
        );
        let req = &server.requests()[0];
        assert_eq!(req.path, "/v1/completions");
        assert_eq!(req.body["prompt"], serde_json::json!([1, 17, 90]));
        assert_eq!(
            (
                req.body["max_tokens"].clone(),
                req.body["prompt_logprobs"].clone()
            ),
            (1.into(), 2.into())
        );
        assert_eq!(
            req.authorization.as_deref(),
            Some("Bearer sk-prompt-logprobs-SECRET")
        );
    }

    #[tokio::test]
    async fn failures_name_the_url_and_never_the_key() {
        let server = FakeTeacher::start(|seen| {
            Reply::status(
                400,
                &format!(
                    "max_logprobs is 20; key {}",
                    seen.authorization.clone().unwrap_or_default()
                ),
            )
        });
        let key = ApiKey::new("sk-prompt-logprobs-SECRET");
        let err = prompt_logprobs(&reqwest::Client::new(), &server.url(), Some(&key), "r1", &[1], 50)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                err,
                TeacherError::Request {
                    status: Some(400),
                    ..
                }
            ),
            "{text}"
        );
        assert!(
            text.contains("/v1/completions") && text.contains("max_logprobs"),
            "{text}"
        );
        assert!(!text.contains("SECRET"), "{text}");
        // A body of the wrong length or shape is malformed, naming what.
        assert!(
            parse_prompt_logprobs(&vllm_body(), 4, 2)
                .unwrap_err()
                .to_string()
                .contains("3 entries")
        );
        let not_vllm = r#"{"choices": [{"text": "x"}]}"#;
        assert!(
            parse_prompt_logprobs(not_vllm, 1, 2)
                .unwrap_err()
                .to_string()
                .contains("is this vLLM")
        );
        assert_eq!(
            completions_v1_url("http://h:8000/v1/"),
            "http://h:8000/v1/completions"
        );
    }
}
