//! `[eval]`: held-out scoring of the trained student next to its base model (and the teacher
//! where it can run), used by `distill eval --recipe`.

use serde::{Deserialize, Serialize};

use super::{Checks, Interval, Recipe};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Models to compare besides the trained student, its base and the local teacher: HF dirs
    /// or org/name refs.
    pub models: Vec<String>,
    /// Task sets with references, e.g. ["hf:openai/gsm8k:main/test"].
    pub tasks: Vec<String>,
    /// First N examples of each task set (and of the held-out samples).
    pub max_examples: Option<usize>,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// 0 keeps every token.
    pub top_k: usize,
    /// Samples per prompt (pass@1 is their mean; maj@n their vote).
    pub n: usize,
    pub seed: u64,
    /// Sequences decoded together.
    pub batch_size: usize,
    /// GiB the running batch's KV cache may take (requests wait beyond it; rows that
    /// outgrow it are set aside and recomputed, with unchanged outputs); unset: no limit.
    pub kv_cache_gib: Option<f64>,
    /// Score the held-out teacher samples of `[data] dataset` (NLL, KL, top-1 agreement).
    pub held_out: bool,
    /// Run the behaviour probes (data/probes/probes.jsonl).
    pub probes: bool,
    /// Drop task prompts found among the training prompts (they are reported either way).
    pub exclude_contaminated: bool,
    /// Top-k of a local teacher kept for held-out KL and agreement.
    pub teacher_top_k: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            models: Vec::new(),
            tasks: Vec::new(),
            max_examples: None,
            max_new_tokens: 1024,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            n: 1,
            seed: 0,
            batch_size: 16,
            kv_cache_gib: None,
            held_out: true,
            probes: false,
            exclude_contaminated: false,
            teacher_top_k: 20,
        }
    }
}

/// Sampling ranges as vLLM and transformers' `generate` take them.
pub(super) fn validate(r: &Recipe, c: &mut Checks) {
    let e = &r.eval;
    c.unset_or_at_least_1("eval.max_examples", e.max_examples.map(|n| n as u64));
    c.at_least_1("eval.max_new_tokens", e.max_new_tokens as u64);
    c.within("eval.temperature", e.temperature, Interval::Closed(0.0, 2.0));
    c.within("eval.top_p", e.top_p, Interval::OpenClosed(0.0, 1.0));
    c.at_least_1("eval.n", e.n as u64);
    c.at_least_1("eval.batch_size", e.batch_size as u64);
    if let Some(gib) = e.kv_cache_gib {
        c.positive("eval.kv_cache_gib", gib);
    }
    c.at_least_1("eval.teacher_top_k", e.teacher_top_k as u64);
}
