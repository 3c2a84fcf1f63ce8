//! The soft-label store: round trips, crashes, resume checks and validation.

use super::*;

const VOCAB: usize = 384;

fn meta(dtype: LogprobDtype) -> SoftMeta {
    SoftMeta {
        source: SoftLabelSource::ApiTopLogprobs,
        k: 3,
        temperature: 0.6,
        dtype,
        tokenizer_hash: "ab".repeat(32),
        tokenizer: "tests/fixtures/tiny-qwen2".into(),
        vocab_size: VOCAB,
    }
}

/// A record of `t` positions whose top-3 is (id, id+1, pad) with probabilities 0.5, 0.25.
fn record(seed: u32, t: usize) -> SoftRecord {
    let ids: Vec<u32> = (0..t as u32).map(|i| (seed * 7 + i) % VOCAB as u32).collect();
    let mut top_ids = Vec::new();
    let mut lps = Vec::new();
    for &id in &ids {
        top_ids.extend([id, (id + 1) % VOCAB as u32, PAD_ID]);
        lps.extend([0.5f32.ln() - seed as f32 * 1e-3, 0.25f32.ln(), f32::NEG_INFINITY]);
    }
    SoftRecord::new(ids, 3, top_ids, lps).unwrap()
}

fn key(i: u32) -> String {
    format!("{i:064x}")
}

fn assert_close(got: &SoftRecord, want: &SoftRecord, tol: f32) {
    assert_eq!(got.ids, want.ids);
    assert_eq!(got.top_ids, want.top_ids);
    assert_eq!(got.k, want.k);
    for (g, w) in got.top_logprobs.iter().zip(&want.top_logprobs) {
        if w.is_infinite() {
            assert_eq!(g, w);
        } else {
            assert!((g - w).abs() <= tol * w.abs().max(1.0), "{g} vs {w}");
        }
    }
}

#[test]
fn records_round_trip_in_f16_and_bf16() {
    for (dtype, tol) in [(LogprobDtype::F16, 1e-3), (LogprobDtype::Bf16, 8e-3)] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("soft");
        let mut w = SoftWriter::create_or_resume(&dir, meta(dtype))
            .unwrap()
            .with_shard_samples(2);
        let lens = [5, 0, 17, 1, 9];
        for (i, &t) in lens.iter().enumerate() {
            w.append(&key(i as u32), &record(i as u32, t)).unwrap();
        }
        assert!(w.contains(&key(4)) && !w.contains(&key(5)));
        let summary = w.finish().unwrap();
        assert_eq!(
            summary.shards,
            [
                "soft-00000.safetensors",
                "soft-00001.safetensors",
                "soft-00002.safetensors"
            ]
        );
        assert_eq!((summary.counts.samples, summary.counts.tokens), (5, 32));
        assert!(summary.bytes_per_token > 0.0);

        let labels = SoftLabels::open(&dir).unwrap();
        assert_eq!(labels.len(), 5);
        assert_eq!(labels.manifest().logprob_dtype, dtype);
        assert_eq!(labels.manifest().counts, summary.counts);
        for (i, &t) in lens.iter().enumerate() {
            let got = labels.get(&key(i as u32)).unwrap().unwrap();
            assert_eq!(got.len(), t);
            assert_close(&got, &record(i as u32, t), tol);
        }
        assert!(labels.get("missing").unwrap().is_none());

        // Any safetensors reader sees the documented tensors.
        let bytes = std::fs::read(dir.join("soft-00001.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("ids").unwrap().shape(), [18]);
        assert_eq!(st.tensor("top_ids").unwrap().shape(), [18, 3]);
        assert_eq!(st.tensor("offsets").unwrap().shape(), [3]);
        assert_eq!(
            st.tensor("top_logprobs").unwrap().dtype(),
            logprob_st_dtype(dtype)
        );
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let keys: Vec<String> = serde_json::from_str(&m.metadata().as_ref().unwrap()["keys"]).unwrap();
        assert_eq!(keys, [key(2), key(3)]);
        let report = validate(&dir, tmp.path(), Some(&"ab".repeat(32)), None).unwrap();
        assert_eq!((report.positions, report.labelled), (32, 5));
    }
}

#[test]
fn a_killed_writer_loses_only_a_torn_record_and_its_staged_labels_stay_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("soft");
    let mut w = SoftWriter::create_or_resume(&dir, meta(LogprobDtype::F16))
        .unwrap()
        .with_shard_samples(3);
    for i in 0..4 {
        w.append(&key(i), &record(i, 4)).unwrap();
    }
    drop(w); // killed: one shard of 3, one record staged
    // The kill cut the next record short.
    let staging = dir.join(STAGING_FILE);
    let mut frame = Vec::new();
    let body = encode_body(&key(9), &record(9, 6), LogprobDtype::F16);
    frame.extend_from_slice(&(body.len() as u64).to_le_bytes());
    frame.extend_from_slice(&body[..body.len() / 2]);
    let mut f = OpenOptions::new().append(true).open(&staging).unwrap();
    f.write_all(&frame).unwrap();
    drop(f);

    // Readers see the shard and the staged record, not the torn one.
    let labels = SoftLabels::open(&dir).unwrap();
    assert_eq!(labels.len(), 4);
    assert_close(&labels.get(&key(3)).unwrap().unwrap(), &record(3, 4), 1e-3);
    assert!(!labels.contains(&key(9)));
    drop(labels);

    let mut w = SoftWriter::create_or_resume(&dir, meta(LogprobDtype::F16)).unwrap();
    assert_eq!(w.recovery().torn_bytes, frame.len() as u64);
    assert_eq!(w.recovery().staged_records, 1);
    assert!(w.contains(&key(3)) && !w.contains(&key(9)));
    w.append(&key(9), &record(9, 6)).unwrap();
    let s = w.finish().unwrap();
    assert_eq!((s.counts.samples, s.shards.len()), (5, 2));
    let labels = SoftLabels::open(&dir).unwrap();
    assert_close(&labels.get(&key(9)).unwrap().unwrap(), &record(9, 6), 1e-3);
}

#[test]
fn a_crash_after_compaction_does_not_duplicate_records() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("soft");
    let mut w = SoftWriter::create_or_resume(&dir, meta(LogprobDtype::F16)).unwrap();
    w.append(&key(0), &record(0, 3)).unwrap();
    w.append(&key(1), &record(1, 2)).unwrap();
    let before = std::fs::read(dir.join(STAGING_FILE)).unwrap();
    w.finish().unwrap();
    // As if the process died after the shard's rename, before staging was reset.
    std::fs::write(dir.join(STAGING_FILE), &before).unwrap();
    assert_eq!(SoftLabels::open(&dir).unwrap().len(), 2);
    let w = SoftWriter::create_or_resume(&dir, meta(LogprobDtype::F16)).unwrap();
    assert!(w.recovery().stale_records);
    let s = w.finish().unwrap();
    assert_eq!((s.counts.samples, s.counts.tokens, s.shards.len()), (2, 5, 1));
}

#[test]
fn the_last_record_of_a_key_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("soft");
    let mut w = SoftWriter::create_or_resume(&dir, meta(LogprobDtype::F16))
        .unwrap()
        .with_shard_samples(3);
    w.append(&key(0), &record(0, 2)).unwrap();
    w.append(&key(0), &record(5, 4)).unwrap(); // replaced while staged
    w.append(&key(1), &record(1, 1)).unwrap();
    w.append(&key(2), &record(2, 1)).unwrap(); // shard 0: keys 0, 1, 2
    w.append(&key(1), &record(6, 3)).unwrap(); // replaced in a later shard
    let s = w.finish().unwrap();
    assert_eq!(s.counts.samples, 3);
    let labels = SoftLabels::open(&dir).unwrap();
    assert_eq!(labels.len(), 3);
    assert_close(&labels.get(&key(0)).unwrap().unwrap(), &record(5, 4), 1e-3);
    assert_close(&labels.get(&key(1)).unwrap().unwrap(), &record(6, 3), 1e-3);
}

#[test]
fn resuming_with_other_settings_is_refused_with_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("soft");
    SoftWriter::create_or_resume(&dir, meta(LogprobDtype::F16))
        .unwrap()
        .finish()
        .unwrap();
    let changes: [(&str, SoftMeta); 5] = [
        (
            "tokenizer hash",
            SoftMeta {
                tokenizer_hash: "cd".repeat(32),
                ..meta(LogprobDtype::F16)
            },
        ),
        (
            "soft_labels.k was 3, is 5",
            SoftMeta {
                k: 5,
                ..meta(LogprobDtype::F16)
            },
        ),
        (
            "soft_labels.source was api-top-logprobs, is local-rescore",
            SoftMeta {
                source: SoftLabelSource::LocalRescore,
                ..meta(LogprobDtype::F16)
            },
        ),
        (
            "gen.temperature was 0.6, is 1",
            SoftMeta {
                temperature: 1.0,
                ..meta(LogprobDtype::F16)
            },
        ),
        ("soft_labels.dtype was f16, is bf16", meta(LogprobDtype::Bf16)),
    ];
    for (want, m) in changes {
        let err = SoftWriter::create_or_resume(&dir, m).unwrap_err().to_string();
        assert!(err.contains(want), "{want}: {err}");
        assert!(
            err.contains("soft/manifest.json") && err.contains("HINT"),
            "{err}"
        );
    }
    // The same settings resume; a second writer is refused while one holds the store.
    let w = SoftWriter::create_or_resume(&dir, meta(LogprobDtype::F16)).unwrap();
    let err = SoftWriter::create_or_resume(&dir, meta(LogprobDtype::F16))
        .unwrap_err()
        .to_string();
    assert!(err.contains("another process"), "{err}");
    drop(w);
}

#[test]
fn records_that_do_not_fit_are_refused() {
    assert!(SoftRecord::new(vec![1, 2], 3, vec![0; 5], vec![0.0; 6]).is_err());
    assert!(SoftRecord::new(vec![1], 0, vec![], vec![]).is_err());
    let tmp = tempfile::tempdir().unwrap();
    let mut w = SoftWriter::create_or_resume(&tmp.path().join("soft"), meta(LogprobDtype::F16)).unwrap();
    let mut r = record(0, 2);
    r.k = 2;
    r.top_ids.truncate(4);
    r.top_logprobs.truncate(4);
    let err = w.append("x", &r).unwrap_err().to_string();
    assert!(err.contains("key x") && err.contains("k is 2"), "{err}");
}

/// samples-00000.jsonl with one line per (key, completion_tokens).
fn write_samples(dir: &Path, samples: &[(String, u64)]) {
    let text: String = samples
        .iter()
        .map(|(k, n)| {
            format!(
                "{}\n",
                serde_json::json!({"key": k, "usage": {"prompt_tokens": 3, "completion_tokens": n},
                    "reasoning": "r", "answer": "a"})
            )
        })
        .collect();
    std::fs::write(dir.join("samples-00000.jsonl"), text).unwrap();
}

#[test]
fn validation_counts_every_kind_of_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("soft");
    let mut w = SoftWriter::create_or_resume(&dir, meta(LogprobDtype::F16)).unwrap();
    for i in 0..3 {
        w.append(&key(i), &record(i, 4)).unwrap();
    }
    w.finish().unwrap();
    write_samples(tmp.path(), &(0..3).map(|i| (key(i), 4)).collect::<Vec<_>>());
    let good = validate(&dir, tmp.path(), Some(&"ab".repeat(32)), None).unwrap();
    assert!(good.is_ok() && good.findings.is_empty(), "{:?}", good.findings);
    assert_eq!(
        (good.samples, good.labelled, good.positions, good.vocab_size),
        (3, 3, 12, VOCAB)
    );

    // One bad record per kind, a sample without labels, labels without a sample.
    let mut w = SoftWriter::create_or_resume(&dir, meta(LogprobDtype::F16)).unwrap();
    let bad = |f: &dyn Fn(&mut SoftRecord)| {
        let mut r = record(0, 2);
        f(&mut r);
        r
    };
    let cases: Vec<(Check, SoftRecord)> = vec![
        (Check::IdOutOfRange, bad(&|r| r.ids[1] = VOCAB as u32)),
        (Check::TopIdOutOfRange, bad(&|r| r.top_ids[0] = 1000)),
        (Check::NanLogprob, bad(&|r| r.top_logprobs[0] = f32::NAN)),
        (Check::PositiveLogprob, bad(&|r| r.top_logprobs[0] = 0.5)),
        (Check::BadPadding, bad(&|r| r.top_logprobs[2] = -3.0)),
        (Check::MassOverOne, bad(&|r| r.top_logprobs[1] = 0.8f32.ln())),
    ];
    let mut samples: Vec<(String, u64)> = (0..3).map(|i| (key(i), 4)).collect();
    for (i, (_, r)) in cases.iter().enumerate() {
        let k = key(100 + i as u32);
        w.append(&k, r).unwrap();
        samples.push((k, 2));
    }
    w.append(&key(200), &record(1, 2)).unwrap(); // no sample: a warning
    w.append(&key(201), &record(1, 40)).unwrap(); // server said 2 tokens
    samples.push((key(201), 2));
    samples.push((key(300), 5)); // no labels
    write_samples(tmp.path(), &samples);
    // Left staged (not finished): validation reads staged records too.
    drop(w);
    let report = validate(&dir, tmp.path(), Some(&"cd".repeat(32)), None).unwrap();
    assert!(!report.is_ok());
    let found: HashMap<Check, u64> = report.findings.iter().map(|f| (f.check, f.count)).collect();
    for (check, _) in &cases {
        assert_eq!(found.get(check), Some(&1), "{check:?}: {:?}", report.findings);
    }
    assert_eq!(found[&Check::TokenizerHash], 1);
    assert_eq!(found[&Check::SampleWithoutLabels], 1);
    assert_eq!(found[&Check::LengthMismatch], 1);
    assert_eq!(found[&Check::LabelsWithoutSample], 1);
    let first = |c: Check| {
        report
            .findings
            .iter()
            .find(|f| f.check == c)
            .unwrap()
            .first
            .clone()
    };
    assert!(first(Check::IdOutOfRange).contains(&format!("key {}, position 1", key(100))));
    assert!(first(Check::SampleWithoutLabels).contains(&key(300)));
    assert!(report.errors_line().contains("samples without soft labels"));
    assert!(!Check::LabelsWithoutSample.is_error());

    // Broken offsets in a shard: offsets is the first tensor after the padded header.
    let shard = dir.join("soft-00000.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let at = 8 + n + 8; // offsets[1]
    bytes[at..at + 8].copy_from_slice(&99u64.to_le_bytes());
    std::fs::write(&shard, &bytes).unwrap();
    let report = validate(&dir, tmp.path(), None, None).unwrap();
    let offsets = report
        .findings
        .iter()
        .find(|f| f.check == Check::Offsets)
        .unwrap();
    assert!(
        offsets.first.contains("soft-00000.safetensors"),
        "{}",
        offsets.first
    );
    assert!(!report.tokenizer_checked);
    // A reader asking for that sample gets an error naming the shard, not garbage.
    let err = SoftLabels::open(&dir)
        .unwrap()
        .get(&key(0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("soft-00000.safetensors") && err.contains("offsets"),
        "{err}"
    );
}

#[test]
fn unreadable_stores_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let err = SoftLabels::open(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains("manifest.json") && err.contains("no soft labels"),
        "{err}"
    );
    let dir = tmp.path().join("soft");
    let mut w = SoftWriter::create_or_resume(&dir, meta(LogprobDtype::F16)).unwrap();
    w.append(&key(0), &record(0, 2)).unwrap();
    w.finish().unwrap();
    std::fs::write(dir.join("soft-00000.safetensors"), b"not a shard").unwrap();
    let err = SoftLabels::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("soft-00000.safetensors") && err.contains("safetensors"),
        "{err}"
    );
}
