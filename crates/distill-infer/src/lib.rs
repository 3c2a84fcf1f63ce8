//! The generation engine: what every part of distill that runs a model forward without
//! training it shares. `distill serve` answers requests with it, `distill eval` samples and
//! scores with it, re-scoring writes soft labels with it, and on-policy training samples the
//! student and scores its tokens with it.
//!
//! - [`generate`]: batched, KV-cached decoding (greedy or sampled, EOS and stop strings),
//!   each request with its own settings if it likes;
//! - [`score`]: teacher forcing: log-probabilities of given tokens and top-k distributions;
//! - [`reasoning`]: the `<think>` split of R1-style outputs;
//! - [`host`]: moving small tensors between device and host with errors, not panics.

pub mod generate;
pub mod host;
pub mod reasoning;
pub mod score;

/// Why generation or scoring failed.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Model(#[from] distill_hf::ModelError),
    /// A request the engine cannot run, or a device result it cannot read.
    #[error("{0}")]
    Invalid(String),
}
