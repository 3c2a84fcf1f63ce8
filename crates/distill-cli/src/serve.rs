//! `distill serve --model M`: an OpenAI-compatible server over a local model, so it can be a
//! gen-data teacher or be tried with any OpenAI client. See docs/serve.md.

use std::path::Path;

use burn::backend::Autodiff;
use burn::tensor::backend::BackendTypes;
use distill_hf::hub::{self, HubSettings};
use distill_models::Kernels;
use distill_serve::{ApiKey, ServeOptions};

use crate::backend::{DeviceArg, Job, run_on};

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory, or `org/name[@revision]` from the Hub.
    #[arg(long)]
    model: String,
    /// Address to listen on; 0.0.0.0 for every interface (set --api-key there).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 picks a free one (the URL printed at start says which).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Most sequences decoded at once; a round takes up to 4x as many, which join the running
    /// batch as rows finish (continuous batching).
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    batch_size: usize,
    /// The name clients send as `model` [default: the model directory's name, or the Hub id]
    #[arg(long)]
    served_model_name: Option<String>,
    /// Prompt plus completion tokens at most [default: the model's max_position_embeddings]
    #[arg(long)]
    max_model_len: Option<usize>,
    /// GiB of GPU memory the running batch's KV cache may take. Requests wait beyond it, and
    /// when running rows outgrow it the last to join are set aside and recomputed later; it
    /// must hold one sequence of --max-model-len [default: no limit: the cache grows with the
    /// batch until memory runs out]
    #[arg(long, value_parser = positive_gib)]
    kv_cache_gib: Option<f64>,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health. Prefer the
    /// environment variable: a flag shows in `ps`
    #[arg(long, env = "DISTILL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

/// A memory size in GiB: a finite number above 0.
pub(crate) fn positive_gib(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("`{s}` is not a size in GiB above 0")),
    }
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a whole number of at least 1")),
    }
}

pub fn run(args: Args, device: Option<DeviceArg>) -> anyhow::Result<()> {
    let dir = hub::resolve(&args.model, &HubSettings::from_env())?;
    let name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_name(&args.model, &dir));
    let options = ServeOptions {
        host: args.host,
        port: args.port,
        batch_size: args.batch_size,
        served_model_name: name,
        max_model_len: args.max_model_len,
        kv_cache_gib: args.kv_cache_gib,
        batch_window: ServeOptions::DEFAULT_BATCH_WINDOW,
        api_key: match args.api_key {
            Some(key) => Some(
                ApiKey::new(key).ok_or_else(|| anyhow::anyhow!("--api-key (or DISTILL_API_KEY) is empty"))?,
            ),
            None => None,
        },
    };
    run_on(DeviceArg::resolve(device), Serve { dir, options })
}

/// The default served name: the Hub id as typed, or the directory's name; for a training
/// export (`checkpoints/RUN/final`, `.../step-N`) with the run's name before it, since
/// "final" alone says nothing.
fn default_name(arg: &str, dir: &Path) -> String {
    if !Path::new(arg).exists() {
        return arg.to_string();
    }
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    match (name(&dir), dir.parent().and_then(name)) {
        (Some(leaf), Some(parent)) if leaf == "final" || leaf.starts_with("step-") => {
            format!("{parent}/{leaf}")
        }
        (Some(leaf), _) => leaf,
        _ => arg.to_string(),
    }
}

struct Serve {
    dir: std::path::PathBuf,
    options: ServeOptions,
}

impl Job for Serve {
    type Output = ();

    fn run<B: Kernels>(self, device: B::Device) -> anyhow::Result<()>
    where
        Autodiff<B>: Kernels + BackendTypes<Device = B::Device>,
    {
        eprintln!("loading {}", self.dir.display());
        let name = self.options.served_model_name.clone();
        // The key itself is never printed: the example reads it from the environment.
        let (keyed, auth) = match self.options.api_key {
            Some(_) => (
                ", API key required",
                " -H \"Authorization: Bearer $DISTILL_API_KEY\"",
            ),
            None => ("", ""),
        };
        distill_serve::serve::<B>(&self.dir, &self.options, device, shutdown_signal(), |ready| {
            let url = format!("http://{}/v1", ready.addr);
            println!("serving `{name}` at {url} (Ctrl-C stops{keyed})");
            println!(
                "  curl {url}/chat/completions -N{auth} -H 'Content-Type: application/json' -d '{{\"model\": \"{name}\", \"stream\": true, \"messages\": [{{\"role\": \"user\", \"content\": \"What is 17 * 23?\"}}]}}'"
            );
            if let Some(positions) = ready.kv_cache_tokens {
                // As vLLM reports it: how many full-length requests the budget holds at once.
                let at_once = positions as f64 / ready.max_model_len as f64;
                println!(
                    "  KV cache: {positions} positions (--kv-cache-gib), {at_once:.1} sequences of --max-model-len {} at once",
                    ready.max_model_len
                );
            }
        })?;
        eprintln!("stopped");
        Ok(())
    }
}

/// Ctrl-C or SIGTERM: stop accepting and answer what is in flight. A second Ctrl-C quits at
/// once, for when a long generation is not worth waiting for.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No handler could be installed: never stop on a signal we cannot see.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    eprintln!("stopping: answering the requests in flight (Ctrl-C again quits at once)");
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
}
