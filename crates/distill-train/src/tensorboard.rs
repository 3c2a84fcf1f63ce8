//! TensorBoard event files, written by hand.
//!
//! An event file is a sequence of TFRecords, each framing one serialized `tensorflow.Event`
//! protobuf. We only ever write two kinds of event, so the protobuf encoding is done here in a
//! few lines instead of pulling in a protobuf stack (tensorboard-rs is unmaintained and drags
//! in an advisory-flagged protobuf crate).
//!
//! TFRecord framing, all integers little-endian:
//! ```text
//! u64 length | u32 masked_crc32c(length bytes) | payload | u32 masked_crc32c(payload)
//! ```
//!
//! The fields we use (from tensorboard/compat/proto/event.proto and summary.proto):
//! ```text
//! Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//! Summary { repeated Value value = 1; }
//! Value   { string tag = 1; float simple_value = 2; }
//! ```
//!
//! A small reader ([`read_scalars`]) lives here too: it checks both CRCs of every record and
//! lets tests and tools read a run back without Python.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The version string TensorBoard expects in the first event of every file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// Where a writer gets its timestamps (seconds since the Unix epoch); injectable so tests can
/// produce byte-identical files.
pub type WallClock = Box<dyn FnMut() -> f64 + Send>;

#[derive(Debug, thiserror::Error)]
pub enum TbError {
    #[error("cannot create TensorBoard log directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create TensorBoard event file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write TensorBoard event file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read TensorBoard event file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("corrupt TensorBoard event file {path} at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: usize,
        reason: &'static str,
    },
}

/// Appends scalar summaries to one TensorBoard event file.
///
/// Writes are buffered; call [`EventWriter::flush`] after each step's scalars so that a crash
/// loses at most the step being written. Dropping the writer flushes too (errors ignored).
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
    clock: WallClock,
}

impl EventWriter {
    /// Creates `dir` (with parents) and a new `events.out.tfevents.<unix_secs>.<hostname>` file
    /// in it, stamped with the system clock.
    pub fn create(dir: &Path) -> Result<Self, TbError> {
        Self::create_with_clock(dir, Box::new(system_wall_time))
    }

    /// Like [`EventWriter::create`], but every timestamp (the file name's included) comes from
    /// `clock`.
    pub fn create_with_clock(dir: &Path, mut clock: WallClock) -> Result<Self, TbError> {
        std::fs::create_dir_all(dir).map_err(|source| TbError::CreateDir {
            path: dir.into(),
            source,
        })?;
        let start = clock();
        let (path, file) = create_new_event_file(dir, start as u64, &hostname())?;
        let mut writer = Self {
            path,
            out: BufWriter::new(file),
            clock,
        };
        writer.write_event(&encode_file_version_event(start))?;
        writer.flush()?;
        Ok(writer)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `value` under `tag` (e.g. `"loss"`, `"train/lr"`) at `step`.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<(), TbError> {
        let wall_time = (self.clock)();
        self.write_event(&encode_scalar_event(wall_time, step, tag, value))
    }

    /// Hands everything buffered to the OS. Not an fsync: a process crash loses nothing
    /// flushed, a power cut may.
    pub fn flush(&mut self) -> Result<(), TbError> {
        self.out.flush().map_err(|source| TbError::Write {
            path: self.path.clone(),
            source,
        })
    }

    fn write_event(&mut self, event: &[u8]) -> Result<(), TbError> {
        self.out
            .write_all(&frame_record(event))
            .map_err(|source| TbError::Write {
                path: self.path.clone(),
                source,
            })
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        // Nowhere to report an error from drop; callers wanting one call flush() themselves.
        let _ = self.out.flush();
    }
}

fn system_wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Opens a file that did not exist before. A second writer started in the same second (a quick
/// restart, two runs sharing a directory) gets a `.1`, `.2`, ... suffix rather than truncating
/// the first one's log; TensorBoard picks up any file whose name contains "tfevents".
fn create_new_event_file(dir: &Path, unix_secs: u64, host: &str) -> Result<(PathBuf, File), TbError> {
    let base = format!("events.out.tfevents.{unix_secs}.{host}");
    for attempt in 0u32.. {
        let name = if attempt == 0 {
            base.clone()
        } else {
            format!("{base}.{attempt}")
        };
        let path = dir.join(name);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 1000 => continue,
            Err(source) => return Err(TbError::Create { path, source }),
        }
    }
    unreachable!("the loop returns on its last attempt")
}

/// The machine's name for the event file name; std has no portable call, so read what Linux
/// and Windows expose and fall back to "localhost". Path separators are replaced so the name
/// stays a single file.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| if c == '/' || c == '\\' { '_' } else { c })
        .collect();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

// ---------------------------------------------------------------------------------------------
// Protobuf encoding: just the wire types the two events need.

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(buf, (u64::from(field) << 3) | u64::from(wire));
}

fn put_len_delimited(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, WIRE_LEN);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

fn put_f64(buf: &mut Vec<u8>, field: u32, v: f64) {
    put_key(buf, field, WIRE_FIXED64);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_f32(buf: &mut Vec<u8>, field: u32, v: f32) {
    put_key(buf, field, WIRE_FIXED32);
    buf.extend_from_slice(&v.to_le_bytes());
}

/// int64 (not sint64) is a plain varint of the two's-complement bits, so a negative step takes
/// ten bytes; proto parsers read it back correctly.
fn put_i64(buf: &mut Vec<u8>, field: u32, v: i64) {
    put_key(buf, field, WIRE_VARINT);
    put_varint(buf, v as u64);
}

// Event's wall_time and step are plain proto3 scalars, which protobuf omits when they hold
// their default (all-zero bits); we do the same so our bytes equal TensorBoard's own writer's.
// Summary.Value.simple_value sits in a oneof, so it is written even when 0.0.

fn put_wall_time(buf: &mut Vec<u8>, wall_time: f64) {
    if wall_time.to_bits() != 0 {
        put_f64(buf, 1, wall_time);
    }
}

fn put_step(buf: &mut Vec<u8>, step: i64) {
    if step != 0 {
        put_i64(buf, 2, step);
    }
}

fn encode_file_version_event(wall_time: f64) -> Vec<u8> {
    let mut event = Vec::with_capacity(32);
    put_wall_time(&mut event, wall_time);
    put_len_delimited(&mut event, 3, FILE_VERSION.as_bytes());
    event
}

fn encode_scalar_event(wall_time: f64, step: i64, tag: &str, value: f32) -> Vec<u8> {
    let mut summary_value = Vec::with_capacity(tag.len() + 8);
    put_len_delimited(&mut summary_value, 1, tag.as_bytes());
    put_f32(&mut summary_value, 2, value);
    let mut summary = Vec::with_capacity(summary_value.len() + 2);
    put_len_delimited(&mut summary, 1, &summary_value);

    let mut event = Vec::with_capacity(summary.len() + 24);
    put_wall_time(&mut event, wall_time);
    put_step(&mut event, step);
    put_len_delimited(&mut event, 5, &summary);
    event
}

// ---------------------------------------------------------------------------------------------
// TFRecord framing and CRC32C.

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table built at compile time. A
/// byte-at-a-time table is plenty for a few hundred bytes per training step, and avoids a
/// dependency with a build script for something this small.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

fn crc32c(bytes: &[u8]) -> u32 {
    let crc = bytes.iter().fold(!0u32, |crc, &b| {
        CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    });
    !crc
}

/// TFRecord stores CRCs masked, because a CRC of data that itself contains CRCs is weak.
/// TensorFlow's ((crc >> 15) | (crc << 17)) + 0xa282ead8, written as the rotation it is.
fn masked_crc32c(bytes: &[u8]) -> u32 {
    crc32c(bytes).rotate_right(15).wrapping_add(0xa282_ead8)
}

fn frame_record(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(payload.len() + 16);
    record.extend_from_slice(&len);
    record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    record.extend_from_slice(payload);
    record.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
    record
}

// ---------------------------------------------------------------------------------------------
// Reading back.

/// One scalar as stored in an event file.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalarEvent {
    pub wall_time: f64,
    pub step: i64,
    pub tag: String,
    pub value: f32,
}

/// What an event file holds, as far as this module understands it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventFile {
    /// `file_version` of the first event that carries one.
    pub file_version: Option<String>,
    /// Every `simple_value` summary, in file order.
    pub scalars: Vec<ScalarEvent>,
}

/// Reads an event file, verifying both CRCs of every record. Fields and summary kinds this
/// module does not write (images, histograms, ...) are skipped.
pub fn read_scalars(path: &Path) -> Result<EventFile, TbError> {
    let bytes = std::fs::read(path).map_err(|source| TbError::Read {
        path: path.into(),
        source,
    })?;
    let corrupt = |offset, reason| TbError::Corrupt {
        path: path.into(),
        offset,
        reason,
    };
    let mut file = EventFile::default();
    for (offset, payload) in split_records(&bytes).map_err(|(offset, reason)| corrupt(offset, reason))? {
        decode_event(payload, &mut file).map_err(|reason| corrupt(offset, reason))?;
    }
    Ok(file)
}

/// A record's byte offset in the file and its payload.
type Record<'a> = (usize, &'a [u8]);
/// Where framing broke, and how.
type FrameError = (usize, &'static str);

/// Splits TFRecord framing into records, checking the CRCs.
fn split_records(bytes: &[u8]) -> Result<Vec<Record<'_>>, FrameError> {
    let mut records = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let header = bytes.get(pos..pos + 12).ok_or((pos, "truncated record header"))?;
        let (len_bytes, len_crc) = header.split_at(8);
        if masked_crc32c(len_bytes) != u32::from_le_bytes(len_crc.try_into().expect("4 bytes")) {
            return Err((pos, "length CRC mismatch"));
        }
        let len = usize::try_from(u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")))
            .map_err(|_| (pos, "record length overflows usize"))?;
        let body_end = (pos + 12)
            .checked_add(len)
            .ok_or((pos, "record length overflows usize"))?;
        let payload = bytes
            .get(pos + 12..body_end)
            .ok_or((pos, "truncated record payload"))?;
        let crc = bytes
            .get(body_end..body_end + 4)
            .ok_or((pos, "truncated record CRC"))?;
        if masked_crc32c(payload) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err((pos, "payload CRC mismatch"));
        }
        records.push((pos, payload));
        pos = body_end + 4;
    }
    Ok(records)
}

/// A cursor over protobuf wire format.
struct ProtoReader<'a> {
    bytes: &'a [u8],
}

/// A field's value, still undecoded beyond its wire type.
enum WireValue<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

impl<'a> ProtoReader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.bytes.len() < n {
            return Err("truncated protobuf field");
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes")
    }

    /// The next (field number, value), or None at the end of the message.
    fn next_field(&mut self) -> Result<Option<(u64, WireValue<'a>)>, &'static str> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match (key & 7) as u8 {
            WIRE_VARINT => WireValue::Varint(self.varint()?),
            WIRE_FIXED64 => WireValue::Fixed64(self.take(8)?.try_into().expect("8 bytes")),
            WIRE_LEN => {
                let len = usize::try_from(self.varint()?).map_err(|_| "field length overflows usize")?;
                WireValue::Bytes(self.take(len)?)
            }
            WIRE_FIXED32 => WireValue::Fixed32(self.take(4)?.try_into().expect("4 bytes")),
            _ => return Err("unsupported protobuf wire type"),
        };
        Ok(Some((key >> 3, value)))
    }
}

fn decode_event(payload: &[u8], file: &mut EventFile) -> Result<(), &'static str> {
    let mut wall_time = 0.0;
    let mut step = 0;
    let mut summaries = Vec::new();
    let mut reader = ProtoReader { bytes: payload };
    while let Some((field, value)) = reader.next_field()? {
        match (field, value) {
            (1, WireValue::Fixed64(b)) => wall_time = f64::from_le_bytes(b),
            (2, WireValue::Varint(v)) => step = v as i64,
            (3, WireValue::Bytes(b)) if file.file_version.is_none() => {
                let version = std::str::from_utf8(b).map_err(|_| "file_version is not UTF-8")?;
                file.file_version = Some(version.to_owned());
            }
            (5, WireValue::Bytes(b)) => summaries.push(b),
            _ => {}
        }
    }
    // wall_time and step may follow the summary on the wire, so values are decoded last.
    for summary in summaries {
        let mut reader = ProtoReader { bytes: summary };
        while let Some((field, value)) = reader.next_field()? {
            if let (1, WireValue::Bytes(b)) = (field, value)
                && let Some((tag, value)) = decode_simple_value(b)?
            {
                file.scalars.push(ScalarEvent {
                    wall_time,
                    step,
                    tag,
                    value,
                });
            }
        }
    }
    Ok(())
}

/// (tag, simple_value) of a Summary.Value, or None when it holds some other kind of summary.
fn decode_simple_value(bytes: &[u8]) -> Result<Option<(String, f32)>, &'static str> {
    let mut tag = String::new();
    let mut simple_value = None;
    let mut reader = ProtoReader { bytes };
    while let Some((field, value)) = reader.next_field()? {
        match (field, value) {
            (1, WireValue::Bytes(b)) => {
                tag = std::str::from_utf8(b)
                    .map_err(|_| "summary tag is not UTF-8")?
                    .to_owned();
            }
            (2, WireValue::Fixed32(b)) => simple_value = Some(f32::from_le_bytes(b)),
            _ => {}
        }
    }
    Ok(simple_value.map(|v| (tag, v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn fixtures() -> PathBuf {
        distill_core::testing::fixtures().join("tensorboard")
    }

    /// A clock that starts at `start` and advances by a quarter second per reading; quarters
    /// are exact in binary, so the JSON round trip compares exactly.
    fn fake_clock(start: f64) -> WallClock {
        let mut now = start - 0.25;
        Box::new(move || {
            now += 0.25;
            now
        })
    }

    /// The run behind tests/fixtures/tensorboard/expected.tfevents: four tags over three steps,
    /// values chosen to include ones that are not exact in binary (0.1) and a tiny lr.
    fn write_fixture_run(dir: &Path) -> PathBuf {
        let mut w = EventWriter::create_with_clock(dir, fake_clock(1_700_000_000.0)).unwrap();
        let steps: [(i64, [f32; 4]); 3] = [
            (0, [2.5, 1.75, 0.75, 1e-5]),
            (1, [2.0, 1.25, 0.1, 2e-5]),
            (10, [1.5, 0.875, 0.625, 3e-5]),
        ];
        for (step, values) in steps {
            for (tag, value) in ["loss", "kl", "ce", "lr"].into_iter().zip(values) {
                w.add_scalar(tag, value, step).unwrap();
            }
            w.flush().unwrap();
        }
        w.path().to_owned()
    }

    /// Regenerates the committed fixture: `DISTILL_WRITE_TB_FIXTURE=1 cargo test -p distill-train
    /// tensorboard`, then run tests/fixtures/tensorboard/read_events.py on it to refresh
    /// expected.json.
    fn maybe_regenerate_fixture(produced: &Path) {
        if std::env::var_os("DISTILL_WRITE_TB_FIXTURE").is_some() {
            std::fs::copy(produced, fixtures().join("expected.tfevents")).unwrap();
        }
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC catalogue's check value for CRC-32/ISCSI (= CRC-32C).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_encode_like_protobuf() {
        let encode = |v: u64| {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            b
        };
        assert_eq!(encode(0), [0]);
        assert_eq!(encode(1), [1]);
        assert_eq!(encode(300), [0xac, 0x02]);
        assert_eq!(
            encode(-1i64 as u64),
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
    }

    #[test]
    fn file_is_named_for_tensorboard_and_starts_with_the_version_event() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("runs/a");
        let w = EventWriter::create(&nested).unwrap();
        let name = w.path().file_name().unwrap().to_str().unwrap().to_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert_eq!(w.path().parent().unwrap(), nested);
        drop(w);
        let file = read_scalars(&nested.join(&name)).unwrap();
        assert_eq!(file.file_version.as_deref(), Some(FILE_VERSION));
        assert!(file.scalars.is_empty());
    }

    #[test]
    fn two_writers_in_the_same_second_get_distinct_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = EventWriter::create_with_clock(dir.path(), fake_clock(5.0)).unwrap();
        let b = EventWriter::create_with_clock(dir.path(), fake_clock(5.0)).unwrap();
        assert_ne!(a.path(), b.path());
        assert!(b.path().to_str().unwrap().ends_with(".1"));
    }

    #[test]
    fn writer_reproduces_the_committed_event_file_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let produced = write_fixture_run(dir.path());
        maybe_regenerate_fixture(&produced);
        let expected = std::fs::read(fixtures().join("expected.tfevents")).unwrap();
        assert_eq!(std::fs::read(&produced).unwrap(), expected);
    }

    /// expected.json is what TensorBoard's own EventAccumulator read from expected.tfevents.
    #[test]
    fn rust_reader_agrees_with_tensorboards_reading_of_the_fixture() {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixtures().join("expected.json")).unwrap()).unwrap();
        let file = read_scalars(&fixtures().join("expected.tfevents")).unwrap();
        assert_eq!(file.file_version.as_deref(), json["file_version"].as_str());

        let mut ours: BTreeMap<&str, Vec<(i64, f64, f64)>> = BTreeMap::new();
        for s in &file.scalars {
            ours.entry(&s.tag)
                .or_default()
                .push((s.step, s.wall_time, f64::from(s.value)));
        }
        let theirs: BTreeMap<&str, Vec<(i64, f64, f64)>> = json["scalars"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(tag, events)| {
                let events = events.as_array().unwrap().iter().map(|e| {
                    (
                        e["step"].as_i64().unwrap(),
                        e["wall_time"].as_f64().unwrap(),
                        e["value"].as_f64().unwrap(),
                    )
                });
                (tag.as_str(), events.collect())
            })
            .collect();
        assert_eq!(ours, theirs);
        assert_eq!(ours.len(), 4);
    }

    #[test]
    fn a_flipped_byte_fails_the_crc_check() {
        let bytes = std::fs::read(fixtures().join("expected.tfevents")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // One byte inside the second record's payload (a scalar event), then one in its length.
        let first_record_len = 12 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize + 4;
        for (offset, expected_reason) in [
            (first_record_len + 20, "payload CRC mismatch"),
            (first_record_len, "length CRC mismatch"),
        ] {
            let mut corrupted = bytes.clone();
            corrupted[offset] ^= 0x01;
            let path = dir.path().join("corrupt.tfevents");
            std::fs::write(&path, &corrupted).unwrap();
            match read_scalars(&path) {
                Err(TbError::Corrupt {
                    path: p,
                    offset: at,
                    reason,
                }) => {
                    assert_eq!(p, path);
                    assert_eq!(at, first_record_len);
                    assert_eq!(reason, expected_reason);
                }
                other => panic!("corruption at byte {offset} not detected: {other:?}"),
            }
        }
    }

    #[test]
    fn a_truncated_file_is_reported_not_misread() {
        let bytes = std::fs::read(fixtures().join("expected.tfevents")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("torn.tfevents");
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(
            read_scalars(&path),
            Err(TbError::Corrupt {
                reason: "truncated record CRC",
                ..
            })
        ));
    }

    #[test]
    fn negative_steps_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create_with_clock(dir.path(), fake_clock(1.0)).unwrap();
        w.add_scalar("x", -0.5, -3).unwrap();
        w.flush().unwrap();
        let file = read_scalars(w.path()).unwrap();
        assert_eq!(
            file.scalars,
            [ScalarEvent {
                wall_time: 1.25,
                step: -3,
                tag: "x".into(),
                value: -0.5
            }]
        );
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let path = Path::new("/nonexistent/distill/events.out.tfevents.0.x");
        let err = read_scalars(path).unwrap_err();
        assert!(
            err.to_string()
                .contains("/nonexistent/distill/events.out.tfevents.0.x"),
            "{err}"
        );
    }
}
