//! The `staging.bin` record format: length, checksum, key, ids, top-k, one write each.

use super::*;

pub(super) fn checksum(body: &[u8]) -> [u8; CHECKSUM] {
    Sha256::digest(body)[..CHECKSUM].try_into().expect("8 bytes")
}

pub(super) fn logprob_bits(x: f32, dtype: LogprobDtype) -> u16 {
    match dtype {
        LogprobDtype::F16 => f16::from_f32(x).to_bits(),
        LogprobDtype::Bf16 => bf16::from_f32(x).to_bits(),
    }
}

pub(super) fn logprob_value(bits: u16, dtype: LogprobDtype) -> f32 {
    match dtype {
        LogprobDtype::F16 => f16::from_bits(bits).to_f32(),
        LogprobDtype::Bf16 => bf16::from_bits(bits).to_f32(),
    }
}

pub(super) fn dtype_tag(d: LogprobDtype) -> u8 {
    match d {
        LogprobDtype::F16 => 0,
        LogprobDtype::Bf16 => 1,
    }
}

/// A staged record's body, little-endian:
/// `u32 key_len | key | u64 T | u32 k | u8 dtype | ids [T]u32 | top_ids [T*k]u32 | top_logprobs [T*k]u16`.
pub(super) fn encode_body(key: &str, rec: &SoftRecord, dtype: LogprobDtype) -> Vec<u8> {
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
pub(super) struct Body<'a> {
    pub(super) key: &'a str,
    pub(super) t: usize,
    pub(super) k: usize,
    pub(super) dtype: LogprobDtype,
    pub(super) ids: &'a [u8],
    pub(super) top_ids: &'a [u8],
    pub(super) top_logprobs: &'a [u8],
}

pub(super) fn decode_body(b: &[u8]) -> Option<Body<'_>> {
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

pub(super) fn u32s(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
}

pub(super) fn u16s(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes(c.try_into().expect("2 bytes")))
}

pub(super) fn record_from_parts(
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

pub(super) fn staging_header(next_shard: u32) -> [u8; STAGING_HEADER as usize] {
    let mut h = [0u8; STAGING_HEADER as usize];
    h[..8].copy_from_slice(STAGING_MAGIC);
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[12..16].copy_from_slice(&next_shard.to_le_bytes());
    h
}

pub(super) fn reset_staging(file: &mut File, path: &Path, next_shard: u32) -> Result<(), SoftError> {
    file.set_len(0).map_err(io_err(path))?;
    // Opened for append: this lands at offset 0.
    file.write_all(&staging_header(next_shard))
        .map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

pub(super) type OpenedStaging = (File, Vec<Staged>, u64, SoftRecovery);

/// Opens staging.bin for appending: a missing or headerless file, or one whose records a
/// finished compaction already holds, starts afresh; a torn last record is cut off.
pub(super) fn open_staging(path: &Path, next_shard: u32, k: usize) -> Result<OpenedStaging, SoftError> {
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
pub(super) fn scan_staging(
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

pub(super) fn read_body(file: &mut File, path: &Path, s: &Staged) -> Result<Vec<u8>, SoftError> {
    let mut body = vec![0u8; s.body_len as usize];
    file.seek(SeekFrom::Start(s.body_at)).map_err(io_err(path))?;
    file.read_exact(&mut body).map_err(io_err(path))?;
    Ok(body)
}
