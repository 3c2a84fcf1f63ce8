use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    /// Shows the OS error in its message, so it is no `source()`: the CLI prints each cause
    /// of the chain after the message, and would print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error(transparent)]
    Data(#[from] distill_data::DataError),
    /// Another process holds the dataset directory.
    #[error(
        "{path}: another `distill gen-data` is writing this dataset (it holds {path}/.lock); wait for it or use another data.dataset"
    )]
    Locked { path: PathBuf },
    /// The dataset directory was made by a different request setup.
    #[error("{path}: {msg}")]
    Manifest { path: PathBuf, msg: String },
    /// Configuration that cannot work (names the recipe field).
    #[error("{0}")]
    Config(String),
    #[error("cannot start the HTTP client: {0}")]
    Client(String),
    /// A request that failed (no retries at this level), naming the URL and status.
    #[error("{url}: {msg}")]
    Request {
        url: String,
        status: Option<u16>,
        msg: String,
    },
    /// What a sample hook (gen-data's soft-label writer) failed with.
    #[error(transparent)]
    Hook(Box<dyn std::error::Error + Send + Sync>),
}

impl TeacherError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TeacherError + '_ {
        move |error| TeacherError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}
