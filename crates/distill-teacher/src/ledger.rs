//! The generation ledger: a dataset directory of append-only JSONL shards.
//!
//! - `samples-NNNNN.jsonl`: one [`Sample`] per line. Each line is written with one `write`
//!   and handed to the OS at once (so `kill -9` cannot lose it); fsync follows with the first
//!   append after `sync_every` has passed, and at the end (a power cut can lose the records
//!   since the last fsync).
//! - `errors.jsonl`: one [`ErrorRecord`] per request that failed for good.
//! - `.lock`: held (flock) while a gen-data process writes here.
//!
//! On open, every shard is scanned: present keys are done; a torn last line (a write cut off
//! by a crash) is cut off; a whole last record missing its newline gets one. A restart
//! therefore skips finished keys and never duplicates or corrupts a record.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use distill_data::shards::{ShardScan, list_shards, scan_jsonl};
use distill_data::{ErrorRecord, Sample, Usage};
use serde::Deserialize;

use crate::{ApiKey, TeacherError, redact};

/// Roll over to a new shard past this size.
const SHARD_MAX_BYTES: u64 = 256 << 20;

/// Running totals over every sample in the ledger.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub samples: usize,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    pub truncated: usize,
    pub with_reference: usize,
    pub correct: usize,
    /// Samples both truncated and marked incorrect (for [`Totals::kept`]).
    pub truncated_incorrect: usize,
    /// Model names as servers returned them.
    pub teacher_models: BTreeSet<String>,
}

impl Totals {
    pub fn add(&mut self, usage: &Usage, truncated: bool, correct: Option<bool>, model: &str) {
        self.samples += 1;
        self.prompt_tokens += usage.prompt_tokens;
        self.completion_tokens += usage.completion_tokens;
        self.cached_tokens += usage.cached_tokens.unwrap_or(0);
        self.reasoning_tokens += usage.reasoning_tokens.unwrap_or(0);
        self.truncated += usize::from(truncated);
        if let Some(c) = correct {
            self.with_reference += 1;
            self.correct += usize::from(c);
            self.truncated_incorrect += usize::from(truncated && !c);
        }
        if !model.is_empty() && !self.teacher_models.contains(model) {
            self.teacher_models.insert(model.to_string());
        }
    }

    /// Samples that [`Sample::keep_for_training`] keeps under these switches.
    pub fn kept(&self, keep_truncated: bool, keep_only_correct: bool) -> usize {
        let incorrect = self.with_reference - self.correct;
        let mut dropped = 0;
        if !keep_truncated {
            dropped += self.truncated;
        }
        if keep_only_correct {
            dropped += incorrect;
        }
        if !keep_truncated && keep_only_correct {
            dropped -= self.truncated_incorrect;
        }
        self.samples - dropped
    }

    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// The fields a resume needs from each sample (full records stay on disk).
#[derive(Deserialize)]
struct SampleHead {
    key: String,
    usage: Usage,
    #[serde(default)]
    truncated: bool,
    #[serde(default)]
    correct: Option<bool>,
    #[serde(default)]
    teacher_model: String,
}

#[derive(Deserialize)]
struct ErrorHead {
    key: String,
}

/// What opening found and repaired.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Repairs {
    /// (shard, bytes cut) for each torn last line.
    pub torn: Vec<(PathBuf, u64)>,
    /// Shards whose last record got its missing newline.
    pub newline_added: Vec<PathBuf>,
}

/// A read-only look at a dataset directory (for --dry-run): nothing is created, locked or
/// repaired.
#[derive(Debug, Clone, Default)]
pub struct Peek {
    pub done: HashSet<String>,
    /// Failed keys without a sample.
    pub failed: HashSet<String>,
    pub totals: Totals,
}

impl Peek {
    pub fn read(dir: &Path) -> Result<Peek, TeacherError> {
        let mut p = Peek::default();
        for shard in list_shards(dir)? {
            scan_jsonl(&shard, |h: SampleHead| {
                if p.done.insert(h.key) {
                    p.totals.add(&h.usage, h.truncated, h.correct, &h.teacher_model);
                }
            })?;
        }
        scan_jsonl(&dir.join("errors.jsonl"), |e: ErrorHead| {
            if !p.done.contains(&e.key) {
                p.failed.insert(e.key);
            }
        })?;
        Ok(p)
    }
}

#[derive(Debug)]
pub struct Ledger {
    dir: PathBuf,
    _lock: File,
    done: HashSet<String>,
    /// Failed keys (from errors.jsonl) that have no sample.
    failed: HashMap<String, u32>,
    totals: Totals,
    shard: File,
    shard_path: PathBuf,
    shard_len: u64,
    shard_index: usize,
    errors: File,
    secrets: Vec<ApiKey>,
    sync_every: Duration,
    last_sync: Instant,
    dirty: bool,
    repairs: Repairs,
}

impl Ledger {
    /// Opens (creating) the dataset directory, takes its lock, scans and repairs the shards.
    /// `secrets` are redacted from every line written.
    pub fn open(dir: &Path, secrets: Vec<ApiKey>) -> Result<Self, TeacherError> {
        std::fs::create_dir_all(dir).map_err(TeacherError::io(dir))?;
        let lock_path = dir.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(TeacherError::io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(TeacherError::Locked {
                    path: dir.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(TeacherError::io(&lock_path)(e)),
        }

        let mut done = HashSet::new();
        let mut totals = Totals::default();
        let mut repairs = Repairs::default();
        let shards = list_shards(dir)?;
        for shard in &shards {
            let scan = scan_jsonl(shard, |h: SampleHead| {
                if done.insert(h.key) {
                    totals.add(&h.usage, h.truncated, h.correct, &h.teacher_model);
                }
            })?;
            repair(&scan, &mut repairs)?;
        }

        let errors_path = dir.join("errors.jsonl");
        let mut failed = HashMap::new();
        let scan = scan_jsonl(&errors_path, |e: ErrorHead| {
            if !done.contains(&e.key) {
                *failed.entry(e.key).or_insert(0) += 1;
            }
        })?;
        repair(&scan, &mut repairs)?;
        let errors = append(&errors_path)?;

        let (shard_index, shard_path) = match shards.last() {
            Some(last) => (shard_number(last).unwrap_or(shards.len() - 1), last.clone()),
            None => (0, shard_name(dir, 0)),
        };
        let shard = append(&shard_path)?;
        let shard_len = shard.metadata().map_err(TeacherError::io(&shard_path))?.len();
        let mut ledger = Ledger {
            dir: dir.to_path_buf(),
            _lock: lock,
            done,
            failed,
            totals,
            shard,
            shard_path,
            shard_len,
            shard_index,
            errors,
            secrets,
            sync_every: Duration::from_secs(1),
            last_sync: Instant::now(),
            dirty: false,
            repairs,
        };
        if ledger.shard_len >= SHARD_MAX_BYTES {
            ledger.roll()?;
        }
        Ok(ledger)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_done(&self, key: &str) -> bool {
        self.done.contains(key)
    }

    pub fn is_failed(&self, key: &str) -> bool {
        self.failed.contains_key(key)
    }

    /// Keys in errors.jsonl without a sample.
    pub fn failed_count(&self) -> usize {
        self.failed.len()
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    pub fn repairs(&self) -> &Repairs {
        &self.repairs
    }

    /// Appends a sample unless its key is already present (then returns false).
    pub fn append_sample(&mut self, sample: &Sample) -> Result<bool, TeacherError> {
        if self.done.contains(&sample.key) {
            return Ok(false);
        }
        let line = self.line(sample);
        if self.shard_len > 0 && self.shard_len + line.len() as u64 > SHARD_MAX_BYTES {
            self.roll()?;
        }
        self.shard
            .write_all(line.as_bytes())
            .map_err(TeacherError::io(&self.shard_path))?;
        self.shard_len += line.len() as u64;
        self.done.insert(sample.key.clone());
        self.failed.remove(&sample.key);
        self.totals.add(
            &sample.usage,
            sample.truncated,
            sample.correct,
            &sample.teacher_model,
        );
        self.dirty = true;
        self.maybe_sync()?;
        Ok(true)
    }

    pub fn append_error(&mut self, error: &ErrorRecord) -> Result<(), TeacherError> {
        let line = self.line(error);
        let path = self.dir.join("errors.jsonl");
        self.errors
            .write_all(line.as_bytes())
            .map_err(TeacherError::io(&path))?;
        *self.failed.entry(error.key.clone()).or_insert(0) += 1;
        self.dirty = true;
        self.maybe_sync()
    }

    /// fsyncs both files.
    pub fn sync(&mut self) -> Result<(), TeacherError> {
        if self.dirty {
            self.shard
                .sync_data()
                .map_err(TeacherError::io(&self.shard_path))?;
            let errors = self.dir.join("errors.jsonl");
            self.errors.sync_data().map_err(TeacherError::io(&errors))?;
            self.dirty = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Shard file names, in order.
    pub fn shard_names(&self) -> Result<Vec<String>, TeacherError> {
        Ok(list_shards(&self.dir)?
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn maybe_sync(&mut self) -> Result<(), TeacherError> {
        if self.last_sync.elapsed() >= self.sync_every {
            self.sync()?;
        }
        Ok(())
    }

    /// One JSON line with secrets redacted.
    fn line(&self, record: &impl serde::Serialize) -> String {
        let json = serde_json::to_string(record).expect("records serialize");
        let mut line = redact(&json, &self.secrets);
        line.push('\n');
        line
    }

    fn roll(&mut self) -> Result<(), TeacherError> {
        self.sync()?;
        self.shard_index += 1;
        self.shard_path = shard_name(&self.dir, self.shard_index);
        self.shard = append(&self.shard_path)?;
        self.shard_len = 0;
        Ok(())
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        let _ = self.sync();
    }
}

fn shard_name(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("samples-{i:05}.jsonl"))
}

fn shard_number(path: &Path) -> Option<usize> {
    path.file_name()?
        .to_str()?
        .strip_prefix("samples-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

fn append(path: &Path) -> Result<File, TeacherError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(TeacherError::io(path))
}

/// Cuts a torn tail off, or ends an unterminated last record with its newline.
fn repair(scan: &ShardScan, repairs: &mut Repairs) -> Result<(), TeacherError> {
    if scan.torn_bytes > 0 {
        let f = OpenOptions::new()
            .write(true)
            .open(&scan.path)
            .map_err(TeacherError::io(&scan.path))?;
        f.set_len(scan.good_len).map_err(TeacherError::io(&scan.path))?;
        f.sync_all().map_err(TeacherError::io(&scan.path))?;
        repairs.torn.push((scan.path.clone(), scan.torn_bytes));
    }
    if scan.missing_newline {
        let mut f = append(&scan.path)?;
        f.write_all(b"\n").map_err(TeacherError::io(&scan.path))?;
        f.sync_all().map_err(TeacherError::io(&scan.path))?;
        repairs.newline_added.push(scan.path.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(key: &str) -> Sample {
        Sample {
            key: key.into(),
            prompt_id: "0".into(),
            sample_index: 0,
            messages: vec![],
            reasoning: "r".into(),
            answer: "a".into(),
            finish_reason: "stop".into(),
            truncated: false,
            usage: Usage {
                prompt_tokens: 10,
                completion_tokens: 20,
                reasoning_tokens: None,
                cached_tokens: Some(4),
            },
            teacher_model: "m".into(),
            endpoint: "http://e".into(),
            latency_s: 0.1,
            attempts: 1,
            timestamp: "t".into(),
            reference: None,
            extracted: None,
            correct: Some(true),
        }
    }

    fn error(key: &str) -> ErrorRecord {
        ErrorRecord {
            key: key.into(),
            prompt_id: "0".into(),
            sample_index: 0,
            status: Some(400),
            message: "bad".into(),
            attempts: 1,
            endpoint: "http://e".into(),
            timestamp: "t".into(),
        }
    }

    #[test]
    fn resume_skips_present_keys_and_repairs_torn_tails() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut l = Ledger::open(dir.path(), vec![]).unwrap();
            assert!(l.append_sample(&sample("a")).unwrap());
            assert!(l.append_sample(&sample("b")).unwrap());
            assert!(!l.append_sample(&sample("a")).unwrap(), "duplicate written");
            l.append_error(&error("c")).unwrap();
        }
        let shard = dir.path().join("samples-00000.jsonl");
        // A crash mid-write leaves half a line.
        let torn = b"{\"key\":\"d\",\"usa";
        let mut f = OpenOptions::new().append(true).open(&shard).unwrap();
        f.write_all(torn).unwrap();
        drop(f);
        let mut l = Ledger::open(dir.path(), vec![]).unwrap();
        assert_eq!(l.repairs().torn, [(shard.clone(), torn.len() as u64)]);
        assert!(l.is_done("a") && l.is_done("b") && !l.is_done("d"));
        assert!(l.is_failed("c"));
        assert_eq!(l.totals().samples, 2);
        assert_eq!(l.totals().prompt_tokens, 20);
        assert_eq!(l.totals().cached_tokens, 8);
        assert_eq!(l.totals().correct, 2);
        // A retried failure that succeeds is no longer failed.
        l.append_sample(&sample("c")).unwrap();
        assert!(!l.is_failed("c") && l.failed_count() == 0);
        drop(l);
        let text = std::fs::read_to_string(&shard).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.lines().all(|l| serde_json::from_str::<Sample>(l).is_ok()));
        // A failed key that now has a sample stays resolved after reopening.
        let l = Ledger::open(dir.path(), vec![]).unwrap();
        assert_eq!((l.failed_count(), l.totals().samples), (0, 3));
    }

    #[test]
    fn a_whole_record_without_newline_is_kept_and_terminated() {
        let dir = tempfile::tempdir().unwrap();
        let shard = dir.path().join("samples-00000.jsonl");
        let line = serde_json::to_string(&sample("a")).unwrap();
        std::fs::write(&shard, &line).unwrap();
        let mut l = Ledger::open(dir.path(), vec![]).unwrap();
        assert_eq!(l.repairs().newline_added, std::slice::from_ref(&shard));
        l.append_sample(&sample("b")).unwrap();
        drop(l);
        let text = std::fs::read_to_string(&shard).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn one_writer_at_a_time_and_secrets_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let key = ApiKey::new("sk-test-0123456789");
        let mut l = Ledger::open(dir.path(), vec![key.clone()]).unwrap();
        let err = Ledger::open(dir.path(), vec![]).unwrap_err().to_string();
        assert!(err.contains("another `distill gen-data`"), "{err}");
        let mut e = error("x");
        e.message = "invalid key sk-test-0123456789".into();
        l.append_error(&e).unwrap();
        drop(l);
        let text = std::fs::read_to_string(dir.path().join("errors.jsonl")).unwrap();
        assert!(
            !text.contains("sk-test-0123456789") && text.contains("invalid key ***"),
            "{text}"
        );
        Ledger::open(dir.path(), vec![]).expect("lock released on drop");
    }
}
