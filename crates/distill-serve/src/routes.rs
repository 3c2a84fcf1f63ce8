//! The HTTP side: axum handlers that check a request, hand the model work to the engine
//! thread, await its reply and build the OpenAI response. One log line per request.

use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request as HttpRequest, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use distill_hf::tokenizer::TextTokenizer;
use distill_infer::generate::{FinishReason, Generation, Request, TokenLogprob};
use distill_infer::reasoning::prompt_opens_think;
use serde::Serialize;
use serde_json::json;
use tokio::sync::oneshot;

use crate::api::{
    self, ChatCompletion, ChatRequest, CompletionRequest, ServedModel, TextChoice, TextCompletion, Usage,
};
use crate::engine::{Params, PositionScore, Work};
use crate::error::ApiError;
use crate::tokens::Vocab;

/// What every handler shares.
pub struct Shared {
    pub jobs: Sender<Work>,
    pub tokenizer: Arc<TextTokenizer>,
    pub vocab: Vocab,
    pub served: ServedModel,
    /// Unix seconds the server started: `/v1/models`' `created`.
    pub started: u64,
}

type AppState = Arc<Shared>;

pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/health", get(|| async { "ok" }))
        .fallback(not_found)
        .layer(middleware::from_fn(log_request))
        .with_state(Arc::new(shared))
}

/// `METHOD /path STATUS [prompt+completion tokens] SECONDS` on stderr. Never the body: prompts
/// are the users' data.
async fn log_request(request: HttpRequest, next: Next) -> Response {
    let started = Instant::now();
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let response = next.run(request).await;
    let tokens = response
        .extensions()
        .get::<Usage>()
        .map(|u| format!(" {}+{} tokens", u.prompt_tokens, u.completion_tokens))
        .unwrap_or_default();
    eprintln!(
        "{method} {path} {}{tokens} {:.3} s",
        response.status().as_u16(),
        started.elapsed().as_secs_f64()
    );
    response
}

async fn not_found(request: HttpRequest) -> ApiError {
    ApiError::not_found(
        format!(
            "no route {} {}; this server has /v1/models, /v1/chat/completions and /v1/completions",
            request.method(),
            request.uri().path()
        ),
        "not_found",
    )
}

async fn models(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.served.name,
            "object": "model",
            "created": s.started,
            "owned_by": "distill",
            "max_model_len": s.served.max_model_len,
        }]
    }))
}

/// A JSON answer carrying its usage for the request log.
fn answer<T: Serialize>(result: Result<(T, Usage), ApiError>) -> Response {
    match result {
        Ok((body, usage)) => {
            let mut response = Json(body).into_response();
            response.extensions_mut().insert(usage);
            response
        }
        Err(e) => e.into_response(),
    }
}

async fn chat(State(s): State<AppState>, body: Bytes) -> Response {
    answer(chat_completion(&s, &body).await)
}

async fn completions(State(s): State<AppState>, body: Bytes) -> Response {
    answer(text_completion(&s, &body).await)
}

async fn chat_completion(s: &Shared, body: &[u8]) -> Result<(ChatCompletion, Usage), ApiError> {
    let request: ChatRequest = api::parse_request(body)?;
    let plan = request.plan(&s.served)?;
    let template = s.tokenizer.template().map_err(|e| {
        ApiError::invalid(
            "messages",
            format!("{e}; send a raw prompt to /v1/completions instead"),
        )
    })?;
    let text = template
        .render(&plan.messages, true)
        .map_err(|e| ApiError::invalid("messages", format!("the chat template refused the messages: {e}")))?;
    let prompt = s
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let (params, requests) = request.params(&plan, &prompt, &s.served)?;
    let generations = s.generate(requests, params).await?;
    let in_think = prompt_opens_think(&text);
    let choices = generations
        .iter()
        .enumerate()
        .map(|(index, g)| api::ChatChoice {
            index,
            message: api::assistant_message(&g.text, in_think),
            logprobs: g.logprobs.as_deref().map(|lp| api::chat_logprobs(&s.vocab, lp)),
            finish_reason: api::finish_reason(g.finish_reason),
        })
        .collect();
    let usage = Usage::new(prompt.len(), &generations);
    let body = ChatCompletion {
        id: response_id("chatcmpl"),
        object: "chat.completion",
        created: unix_now(),
        model: s.served.name.clone(),
        choices,
        usage,
    };
    Ok((body, usage))
}

async fn text_completion(s: &Shared, body: &[u8]) -> Result<(TextCompletion, Usage), ApiError> {
    let request: CompletionRequest = api::parse_request(body)?;
    request.check(&s.served)?;
    let (prompt, prompt_text) = request.prompt_ids(&s.tokenizer, &s.served)?;
    let plan = request.plan(&prompt, &s.served)?;
    let scoring = async {
        match plan.score_top() {
            Some(k) => s.score(prompt.clone(), k).await.map(Some),
            None => Ok(None),
        }
    };
    let generating = async {
        if plan.params.max_new_tokens == 0 {
            Ok(vec![nothing_generated(plan.logprobs); plan.requests.len()])
        } else {
            s.generate(plan.requests.clone(), plan.params.clone()).await
        }
    };
    let (scores, generations) = tokio::join!(scoring, generating);
    let (scores, generations) = (scores?, generations?);
    let choices = generations
        .iter()
        .enumerate()
        .map(|(index, g)| {
            let text = if plan.echo {
                format!("{prompt_text}{}", g.text)
            } else {
                g.text.clone()
            };
            let logprobs = plan.logprobs.map(|k| {
                let mut lp = match (&scores, plan.echo) {
                    (Some(scores), true) => api::echo_logprobs(&s.vocab, &prompt, scores, k),
                    _ => api::LegacyLogprobs::default(),
                };
                for t in g.logprobs.iter().flatten() {
                    lp.push(&s.vocab, t.token, Some((t.logprob, &t.top)));
                }
                lp
            });
            let prompt_logprobs = plan
                .prompt_logprobs
                .zip(scores.as_deref())
                .map(|(k, scores)| api::prompt_logprobs(&s.vocab, scores, k));
            TextChoice {
                index,
                text,
                logprobs,
                finish_reason: api::finish_reason(g.finish_reason),
                prompt_logprobs,
            }
        })
        .collect();
    let usage = Usage::new(prompt.len(), &generations);
    let body = TextCompletion {
        id: response_id("cmpl"),
        object: "text_completion",
        created: unix_now(),
        model: s.served.name.clone(),
        choices,
        usage,
    };
    Ok((body, usage))
}

/// The answer to `max_tokens: 0` (prompt scoring only).
fn nothing_generated(logprobs: Option<usize>) -> Generation {
    Generation {
        tokens: Vec::new(),
        text: String::new(),
        finish_reason: FinishReason::Length,
        eos: None,
        logprobs: logprobs.map(|_| Vec::<TokenLogprob>::new()),
    }
}

impl Shared {
    async fn generate(&self, requests: Vec<Request>, params: Params) -> Result<Vec<Generation>, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Work::Generate {
            requests,
            params,
            reply,
        })?;
        Ok(answer.await.map_err(|_| model_thread_gone())??)
    }

    async fn score(&self, prompt: Vec<u32>, top: usize) -> Result<Vec<PositionScore>, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Work::Score { prompt, top, reply })?;
        Ok(answer.await.map_err(|_| model_thread_gone())??)
    }

    fn submit(&self, work: Work) -> Result<(), ApiError> {
        self.jobs.send(work).map_err(|_| model_thread_gone())
    }
}

fn model_thread_gone() -> ApiError {
    ApiError::internal("the model thread has stopped; see the server's log")
}

fn response_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
