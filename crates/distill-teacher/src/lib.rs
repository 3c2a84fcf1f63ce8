//! The teacher side of `distill gen-data`: an OpenAI-compatible async client that normalises
//! every server's reasoning form, a fleet of endpoints, retries with backoff and adaptive
//! concurrency, the append-only generation ledger, the budget and the dataset manifest.
//!
//! - [`api`]: request bodies and response parsing (JSON, keep-alive blank lines, SSE);
//! - [`plan`]: prompts × samples -> requests with their ledger keys;
//! - [`fleet`], [`limiter`]: where the next request goes and how many are in flight;
//! - [`ledger`]: `samples-*.jsonl` + `errors.jsonl`, resume, torn-line repair, the lock;
//! - [`run`]: the loop that ties them together; [`manifest`]: `manifest.json`;
//! - [`prompt_logprobs`]: vLLM's `/v1/completions` prompt logprobs (teacher-forced top-k);
//! - [`grade`]: a served teacher grades given token sequences (on-policy distillation);
//! - [`rescore`]: a local teacher re-scores the samples (`gen-data --rescore`): top-k soft labels.

pub mod api;
pub mod fleet;
pub mod grade;
pub mod ledger;
pub mod limiter;
pub mod manifest;
pub mod plan;
pub mod prompt_logprobs;
pub mod rescore;
pub mod run;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

mod error;
mod secret;
mod time;

pub use error::TeacherError;
pub use secret::{ApiKey, redact};
pub use time::now_rfc3339;
