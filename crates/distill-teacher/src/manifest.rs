//! `<dataset>/manifest.json`: what the directory holds and how it was made. Written (atomically)
//! when a run starts (`stop_reason: "running"`) and when it ends; `complete` says whether every
//! planned request has a sample or a recorded failure. A manifest still saying `running` means
//! the last run did not end cleanly (killed); its shards are still good, rerun to finish.
//!
//! A run refuses a directory whose manifest has another format version or other request
//! parameters (model, sampling, system prompt, suffix): the samples would mix two setups.

use std::path::Path;

use serde::{Deserialize, Serialize};

use distill_core::Recipe;

use crate::TeacherError;
use crate::ledger::Ledger;
use crate::now_rfc3339;
use crate::plan::{Job, RequestSetup};
use crate::run::Prices;

pub const FORMAT: &str = "distill-samples";
pub const FORMAT_VERSION: u32 = 1;
pub const FILE: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub tool_version: String,
    /// Every planned request has a sample or a recorded failure.
    pub complete: bool,
    /// Why the last run stopped: finished, max-cost, max-tokens, payment-required, rejected,
    /// interrupted, running.
    pub stop_reason: String,
    pub teacher: TeacherInfo,
    pub request: RequestParams,
    pub prompts: PromptInfo,
    pub counts: Counts,
    pub usage: UsageTotals,
    /// Estimated from the recipe's prices.
    pub cost_usd: f64,
    /// The training filter (see `Sample::keep_for_training`).
    pub filter: Filter,
    pub shards: Vec<String>,
    /// The soft-label store beside the samples, when this run writes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_labels: Option<SoftLabelsInfo>,
    pub recipe_hash: String,
    /// The resolved recipe (TOML).
    pub recipe: String,
    pub updated: String,
}

/// `soft/`: see `distill_data::soft` for its format; its own manifest.json has the details.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoftLabelsInfo {
    /// Relative to the dataset directory.
    pub dir: String,
    pub source: String,
    pub k: usize,
    /// The tokenizer whose ids it holds, and the sha256 of its tokenizer.json.
    pub tokenizer: String,
    pub tokenizer_hash: String,
    pub samples: u64,
    pub tokens: u64,
    pub bytes_per_token: f64,
    /// Share of the teacher's tokens this run that did not carry over to the tokenizer's ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mismatch_rate: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherInfo {
    /// As requested.
    pub model: String,
    /// As servers returned it.
    pub returned_models: Vec<String>,
    pub endpoints: Vec<String>,
}

/// What goes into every request besides the messages: part of every key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestParams {
    pub model: String,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub system_prompt: Option<String>,
    pub prompt_suffix: String,
}

impl From<&RequestSetup> for RequestParams {
    fn from(s: &RequestSetup) -> Self {
        RequestParams {
            model: s.model.clone(),
            temperature: s.sampling.temperature,
            top_p: s.sampling.top_p,
            max_tokens: s.sampling.max_tokens,
            stop: s.sampling.stop.clone(),
            seed: s.sampling.seed,
            system_prompt: s.system_prompt.clone(),
            prompt_suffix: s.prompt_suffix.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptInfo {
    pub source: String,
    /// Distinct prompts planned.
    pub count: usize,
    /// Prompts skipped because an earlier one sends the same messages.
    pub duplicates: usize,
    /// Samples per prompt.
    pub n: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Planned requests (prompts × n).
    pub requests: usize,
    /// Samples in the shards (all runs).
    pub samples: usize,
    /// Requests in errors.jsonl without a sample.
    pub failed: usize,
    /// Planned requests with neither (not sent yet, or lost in flight).
    pub pending: usize,
    pub truncated: usize,
    pub with_reference: usize,
    pub correct: usize,
    /// Samples the training filter keeps.
    pub kept: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageTotals {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    pub keep_truncated: bool,
    pub keep_only_correct: bool,
}

impl Manifest {
    pub fn write(&self, dir: &Path) -> Result<(), TeacherError> {
        let path = dir.join(FILE);
        let mut json = serde_json::to_string_pretty(self).expect("manifest serializes");
        json.push('\n');
        distill_core::fsutil::write_atomic(&path, json.as_bytes()).map_err(TeacherError::io(&path))
    }

    /// The manifest in `dir`, if any.
    pub fn read(dir: &Path) -> Result<Option<Manifest>, TeacherError> {
        let path = dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TeacherError::io(&path)(e)),
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| TeacherError::Manifest {
            path: path.clone(),
            msg: format!(
                "{e}; HINT: move it aside to start this dataset's manifest afresh (the samples stay)"
            ),
        })?;
        let format = v.get("format").and_then(|f| f.as_str()).unwrap_or("");
        let version = v.get("format_version").and_then(|f| f.as_u64()).unwrap_or(0);
        if format != FORMAT || version != u64::from(FORMAT_VERSION) {
            return Err(TeacherError::Manifest {
                path,
                msg: format!(
                    "holds format `{format}` version {version}; this distill writes `{FORMAT}` version {FORMAT_VERSION}. HINT: use another data.dataset directory"
                ),
            });
        }
        serde_json::from_value(v)
            .map(Some)
            .map_err(|e| TeacherError::Manifest {
                path,
                msg: format!(
                    "{e}; HINT: move it aside to start this dataset's manifest afresh (the samples stay)"
                ),
            })
    }

    /// Refuses to add samples made with other request parameters.
    pub fn check_same_requests(&self, dir: &Path, now: &RequestParams) -> Result<(), TeacherError> {
        let was = &self.request;
        let mut diffs = Vec::new();
        let mut cmp = |field: &str, a: String, b: String| {
            if a != b {
                diffs.push(format!("{field} was {a}, is {b}"));
            }
        };
        cmp(
            "teacher.model",
            format!("{:?}", was.model),
            format!("{:?}", now.model),
        );
        cmp(
            "gen.temperature",
            was.temperature.to_string(),
            now.temperature.to_string(),
        );
        cmp("gen.top_p", was.top_p.to_string(), now.top_p.to_string());
        cmp(
            "gen.max_tokens",
            was.max_tokens.to_string(),
            now.max_tokens.to_string(),
        );
        cmp("gen.stop", format!("{:?}", was.stop), format!("{:?}", now.stop));
        cmp("gen.seed", format!("{:?}", was.seed), format!("{:?}", now.seed));
        cmp(
            "gen.system_prompt",
            format!("{:?}", was.system_prompt),
            format!("{:?}", now.system_prompt),
        );
        cmp(
            "gen.prompt_suffix",
            format!("{:?}", was.prompt_suffix),
            format!("{:?}", now.prompt_suffix),
        );
        if diffs.is_empty() {
            return Ok(());
        }
        Err(TeacherError::Manifest {
            path: dir.join(FILE),
            msg: format!(
                "this dataset was generated with other request parameters ({}); HINT: use another data.dataset, or set them back (--set) to continue this one",
                diffs.join("; ")
            ),
        })
    }
}

/// What a gen-data run's manifest records besides the ledger's counts.
pub struct ManifestInfo<'a> {
    pub recipe: &'a Recipe,
    pub params: RequestParams,
    pub endpoints: Vec<String>,
    pub prompts: usize,
    pub duplicates: usize,
    pub prices: Prices,
    /// The soft-label store, when this run writes one.
    pub soft: Option<SoftLabelsInfo>,
}

/// Writes `manifest.json` for the dataset the ledger holds: what was asked, how far it got.
pub fn write_manifest(
    info: &ManifestInfo,
    ledger: &Ledger,
    jobs: &[Job],
    stop_reason: &str,
) -> Result<Manifest, TeacherError> {
    let t = ledger.totals();
    let g = &info.recipe.generation;
    let (mut samples, mut failed) = (0, 0);
    for j in jobs {
        if ledger.is_done(&j.key) {
            samples += 1;
        } else if ledger.is_failed(&j.key) {
            failed += 1;
        }
    }
    let m = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        tool_version: distill_core::TOOL_VERSION.into(),
        complete: samples + failed == jobs.len(),
        stop_reason: stop_reason.into(),
        teacher: TeacherInfo {
            model: info.params.model.clone(),
            returned_models: t.teacher_models.iter().cloned().collect(),
            endpoints: info.endpoints.clone(),
        },
        request: info.params.clone(),
        prompts: PromptInfo {
            source: info.recipe.data.prompts.clone(),
            count: info.prompts,
            duplicates: info.duplicates,
            n: g.n as u32,
        },
        counts: Counts {
            requests: jobs.len(),
            samples: t.samples,
            failed,
            pending: jobs.len() - samples - failed,
            truncated: t.truncated,
            with_reference: t.with_reference,
            correct: t.correct,
            kept: t.kept(g.keep_truncated, g.keep_only_correct),
        },
        usage: UsageTotals {
            prompt_tokens: t.prompt_tokens,
            completion_tokens: t.completion_tokens,
            cached_tokens: t.cached_tokens,
            reasoning_tokens: t.reasoning_tokens,
        },
        cost_usd: (info.prices.cost_of(t) * 1e6).round() / 1e6,
        filter: Filter {
            keep_truncated: g.keep_truncated,
            keep_only_correct: g.keep_only_correct,
        },
        shards: ledger.shard_names()?,
        soft_labels: info.soft.clone(),
        recipe_hash: info.recipe.hash(),
        recipe: info.recipe.to_toml(),
        updated: now_rfc3339(),
    };
    m.write(ledger.dir())?;
    Ok(m)
}
