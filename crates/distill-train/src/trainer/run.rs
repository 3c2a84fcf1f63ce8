//! A run between steps: setup (data, models, resume), per-step bookkeeping (metrics,
//! TensorBoard, checkpoints) and the end (held-out figures, export).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{DType, Tensor, TensorData};
use distill_core::Recipe;
use distill_core::progress::Progress;
use distill_core::recipe::{BaseQuant, OnPolicyTeacher};
use distill_data::examples::{self as data, DataOptions, Example, Row};
use distill_hf::hub::{self, HubSettings};
use distill_hf::tokenizer::TextTokenizer;
use distill_models::{CausalLm, Kernels};

use super::step::{held_out_loss, new_optimizer, no_phases, optimizer_step, step_rows, trainable_student};
use super::teacher::{Teacher, load_local_teacher, load_teacher};
use super::{Ad, PhaseHook, TrainError, TrainReport, check_run_dir, run_root};
use crate::checkpoint::{self, HostTensors, TrainState};
use crate::export;
use crate::lora;
use crate::loss::LossConfig;
use crate::metrics::{MetricsLog, MetricsRecord};
use crate::on_policy::{OnPolicy, RolloutStats};
use crate::optim::{AdamW, Moments, learning_rate};
use crate::parallel::{Collective, shard};
use crate::params::{ParamInfo, param_infos, read_params};
use crate::soft::SoftStats;
use crate::tensorboard::EventWriter;

/// A run between optimizer steps: its data, teacher, optimizer, counters and logs. The model
/// travels beside it, as each optimizer step consumes it and returns the next.
pub(super) struct Run<'r, B: Kernels>
where
    Ad<B>: Kernels,
{
    recipe: &'r Recipe,
    device: B::Device,
    student_dir: PathBuf,
    tokenizer: TextTokenizer,
    train_set: Vec<Example>,
    held_out: Vec<Example>,
    stats: data::DataStats,
    pad_id: u32,
    teacher: Teacher<B>,
    soft_labels: Option<SoftStats>,
    on_policy: Option<OnPolicy<B>>,
    loss_cfg: LossConfig,
    infos: Vec<ParamInfo>,
    opt: AdamW<B>,
    rows_per_step: usize,
    steps_per_epoch: usize,
    state: TrainState,
    root: PathBuf,
    run_dir: PathBuf,
    recipe_toml: String,
    /// metrics.jsonl and TensorBoard: data-parallel worker 0's alone, like every file of the
    /// run ([`crate::parallel`]); None on the other workers.
    logs: Option<Logs>,
    group: &'r dyn Collective<B>,
    losses: Vec<f64>,
    consecutive_bad: usize,
    last_checkpoint: Option<PathBuf>,
    epoch_cache: Option<(u64, Vec<Row>)>,
    phases: PhaseWindow,
}

impl<'r, B: Kernels> Run<'r, B>
where
    Ad<B>: Kernels + BackendTypes<Device = B::Device>,
{
    /// Everything before the first step: the run directory checked, the data tokenized, the
    /// student (with LoRA or trainable in full), the teacher, the optimizer, the state of the
    /// checkpoint resumed from, and the logs opened.
    pub(super) fn open(
        recipe: &'r Recipe,
        device: B::Device,
        resume: bool,
        group: &'r dyn Collective<B>,
    ) -> Result<(Self, CausalLm<Ad<B>>), TrainError> {
        let resume_from = check_run_dir(recipe, resume)?;
        // Every worker has looked at the run directory before the first writes to it.
        group.barrier()?;
        // Exact-size buffers keep a training step's memory tight, but generation asks for new
        // sizes at every token (its KV cache grows), each a fresh device allocation kept until
        // trimmed: on-policy runs, which sample inside the loop, keep the backend's paged pool.
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

        if let Some(op) = on_policy.as_mut() {
            op.for_worker(group.rank(), group.world());
        }
        let infos = param_infos(&model);
        let mut opt = new_optimizer(&model, t);
        if group.world() > 1 {
            let trainable: Vec<_> = infos
                .iter()
                .filter(|p| p.trainable)
                .map(|p| (p.id, p.shape.iter().product()))
                .collect();
            opt.shard(crate::optim::owners(&trainable, group.world()), group.rank());
        }
        let rows_per_step = t.micro_batch * t.grad_accum;
        let rows_epoch0 = data::epoch_rows(&train_set, t.seed, 0, t.seq_len, t.packing, pad_id).len();
        let steps_per_epoch = rows_epoch0.div_ceil(rows_per_step).max(1);
        let total_steps = t
            .max_steps
            .unwrap_or(((t.epochs * steps_per_epoch as f64).ceil() as usize).max(1));
        let mut state = TrainState {
            format_version: checkpoint::FORMAT_VERSION,
            step: 0,
            total_steps,
            adam_t: 0,
            tokens_seen: 0,
            skipped_steps: 0,
            recipe_hash: recipe.hash(),
            tokenizer_sha256: tokenizer.hash.clone(),
            train_seconds: 0.0,
        };
        if let Some(dir) = resume_from {
            // A worker of a sharded optimizer reads only the moments it keeps.
            let mine: std::collections::BTreeSet<&str> = infos
                .iter()
                .filter(|p| p.trainable && opt.owns(&p.id))
                .map(|p| p.name.as_str())
                .collect();
            let loaded = checkpoint::load_where(&dir, |name| mine.contains(name))?;
            if loaded.state.tokenizer_sha256 != tokenizer.hash {
                return Err(TrainError::Refused(format!(
                    "{}: made with another tokenizer than {}; HINT: resume with the student it was trained from",
                    dir.display(),
                    student_dir.display()
                )));
            }
            model = restore_params(model, &infos, &loaded.weights, &dir)?;
            restore_moments(&mut opt, &infos, &loaded.moments, &device)?;
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

        let root = run_root(recipe);
        let run_dir = root.join("runs");
        let recipe_toml = recipe.to_toml();
        let logs = if group.rank() == 0 {
            let io = |path: PathBuf| move |error| checkpoint::CheckpointError::Io { path, error };
            std::fs::create_dir_all(&root).map_err(io(root.clone()))?;
            distill_core::fsutil::write_atomic(&root.join("recipe.toml"), recipe_toml.as_bytes())
                .map_err(io(root.join("recipe.toml")))?;
            Some(Logs {
                metrics: MetricsLog::open(&run_dir.join(crate::metrics::METRICS_FILE))?,
                tb: EventWriter::create(&run_dir.join("tb"))?,
            })
        } else {
            None
        };

        let loss_cfg = LossConfig::from_recipe(&recipe.loss, Some(tokenizer.vocab_size()));
        let run = Run {
            recipe,
            device,
            student_dir,
            tokenizer,
            train_set,
            held_out,
            stats,
            pad_id,
            teacher,
            soft_labels,
            on_policy,
            loss_cfg,
            infos,
            opt,
            rows_per_step,
            steps_per_epoch,
            state,
            root,
            run_dir,
            recipe_toml,
            logs,
            group,
            losses: Vec::new(),
            consecutive_bad: 0,
            last_checkpoint: None,
            phases: PhaseWindow::default(),
            epoch_cache: None,
        };
        Ok((run, model))
    }

    pub(super) fn steps_done(&self) -> usize {
        self.state.step
    }

    pub(super) fn total_steps(&self) -> usize {
        self.state.total_steps
    }

    /// An on-policy run's held-out reverse KL before its first step.
    pub(super) fn before_training(&mut self, model: &CausalLm<Ad<B>>) -> Result<(), TrainError> {
        if let (Some(op), 0, Some(logs)) = (self.on_policy.as_mut(), self.state.step, self.logs.as_mut()) {
            op.report.reverse_kl_before = held_out_reverse_kl(
                op,
                model,
                &self.tokenizer,
                self.recipe,
                self.pad_id,
                &mut logs.tb,
                0,
                &self.device,
            )?;
        }
        Ok(())
    }

    /// One optimizer step: its rows (the dataset's, or the student's own samples graded by
    /// the teacher), the update, the metrics line and, when due, a checkpoint.
    pub(super) fn step(
        &mut self,
        model: CausalLm<Ad<B>>,
        progress: &dyn Progress,
    ) -> Result<CausalLm<Ad<B>>, TrainError> {
        let started = Instant::now();
        let (recipe, t) = (self.recipe, &self.recipe.train);
        let step = self.state.step;
        <Ad<B> as Backend>::seed(&self.device, t.seed.wrapping_add(step as u64 + 1));
        let mut extra = serde_json::Map::new();
        let on_step = self.on_policy.as_ref().is_some_and(|op| op.is_on_policy(step));
        // On-policy steps time their phases (a device sync at each: a few per micro-batch) to
        // report the step's split into sampling, teacher scoring and training.
        let (mut scoring, mut sampling) = (0.0, None);
        let (rows, step_teacher, step_loss) = match self.on_policy.as_mut().filter(|_| on_step) {
            Some(op) => {
                progress.message("on-policy: sampling");
                let (rollouts, sampled) = op.rollouts(
                    &model.valid(),
                    &self.tokenizer,
                    step,
                    self.rows_per_step,
                    &self.device,
                )?;
                log_rollouts(&mut extra, &rollouts);
                sampling = sampled;
                progress.message("on-policy: grading");
                let graded = Instant::now();
                let rows = op.rows(&rollouts, self.pad_id)?;
                scoring += graded.elapsed().as_secs_f64();
                (rows, &op.teacher, &op.loss)
            }
            None => {
                let mut rows = step_rows(
                    &self.train_set,
                    t,
                    step,
                    self.steps_per_epoch,
                    self.rows_per_step,
                    self.pad_id,
                    &mut self.epoch_cache,
                );
                let mine = shard(rows.len(), self.group.rank(), self.group.world());
                rows.truncate(mine.end);
                rows.drain(..mine.start);
                (rows, &self.teacher, &self.loss_cfg)
            }
        };
        if on_step {
            progress.message("on-policy: training");
        }
        let lr = learning_rate(t, step, self.state.total_steps);
        let mut since = Instant::now();
        let device = &self.device;
        let mut timed = |name: &'static str| {
            let _ = B::sync(device);
            if name == "teacher" {
                scoring += since.elapsed().as_secs_f64();
            }
            since = Instant::now();
        };
        let hook: PhaseHook = if on_step { &mut timed } else { &mut no_phases };
        let (model, outcome) = optimizer_step(
            model,
            &mut self.opt,
            step_teacher,
            &rows,
            step_loss,
            recipe,
            lr,
            device,
            self.group,
            hook,
        )?;
        if self.on_policy.is_some() {
            extra.insert("on_policy".into(), on_step.into());
        }
        let step_s = started.elapsed().as_secs_f64();
        if on_step {
            self.phases.add(step_s, scoring, sampling);
        }
        self.state.step += 1;
        self.state.train_seconds += step_s;
        progress.advance(1);
        if !outcome.applied {
            return self.skipped(model);
        }
        self.consecutive_bad = 0;
        self.state.adam_t = self.opt.t;
        self.state.tokens_seen += outcome.tokens as u64;
        self.losses.push(outcome.loss);
        let tokens_per_s = outcome.tokens as f64 / step_s.max(1e-9);
        let at = self.state.step;
        progress.message(&format!(
            "loss {:.4} | {tokens_per_s:.0} tok/s | skipped {}",
            outcome.loss, self.state.skipped_steps
        ));
        if let Some(logs) = self.logs.as_mut()
            && (at.is_multiple_of(t.log_every.max(1)) || at == self.state.total_steps)
        {
            if self.on_policy.is_some() {
                self.phases.drain_into(&mut extra);
            }
            extra.insert("train_s".into(), self.state.train_seconds.into());
            let record = MetricsRecord {
                step: at as u64,
                loss: outcome.loss,
                kl: outcome.kl,
                ce: outcome.ce,
                lr,
                grad_norm: outcome.grad_norm,
                tokens_per_s,
                mem_gb: None,
                extra,
            };
            log_record(logs, &record)?;
        }
        if at.is_multiple_of(t.checkpoint_every.max(1)) || at == self.state.total_steps {
            self.checkpoint(&model)?;
        }
        let export_due =
            t.export_every > 0 && at.is_multiple_of(t.export_every) && at < self.state.total_steps;
        if export_due && self.logs.is_some() {
            let dir = self.root.join("exports").join(format!("step-{at}"));
            export_model(model.valid(), self.recipe, &self.student_dir, &dir)?;
        }
        Ok(model)
    }

    /// A step whose loss or gradient was not finite left the model as it was; too many in a
    /// row stop the run.
    fn skipped(&mut self, model: CausalLm<Ad<B>>) -> Result<CausalLm<Ad<B>>, TrainError> {
        self.consecutive_bad += 1;
        self.state.skipped_steps += 1;
        if self.consecutive_bad >= self.recipe.train.max_bad_steps {
            return Err(TrainError::Refused(format!(
                "{} steps in a row had a non-finite loss or gradient (step {}); \
                 the last good checkpoint is {}; HINT: lower [train] lr or check the data",
                self.consecutive_bad,
                self.state.step - 1,
                self.last_checkpoint
                    .as_ref()
                    .map_or("none".to_string(), |p| p.display().to_string())
            )));
        }
        Ok(model)
    }

    /// step-N/ with the trainable weights, the optimizer's moments, the state and, mid-way
    /// through an on-policy buffer, its unused samples.
    /// Every data-parallel worker takes part (the moments are sharded among them); worker 0
    /// writes.
    fn checkpoint(&mut self, model: &CausalLm<Ad<B>>) -> Result<(), TrainError> {
        let moments = checkpoint_moments(&self.infos, &self.opt, self.group, &self.device)?;
        let window = match self.on_policy.as_ref() {
            Some(op) => op.unfinished_window(self.state.step, self.group)?,
            None => None,
        };
        if self.group.rank() != 0 {
            return Ok(());
        }
        let extra: Vec<(&str, &[u8])> = window
            .as_deref()
            .map(|w| (crate::on_policy::ROLLOUTS, w))
            .into_iter()
            .collect();
        self.last_checkpoint = Some(save_checkpoint(
            &self.root,
            model,
            &moments,
            &self.state,
            &self.recipe_toml,
            &extra,
            self.recipe.train.keep_checkpoints,
        )?);
        Ok(())
    }

    /// After the last step (of the run, not of an interrupted call): the held-out loss and
    /// reverse KL, the export and the curves' plot.
    pub(super) fn finish(mut self, model: CausalLm<Ad<B>>) -> Result<TrainReport, TrainError> {
        let step = self.state.step;
        let export = if let (true, Some(logs)) = (step >= self.state.total_steps, self.logs.as_mut()) {
            let held_loss = held_out_loss(
                &model,
                &self.teacher,
                &self.held_out,
                &self.loss_cfg,
                self.recipe,
                self.pad_id,
                &self.device,
            )?;
            if let Some(l) = held_loss {
                logs.tb.add_scalar("eval/held_out_loss", l as f32, step as i64)?;
            }
            if let Some(op) = self.on_policy.as_mut() {
                op.report.reverse_kl_after = held_out_reverse_kl(
                    op,
                    &model,
                    &self.tokenizer,
                    self.recipe,
                    self.pad_id,
                    &mut logs.tb,
                    step as i64,
                    &self.device,
                )?;
            }
            logs.tb.flush()?;
            let dir = export_run(model.valid(), self.recipe, &self.student_dir, &self.root)?;
            crate::metrics::plot_curves(logs.metrics.path(), &self.run_dir.join("curves.png")).ok();
            Some(dir)
        } else {
            None
        };
        Ok(TrainReport {
            steps: step,
            total_steps: self.state.total_steps,
            losses: self.losses,
            skipped_steps: self.state.skipped_steps,
            checkpoint: self.last_checkpoint,
            export,
            run_dir: self.run_dir,
            stats: self.stats,
            train_seconds: self.state.train_seconds,
            soft_labels: self.soft_labels,
            on_policy: self.on_policy.map(|op| op.report),
        })
    }
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

/// `final/` in HF format (see [`export_model`]) and, for LoRA, `adapter/` in PEFT format.
/// Returns `final/`.
fn export_run<B: Kernels>(
    inner: CausalLm<B>,
    recipe: &Recipe,
    student_dir: &Path,
    root: &Path,
) -> Result<PathBuf, TrainError> {
    if recipe.lora.enabled {
        export::export_peft(&inner, &recipe.lora, &recipe.student.model, &root.join("adapter"))?;
    }
    export_model(inner, recipe, student_dir, &root.join("final"))
}

/// The student as an HF model directory at `out`: LoRA merged, into the base as stored on
/// disk for QLoRA.
fn export_model<B: Kernels>(
    inner: CausalLm<B>,
    recipe: &Recipe,
    student_dir: &Path,
    out: &Path,
) -> Result<PathBuf, TrainError> {
    Ok(match (recipe.lora.enabled, recipe.lora.quantize) {
        (true, BaseQuant::Nf4) => {
            let scale = recipe.lora.alpha / recipe.lora.r as f64;
            export::export_merged_base(&inner, scale, student_dir, out)?
        }
        (true, BaseQuant::None) => export::export_hf(&lora::merge(inner), student_dir, out)?,
        (false, _) => export::export_hf(&inner, student_dir, out)?,
    })
}

/// One metrics line to metrics.jsonl and its figures to TensorBoard: the standard ones under
/// `train/`, an on-policy step's numeric extras under `on_policy/`.
fn log_record(logs: &mut Logs, r: &MetricsRecord) -> Result<(), TrainError> {
    let Logs { metrics, tb } = logs;
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

/// Where a run's figures go: metrics.jsonl and TensorBoard's event file.
struct Logs {
    metrics: MetricsLog,
    tb: EventWriter,
}

/// On-policy phases summed over the steps since the last metrics line, so that a line's split
/// covers every step it stands for: with `buffer_steps` > 1 only some steps sample, and
/// they need not be the ones logged.
#[derive(Default)]
struct PhaseWindow {
    /// Whole on-policy steps, the sampling within them, and the teacher's scoring.
    step_s: f64,
    gen_s: f64,
    score_s: f64,
    gen_tokens: usize,
}

impl PhaseWindow {
    fn add(&mut self, step_s: f64, scoring: f64, sampled: Option<RolloutStats>) {
        self.step_s += step_s;
        self.score_s += scoring;
        if let Some(s) = sampled {
            self.gen_s += s.seconds;
            self.gen_tokens += s.new_tokens;
        }
    }

    /// `gen_s`, `score_s`, `gen_tokens_per_s` (when the window sampled) and the window's split
    /// into `gen_share`, `score_share` and `train_share`; then an empty window.
    fn drain_into(&mut self, extra: &mut serde_json::Map<String, serde_json::Value>) {
        let w = std::mem::take(self);
        if w.step_s <= 0.0 {
            return;
        }
        let training = (w.step_s - w.gen_s - w.score_s).max(0.0);
        extra.insert("gen_s".into(), w.gen_s.into());
        extra.insert("score_s".into(), w.score_s.into());
        if w.gen_s > 0.0 {
            extra.insert("gen_tokens_per_s".into(), (w.gen_tokens as f64 / w.gen_s).into());
        }
        extra.insert("gen_share".into(), (w.gen_s / w.step_s).into());
        extra.insert("score_share".into(), (w.score_s / w.step_s).into());
        extra.insert("train_share".into(), (training / w.step_s).into());
    }
}

/// An on-policy step's rollouts for its metrics line: mean completion length and the share
/// cut at max_new_tokens.
fn log_rollouts(
    extra: &mut serde_json::Map<String, serde_json::Value>,
    rollouts: &[crate::on_policy::Rollout],
) {
    let n = rollouts.len().max(1) as f64;
    let tokens: usize = rollouts.iter().map(|r| r.completion.len()).sum();
    let cut = rollouts
        .iter()
        .filter(|r| r.finish == distill_infer::generate::FinishReason::Length)
        .count();
    extra.insert("sample_len".into(), (tokens as f64 / n).into());
    extra.insert("truncated_share".into(), (cut as f64 / n).into());
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

#[allow(clippy::too_many_arguments)]
fn save_checkpoint<B: Kernels>(
    root: &Path,
    model: &CausalLm<Ad<B>>,
    moments: &HostTensors,
    state: &TrainState,
    recipe_toml: &str,
    extra: &[(&str, &[u8])],
    keep: usize,
) -> Result<PathBuf, TrainError>
where
    Ad<B>: Kernels,
{
    let weights = read_params(model, |p| p.trainable);
    Ok(checkpoint::save(
        root,
        state,
        &weights,
        moments,
        recipe_toml,
        extra,
        keep,
    )?)
}

/// The AdamW moments of every trainable parameter, in host memory on worker 0 (empty on
/// the others). With a sharded optimizer each parameter's owner sends them.
fn checkpoint_moments<B: Kernels>(
    infos: &[ParamInfo],
    opt: &AdamW<B>,
    workers: &dyn Collective<B>,
    device: &B::Device,
) -> Result<HostTensors, TrainError> {
    let host = |t: Tensor<B, 1>| t.into_data().convert::<f32>().into_vec::<f32>().expect("f32");
    let mut out = HostTensors::new();
    if workers.world() == 1 {
        // Every group's moments read once, where they are: on the device, or parked.
        let mut all = opt.host_moments()?;
        for info in infos.iter().filter(|p| p.trainable) {
            if let Some((m, v)) = all.remove(&info.id) {
                let n = m.len();
                out.insert(format!("exp_avg.{}", info.name), (vec![n], m));
                out.insert(format!("exp_avg_sq.{}", info.name), (vec![n], v));
            }
        }
        return Ok(out);
    }
    for info in infos.iter().filter(|p| p.trainable) {
        let n = info.shape.iter().product::<usize>();
        let mine = opt.moments(&info.id).map(|m| (m.m.clone(), m.v.clone()));
        let zeros = || Tensor::<B, 1>::zeros([n], (device, DType::F32));
        let (m, v) = mine.unwrap_or_else(|| (zeros(), zeros()));
        let owner = opt.owner(&info.id);
        let (m, v) = (workers.broadcast(owner, m)?, workers.broadcast(owner, v)?);
        if workers.rank() == 0 {
            out.insert(format!("exp_avg.{}", info.name), (vec![n], host(m)));
            out.insert(format!("exp_avg_sq.{}", info.name), (vec![n], host(v)));
        }
    }
    Ok(out)
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

fn restore_moments<B: Kernels>(
    opt: &mut AdamW<B>,
    infos: &[ParamInfo],
    moments: &HostTensors,
    device: &B::Device,
) -> Result<(), TrainError> {
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
            )?;
        }
    }
    Ok(())
}
