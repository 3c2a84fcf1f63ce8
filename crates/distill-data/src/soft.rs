//! Soft labels: the teacher's top-k distribution at every response position of every sample,
//! in `<dataset>/soft/`.
//!
//! ```text
//! soft/manifest.json            source, k, temperature, dtype, tokenizer hash, counts, bytes/token
//! soft/soft-00000.safetensors   S samples, T positions:
//!     offsets       U64 [S+1]  sample s holds positions offsets[s]..offsets[s+1]
//!     ids           U32 [T]    the response's token ids in the student tokenizer
//!     top_ids       U32 [T, k] the k most likely ids at each position, most likely first
//!     top_logprobs  F16|BF16 [T, k]  their natural-log probabilities
//!     __metadata__  format_version = "1", keys = JSON array of the S sample keys
//! soft/staging.bin              records appended since the last shard (see below)
//! ```
//!
//! Position t's distribution is the teacher's prediction *of* `ids[t]` (given the prompt and
//! `ids[..t]`), so it lines up with the label at t, not with the input token at t. A position
//! with fewer than k alternatives is padded with id [`PAD_ID`] (u32::MAX) and logprob -inf; a
//! position whose alternatives are all padding has no soft label (the trainer uses the hard
//! label alone there). The probabilities at a position sum to at most 1: the mass outside the
//! top k is missing.
//!
//! Durability: [`SoftWriter::append`] writes each record to `staging.bin` with one write and
//! fsyncs it, so a kill (or a power cut) loses at most the records in flight; a record cut off
//! by a crash is cut off on reopen (every record carries its length and a checksum). Every
//! `shard_samples` records (or `shard_bytes`) are compacted into a shard written to a temporary
//! name and renamed. A key written twice: the last record wins. [`SoftLabels`] reads shards
//! and staged records alike, so a killed run's labels are readable before it is resumed.
//!
//! This file holds the format's types (record, metadata, manifest, errors); `writer` appends
//! and compacts, `staging` encodes staging.bin records, `shard` writes and maps shards,
//! `reader` is [`SoftLabels`], `validate` checks a store against its dataset.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use distill_core::recipe::{LogprobDtype, SoftLabelSource};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::shards::{list_shards, scan_jsonl};

mod reader;
mod shard;
mod staging;
mod validate;
mod writer;

use self::{shard::*, staging::*};
use reader::Loc;
pub use reader::SoftLabels;
pub use validate::*;
pub use writer::*;

pub const DIR: &str = "soft";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const STAGING_FILE: &str = "staging.bin";
pub const FORMAT: &str = "distill-soft-labels";
pub const FORMAT_VERSION: u32 = 1;
/// The id of a padding alternative (its logprob is -inf).
pub const PAD_ID: u32 = u32::MAX;
/// Records per shard by default.
pub const DEFAULT_SHARD_SAMPLES: usize = 1024;
/// Staged bytes that also close a shard (long responses × large k).
pub const DEFAULT_SHARD_BYTES: u64 = 512 << 20;

const STAGING_MAGIC: &[u8; 8] = b"DSOFTSTG";
const STAGING_HEADER: u64 = 16;
const CHECKSUM: usize = 8;

/// `<dataset>/soft`.
pub fn soft_dir(dataset: &Path) -> PathBuf {
    dataset.join(DIR)
}

/// Errors name the file (and field, key or position) at fault.
#[derive(Debug, thiserror::Error)]
pub enum SoftError {
    /// Shows the OS error in its message, so it is no `source()`: the CLI prints each cause
    /// of the chain after the message, and would print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// Resuming a store made with other settings.
    #[error(
        "{path}: {field} was {was}, is {now}: these soft labels were made another way; HINT: use another data.dataset, or set {field} back"
    )]
    Mismatch {
        path: PathBuf,
        field: &'static str,
        was: String,
        now: String,
    },
    #[error("{path}: another process is writing these soft labels (it holds {path}/.lock)")]
    Locked { path: PathBuf },
    /// A record that does not fit the store (lengths, k).
    #[error("soft label record for key {key}: {msg}")]
    Record { key: String, msg: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SoftError + '_ {
    move |error| SoftError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> SoftError {
    SoftError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// One sample's soft labels, as f32 in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftRecord {
    /// (T,) response token ids.
    pub ids: Vec<u32>,
    pub k: usize,
    /// (T, k) row-major; [`PAD_ID`] pads.
    pub top_ids: Vec<u32>,
    /// (T, k) row-major natural logs; -inf pads.
    pub top_logprobs: Vec<f32>,
}

impl SoftRecord {
    /// Checks that `top_ids` and `top_logprobs` hold `ids.len() * k` values.
    pub fn new(ids: Vec<u32>, k: usize, top_ids: Vec<u32>, top_logprobs: Vec<f32>) -> Result<Self, String> {
        let want = ids.len() * k;
        if k == 0 {
            return Err("k must be at least 1".into());
        }
        if top_ids.len() != want || top_logprobs.len() != want {
            return Err(format!(
                "{} positions x k {k} needs {want} top ids and logprobs, got {} and {}",
                ids.len(),
                top_ids.len(),
                top_logprobs.len()
            ));
        }
        Ok(SoftRecord {
            ids,
            k,
            top_ids,
            top_logprobs,
        })
    }

    /// Positions (T).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The k (id, logprob) alternatives at position `t`, padding included.
    pub fn position(&self, t: usize) -> (&[u32], &[f32]) {
        let r = t * self.k..(t + 1) * self.k;
        (&self.top_ids[r.clone()], &self.top_logprobs[r])
    }
}

/// What a store is: fixed when it is created; a resume must match.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftMeta {
    pub source: SoftLabelSource,
    pub k: usize,
    /// The temperature the teacher sampled at (the logprobs are as the source gave them).
    pub temperature: f64,
    pub dtype: LogprobDtype,
    /// sha256 (hex) of the tokenizer.json whose ids are stored (`TextTokenizer::hash`).
    pub tokenizer_hash: String,
    /// Where that tokenizer came from (model dir or `org/name[@rev]`).
    pub tokenizer: String,
    /// Its vocabulary size (added tokens included): every stored id is below it.
    pub vocab_size: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SoftCounts {
    /// Distinct sample keys in the shards.
    pub samples: u64,
    /// Positions stored in the shards.
    pub tokens: u64,
    /// Bytes of the shard files.
    pub bytes: u64,
}

/// `soft/manifest.json`. Counts cover the shards; `staging.bin` may hold up to a shard's
/// worth more after a killed run (the next run, or `finish`, compacts them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoftManifest {
    pub format: String,
    pub format_version: u32,
    pub source: SoftLabelSource,
    pub k: usize,
    pub temperature: f64,
    pub logprob_dtype: LogprobDtype,
    pub tokenizer_hash: String,
    pub tokenizer: String,
    pub vocab_size: usize,
    /// Padding alternatives: this id with logprob -inf.
    pub pad_id: u32,
    pub counts: SoftCounts,
    pub bytes_per_token: f64,
    pub shards: Vec<String>,
    pub tool_version: String,
}

impl SoftManifest {
    fn new(meta: &SoftMeta) -> Self {
        SoftManifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            source: meta.source,
            k: meta.k,
            temperature: meta.temperature,
            logprob_dtype: meta.dtype,
            tokenizer_hash: meta.tokenizer_hash.clone(),
            tokenizer: meta.tokenizer.clone(),
            vocab_size: meta.vocab_size,
            pad_id: PAD_ID,
            counts: SoftCounts::default(),
            bytes_per_token: 0.0,
            shards: Vec::new(),
            tool_version: distill_core::TOOL_VERSION.into(),
        }
    }

    /// The manifest in the soft directory `dir`, if any.
    pub fn read(dir: &Path) -> Result<Option<SoftManifest>, SoftError> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format_err(&path, e.to_string()))?;
        let format = v.get("format").and_then(|f| f.as_str()).unwrap_or("");
        let version = v.get("format_version").and_then(|f| f.as_u64()).unwrap_or(0);
        if format != FORMAT || version != u64::from(FORMAT_VERSION) {
            return Err(format_err(
                &path,
                format!(
                    "holds format `{format}` version {version}; this distill reads `{FORMAT}` version {FORMAT_VERSION}"
                ),
            ));
        }
        serde_json::from_value(v)
            .map(Some)
            .map_err(|e| format_err(&path, e.to_string()))
    }

    fn write(&self, dir: &Path) -> Result<(), SoftError> {
        let path = dir.join(MANIFEST_FILE);
        let mut json = serde_json::to_string_pretty(self).expect("manifest serializes");
        json.push('\n');
        distill_core::fsutil::write_atomic(&path, json.as_bytes()).map_err(io_err(&path))
    }

    /// Refuses a store made with other settings, naming the first field that differs.
    fn check_same(&self, path: &Path, meta: &SoftMeta) -> Result<(), SoftError> {
        let diffs: [(&'static str, String, String); 5] = [
            (
                "soft_labels.tokenizer (tokenizer hash)",
                self.tokenizer_hash.clone(),
                meta.tokenizer_hash.clone(),
            ),
            ("soft_labels.k", self.k.to_string(), meta.k.to_string()),
            (
                "soft_labels.source",
                self.source.as_str().into(),
                meta.source.as_str().into(),
            ),
            (
                "gen.temperature",
                self.temperature.to_string(),
                meta.temperature.to_string(),
            ),
            (
                "soft_labels.dtype",
                self.logprob_dtype.as_str().into(),
                meta.dtype.as_str().into(),
            ),
        ];
        match diffs.into_iter().find(|(_, was, now)| was != now) {
            None => Ok(()),
            Some((field, was, now)) => Err(SoftError::Mismatch {
                path: path.to_path_buf(),
                field,
                was,
                now,
            }),
        }
    }
}

#[cfg(test)]
mod tests;
