//! `distill serve`: an OpenAI-compatible HTTP server over a local model, so any local model
//! can be a teacher for `distill gen-data` and a student can be tried with the usual clients.
//!
//! Data flow: an HTTP request is parsed and checked ([`api`]) on the async side
//! ([`routes`]), turned into [`engine::Work`] and sent to the one thread that owns the model
//! ([`engine::Engine`]), which batches what is pending and replies through a oneshot channel.
//! The server owns no GPU state outside that thread.

pub mod api;
pub mod engine;
mod error;
mod routes;
pub mod stream;
pub mod tokens;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use distill_hf::tokenizer::TextTokenizer;
use distill_infer::generate::{eos_ids, kv_cache_tokens_holding};
use distill_models::{CausalLm, Kernels};

pub use engine::{Stats, StatsSnapshot};
pub use error::{ApiError, ServeError};

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    /// Most sequences decoded together.
    pub batch_size: usize,
    /// The name clients send as `model` and `/v1/models` lists.
    pub served_model_name: String,
    /// Prompt + completion tokens at most; None: the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    /// GiB the running batch's KV cache may hold; requests beyond it wait, and rows beyond
    /// it are recomputed later ([`distill_infer::generate::BatchLimits`]). None: no limit.
    pub kv_cache_gib: Option<f64>,
    /// After a request arrives at an idle server, how long to wait for others to batch
    /// with it. Short next to a generation, long enough for a client's burst to arrive.
    pub batch_window: Duration,
    /// When set, every endpoint but `/health` requires `Authorization: Bearer KEY`.
    pub api_key: Option<ApiKey>,
}

/// The key clients must send. Its `Debug` shows no part of it, so it stays out of logs.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// None for an empty key, which would let every request through by accident.
    pub fn new(key: impl Into<String>) -> Option<ApiKey> {
        let key = key.into();
        (!key.is_empty()).then_some(ApiKey(key))
    }

    /// Compares in time that depends on the key's length only, not on where a guess
    /// first differs.
    pub fn matches(&self, given: &str) -> bool {
        let (key, given) = (self.0.as_bytes(), given.as_bytes());
        let mut diff = key.len() ^ given.len();
        for (i, &k) in key.iter().enumerate() {
            diff |= usize::from(k ^ given.get(i).copied().unwrap_or(!k));
        }
        std::hint::black_box(diff) == 0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<hidden>)")
    }
}

impl ServeOptions {
    pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(5);
}

/// The server is up: where, and its counters.
#[derive(Debug, Clone)]
pub struct Ready {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    /// Prompt plus completion tokens at most (`--max-model-len`, or the model's limit).
    pub max_model_len: usize,
    /// Positions the KV cache may hold (`--kv-cache-gib`); None: no limit.
    pub kv_cache_tokens: Option<usize>,
}

/// Loads the model in `dir` on `device`, listens, calls `on_ready`, and serves until
/// `shutdown` completes and the requests in flight are answered. The model stays on the
/// calling thread, which runs the engine; HTTP runs on a tokio runtime beside it.
pub fn serve<B: Kernels>(
    dir: &Path,
    options: &ServeOptions,
    device: B::Device,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), ServeError> {
    let tokenizer = Arc::new(TextTokenizer::from_dir(dir)?);
    let vocab = Arc::new(tokens::Vocab::new(&tokenizer));
    // Serving only generates: its decoding copy is the model, held once.
    let model = CausalLm::<B>::load(dir, &device)?.into_decoding();
    let served = served_model(dir, options, &model)?;
    if options.batch_size == 0 {
        return Err(options_error(dir, "the batch size must be at least 1".into()));
    }
    let max_model_len = served.max_model_len;
    let kv_cache_tokens = kv_cache_tokens(dir, options, &model, max_model_len)?;
    let addr = format!("{}:{}", options.host, options.port);
    let listener = std::net::TcpListener::bind(&addr).map_err(|source| ServeError::Bind { addr, source })?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (jobs, queue) = std::sync::mpsc::channel();
    let stats = Arc::new(Stats::default());
    let app = routes::router(routes::Shared {
        jobs,
        tokenizer: tokenizer.clone(),
        vocab,
        served,
        started: routes::unix_now(),
        api_key: options.api_key.clone(),
    });
    // The router holds the only job senders: when the server has stopped and dropped it,
    // the engine's queue closes and the engine returns.
    let server = runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await
    });
    on_ready(&Ready {
        addr: local,
        stats: stats.clone(),
        max_model_len,
        kv_cache_tokens,
    });
    let engine = engine::Engine {
        eos: eos_ids(&model, &tokenizer),
        model,
        tokenizer,
        device,
        batching: engine::Batching {
            batch_size: options.batch_size,
            kv_cache_tokens,
            window: options.batch_window,
        },
        stats,
    };
    engine.run(&queue);
    match runtime.block_on(server) {
        Ok(result) => Ok(result?),
        Err(join) => Err(ServeError::Io(std::io::Error::other(join.to_string()))),
    }
}

fn served_model<B: Kernels>(
    dir: &Path,
    options: &ServeOptions,
    model: &CausalLm<B>,
) -> Result<api::ServedModel, ServeError> {
    let limit = model.config.max_position_embeddings;
    let max_model_len = match options.max_model_len {
        Some(0) => return Err(options_error(dir, "--max-model-len must be at least 1".into())),
        Some(n) if n > limit => {
            return Err(options_error(
                dir,
                format!("--max-model-len {n} is longer than the model's max_position_embeddings ({limit})"),
            ));
        }
        Some(n) => n,
        None => limit,
    };
    Ok(api::ServedModel {
        name: options.served_model_name.clone(),
        max_model_len,
        vocab_size: model.config.vocab_size,
        defaults: generation_defaults(dir)?,
    })
}

/// `--kv-cache-gib` in positions. It must hold one sequence of `max_model_len` (vLLM's rule
/// too): then every request fits alone, and a budget that cannot serve is refused at start.
fn kv_cache_tokens<B: Kernels>(
    dir: &Path,
    options: &ServeOptions,
    model: &CausalLm<B>,
    max_model_len: usize,
) -> Result<Option<usize>, ServeError> {
    let Some(gib) = options.kv_cache_gib else {
        return Ok(None);
    };
    if !(gib.is_finite() && gib > 0.0) {
        return Err(options_error(
            dir,
            format!("--kv-cache-gib {gib} is not a positive size"),
        ));
    }
    kv_cache_tokens_holding(model, gib, max_model_len)
        .map(Some)
        .map_err(|e| {
            options_error(
                dir,
                format!("--kv-cache-gib: {e} (--max-model-len): raise it or lower --max-model-len"),
            )
        })
}

/// The decoding defaults in the model's generation_config.json; none without the file.
fn generation_defaults(dir: &Path) -> Result<api::Defaults, ServeError> {
    let path = dir.join(GENERATION_CONFIG);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(api::Defaults::default()),
        Err(e) => {
            return Err(ServeError::Options {
                path,
                msg: e.to_string(),
            });
        }
    };
    let bad = |msg: String| ServeError::Options {
        path: path.clone(),
        msg,
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let defaults = api::Defaults::from_json(&json).map_err(bad)?;
    if defaults != api::Defaults::default() {
        eprintln!("request defaults from {GENERATION_CONFIG}: {defaults:?}");
    }
    Ok(defaults)
}

const GENERATION_CONFIG: &str = "generation_config.json";

fn options_error(dir: &Path, msg: String) -> ServeError {
    ServeError::Options {
        path: dir.join("config.json"),
        msg,
    }
}

/// A server on its own thread, for tests and for embedding: stopped when dropped.
pub struct Server {
    pub addr: SocketAddr,
    stats: Arc<Stats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Server {
    /// Starts serving `dir` on `B`; returns once it listens.
    pub fn start<B: Kernels>(
        dir: PathBuf,
        options: ServeOptions,
        device: B::Device,
    ) -> Result<Server, ServeError> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let shutdown = async move {
                let _ = stopped.await;
            };
            serve::<B>(&dir, &options, device, shutdown, |ready| {
                let _ = ready_tx.send(ready.clone());
            })
        });
        match ready_rx.recv() {
            Ok(ready) => Ok(Server {
                addr: ready.addr,
                stats: ready.stats,
                stop: Some(stop),
                thread: Some(thread),
            }),
            // It stopped before listening: its error says why.
            Err(_) => Err(match thread.join() {
                Ok(Err(e)) => e,
                Ok(Ok(())) => ServeError::Io(std::io::Error::other("the server stopped before listening")),
                Err(_) => ServeError::Io(std::io::Error::other("the server panicked while starting")),
            }),
        }
    }

    /// The OpenAI base URL, `http://ADDR/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Stops accepting, answers what is in flight, and waits for the model thread.
    pub fn stop(mut self) -> Result<(), ServeError> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(ServeError::Io(std::io::Error::other(
                "the server thread panicked",
            ))),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

#[cfg(test)]
mod tests {
    use super::ApiKey;

    #[test]
    fn api_keys_match_exactly_and_never_show() {
        let key = ApiKey::new("sk-local-123").unwrap();
        assert!(key.matches("sk-local-123"));
        for wrong in ["", "sk-local-12", "sk-local-1234", "sk-local-124", "SK-LOCAL-123"] {
            assert!(!key.matches(wrong), "{wrong:?}");
        }
        assert_eq!(format!("{key:?}"), "ApiKey(<hidden>)");
        assert!(ApiKey::new("").is_none());
    }
}
