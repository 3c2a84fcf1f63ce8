//! How much an untrusted model directory may make us read, hold or run. Every size taken from a
//! model's files is checked against these before it sizes an allocation; each is far above what
//! any released checkpoint needs (docs/models.md, "Untrusted model files").

use std::path::Path;
use std::time::Duration;

use crate::error::{ModelError, Result};
use crate::guard;

/// config.json and tokenizer_config.json (released ones are kilobytes; a few megabytes with a
/// large `added_tokens_decoder`).
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;
/// tokenizer.json (Gemma 3's, among the largest, is 33 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;
/// A chat template's source (released ones are under 50 KB).
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;

/// Vocabulary entries and the largest token id + 1 (released vocabularies: up to 262,144).
pub const MAX_VOCAB: usize = 1 << 21;
/// BPE merges.
pub const MAX_MERGES: usize = 1 << 22;
/// Entries of tokenizer.json's `added_tokens`.
pub const MAX_ADDED_TOKENS: usize = 1 << 18;
/// Bytes of one token's text.
pub const MAX_TOKEN_BYTES: usize = 64 << 10;

/// One chat-template render: instructions (HF templates need a few thousand per message).
pub const TEMPLATE_FUEL: u64 = 5_000_000;
/// One chat-template render: the rendered prompt's size.
pub const TEMPLATE_OUTPUT_BYTES: usize = 64 << 20;
/// One chat-template render: memory and wall-clock time (see [`guard`]).
pub const TEMPLATE_LIMITS: guard::Limits = guard::Limits {
    memory: 256 << 20,
    time: Duration::from_secs(20),
};

/// config.json: shape fields, each far above released models (Llama 3.1 405B: hidden 16384,
/// intermediate 53248, 126 layers, 128 heads).
pub const MAX_HIDDEN_SIZE: usize = 1 << 16;
pub const MAX_INTERMEDIATE_SIZE: usize = 1 << 18;
pub const MAX_LAYERS: usize = 1 << 10;
pub const MAX_HEADS: usize = 1 << 10;
pub const MAX_HEAD_DIM: usize = 1 << 12;
pub const MAX_POSITIONS: usize = 1 << 24;
/// Parameters the config implies (a trillion).
pub const MAX_PARAMETERS: u64 = 1 << 40;

/// Refuses a file over `max` bytes before it is read, and a device or pipe
/// (`tokenizer.json -> /dev/zero`) before it is opened.
pub fn check_file(path: &Path, max: u64) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::invalid(path, e.to_string()))?;
    if !meta.is_file() {
        return Err(ModelError::invalid(path, "not a regular file"));
    }
    if meta.len() > max {
        return Err(ModelError::invalid(
            path,
            format!("{} bytes, over the {max}-byte limit for this file", meta.len()),
        ));
    }
    Ok(())
}
