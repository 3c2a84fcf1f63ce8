//! Typed errors: each names the file at fault and, where one is, the tensor or metadata key.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// Shows the OS error in its message, so it is no `source()`: the CLI prints each cause
    /// of the chain after the message, and would print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: not a GGUF file (it starts with {magic:?}, not \"GGUF\")")]
    NotGguf { path: PathBuf, magic: String },
    #[error(
        "{path}: GGUF version {version} is not supported (supported: 2 and 3; convert v1 files with a current llama.cpp)"
    )]
    Version { path: PathBuf, version: u32 },
    /// The header does not parse: a truncated download or not a GGUF writer's output.
    #[error("{path}: corrupt GGUF header at byte {offset}: {msg}; the file may be truncated")]
    Corrupt { path: PathBuf, offset: u64, msg: String },
    #[error("{path}: metadata `{key}`: {msg}")]
    Metadata { path: PathBuf, key: String, msg: String },
    #[error("{path}: tensor `{name}`: {msg}")]
    Tensor {
        path: PathBuf,
        name: String,
        msg: String,
    },
    /// A file that parsed but holds something we cannot convert.
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("ollama model `{name}`: {msg}")]
    Ollama { name: String, msg: String },
    /// A model directory's config.json that does not parse or is not supported.
    #[error(transparent)]
    Model(#[from] distill_hf::ModelError),
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

impl GgufError {
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        GgufError::Io {
            path: path.into(),
            error,
        }
    }

    pub fn metadata(path: impl Into<PathBuf>, key: impl Into<String>, msg: impl Into<String>) -> Self {
        GgufError::Metadata {
            path: path.into(),
            key: key.into(),
            msg: msg.into(),
        }
    }

    pub fn tensor(path: impl Into<PathBuf>, name: impl Into<String>, msg: impl Into<String>) -> Self {
        GgufError::Tensor {
            path: path.into(),
            name: name.into(),
            msg: msg.into(),
        }
    }

    pub fn invalid(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        GgufError::Invalid {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
