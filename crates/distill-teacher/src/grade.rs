//! Grading given token sequences with a served teacher, for on-policy distillation: at every
//! position, the teacher's top-k and its log-probability of the token actually there, from
//! vLLM/SGLang's `prompt_logprobs` on `/v1/completions` (which `distill serve` answers too).
//! Requests run a few at a time, connection failures, 429s and 5xx are retried with backoff,
//! and the API key is only ever sent in the `Authorization` header.
//!
//! The DeepSeek API (and OpenAI's) cannot do this: they return log-probabilities of the text
//! they generate, never of text they are given.

use std::time::Duration;

use distill_core::Recipe;

use crate::prompt_logprobs::{parse_prompt_logprobs, request};
use crate::run::backoff;
use crate::{ApiKey, TeacherError};

/// The teacher's view of one position of a graded sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Graded {
    /// Up to k (id, log-probability), most likely first.
    pub top: Vec<(u32, f32)>,
    /// Its log-probability of the token at this position; None if the server left it out.
    pub token: Option<f32>,
}

/// Entry i grades token i of the sequence; entry 0 is None (nothing predicts it).
pub type Grades = Vec<Option<Graded>>;

pub struct Grader {
    client: reqwest::Client,
    url: String,
    model: String,
    key: Option<ApiKey>,
    k: usize,
    concurrency: usize,
    max_retries: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    rt: tokio::runtime::Runtime,
}

impl Grader {
    /// The `[teacher]` server (base_url, model, the key from `api_key_env`), asked for the
    /// top `k`, with `[gen]`'s concurrency, timeout and retry settings.
    pub fn from_recipe(recipe: &Recipe, k: usize) -> Result<Self, TeacherError> {
        let (t, g) = (&recipe.teacher, &recipe.generation);
        let key = crate::fleet::key_from_env(&t.base_url, t.api_key_env.as_deref())?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(g.request_timeout_s))
            .build()
            .map_err(|e| TeacherError::Client(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TeacherError::Client(e.to_string()))?;
        Ok(Grader {
            client,
            url: t.base_url.clone(),
            model: t.model.clone(),
            key,
            k,
            concurrency: g.concurrency.max(1),
            max_retries: g.max_retries,
            backoff_base: Duration::from_secs_f64(g.retry_base_delay_s),
            backoff_max: Duration::from_secs_f64(g.retry_max_delay_s),
            rt,
        })
    }

    /// Log-probabilities asked for per position.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Grades every sequence (blocking), in order; the first request that still fails after
    /// its retries fails the whole call, naming the URL and the sequence.
    pub fn grade(&self, sequences: &[Vec<u32>]) -> Result<Vec<Grades>, TeacherError> {
        self.rt.block_on(async {
            let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(self.concurrency));
            let mut set = tokio::task::JoinSet::new();
            for (i, ids) in sequences.iter().enumerate() {
                let (sem, ids) = (sem.clone(), ids.clone());
                let one = self.one();
                set.spawn(async move {
                    let _permit = sem.acquire_owned().await.expect("the semaphore is never closed");
                    (i, one.with_retries(&ids).await)
                });
            }
            let mut out: Vec<Option<Grades>> = vec![None; sequences.len()];
            while let Some(joined) = set.join_next().await {
                let (i, result) =
                    joined.map_err(|e| TeacherError::Client(format!("a grading task failed: {e}")))?;
                out[i] = Some(result.map_err(|e| match e {
                    TeacherError::Request { url, status, msg } => TeacherError::Request {
                        url,
                        status,
                        msg: format!("grading sequence {i}: {msg}"),
                    },
                    other => other,
                })?);
            }
            Ok(out
                .into_iter()
                .map(|g| g.expect("every sequence graded"))
                .collect())
        })
    }

    fn one(&self) -> OneRequest {
        OneRequest {
            client: self.client.clone(),
            url: self.url.clone(),
            model: self.model.clone(),
            key: self.key.clone(),
            k: self.k,
            max_retries: self.max_retries,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
        }
    }
}

/// What a spawned request needs, owned.
struct OneRequest {
    client: reqwest::Client,
    url: String,
    model: String,
    key: Option<ApiKey>,
    k: usize,
    max_retries: u32,
    backoff_base: Duration,
    backoff_max: Duration,
}

impl OneRequest {
    async fn with_retries(&self, ids: &[u32]) -> Result<Grades, TeacherError> {
        let mut attempt = 1;
        loop {
            match self.send(ids).await {
                Err(TeacherError::Request { status, .. })
                    if retryable(status) && attempt <= self.max_retries =>
                {
                    tokio::time::sleep(backoff(self.backoff_base, self.backoff_max, attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn send(&self, ids: &[u32]) -> Result<Grades, TeacherError> {
        let (client, key) = (&self.client, self.key.as_ref());
        request(client, &self.url, key, &self.model, ids, self.k, |body| {
            parse_grades(body, ids, self.k)
        })
        .await
    }
}

/// Connection failures, rate limits and server errors may pass; anything else will not.
fn retryable(status: Option<u16>) -> bool {
    status.is_none_or(|s| s == 429 || s >= 500)
}

/// A `prompt_logprobs` response for `ids` as grades: the top `k` by rank, and the given
/// token's log-probability wherever the server listed it (vLLM and `distill serve` always do:
/// as one more entry when it is not among the k).
pub fn parse_grades(body: &str, ids: &[u32], k: usize) -> Result<Grades, crate::api::BodyError> {
    let all = parse_prompt_logprobs(body, ids.len(), usize::MAX)?;
    Ok(all
        .into_iter()
        .zip(ids)
        .map(|(entry, &id)| {
            entry.map(|alts| Graded {
                token: alts.iter().find(|(a, _)| *a == id).map(|&(_, lp)| lp),
                top: alts.into_iter().take(k).collect(),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grades_keep_the_top_k_and_find_the_given_token_beyond_them() {
        let body = serde_json::json!({"choices": [{"prompt_logprobs": [
            null,
            {"7": {"logprob": -0.1, "rank": 1}, "3": {"logprob": -2.5, "rank": 2}},
            {"4": {"logprob": -0.2, "rank": 1}, "5": {"logprob": -1.9, "rank": 2}, "9": {"logprob": -6.0, "rank": 14}},
        ]}]})
        .to_string();
        let g = parse_grades(&body, &[1, 3, 9], 2).unwrap();
        assert_eq!(g[0], None);
        assert_eq!(
            g[1],
            Some(Graded {
                top: vec![(7, -0.1), (3, -2.5)],
                token: Some(-2.5)
            })
        );
        assert_eq!(
            g[2],
            Some(Graded {
                top: vec![(4, -0.2), (5, -1.9)],
                token: Some(-6.0)
            })
        );
    }

    #[test]
    fn only_transient_failures_are_retried() {
        assert!(retryable(None) && retryable(Some(429)) && retryable(Some(503)));
        assert!(!retryable(Some(400)) && !retryable(Some(401)) && !retryable(Some(404)));
    }
}
