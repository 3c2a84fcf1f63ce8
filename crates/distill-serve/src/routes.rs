//! The HTTP side: axum handlers that check a request, hand the model work to the engine
//! thread, await its reply and build the OpenAI response, or stream it ([`crate::stream`]).
//! One log line per request (and one more when a stream ends).

use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request as HttpRequest, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use distill_hf::tokenizer::TextTokenizer;
use distill_infer::generate::{FinishReason, Generation, Request, TokenLogprob};
use distill_infer::reasoning::prompt_opens_think;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::ApiKey;
use crate::api::{
    self, ChatCompletion, ChatRequest, CompletionRequest, ServedModel, TextChoice, TextCompletion, Usage,
};
use crate::engine::{Answer, Params, PositionScore, Work};
use crate::error::ApiError;
use crate::stream::{Chunker, Kind, SseBody, StreamPlan};
use crate::tokens::Vocab;

/// What every handler shares.
pub struct Shared {
    pub jobs: Sender<Work>,
    pub tokenizer: Arc<TextTokenizer>,
    pub vocab: Arc<Vocab>,
    pub served: ServedModel,
    /// Unix seconds the server started: `/v1/models`' `created`.
    pub started: u64,
    pub api_key: Option<ApiKey>,
}

type AppState = Arc<Shared>;

/// The path that answers without a key, for load balancers and scripts.
const HEALTH: &str = "/health";

pub fn router(shared: Shared) -> Router {
    let state = Arc::new(shared);
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route(HEALTH, get(|| async { "ok" }))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// With `--api-key`, every path but the health check needs `Authorization: Bearer KEY`;
/// the answer to a wrong key never repeats what was sent.
async fn authorize(State(s): State<AppState>, request: HttpRequest, next: Next) -> Response {
    let Some(key) = &s.api_key else {
        return next.run(request).await;
    };
    if request.uri().path() == HEALTH {
        return next.run(request).await;
    }
    let sent = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match sent {
        Some(token) if key.matches(token) => next.run(request).await,
        Some(_) => ApiError::unauthorized("Incorrect API key provided.").into_response(),
        None => ApiError::unauthorized(
            "No API key provided: send the header `Authorization: Bearer KEY` with the key this server was started with (--api-key or DISTILL_API_KEY).",
        )
        .into_response(),
    }
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
    match chat_request(&s, &body) {
        Ok(chat) if chat.request.sampling.streaming() => {
            stream_chat(&s, chat).unwrap_or_else(|e| e.into_response())
        }
        Ok(chat) => answer(chat_completion(&s, chat).await),
        Err(e) => e.into_response(),
    }
}

async fn completions(State(s): State<AppState>, body: Bytes) -> Response {
    let request = api::parse_request::<CompletionRequest>(&body);
    match request {
        Ok(request) if request.sampling.streaming() => {
            stream_completion(&s, &request).unwrap_or_else(|e| e.into_response())
        }
        Ok(request) => answer(text_completion(&s, &request).await),
        Err(e) => e.into_response(),
    }
}

/// A chat request, checked and rendered.
struct Chat {
    request: ChatRequest,
    prompt: Vec<u32>,
    params: Params,
    requests: Vec<Request>,
    /// The rendered prompt leaves the model inside `<think>`.
    in_think: bool,
}

fn chat_request(s: &Shared, body: &[u8]) -> Result<Chat, ApiError> {
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
    Ok(Chat {
        request,
        prompt,
        params,
        requests,
        in_think: prompt_opens_think(&text),
    })
}

async fn chat_completion(s: &Shared, chat: Chat) -> Result<(ChatCompletion, Usage), ApiError> {
    let Chat {
        prompt,
        params,
        requests,
        in_think,
        ..
    } = chat;
    let generations = s.generate(requests, params).await?;
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

fn stream_chat(s: &Shared, chat: Chat) -> Result<Response, ApiError> {
    let plan = StreamPlan {
        kind: Kind::Chat {
            prompt_opens_think: chat.in_think,
        },
        id: response_id("chatcmpl"),
        created: unix_now(),
        model: s.served.name.clone(),
        n: chat.requests.len(),
        stop: chat.params.stop.clone(),
        prompt_tokens: chat.prompt.len(),
        include_usage: chat.request.sampling.include_usage(),
        logprobs: chat.params.logprobs.is_some(),
    };
    s.stream(chat.requests, chat.params, plan, "POST /v1/chat/completions")
}

fn stream_completion(s: &Shared, request: &CompletionRequest) -> Result<Response, ApiError> {
    request.check(&s.served)?;
    let (prompt, _) = request.prompt_ids(&s.tokenizer, &s.served)?;
    let plan = request.plan(&prompt, &s.served)?;
    let stream = StreamPlan {
        kind: Kind::Text,
        id: response_id("cmpl"),
        created: unix_now(),
        model: s.served.name.clone(),
        n: plan.requests.len(),
        stop: plan.params.stop.clone(),
        prompt_tokens: prompt.len(),
        include_usage: request.sampling.include_usage(),
        logprobs: false,
    };
    s.stream(plan.requests, plan.params, stream, "POST /v1/completions")
}

async fn text_completion(
    s: &Shared,
    request: &CompletionRequest,
) -> Result<(TextCompletion, Usage), ApiError> {
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
            answer: Answer::Whole(reply),
        })?;
        Ok(answer.await.map_err(|_| model_thread_gone())??)
    }

    /// Queues the requests with a channel for their tokens; the response streams the chunks.
    fn stream(
        &self,
        requests: Vec<Request>,
        params: Params,
        plan: StreamPlan,
        route: &str,
    ) -> Result<Response, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        if params.max_new_tokens == 0 {
            // Nothing to generate: every choice is done at once.
            for index in 0..requests.len() {
                let generation = nothing_generated(None);
                let _ = tx.send(crate::engine::Streamed::Done { index, generation });
            }
        } else {
            self.submit(Work::Generate {
                requests,
                params,
                answer: Answer::Stream(tx),
            })?;
        }
        let chunker = Chunker::new(plan);
        let body = SseBody::new(
            rx,
            chunker,
            self.tokenizer.clone(),
            self.vocab.clone(),
            route.to_string(),
        );
        Ok(body.into_response())
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
