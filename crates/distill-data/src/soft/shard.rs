//! The shard format: writing a safetensors shard, and mapping one to read it.

use super::*;

pub(super) fn logprob_st_dtype(d: LogprobDtype) -> Dtype {
    match d {
        LogprobDtype::F16 => Dtype::F16,
        LogprobDtype::Bf16 => Dtype::BF16,
    }
}

/// Writes the shard for `live` (records in staging.bin) to `tmp`, streaming: one pass over
/// the records per tensor, so memory holds one record at a time.
pub(super) fn write_shard(
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
pub(super) struct ShardMap {
    pub(super) path: PathBuf,
    pub(super) mmap: Mmap,
    pub(super) keys: Vec<String>,
    pub(super) dtype: LogprobDtype,
    /// Positions.
    pub(super) tokens: usize,
    pub(super) k: usize,
    /// Absolute byte ranges of each tensor's data in the file.
    pub(super) offsets: (usize, usize),
    pub(super) ids: (usize, usize),
    pub(super) top_ids: (usize, usize),
    pub(super) top_logprobs: (usize, usize),
}

impl ShardMap {
    pub(super) fn open(path: &Path, k: usize) -> Result<ShardMap, SoftError> {
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

    pub(super) fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }

    pub(super) fn offset(&self, i: usize) -> u64 {
        let at = self.offsets.0 + 8 * i;
        u64::from_le_bytes(self.mmap[at..at + 8].try_into().expect("8 bytes"))
    }

    /// Positions [start, end) of sample `s`, checked against T.
    pub(super) fn span(&self, s: usize) -> Result<(usize, usize), SoftError> {
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

    pub(super) fn record(&self, s: usize) -> Result<SoftRecord, SoftError> {
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
