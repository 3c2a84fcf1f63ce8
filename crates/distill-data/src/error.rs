use std::path::PathBuf;

/// Errors name the file (and line or field) at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Shows the OS error in its message, so it is no `source()`: the CLI prints each cause
    /// of the chain after the message, and would print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// A record that cannot be used, at a 1-based line (or row) of a file.
    #[error("{path}:{line}: {msg}")]
    Record { path: PathBuf, line: usize, msg: String },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{source_ref}: {msg}")]
    Hub { source_ref: String, msg: String },
    #[error("{path}: {msg}")]
    Unsupported { path: PathBuf, msg: String },
}

impl DataError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
        move |error| DataError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}
