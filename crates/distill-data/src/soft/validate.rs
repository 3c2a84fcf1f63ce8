//! `distill inspect`'s checks of a store against its dataset.

use super::*;

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
pub(super) struct Findings(HashMap<Check, Finding>);

impl Findings {
    pub(super) fn add(&mut self, check: Check, first: impl FnOnce() -> String) {
        self.0
            .entry(check)
            .and_modify(|f| f.count += 1)
            .or_insert_with(|| Finding {
                check,
                count: 1,
                first: first(),
            });
    }

    pub(super) fn into_sorted(self) -> Vec<Finding> {
        let mut v: Vec<Finding> = self.0.into_values().collect();
        v.sort_by_key(|f| f.check);
        v
    }
}

/// The fields of a sample that validation needs.
#[derive(Deserialize)]
pub(super) struct SampleHead {
    pub(super) key: String,
    #[serde(default)]
    pub(super) usage: Option<crate::Usage>,
    #[serde(default)]
    pub(super) reasoning: String,
    #[serde(default)]
    pub(super) answer: String,
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

pub(super) fn check_offsets(shard: &ShardMap, name: &str, f: &mut Findings) {
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

pub(super) fn check_record(
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
pub(super) fn length_misfit(h: &SampleHead, t: u64, source: SoftLabelSource) -> Option<String> {
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
