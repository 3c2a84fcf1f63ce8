//! The training loop. One optimizer step = `grad_accum` micro-batches of `micro_batch` packed
//! rows. Each micro-batch runs the model block by block:
//!
//!   forward  (no graph)  x0 = embed(ids); x[i+1] = layer_i(x[i])      keep only x[i]
//!   head     (graph)     h = norm(x[L]); chunked loss -> dL/dh         per-chunk backward
//!   backward (graph)     for i = L-1..0: recompute layer_i from x[i], backprop dL/dx[i+1]
//!
//! so activation memory is one block's worth plus the block inputs (recompute per block),
//! and at most a [chunk, vocab] block of logits exists. Gradients reach the parameters of
//! each segment through `sum(y * g)`, whose gradient w.r.t. y is g. With `recompute = false`
//! the forward keeps each block's graph instead of recomputing it.

mod offload;
mod run;
mod step;
mod teacher;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::tensor::backend::BackendTypes;
use distill_core::Recipe;
use distill_core::progress::Progress;
use distill_data::examples as data;
use distill_models::Kernels;

use crate::checkpoint;
use crate::on_policy::OnPolicyReport;
use crate::parallel::{Collective, Solo};
use crate::soft::{SoftStats, SoftTargetError};
use run::Run;

#[cfg(test)]
pub(crate) use step::batch_tensors;
pub(crate) use step::mean_loss;
pub use step::{PHASES, PhaseHook, StepOutcome, new_optimizer, no_phases, optimizer_step, trainable_student};
pub use teacher::Teacher;
#[cfg(test)]
pub(crate) use teacher::teacher_targets;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] distill_models::ModelError),
    #[error(transparent)]
    Data(#[from] data::ExampleError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Tensorboard(#[from] crate::tensorboard::TbError),
    #[error(transparent)]
    SoftLabels(#[from] SoftTargetError),
    #[error("{0}")]
    Refused(String),
    /// A block input parked in host memory could not be copied out or back
    /// (`train.offload_block_inputs`).
    #[error("train.offload_block_inputs: {0}")]
    Offload(String),
    /// A data-parallel worker could not sum with the others (one of them stopped).
    #[error(transparent)]
    Parallel(#[from] crate::parallel::CollectiveError),
    /// The optimizer's update could not be applied (its parked moments, or the workers).
    #[error(transparent)]
    Optim(#[from] crate::optim::OptimError),
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub steps: usize,
    pub total_steps: usize,
    /// Mean loss per optimizer step, in order (resumed runs report the steps they ran).
    pub losses: Vec<f64>,
    pub skipped_steps: usize,
    pub checkpoint: Option<PathBuf>,
    pub export: Option<PathBuf>,
    pub run_dir: PathBuf,
    pub stats: data::DataStats,
    /// How many samples found usable stored soft labels, when training on them.
    pub soft_labels: Option<SoftStats>,
    /// What on-policy distillation did, when `[on_policy] share` > 0.
    pub on_policy: Option<OnPolicyReport>,
    /// Wall-clock seconds of the run's steps so far, resumed calls included
    /// ([`crate::checkpoint::TrainState::train_seconds`]).
    pub train_seconds: f64,
}

pub struct TrainOptions<'a> {
    pub resume: bool,
    /// Stop after this many optimizer steps in this invocation (tests use it to interrupt).
    pub stop_after: Option<usize>,
    /// Where the steps are reported: one stage of `total_steps`, a message per step (the
    /// loss, the on-policy phase). The CLI draws a bar; tests pass `Silent`.
    pub progress: &'a dyn Progress,
}

/// Where a run writes: `<train.out>/<name>/` for checkpoints and the export,
/// `<train.out>/<name>/runs/` for logs.
pub fn run_root(recipe: &Recipe) -> PathBuf {
    recipe.train.out.join(&recipe.name)
}

/// What `train` checks before any work, so that nothing of an earlier run is touched by
/// mistake: a fresh run needs an empty (or absent) run directory; `resume` needs a
/// checkpoint there, saved with this recipe up to the keys in
/// [`checkpoint::RESUME_MAY_CHANGE`]. Returns the checkpoint to resume from.
pub fn check_run_dir(recipe: &Recipe, resume: bool) -> Result<Option<PathBuf>, TrainError> {
    let root = run_root(recipe);
    let mut found: Vec<String> = match std::fs::read_dir(&root) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| {
                let dir = e.file_type().is_ok_and(|t| t.is_dir());
                format!(
                    "{}{}",
                    e.file_name().to_string_lossy(),
                    if dir { "/" } else { "" }
                )
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => return Err(checkpoint::CheckpointError::Io { path: root, error }.into()),
    };
    found.sort();
    let elsewhere = format!(
        "start a fresh run elsewhere with --set name=<new name> or --set train.out=<another dir> (now {})",
        recipe.train.out.display()
    );
    let latest = checkpoint::list(&root).pop();
    match (resume, latest) {
        (false, _) if found.is_empty() => Ok(None),
        (false, latest) => Err(TrainError::Refused(format!(
            "{} already holds a run ({}); a new run would overwrite its checkpoints and logs. HINT: {}",
            root.display(),
            found.join(", "),
            match latest {
                Some(_) => format!("continue it with --resume, or {elsewhere}"),
                None => format!("it has no checkpoint to resume; move it aside, or {elsewhere}"),
            }
        ))),
        (true, None) => Err(TrainError::Refused(format!(
            "--resume: no checkpoint (step-N/ with {}) in {} ({}); HINT: {}",
            checkpoint::STATE,
            root.display(),
            if found.is_empty() {
                "nothing has been saved there".to_string()
            } else {
                format!("it holds {}", found.join(", "))
            },
            if found.is_empty() {
                "run without --resume to start training".to_string()
            } else {
                format!("move it aside and run without --resume, or {elsewhere}")
            }
        ))),
        (true, Some((_, dir))) => {
            checkpoint::check_same_recipe(&dir, recipe)?;
            Ok(Some(dir))
        }
    }
}

pub(crate) type Ad<B> = Autodiff<B>;

/// Trains the recipe's student: setup (or resume), optimizer steps until `total_steps` (or
/// `opts.stop_after` steps in this call), then the held-out figures and the export.
pub fn train<B: Kernels>(
    recipe: &Recipe,
    device: B::Device,
    opts: &TrainOptions,
) -> Result<TrainReport, TrainError>
where
    Ad<B>: Kernels + BackendTypes<Device = B::Device>,
{
    train_in_group(recipe, device, opts, &Solo)
}

/// [`train`] on several devices, one worker thread each, data-parallel through `members`
/// (one per device, rank order: [`crate::parallel`]). Worker 0 runs on the calling thread,
/// reports progress and writes every file; the others run silently. The first error of any
/// worker stops them all and is returned.
pub fn train_data_parallel<B: Kernels>(
    recipe: &Recipe,
    devices: Vec<B::Device>,
    members: Vec<Box<dyn Collective<B>>>,
    opts: &TrainOptions,
) -> Result<TrainReport, TrainError>
where
    Ad<B>: Kernels + BackendTypes<Device = B::Device>,
{
    if devices.len() != members.len() || devices.is_empty() {
        return Err(TrainError::Refused(format!(
            "data parallelism over {} devices needs one group member each, got {}",
            devices.len(),
            members.len()
        )));
    }
    let rows = recipe.train.micro_batch * recipe.train.grad_accum;
    if rows < devices.len() {
        return Err(TrainError::Refused(format!(
            "train.micro_batch x train.grad_accum = {rows} rows a step cannot be shared by {} GPUs; \
             HINT: raise train.grad_accum to at least {}",
            devices.len(),
            devices.len().div_ceil(recipe.train.micro_batch.max(1))
        )));
    }
    if recipe.train.offload_optimizer && devices.len() > 1 {
        // Each worker already holds only its share of the moments (ZeRO-1).
        return Err(TrainError::Refused(
            "train.offload_optimizer works on one GPU; with several, each keeps only its share of \
             the optimizer state already; HINT: set train.offload_optimizer = false"
                .into(),
        ));
    }
    let (resume, stop_after) = (opts.resume, opts.stop_after);
    let mut workers = devices.into_iter().zip(members);
    let (lead_device, lead) = workers.next().expect("checked above");
    let outcomes: Vec<std::thread::Result<Result<TrainReport, TrainError>>> = std::thread::scope(|scope| {
        let others: Vec<_> = workers
            .map(|(device, member)| {
                scope.spawn(move || {
                    let silent = TrainOptions {
                        resume,
                        stop_after,
                        progress: &distill_core::progress::Silent,
                    };
                    worker(recipe, device, &silent, member.as_ref())
                })
            })
            .collect();
        let mut outcomes = vec![worker(recipe, lead_device, opts, lead.as_ref())];
        outcomes.extend(others.into_iter().map(|h| h.join().and_then(|outcome| outcome)));
        outcomes
    });
    // A panic (a GPU out of memory, say) goes on as the panic it was, once every worker has
    // stopped: the caller may know it (the CLI names the memory knobs).
    let mut results = Vec::new();
    for outcome in outcomes {
        match outcome {
            Ok(result) => results.push(result),
            Err(payload) => std::panic::resume_unwind(payload),
        }
    }
    first_failure(results)
}

/// Worker 0's report when every worker finished; else the error of the worker that failed
/// first, not of those it stopped (theirs only say another worker stopped).
fn first_failure(results: Vec<Result<TrainReport, TrainError>>) -> Result<TrainReport, TrainError> {
    let mut errors: Vec<TrainError> = Vec::new();
    let mut lead = None;
    for r in results {
        match r {
            Ok(report) => lead = lead.or(Some(report)),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        return Ok(lead.expect("at least one worker"));
    }
    let cause = errors
        .iter()
        .position(|e| !matches!(e, TrainError::Parallel(_)))
        .unwrap_or(0);
    Err(errors.swap_remove(cause))
}

/// One data-parallel worker: [`train_in_group`], telling the others if it stops early, by
/// an error or a panic (caught here, so that the others are not left waiting for it).
fn worker<B: Kernels>(
    recipe: &Recipe,
    device: B::Device,
    opts: &TrainOptions,
    member: &dyn Collective<B>,
) -> std::thread::Result<Result<TrainReport, TrainError>>
where
    Ad<B>: Kernels + BackendTypes<Device = B::Device>,
{
    let run = std::panic::AssertUnwindSafe(|| train_in_group(recipe, device, opts, member));
    let outcome = std::panic::catch_unwind(run);
    match &outcome {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => member.abort(&e.to_string()),
        Err(payload) => {
            let text = distill_core::panic_message(payload.as_ref()).unwrap_or("a panic");
            member.abort(&format!("panicked: {text}"));
        }
    }
    outcome
}

/// [`train`] as one worker of a data-parallel group.
pub fn train_in_group<B: Kernels>(
    recipe: &Recipe,
    device: B::Device,
    opts: &TrainOptions,
    group: &dyn Collective<B>,
) -> Result<TrainReport, TrainError>
where
    Ad<B>: Kernels + BackendTypes<Device = B::Device>,
{
    let (mut run, mut model) = Run::<B>::open(recipe, device, opts.resume, group)?;
    run.before_training(&model)?;
    let progress = opts.progress;
    progress.stage("training", run.total_steps() as u64);
    progress.advance(run.steps_done() as u64);
    let mut ran = 0;
    while run.steps_done() < run.total_steps() && opts.stop_after.is_none_or(|n| ran < n) {
        model = run.step(model, progress)?;
        ran += 1;
    }
    progress.finish_stage();
    run.finish(model)
}
