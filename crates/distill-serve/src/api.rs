//! The OpenAI wire format: request bodies, their checks (each failure names its field), and
//! the response bodies built from generations and prompt scores.
//!
//! Fields follow OpenAI's API reference; extensions follow vLLM (`top_k`, `ignore_eos`,
//! `prompt_logprobs` and `reasoning_content`, which DeepSeek's API also uses for R1's
//! reasoning). Streamed chunks are built in [`crate::stream`].

use distill_infer::generate::{FinishReason, Generation, Request, Sampling, TokenLogprob};
use distill_infer::reasoning;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::{Params, PositionScore};
use crate::error::ApiError;
use distill_hf::tokenizer::TextTokenizer;

use crate::tokens::Vocab;

/// OpenAI's ceiling on `top_logprobs`; vLLM's default too.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most choices one request may ask for.
pub const MAX_N: usize = 128;
/// Log-probabilities below this are sent as it (JSON has no -inf), as vLLM does.
const MIN_LOGPROB: f32 = -9999.0;

/// What the server serves, for checking requests against.
#[derive(Debug, Clone)]
pub struct ServedModel {
    pub name: String,
    /// Prompt plus completion tokens at most.
    pub max_model_len: usize,
    /// The model's vocabulary (logits rows): larger ids in a prompt are refused.
    pub vocab_size: usize,
    /// What a request that leaves a field out gets, from the model's generation_config.json.
    pub defaults: Defaults,
}

/// Decoding defaults from a model's `generation_config.json` (the fields vLLM reads there
/// too): a request's own value wins, then these, then OpenAI's defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Defaults {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// 0 keeps every token.
    pub top_k: Option<usize>,
    /// The completion budget when the request gives none (at most what the context leaves).
    pub max_new_tokens: Option<usize>,
}

impl Defaults {
    /// Reads the fields from generation_config.json's JSON; a value out of range is an error
    /// naming the field.
    pub fn from_json(v: &Value) -> Result<Defaults, String> {
        let number = |field: &str| match v.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("{field} must be a number, not {x}")),
        };
        let temperature = number("temperature")?;
        if temperature.is_some_and(|t| !(t.is_finite() && t >= 0.0)) {
            return Err("temperature must be >= 0".into());
        }
        let top_p = number("top_p")?;
        if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return Err("top_p must be in (0, 1]".into());
        }
        let whole = |field: &str, x: Option<f64>| match x {
            Some(k) if k.fract() != 0.0 || k < 0.0 => Err(format!("{field} must be a whole number >= 0")),
            k => Ok(k.map(|k| k as usize)),
        };
        let top_k = whole("top_k", number("top_k")?)?;
        let max_new_tokens = whole("max_new_tokens", number("max_new_tokens")?)?.filter(|&m| m > 0);
        Ok(Defaults {
            temperature,
            top_p,
            top_k,
            max_new_tokens,
        })
    }
}

impl ServedModel {
    /// An absent `model` means this one, as vLLM allows.
    pub fn check_name(&self, requested: Option<&str>) -> Result<(), ApiError> {
        match requested {
            Some(name) if name != self.name => Err(ApiError::not_found(
                format!(
                    "the model `{name}` does not exist; this server serves `{}`",
                    self.name
                ),
                "model_not_found",
            )),
            _ => Ok(()),
        }
    }

    /// The completion budget: as asked; else generation_config.json's `max_new_tokens`, or
    /// `fallback`, or all the context the prompt leaves, whichever is first (capped at what
    /// the context leaves).
    fn max_new_tokens(
        &self,
        prompt: usize,
        asked: Option<usize>,
        field: &str,
        fallback: Option<usize>,
    ) -> Result<usize, ApiError> {
        let room = self.max_model_len.saturating_sub(prompt);
        match asked {
            Some(m) if prompt + m > self.max_model_len => Err(ApiError::invalid(
                field,
                format!(
                    "this model's context is {} tokens; the prompt has {prompt} and {field} asks for {m} more",
                    self.max_model_len
                ),
            )),
            Some(m) => Ok(m),
            None if room == 0 => Err(ApiError::invalid(
                "messages",
                format!(
                    "the prompt has {prompt} tokens, which fills this model's context of {}",
                    self.max_model_len
                ),
            )),
            None => Ok(self
                .defaults
                .max_new_tokens
                .or(fallback)
                .map_or(room, |m| m.min(room))),
        }
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_list(stop: Option<Stop>) -> Result<Vec<String>, ApiError> {
        let list = match stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if list.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "stop sequences must not be empty"));
        }
        Ok(list)
    }
}

/// A request body of an endpoint; the sampling fields both endpoints share are read from the
/// same JSON object separately (serde's `flatten` would lose the field path of an error).
pub trait WithSampling: DeserializeOwned {
    fn set_sampling(&mut self, s: SamplingFields);
}

/// Reads a request body; an error names the field at fault (`messages[0].content`).
pub fn parse_request<T: WithSampling>(body: &[u8]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("", format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid("", "the body must be a JSON object"));
    }
    let mut request: T = typed(&v)?;
    request.set_sampling(typed(&v)?);
    Ok(request)
}

fn typed<T: DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let inner = e.inner().to_string();
        let path = match e.path().to_string() {
            // A missing field is reported at its parent; name the field itself.
            p if p == "." => inner.split('`').nth(1).unwrap_or("").to_string(),
            p => p,
        };
        let message = if path.is_empty() || inner.contains(&format!("`{path}`")) {
            inner
        } else {
            format!("{path}: {inner}")
        };
        ApiError::invalid(&path, message)
    })
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// vLLM's extension; -1 or 0 keeps every token.
    pub top_k: Option<i64>,
    pub n: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// vLLM's extension: go on past EOS tokens until `max_tokens` or a stop string.
    pub ignore_eos: Option<bool>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub logit_bias: Option<Value>,
    pub tools: Option<Value>,
    pub response_format: Option<Value>,
}

/// `stream_options`; read only with `stream: true`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

impl SamplingFields {
    /// `stream: true`: the answer comes as server-sent events.
    pub fn streaming(&self) -> bool {
        self.stream == Some(true)
    }

    /// `stream_options.include_usage`: a last chunk carries the usage.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    fn sampling(&self, defaults: &Defaults) -> Result<Sampling, ApiError> {
        let temperature = self.temperature.or(defaults.temperature).unwrap_or(1.0);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(ApiError::invalid(
                "temperature",
                "temperature must be a number >= 0",
            ));
        }
        let top_p = self.top_p.or(defaults.top_p).unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid("top_p", "top_p must be in (0, 1]"));
        }
        let default_k = defaults.top_k.map_or(0, |k| k as i64);
        let top_k = match self.top_k.unwrap_or(default_k) {
            -1 | 0 => 0,
            k if k > 0 => k as usize,
            _ => {
                return Err(ApiError::invalid(
                    "top_k",
                    "top_k must be -1, 0 (all tokens) or positive",
                ));
            }
        };
        Ok(Sampling {
            temperature,
            top_p,
            top_k,
        })
    }

    fn n(&self) -> Result<usize, ApiError> {
        match self.n.unwrap_or(1) {
            0 => Err(ApiError::invalid("n", "n must be at least 1")),
            n if n > MAX_N => Err(ApiError::invalid("n", format!("n must be at most {MAX_N}"))),
            n => Ok(n),
        }
    }

    /// Refuses what would silently change the meaning of a request if ignored.
    fn check_unsupported(&self) -> Result<(), ApiError> {
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    name,
                    format!("{name} is not supported (only 0)"),
                ));
            }
        }
        let empty = |v: &Option<Value>| match v {
            None | Some(Value::Null) => true,
            Some(Value::Object(m)) => m.is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            Some(_) => false,
        };
        for (name, v) in [("logit_bias", &self.logit_bias), ("tools", &self.tools)] {
            if !empty(v) {
                return Err(ApiError::invalid(name, format!("{name} is not supported")));
            }
        }
        let format = self.response_format.as_ref().and_then(|f| f.get("type"));
        if !empty(&self.response_format) && format.and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid(
                "response_format",
                "response_format is not supported (only {\"type\": \"text\"})",
            ));
        }
        Ok(())
    }

    /// The `n` requests of one prompt: choice i samples with seed + i, so a seeded request
    /// is reproducible and its choices differ.
    fn requests(&self, prompt: &[u32], n: usize) -> Vec<Request> {
        let base = self.seed.unwrap_or_else(|| fastrand::u64(..));
        (0..n)
            .map(|i| Request {
                prompt: prompt.to_vec(),
                seed: base.wrapping_add(i as u64),
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// /v1/chat/completions

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<usize>,
    #[serde(skip)]
    pub sampling: SamplingFields,
}

impl WithSampling for ChatRequest {
    fn set_sampling(&mut self, s: SamplingFields) {
        self.sampling = s;
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

/// A message's content: text, or a list of parts of which only text parts are supported.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or a list of content parts")]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// A chat request, checked: the messages in the template's form and how to decode.
#[derive(Debug, Clone)]
pub struct ChatPlan {
    pub messages: Vec<distill_hf::template::Message>,
    pub n: usize,
    pub top_logprobs: Option<usize>,
}

impl ChatRequest {
    /// Checks what needs no tokenizer; the prompt length is checked by [`ChatRequest::params`].
    pub fn plan(&self, served: &ServedModel) -> Result<ChatPlan, ApiError> {
        served.check_name(self.model.as_deref())?;
        self.sampling.check_unsupported()?;
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        let messages = self
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| m.to_template(i))
            .collect::<Result<Vec<_>, _>>()?;
        let top_logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (_, Some(k)) if k > MAX_TOP_LOGPROBS => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
                ));
            }
            (false, Some(k)) if k > 0 => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs requires logprobs: true",
                ));
            }
            (true, k) => Some(k.unwrap_or(0)),
            (false, _) => None,
        };
        self.sampling.sampling(&served.defaults)?;
        Ok(ChatPlan {
            messages,
            n: self.sampling.n()?,
            top_logprobs,
        })
    }

    /// The decoding parameters and the `n` requests for a rendered prompt.
    pub fn params(
        &self,
        plan: &ChatPlan,
        prompt: &[u32],
        served: &ServedModel,
    ) -> Result<(Params, Vec<Request>), ApiError> {
        let (field, asked) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        let params = Params {
            max_new_tokens: served.max_new_tokens(prompt.len(), asked, field, None)?,
            sampling: self.sampling.sampling(&served.defaults)?,
            stop: Stop::into_list(self.sampling.stop.clone())?,
            logprobs: plan.top_logprobs,
            ignore_eos: self.sampling.ignore_eos.unwrap_or(false),
        };
        Ok((params, self.sampling.requests(prompt, plan.n)))
    }
}

impl ChatMessage {
    fn to_template(&self, i: usize) -> Result<distill_hf::template::Message, ApiError> {
        let content = match &self.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            let field = format!("messages[{i}].content");
                            let msg = format!("{field}: parts of type `{kind}` are not supported, only text");
                            return Err(ApiError::invalid(&field, msg));
                        }
                    }
                }
                text
            }
        };
        // OpenAI's newer name for the system role; chat templates know `system`.
        let role = if self.role == "developer" {
            "system"
        } else {
            self.role.as_str()
        };
        Ok(distill_hf::template::Message::new(role, content))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, generations: &[Generation]) -> Usage {
        let completion_tokens = generations.iter().map(|g| g.tokens.len()).sum();
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// The assistant message of a generation; for a model that thinks (the prompt opened
/// `<think>` or the output closes one) the reasoning goes to `reasoning_content` and the
/// answer to `content`, as DeepSeek's API sends R1's output. Cut off while thinking, the
/// answer is empty.
pub fn assistant_message(text: &str, prompt_opens_think: bool) -> AssistantMessage {
    let s = reasoning::split(text, prompt_opens_think || text.contains("</think>"));
    let (content, reasoning_content) = match s.reasoning {
        None => (text.to_string(), None),
        Some(r) if s.unclosed => (String::new(), Some(r)),
        Some(r) => (s.answer, Some(r)),
    };
    AssistantMessage {
        role: "assistant",
        content,
        reasoning_content,
    }
}

pub fn chat_logprobs(vocab: &Vocab, logprobs: &[TokenLogprob]) -> ChatLogprobs {
    let top = |id: u32, lp: f32| TopLogprob {
        token: vocab.text(id),
        logprob: finite(lp),
        bytes: vocab.bytes(id).to_vec(),
    };
    ChatLogprobs {
        content: logprobs
            .iter()
            .map(|t| ChatTokenLogprob {
                token: vocab.text(t.token),
                logprob: finite(t.logprob),
                bytes: vocab.bytes(t.token).to_vec(),
                top_logprobs: t.top.iter().map(|&(id, lp)| top(id, lp)).collect(),
            })
            .collect(),
    }
}

fn finite(lp: f32) -> f32 {
    if lp.is_nan() {
        MIN_LOGPROB
    } else {
        lp.max(MIN_LOGPROB)
    }
}

// ---------------------------------------------------------------------------------------
// /v1/completions

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    pub echo: Option<bool>,
    /// Legacy form: how many alternatives per token (the token's own logprob always comes).
    pub logprobs: Option<usize>,
    /// vLLM's extension: score the prompt, this many alternatives per position.
    pub prompt_logprobs: Option<usize>,
    #[serde(skip)]
    pub sampling: SamplingFields,
}

impl WithSampling for CompletionRequest {
    fn set_sampling(&mut self, s: SamplingFields) {
        self.sampling = s;
    }
}

/// `prompt`: text, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or a list of token ids")]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Batch(Vec<Value>),
}

/// OpenAI's legacy default completion length.
const DEFAULT_COMPLETION_TOKENS: usize = 16;

/// A completion request, checked.
#[derive(Debug, Clone)]
pub struct CompletionPlan {
    pub params: Params,
    pub requests: Vec<Request>,
    pub echo: bool,
    pub logprobs: Option<usize>,
    pub prompt_logprobs: Option<usize>,
}

impl CompletionPlan {
    /// Alternatives per prompt position the scoring pass must return, when it must run.
    pub fn score_top(&self) -> Option<usize> {
        let echo_k = self.echo.then_some(self.logprobs).flatten();
        echo_k.into_iter().chain(self.prompt_logprobs).max()
    }
}

impl CompletionRequest {
    pub fn check(&self, served: &ServedModel) -> Result<(), ApiError> {
        served.check_name(self.model.as_deref())?;
        self.sampling.check_unsupported()?;
        for (name, k) in [
            ("logprobs", self.logprobs),
            ("prompt_logprobs", self.prompt_logprobs),
        ] {
            if k.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
                return Err(ApiError::invalid(
                    name,
                    format!("{name} must be between 0 and {MAX_TOP_LOGPROBS}"),
                ));
            }
        }
        if self.sampling.streaming() {
            let scoring = [
                ("echo", self.echo == Some(true)),
                ("logprobs", self.logprobs.is_some()),
                ("prompt_logprobs", self.prompt_logprobs.is_some()),
            ];
            if let Some((name, _)) = scoring.iter().find(|(_, on)| *on) {
                return Err(ApiError::invalid(
                    name,
                    format!(
                        "{name} is not supported with stream: true on /v1/completions; send stream: false"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The prompt's token ids, and its text as echoed back. A text prompt gets the
    /// tokenizer's specials (Llama's BOS), as vLLM encodes it.
    pub fn prompt_ids(
        &self,
        tokenizer: &TextTokenizer,
        served: &ServedModel,
    ) -> Result<(Vec<u32>, String), ApiError> {
        let internal = |e: distill_models::ModelError| ApiError::internal(e.to_string());
        match &self.prompt {
            Prompt::Text(t) => Ok((tokenizer.encode(t, true).map_err(internal)?, t.clone())),
            Prompt::Ids(ids) => {
                if let Some(&id) = ids.iter().find(|&&id| id as usize >= served.vocab_size) {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!(
                            "prompt holds token id {id}, outside the vocabulary ({} ids)",
                            served.vocab_size
                        ),
                    ));
                }
                Ok((ids.clone(), tokenizer.decode(ids, false).map_err(internal)?))
            }
            Prompt::Batch(_) => Err(ApiError::invalid(
                "prompt",
                "prompt must be a string or a list of token ids (send one request per prompt; concurrent requests are batched)",
            )),
        }
    }

    pub fn plan(&self, prompt: &[u32], served: &ServedModel) -> Result<CompletionPlan, ApiError> {
        if prompt.is_empty() {
            return Err(ApiError::invalid("prompt", "prompt is empty"));
        }
        let budget = served.max_new_tokens(
            prompt.len(),
            self.max_tokens,
            "max_tokens",
            Some(DEFAULT_COMPLETION_TOKENS),
        )?;
        let params = Params {
            max_new_tokens: budget,
            sampling: self.sampling.sampling(&served.defaults)?,
            stop: Stop::into_list(self.sampling.stop.clone())?,
            logprobs: self.logprobs,
            ignore_eos: self.sampling.ignore_eos.unwrap_or(false),
        };
        let n = self.sampling.n()?;
        Ok(CompletionPlan {
            params,
            requests: self.sampling.requests(prompt, n),
            echo: self.echo.unwrap_or(false),
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
        })
    }
}

#[derive(Debug, Serialize)]
pub struct TextCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<TextChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub struct TextChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<LegacyLogprobs>,
    pub finish_reason: &'static str,
    /// vLLM's form: null for the first prompt token, then {id: {logprob, rank,
    /// decoded_token}} holding the prompt token and the top alternatives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<Entries<RankedLogprob>>>>,
}

/// A JSON object kept in insertion order whose values serialize as themselves (an f32 as
/// its shortest form, which a `serde_json::Value` would widen to f64 digits).
#[derive(Debug, Clone, PartialEq)]
pub struct Entries<V>(pub Vec<(String, V)>);

impl<V> Entries<V> {
    /// Adds `key` unless present: the first (most likely) entry for a key stays.
    fn add(&mut self, key: String, value: V) {
        if !self.0.iter().any(|(k, _)| *k == key) {
            self.0.push((key, value));
        }
    }
}

impl<V: Serialize> Serialize for Entries<V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// One entry of vLLM's `prompt_logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankedLogprob {
    pub logprob: f32,
    pub rank: usize,
    pub decoded_token: String,
}

/// OpenAI's legacy completions logprobs: parallel lists over the returned tokens.
#[derive(Debug, Default, Serialize)]
pub struct LegacyLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<Entries<f32>>>,
    /// Character offset of each token in the choice's `text`.
    pub text_offset: Vec<usize>,
}

impl LegacyLogprobs {
    /// Appends one token; `scored` is None for the first prompt token, which has no context.
    pub fn push(&mut self, vocab: &Vocab, token: u32, scored: Option<(f32, &[(u32, f32)])>) {
        let offset = match (self.text_offset.last(), self.tokens.last()) {
            (Some(o), Some(t)) => o + t.chars().count(),
            _ => 0,
        };
        self.text_offset.push(offset);
        self.tokens.push(vocab.text(token));
        self.token_logprobs.push(scored.map(|(lp, _)| finite(lp)));
        self.top_logprobs.push(scored.map(|(lp, top)| {
            let mut map = Entries(Vec::with_capacity(top.len() + 1));
            for &(id, l) in top {
                map.add(vocab.text(id), finite(l));
            }
            // The chosen token is always listed, as OpenAI documents (up to logprobs + 1).
            map.add(vocab.text(token), finite(lp));
            map
        }));
    }
}

/// The prompt's tokens with their scores (first token unscored), in the legacy form.
pub fn echo_logprobs(vocab: &Vocab, prompt: &[u32], scores: &[PositionScore], k: usize) -> LegacyLogprobs {
    let mut out = LegacyLogprobs::default();
    out.push(vocab, prompt[0], None);
    for s in scores {
        out.push(vocab, s.token, Some((s.logprob, &s.top[..k.min(s.top.len())])));
    }
    out
}

/// vLLM's `prompt_logprobs` list for a scored prompt.
pub fn prompt_logprobs(
    vocab: &Vocab,
    scores: &[PositionScore],
    k: usize,
) -> Vec<Option<Entries<RankedLogprob>>> {
    let entry = |id: u32, lp: f32, rank: usize| RankedLogprob {
        logprob: finite(lp),
        rank,
        decoded_token: vocab.text(id),
    };
    std::iter::once(None)
        .chain(scores.iter().map(|s| {
            let mut map = Entries(Vec::with_capacity(k + 1));
            map.add(s.token.to_string(), entry(s.token, s.logprob, s.rank));
            for (j, &(id, lp)) in s.top.iter().take(k).enumerate() {
                map.add(id.to_string(), entry(id, lp, j + 1));
            }
            Some(map)
        }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn served() -> ServedModel {
        ServedModel {
            name: "tiny".into(),
            max_model_len: 100,
            vocab_size: 50,
            defaults: Defaults::default(),
        }
    }

    #[test]
    fn generation_config_fills_what_a_request_leaves_out() {
        let defaults = Defaults::from_json(
            &json!({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 30, "do_sample": true}),
        )
        .unwrap();
        let served = ServedModel { defaults, ..served() };
        let req: ChatRequest = parse(json!({"messages": [{"role": "user", "content": "a"}]}));
        let plan = req.plan(&served).unwrap();
        let (p, _) = req.params(&plan, &[1; 10], &served).unwrap();
        assert_eq!(
            (
                p.sampling.temperature,
                p.sampling.top_p,
                p.sampling.top_k,
                p.max_new_tokens
            ),
            (0.6, 0.95, 20, 30)
        );
        // Capped at what the context leaves, not refused: it is a default, not a request.
        assert_eq!(req.params(&plan, &[1; 90], &served).unwrap().0.max_new_tokens, 10);
        // The request's own values win, -1 (all tokens) included.
        let req: ChatRequest = parse(json!({"messages": [{"role": "user", "content": "a"}],
            "temperature": 0, "top_p": 1, "top_k": -1, "max_tokens": 5}));
        let (p, _) = req.params(&plan, &[1; 10], &served).unwrap();
        assert_eq!(
            (
                p.sampling.temperature,
                p.sampling.top_p,
                p.sampling.top_k,
                p.max_new_tokens
            ),
            (0.0, 1.0, 0, 5)
        );
        // Completions: generation_config's budget before the legacy 16.
        let req: CompletionRequest = parse(json!({"prompt": "x"}));
        assert_eq!(req.plan(&[1], &served).unwrap().params.max_new_tokens, 30);
        for (bad, field) in [
            (json!({"temperature": -1}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_k": 2.5}), "top_k"),
            (json!({"max_new_tokens": "many"}), "max_new_tokens"),
        ] {
            let e = Defaults::from_json(&bad).unwrap_err();
            assert!(e.contains(field), "{e}");
        }
        assert_eq!(
            Defaults::from_json(&json!({"bos_token_id": 1})).unwrap(),
            Defaults::default()
        );
    }

    fn parse<T: WithSampling>(body: Value) -> T {
        parse_request(body.to_string().as_bytes()).unwrap()
    }

    fn chat(body: Value) -> Result<ChatPlan, ApiError> {
        parse::<ChatRequest>(body).plan(&served())
    }

    fn param_of(e: ApiError) -> (u16, String) {
        (e.status.as_u16(), e.param.unwrap_or_default())
    }

    #[test]
    fn chat_checks_name_their_field() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            (json!({"messages": msgs, "n": 0}), "n"),
            (json!({"messages": msgs, "n": 1000}), "n"),
            (
                json!({"messages": msgs, "logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (json!({"messages": msgs, "top_logprobs": 2}), "top_logprobs"),
            (json!({"messages": msgs, "temperature": -1}), "temperature"),
            (json!({"messages": msgs, "top_p": 0}), "top_p"),
            (json!({"messages": msgs, "top_k": -3}), "top_k"),
            (
                json!({"messages": msgs, "presence_penalty": 0.5}),
                "presence_penalty",
            ),
            (json!({"messages": msgs, "logit_bias": {"5": 10}}), "logit_bias"),
            (
                json!({"messages": msgs, "tools": [{"type": "function"}]}),
                "tools",
            ),
            (
                json!({"messages": msgs, "response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (json!({"messages": []}), "messages"),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0].content",
            ),
        ];
        for (body, field) in cases {
            let e = chat(body.clone()).unwrap_err();
            assert_eq!(
                param_of(e.clone()),
                (400, field.to_string()),
                "{body}: {}",
                e.message
            );
            assert!(
                e.message.contains(field.split('[').next().unwrap()),
                "{}",
                e.message
            );
        }
        let e = chat(json!({"model": "gpt-4", "messages": msgs})).unwrap_err();
        assert_eq!(e.status.as_u16(), 404);
        assert!(e.message.contains("gpt-4") && e.message.contains("tiny"));
    }

    #[test]
    fn malformed_bodies_name_the_field() {
        let err = |body: &str| {
            let e = parse_request::<ChatRequest>(body.as_bytes()).unwrap_err();
            (e.status.as_u16(), e.param.unwrap_or_default(), e.message)
        };
        let (status, param, msg) = err(r#"{"messages": [{"role": "user", "content": 3}]}"#);
        assert_eq!((status, param.as_str()), (400, "messages[0].content"));
        assert!(msg.contains("a string or a list of content parts"), "{msg}");
        let (_, param, msg) = err(r#"{"messages": [], "n": "two"}"#);
        assert_eq!(param, "n");
        assert!(msg.starts_with("n: invalid type"), "{msg}");
        let (_, param, msg) = err(r#"{"messages": [], "stop": 5}"#);
        assert_eq!(param, "stop");
        assert!(msg.contains("a string or a list of strings"), "{msg}");
        let (_, param, msg) = err(r#"{"model": "m"}"#);
        assert_eq!(
            (param.as_str(), msg.as_str()),
            ("messages", "missing field `messages`")
        );
        assert!(err("{not json").2.contains("not valid JSON"));
        assert!(err("[1]").2.contains("JSON object"));
        // Fields we do not know are ignored, as OpenAI's SDKs send many.
        let ok = parse::<ChatRequest>(
            json!({"messages": [{"role": "user", "content": "a"}], "user": "u",
            "stream_options": {"include_usage": true}, "tools": [], "logit_bias": {}, "response_format": {"type": "text"}}),
        );
        ok.plan(&served()).unwrap();
    }

    #[test]
    fn chat_plans_budget_the_context_and_seed_each_choice() {
        let req: ChatRequest = parse(json!({
            "model": "tiny",
            "messages": [{"role": "developer", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "n": 3, "seed": 7, "stop": "x", "logprobs": true, "max_completion_tokens": 10, "max_tokens": 99
        }));
        let plan = req.plan(&served()).unwrap();
        assert_eq!(plan.messages[0].role, "system");
        assert_eq!(plan.messages[1].content, "ab");
        assert_eq!(plan.top_logprobs, Some(0));
        let (params, requests) = req.params(&plan, &[1; 20], &served()).unwrap();
        assert_eq!(params.max_new_tokens, 10, "max_completion_tokens wins");
        assert_eq!(params.stop, ["x"]);
        assert_eq!(requests.iter().map(|r| r.seed).collect::<Vec<_>>(), [7, 8, 9]);
        // No budget given: what the context leaves; too long a prompt is refused.
        let req: ChatRequest = parse(json!({"messages": [{"role": "user", "content": "a"}]}));
        let plan = req.plan(&served()).unwrap();
        assert_eq!(
            req.params(&plan, &[1; 30], &served()).unwrap().0.max_new_tokens,
            70
        );
        let e = req.params(&plan, &[1; 100], &served()).unwrap_err();
        assert_eq!(param_of(e), (400, "messages".into()));
        let req: ChatRequest =
            parse(json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 90}));
        let e = req.params(&plan, &[1; 30], &served()).unwrap_err();
        assert_eq!(param_of(e.clone()), (400, "max_tokens".into()));
        assert!(
            e.message.contains("100 tokens") && e.message.contains("30"),
            "{}",
            e.message
        );
    }

    #[test]
    fn thinking_output_splits_into_reasoning_and_answer() {
        let m = assistant_message("3+4=7\n</think>\n\nIt is 7.", true);
        assert_eq!(
            (m.content.as_str(), m.reasoning_content.as_deref()),
            ("It is 7.", Some("3+4=7"))
        );
        // The template did not open it, the model did.
        let m = assistant_message("<think>hmm</think>ok", false);
        assert_eq!(
            (m.content.as_str(), m.reasoning_content.as_deref()),
            ("ok", Some("hmm"))
        );
        // Only the close tag: the prompt had opened it without our noticing.
        let m = assistant_message("a</think>b", false);
        assert_eq!(
            (m.content.as_str(), m.reasoning_content.as_deref()),
            ("b", Some("a"))
        );
        // Cut off while thinking: no answer yet.
        let m = assistant_message("still thinking", true);
        assert_eq!(
            (m.content.as_str(), m.reasoning_content.as_deref()),
            ("", Some("still thinking"))
        );
        // No thinking: the text as generated, untrimmed.
        let m = assistant_message(" Paris.\n", false);
        assert_eq!(
            (m.content.as_str(), m.reasoning_content.as_deref()),
            (" Paris.\n", None)
        );
        let v = serde_json::to_value(&m).unwrap();
        assert!(v.get("reasoning_content").is_none());
    }

    fn vocab() -> Vocab {
        Vocab::from_bytes(vec![b"a".to_vec(), b" b".to_vec(), b"c".to_vec(), vec![0xc3]])
    }

    #[test]
    fn legacy_logprobs_list_the_prompt_then_the_completion() {
        let v = vocab();
        let scores = vec![
            PositionScore {
                token: 1,
                logprob: -0.5,
                rank: 1,
                top: vec![(1, -0.5), (2, -1.0)],
            },
            PositionScore {
                token: 2,
                logprob: -3.0,
                rank: 3,
                top: vec![(0, -0.1), (1, -2.0)],
            },
        ];
        let mut lp = echo_logprobs(&v, &[0, 1, 2], &scores, 1);
        lp.push(&v, 3, Some((f32::NEG_INFINITY, &[])));
        assert_eq!(lp.tokens, ["a", " b", "c", "\u{fffd}"]);
        assert_eq!(
            lp.token_logprobs,
            [None, Some(-0.5), Some(-3.0), Some(MIN_LOGPROB)]
        );
        assert_eq!(lp.text_offset, [0, 1, 3, 4]);
        assert!(lp.top_logprobs[0].is_none());
        let json_of = |v: &Option<Entries<f32>>| serde_json::to_string(v).unwrap();
        assert_eq!(json_of(&lp.top_logprobs[1]), r#"{" b":-0.5}"#);
        // k = 1 alternative plus the prompt token itself; f32s in their shortest form.
        assert_eq!(json_of(&lp.top_logprobs[2]), r#"{"a":-0.1,"c":-3.0}"#);

        let pl = prompt_logprobs(&v, &scores, 2);
        assert_eq!(pl.len(), 3);
        assert!(pl[0].is_none());
        assert_eq!(
            serde_json::to_string(&pl[2]).unwrap(),
            r#"{"2":{"logprob":-3.0,"rank":3,"decoded_token":"c"},"0":{"logprob":-0.1,"rank":1,"decoded_token":"a"},"1":{"logprob":-2.0,"rank":2,"decoded_token":" b"}}"#
        );
    }

    #[test]
    fn completion_checks() {
        let check = |body: Value| {
            let req: CompletionRequest = parse(body);
            req.check(&served()).and_then(|_| req.plan(&[1, 2, 3], &served()))
        };
        let e = check(json!({"prompt": "a", "logprobs": 21})).unwrap_err();
        assert_eq!(param_of(e), (400, "logprobs".into()));
        let e = check(json!({"prompt": "a", "prompt_logprobs": 30})).unwrap_err();
        assert_eq!(param_of(e), (400, "prompt_logprobs".into()));
        let plan = check(
            json!({"prompt": [1, 2, 3], "max_tokens": 0, "echo": true, "logprobs": 2, "prompt_logprobs": 5}),
        )
        .unwrap();
        assert_eq!(plan.params.max_new_tokens, 0);
        assert_eq!(plan.score_top(), Some(5));
        let plan = check(json!({"prompt": "x", "logprobs": 3})).unwrap();
        assert_eq!((plan.params.max_new_tokens, plan.score_top()), (16, None));
        let req: CompletionRequest = parse(json!({"prompt": [1, 60]}));
        assert_eq!(
            param_of(req.plan(&[], &served()).unwrap_err()),
            (400, "prompt".into())
        );
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-qwen2");
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        let e = req.prompt_ids(&tok, &served()).unwrap_err();
        assert_eq!(param_of(e.clone()), (400, "prompt".into()));
        assert!(e.message.contains("token id 60"), "{}", e.message);
        let req: CompletionRequest = parse(json!({"prompt": ["a", "b"]}));
        assert_eq!(
            param_of(req.prompt_ids(&tok, &served()).unwrap_err()),
            (400, "prompt".into())
        );
        let req: CompletionRequest = parse(json!({"prompt": [3, 4]}));
        assert_eq!(
            req.prompt_ids(&tok, &served()).unwrap(),
            (vec![3, 4], "!\"".to_string())
        );
    }
}
