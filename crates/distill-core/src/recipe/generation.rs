//! `[teacher] [data] [gen] [soft_labels]`: where prompts come from, which teacher answers
//! them, how it samples, and what the generation stage writes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Invalid, Recipe, RecipeError};

/// One OpenAI-compatible server of the teacher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// e.g. "https://api.deepseek.com" or "http://gpu-3:8000/v1".
    pub base_url: String,
    /// Name of the environment variable holding this endpoint's API key (never the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeacherSection {
    /// Model name sent in requests, e.g. "deepseek-reasoner".
    pub model: String,
    pub base_url: String,
    /// Name of the environment variable holding the API key (never the key itself).
    pub api_key_env: Option<String>,
    /// More servers of the same teacher; requests go to the least loaded.
    pub endpoints: Vec<Endpoint>,
    /// USD per million prompt tokens (cache misses) and completion tokens, for the budget.
    pub price_prompt_per_m: f64,
    pub price_completion_per_m: f64,
    /// A local teacher (HF dir or org/name) for re-scoring soft labels in-process.
    pub local_model: Option<String>,
}

impl Default for TeacherSection {
    fn default() -> Self {
        TeacherSection {
            model: "deepseek-reasoner".into(),
            base_url: "https://api.deepseek.com".into(),
            api_key_env: Some("DEEPSEEK_API_KEY".into()),
            endpoints: Vec::new(),
            price_prompt_per_m: 0.55,
            price_completion_per_m: 2.19,
            local_model: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Prompt source: a JSONL or Parquet file, or an HF dataset ref `hf:org/name[:split]`.
    pub prompts: String,
    /// Field holding the prompt text; None tries prompt, question, problem,
    /// instruction(+input), messages in turn.
    pub prompt_field: Option<String>,
    /// Field holding a reference answer, if any.
    pub reference_field: Option<String>,
    /// Use at most this many prompts (None: all).
    pub max_prompts: Option<usize>,
    /// Directory gen-data writes and train reads (samples-*.jsonl, soft/, manifest.json).
    pub dataset: PathBuf,
    /// Share of prompts held out from training for eval (by prompt, never split across).
    pub held_out: f64,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            prompts: "../shared/data/gsm8k/train.jsonl".into(),
            prompt_field: None,
            reference_field: None,
            max_prompts: None,
            dataset: PathBuf::from("datasets/default"),
            held_out: 0.02,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenSection {
    /// Samples per prompt.
    pub n: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    /// Text appended to every prompt (DeepSeek's advice for math).
    pub prompt_suffix: String,
    /// Optional system prompt (DeepSeek advises none for R1).
    pub system_prompt: Option<String>,
    /// Requests in flight at most.
    pub concurrency: usize,
    pub request_timeout_s: u64,
    pub max_retries: u32,
    /// Stop cleanly once the estimated cost (USD) or total tokens reach these.
    pub max_cost: Option<f64>,
    pub max_tokens_total: Option<u64>,
    /// Keep only samples whose extracted answer matches the reference.
    pub keep_only_correct: bool,
    /// Keep samples cut off by max_tokens (finish_reason = length) in training data.
    pub keep_truncated: bool,
}

impl Default for GenSection {
    fn default() -> Self {
        GenSection {
            n: 1,
            temperature: 0.6,
            top_p: 0.95,
            max_tokens: 8192,
            stop: Vec::new(),
            seed: None,
            prompt_suffix: "\nPlease reason step by step, and put your final answer within \\boxed{}.".into(),
            system_prompt: None,
            concurrency: 16,
            request_timeout_s: 600,
            max_retries: 8,
            max_cost: None,
            max_tokens_total: None,
            keep_only_correct: false,
            keep_truncated: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SoftLabelSource {
    /// `logprobs`/`top_logprobs` returned by the serving API at generation time.
    ApiTopLogprobs,
    /// A local teacher model re-scores existing samples teacher-forced.
    LocalRescore,
    /// vLLM `/v1/completions` with `prompt_logprobs`.
    VllmPromptLogprobs,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SoftLabelSection {
    pub enabled: bool,
    pub source: SoftLabelSource,
    /// Top-k log-probabilities kept per position (APIs give at most 20).
    pub k: usize,
    /// Refuse when more than this share of teacher tokens do not map to student ids.
    pub max_mismatch_rate: f64,
}

impl Default for SoftLabelSection {
    fn default() -> Self {
        SoftLabelSection {
            enabled: false,
            source: SoftLabelSource::ApiTopLogprobs,
            k: 20,
            max_mismatch_rate: 0.01,
        }
    }
}

pub(super) fn validate(r: &Recipe, invalid: &Invalid) -> Result<(), RecipeError> {
    let g = &r.generation;
    if g.n == 0 {
        return Err(invalid("gen", "n", "must be at least 1".into()));
    }
    if !(0.0..=2.0).contains(&g.temperature) {
        return Err(invalid(
            "gen",
            "temperature",
            format!("must be in [0, 2], got {}", g.temperature),
        ));
    }
    if !(g.top_p > 0.0 && g.top_p <= 1.0) {
        return Err(invalid(
            "gen",
            "top_p",
            format!("must be in (0, 1], got {}", g.top_p),
        ));
    }
    if g.concurrency == 0 {
        return Err(invalid("gen", "concurrency", "must be at least 1".into()));
    }
    if !(0.0..1.0).contains(&r.data.held_out) {
        return Err(invalid(
            "data",
            "held_out",
            format!("must be in [0, 1), got {}", r.data.held_out),
        ));
    }
    if r.soft_labels.k == 0 {
        return Err(invalid("soft_labels", "k", "must be at least 1".into()));
    }
    for env in r
        .teacher
        .api_key_env
        .iter()
        .chain(r.teacher.endpoints.iter().filter_map(|e| e.api_key_env.as_ref()))
    {
        if env.is_empty() || !env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(invalid(
                "teacher",
                "api_key_env",
                format!(
                    "`{env}` is not an environment variable name; put the key in a variable and name it here"
                ),
            ));
        }
    }
    Ok(())
}
