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
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
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
    move |source| SoftError::Io {
        path: path.to_path_buf(),
        source,
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

/// What `finish` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftSummary {
    pub counts: SoftCounts,
    pub bytes_per_token: f64,
    pub shards: Vec<String>,
}

/// What opening a store found and repaired.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SoftRecovery {
    /// Bytes cut off the end of staging.bin (a record cut off by a crash).
    pub torn_bytes: u64,
    /// Staged records that a completed compaction had already written to a shard (a crash
    /// between the shard's rename and the staging reset): dropped.
    pub stale_records: bool,
    /// Records found staged (from a killed run) and kept.
    pub staged_records: usize,
}

/// A record in staging.bin: where its body is.
#[derive(Debug, Clone)]
struct Staged {
    key: String,
    body_at: u64,
    body_len: u64,
    tokens: u64,
}

/// Appends soft labels to a store, compacting them into shards as they accumulate.
pub struct SoftWriter {
    dir: PathBuf,
    manifest: SoftManifest,
    _lock: File,
    staging: File,
    staging_path: PathBuf,
    staging_len: u64,
    staged: Vec<Staged>,
    /// Keys in the shards and in staging.
    keys: HashSet<String>,
    next_shard: u32,
    shard_samples: usize,
    shard_bytes: u64,
    recovery: SoftRecovery,
}

impl std::fmt::Debug for SoftWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftWriter")
            .field("dir", &self.dir)
            .field("staged", &self.staged.len())
            .field("next_shard", &self.next_shard)
            .finish()
    }
}

impl SoftWriter {
    /// Opens the soft-label directory `dir` (creating it), takes its lock, refuses a manifest
    /// made with other settings, repairs staging.bin after a crash.
    pub fn create_or_resume(dir: &Path, meta: SoftMeta) -> Result<SoftWriter, SoftError> {
        if meta.k == 0 {
            return Err(format_err(dir, "k must be at least 1"));
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock = take_lock(dir)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let mut manifest = match SoftManifest::read(dir)? {
            Some(old) => {
                old.check_same(&manifest_path, &meta)?;
                old
            }
            None => SoftManifest::new(&meta),
        };
        remove_temp_shards(dir)?;
        let shards = list_soft_shards(dir)?;
        let mut keys = HashSet::new();
        let mut tokens = 0u64;
        let mut bytes = 0u64;
        for path in &shards {
            let shard = ShardMap::open(path, meta.k)?;
            if shard.dtype != meta.dtype {
                return Err(SoftError::Mismatch {
                    path: path.clone(),
                    field: "soft_labels.dtype",
                    was: shard.dtype.as_str().into(),
                    now: meta.dtype.as_str().into(),
                });
            }
            tokens += shard.tokens as u64;
            bytes += shard.file_len();
            keys.extend(shard.keys);
        }
        let next_shard = match shards.last() {
            Some(p) => shard_number(p).map_or(shards.len() as u32, |n| n + 1),
            None => 0,
        };
        manifest.counts = SoftCounts {
            samples: keys.len() as u64,
            tokens,
            bytes,
        };
        manifest.bytes_per_token = per_token(bytes, tokens);
        manifest.shards = names(&shards);
        manifest.tool_version = distill_core::TOOL_VERSION.into();

        let staging_path = dir.join(STAGING_FILE);
        let (staging, staged, staging_len, recovery) = open_staging(&staging_path, next_shard, meta.k)?;
        keys.extend(staged.iter().map(|s| s.key.clone()));
        let mut writer = SoftWriter {
            dir: dir.to_path_buf(),
            manifest,
            _lock: lock,
            staging,
            staging_path,
            staging_len,
            staged,
            keys,
            next_shard,
            shard_samples: DEFAULT_SHARD_SAMPLES,
            shard_bytes: DEFAULT_SHARD_BYTES,
            recovery,
        };
        writer.manifest.write(&writer.dir)?;
        if writer.staged.len() >= writer.shard_samples || writer.staging_len >= writer.shard_bytes {
            writer.compact()?;
        }
        Ok(writer)
    }

    /// Records per shard (tests use small shards).
    pub fn with_shard_samples(mut self, n: usize) -> Self {
        self.shard_samples = n.max(1);
        self
    }

    pub fn recovery(&self) -> &SoftRecovery {
        &self.recovery
    }

    pub fn manifest(&self) -> &SoftManifest {
        &self.manifest
    }

    /// Whether `key` has soft labels (in a shard or staged).
    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains(key)
    }

    /// Appends one sample's labels; on return they are on disk (fsynced). A key already
    /// present is replaced (the last record wins).
    pub fn append(&mut self, key: &str, rec: &SoftRecord) -> Result<(), SoftError> {
        if rec.k != self.manifest.k {
            return Err(SoftError::Record {
                key: key.into(),
                msg: format!("k is {}, the store's k is {}", rec.k, self.manifest.k),
            });
        }
        if rec.top_ids.len() != rec.ids.len() * rec.k || rec.top_logprobs.len() != rec.top_ids.len() {
            return Err(SoftError::Record {
                key: key.into(),
                msg: format!(
                    "{} positions need {} top ids and logprobs, got {} and {}",
                    rec.ids.len(),
                    rec.ids.len() * rec.k,
                    rec.top_ids.len(),
                    rec.top_logprobs.len()
                ),
            });
        }
        let body = encode_body(key, rec, self.manifest.logprob_dtype);
        let mut frame = Vec::with_capacity(8 + body.len() + CHECKSUM);
        frame.extend_from_slice(&(body.len() as u64).to_le_bytes());
        frame.extend_from_slice(&body);
        frame.extend_from_slice(&checksum(&body));
        self.staging
            .write_all(&frame)
            .map_err(io_err(&self.staging_path))?;
        self.staging.sync_data().map_err(io_err(&self.staging_path))?;
        self.staged.push(Staged {
            key: key.to_string(),
            body_at: self.staging_len + 8,
            body_len: body.len() as u64,
            tokens: rec.ids.len() as u64,
        });
        self.staging_len += frame.len() as u64;
        self.keys.insert(key.to_string());
        if self.staged.len() >= self.shard_samples || self.staging_len >= self.shard_bytes {
            self.compact()?;
        }
        Ok(())
    }

    /// Compacts what is staged into a last shard and writes the manifest.
    pub fn finish(mut self) -> Result<SoftSummary, SoftError> {
        if !self.staged.is_empty() {
            self.compact()?;
        }
        self.manifest.write(&self.dir)?;
        Ok(SoftSummary {
            counts: self.manifest.counts,
            bytes_per_token: self.manifest.bytes_per_token,
            shards: self.manifest.shards.clone(),
        })
    }

    /// Staged records -> `soft-NNNNN.safetensors` (temp name, fsync, rename), then the
    /// manifest, then an empty staging file naming the next shard. A crash between the rename
    /// and the reset leaves staged records whose shard exists: reopening drops them.
    fn compact(&mut self) -> Result<(), SoftError> {
        let live = last_wins(&self.staged);
        let name = shard_name(self.next_shard);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        write_shard(
            &tmp,
            &self.staging_path,
            &live,
            self.manifest.k,
            self.manifest.logprob_dtype,
        )?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        distill_core::fsutil::sync_dir(&self.dir).map_err(io_err(&self.dir))?;

        let file_len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
        let tokens: u64 = live.iter().map(|s| s.tokens).sum();
        let c = &mut self.manifest.counts;
        c.tokens += tokens;
        c.bytes += file_len;
        // Keys already in a shard were counted there (a replaced record).
        c.samples = self.keys.len() as u64;
        self.manifest.bytes_per_token = per_token(c.bytes, c.tokens);
        self.manifest.shards.push(name);
        self.manifest.write(&self.dir)?;

        self.next_shard += 1;
        reset_staging(&mut self.staging, &self.staging_path, self.next_shard)?;
        self.staged.clear();
        self.staging_len = STAGING_HEADER;
        Ok(())
    }
}

fn per_token(bytes: u64, tokens: u64) -> f64 {
    if tokens == 0 {
        0.0
    } else {
        ((bytes as f64 / tokens as f64) * 100.0).round() / 100.0
    }
}

fn take_lock(dir: &Path) -> Result<File, SoftError> {
    let path = dir.join(".lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(SoftError::Locked {
            path: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
    }
}

/// The staged records to write, in order, each key once (its last record).
fn last_wins(staged: &[Staged]) -> Vec<Staged> {
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, s) in staged.iter().enumerate() {
        last.insert(&s.key, i);
    }
    staged
        .iter()
        .enumerate()
        .filter(|(i, s)| last[s.key.as_str()] == *i)
        .map(|(_, s)| s.clone())
        .collect()
}

fn shard_name(n: u32) -> String {
    format!("soft-{n:05}.safetensors")
}

fn shard_number(path: &Path) -> Option<u32> {
    path.file_name()?
        .to_str()?
        .strip_prefix("soft-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect()
}

/// `soft-*.safetensors` in `dir`, in name order.
pub fn list_soft_shards(dir: &Path) -> Result<Vec<PathBuf>, SoftError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_err(dir))?.path();
        if shard_number(&path).is_some() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// A compaction killed before its rename leaves `soft-NNNNN.safetensors.tmp`.
fn remove_temp_shards(dir: &Path) -> Result<(), SoftError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("soft-") && name.ends_with(".safetensors.tmp") {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

fn checksum(body: &[u8]) -> [u8; CHECKSUM] {
    Sha256::digest(body)[..CHECKSUM].try_into().expect("8 bytes")
}

fn logprob_bits(x: f32, dtype: LogprobDtype) -> u16 {
    match dtype {
        LogprobDtype::F16 => f16::from_f32(x).to_bits(),
        LogprobDtype::Bf16 => bf16::from_f32(x).to_bits(),
    }
}

fn logprob_value(bits: u16, dtype: LogprobDtype) -> f32 {
    match dtype {
        LogprobDtype::F16 => f16::from_bits(bits).to_f32(),
        LogprobDtype::Bf16 => bf16::from_bits(bits).to_f32(),
    }
}

fn dtype_tag(d: LogprobDtype) -> u8 {
    match d {
        LogprobDtype::F16 => 0,
        LogprobDtype::Bf16 => 1,
    }
}

/// A staged record's body, little-endian:
/// `u32 key_len | key | u64 T | u32 k | u8 dtype | ids [T]u32 | top_ids [T*k]u32 | top_logprobs [T*k]u16`.
fn encode_body(key: &str, rec: &SoftRecord, dtype: LogprobDtype) -> Vec<u8> {
    let t = rec.ids.len();
    let mut b = Vec::with_capacity(17 + key.len() + 4 * t + 6 * t * rec.k);
    b.extend_from_slice(&(key.len() as u32).to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(&(t as u64).to_le_bytes());
    b.extend_from_slice(&(rec.k as u32).to_le_bytes());
    b.push(dtype_tag(dtype));
    for id in &rec.ids {
        b.extend_from_slice(&id.to_le_bytes());
    }
    for id in &rec.top_ids {
        b.extend_from_slice(&id.to_le_bytes());
    }
    for &lp in &rec.top_logprobs {
        b.extend_from_slice(&logprob_bits(lp, dtype).to_le_bytes());
    }
    b
}

/// A staged body split into its parts (byte slices of the tensors' data).
struct Body<'a> {
    key: &'a str,
    t: usize,
    k: usize,
    dtype: LogprobDtype,
    ids: &'a [u8],
    top_ids: &'a [u8],
    top_logprobs: &'a [u8],
}

fn decode_body(b: &[u8]) -> Option<Body<'_>> {
    let key_len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let key = std::str::from_utf8(b.get(4..4 + key_len)?).ok()?;
    let mut at = 4 + key_len;
    let t = usize::try_from(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?)).ok()?;
    let k = u32::from_le_bytes(b.get(at + 8..at + 12)?.try_into().ok()?) as usize;
    let dtype = match *b.get(at + 12)? {
        0 => LogprobDtype::F16,
        1 => LogprobDtype::Bf16,
        _ => return None,
    };
    at += 13;
    let tk = t.checked_mul(k)?;
    let ids = b.get(at..at.checked_add(4 * t)?)?;
    at += 4 * t;
    let top_ids = b.get(at..at.checked_add(4 * tk)?)?;
    at += 4 * tk;
    let top_logprobs = b.get(at..at.checked_add(2 * tk)?)?;
    at += 2 * tk;
    (at == b.len()).then_some(Body {
        key,
        t,
        k,
        dtype,
        ids,
        top_ids,
        top_logprobs,
    })
}

fn u32s(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
}

fn u16s(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes(c.try_into().expect("2 bytes")))
}

fn record_from_parts(
    ids: &[u8],
    k: usize,
    top_ids: &[u8],
    top_logprobs: &[u8],
    dtype: LogprobDtype,
) -> SoftRecord {
    SoftRecord {
        ids: u32s(ids).collect(),
        k,
        top_ids: u32s(top_ids).collect(),
        top_logprobs: u16s(top_logprobs).map(|b| logprob_value(b, dtype)).collect(),
    }
}

fn staging_header(next_shard: u32) -> [u8; STAGING_HEADER as usize] {
    let mut h = [0u8; STAGING_HEADER as usize];
    h[..8].copy_from_slice(STAGING_MAGIC);
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[12..16].copy_from_slice(&next_shard.to_le_bytes());
    h
}

fn reset_staging(file: &mut File, path: &Path, next_shard: u32) -> Result<(), SoftError> {
    file.set_len(0).map_err(io_err(path))?;
    // Opened for append: this lands at offset 0.
    file.write_all(&staging_header(next_shard))
        .map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

type OpenedStaging = (File, Vec<Staged>, u64, SoftRecovery);

/// Opens staging.bin for appending: a missing or headerless file, or one whose records a
/// finished compaction already holds, starts afresh; a torn last record is cut off.
fn open_staging(path: &Path, next_shard: u32, k: usize) -> Result<OpenedStaging, SoftError> {
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    let mut recovery = SoftRecovery::default();
    let (staged, good_len) = match scan_staging(&mut file, path, k)? {
        Some((header_next, staged, good_len)) if header_next == next_shard => (staged, good_len),
        Some((_, staged, _)) => {
            recovery.stale_records = !staged.is_empty();
            reset_staging(&mut file, path, next_shard)?;
            (Vec::new(), STAGING_HEADER)
        }
        None => {
            reset_staging(&mut file, path, next_shard)?;
            (Vec::new(), STAGING_HEADER)
        }
    };
    let len = file.metadata().map_err(io_err(path))?.len();
    if len > good_len {
        file.set_len(good_len).map_err(io_err(path))?;
        file.sync_all().map_err(io_err(path))?;
        recovery.torn_bytes = len - good_len;
    }
    recovery.staged_records = staged.len();
    Ok((file, staged, good_len, recovery))
}

/// (next shard named in the header, records, length of the good prefix); None without a
/// valid header.
fn scan_staging(
    file: &mut File,
    path: &Path,
    k: usize,
) -> Result<Option<(u32, Vec<Staged>, u64)>, SoftError> {
    let len = file.metadata().map_err(io_err(path))?.len();
    file.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
    let mut reader = std::io::BufReader::new(&*file);
    let mut header = [0u8; STAGING_HEADER as usize];
    if len < STAGING_HEADER || reader.read_exact(&mut header).is_err() || &header[..8] != STAGING_MAGIC {
        return Ok(None);
    }
    let next = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    let mut staged = Vec::new();
    let mut at = STAGING_HEADER;
    let mut body = Vec::new();
    loop {
        let mut len_buf = [0u8; 8];
        if at + 8 > len || reader.read_exact(&mut len_buf).is_err() {
            break;
        }
        let body_len = u64::from_le_bytes(len_buf);
        let Some(end) = (at + 8)
            .checked_add(body_len)
            .and_then(|e| e.checked_add(CHECKSUM as u64))
        else {
            break;
        };
        if end > len {
            break;
        }
        body.resize(body_len as usize, 0);
        let mut sum = [0u8; CHECKSUM];
        if reader.read_exact(&mut body).is_err() || reader.read_exact(&mut sum).is_err() {
            break;
        }
        if checksum(&body) != sum {
            break;
        }
        let Some(b) = decode_body(&body) else { break };
        if b.k != k {
            return Err(format_err(
                path,
                format!("record for key {} has k {}, the store's k is {k}", b.key, b.k),
            ));
        }
        staged.push(Staged {
            key: b.key.to_string(),
            body_at: at + 8,
            body_len,
            tokens: b.t as u64,
        });
        at = end;
    }
    Ok(Some((next, staged, at)))
}

fn read_body(file: &mut File, path: &Path, s: &Staged) -> Result<Vec<u8>, SoftError> {
    let mut body = vec![0u8; s.body_len as usize];
    file.seek(SeekFrom::Start(s.body_at)).map_err(io_err(path))?;
    file.read_exact(&mut body).map_err(io_err(path))?;
    Ok(body)
}

fn logprob_st_dtype(d: LogprobDtype) -> Dtype {
    match d {
        LogprobDtype::F16 => Dtype::F16,
        LogprobDtype::Bf16 => Dtype::BF16,
    }
}

/// Writes the shard for `live` (records in staging.bin) to `tmp`, streaming: one pass over
/// the records per tensor, so memory holds one record at a time.
fn write_shard(
    tmp: &Path,
    staging: &Path,
    live: &[Staged],
    k: usize,
    dtype: LogprobDtype,
) -> Result<(), SoftError> {
    let s = live.len();
    let t: usize = live.iter().map(|r| r.tokens as usize).sum();
    // Data order: offsets (8-byte aligned after the padded header), ids, top_ids, logprobs.
    let sizes = [8 * (s + 1), 4 * t, 4 * t * k, 2 * t * k];
    let mut at = 0;
    let mut span = |n: usize| {
        let r = (at, at + n);
        at += n;
        r
    };
    let tensors = vec![
        (
            "offsets".to_string(),
            TensorInfo {
                dtype: Dtype::U64,
                shape: vec![s + 1],
                data_offsets: span(sizes[0]),
            },
        ),
        (
            "ids".to_string(),
            TensorInfo {
                dtype: Dtype::U32,
                shape: vec![t],
                data_offsets: span(sizes[1]),
            },
        ),
        (
            "top_ids".to_string(),
            TensorInfo {
                dtype: Dtype::U32,
                shape: vec![t, k],
                data_offsets: span(sizes[2]),
            },
        ),
        (
            "top_logprobs".to_string(),
            TensorInfo {
                dtype: logprob_st_dtype(dtype),
                shape: vec![t, k],
                data_offsets: span(sizes[3]),
            },
        ),
    ];
    let keys: Vec<&str> = live.iter().map(|r| r.key.as_str()).collect();
    let metadata = HashMap::from([
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        (
            "keys".to_string(),
            serde_json::to_string(&keys).expect("keys serialize"),
        ),
    ]);
    let header =
        Metadata::new(Some(metadata), tensors).map_err(|e| format_err(tmp, format!("shard header: {e}")))?;
    let mut header = serde_json::to_vec(&header).expect("header serializes");
    header.resize(header.len().next_multiple_of(8), b' ');

    let file = File::create(tmp).map_err(io_err(tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let w = |out: &mut BufWriter<File>, bytes: &[u8]| out.write_all(bytes).map_err(io_err(tmp));
    w(&mut out, &(header.len() as u64).to_le_bytes())?;
    w(&mut out, &header)?;
    let mut offset = 0u64;
    w(&mut out, &offset.to_le_bytes())?;
    for r in live {
        offset += r.tokens;
        w(&mut out, &offset.to_le_bytes())?;
    }
    let mut src = File::open(staging).map_err(io_err(staging))?;
    for part in 0..3 {
        for r in live {
            let body = read_body(&mut src, staging, r)?;
            let b = decode_body(&body)
                .ok_or_else(|| format_err(staging, format!("record for key {} is corrupt", r.key)))?;
            if b.dtype != dtype {
                return Err(format_err(
                    staging,
                    format!(
                        "record for key {} stores {}, the store {}",
                        r.key,
                        b.dtype.as_str(),
                        dtype.as_str()
                    ),
                ));
            }
            w(&mut out, [b.ids, b.top_ids, b.top_logprobs][part])?;
        }
    }
    let file = out.into_inner().map_err(|e| io_err(tmp)(e.into_error()))?;
    file.sync_all().map_err(io_err(tmp))
}

/// One memory-mapped shard: its header read, its data left on disk until asked for.
struct ShardMap {
    path: PathBuf,
    mmap: Mmap,
    keys: Vec<String>,
    dtype: LogprobDtype,
    /// Positions.
    tokens: usize,
    k: usize,
    /// Absolute byte ranges of each tensor's data in the file.
    offsets: (usize, usize),
    ids: (usize, usize),
    top_ids: (usize, usize),
    top_logprobs: (usize, usize),
}

impl ShardMap {
    fn open(path: &Path, k: usize) -> Result<ShardMap, SoftError> {
        let file = File::open(path).map_err(io_err(path))?;
        // SAFETY: shards are written once under a temporary name and renamed; nothing
        // writes to a shard file after that.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| format_err(path, format!("not a readable safetensors file: {e}")))?;
        let data_start = 8 + n;
        let info = |name: &str| {
            meta.info(name)
                .ok_or_else(|| format_err(path, format!("no `{name}` tensor")))
        };
        let extra = meta.metadata().as_ref();
        let version = extra.and_then(|m| m.get("format_version")).map(String::as_str);
        if version != Some("1") {
            return Err(format_err(
                path,
                format!(
                    "__metadata__.format_version is {version:?}; this distill reads \"{FORMAT_VERSION}\""
                ),
            ));
        }
        let keys: Vec<String> = extra
            .and_then(|m| m.get("keys"))
            .ok_or_else(|| format_err(path, "no __metadata__.keys"))
            .and_then(|k| {
                serde_json::from_str(k).map_err(|e| format_err(path, format!("__metadata__.keys: {e}")))
            })?;
        let (offsets, ids, top_ids, top_logprobs) = (
            info("offsets")?,
            info("ids")?,
            info("top_ids")?,
            info("top_logprobs")?,
        );
        let s = keys.len();
        let t = ids.shape.first().copied().unwrap_or(0);
        let dtype = match top_logprobs.dtype {
            Dtype::F16 => LogprobDtype::F16,
            Dtype::BF16 => LogprobDtype::Bf16,
            other => {
                return Err(format_err(
                    path,
                    format!("top_logprobs is {other:?}; expected F16 or BF16"),
                ));
            }
        };
        let checks = [
            (
                offsets.dtype == Dtype::U64 && offsets.shape == [s + 1],
                "offsets must be U64 [S+1] (S = number of keys)",
            ),
            (
                ids.dtype == Dtype::U32 && ids.shape.len() == 1,
                "ids must be U32 [T]",
            ),
            (
                top_ids.dtype == Dtype::U32 && top_ids.shape == [t, k],
                "top_ids must be U32 [T, k] with the manifest's k",
            ),
            (
                top_logprobs.shape == [t, k],
                "top_logprobs must be [T, k] with the manifest's k",
            ),
        ];
        if let Some((_, msg)) = checks.iter().find(|(ok, _)| !ok) {
            return Err(format_err(path, format!("{msg} (k = {k}, {s} keys)")));
        }
        let abs = |i: &TensorInfo| (data_start + i.data_offsets.0, data_start + i.data_offsets.1);
        Ok(ShardMap {
            path: path.to_path_buf(),
            keys,
            dtype,
            tokens: t,
            k,
            offsets: abs(offsets),
            ids: abs(ids),
            top_ids: abs(top_ids),
            top_logprobs: abs(top_logprobs),
            mmap,
        })
    }

    fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }

    fn offset(&self, i: usize) -> u64 {
        let at = self.offsets.0 + 8 * i;
        u64::from_le_bytes(self.mmap[at..at + 8].try_into().expect("8 bytes"))
    }

    /// Positions [start, end) of sample `s`, checked against T.
    fn span(&self, s: usize) -> Result<(usize, usize), SoftError> {
        let (a, b) = (self.offset(s), self.offset(s + 1));
        if a > b || b > self.tokens as u64 {
            return Err(format_err(
                &self.path,
                format!(
                    "offsets[{s}..={}] = {a}..{b} is not a range within T = {} (key {})",
                    s + 1,
                    self.tokens,
                    self.keys[s]
                ),
            ));
        }
        Ok((a as usize, b as usize))
    }

    fn record(&self, s: usize) -> Result<SoftRecord, SoftError> {
        let (a, b) = self.span(s)?;
        let k = self.k;
        let m = &self.mmap[..];
        Ok(record_from_parts(
            &m[self.ids.0 + 4 * a..self.ids.0 + 4 * b],
            k,
            &m[self.top_ids.0 + 4 * a * k..self.top_ids.0 + 4 * b * k],
            &m[self.top_logprobs.0 + 2 * a * k..self.top_logprobs.0 + 2 * b * k],
            self.dtype,
        ))
    }
}

#[derive(Debug, Clone, Copy)]
enum Loc {
    Shard { shard: u32, sample: u32 },
    Staged { at: u64, len: u64 },
}

/// Reads a soft-label store without loading it: shards are memory-mapped, only a key index is
/// built, and [`SoftLabels::get`] decodes one sample when asked.
pub struct SoftLabels {
    dir: PathBuf,
    manifest: SoftManifest,
    shards: Vec<ShardMap>,
    staging: Option<Mutex<File>>,
    staging_path: PathBuf,
    index: HashMap<String, Loc>,
}

impl std::fmt::Debug for SoftLabels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftLabels")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("samples", &self.index.len())
            .finish()
    }
}

impl SoftLabels {
    /// Opens the soft-label directory `dir` (`<dataset>/soft`).
    pub fn open(dir: &Path) -> Result<SoftLabels, SoftError> {
        let manifest = SoftManifest::read(dir)?.ok_or_else(|| {
            format_err(
                &dir.join(MANIFEST_FILE),
                "no soft-label manifest: this dataset has no soft labels (gen-data writes them with [soft_labels] enabled)",
            )
        })?;
        let mut index = HashMap::new();
        let mut shards = Vec::new();
        for (i, path) in list_soft_shards(dir)?.iter().enumerate() {
            let shard = ShardMap::open(path, manifest.k)?;
            for (s, key) in shard.keys.iter().enumerate() {
                index.insert(
                    key.clone(),
                    Loc::Shard {
                        shard: i as u32,
                        sample: s as u32,
                    },
                );
            }
            shards.push(shard);
        }
        let staging_path = dir.join(STAGING_FILE);
        let next_shard = shards
            .last()
            .and_then(|s| shard_number(&s.path))
            .map_or(0, |n| n + 1);
        let staging = match File::open(&staging_path) {
            Ok(mut f) => {
                // Staged records count only if their shard was not written yet.
                if let Some((next, staged, _)) = scan_staging(&mut f, &staging_path, manifest.k)?
                    && next == next_shard
                {
                    for s in staged {
                        index.insert(
                            s.key,
                            Loc::Staged {
                                at: s.body_at,
                                len: s.body_len,
                            },
                        );
                    }
                }
                Some(Mutex::new(f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&staging_path)(e)),
        };
        Ok(SoftLabels {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            staging,
            staging_path,
            index,
        })
    }

    pub fn manifest(&self) -> &SoftManifest {
        &self.manifest
    }

    /// Samples with soft labels.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Every key with soft labels, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// One sample's labels, decoded to f32; None when the key has none.
    pub fn get(&self, key: &str) -> Result<Option<SoftRecord>, SoftError> {
        match self.index.get(key) {
            None => Ok(None),
            Some(&Loc::Shard { shard, sample }) => {
                self.shards[shard as usize].record(sample as usize).map(Some)
            }
            Some(&Loc::Staged { at, len }) => {
                let file = self.staging.as_ref().expect("indexed staged records have a file");
                let mut file = file.lock().expect("staging file lock");
                let staged = Staged {
                    key: key.to_string(),
                    body_at: at,
                    body_len: len,
                    tokens: 0,
                };
                let body = read_body(&mut file, &self.staging_path, &staged)?;
                let b = decode_body(&body).ok_or_else(|| {
                    format_err(&self.staging_path, format!("record for key {key} is corrupt"))
                })?;
                Ok(Some(record_from_parts(
                    b.ids,
                    b.k,
                    b.top_ids,
                    b.top_logprobs,
                    b.dtype,
                )))
            }
        }
    }
}

/// A kind of problem [`validate`] looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Check {
    /// The manifest's tokenizer hash is not the student's.
    TokenizerHash,
    /// offsets[0] != 0, offsets decrease, or offsets[S] != T.
    Offsets,
    /// A response id (the `ids` tensor) at or above the vocabulary size.
    IdOutOfRange,
    /// An alternative's id at or above the vocabulary size (and not the padding id).
    TopIdOutOfRange,
    /// A NaN logprob.
    NanLogprob,
    /// A logprob above 0.
    PositiveLogprob,
    /// A padding id with a finite logprob, or a real id with -inf.
    BadPadding,
    /// The probabilities at a position sum to more than 1 (beyond the dtype's rounding).
    MassOverOne,
    /// A sample in samples-*.jsonl without soft labels.
    SampleWithoutLabels,
    /// A response length that does not fit the sample (api-top-logprobs: differs from the
    /// server's completion_tokens by more than 2 + 2%; any source: empty for a non-empty response).
    LengthMismatch,
    /// Soft labels for a key with no sample (a request whose sample was never written, e.g.
    /// refused or killed): harmless, reported as a warning.
    LabelsWithoutSample,
}

impl Check {
    pub fn describe(self) -> &'static str {
        match self {
            Check::TokenizerHash => "tokenizer hash differs from the student's",
            Check::Offsets => "offsets not monotone from 0 to T",
            Check::IdOutOfRange => "response ids out of the vocabulary",
            Check::TopIdOutOfRange => "top-k ids out of the vocabulary",
            Check::NanLogprob => "NaN logprobs",
            Check::PositiveLogprob => "logprobs above 0",
            Check::BadPadding => "padding not (u32::MAX, -inf)",
            Check::MassOverOne => "positions whose probabilities sum above 1",
            Check::SampleWithoutLabels => "samples without soft labels",
            Check::LengthMismatch => "lengths that do not fit their sample",
            Check::LabelsWithoutSample => "soft labels without a sample (warning)",
        }
    }

    /// Problems that make the dataset unusable for training; the rest are warnings.
    pub fn is_error(self) -> bool {
        self != Check::LabelsWithoutSample
    }
}

/// How often one problem occurred and where first.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub check: Check,
    pub count: u64,
    /// e.g. `soft-00000.safetensors: key 9f2c…, position 17: ...`.
    pub first: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidationReport {
    pub manifest: SoftManifest,
    /// Samples in samples-*.jsonl.
    pub samples: usize,
    /// Keys with soft labels.
    pub labelled: usize,
    /// Positions checked (shards and staged records).
    pub positions: u64,
    /// The vocabulary size ids were checked against.
    pub vocab_size: usize,
    /// Whether a student tokenizer hash was given to compare.
    pub tokenizer_checked: bool,
    /// In check order.
    pub findings: Vec<Finding>,
}

impl ValidationReport {
    pub fn is_ok(&self) -> bool {
        !self.findings.iter().any(|f| f.check.is_error())
    }

    /// `3 samples without soft labels (first: …); 1 positions whose …`.
    pub fn errors_line(&self) -> String {
        self.findings
            .iter()
            .filter(|f| f.check.is_error())
            .map(|f| format!("{} {} (first: {})", f.count, f.check.describe(), f.first))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[derive(Default)]
struct Findings(HashMap<Check, Finding>);

impl Findings {
    fn add(&mut self, check: Check, first: impl FnOnce() -> String) {
        self.0
            .entry(check)
            .and_modify(|f| f.count += 1)
            .or_insert_with(|| Finding {
                check,
                count: 1,
                first: first(),
            });
    }

    fn into_sorted(self) -> Vec<Finding> {
        let mut v: Vec<Finding> = self.0.into_values().collect();
        v.sort_by_key(|f| f.check);
        v
    }
}

/// The fields of a sample that validation needs.
#[derive(Deserialize)]
struct SampleHead {
    key: String,
    #[serde(default)]
    usage: Option<crate::Usage>,
    #[serde(default)]
    reasoning: String,
    #[serde(default)]
    answer: String,
}

/// Checks a soft-label store (`dir`) against its dataset's samples (`samples_dir`) and the
/// student: per position, probabilities sum to at most 1 (plus the dtype's rounding),
/// logprobs are <= 0 and not NaN, ids are below `vocab_size` (default: the manifest's) or
/// the padding id; offsets run monotone from 0 to T; every sample has labels and its length
/// fits; the tokenizer hash is the student's when `expected_tokenizer_hash` is given. Reads
/// the whole store once, shard by shard (memory-mapped). Structural damage that stops
/// reading (a corrupt header) is an error; everything else is counted in the report.
pub fn validate(
    dir: &Path,
    samples_dir: &Path,
    expected_tokenizer_hash: Option<&str>,
    vocab_size: Option<usize>,
) -> Result<ValidationReport, SoftError> {
    let labels = SoftLabels::open(dir)?;
    let m = labels.manifest().clone();
    let vocab = vocab_size.unwrap_or(m.vocab_size) as u64;
    let mut f = Findings::default();
    if let Some(h) = expected_tokenizer_hash
        && h != m.tokenizer_hash
    {
        f.add(Check::TokenizerHash, || {
            format!(
                "{}: tokenizer_hash {} (from {}), the student's is {h}",
                dir.join(MANIFEST_FILE).display(),
                m.tokenizer_hash,
                m.tokenizer
            )
        });
    }
    let tolerance = match m.logprob_dtype {
        LogprobDtype::F16 => 1e-2,
        LogprobDtype::Bf16 => 3e-2,
    };
    let mut positions = 0u64;
    let mut lengths: HashMap<&str, u64> = HashMap::new();
    for shard in &labels.shards {
        let name = shard.path.file_name().unwrap_or_default().to_string_lossy();
        check_offsets(shard, &name, &mut f);
        for (s, key) in shard.keys.iter().enumerate() {
            let Ok((a, b)) = shard.span(s) else { continue };
            let rec = shard.record(s)?;
            let at = |t: usize| format!("{name}: key {key}, position {}", a + t);
            check_record(&rec, vocab, tolerance, &at, &mut f);
            positions += (b - a) as u64;
            lengths.insert(key, (b - a) as u64);
        }
    }
    let staged: Vec<(&str, Loc)> = labels
        .index
        .iter()
        .filter(|(_, l)| matches!(l, Loc::Staged { .. }))
        .map(|(k, l)| (k.as_str(), *l))
        .collect();
    for (key, _) in staged {
        let rec = labels.get(key)?.expect("indexed");
        let at = |t: usize| format!("{STAGING_FILE}: key {key}, position {t}");
        check_record(&rec, vocab, tolerance, &at, &mut f);
        positions += rec.len() as u64;
        lengths.insert(key, rec.len() as u64);
    }

    let mut sample_keys = HashSet::new();
    let mut samples = 0usize;
    for path in list_shards(samples_dir).map_err(|e| format_err(samples_dir, e.to_string()))? {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let mut heads = Vec::new();
        scan_jsonl(&path, |h: SampleHead| heads.push(h)).map_err(|e| format_err(&path, e.to_string()))?;
        for h in heads {
            samples += 1;
            match lengths.get(h.key.as_str()) {
                None => f.add(Check::SampleWithoutLabels, || format!("{name}: key {}", h.key)),
                Some(&t) => {
                    if let Some(why) = length_misfit(&h, t, m.source) {
                        f.add(Check::LengthMismatch, || format!("{name}: key {}: {why}", h.key));
                    }
                }
            }
            sample_keys.insert(h.key);
        }
    }
    let mut orphans: Vec<&str> = labels.keys().filter(|k| !sample_keys.contains(*k)).collect();
    orphans.sort_unstable();
    for key in orphans {
        f.add(Check::LabelsWithoutSample, || format!("key {key}"));
    }
    Ok(ValidationReport {
        samples,
        labelled: labels.len(),
        positions,
        vocab_size: vocab as usize,
        tokenizer_checked: expected_tokenizer_hash.is_some(),
        findings: f.into_sorted(),
        manifest: m,
    })
}

fn check_offsets(shard: &ShardMap, name: &str, f: &mut Findings) {
    let s = shard.keys.len();
    if shard.offset(0) != 0 {
        f.add(Check::Offsets, || {
            format!("{name}: offsets[0] = {}", shard.offset(0))
        });
    }
    for i in 0..s {
        if shard.offset(i) > shard.offset(i + 1) {
            f.add(Check::Offsets, || {
                format!(
                    "{name}: offsets[{i}] > offsets[{}] (key {})",
                    i + 1,
                    shard.keys[i]
                )
            });
        }
    }
    if shard.offset(s) != shard.tokens as u64 {
        f.add(Check::Offsets, || {
            format!("{name}: offsets[{s}] = {}, T = {}", shard.offset(s), shard.tokens)
        });
    }
}

fn check_record(
    rec: &SoftRecord,
    vocab: u64,
    tolerance: f64,
    at: &dyn Fn(usize) -> String,
    f: &mut Findings,
) {
    for (t, &id) in rec.ids.iter().enumerate() {
        if u64::from(id) >= vocab {
            f.add(Check::IdOutOfRange, || {
                format!("{}: id {id} >= vocab {vocab}", at(t))
            });
        }
    }
    for t in 0..rec.len() {
        let (ids, lps) = rec.position(t);
        let mut mass = 0.0f64;
        for (&id, &lp) in ids.iter().zip(lps) {
            if id == PAD_ID {
                if lp != f32::NEG_INFINITY {
                    f.add(Check::BadPadding, || {
                        format!("{}: padding with logprob {lp}", at(t))
                    });
                }
                continue;
            }
            if u64::from(id) >= vocab {
                f.add(Check::TopIdOutOfRange, || {
                    format!("{}: top id {id} >= vocab {vocab}", at(t))
                });
            }
            if lp.is_nan() {
                f.add(Check::NanLogprob, || format!("{}: id {id}", at(t)));
            } else if lp > 1e-3 {
                f.add(Check::PositiveLogprob, || {
                    format!("{}: id {id} logprob {lp}", at(t))
                });
            } else if lp == f32::NEG_INFINITY {
                f.add(Check::BadPadding, || {
                    format!("{}: id {id} with logprob -inf", at(t))
                });
            } else {
                mass += f64::from(lp).exp();
            }
        }
        if mass > 1.0 + tolerance {
            f.add(Check::MassOverOne, || format!("{}: sum {mass:.4}", at(t)));
        }
    }
}

/// Why a stored length does not fit its sample, if it does not.
fn length_misfit(h: &SampleHead, t: u64, source: SoftLabelSource) -> Option<String> {
    let has_text = !(h.reasoning.is_empty() && h.answer.is_empty());
    if t == 0 && has_text {
        return Some("no positions for a non-empty response".into());
    }
    let completion = h.usage.as_ref().map_or(0, |u| u.completion_tokens);
    // The server's count includes tokens that carry no text (the end-of-sequence token) and
    // re-tokenization may merge or split a few: 2 + 2% is allowed.
    if source == SoftLabelSource::ApiTopLogprobs
        && completion > 0
        && t.abs_diff(completion) > 2 + completion / 50
    {
        return Some(format!(
            "{t} positions, the server counted {completion} completion tokens"
        ));
    }
    None
}

#[cfg(test)]
mod tests;
