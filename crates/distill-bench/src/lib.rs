//! `distill bench`: the performance suite of issue #6 on random-init models of real shapes.
//!
//!   B1 gemm      GEMM TFLOP/s on the training shapes (projections, LM head, LoRA), fwd and bwd
//!   B2 loss      the chunked KL + CE loss against a full-logits one: time and peak memory
//!   B3 lora      LoRA distillation step (KL on a top-k teacher + CE): tok/s, MFU, peak memory
//!   B4 full      full fine-tuning step: the same
//!   B5 memory    longest sequence at batch 1 whose peak memory stays under a cap
//!   B6 generate  generation tok/s and its bandwidth limit, at the given batch sizes
//!
//! The parent process plans the cases and runs each one in a child process (the calling
//! binary re-invoked with the same arguments and a hidden `--run-case`), so every case's peak
//! memory is its own and an out-of-memory panic ends only that case. Training cases time
//! [`distill_train::trainer::optimizer_step`], the function `distill train` runs for every
//! step. Rows go to stdout as a table and, with `--json`, to a JSON-lines file that
//! `bench/compare.py` sets beside PyTorch's.
//!
//! The measurements: [`flops`] (the FLOP counts MFU divides by), [`gemm`] (B1), [`loss`] (B2),
//! [`train`] (B3, B4 and B5's probes). The suite around them: `plan` (the cases), `parent`
//! (the child processes, the rows), `envelope` (B5's search), `case` (one case in its
//! process), `watch` (its peak memory), `generate` (B6), `rows` (the table). The caller picks
//! the burn backend: [`run`] takes a function that runs a [`CaseJob`] on the device's backend.

pub mod attention;
pub mod flops;
pub mod gemm;
pub mod loss;
pub mod train;

mod case;
mod envelope;
mod generate;
mod parent;
mod plan;
mod rows;
mod watch;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use burn::tensor::backend::Backend;
use distill_models::DecoderConfig;

pub use case::CaseJob;

/// Prefix of the lines a case process prints its rows on.
const ROW_PREFIX: &str = "distill-bench-row: ";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Benchmarks to run: gemm (B1), attention (B1's attention rows), loss (B2), lora (B3),
    /// full (B4), memory (B5), generate (B6), train (B3 and B4), or B1..B6. Default: all.
    #[arg(value_name = "BENCH")]
    pub(crate) which: Vec<String>,
    /// The same as a comma-separated list, e.g. `--only B1,B3`.
    #[arg(long, value_delimiter = ',')]
    pub(crate) only: Vec<String>,
    /// A directory with a Hugging Face config.json: the model shape (repeatable). Weights are
    /// random (`CausalLm::init`); none are read.
    #[arg(long = "config", value_name = "DIR", required = true)]
    pub(crate) configs: Vec<PathBuf>,
    /// Also write the rows to this file, one JSON object per line.
    #[arg(long, value_name = "FILE")]
    pub(crate) json: Option<PathBuf>,
    /// Rows per step (B1-B4 use batch x seq tokens).
    #[arg(long, default_value_t = 4)]
    pub(crate) batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 2048)]
    pub(crate) seq: usize,
    /// Untimed steps (or calls) before timing: autotuning and allocation happen there.
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: usize,
    /// Timed optimizer steps (B3, B4).
    #[arg(long, default_value_t = 3)]
    pub(crate) steps: usize,
    /// Attention rows: sequence lengths (batch 1, causal, the config's heads).
    #[arg(long, value_delimiter = ',', default_value = "2048,8192,16384,32768")]
    pub(crate) attention_seq: Vec<usize>,
    /// Timed calls per GEMM shape, attention length and loss variant (B1, B2).
    #[arg(long, default_value_t = 10)]
    pub(crate) iters: usize,
    /// LoRA rank on all seven linear layers (alpha = 2r).
    #[arg(long, default_value_t = 16)]
    pub(crate) lora_r: usize,
    /// Teacher top-k of the KL term (kd_ratio 0.5); 0 trains on CE alone.
    #[arg(long, default_value_t = 20)]
    pub(crate) top_k: usize,
    /// Tokens per loss chunk ([loss] chunk_tokens).
    #[arg(long, default_value_t = 1024)]
    pub(crate) chunk_tokens: usize,
    /// With recompute, tokens per MLP chunk ([train] mlp_chunk_tokens; 0: all at once).
    #[arg(long, default_value_t = 8192)]
    pub(crate) mlp_chunk_tokens: usize,
    /// With recompute, park the block inputs in host memory ([train] offload_block_inputs).
    #[arg(long)]
    pub(crate) offload_block_inputs: bool,
    /// Park AdamW's moments in host memory between updates ([train] offload_optimizer).
    #[arg(long)]
    pub(crate) offload_optimizer: bool,
    /// With recompute, keep every N-th block's input ([train] block_inputs_every).
    #[arg(long, default_value_t = 1)]
    pub(crate) block_inputs_every: usize,
    /// Recompute blocks in backward ([train] recompute): on, off, or auto (on above 4B
    /// matmul parameters, as the PyTorch baseline enables gradient checkpointing).
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub(crate) recompute: String,
    /// Matmul peak in TFLOP/s that MFU divides by. Default: measured first, a square bf16
    /// GEMM of --peak-n.
    #[arg(long)]
    pub(crate) peak_tflops: Option<f64>,
    /// Memory bandwidth in GB/s that B6's bandwidth limit divides by (the H100 SXM's
    /// datasheet figure is 3,350). Default: measured in each B6 case, a scale of 512 MiB
    /// (16 MiB on CPU) read and written once.
    #[arg(long)]
    pub(crate) peak_gbps: Option<f64>,
    /// Size of the square GEMM measuring the peak (default 8192 on CUDA, 256 on CPU).
    #[arg(long)]
    pub(crate) peak_n: Option<usize>,
    /// B3/B4/B5: KL from a local teacher (a random model of the student's config, in bf16 or
    /// nf4) instead of synthetic top-k soft labels: the memory of a recipe with [teacher]
    /// local_model.
    #[arg(long, default_value = "off", value_parser = ["off", "bf16", "nf4"])]
    pub(crate) local_teacher: String,
    /// LoRA cases (B3, B5 lora): the frozen base's storage, none (bf16) or nf4 (QLoRA).
    #[arg(long, default_value = "none", value_parser = ["none", "nf4"])]
    pub(crate) quantize: String,
    /// B5: what trains, lora or full.
    #[arg(long, default_value = "lora", value_parser = ["lora", "full"])]
    pub(crate) mem_mode: String,
    /// B5: the memory cap in GiB (process peak, see docs/PERFORMANCE.md).
    #[arg(long, default_value_t = 24.0)]
    pub(crate) mem_cap_gib: f64,
    /// B5: first sequence length tried; doubled until over the cap, then bisected.
    #[arg(long, default_value_t = 2048)]
    pub(crate) mem_start: usize,
    #[arg(long, default_value_t = 65536)]
    pub(crate) mem_max: usize,
    /// B5: the answer's resolution in tokens.
    #[arg(long, default_value_t = 1024)]
    pub(crate) mem_step: usize,
    /// B5: stop probing after this many seconds and report the bracket found so far.
    #[arg(long, default_value_t = 300.0)]
    pub(crate) mem_budget_s: f64,
    /// B6: batch sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub(crate) gen_batch: Vec<usize>,
    /// B6: prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub(crate) prompt_len: usize,
    /// B6: new tokens per sequence (no EOS: every sequence runs to the end).
    #[arg(long, default_value_t = 256)]
    pub(crate) new_tokens: usize,
    /// B6: sample at this temperature over the whole vocabulary (top-p 1, as on-policy
    /// distillation samples) instead of greedy decoding (0).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) gen_temperature: f64,
    /// B6, when sampling: the nucleus (1 keeps every token; R1's evaluations use 0.95).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) gen_top_p: f64,
    /// B6: samples of each prompt (eval's n per problem): batch / this many distinct prompts,
    /// each continued this many times with its own seed (they share one prefill).
    #[arg(long, default_value_t = 1)]
    pub(crate) gen_samples: usize,
    /// B6: the KV cache budget in GiB (`distill serve --kv-cache-gib`): rows beyond it wait
    /// or are set aside and recomputed; the row counts them (`preemptions`).
    #[arg(long)]
    pub(crate) kv_cache_gib: Option<f64>,
    /// B3/B4: also time each phase of the step (inputs, forward, teacher, loss, backward, grad
    /// norm, optimizer), with a device sync after each; the row gets `phases` and the log a line
    /// per phase, with the memory it left in use and the pool's reservation after it in the
    /// first step (CUDA). The syncs slow the step: compare profiled rows with each other.
    #[arg(long)]
    pub(crate) profile: bool,
    /// Internal: run case N of the plan in this process.
    #[arg(long, hide = true)]
    pub(crate) run_case: Option<usize>,
    /// Internal: the sequence length of a B5 probe.
    #[arg(long, hide = true)]
    pub(crate) probe_seq: Option<usize>,
}

/// The device the cases run on, as the caller resolved it; the caller's backend for it runs
/// each case ([`run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

/// The rows one case measured, one JSON object each.
pub type Rows = Vec<serde_json::Value>;

/// `distill bench`. With `--run-case N`, runs case N of the plan in this process: `run_on`
/// runs the [`CaseJob`] on `device`'s backend (the caller's choice, as `--device` says), and
/// the rows go to stdout for the parent. Without it, plans the cases and runs each in a child
/// process: this executable again, with the same arguments and `--run-case`.
pub fn run(
    args: Args,
    device: Device,
    run_on: impl FnOnce(CaseJob) -> anyhow::Result<Rows>,
) -> anyhow::Result<()> {
    let cases = plan::plan(&args)?;
    let configs = args
        .configs
        .iter()
        .map(|dir| DecoderConfig::from_dir(dir).with_context(|| format!("--config {}", dir.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(i) = args.run_case {
        let case = cases
            .get(i)
            .with_context(|| format!("no case {i} in a plan of {}", cases.len()))?;
        return case::run_case(&args, &configs, case, device, run_on);
    }
    parent::Parent::new(args, device)?.run_all(&cases, &configs)
}

fn sync<B: Backend>(device: &B::Device) {
    // A failed sync means the device failed; the next operation reports it with context.
    let _ = B::sync(device);
}

/// Mean seconds per call of `f` over `iters` calls after `warmup` untimed ones, the device
/// synchronised before the clock starts and before it stops.
pub fn time_calls<B: Backend>(device: &B::Device, warmup: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    sync::<B>(device);
    let started = Instant::now();
    for _ in 0..iters {
        f();
    }
    sync::<B>(device);
    started.elapsed().as_secs_f64() / iters.max(1) as f64
}
