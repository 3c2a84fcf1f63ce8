//! `distill eval`: whether distillation worked, on held-out data, with uncertainty.
//!
//! Data flow: models (HF dirs, `org/name` refs) and held-out sets go in; [`run::evaluate`]
//! generates (`distill_infer::generate`), scores task outputs ([`tasks`], reasoning split by
//! `distill_infer::reasoning`), teacher-forces held-out teacher samples ([`likelihood`]), runs the
//! behaviour probes ([`probes`]) and flags contaminated prompts ([`contamination`]); the
//! [`report`] module writes report.json, report.md, examples.jsonl and the plots.

pub mod contamination;
pub mod likelihood;
pub mod probes;
pub mod report;
pub mod run;
pub mod stats;
pub mod tasks;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] distill_models::ModelError),
    #[error(transparent)]
    Data(#[from] distill_data::DataError),
    #[error(transparent)]
    Samples(#[from] distill_data::examples::ExampleError),
    #[error(transparent)]
    Infer(#[from] distill_infer::InferError),
    /// An input file or record that cannot be used.
    #[error("{path}: {msg}")]
    Input { path: PathBuf, msg: String },
    /// Shows the OS error in its message, so it is no `source()`: the CLI prints each cause
    /// of the chain after the message, and would print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

impl EvalError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> EvalError + '_ {
        move |error| EvalError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}
