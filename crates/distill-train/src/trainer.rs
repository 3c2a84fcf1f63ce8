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

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use distill_core::Recipe;
use distill_core::progress::Progress;
use distill_core::recipe::{BaseQuant, OnPolicyTeacher};
use distill_hf::hub::{self, HubSettings};
use distill_hf::tokenizer::TextTokenizer;
use distill_kernels::KeyRanges;
use distill_models::transformer::Context;
use distill_models::{CausalLm, Kernels};

use crate::checkpoint::{self, HostTensors, TrainState};
use crate::export;
use crate::lora;
use crate::loss::{HeadWeight, LossConfig, TeacherTargets, chunked_loss};
use crate::metrics::{MetricsLog, MetricsRecord};
use crate::on_policy::{OnPolicy, OnPolicyReport};
use crate::optim::{AdamW, AdamWConfig, Moments, learning_rate};
use crate::params::{GradStore, ParamInfo, collect_grads, param_infos, read_params};
use crate::soft::{SoftStats, SoftTargetError, SoftTargets};
use crate::tensorboard::EventWriter;
use distill_data::examples::{self as data, DataOptions, Example, IGNORE, Row};

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
}

/// Where the KL term's teacher distribution comes from.
pub enum Teacher<B: Backend> {
    /// kd_ratio = 0: CE only.
    None,
    /// A local model sharing the student's tokenizer: full-vocabulary logits.
    Local(Box<CausalLm<B>>),
    /// A local model read only at the labels: its log-probability of each (sampled) token,
    /// for the on-policy sampled-token estimator.
    LocalSampled(Box<CausalLm<B>>),
    /// A served teacher's grades of on-policy samples (their rows' keys find them).
    Graded(Box<crate::on_policy::GradedTargets>),
    /// The dataset's stored top-k soft labels.
    Stored(Box<SoftTargets>),
    /// The same targets for every micro-batch, which must have exactly their N loss
    /// positions (`distill bench`: synthetic top-k at real shapes, no dataset).
    Fixed(TeacherTargets<B>),
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

type Ad<B> = Autodiff<B>;
/// A block's input leaf and output, with the graph between them kept for backward.
type BlockGraph<B> = (Tensor<Ad<B>, 3>, Tensor<Ad<B>, 3>);

pub fn train<B: Kernels>(
    recipe: &Recipe,
    device: B::Device,
    opts: &TrainOptions,
) -> Result<TrainReport, TrainError>
where
    Ad<B>: Kernels + BackendTypes<Device = B::Device>,
{
    let resume_from = check_run_dir(recipe, opts.resume)?;
    // Exact-size buffers keep a training step's memory tight, but generation asks for new sizes
    // at every token (its KV cache grows), each a fresh device allocation kept until trimmed:
    // on-policy runs, which sample inside the loop, keep the backend's paged pool.
    if !recipe.on_policy.enabled() {
        B::exact_allocations();
    }
    let t = &recipe.train;
    let settings = HubSettings::from_env();
    let student_dir = hub::resolve(&recipe.student.model, &settings)?;
    let tokenizer = TextTokenizer::from_dir(&student_dir)?;
    let data_opts = DataOptions {
        seq_len: t.seq_len,
        held_out: recipe.data.held_out,
        keep_truncated: recipe.generation.keep_truncated,
        keep_only_correct: recipe.generation.keep_only_correct,
    };
    let (train_set, held_out, stats) = data::load_examples(&recipe.data.dataset, &tokenizer, &data_opts)?;
    let pad_id = pad_token(&tokenizer);

    <Ad<B> as Backend>::seed(&device, t.seed);
    let student = CausalLm::<Ad<B>>::load_with(&student_dir, &device, recipe.lora.quantize)?;
    check_vocab(&student, &tokenizer, &student_dir)?;
    let mut model = trainable_student(student, recipe, &device);
    let (teacher, soft_labels) =
        load_teacher::<B>(recipe, &tokenizer, &settings, &device, &train_set, &held_out)?;
    let mut on_policy = if recipe.on_policy.enabled() {
        let grader = match (recipe.on_policy.teacher, &teacher) {
            (OnPolicyTeacher::Server, _) => None,
            (OnPolicyTeacher::Local, Teacher::Local(m)) => Some((**m).clone()),
            (OnPolicyTeacher::Local, _) => {
                Some(load_local_teacher::<B>(recipe, &tokenizer, &settings, &device)?)
            }
        };
        Some(OnPolicy::new(
            recipe, &tokenizer, &train_set, &held_out, grader, &settings,
        )?)
    } else {
        None
    };

    let infos = param_infos(&model);
    let mut opt = new_optimizer(&model, t);

    let rows_per_step = t.micro_batch * t.grad_accum;
    let rows_epoch0 = data::epoch_rows(&train_set, t.seed, 0, t.seq_len, t.packing, pad_id).len();
    let steps_per_epoch = rows_epoch0.div_ceil(rows_per_step).max(1);
    let total_steps = t
        .max_steps
        .unwrap_or(((t.epochs * steps_per_epoch as f64).ceil() as usize).max(1));

    let root = run_root(recipe);
    let mut state = TrainState {
        format_version: checkpoint::FORMAT_VERSION,
        step: 0,
        total_steps,
        adam_t: 0,
        tokens_seen: 0,
        skipped_steps: 0,
        recipe_hash: recipe.hash(),
        tokenizer_sha256: tokenizer.hash.clone(),
    };
    if let Some(dir) = resume_from {
        let loaded = checkpoint::load(&dir)?;
        if loaded.state.tokenizer_sha256 != tokenizer.hash {
            return Err(TrainError::Refused(format!(
                "{}: made with another tokenizer than {}; HINT: resume with the student it was trained from",
                dir.display(),
                student_dir.display()
            )));
        }
        model = restore_params(model, &infos, &loaded.weights, &dir)?;
        restore_moments(&mut opt, &infos, &loaded.moments, &device);
        let rollouts = dir.join(crate::on_policy::ROLLOUTS);
        if let (Some(op), Ok(bytes)) = (on_policy.as_mut(), std::fs::read(&rollouts)) {
            op.restore_window(&bytes, &rollouts)?;
        }
        opt.t = loaded.state.adam_t;
        state = TrainState {
            total_steps,
            ..loaded.state
        };
    }

    let run_dir = root.join("runs");
    let mut metrics = MetricsLog::open(&run_dir.join(crate::metrics::METRICS_FILE))?;
    let mut tb = EventWriter::create(&run_dir.join("tb"))?;
    let recipe_toml = recipe.to_toml();
    std::fs::create_dir_all(&root).map_err(|error| checkpoint::CheckpointError::Io {
        path: root.clone(),
        error,
    })?;
    distill_core::fsutil::write_atomic(&root.join("recipe.toml"), recipe_toml.as_bytes()).map_err(
        |error| checkpoint::CheckpointError::Io {
            path: root.join("recipe.toml"),
            error,
        },
    )?;

    let loss_cfg = LossConfig::from_recipe(&recipe.loss, Some(tokenizer.vocab_size()));
    if let (Some(op), 0) = (on_policy.as_mut(), state.step) {
        op.report.reverse_kl_before =
            held_out_reverse_kl(op, &model, &tokenizer, recipe, pad_id, &mut tb, 0, &device)?;
    }
    let progress = opts.progress;
    progress.stage("training", total_steps as u64);
    progress.advance(state.step as u64);
    let mut losses = Vec::new();
    let mut consecutive_bad = 0;
    let mut last_checkpoint = None;
    let mut epoch_cache: Option<(u64, Vec<Row>)> = None;
    let mut ran = 0;

    while state.step < total_steps && opts.stop_after.is_none_or(|n| ran < n) {
        let started = Instant::now();
        let step = state.step;
        <Ad<B> as Backend>::seed(&device, t.seed.wrapping_add(step as u64 + 1));
        let mut extra = serde_json::Map::new();
        let on_step = on_policy.as_ref().is_some_and(|op| op.is_on_policy(step));
        // On-policy steps time their phases (a device sync at each: a few per micro-batch) to
        // report the step's split into sampling, teacher scoring and training.
        let mut scoring = 0.0;
        let (rows, step_teacher, step_loss) = match on_policy.as_mut().filter(|_| on_step) {
            Some(op) => {
                progress.message("on-policy: sampling");
                let (rollouts, sampled) =
                    op.rollouts(&model.valid(), &tokenizer, step, rows_per_step, &device)?;
                log_rollouts(&mut extra, &rollouts, sampled);
                progress.message("on-policy: grading");
                let graded = Instant::now();
                let rows = op.rows(&rollouts, pad_id)?;
                scoring += graded.elapsed().as_secs_f64();
                (rows, &op.teacher, &op.loss)
            }
            None => {
                let rows = step_rows(
                    &train_set,
                    t,
                    step,
                    steps_per_epoch,
                    rows_per_step,
                    pad_id,
                    &mut epoch_cache,
                );
                (rows, &teacher, &loss_cfg)
            }
        };
        if on_step {
            progress.message("on-policy: training");
        }
        let trained = Instant::now();
        let lr = learning_rate(t, step, total_steps);
        let mut since = Instant::now();
        let mut timed = |name: &'static str| {
            let _ = B::sync(&device);
            if name == "teacher" {
                scoring += since.elapsed().as_secs_f64();
            }
            since = Instant::now();
        };
        let hook: PhaseHook = if on_step { &mut timed } else { &mut no_phases };
        let (next, outcome) = optimizer_step(
            model,
            &mut opt,
            step_teacher,
            &rows,
            step_loss,
            recipe,
            lr,
            &device,
            hook,
        )?;
        model = next;
        if on_policy.is_some() {
            extra.insert("on_policy".into(), on_step.into());
        }
        if on_step {
            log_step_split(&mut extra, started, trained, scoring);
        }
        let StepOutcome {
            loss,
            ce,
            kl,
            grad_norm,
            tokens,
            ..
        } = outcome;
        if !outcome.applied {
            consecutive_bad += 1;
            state.skipped_steps += 1;
            if consecutive_bad >= t.max_bad_steps {
                return Err(TrainError::Refused(format!(
                    "{consecutive_bad} steps in a row had a non-finite loss or gradient (step {step}); \
                     the last good checkpoint is {}; HINT: lower [train] lr or check the data",
                    last_checkpoint
                        .as_ref()
                        .map_or("none".to_string(), |p: &PathBuf| p.display().to_string())
                )));
            }
            state.step += 1;
            ran += 1;
            progress.advance(1);
            continue;
        }
        consecutive_bad = 0;
        state.step += 1;
        state.adam_t = opt.t;
        state.tokens_seen += tokens as u64;
        ran += 1;
        losses.push(loss);

        let tokens_per_s = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        if state.step.is_multiple_of(t.log_every.max(1)) || state.step == total_steps {
            let record = MetricsRecord {
                step: state.step as u64,
                loss,
                kl,
                ce,
                lr,
                grad_norm,
                tokens_per_s,
                mem_gb: None,
                extra,
            };
            log_record(&mut metrics, &mut tb, &record)?;
        }
        progress.advance(1);
        progress.message(&format!(
            "loss {loss:.4} | {tokens_per_s:.0} tok/s | skipped {}",
            state.skipped_steps
        ));
        if state.step.is_multiple_of(t.checkpoint_every.max(1)) || state.step == total_steps {
            let window = on_policy.as_ref().and_then(|op| op.unfinished_window(state.step));
            let extra: Vec<(&str, &[u8])> = window
                .as_deref()
                .map(|w| (crate::on_policy::ROLLOUTS, w))
                .into_iter()
                .collect();
            last_checkpoint = Some(save_checkpoint(
                &root,
                &model,
                &infos,
                &opt,
                &state,
                &recipe_toml,
                &extra,
                t.keep_checkpoints,
            )?);
        }
    }
    progress.finish_stage();

    let export = if state.step >= total_steps {
        let held_loss = held_out_loss(&model, &teacher, &held_out, &loss_cfg, recipe, pad_id, &device)?;
        if let Some(l) = held_loss {
            tb.add_scalar("eval/held_out_loss", l as f32, state.step as i64)?;
        }
        if let Some(op) = on_policy.as_mut() {
            let step = state.step as i64;
            op.report.reverse_kl_after =
                held_out_reverse_kl(op, &model, &tokenizer, recipe, pad_id, &mut tb, step, &device)?;
        }
        tb.flush()?;
        let dir = export_run(model.valid(), recipe, &student_dir, &root)?;
        crate::metrics::plot_curves(metrics.path(), &run_dir.join("curves.png")).ok();
        Some(dir)
    } else {
        None
    };
    Ok(TrainReport {
        steps: state.step,
        total_steps,
        losses,
        skipped_steps: state.skipped_steps,
        checkpoint: last_checkpoint,
        export,
        run_dir,
        stats,
        soft_labels,
        on_policy: on_policy.map(|op| op.report),
    })
}

/// [`OnPolicy::held_out_reverse_kl`] of the student as it is, logged at `step` as
/// `eval/reverse_kl`.
#[allow(clippy::too_many_arguments)]
fn held_out_reverse_kl<B: Kernels>(
    op: &OnPolicy<B>,
    model: &CausalLm<Ad<B>>,
    tokenizer: &TextTokenizer,
    recipe: &Recipe,
    pad_id: u32,
    tb: &mut EventWriter,
    step: i64,
    device: &B::Device,
) -> Result<Option<f64>, TrainError>
where
    Ad<B>: Kernels,
{
    let kl = op.held_out_reverse_kl(
        &model.valid(),
        tokenizer,
        pad_id,
        recipe.train.micro_batch,
        device,
    )?;
    if let Some(kl) = kl {
        tb.add_scalar("eval/reverse_kl", kl as f32, step)?;
    }
    Ok(kl)
}

/// `final/` in HF format (LoRA merged, into the base as stored on disk for QLoRA) and, for
/// LoRA, `adapter/` in PEFT format. Returns `final/`.
fn export_run<B: Kernels>(
    inner: CausalLm<B>,
    recipe: &Recipe,
    student_dir: &Path,
    root: &Path,
) -> Result<PathBuf, TrainError> {
    if recipe.lora.enabled {
        export::export_peft(&inner, &recipe.lora, &recipe.student.model, &root.join("adapter"))?;
    }
    let final_dir = root.join("final");
    Ok(match (recipe.lora.enabled, recipe.lora.quantize) {
        (true, BaseQuant::Nf4) => {
            let scale = recipe.lora.alpha / recipe.lora.r as f64;
            export::export_merged_base(&inner, scale, student_dir, &final_dir)?
        }
        (true, BaseQuant::None) => export::export_hf(&lora::merge(inner), student_dir, &final_dir)?,
        (false, _) => export::export_hf(&inner, student_dir, &final_dir)?,
    })
}

/// One metrics line to metrics.jsonl and its figures to TensorBoard: the standard ones under
/// `train/`, an on-policy step's numeric extras under `on_policy/`.
fn log_record(metrics: &mut MetricsLog, tb: &mut EventWriter, r: &MetricsRecord) -> Result<(), TrainError> {
    metrics.append(r)?;
    let step = r.step as i64;
    for (tag, v) in [
        ("loss", r.loss),
        ("kl", r.kl),
        ("ce", r.ce),
        ("lr", r.lr),
        ("grad_norm", r.grad_norm),
        ("tokens_per_s", r.tokens_per_s),
    ] {
        tb.add_scalar(&format!("train/{tag}"), v as f32, step)?;
    }
    for (tag, v) in r.extra.iter().filter_map(|(k, v)| Some((k, v.as_f64()?))) {
        tb.add_scalar(&format!("on_policy/{tag}"), v as f32, step)?;
    }
    Ok(tb.flush()?)
}

/// An on-policy step's split into sampling (`gen_s`, already in `extra` on steps that
/// sampled), teacher scoring (`scoring` seconds) and the rest of the optimizer step, which
/// began at `trained`; the step began at `started`.
fn log_step_split(
    extra: &mut serde_json::Map<String, serde_json::Value>,
    started: Instant,
    trained: Instant,
    scoring: f64,
) {
    let total = started.elapsed().as_secs_f64().max(1e-9);
    let sampling = extra.get("gen_s").and_then(|v| v.as_f64()).unwrap_or(0.0);
    let training = (trained.elapsed().as_secs_f64() - scoring).max(0.0);
    extra.insert("score_s".into(), scoring.into());
    extra.insert("gen_share".into(), (sampling / total).into());
    extra.insert("score_share".into(), (scoring / total).into());
    extra.insert("train_share".into(), (training / total).into());
}

/// An on-policy step's sampling figures for its metrics line: mean completion length, the
/// share cut at max_new_tokens and, on steps that sampled, the seconds and tokens per second.
fn log_rollouts(
    extra: &mut serde_json::Map<String, serde_json::Value>,
    rollouts: &[crate::on_policy::Rollout],
    sampled: Option<crate::on_policy::RolloutStats>,
) {
    let n = rollouts.len().max(1) as f64;
    let tokens: usize = rollouts.iter().map(|r| r.completion.len()).sum();
    let cut = rollouts
        .iter()
        .filter(|r| r.finish == distill_infer::generate::FinishReason::Length)
        .count();
    extra.insert("sample_len".into(), (tokens as f64 / n).into());
    extra.insert("truncated_share".into(), (cut as f64 / n).into());
    if let Some(s) = sampled {
        extra.insert("gen_s".into(), s.seconds.into());
        extra.insert(
            "gen_tokens_per_s".into(),
            (s.new_tokens as f64 / s.seconds.max(1e-9)).into(),
        );
    }
}

/// The student as training sees it: LoRA adapters on a frozen model when the recipe enables
/// [lora], else every parameter trainable in f32.
pub fn trainable_student<B: Kernels>(
    student: CausalLm<Ad<B>>,
    recipe: &Recipe,
    device: &B::Device,
) -> CausalLm<Ad<B>>
where
    Ad<B>: Kernels + BackendTypes<Device = B::Device>,
{
    if recipe.lora.enabled {
        lora::add_lora(student, &recipe.lora, recipe.train.seed, device)
    } else {
        lora::full_finetune(student)
    }
}

/// AdamW over the trainable parameters, with weight decay on matrices only.
pub fn new_optimizer<B: Kernels>(model: &CausalLm<Ad<B>>, t: &distill_core::recipe::TrainSection) -> AdamW<B>
where
    Ad<B>: Kernels,
{
    let decayed = param_infos(model)
        .iter()
        .filter(|p| p.trainable && p.shape.len() >= 2)
        .map(|p| p.id)
        .collect();
    AdamW::<B>::new(AdamWConfig::from_recipe(t), decayed)
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// Means per loss token.
    pub loss: f64,
    pub ce: f64,
    pub kl: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens in the step's rows (padding included), and those carrying a loss.
    pub tokens: usize,
    pub loss_tokens: usize,
    /// False when the loss or the gradient was not finite: the model was left as it was.
    pub applied: bool,
}

/// The phases of a step, in order; [`optimizer_step`] calls its phase hook at the end of each
/// (the first four once per micro-batch).
pub const PHASES: [&str; 7] = [
    "inputs",
    "forward",
    "teacher",
    "loss",
    "backward",
    "grad_norm",
    "optimizer",
];

/// Called with a phase's name (one of [`PHASES`]) when the step has queued that phase's work.
/// `distill bench --profile` syncs the device there and times each phase; training passes
/// [`no_phases`].
pub type PhaseHook<'a> = &'a mut dyn FnMut(&'static str);

/// The phase hook that does nothing.
pub fn no_phases(_: &'static str) {}

/// One optimizer step on `rows`, exactly as `distill train` runs each step (and `distill
/// bench` times it): micro-batches of [train] micro_batch rows, gradients of the mean loss
/// over the step's loss tokens, global-norm clipping, one AdamW update at `lr`.
#[allow(clippy::too_many_arguments)]
pub fn optimizer_step<B: Kernels>(
    model: CausalLm<Ad<B>>,
    opt: &mut AdamW<B>,
    teacher: &Teacher<B>,
    rows: &[Row],
    loss_cfg: &LossConfig,
    recipe: &Recipe,
    lr: f64,
    device: &B::Device,
    phase: PhaseHook,
) -> Result<(CausalLm<Ad<B>>, StepOutcome), TrainError>
where
    Ad<B>: Kernels,
{
    let t = &recipe.train;
    let loss_tokens: usize = rows
        .iter()
        .map(|r| r.labels.iter().filter(|&&l| l != IGNORE).count())
        .sum();
    let scale = 1.0 / loss_tokens.max(1) as f64;
    let mut grads = GradStore::<B>::default();
    let mut sums = (0.0, 0.0, 0.0);
    for micro in rows.chunks(t.micro_batch) {
        let s = micro_step(
            &model, teacher, micro, loss_cfg, recipe, scale, &mut grads, device, phase,
        )?;
        sums = (sums.0 + s.0, sums.1 + s.1, sums.2 + s.2);
    }
    let n = loss_tokens.max(1) as f64;
    let (loss, ce, kl) = (sums.0 / n, sums.1 / n, sums.2 / n);
    // The activations are gone: what they freed goes back before the optimizer's groups are
    // made, once the device has finished with it. Freed while the backward was still queued,
    // the driver's pool grew for the groups' 256 MiB buffers instead of reusing it (1.5B full
    // fine-tuning: 31.4 -> 30.2 GiB reserved; a failed sync shows at the next operation).
    let _ = B::sync(device);
    B::trim_memory(device);
    // The trainable parameters as flat groups: the norm and the update both read them.
    let flat = opt.gather::<Ad<B>, _>(&model, grads);
    // And the per-parameter gradients, copied into the groups, before the update's buffers.
    B::trim_memory(device);
    let grad_norm = flat.grad_norm();
    phase("grad_norm");
    let applied = loss.is_finite() && grad_norm.is_finite();
    let mut model = model;
    if applied {
        // Global-norm clipping: AdamW scales the gradients as it reads them.
        let clip = if t.max_grad_norm > 0.0 && grad_norm > t.max_grad_norm {
            t.max_grad_norm / grad_norm
        } else {
            1.0
        };
        model = opt.apply::<Ad<B>, _>(model, flat, lr, clip);
    }
    // And the gradients' groups and last step's parameters before the next forward.
    B::trim_memory(device);
    phase("optimizer");
    let outcome = StepOutcome {
        loss,
        ce,
        kl,
        grad_norm,
        tokens: rows.iter().map(|r| r.input_ids.len()).sum(),
        loss_tokens,
        applied,
    };
    Ok((model, outcome))
}

fn pad_token(tokenizer: &TextTokenizer) -> u32 {
    let s = &tokenizer.specials;
    s.pad
        .as_deref()
        .or(s.eos.as_deref())
        .and_then(|t| tokenizer.token_to_id(t))
        .unwrap_or(0)
}

fn check_vocab<B: Backend>(
    model: &CausalLm<B>,
    tokenizer: &TextTokenizer,
    dir: &Path,
) -> Result<(), TrainError> {
    if tokenizer.vocab_size() > model.config.vocab_size {
        return Err(TrainError::Refused(format!(
            "{}: tokenizer has {} tokens but the model's vocab_size is {}; the tokenizer does not belong to this model",
            dir.display(),
            tokenizer.vocab_size(),
            model.config.vocab_size
        )));
    }
    Ok(())
}

/// The teacher distribution for the KL term: the dataset's stored soft labels when it has
/// them (re-scored or captured ahead of time: no teacher in memory while training), else a
/// live local teacher when the recipe names one. KD without either is refused rather than
/// silently trained as CE.
fn load_teacher<B: Kernels>(
    recipe: &Recipe,
    student_tokenizer: &TextTokenizer,
    settings: &HubSettings,
    device: &B::Device,
    train_set: &[Example],
    held_out: &[Example],
) -> Result<(Teacher<B>, Option<SoftStats>), TrainError> {
    if recipe.loss.kd_ratio == 0.0 {
        return Ok((Teacher::None, None));
    }
    let dataset = &recipe.data.dataset;
    if let Some((soft, stats)) =
        SoftTargets::open(dataset, student_tokenizer, train_set.iter().chain(held_out))?
    {
        if stats.aligned == 0 {
            return Err(TrainError::Refused(format!(
                "{}: no sample's soft labels line up with its tokens as the student's template renders them \
                 ({} without a record, {} misaligned); HINT: re-score with `distill gen-data --rescore`",
                distill_data::soft::soft_dir(dataset).display(),
                stats.missing,
                stats.unaligned
            )));
        }
        return Ok((Teacher::Stored(Box::new(soft)), Some(stats)));
    }
    if recipe.teacher.local_model.is_none() {
        return Err(TrainError::Refused(format!(
            "[loss] kd_ratio = {} needs the teacher's distribution, and there is none: write soft labels into {} \
             (gen-data with [soft_labels] enabled, or `distill gen-data --rescore`), or set [teacher] local_model \
             to a model sharing the student's tokenizer; or set kd_ratio = 0 to train on CE alone",
            recipe.loss.kd_ratio,
            distill_data::soft::soft_dir(dataset).display()
        )));
    }
    let teacher = load_local_teacher(recipe, student_tokenizer, settings, device)?;
    Ok((Teacher::Local(Box::new(teacher)), None))
}

/// `[teacher] local_model`, which must share the student's tokenizer.
fn load_local_teacher<B: Kernels>(
    recipe: &Recipe,
    student_tokenizer: &TextTokenizer,
    settings: &HubSettings,
    device: &B::Device,
) -> Result<CausalLm<B>, TrainError> {
    let Some(reference) = recipe.teacher.local_model.as_deref() else {
        return Err(TrainError::Refused(
            "[teacher] local_model is unset; HINT: name a model sharing the student's tokenizer".into(),
        ));
    };
    let dir = hub::resolve(reference, settings)?;
    let tokenizer = TextTokenizer::from_dir(&dir)?;
    if tokenizer.hash != student_tokenizer.hash {
        return Err(TrainError::Refused(format!(
            "teacher {} uses another tokenizer than the student (tokenizer.json sha256 {} vs {}); \
             full-vocabulary KD needs a shared vocabulary; HINT: use API top-k soft labels instead",
            dir.display(),
            &tokenizer.hash[..12],
            &student_tokenizer.hash[..12]
        )));
    }
    Ok(CausalLm::<B>::load_with(
        &dir,
        device,
        recipe.teacher.local_quantize,
    )?)
}

/// The rows of optimizer step `step`: its slice of the (seeded, per-epoch) packed order.
/// The last step of an epoch wraps around to the epoch's first rows to fill its batch, so
/// every step sees the same number of rows.
fn step_rows(
    examples: &[Example],
    t: &distill_core::recipe::TrainSection,
    step: usize,
    steps_per_epoch: usize,
    rows_per_step: usize,
    pad_id: u32,
    cache: &mut Option<(u64, Vec<Row>)>,
) -> Vec<Row> {
    let epoch = (step / steps_per_epoch) as u64;
    if cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
        *cache = Some((
            epoch,
            data::epoch_rows(examples, t.seed, epoch, t.seq_len, t.packing, pad_id),
        ));
    }
    let rows = &cache.as_ref().expect("filled above").1;
    let start = (step % steps_per_epoch) * rows_per_step;
    rows.iter()
        .cycle()
        .skip(start)
        .take(rows_per_step.min(rows.len().max(1)))
        .cloned()
        .collect()
}

/// One micro-batch: forward without a graph, the head with its chunked loss, then block by
/// block backward. Adds gradients of `scale * loss` to `grads`; returns the loss sums
/// (total, ce, kl) over its tokens.
#[allow(clippy::too_many_arguments)]
fn micro_step<B: Kernels>(
    model: &CausalLm<Ad<B>>,
    teacher: &Teacher<B>,
    rows: &[Row],
    loss_cfg: &LossConfig,
    recipe: &Recipe,
    scale: f64,
    grads: &mut GradStore<B>,
    device: &B::Device,
    phase: PhaseHook,
) -> Result<(f64, f64, f64), TrainError>
where
    Ad<B>: Kernels,
{
    let (ids, docs, positions, labels) = batch_tensors::<B>(rows, device);
    let Some(positions) = positions else {
        return Ok((0.0, 0.0, 0.0));
    };
    let ctx = Context::<B>::packed(&model.rotary, &docs, device);
    let ctx_ad = Context::<Ad<B>> {
        cos: Tensor::from_inner(ctx.cos.clone()),
        sin: Tensor::from_inner(ctx.sin.clone()),
        keys: ctx.keys.clone().map(KeyRanges::from_inner),
    };
    phase("inputs");
    let layers = &model.model.layers;

    // Forward: keep block inputs only (or each block's graph when not recomputing).
    let mut xs: Vec<Tensor<B, 3>> = Vec::new();
    let mut kept: Vec<BlockGraph<B>> = Vec::new();
    let mut x = model.valid().embed(ids.clone()); // [R, T, C]
    for layer in layers {
        x = if recipe.train.recompute {
            xs.push(x.clone());
            layer.valid().forward(x, &ctx, None)
        } else {
            let leaf = Tensor::<Ad<B>, 3>::from_inner(x).require_grad();
            let y = layer.forward(leaf.clone(), &ctx_ad, None);
            let out = y.clone().inner();
            kept.push((leaf, y));
            out
        };
    }
    // The forward's temporaries (kept for reuse at their own sizes) go back for the loss's.
    B::trim_memory(device);
    phase("forward");

    // Head: final norm with a graph; the loss in chunks with their own backward passes.
    let x_last = Tensor::<Ad<B>, 3>::from_inner(x).require_grad();
    let h = model.model.norm.forward(x_last.clone()); // [R, T, C]
    let h_sel = select_positions(h, &Tensor::<Ad<B>, 1, Int>::from_inner(positions.clone())); // [N, C]
    let teacher_targets = teacher_targets(
        teacher,
        ids.clone(),
        &docs,
        &positions,
        &labels,
        rows,
        model.config.vocab_size,
    )?;
    phase("teacher");
    let head_param = head_param(model);
    let want_w = head_param.as_ref().is_some_and(|(_, trainable)| *trainable);
    let out = chunked_loss::<Ad<B>>(
        h_sel.clone().inner(),
        head_weight(model),
        labels,
        &teacher_targets,
        loss_cfg,
        recipe.loss.chunk_tokens,
        want_w,
        scale,
    );
    phase("loss");
    let head_grads = (h_sel * Tensor::from_inner(out.grad_hidden)).sum().backward();
    collect_grads(&model.model.norm, &head_grads, grads);
    let mut g = x_last.grad(&head_grads).expect("x_last is a leaf");
    if let (Some((id, _)), Some(gw)) = (head_param, out.grad_weight) {
        let n = gw.shape().num_elements();
        grads.add(id, gw.reshape([n]));
    }

    // Backward through the blocks, last first. Each block's activations, freed as it goes,
    // are handed back for the gradients' buffers, which are of other sizes: kept for reuse at
    // their own sizes, they stayed reserved beside the gradients (1.5B full fine-tuning: 40.5
    // -> 35.2 GiB peak). The loss's chunk buffers go first.
    B::trim_memory(device);
    for layer in layers.iter().rev() {
        let (leaf, y) = if recipe.train.recompute {
            let x = xs.pop().expect("one input per layer");
            let leaf = Tensor::<Ad<B>, 3>::from_inner(x).require_grad();
            let y = layer.forward(leaf.clone(), &ctx_ad, None);
            (leaf, y)
        } else {
            kept.pop().expect("one graph per layer")
        };
        let block_grads = (y * Tensor::from_inner(g)).sum().backward();
        collect_grads(layer, &block_grads, grads);
        g = leaf.grad(&block_grads).expect("block input is a leaf");
        drop((leaf, block_grads));
        B::trim_memory(device);
    }
    if param_is_trainable(&model.model.embed_tokens.weight) {
        let e = model.embed(Tensor::<Ad<B>, 2, Int>::from_inner(ids));
        let embed_grads = (e * Tensor::from_inner(g)).sum().backward();
        collect_grads(&model.model.embed_tokens, &embed_grads, grads);
    }
    phase("backward");
    Ok((out.total, out.ce, out.kl))
}

fn param_is_trainable<B: Backend, const D: usize>(p: &Param<Tensor<B, D>>) -> bool {
    p.val().is_require_grad()
}

/// The output projection as stored: lm_head [C, V], or the tied embeddings [V, C].
fn head_weight<B: Backend>(model: &CausalLm<Ad<B>>) -> HeadWeight<B> {
    match &model.lm_head {
        Some(head) => HeadWeight::Cv(
            head.weight
                .dense()
                .expect("the LM head is never quantized")
                .val()
                .inner(),
        ),
        None => HeadWeight::Vc(model.model.embed_tokens.weight.val().inner()),
    }
}

/// The output projection's parameter id and whether it trains.
fn head_param<B: Backend>(model: &CausalLm<Ad<B>>) -> Option<(burn::module::ParamId, bool)> {
    let p = match &model.lm_head {
        Some(head) => head.weight.dense()?,
        None => &model.model.embed_tokens.weight,
    };
    Some((p.id, param_is_trainable(p)))
}

/// The teacher's distribution at the loss positions of `rows`: a local teacher's
/// full-vocabulary logits, the stored top-k, or none.
pub(crate) fn teacher_targets<B: Kernels>(
    teacher: &Teacher<B>,
    ids: Tensor<B, 2, Int>,
    docs: &[Vec<u32>],
    positions: &Tensor<B, 1, Int>,
    labels: &Tensor<B, 1, Int>,
    rows: &[Row],
    width: usize,
) -> Result<TeacherTargets<B>, TrainError> {
    let dense = |tm: &CausalLm<B>| {
        let h = select_positions(tm.hidden_states_packed(ids.clone(), docs), positions); // [N, Ct]
        TeacherTargets::Dense(fit_width(tm.logits(h.unsqueeze::<3>()).squeeze_dim(0), width))
    };
    Ok(match teacher {
        Teacher::Local(tm) => dense(tm),
        Teacher::LocalSampled(tm) => dense(tm).at_labels(labels.clone(), Some(tm.config.vocab_size)),
        Teacher::Stored(soft) => soft.for_rows(rows, &positions.device())?,
        Teacher::Graded(graded) => graded.for_rows(rows, &positions.device())?,
        Teacher::Fixed(targets) => {
            let n = positions.dims()[0];
            let rows_of = match targets {
                TeacherTargets::None => n,
                TeacherTargets::Dense(z) => z.dims()[0],
                TeacherTargets::Sparse { ids, .. } => ids.dims()[0],
                TeacherTargets::Sampled(lp) => lp.dims()[0],
            };
            if rows_of != n {
                return Err(TrainError::Refused(format!(
                    "fixed teacher targets cover {rows_of} positions, the micro-batch has {n}"
                )));
            }
            targets.clone()
        }
        Teacher::None => TeacherTargets::None,
    })
}

/// [R, T, C] -> [N, C]: the rows at flattened `positions`.
fn select_positions<B: Backend>(h: Tensor<B, 3>, positions: &Tensor<B, 1, Int>) -> Tensor<B, 2> {
    let [r, t, c] = h.dims();
    h.reshape([r * t, c]).select(0, positions.clone())
}

/// Teacher logits [N, Vt] to the student's width: extra padding columns dropped, missing
/// ones filled with a masked value (they lie past the shared tokenizer's vocabulary).
fn fit_width<B: Backend>(z: Tensor<B, 2>, width: usize) -> Tensor<B, 2> {
    let [n, v] = z.dims();
    if v == width {
        z
    } else if v > width {
        z.narrow(1, 0, width)
    } else {
        let pad = Tensor::full([n, width - v], -1e9, (&z.device(), z.dtype()));
        Tensor::cat(vec![z, pad], 1)
    }
}

fn batch_ids<B: Backend>(rows: &[Row], device: &B::Device) -> Tensor<B, 2, Int> {
    let t = rows[0].input_ids.len();
    let ids: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.input_ids.iter().map(|&x| i64::from(x)))
        .collect();
    Tensor::from_data(TensorData::new(ids, [rows.len(), t]), device)
}

/// ids [R, T], docs, positions with a label (flattened index) [N] or None if there are none,
/// and those labels [N].
#[allow(clippy::type_complexity)]
pub(crate) fn batch_tensors<B: Backend>(
    rows: &[Row],
    device: &B::Device,
) -> (
    Tensor<B, 2, Int>,
    Vec<Vec<u32>>,
    Option<Tensor<B, 1, Int>>,
    Tensor<B, 1, Int>,
) {
    let t = rows[0].input_ids.len();
    let docs: Vec<Vec<u32>> = rows.iter().map(|r| r.docs.clone()).collect();
    let (mut pos, mut lab) = (Vec::new(), Vec::new());
    for (ri, row) in rows.iter().enumerate() {
        for (i, &l) in row.labels.iter().enumerate() {
            if l != IGNORE {
                pos.push((ri * t + i) as i64);
                lab.push(l);
            }
        }
    }
    let n = pos.len();
    let positions = (n > 0).then(|| Tensor::from_data(TensorData::new(pos, [n]), device));
    (
        batch_ids(rows, device),
        docs,
        positions,
        Tensor::from_data(TensorData::new(lab, [n]), device),
    )
}

/// Mean loss on the held-out rows (no gradients), or None without held-out data.
fn held_out_loss<B: Kernels>(
    model: &CausalLm<Ad<B>>,
    teacher: &Teacher<B>,
    held_out: &[Example],
    loss_cfg: &LossConfig,
    recipe: &Recipe,
    pad_id: u32,
    device: &B::Device,
) -> Result<Option<f64>, TrainError>
where
    Ad<B>: Kernels,
{
    let rows = data::pack(held_out, recipe.train.seq_len, recipe.train.packing, pad_id);
    mean_loss(
        &model.valid(),
        teacher,
        &rows,
        loss_cfg,
        recipe.train.micro_batch,
        device,
    )
}

/// Mean loss per loss token of `model` on `rows`, `micro_batch` rows at a time, without
/// gradients; None when the rows carry no loss.
pub(crate) fn mean_loss<B: Kernels>(
    model: &CausalLm<B>,
    teacher: &Teacher<B>,
    rows: &[Row],
    loss_cfg: &LossConfig,
    micro_batch: usize,
    device: &B::Device,
) -> Result<Option<f64>, TrainError> {
    let (mut total, mut tokens) = (0.0, 0usize);
    for micro in rows.chunks(micro_batch.max(1)) {
        let (ids, docs, positions, labels) = batch_tensors::<B>(micro, device);
        let Some(positions) = positions else { continue };
        let h = select_positions(model.hidden_states_packed(ids.clone(), &docs), &positions); // [N, C]
        let width = model.config.vocab_size;
        let targets = teacher_targets(teacher, ids, &docs, &positions, &labels, micro, width)?;
        let n = positions.dims()[0];
        let logits = model.logits(h.unsqueeze::<3>()).squeeze_dim(0);
        let sums = crate::loss::token_loss(logits, labels, &targets, loss_cfg);
        total += sums.total.into_scalar().elem::<f64>();
        tokens += n;
    }
    Ok((tokens > 0).then(|| total / tokens as f64))
}

#[allow(clippy::too_many_arguments)]
fn save_checkpoint<B: Kernels>(
    root: &Path,
    model: &CausalLm<Ad<B>>,
    infos: &[ParamInfo],
    opt: &AdamW<B>,
    state: &TrainState,
    recipe_toml: &str,
    extra: &[(&str, &[u8])],
    keep: usize,
) -> Result<PathBuf, TrainError>
where
    Ad<B>: Kernels,
{
    let weights = read_params(model, |p| p.trainable);
    let mut moments = HostTensors::new();
    for info in infos.iter().filter(|p| p.trainable) {
        if let Some(m) = opt.moments(&info.id) {
            let n = info.shape.iter().product::<usize>();
            let host = |t: &Tensor<B, 1>| {
                t.clone()
                    .into_data()
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .expect("f32")
            };
            moments.insert(format!("exp_avg.{}", info.name), (vec![n], host(&m.m)));
            moments.insert(format!("exp_avg_sq.{}", info.name), (vec![n], host(&m.v)));
        }
    }
    Ok(checkpoint::save(
        root,
        state,
        &weights,
        &moments,
        recipe_toml,
        extra,
        keep,
    )?)
}

/// Puts checkpointed trainable weights back by name; every trainable parameter must be there.
fn restore_params<B: Kernels>(
    model: CausalLm<Ad<B>>,
    infos: &[ParamInfo],
    weights: &HostTensors,
    dir: &Path,
) -> Result<CausalLm<Ad<B>>, TrainError>
where
    Ad<B>: Kernels,
{
    for info in infos.iter().filter(|p| p.trainable) {
        match weights.get(&info.name) {
            Some((shape, _)) if shape == &info.shape => {}
            Some((shape, _)) => {
                return Err(TrainError::Refused(format!(
                    "{}: `{}` has shape {shape:?}, the model needs {:?}; HINT: the recipe's [lora] or student changed since this checkpoint",
                    dir.display(),
                    info.name,
                    info.shape
                )));
            }
            None => {
                return Err(TrainError::Refused(format!(
                    "{}: no `{}`; HINT: the recipe's [lora] or student changed since this checkpoint",
                    dir.display(),
                    info.name
                )));
            }
        }
    }
    struct Restore<'a> {
        by_id: std::collections::HashMap<burn::module::ParamId, &'a (Vec<usize>, Vec<f32>)>,
    }
    impl<AD: Backend> ModuleMapper<AD> for Restore<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<AD, D>>) -> Param<Tensor<AD, D>> {
            let Some((shape, data)) = self.by_id.get(&param.id) else {
                return param;
            };
            let (id, value, mapper) = param.consume();
            let device = value.device();
            let t = Tensor::<AD, D>::from_data(
                TensorData::new(data.clone(), shape.clone()),
                (&device, DType::F32),
            );
            Param::from_mapped_value(id, t.require_grad(), mapper)
        }
    }
    let by_id = infos
        .iter()
        .filter(|p| p.trainable)
        .filter_map(|p| Some((p.id, weights.get(&p.name)?)))
        .collect();
    Ok(model.map(&mut Restore { by_id }))
}

fn restore_moments<B: Backend>(
    opt: &mut AdamW<B>,
    infos: &[ParamInfo],
    moments: &HostTensors,
    device: &B::Device,
) {
    let tensor = |(shape, data): &(Vec<usize>, Vec<f32>)| {
        Tensor::<B, 1>::from_data(
            TensorData::new(data.clone(), [shape.iter().product::<usize>()]),
            (device, DType::F32),
        )
    };
    for info in infos.iter().filter(|p| p.trainable) {
        let m = moments.get(&format!("exp_avg.{}", info.name));
        let v = moments.get(&format!("exp_avg_sq.{}", info.name));
        if let (Some(m), Some(v)) = (m, v) {
            opt.restore_moments(
                info.id,
                Moments {
                    m: tensor(m),
                    v: tensor(v),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use distill_core::testing::snapshot;

    use super::*;

    fn fixtures() -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
    }

    fn recipe(out: &Path, extra: &[&str]) -> Recipe {
        let fx = fixtures();
        let mut sets = vec![
            format!("student.model={:?}", fx.join("tiny-qwen2").to_str().unwrap()),
            format!("data.dataset={:?}", fx.join("dataset").to_str().unwrap()),
            format!("train.out={:?}", out.to_str().unwrap()),
            "data.held_out=0.1".into(),
            "train.seq_len=256".into(),
            "train.micro_batch=2".into(),
            "train.grad_accum=2".into(),
            "train.warmup_steps=2".into(),
            "train.checkpoint_every=3".into(),
            "loss.kd_ratio=0.0".into(),
            "loss.chunk_tokens=100".into(),
        ];
        sets.extend(extra.iter().map(|s| s.to_string()));
        Recipe::parse("name = \"t\"\n", Path::new("test.toml"), &sets).unwrap()
    }

    /// Training runs seed the backend's global generator (dropout); tests running side by side
    /// would draw from it in between, so they take turns.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn run(r: &Recipe, resume: bool, stop_after: Option<usize>) -> TrainReport {
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        train::<Flex>(
            r,
            Default::default(),
            &TrainOptions {
                resume,
                stop_after,
                progress: &distill_core::progress::Silent,
            },
        )
        .unwrap()
    }

    #[test]
    fn full_finetune_loss_decreases_and_exports() {
        let out = tempfile::tempdir().unwrap();
        let r = recipe(
            out.path(),
            &[
                "lora.enabled=false",
                "train.max_steps=12",
                "train.lr=3e-3",
                "train.recompute=false",
            ],
        );
        let report = run(&r, false, None);
        assert_eq!(report.steps, 12);
        assert_eq!(
            report.stats.skipped_truncated_generation, 3,
            "every 16th fixture sample is cut off"
        );
        let first: f64 = report.losses[..3].iter().sum::<f64>() / 3.0;
        let last: f64 = report.losses[9..].iter().sum::<f64>() / 3.0;
        assert!(last < first * 0.9, "loss did not fall: {:?}", report.losses);
        let export = report.export.unwrap();
        let reloaded = CausalLm::<Flex>::load(&export, &Default::default()).unwrap();
        assert_eq!(reloaded.config.vocab_size, 384);
        assert!(report.run_dir.join("metrics.jsonl").exists() && report.run_dir.join("curves.png").exists());
    }

    /// QLoRA: the base's linear layers in NF4 on the device. It trains, starts near the dense
    /// LoRA run (only the base's rounding differs), and the export merges the adapters into
    /// the base as stored on disk, not into its 4-bit rounding.
    #[test]
    fn qlora_trains_on_an_nf4_base_and_exports_the_full_precision_merge() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let extra = ["train.max_steps=12", "train.lr=1e-2", "train.recompute=true"];
        let r = recipe(a.path(), &[&extra[..], &["lora.quantize=\"nf4\""]].concat());
        let qlora = run(&r, false, None);
        let dense = run(&recipe(b.path(), &extra), false, None);
        // LoRA on the tiny random model learns slowly (5.89 -> 5.83 over 12 steps); QLoRA
        // follows the dense run step for step, but not bit for bit.
        assert!(qlora.losses[0] != dense.losses[0], "the base was not quantized");
        for (q, d) in qlora.losses.iter().zip(&dense.losses) {
            assert!(
                (q - d).abs() < 0.005 * d,
                "{:?} vs {:?}",
                qlora.losses,
                dense.losses
            );
        }
        let first: f64 = qlora.losses[..3].iter().sum::<f64>() / 3.0;
        let last: f64 = qlora.losses[9..].iter().sum::<f64>() / 3.0;
        assert!(last < first - 0.03, "loss did not fall: {:?}", qlora.losses);

        // The merge, from the base's files and the PEFT adapter: W + (alpha / r) B A.
        let read = |path: PathBuf| -> HostTensors {
            let bytes = std::fs::read(&path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            st.tensors()
                .into_iter()
                .map(|(name, v)| {
                    let data = v
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect();
                    (name, (v.shape().to_vec(), data))
                })
                .collect()
        };
        let export = qlora.export.unwrap();
        let merged = read(export.join("model.safetensors"));
        let base = read(fixtures().join("tiny-qwen2/model.safetensors"));
        let adapter = read(run_root(&r).join("adapter/adapter_model.safetensors"));
        let scale = (r.lora.alpha / r.lora.r as f64) as f32;
        let name = "model.layers.1.mlp.down_proj";
        let peft = |f: &str| &adapter[&format!("base_model.model.{name}.lora_{f}.weight")];
        let ((_, a), (b_shape, b)) = (peft("A"), peft("B")); // [r, in], [out, r]
        let (w_shape, w) = &base[&format!("{name}.weight")];
        let (rank, d_in) = (b_shape[1], w_shape[1]);
        let got = &merged[&format!("{name}.weight")].1;
        let mut moved = 0f32;
        for (k, (w, got)) in w.iter().zip(got).enumerate() {
            let (o, i) = (k / d_in, k % d_in);
            let delta: f32 = (0..rank).map(|j| b[o * rank + j] * a[j * d_in + i]).sum();
            assert!(
                (w + scale * delta - got).abs() < 1e-5,
                "{name}[{o}, {i}]: {got} vs {w} + {delta}"
            );
            moved = moved.max(delta.abs());
        }
        assert!(moved > 1e-4, "the adapter trained");
    }

    #[test]
    fn recompute_gives_the_same_steps_as_keeping_graphs() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let keep = run(
            &recipe(a.path(), &["train.max_steps=3", "train.recompute=false"]),
            false,
            None,
        );
        let redo = run(
            &recipe(b.path(), &["train.max_steps=3", "train.recompute=true"]),
            false,
            None,
        );
        for (x, y) in keep.losses.iter().zip(&redo.losses) {
            assert!((x - y).abs() < 1e-6, "{:?} vs {:?}", keep.losses, redo.losses);
        }
    }

    #[test]
    fn an_interrupted_and_resumed_run_matches_an_uninterrupted_one() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let extra = ["train.max_steps=7", "train.lr=1e-3", "lora.dropout=0.1"];
        let whole = run(&recipe(a.path(), &extra), false, None);
        let r = recipe(b.path(), &extra);
        let first = run(&r, false, Some(4)); // checkpoints at step 3; steps 4 is lost on "crash"
        assert_eq!(first.steps, 4);
        assert!(first.export.is_none());
        let rest = run(&r, true, None);
        assert_eq!(rest.steps, 7);
        let resumed: Vec<f64> = first.losses[..3].iter().chain(&rest.losses).copied().collect();
        assert_eq!(resumed.len(), whole.losses.len());
        for (x, y) in whole.losses.iter().zip(&resumed) {
            assert!(
                (x - y).abs() < 1e-6,
                "uninterrupted {:?}\nresumed       {resumed:?}",
                whole.losses
            );
        }
        let adapter = run_root(&r).join("adapter");
        assert!(
            adapter.join("adapter_config.json").exists()
                && adapter.join("adapter_model.safetensors").exists()
        );
    }

    #[test]
    fn kd_from_a_local_teacher_reduces_the_divergence() {
        // With the teacher in bf16/f32 and in NF4: its rounded weights give other logits (the
        // first step's KL differs) and the student learns to match either.
        let mut first_kl = Vec::new();
        for quantize in ["none", "nf4"] {
            let out = tempfile::tempdir().unwrap();
            let teacher = fixtures().join("tiny-llama");
            let r = recipe(
                out.path(),
                &[
                    &format!("teacher.local_model={:?}", teacher.to_str().unwrap()),
                    &format!("teacher.local_quantize={quantize:?}"),
                    "loss.kd_ratio=1.0",
                    "loss.temperature=2.0",
                    "lora.enabled=false",
                    "train.max_steps=10",
                    "train.lr=3e-3",
                ],
            );
            let report = run(&r, false, None);
            let log = crate::metrics::read_metrics(&report.run_dir.join("metrics.jsonl")).unwrap();
            let (first, last) = (log.first().unwrap().kl, log.last().unwrap().kl);
            assert!(
                first > 0.0 && last < first * 0.8,
                "{quantize}: KL {first} -> {last}"
            );
            first_kl.push(first);
        }
        let (dense, nf4) = (first_kl[0], first_kl[1]);
        assert!(
            dense != nf4 && (dense - nf4).abs() < 0.2 * dense,
            "first KL {dense} vs {nf4} (NF4)"
        );
    }

    fn on_policy_recipe(out: &Path, extra: &[&str]) -> Recipe {
        let teacher = fixtures().join("tiny-llama");
        let sets = [
            &[
                format!("teacher.local_model={:?}", teacher.to_str().unwrap()),
                "on_policy.share=1.0".to_string(),
                "on_policy.max_new_tokens=24".to_string(),
                "on_policy.temperature=1.0".to_string(),
                "lora.enabled=false".to_string(),
                "train.lr=3e-3".to_string(),
            ][..],
            &extra.iter().map(|s| s.to_string()).collect::<Vec<_>>()[..],
        ]
        .concat();
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        recipe(out, &sets)
    }

    /// The student samples, the teacher grades: with either divergence, the per-token reverse
    /// KL to the teacher on the student's own samples of held-out prompts falls.
    #[test]
    fn on_policy_distillation_lowers_the_held_out_reverse_kl() {
        for divergence in ["jsd", "sampled_reverse_kl"] {
            let out = tempfile::tempdir().unwrap();
            let r = on_policy_recipe(
                out.path(),
                &[
                    &format!("on_policy.divergence={divergence:?}"),
                    "on_policy.beta=1.0",
                    "train.micro_batch=4",
                    "train.grad_accum=4",
                    "train.max_steps=12",
                ],
            );
            let report = run(&r, false, None);
            let op = report.on_policy.clone().unwrap();
            assert_eq!(op.steps, 12, "{divergence}");
            let (before, after) = (op.reverse_kl_before.unwrap(), op.reverse_kl_after.unwrap());
            eprintln!("{divergence}: held-out reverse KL {before} -> {after}");
            assert!(
                after < 0.8 * before,
                "{divergence}: held-out reverse KL {before} -> {after}"
            );
            let log = crate::metrics::read_metrics(&report.run_dir.join("metrics.jsonl")).unwrap();
            let line = &log[0].extra;
            assert_eq!(line["on_policy"], serde_json::Value::Bool(true));
            let len = line["sample_len"].as_f64().unwrap();
            assert!(len > 0.0 && len <= 24.0, "{line:?}");
            assert!(
                line.contains_key("gen_tokens_per_s") && line.contains_key("train_share"),
                "{line:?}"
            );
        }
    }

    /// Steps are drawn on-policy with probability `share`, the same draw on every run.
    #[test]
    fn on_policy_steps_follow_the_share() {
        for share in [0.0, 0.25, 0.5, 1.0] {
            let n = (0..4000)
                .filter(|&s| crate::on_policy::on_policy_step(7, share, s))
                .count();
            assert!(
                (n as f64 / 4000.0 - share).abs() < 0.03,
                "share {share}: {n} of 4000"
            );
        }
        let a: Vec<bool> = (0..50)
            .map(|s| crate::on_policy::on_policy_step(7, 0.5, s))
            .collect();
        let b: Vec<bool> = (0..50)
            .map(|s| crate::on_policy::on_policy_step(7, 0.5, s))
            .collect();
        assert_eq!(a, b);
    }

    /// A run stopped after a checkpoint that falls inside a buffer window (its samples were
    /// drawn from older weights) resumes on the very samples it would have trained on, and
    /// ends where the uninterrupted run ends; off-policy steps mixed in alike.
    #[test]
    fn an_interrupted_on_policy_run_resumes_to_the_same_losses() {
        let extra = [
            "on_policy.share=0.5",
            "on_policy.buffer_steps=2",
            "on_policy.samples_per_prompt=2",
            "train.max_steps=8",
        ];
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let whole = run(&on_policy_recipe(a.path(), &extra), false, None);
        let r = on_policy_recipe(b.path(), &extra);
        let first = run(&r, false, Some(4)); // checkpoint at step 3; step 4 is lost on "crash"
        let kept = run_root(&r).join("step-3").join(crate::on_policy::ROLLOUTS);
        let on: Vec<bool> = (0..3)
            .map(|s| crate::on_policy::on_policy_step(r.train.seed, 0.5, s))
            .collect();
        let k = on.iter().filter(|&&x| x).count();
        assert_eq!(
            kept.exists(),
            k % 2 == 1,
            "on-policy steps before the checkpoint: {on:?}"
        );
        let rest = run(&r, true, None);
        let resumed: Vec<f64> = first.losses[..3].iter().chain(&rest.losses).copied().collect();
        assert_eq!(resumed.len(), whole.losses.len());
        for (x, y) in whole.losses.iter().zip(&resumed) {
            assert!(
                (x - y).abs() < 1e-6,
                "uninterrupted {:?}\nresumed       {resumed:?}",
                whole.losses
            );
        }
        let mixed = whole.on_policy.unwrap().steps;
        assert!(mixed > 0 && mixed < 8, "{mixed} of 8 steps on-policy");
    }

    /// A run directory as a run leaves it: a checkpoint saved with `r`, logs, the recipe.
    fn earlier_run(r: &Recipe, step: usize) -> PathBuf {
        let root = run_root(r);
        let state = TrainState {
            format_version: checkpoint::FORMAT_VERSION,
            step,
            total_steps: 10,
            adam_t: step as u64,
            tokens_seen: 0,
            skipped_steps: 0,
            recipe_hash: r.hash(),
            tokenizer_sha256: "t".into(),
        };
        let none = HostTensors::new();
        checkpoint::save(&root, &state, &none, &none, &r.to_toml(), &[], 2).unwrap();
        std::fs::create_dir_all(root.join("runs")).unwrap();
        std::fs::write(root.join("runs/metrics.jsonl"), "{\"step\": 1}\n").unwrap();
        std::fs::write(root.join("recipe.toml"), r.to_toml()).unwrap();
        root
    }

    fn train_err(r: &Recipe, resume: bool) -> String {
        let opts = TrainOptions {
            resume,
            stop_after: None,
            progress: &distill_core::progress::Silent,
        };
        match train::<Flex>(r, Default::default(), &opts) {
            Ok(_) => panic!("trained; expected a refusal"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_fresh_run_over_an_earlier_one_is_refused_and_touches_nothing() {
        let out = tempfile::tempdir().unwrap();
        let r = recipe(out.path(), &["train.max_steps=2"]);
        let root = earlier_run(&r, 1);
        let before = snapshot(out.path());
        let err = train_err(&r, false);
        assert!(
            err.contains(&format!("{} already holds a run", root.display()))
                && err.contains("step-1/")
                && err.contains("--resume")
                && err.contains("--set train.out=")
                && err.contains("--set name="),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        assert_eq!(snapshot(out.path()), before);

        // Logs but no checkpoint (a run stopped before its first save): --resume is no way on.
        std::fs::remove_dir_all(root.join("step-1")).unwrap();
        let err = train_err(&r, false);
        assert!(err.contains("no checkpoint to resume; move it aside"), "{err}");
        let err = train_err(&r, true);
        assert!(
            err.contains("--resume: no checkpoint")
                && err.contains("it holds recipe.toml, runs/")
                && err.contains("move it aside"),
            "{err}"
        );
    }

    #[test]
    fn resume_without_a_checkpoint_is_refused() {
        let out = tempfile::tempdir().unwrap();
        let r = recipe(out.path(), &["train.max_steps=2"]);
        let err = train_err(&r, true);
        assert!(
            err.contains(&format!(
                "no checkpoint (step-N/ with state.json) in {}",
                run_root(&r).display()
            )) && err.contains("nothing has been saved there")
                && err.contains("run without --resume"),
            "{err}"
        );
        assert!(!run_root(&r).exists(), "a refused run created its directory");
    }

    #[test]
    fn resume_refuses_a_changed_recipe_except_the_allowed_keys() {
        let out = tempfile::tempdir().unwrap();
        let r = recipe(out.path(), &["train.max_steps=4"]);
        let root = earlier_run(&r, 3);
        let before = snapshot(out.path());
        let changed = recipe(
            out.path(),
            &[
                "train.max_steps=8",
                "train.lr=5e-3",
                "lora.r=4",
                "train.log_every=2",
            ],
        );
        let err = train_err(&changed, true);
        assert!(
            err.contains(&root.join("step-3/recipe.toml").display().to_string())
                && err.contains("lora.r was 16, is 4; train.lr was 0.0001, is 0.005; HINT: set them back"),
            "{err}"
        );
        assert!(!err.contains("max_steps") && !err.contains("log_every"), "{err}");
        assert_eq!(snapshot(out.path()), before);

        // Only keys that may change: resumed from the newest checkpoint.
        let allowed = recipe(
            out.path(),
            &[
                "train.max_steps=8",
                "train.checkpoint_every=5",
                "train.keep_checkpoints=4",
                "train.log_every=2",
                "train.recompute=false",
                "loss.chunk_tokens=64",
                "gen.temperature=0.9",
                "eval.n=4",
            ],
        );
        assert_eq!(check_run_dir(&allowed, true).unwrap(), Some(root.join("step-3")));
    }

    #[test]
    fn diverging_runs_stop_with_the_last_checkpoint_named() {
        let out = tempfile::tempdir().unwrap();
        let r = recipe(
            out.path(),
            &[
                "lora.enabled=false",
                "train.max_steps=20",
                "train.lr=1e30",
                "train.warmup_steps=0",
                "train.max_grad_norm=0",
                "train.max_bad_steps=2",
                "train.checkpoint_every=1",
            ],
        );
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let err = train::<Flex>(
            &r,
            Default::default(),
            &TrainOptions {
                resume: false,
                stop_after: None,
                progress: &distill_core::progress::Silent,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("non-finite") && err.contains("step-"), "{err}");
        let kept = checkpoint::list(&run_root(&r));
        assert!(!kept.is_empty());
        checkpoint::load(&kept.last().unwrap().1).unwrap();
    }
}
