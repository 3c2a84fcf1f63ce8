//! `[teacher] [data] [gen] [soft_labels]`: where prompts come from, which teacher answers
//! them, how it samples, and what the generation stage writes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::train::BaseQuant;
use super::{Checks, Interval, Recipe};

/// One OpenAI-compatible server of the teacher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// e.g. "https://api.deepseek.com" or "http://gpu-3:8000/v1" (OpenAI-SDK style: the
    /// client appends `/chat/completions`).
    pub base_url: String,
    /// Name of the environment variable holding this endpoint's API key (never the key);
    /// unset: the teacher's `api_key_env`; `""`: send no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeacherSection {
    /// Model name sent in requests, e.g. "deepseek-reasoner".
    pub model: String,
    /// The teacher's OpenAI-compatible base URL; the client appends `/chat/completions`
    /// (vLLM/SGLang/Ollama/llama.cpp: include their `/v1`).
    pub base_url: String,
    /// Name of the environment variable holding the API key (never the key itself); `""`
    /// sends no key (local servers).
    pub api_key_env: Option<String>,
    /// More servers of the same teacher, used beside `base_url`; each request goes to the
    /// one with the least in flight.
    pub endpoints: Vec<Endpoint>,
    /// USD per million prompt tokens (cache misses) and completion tokens, for the budget.
    pub price_prompt_per_m: f64,
    pub price_completion_per_m: f64,
    /// USD per million prompt tokens the server reports as cache hits; unset: priced as
    /// other prompt tokens.
    pub price_cached_prompt_per_m: Option<f64>,
    /// A local teacher (HF dir or org/name) for re-scoring soft labels in-process.
    pub local_model: Option<String>,
    /// How training holds the local teacher's decoder linear layers: `none` (its dtype) or
    /// `nf4` (4.5 bits a weight: a 7B teacher in 5.4 GiB instead of 14.2, its logits those
    /// of the rounded weights).
    pub local_quantize: BaseQuant,
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
            price_cached_prompt_per_m: Some(0.14),
            local_model: None,
            local_quantize: BaseQuant::None,
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
    /// Field holding a reference answer (a worked solution is reduced to its `\boxed{}` or
    /// `#### n` answer); None tries final_answer, reference, answer, solution.
    pub reference_field: Option<String>,
    /// Field holding a stable prompt id; None uses `id` when present, else the position.
    pub id_field: Option<String>,
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
            prompts: "hf:openai/gsm8k:main/train".into(),
            prompt_field: None,
            reference_field: None,
            id_field: None,
            max_prompts: None,
            dataset: PathBuf::from("datasets/default"),
            held_out: 0.02,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenSection {
    /// Samples per prompt (one request each).
    pub n: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// Completion tokens per request, reasoning included.
    pub max_tokens: usize,
    /// Stop sequences (omitted from requests when empty).
    pub stop: Vec<String>,
    /// Sent where set; sample i gets `seed + i` so a prompt's samples differ.
    pub seed: Option<u64>,
    /// Text appended to every prompt (DeepSeek's advice for math).
    pub prompt_suffix: String,
    /// Optional system prompt (DeepSeek advises none for R1).
    pub system_prompt: Option<String>,
    /// Requests in flight at most (lowered while the teacher answers 429).
    pub concurrency: usize,
    /// Seconds a request may take from sending to its whole response.
    pub request_timeout_s: u64,
    /// Retries after the first attempt, for connection errors, timeouts, 408/409/429/5xx.
    pub max_retries: u32,
    /// Exponential backoff between retries: base · 2^(attempt-1), capped, with jitter; a
    /// server's Retry-After takes precedence.
    pub retry_base_delay_s: f64,
    pub retry_max_delay_s: f64,
    /// Ask for a streamed (SSE) response instead of one JSON body.
    pub stream: bool,
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
            retry_base_delay_s: 1.0,
            retry_max_delay_s: 60.0,
            stream: false,
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

impl SoftLabelSource {
    /// The name recipes and soft-label manifests use.
    pub fn as_str(self) -> &'static str {
        match self {
            SoftLabelSource::ApiTopLogprobs => "api-top-logprobs",
            SoftLabelSource::LocalRescore => "local-rescore",
            SoftLabelSource::VllmPromptLogprobs => "vllm-prompt-logprobs",
        }
    }
}

/// How soft-label shards store log-probabilities. f16 keeps 10 mantissa bits (a logprob of
/// -10 to within 0.004); bf16 keeps 7 but the f32 exponent range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogprobDtype {
    F16,
    Bf16,
}

impl LogprobDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            LogprobDtype::F16 => "f16",
            LogprobDtype::Bf16 => "bf16",
        }
    }
}

/// The OpenAI API, vLLM, SGLang, Ollama and llama.cpp return at most this many alternatives
/// per position.
pub const MAX_API_TOP_LOGPROBS: usize = 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SoftLabelSection {
    pub enabled: bool,
    pub source: SoftLabelSource,
    /// Top-k log-probabilities kept per position (APIs give at most 20).
    pub k: usize,
    /// Refuse when more than this share of teacher tokens do not map to student ids.
    pub max_mismatch_rate: f64,
    /// The tokenizer whose ids the soft labels hold (HF dir or org/name[@rev]); unset: the
    /// student's (`[student] model`).
    pub tokenizer: Option<String>,
    /// How shards store log-probabilities.
    pub dtype: LogprobDtype,
}

impl Default for SoftLabelSection {
    fn default() -> Self {
        SoftLabelSection {
            enabled: false,
            source: SoftLabelSource::ApiTopLogprobs,
            k: 20,
            max_mismatch_rate: 0.01,
            tokenizer: None,
            dtype: LogprobDtype::F16,
        }
    }
}

/// Ranges as the OpenAI API, TRL and vLLM take them: counts at least 1, temperature in
/// [0, 2], top_p in (0, 1], prices and delays finite and >= 0, budgets > 0.
pub(super) fn validate(r: &Recipe, c: &mut Checks) {
    let t = &r.teacher;
    for (key, price) in [
        ("teacher.price_prompt_per_m", Some(t.price_prompt_per_m)),
        ("teacher.price_completion_per_m", Some(t.price_completion_per_m)),
        ("teacher.price_cached_prompt_per_m", t.price_cached_prompt_per_m),
    ] {
        if let Some(p) = price {
            c.non_negative(key, p);
        }
    }
    for (key, url) in std::iter::once(("teacher.base_url", &t.base_url))
        .chain(t.endpoints.iter().map(|e| ("teacher.endpoints", &e.base_url)))
    {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            c.fail(key, format!("`{url}` must start with http:// or https://"));
        }
    }
    for (key, env) in t.api_key_env.iter().map(|e| ("teacher.api_key_env", e)).chain(
        t.endpoints
            .iter()
            .filter_map(|e| e.api_key_env.as_ref().map(|env| ("teacher.endpoints", env))),
    ) {
        // "" means: send no key.
        if !env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            c.fail(
                key,
                format!(
                    "`{env}` is not an environment variable name; put the key in a variable and name it here"
                ),
            );
        }
    }

    let d = &r.data;
    c.unset_or_at_least_1("data.max_prompts", d.max_prompts.map(|n| n as u64));
    c.within("data.held_out", d.held_out, Interval::ClosedOpen(0.0, 1.0));

    let g = &r.generation;
    c.at_least_1("gen.n", g.n as u64);
    c.within("gen.temperature", g.temperature, Interval::Closed(0.0, 2.0));
    c.within("gen.top_p", g.top_p, Interval::OpenClosed(0.0, 1.0));
    c.at_least_1("gen.max_tokens", g.max_tokens as u64);
    c.at_least_1("gen.concurrency", g.concurrency as u64);
    c.at_least_1("gen.request_timeout_s", g.request_timeout_s);
    c.non_negative("gen.retry_max_delay_s", g.retry_max_delay_s);
    let (base, max) = (g.retry_base_delay_s, g.retry_max_delay_s);
    if !((0.0..=max.max(0.0)).contains(&base) && base.is_finite()) {
        c.fail(
            "gen.retry_base_delay_s",
            format!("must be in [0, gen.retry_max_delay_s = {max}], got {base}"),
        );
    }
    if let Some(cost) = g.max_cost {
        c.positive("gen.max_cost", cost);
    }
    c.unset_or_at_least_1("gen.max_tokens_total", g.max_tokens_total);

    let soft = &r.soft_labels;
    c.at_least_1("soft_labels.k", soft.k as u64);
    if soft.source == SoftLabelSource::ApiTopLogprobs && soft.k > MAX_API_TOP_LOGPROBS {
        c.fail(
            "soft_labels.k",
            format!(
                "must be at most {MAX_API_TOP_LOGPROBS} with source = \"api-top-logprobs\" (servers return at most {MAX_API_TOP_LOGPROBS} alternatives), got {}",
                soft.k
            ),
        );
    }
    c.within(
        "soft_labels.max_mismatch_rate",
        soft.max_mismatch_rate,
        Interval::UNIT,
    );
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::Recipe;

    fn parse(text: &str) -> Result<Recipe, crate::RecipeError> {
        Recipe::parse(text, Path::new("r.toml"), &[])
    }

    /// recipes/*.toml and the experiments' recipes pass every check.
    #[test]
    fn every_shipped_recipe_loads() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut paths: Vec<_> = std::fs::read_dir(root.join("recipes"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        let n_recipes = paths.len();
        paths.extend(
            std::fs::read_dir(root.join("experiments"))
                .unwrap()
                .map(|e| e.unwrap().path().join("recipe.toml"))
                .filter(|p| p.exists()),
        );
        for path in &paths {
            Recipe::load(path, &[]).unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(n_recipes >= 1, "no recipes in {}", root.join("recipes").display());
    }

    #[test]
    fn generation_fields_are_checked() {
        for (text, want) in [
            (
                "[gen]\nmax_tokens = 0",
                "r.toml:3: gen.max_tokens: must be at least 1",
            ),
            (
                "[gen]\nretry_base_delay_s = 90.0",
                "r.toml:3: gen.retry_base_delay_s",
            ),
            ("[gen]\nmax_cost = 0.0", "r.toml:3: gen.max_cost: must be > 0"),
            (
                "[teacher]\nprice_prompt_per_m = -1.0",
                "r.toml:3: teacher.price_prompt_per_m",
            ),
            (
                "[teacher]\nbase_url = \"api.deepseek.com\"",
                "must start with http://",
            ),
            (
                "[teacher]\napi_key_env = \"sk-abc\"",
                "not an environment variable name",
            ),
            (
                "[soft_labels]\nk = 21",
                "r.toml:3: soft_labels.k: must be at most 20",
            ),
            (
                "[soft_labels]\nmax_mismatch_rate = 1.5",
                "r.toml:3: soft_labels.max_mismatch_rate",
            ),
            ("[soft_labels]\ndtype = \"f32\"", "expected `f16` or `bf16`"),
        ] {
            let err = parse(&format!("name = \"x\"\n{text}\n")).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        let r = parse("name = \"x\"\n[teacher]\napi_key_env = \"\"\n").unwrap();
        assert_eq!(r.teacher.api_key_env.as_deref(), Some(""));
        // Re-scoring locally is not bound by the APIs' 20.
        let r = parse("name = \"x\"\n[soft_labels]\nsource = \"local-rescore\"\nk = 64\ndtype = \"bf16\"\n")
            .unwrap();
        assert_eq!(
            (r.soft_labels.k, r.soft_labels.dtype),
            (64, super::LogprobDtype::Bf16)
        );
    }
}
