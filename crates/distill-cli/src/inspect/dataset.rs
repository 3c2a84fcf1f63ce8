//! `distill inspect DATASET_DIR`: what a gen-data dataset holds, and when it has soft labels,
//! their format, size and a full validation (against the student's tokenizer with --student).

use std::path::Path;

use anyhow::{Context, bail};
use distill_data::shards::{list_shards, scan_jsonl};
use distill_data::soft::{self, ValidationReport, soft_dir, validate};
use distill_hf::hub::{self, HubSettings};
use distill_hf::tokenizer::TextTokenizer;
use serde_json::{Value, json};

/// Whether `text` names a dataset directory (one with samples-*.jsonl) rather than a model.
pub fn is_dataset(text: &str) -> bool {
    let dir = Path::new(text);
    dir.is_dir() && list_shards(dir).is_ok_and(|s| !s.is_empty())
}

#[derive(Default)]
struct Counts {
    shards: usize,
    samples: usize,
    truncated: usize,
    with_reference: usize,
    correct: usize,
}

pub fn run(dir: &Path, student: Option<&str>, as_json: bool) -> anyhow::Result<()> {
    let counts = count_samples(dir)?;
    let teacher = distill_teacher::manifest::Manifest::read(dir)
        .ok()
        .flatten()
        .map(|m| m.teacher.model);
    let report = match soft::SoftManifest::read(&soft_dir(dir))? {
        Some(_) => Some(check_soft(dir, student)?),
        None => None,
    };
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(dir, &counts, teacher.as_deref(), report.as_ref()))?
        );
    } else {
        print!("{}", to_text(dir, &counts, teacher.as_deref(), report.as_ref()));
    }
    if let Some(r) = report.filter(|r| !r.is_ok()) {
        bail!(
            "{}: the soft labels fail validation: {}",
            soft_dir(dir).display(),
            r.errors_line()
        );
    }
    Ok(())
}

fn count_samples(dir: &Path) -> anyhow::Result<Counts> {
    let mut c = Counts::default();
    for shard in list_shards(dir)? {
        c.shards += 1;
        scan_jsonl(&shard, |h: Value| {
            c.samples += 1;
            c.truncated += usize::from(h["truncated"] == true);
            if let Some(ok) = h["correct"].as_bool() {
                c.with_reference += 1;
                c.correct += usize::from(ok);
            }
        })?;
    }
    Ok(c)
}

/// Validates `<dir>/soft`, against the student's tokenizer when one is named.
fn check_soft(dir: &Path, student: Option<&str>) -> anyhow::Result<ValidationReport> {
    let tokenizer = student
        .map(|s| {
            let model = hub::resolve(s, &HubSettings::from_env())?;
            TextTokenizer::from_dir(&model).with_context(|| format!("--student {s}"))
        })
        .transpose()?;
    Ok(validate(
        &soft_dir(dir),
        dir,
        tokenizer.as_ref().map(|t| t.hash.as_str()),
        tokenizer.as_ref().map(TextTokenizer::vocab_size),
    )?)
}

fn to_text(dir: &Path, c: &Counts, teacher: Option<&str>, report: Option<&ValidationReport>) -> String {
    let mut rows = vec![
        ("dataset", dir.display().to_string()),
        (
            "samples",
            format!(
                "{} in {} shard(s); {} truncated; {} of {} with a reference correct",
                c.samples, c.shards, c.truncated, c.correct, c.with_reference
            ),
        ),
    ];
    if let Some(t) = teacher {
        rows.push(("teacher", t.to_string()));
    }
    match report {
        None => rows.push(("soft labels", "none".into())),
        Some(r) => {
            let m = &r.manifest;
            rows.push((
                "soft labels",
                format!(
                    "{}, top-{} {} logprobs at temperature {}",
                    m.source.as_str(),
                    m.k,
                    m.logprob_dtype.as_str(),
                    m.temperature
                ),
            ));
            rows.push((
                "soft tokenizer",
                format!(
                    "{} (sha256 {}, vocab {}){}",
                    m.tokenizer,
                    m.tokenizer_hash,
                    m.vocab_size,
                    if r.tokenizer_checked {
                        ""
                    } else {
                        "; not compared with a student (pass --student MODEL)"
                    }
                ),
            ));
            rows.push((
                "soft size",
                format!(
                    "{} samples labelled, {} positions, {} bytes in {} shard(s): {:.1} bytes/token",
                    r.labelled,
                    r.positions,
                    m.counts.bytes,
                    m.shards.len(),
                    m.bytes_per_token
                ),
            ));
            let verdict = if r.is_ok() { "ok" } else { "FAILED" };
            rows.push(("validation", verdict.into()));
        }
    }
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{k:<16}{v}\n"));
    }
    for f in report.map(|r| r.findings.as_slice()).unwrap_or_default() {
        out.push_str(&format!(
            "  {} {}: first {}\n",
            f.count,
            f.check.describe(),
            f.first
        ));
    }
    out
}

fn to_json(dir: &Path, c: &Counts, teacher: Option<&str>, report: Option<&ValidationReport>) -> Value {
    let soft = report.map(|r| {
        json!({
            "manifest": r.manifest,
            "labelled": r.labelled,
            "positions": r.positions,
            "tokenizer_checked": r.tokenizer_checked,
            "ok": r.is_ok(),
            "findings": r.findings.iter().map(|f| json!({
                "check": format!("{:?}", f.check),
                "error": f.check.is_error(),
                "count": f.count,
                "first": f.first,
            })).collect::<Vec<_>>(),
        })
    });
    json!({
        "dataset": dir,
        "shards": c.shards,
        "samples": c.samples,
        "truncated": c.truncated,
        "with_reference": c.with_reference,
        "correct": c.correct,
        "teacher": teacher,
        "soft_labels": soft,
    })
}
