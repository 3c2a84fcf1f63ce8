//! `distill train --recipe R.toml`: KL + CE distillation of the recipe's student.

use std::path::PathBuf;

use anyhow::Context;
use burn::backend::Autodiff;
use burn::tensor::backend::BackendTypes;
use distill_core::Recipe;
use distill_models::Kernels;
use distill_train::trainer::{self, TrainOptions, TrainReport};

use crate::backend::{DeviceArg, Job, run_on};

#[derive(clap::Args)]
pub struct Args {
    /// The experiment's recipe (TOML).
    #[arg(long)]
    recipe: PathBuf,
    /// Override a recipe key, e.g. `--set train.lr=5e-5` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Continue from the newest checkpoint of this run, exactly where it stopped.
    #[arg(long)]
    resume: bool,
    /// Train data-parallel on GPUs 0..N of this machine (CUDA_VISIBLE_DEVICES picks which),
    /// summing gradients through NCCL. A step stays [train] micro_batch x grad_accum rows,
    /// shared among the GPUs, so the run takes the one-GPU steps and resumes on any N.
    #[arg(long, value_name = "N")]
    gpus: Option<usize>,
}

pub fn run(args: Args, device: Option<DeviceArg>) -> anyhow::Result<()> {
    let recipe = Recipe::load(&args.recipe, &args.set)?;
    let report = match args.gpus {
        Some(n) => catch_out_of_memory(|| train_on_gpus(&recipe, args.resume, n, device))?,
        None => {
            let job = TrainJob {
                recipe,
                resume: args.resume,
            };
            catch_out_of_memory(|| run_on(DeviceArg::resolve(device), job))?
        }
    };
    print_summary(&report);
    Ok(())
}

/// `--gpus N`: one worker per GPU, NCCL between them (`distill_train::parallel`).
fn train_on_gpus(
    recipe: &Recipe,
    resume: bool,
    n: usize,
    device: Option<DeviceArg>,
) -> anyhow::Result<TrainReport> {
    if n == 0 {
        anyhow::bail!("--gpus 0: give the number of GPUs to train on (1 or more)");
    }
    let named = match device {
        Some(DeviceArg::Cpu) => Some("cpu".to_string()),
        Some(DeviceArg::Cuda(k)) if k > 0 => Some(format!("cuda:{k}")),
        _ => None,
    };
    if let Some(d) = named {
        anyhow::bail!(
            "--gpus {n} trains on GPUs 0..{n}, not on --device {d}; HINT: pick the GPUs with CUDA_VISIBLE_DEVICES"
        );
    }
    data_parallel_on_cuda(recipe, resume, n)
}

#[cfg(feature = "cuda")]
fn data_parallel_on_cuda(recipe: &Recipe, resume: bool, n: usize) -> anyhow::Result<TrainReport> {
    use burn::backend::cuda::CudaDevice;
    type B = burn::backend::Cuda<half::bf16>;
    let shown =
        distill_kernels::cuda::stream::device_count().map_err(|e| anyhow::anyhow!("--gpus {n}: {e}"))?;
    if shown < n {
        anyhow::bail!(
            "--gpus {n}: this machine shows {shown} CUDA device(s){}",
            std::env::var("CUDA_VISIBLE_DEVICES")
                .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v})"))
                .unwrap_or_default()
        );
    }
    let devices: Vec<CudaDevice> = (0..n).map(CudaDevice::new).collect();
    let members =
        distill_train::nccl::members::<B>(&devices).map_err(|e| anyhow::anyhow!("--gpus {n}: {e}"))?;
    let progress = crate::progress::StageBars::default();
    let opts = TrainOptions {
        resume,
        stop_after: None,
        progress: &progress,
    };
    trainer::train_data_parallel::<B>(recipe, devices, members, &opts).with_context(|| {
        format!(
            "training {} ({}) on {n} GPUs",
            recipe.name,
            recipe.source.display()
        )
    })
}

#[cfg(not(feature = "cuda"))]
fn data_parallel_on_cuda(_: &Recipe, _: bool, n: usize) -> anyhow::Result<TrainReport> {
    anyhow::bail!(
        "--gpus {n}: this distill was built without CUDA; rebuild with `cargo build --release --features cuda`"
    )
}

/// GPU backends panic when an allocation fails; turn that into an error naming the knobs,
/// and let every other panic go on as a bug.
fn catch_out_of_memory<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !is_out_of_memory(panic_text(info.payload())) {
            default_hook(info);
        }
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let _ = std::panic::take_hook();
    match result {
        Ok(r) => r,
        Err(payload) if is_out_of_memory(panic_text(payload.as_ref())) => anyhow::bail!(
            "the GPU ran out of memory; lower [train] micro_batch or seq_len, set [train] recompute = true, \
             enable [lora] (with quantize = \"nf4\" for a 4-bit base), or lower [loss] chunk_tokens \
             (override any with --set section.key=value)"
        ),
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    distill_core::panic_message(payload).unwrap_or_default()
}

fn is_out_of_memory(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "out of memory",
        "out-of-memory",
        "outofmemory",
        "cuda_error_out_of_memory",
    ]
    .iter()
    .any(|k| t.contains(k))
}

struct TrainJob {
    recipe: Recipe,
    resume: bool,
}

impl Job for TrainJob {
    type Output = TrainReport;

    fn run<B: Kernels>(self, device: B::Device) -> anyhow::Result<TrainReport>
    where
        Autodiff<B>: Kernels + BackendTypes<Device = B::Device>,
    {
        let progress = crate::progress::StageBars::default();
        let opts = TrainOptions {
            resume: self.resume,
            stop_after: None,
            progress: &progress,
        };
        trainer::train::<B>(&self.recipe, device, &opts)
            .with_context(|| format!("training {} ({})", self.recipe.name, self.recipe.source.display()))
    }
}

fn print_summary(r: &TrainReport) {
    let s = &r.stats;
    println!(
        "data: {} train / {} held-out samples ({} cut off by max_tokens, {} over seq_len, {} truncated to fit)",
        s.train, s.held_out, s.skipped_truncated_generation, s.skipped_too_long, s.truncated_to_seq_len
    );
    for torn in &s.torn_lines {
        eprintln!(
            "warning: {}: dropped 1 torn last line ({} bytes, a write cut off by a crash); the lines before it trained",
            torn.path.display(),
            torn.bytes
        );
    }
    if let Some(soft) = &r.soft_labels {
        println!(
            "soft labels: {} samples aligned, {} without a record, {} misaligned (those train on CE alone)",
            soft.aligned, soft.missing, soft.unaligned
        );
    }
    if let (Some(first), Some(last)) = (r.losses.first(), r.losses.last()) {
        println!(
            "loss: {first:.4} -> {last:.4} over {} steps ({} skipped as non-finite)",
            r.losses.len(),
            r.skipped_steps
        );
    }
    println!(
        "time: {:.0} s in steps 1-{} (resumed calls included)",
        r.train_seconds, r.steps
    );
    if let Some(op) = &r.on_policy {
        let show = |kl: Option<f64>| kl.map_or("-".to_string(), |kl| format!("{kl:.4}"));
        println!(
            "on-policy: {} of {} steps on the student's samples; held-out reverse KL to the teacher {} -> {}",
            op.steps,
            r.losses.len(),
            show(op.reverse_kl_before),
            show(op.reverse_kl_after)
        );
    }
    if let Some(dir) = &r.checkpoint {
        println!("checkpoint: {}", dir.display());
    }
    if let Some(dir) = &r.export {
        println!("model: {} (Hugging Face format)", dir.display());
    }
    println!(
        "logs: {}  (tensorboard --logdir {})",
        r.run_dir.display(),
        r.run_dir.join("tb").display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_allocation_panics_become_an_error_naming_the_knobs() {
        let err = catch_out_of_memory::<()>(|| {
            panic!("An out-of-memory error happened during launch\nCaused by:\n  cuMemAlloc failed")
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ran out of memory") && err.contains("micro_batch") && err.contains("recompute"),
            "{err}"
        );
        let other = std::panic::catch_unwind(|| catch_out_of_memory::<()>(|| panic!("index out of bounds")));
        assert!(other.is_err(), "other panics are bugs and must not be swallowed");
    }
}
