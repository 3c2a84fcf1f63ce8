//! The generation loop: up to `concurrency` requests at a time (fewer while the teacher
//! answers 429), each to the least busy endpoint, retried with backoff, every result appended
//! to the ledger as it lands, stopping cleanly on the budget, a 402 or an interrupt.
//!
//! Retried (with exponential backoff and jitter, or the server's `Retry-After`): connection
//! errors, timeouts, 408, 409, 429, 5xx, and 2xx bodies that are malformed or carry an
//! `error`. Recorded as failures without retrying: 400, 401, 403, 404, 422 and other 4xx.
//! 402 (insufficient balance) stops the run. `rejection_limit` 401/403/404 in a row with no
//! success between stop it too (a wrong key, model or URL would fail every request).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use distill_core::TokenLogprob;
use distill_data::{ErrorRecord, Sample, answers_match, assistant_turn, extract_answer};
use serde_json::Value;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::api::{self, BodyError, Completion};
use crate::fleet::{Fleet, Health};
use crate::ledger::{Ledger, Totals};
use crate::limiter::Limiter;
use crate::plan::{Job, RequestSetup};
use crate::{ApiKey, TeacherError, now_rfc3339, redact};

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prices {
    pub prompt_per_m: f64,
    /// Prompt tokens served from the server's cache; None prices them as other prompt tokens.
    pub cached_prompt_per_m: Option<f64>,
    pub completion_per_m: f64,
}

impl Prices {
    pub fn cost(&self, prompt: u64, cached: u64, completion: u64) -> f64 {
        let cached = cached.min(prompt);
        let cached_price = self.cached_prompt_per_m.unwrap_or(self.prompt_per_m);
        ((prompt - cached) as f64 * self.prompt_per_m
            + cached as f64 * cached_price
            + completion as f64 * self.completion_per_m)
            / 1e6
    }

    pub fn cost_of(&self, t: &Totals) -> f64 {
        self.cost(t.prompt_tokens, t.cached_tokens, t.completion_tokens)
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub setup: RequestSetup,
    pub stream: bool,
    /// Requests in flight at most.
    pub concurrency: usize,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A longer `Retry-After` is cut to this.
    pub max_retry_after: Duration,
    pub prices: Prices,
    /// Stop once the dataset's estimated cost (all runs) reaches this (USD).
    pub max_cost: Option<f64>,
    /// Stop once the dataset's tokens (prompt + completion, all runs) reach this.
    pub max_tokens: Option<u64>,
    pub rejection_limit: u32,
    /// Ask for the sampled tokens' logprobs and this many alternatives (soft labels).
    pub top_logprobs: Option<usize>,
}

/// Why a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    Finished,
    MaxCost {
        spent: f64,
        limit: f64,
    },
    MaxTokens {
        used: u64,
        limit: u64,
    },
    PaymentRequired {
        endpoint: String,
        message: String,
    },
    Rejected {
        status: u16,
        count: u32,
        endpoint: String,
        message: String,
    },
    Interrupted,
    /// The sample hook refused to go on (e.g. the teacher's tokens do not map to the
    /// student's vocabulary); the message says why and what to do.
    Refused {
        message: String,
    },
}

impl StopReason {
    pub fn tag(&self) -> &'static str {
        match self {
            StopReason::Finished => "finished",
            StopReason::MaxCost { .. } => "max-cost",
            StopReason::MaxTokens { .. } => "max-tokens",
            StopReason::PaymentRequired { .. } => "payment-required",
            StopReason::Rejected { .. } => "rejected",
            StopReason::Interrupted => "interrupted",
            StopReason::Refused { .. } => "refused",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub stop: StopReason,
    /// Requests started this run.
    pub started: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Attempts that were retried.
    pub retries: u64,
    /// Requests given up when the run stopped (sent again next run).
    pub abandoned: usize,
    pub elapsed: Duration,
}

/// What the loop reports as it goes (the CLI draws a progress bar from it).
pub trait Progress: Send + Sync {
    fn sample(&self, _sample: &Sample) {}
    fn failure(&self, _error: &ErrorRecord) {}
    fn retry(&self, _endpoint: &str, _why: &str, _wait: Duration) {}
    fn stopping(&self, _reason: &StopReason, _in_flight: usize) {}
}

/// Sees each finished sample, with the token logprobs its response carried (when asked for),
/// before the ledger records it: gen-data writes soft labels here, so that a sample in the
/// ledger always has them.
pub trait SampleHook: Send {
    /// `Ok(None)`: record the sample. `Ok(Some(why))`: do not record it and stop the run
    /// ([`StopReason::Refused`]). `Err`: the run fails (a disk error).
    fn before_append(
        &mut self,
        sample: &Sample,
        logprobs: Option<&[TokenLogprob]>,
    ) -> Result<Option<String>, TeacherError>;
}

/// No reports.
pub struct Silent;
impl Progress for Silent {}

/// A stop signal shared by the loop, its requests and whoever interrupts it.
#[derive(Debug, Default)]
pub struct Stop {
    flag: AtomicBool,
    notify: Notify,
}

impl Stop {
    pub fn new() -> Arc<Self> {
        Arc::new(Stop::default())
    }

    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

struct Ctx {
    client: reqwest::Client,
    fleet: Arc<Fleet>,
    urls: Vec<String>,
    keys: Vec<ApiKey>,
    limiter: Arc<Limiter>,
    opts: RunOptions,
    stop: Arc<Stop>,
    progress: Arc<dyn Progress>,
}

enum JobResult {
    /// The sample and its response's token logprobs, and the retries it took.
    Done(Box<(Sample, Option<Vec<TokenLogprob>>)>, u32),
    Failed(ErrorRecord, u32),
    Payment {
        endpoint: String,
        message: String,
        retries: u32,
    },
    Abandoned(u32),
}

/// Builds the HTTP client gen-data uses: rustls, HTTP/1.1 or 2, the request timeout.
pub fn http_client(opts: &RunOptions) -> Result<reqwest::Client, TeacherError> {
    reqwest::Client::builder()
        .timeout(opts.request_timeout)
        .connect_timeout(opts.connect_timeout)
        .user_agent(concat!("distill/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| TeacherError::Client(e.to_string()))
}

/// Jobs still to send: those without a sample, and without a recorded failure unless
/// `retry_failed`. Also returns (already done, failed and skipped).
pub fn pending(jobs: Vec<Job>, ledger: &Ledger, retry_failed: bool) -> (Vec<Job>, usize, usize) {
    let (mut done, mut failed) = (0, 0);
    let todo = jobs
        .into_iter()
        .filter(|j| {
            if ledger.is_done(&j.key) {
                done += 1;
                false
            } else if ledger.is_failed(&j.key) && !retry_failed {
                failed += 1;
                false
            } else {
                true
            }
        })
        .collect();
    (todo, done, failed)
}

/// Sends every job not already in the ledger, appending results as they land.
pub async fn run(
    jobs: Vec<Job>,
    fleet: Arc<Fleet>,
    ledger: &mut Ledger,
    opts: &RunOptions,
    progress: Arc<dyn Progress>,
    stop: Arc<Stop>,
) -> Result<Outcome, TeacherError> {
    run_with(jobs, fleet, ledger, opts, progress, stop, None).await
}

/// [`run`], with a hook that sees each sample before it is appended.
pub async fn run_with(
    jobs: Vec<Job>,
    fleet: Arc<Fleet>,
    ledger: &mut Ledger,
    opts: &RunOptions,
    progress: Arc<dyn Progress>,
    stop: Arc<Stop>,
    mut hook: Option<&mut dyn SampleHook>,
) -> Result<Outcome, TeacherError> {
    let t0 = Instant::now();
    let ctx = Arc::new(Ctx {
        client: http_client(opts)?,
        urls: fleet
            .endpoints()
            .iter()
            .map(|e| api::completions_url(&e.base_url))
            .collect(),
        keys: fleet.keys(),
        fleet,
        limiter: Limiter::new(opts.concurrency, Duration::from_secs(2)),
        opts: opts.clone(),
        stop: stop.clone(),
        progress: progress.clone(),
    });
    let mut queue = jobs.into_iter().peekable();
    let mut tasks: JoinSet<JobResult> = JoinSet::new();
    let mut reason: Option<StopReason> = None;
    let mut out = Outcome {
        stop: StopReason::Finished,
        started: 0,
        succeeded: 0,
        failed: 0,
        retries: 0,
        abandoned: 0,
        elapsed: Duration::ZERO,
    };
    let mut rejections = 0u32;

    loop {
        while reason.is_none() && !stop.is_set() && tasks.len() < opts.concurrency.max(1) {
            if queue.peek().is_none() {
                break;
            }
            if let Some(r) = over_budget(ledger.totals(), tasks.len(), opts) {
                progress.stopping(&r, tasks.len());
                reason = Some(r);
                stop.trigger();
                break;
            }
            let job = queue.next().expect("peeked");
            out.started += 1;
            tasks.spawn(send_job(ctx.clone(), job));
        }
        if tasks.is_empty() {
            break;
        }
        let joined = tokio::select! {
            joined = tasks.join_next() => joined,
            _ = stop.wait(), if !stop.is_set() => {
                if reason.is_none() {
                    progress.stopping(&StopReason::Interrupted, tasks.len());
                }
                continue;
            }
        };
        let Some(joined) = joined else { break };
        let result = joined.map_err(|e| TeacherError::Config(format!("a request task failed: {e}")))?;
        match result {
            JobResult::Done(done, retries) => {
                out.retries += u64::from(retries);
                rejections = 0;
                let (sample, logprobs) = *done;
                let refusal = match hook.as_deref_mut() {
                    Some(h) => h.before_append(&sample, logprobs.as_deref())?,
                    None => None,
                };
                if let Some(message) = refusal {
                    out.abandoned += 1;
                    if reason.is_none() {
                        let r = StopReason::Refused { message };
                        progress.stopping(&r, tasks.len());
                        reason = Some(r);
                        stop.trigger();
                    }
                    continue;
                }
                if ledger.append_sample(&sample)? {
                    out.succeeded += 1;
                    progress.sample(&sample);
                }
            }
            JobResult::Failed(error, retries) => {
                out.retries += u64::from(retries);
                out.failed += 1;
                ledger.append_error(&error)?;
                progress.failure(&error);
                if matches!(error.status, Some(401 | 403 | 404)) {
                    rejections += 1;
                    if rejections >= opts.rejection_limit && reason.is_none() {
                        let r = StopReason::Rejected {
                            status: error.status.unwrap_or(0),
                            count: rejections,
                            endpoint: error.endpoint.clone(),
                            message: error.message.clone(),
                        };
                        progress.stopping(&r, tasks.len());
                        reason = Some(r);
                        stop.trigger();
                    }
                }
            }
            JobResult::Payment {
                endpoint,
                message,
                retries,
            } => {
                out.retries += u64::from(retries);
                out.abandoned += 1;
                if reason.is_none() {
                    let r = StopReason::PaymentRequired { endpoint, message };
                    progress.stopping(&r, tasks.len());
                    reason = Some(r);
                    stop.trigger();
                }
            }
            JobResult::Abandoned(retries) => {
                out.retries += u64::from(retries);
                out.abandoned += 1;
            }
        }
    }
    ledger.sync()?;
    out.stop = match reason {
        Some(r) => r,
        None if stop.is_set() => StopReason::Interrupted,
        None => StopReason::Finished,
    };
    out.elapsed = t0.elapsed();
    Ok(out)
}

/// A budget stop, projecting the requests in flight at the average cost so far.
fn over_budget(t: &Totals, in_flight: usize, opts: &RunOptions) -> Option<StopReason> {
    let per = |total: f64| {
        if t.samples == 0 {
            0.0
        } else {
            total / t.samples as f64 * in_flight as f64
        }
    };
    if let Some(limit) = opts.max_cost {
        let spent = opts.prices.cost_of(t);
        if spent + per(spent) >= limit {
            return Some(StopReason::MaxCost { spent, limit });
        }
    }
    if let Some(limit) = opts.max_tokens {
        let used = t.tokens();
        if used as f64 + per(used as f64) >= limit as f64 {
            return Some(StopReason::MaxTokens { used, limit });
        }
    }
    None
}

/// One attempt's result.
enum Attempt {
    Ok(Completion),
    Retry {
        status: Option<u16>,
        message: String,
        retry_after: Option<Duration>,
        rate_limited: bool,
        health: Health,
    },
    Fail {
        status: u16,
        message: String,
    },
    Payment(String),
}

async fn send_job(ctx: Arc<Ctx>, job: Job) -> JobResult {
    let opts = &ctx.opts;
    let mut body = api::request_body(
        &opts.setup.model,
        &job.messages,
        &opts.setup.sampling,
        job.sample_index,
        opts.stream,
    );
    if let Some(k) = opts.top_logprobs {
        api::request_logprobs(&mut body, k);
    }
    let mut attempts = 0u32;
    loop {
        if ctx.stop.is_set() {
            return JobResult::Abandoned(attempts.saturating_sub(1));
        }
        let permit = tokio::select! {
            p = ctx.limiter.acquire() => p,
            _ = ctx.stop.wait() => return JobResult::Abandoned(attempts.saturating_sub(1)),
        };
        let ep = tokio::select! {
            e = ctx.fleet.acquire() => e,
            _ = ctx.stop.wait() => return JobResult::Abandoned(attempts.saturating_sub(1)),
        };
        attempts += 1;
        let spec = &ctx.fleet.endpoints()[ep];
        let endpoint = spec.base_url.clone();
        let started = Instant::now();
        let result = attempt(&ctx, &ctx.urls[ep], spec.api_key.as_ref(), &body).await;
        let latency = started.elapsed();
        drop(permit);
        let retries = attempts - 1;
        let error = |status: Option<u16>, message: String| ErrorRecord {
            key: job.key.clone(),
            prompt_id: job.prompt_id.clone(),
            sample_index: job.sample_index,
            status,
            message,
            attempts,
            endpoint: endpoint.clone(),
            timestamp: now_rfc3339(),
        };
        match result {
            Attempt::Ok(mut c) => {
                ctx.fleet.release(ep, Health::Ok);
                ctx.limiter.on_success();
                let logprobs = c.logprobs.take();
                let sample = make_sample(&job, c, endpoint, latency, attempts);
                return JobResult::Done(Box::new((sample, logprobs)), retries);
            }
            Attempt::Payment(message) => {
                ctx.fleet.release(ep, Health::Alive);
                return JobResult::Payment {
                    endpoint,
                    message,
                    retries,
                };
            }
            Attempt::Fail { status, message } => {
                ctx.fleet.release(ep, Health::Alive);
                return JobResult::Failed(error(Some(status), message), retries);
            }
            Attempt::Retry {
                status,
                message,
                retry_after,
                rate_limited,
                health,
            } => {
                ctx.fleet.release(ep, health);
                if rate_limited {
                    ctx.limiter.on_rate_limited();
                }
                if attempts > opts.max_retries {
                    let message = format!("gave up after {attempts} attempts: {message}");
                    return JobResult::Failed(error(status, message), retries);
                }
                let wait = match retry_after {
                    Some(d) => d.min(opts.max_retry_after).mul_f64(1.0 + 0.1 * fastrand::f64()),
                    None => backoff(opts.backoff_base, opts.backoff_max, attempts),
                };
                ctx.progress.retry(&endpoint, &message, wait);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = ctx.stop.wait() => return JobResult::Abandoned(retries),
                }
            }
        }
    }
}

/// Exponential backoff with jitter: base·2^(attempt-1) capped at `max`, times [0.5, 1).
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    exp.min(max).mul_f64(0.5 + 0.5 * fastrand::f64())
}

async fn attempt(ctx: &Ctx, url: &str, key: Option<&ApiKey>, body: &Value) -> Attempt {
    let redact = |s: String| redact(&s, &ctx.keys);
    let mut req = ctx
        .client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(body).expect("request bodies serialize"));
    if let Some(k) = key {
        req = req.bearer_auth(k.expose());
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            return Attempt::Retry {
                status: None,
                message: redact(describe(&e, ctx.opts.request_timeout)),
                retry_after: None,
                rate_limited: false,
                health: Health::Fault,
            };
        }
    };
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let text = match resp.text().await {
        Ok(t) => t,
        Err(e) => {
            return Attempt::Retry {
                status: Some(status),
                message: redact(format!(
                    "reading the response: {}",
                    describe(&e, ctx.opts.request_timeout)
                )),
                retry_after: None,
                rate_limited: false,
                health: Health::Fault,
            };
        }
    };
    let retry = |message: String, rate_limited, health| Attempt::Retry {
        status: Some(status),
        message: redact(message),
        retry_after,
        rate_limited,
        health,
    };
    match status {
        200..=299 => match api::parse_body(&text) {
            Ok(c) => Attempt::Ok(c),
            Err(e @ (BodyError::Malformed(_) | BodyError::Server(_))) => {
                retry(e.to_string(), false, Health::Fault)
            }
        },
        402 => Attempt::Payment(redact(format!("402 {}", api::error_body_text(&text)))),
        429 => retry(
            format!("429 {}", api::error_body_text(&text)),
            true,
            Health::Alive,
        ),
        408 | 409 => retry(
            format!("{status} {}", api::error_body_text(&text)),
            false,
            Health::Alive,
        ),
        500..=599 => retry(
            format!("{status} {}", api::error_body_text(&text)),
            false,
            Health::Fault,
        ),
        _ => Attempt::Fail {
            status,
            message: redact(format!("{status} {}", api::error_body_text(&text))),
        },
    }
}

/// A transport error in one line, without the URL's query or any header.
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!(
            "no complete response within {}s (gen.request_timeout_s)",
            timeout.as_secs()
        );
    }
    let mut msg = if e.is_connect() {
        "cannot connect".to_string()
    } else if e.is_body() || e.is_decode() {
        "the response body broke off".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// `Retry-After`: seconds, or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn make_sample(job: &Job, c: Completion, endpoint: String, latency: Duration, attempts: u32) -> Sample {
    let mut messages = (*job.messages).clone();
    messages.push(distill_data::Message::new(
        "assistant",
        assistant_turn(c.reasoning.as_deref(), &c.answer),
    ));
    let extracted = extract_answer(&c.answer).map(|a| a.text);
    let correct = job
        .reference
        .as_deref()
        .map(|r| extracted.as_deref().is_some_and(|e| answers_match(e, r)));
    Sample {
        key: job.key.clone(),
        prompt_id: job.prompt_id.clone(),
        sample_index: job.sample_index,
        messages,
        truncated: c.finish_reason == "length",
        reasoning: c.reasoning.unwrap_or_default(),
        answer: c.answer,
        finish_reason: c.finish_reason,
        usage: c.usage,
        teacher_model: c.model,
        endpoint,
        latency_s: (latency.as_secs_f64() * 1000.0).round() / 1000.0,
        attempts,
        timestamp: now_rfc3339(),
        reference: job.reference.as_deref().map(str::to_string),
        extracted,
        correct,
    }
}

#[cfg(test)]
mod tests;
