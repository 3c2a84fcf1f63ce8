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
}

pub fn run(args: Args, device: Option<DeviceArg>) -> anyhow::Result<()> {
    let recipe = Recipe::load(&args.recipe, &args.set)?;
    let job = TrainJob {
        recipe,
        resume: args.resume,
    };
    let report = run_on(DeviceArg::resolve(device), job)?;
    print_summary(&report);
    Ok(())
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
        let opts = TrainOptions {
            resume: self.resume,
            stop_after: None,
            progress: true,
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
    if let (Some(first), Some(last)) = (r.losses.first(), r.losses.last()) {
        println!(
            "loss: {first:.4} -> {last:.4} over {} steps ({} skipped as non-finite)",
            r.losses.len(),
            r.skipped_steps
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
