//! `[on_policy]`: on-policy distillation. The student samples completions of prompts with its
//! current weights and the teacher grades every sampled token (GKD, Agarwal et al. 2024; TRL's
//! `GKDTrainer`; Thinking Machines' "On-Policy Distillation", 2025).

use serde::{Deserialize, Serialize};

use super::{Checks, Interval, Recipe};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnPolicySection {
    /// Share of optimizer steps trained on the student's own samples (TRL's `lmbda`): 0 trains
    /// on the dataset alone (off-policy), 1 on samples alone, between mixes them step by step.
    pub share: f64,
    /// What is minimised on the student's samples.
    pub divergence: OnPolicyDivergence,
    /// The generalized JSD's interpolation (TRL's `beta`): 0 forward KL, 1 reverse KL.
    pub beta: f64,
    /// Sampling temperature, also dividing both sides' logits in the JSD (as TRL does).
    pub temperature: f64,
    pub top_p: f64,
    /// Longest completion sampled; longer ones are cut (finish reason `length`).
    pub max_new_tokens: usize,
    /// Completions sampled per prompt.
    pub samples_per_prompt: usize,
    /// Where prompts come from: a prompts source as `[data] prompts` takes (a JSONL file or
    /// a Hub dataset, read with `[data]`'s field settings); unset: the prompts of the
    /// training set's samples.
    pub prompts: Option<String>,
    /// Optimizer steps whose samples are generated in one go: larger batches generate
    /// faster, at the price of samples from weights up to this many steps old.
    pub buffer_steps: usize,
    /// Sequences decoded together.
    pub gen_batch: usize,
    /// GiB the sampling batch's KV cache may take beside training's memory (requests wait
    /// beyond it; rows that outgrow it are set aside and recomputed, with unchanged
    /// samples); unset: no limit.
    pub kv_cache_gib: Option<f64>,
    /// Completions cut at max_new_tokens carry no loss.
    pub mask_truncated: bool,
    /// Who grades the student's tokens.
    pub teacher: OnPolicyTeacher,
    /// Log-probabilities a served teacher returns per position, for the JSD over its top-k
    /// plus the rest (`[loss] missing_mass`); vLLM's `--max-logprobs` caps it (20 by default).
    pub top_k: usize,
}

/// Where the teacher that grades on-policy samples runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPolicyTeacher {
    /// `[teacher] local_model`, in this process: the full distribution at every position.
    Local,
    /// `[teacher] base_url` and `model`: a vLLM or SGLang server (or `distill serve`) asked
    /// for `prompt_logprobs` of each sample: its top-k and the sampled token's log-probability.
    Server,
}

/// The loss on the student's samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPolicyDivergence {
    /// Generalized JSD(beta) over the teacher's full distribution at each sampled position.
    Jsd,
    /// log q(x) - log p(x) of each sampled token x as its reward: needs only the teacher's
    /// log-probability of the token itself.
    SampledReverseKl,
}

impl Default for OnPolicySection {
    /// TRL's GKDConfig defaults, except `share` (0: today's off-policy training).
    fn default() -> Self {
        OnPolicySection {
            share: 0.0,
            divergence: OnPolicyDivergence::Jsd,
            beta: 0.5,
            temperature: 0.9,
            top_p: 1.0,
            max_new_tokens: 128,
            samples_per_prompt: 1,
            prompts: None,
            buffer_steps: 1,
            gen_batch: 64,
            kv_cache_gib: None,
            mask_truncated: false,
            teacher: OnPolicyTeacher::Local,
            top_k: 20,
        }
    }
}

impl OnPolicySection {
    pub fn enabled(&self) -> bool {
        self.share > 0.0
    }
}

pub(super) fn validate(r: &Recipe, c: &mut Checks) {
    let o = &r.on_policy;
    c.within("on_policy.share", o.share, Interval::UNIT);
    c.within("on_policy.beta", o.beta, Interval::UNIT);
    c.within(
        "on_policy.temperature",
        o.temperature,
        Interval::OpenClosed(0.0, 2.0),
    );
    c.within("on_policy.top_p", o.top_p, Interval::OpenClosed(0.0, 1.0));
    for (key, n) in [
        ("on_policy.max_new_tokens", o.max_new_tokens),
        ("on_policy.samples_per_prompt", o.samples_per_prompt),
        ("on_policy.buffer_steps", o.buffer_steps),
        ("on_policy.gen_batch", o.gen_batch),
        ("on_policy.top_k", o.top_k),
    ] {
        c.at_least_1(key, n as u64);
    }
    if let Some(gib) = o.kv_cache_gib {
        c.positive("on_policy.kv_cache_gib", gib);
    }
    if !o.enabled() {
        return;
    }
    if o.max_new_tokens >= r.train.seq_len {
        c.fail(
            "on_policy.max_new_tokens",
            format!(
                "must leave room for the prompt in train.seq_len = {}, got {}",
                r.train.seq_len, o.max_new_tokens
            ),
        );
    }
    match o.teacher {
        OnPolicyTeacher::Local if r.teacher.local_model.is_none() => c.fail(
            "on_policy.teacher",
            "is \"local\" and [teacher] local_model is unset: name a model sharing the student's tokenizer, \
             or use teacher = \"server\" with [teacher] base_url"
                .into(),
        ),
        OnPolicyTeacher::Server if r.teacher.base_url.contains("api.deepseek.com") => c.fail(
            "on_policy.teacher",
            format!(
                "is \"server\" and [teacher] base_url is {}: the DeepSeek API returns no log-probabilities \
                 of given text, so it cannot grade the student's tokens; serve the teacher with vLLM or \
                 SGLang (prompt_logprobs) or `distill serve`",
                r.teacher.base_url
            ),
        ),
        OnPolicyTeacher::Server if o.top_k > super::MAX_API_TOP_LOGPROBS => c.fail(
            "on_policy.top_k",
            format!(
                "must be at most {} with a served teacher, got {}",
                super::MAX_API_TOP_LOGPROBS,
                o.top_k
            ),
        ),
        _ => {}
    }
}
