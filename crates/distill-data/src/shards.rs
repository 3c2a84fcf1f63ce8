//! JSONL shards as an append-only writer leaves them: every complete line is one record; a
//! writer killed mid-append (or a power cut) can leave the last line torn. Readers take every
//! good line and report the torn tail; only the gen-data ledger (the writer) cuts it off.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::DataError;
use crate::sample::Sample;

/// What a scan found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardScan {
    pub path: PathBuf,
    pub records: usize,
    /// Length of the good prefix: every complete record, each ending in '\n'.
    pub good_len: u64,
    /// The last line is a whole record whose '\n' is missing (it is counted in `records`);
    /// a writer appends the '\n' before appending more.
    pub missing_newline: bool,
    /// Bytes after the good prefix that are not a record (a torn last line).
    pub torn_bytes: u64,
}

/// Shard files `samples-*.jsonl` in `dir`, in name order; none when `dir` does not exist.
pub fn list_shards(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DataError::io(dir)(e)),
    };
    let mut shards = Vec::new();
    for entry in entries {
        let path = entry.map_err(DataError::io(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("samples-") && name.ends_with(".jsonl") {
            shards.push(path);
        }
    }
    shards.sort();
    Ok(shards)
}

/// Reads every record of a JSONL file into `on`. A bad line that is the file's last is a torn
/// tail (reported, not an error); a bad line before the end is an error naming the line.
/// A missing file scans as empty.
pub fn scan_jsonl<T: DeserializeOwned>(path: &Path, mut on: impl FnMut(T)) -> Result<ShardScan, DataError> {
    let mut scan = ShardScan {
        path: path.to_path_buf(),
        records: 0,
        good_len: 0,
        missing_newline: false,
        torn_bytes: 0,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(scan),
        Err(e) => return Err(DataError::io(path)(e)),
    };
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    // A bad line is only an error if another line follows it.
    let mut pending_bad: Option<(usize, String, u64)> = None;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(DataError::io(path))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if let Some((line, msg, _)) = pending_bad.take() {
            return Err(DataError::Record {
                path: path.to_path_buf(),
                line,
                msg: format!(
                    "corrupt record before the end of the file ({msg}); move the file aside or cut the line out, then rerun"
                ),
            });
        }
        let terminated = buf.last() == Some(&b'\n');
        let text = std::str::from_utf8(&buf).map(str::trim);
        match text {
            Ok("") if terminated => scan.good_len += n as u64,
            Ok(t) => match serde_json::from_str::<T>(t) {
                Ok(record) => {
                    on(record);
                    scan.records += 1;
                    scan.good_len += n as u64;
                    scan.missing_newline = !terminated;
                }
                Err(e) => pending_bad = Some((line_no, e.to_string(), n as u64)),
            },
            Err(e) => pending_bad = Some((line_no, e.to_string(), n as u64)),
        }
    }
    if let Some((_, _, n)) = pending_bad {
        scan.torn_bytes = n;
    }
    Ok(scan)
}

/// A torn last line a reader skipped: the end of a write cut off by a crash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TornLine {
    pub path: PathBuf,
    pub bytes: u64,
}

/// Every sample of a dataset directory, in shard order; torn last lines are skipped.
pub fn read_samples(dir: &Path) -> Result<Vec<Sample>, DataError> {
    Ok(read_samples_noting_torn(dir)?.0)
}

/// Every sample of a dataset directory, in shard order, and the torn last lines skipped
/// (at most one a shard), for the caller to report.
pub fn read_samples_noting_torn(dir: &Path) -> Result<(Vec<Sample>, Vec<TornLine>), DataError> {
    let mut samples = Vec::new();
    let mut torn = Vec::new();
    for shard in list_shards(dir)? {
        let scan = scan_jsonl(&shard, |s: Sample| samples.push(s))?;
        if scan.torn_bytes > 0 {
            torn.push(TornLine {
                path: scan.path,
                bytes: scan.torn_bytes,
            });
        }
    }
    Ok((samples, torn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn scan(bytes: &[u8]) -> Result<(Vec<Value>, ShardScan), DataError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("samples-00000.jsonl");
        std::fs::write(&path, bytes).unwrap();
        let mut got = Vec::new();
        let s = scan_jsonl(&path, |v: Value| got.push(v))?;
        Ok((got, s))
    }

    #[test]
    fn torn_tails_are_reported_not_read() {
        let (got, s) = scan(b"{\"a\":1}\n{\"a\":2}\n{\"a\":").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((s.good_len, s.torn_bytes, s.missing_newline), (16, 5, false));

        let (got, s) = scan(b"{\"a\":1}\n{\"a\":2}").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((s.good_len, s.torn_bytes, s.missing_newline), (15, 0, true));

        // A power cut can leave zeros where the last write was.
        let (got, s) = scan(b"{\"a\":1}\n\0\0\0\0\n").unwrap();
        assert_eq!((got.len(), s.good_len, s.torn_bytes), (1, 8, 5));

        let (got, s) = scan(b"").unwrap();
        assert_eq!((got.len(), s.good_len), (0, 0));
    }

    #[test]
    fn corruption_before_the_end_is_an_error_with_its_line() {
        let err = scan(b"{\"a\":1}\n{\"a\"\n{\"a\":3}\n").unwrap_err().to_string();
        assert!(err.contains("samples-00000.jsonl:2: corrupt record"), "{err}");
    }

    #[test]
    fn reading_a_dataset_notes_each_torn_last_line() {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/dataset/samples-00000.jsonl");
        let whole = std::fs::read(&fixture).unwrap();
        let n = whole.iter().filter(|&&b| b == b'\n').count();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("samples-00000.jsonl"), &whole).unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(b"{\"key\": \"cut");
        std::fs::write(dir.path().join("samples-00001.jsonl"), &torn).unwrap();
        let (samples, torn) = read_samples_noting_torn(dir.path()).unwrap();
        assert_eq!(samples.len(), 2 * n);
        assert_eq!(
            torn,
            [TornLine {
                path: dir.path().join("samples-00001.jsonl"),
                bytes: 12,
            }]
        );
    }

    #[test]
    fn shards_list_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "samples-00001.jsonl",
            "errors.jsonl",
            "samples-00000.jsonl",
            "manifest.json",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let names: Vec<String> = list_shards(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["samples-00000.jsonl", "samples-00001.jsonl"]);
        assert!(list_shards(&dir.path().join("missing")).unwrap().is_empty());
    }
}
