//! Typed errors for everything that reads a model from disk or the Hub.
//! Every variant names the file (or repository) at fault so the CLI can print one useful line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Shows the OS error in its message, so it is no `source()`: the CLI prints each cause
    /// of the chain after the message, and would print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: invalid JSON at line {line}, column {column}: {msg}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        msg: String,
    },
    /// A file that parsed but holds a value we cannot use (a config field, a template, ...).
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error(
        "{path}: not a valid safetensors file ({msg}); the download may be truncated, delete it and fetch it again"
    )]
    Safetensors { path: PathBuf, msg: String },
    #[error("{dir}: missing tensor `{name}` (expected shape {shape:?}); is this checkpoint really a {arch}?")]
    MissingTensor {
        dir: PathBuf,
        arch: &'static str,
        name: String,
        shape: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has shape {got:?}, config.json implies {want:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("{dir}: {count} unexpected tensor(s) not used by {arch}, e.g. `{first}`")]
    UnexpectedTensors {
        dir: PathBuf,
        arch: &'static str,
        count: usize,
        first: String,
    },
    #[error("model `{reference}`: {msg}")]
    Hub { reference: String, msg: String },
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub fn invalid(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        ModelError::Invalid {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// Reads a file, naming it in the error.
pub fn read(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| ModelError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// Reads and deserializes a JSON file; a syntax or type error names the file, line and column.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let bytes = read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        msg: strip_position(&e.to_string()),
    })
}

/// serde_json appends " at line L column C"; we print those as fields already.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}
