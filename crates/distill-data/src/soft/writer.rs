//! Appending records: `staging.bin` first, then compaction into shards; the store's lock.

use super::*;

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
pub(super) struct Staged {
    pub(super) key: String,
    pub(super) body_at: u64,
    pub(super) body_len: u64,
    pub(super) tokens: u64,
}

/// Appends soft labels to a store, compacting them into shards as they accumulate.
pub struct SoftWriter {
    pub(super) dir: PathBuf,
    pub(super) manifest: SoftManifest,
    pub(super) _lock: File,
    pub(super) staging: File,
    pub(super) staging_path: PathBuf,
    pub(super) staging_len: u64,
    pub(super) staged: Vec<Staged>,
    /// Keys in the shards and in staging.
    pub(super) keys: HashSet<String>,
    pub(super) next_shard: u32,
    pub(super) shard_samples: usize,
    pub(super) shard_bytes: u64,
    pub(super) recovery: SoftRecovery,
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
    pub(super) fn compact(&mut self) -> Result<(), SoftError> {
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

pub(super) fn per_token(bytes: u64, tokens: u64) -> f64 {
    if tokens == 0 {
        0.0
    } else {
        ((bytes as f64 / tokens as f64) * 100.0).round() / 100.0
    }
}

pub(super) fn take_lock(dir: &Path) -> Result<File, SoftError> {
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
pub(super) fn last_wins(staged: &[Staged]) -> Vec<Staged> {
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

pub(super) fn shard_name(n: u32) -> String {
    format!("soft-{n:05}.safetensors")
}

pub(super) fn shard_number(path: &Path) -> Option<u32> {
    path.file_name()?
        .to_str()?
        .strip_prefix("soft-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

pub(super) fn names(paths: &[PathBuf]) -> Vec<String> {
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
pub(super) fn remove_temp_shards(dir: &Path) -> Result<(), SoftError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("soft-") && name.ends_with(".safetensors.tmp") {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}
