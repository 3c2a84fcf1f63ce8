//! `distill eval`: students next to their base model (and the teacher) on held-out sets.
//!
//! With `--recipe`, the recipe's trained student (`<train.out>/<name>/final`), its base
//! student, the local teacher and `[eval] models` are scored on `[eval] tasks`, the held-out
//! teacher samples of `[data] dataset` and (with `[eval] probes`) the behaviour probes;
//! contamination is checked against the recipe's training prompts. Flags add to or
//! override that; without a recipe, flags say everything.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::backend::Autodiff;
use burn::tensor::backend::BackendTypes;
use distill_core::Recipe;
use distill_data::is_held_out;
use distill_eval::contamination::TrainingPrompts;
use distill_eval::report::{self, Report, Settings};
use distill_eval::run::{self, HeldOutSpec, ModelSpec, Plan};
use distill_eval::tasks::{TaskKind, TaskSpec};
use distill_infer::generate::Sampling;
use distill_models::Kernels;

use crate::backend::{DeviceArg, Job, run_on};
use crate::progress::StageBars;

#[derive(clap::Args)]
pub struct Args {
    /// A training recipe: evaluate its trained student against its base model.
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// Override a recipe key, e.g. `--set eval.n=4` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// A model to score: an HF directory or `org/name[@rev]`, optionally `LABEL=MODEL`
    /// (repeatable).
    #[arg(long = "model", value_name = "[LABEL=]MODEL")]
    models: Vec<String>,
    /// A task set with references: JSONL/JSON/Parquet or `hf:org/name:split` (repeatable).
    #[arg(long = "tasks", value_name = "FILE")]
    tasks: Vec<String>,
    /// How task outputs are scored: math (numbers, \boxed{}, #### n), choice or exact.
    /// Default: choice when records have a `choices` list, else math.
    #[arg(long)]
    task_kind: Option<TaskKind>,
    #[arg(long)]
    prompt_field: Option<String>,
    #[arg(long)]
    reference_field: Option<String>,
    #[arg(long)]
    id_field: Option<String>,
    /// A gen-data dataset whose held-out samples are scored by likelihood.
    #[arg(long, value_name = "DIR")]
    held_out: Option<PathBuf>,
    /// The share of prompts held out from training (the recipe's `data.held_out`); 1 scores
    /// every sample.
    #[arg(long)]
    held_out_share: Option<f64>,
    /// Compare every model with this one (by label) example by example on the held-out
    /// samples: differences with 95% intervals in report.md
    #[arg(long, value_name = "LABEL")]
    baseline: Option<String>,
    /// Longest tokenized held-out sample kept (longer ones are cut).
    #[arg(long, default_value_t = 4096)]
    seq_len: usize,
    /// A local teacher sharing the students' tokenizer: held-out KL and top-1 agreement are
    /// measured against its top-k.
    #[arg(long)]
    teacher: Option<String>,
    /// Run the built-in behaviour probes.
    #[arg(long)]
    probes: bool,
    /// Run the probes of this file instead (data/probes/README.md gives the format).
    #[arg(long, value_name = "FILE")]
    probe_file: Option<PathBuf>,
    /// A gen-data dataset used for training: task prompts found among its (non-held-out)
    /// prompts are reported as contaminated.
    #[arg(long, value_name = "DIR")]
    train_data: Option<PathBuf>,
    /// Leave contaminated prompts out of the scores.
    #[arg(long)]
    exclude_contaminated: bool,
    /// Score generations made elsewhere (JSONL with `id` or `prompt`, `output`, optional
    /// `model` and `reference`) without loading a model.
    #[arg(long, value_name = "FILE")]
    predictions: Option<PathBuf>,
    /// Samples per prompt: pass@1 is their mean, maj@n their vote.
    #[arg(short = 'n', long)]
    n: Option<usize>,
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    /// DeepSeek's sampling for R1 and its distills: temperature 0.6, top_p 0.95.
    #[arg(long, conflicts_with_all = ["temperature", "top_p"])]
    r1_sampling: bool,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    max_new_tokens: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// GiB of GPU memory the running batch's KV cache may take; requests wait beyond it,
    /// and rows that outgrow it are set aside and recomputed later, with the same outputs
    /// [default: [eval] kv_cache_gib, else no limit]
    #[arg(long, value_parser = crate::serve::positive_gib)]
    kv_cache_gib: Option<f64>,
    /// First N examples of each task set and of the held-out samples.
    #[arg(long)]
    max_examples: Option<usize>,
    /// Stop generation at this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// A training run's metrics.jsonl to plot beside the scores, optionally `LABEL=FILE`
    /// (repeatable; with several, one plot also shows the runs together)
    #[arg(long = "metrics", value_name = "[LABEL=]FILE")]
    metrics: Vec<String>,
    /// Output directory (default: `<train.out>/<name>/eval` with a recipe, else `eval`).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: Args, device: Option<DeviceArg>) -> anyhow::Result<()> {
    let recipe = args
        .recipe
        .as_ref()
        .map(|p| Recipe::load(p, &args.set))
        .transpose()?;
    let out = args.out.clone().unwrap_or_else(|| match &recipe {
        Some(r) => distill_train::trainer::run_root(r).join("eval"),
        None => PathBuf::from("eval"),
    });
    if let Some(path) = &args.predictions {
        return score_predictions(&args, path, &out);
    }
    let device = DeviceArg::resolve(device);
    let plan = plan(&args, recipe.as_ref(), device)?;
    anyhow::ensure!(
        !plan.models.is_empty(),
        "no models to evaluate; pass --model DIR (repeatable) or --recipe R.toml"
    );
    anyhow::ensure!(
        !plan.tasks.is_empty() || plan.held_out.is_some() || plan.probes.is_some(),
        "nothing to evaluate on; pass --tasks FILE, --held-out DIR or --probes (or set [eval] tasks)"
    );
    let metrics = metrics_logs(&args, recipe.as_ref());
    let (report, examples) = run_on(device, EvalJob { plan })?;
    let curves = training_plots(&out, &metrics)?;
    let plots = report::write_all(&out, &report, &examples, curves)?;
    print!("{}", summary(&report));
    println!(
        "wrote {} ({} examples, {} plots)",
        out.display(),
        examples.len(),
        plots.len()
    );
    Ok(())
}

/// The training curves of each run in `metrics`, and with several runs their curves together,
/// drawn into `out` for report.md to link.
fn training_plots(out: &Path, metrics: &[(String, PathBuf)]) -> anyhow::Result<Vec<PathBuf>> {
    let mut plots = Vec::new();
    for (label, log) in metrics {
        let png = out.join(format!("training_curves-{label}.png"));
        distill_train::metrics::plot_curves(log, &png)
            .with_context(|| format!("plotting {}", log.display()))?;
        plots.push(png);
    }
    if metrics.len() > 1 {
        let png = out.join("training_runs.png");
        distill_train::metrics::plot_runs(metrics, &png).context("plotting the training runs together")?;
        plots.push(png);
    }
    Ok(plots)
}

fn score_predictions(args: &Args, path: &Path, out: &Path) -> anyhow::Result<()> {
    let hub = distill_hf::hub::HubSettings::from_env();
    let set = args
        .tasks
        .first()
        .map(|t| distill_eval::tasks::load(&task_spec(args, t), &hub))
        .transpose()?;
    let kind = args
        .task_kind
        .or(set.as_ref().map(|s| s.kind))
        .unwrap_or(TaskKind::Math);
    let tasks = args.tasks.first().map(String::as_str).zip(set.as_ref());
    let (models, examples) = run::score_predictions(path, tasks, kind)?;
    let report = Report {
        format_version: report::FORMAT_VERSION,
        tool_version: distill_core::TOOL_VERSION,
        settings: Settings {
            generation: None,
            predictions: Some(path.to_path_buf()),
            held_out_baseline: None,
        },
        models,
        contamination: Default::default(),
    };
    report::write_all(out, &report, &examples, Vec::new())?;
    print!("{}", summary(&report));
    println!("wrote {} ({} predictions)", out.display(), examples.len());
    Ok(())
}

fn task_spec(args: &Args, source: &str) -> TaskSpec {
    TaskSpec {
        source: source.to_string(),
        kind: args.task_kind,
        prompt_field: args.prompt_field.clone(),
        reference_field: args.reference_field.clone(),
        id_field: args.id_field.clone(),
        max_examples: args.max_examples,
    }
}

/// The evaluation the flags and the recipe describe; flags win.
fn plan(args: &Args, recipe: Option<&Recipe>, device: DeviceArg) -> anyhow::Result<Plan> {
    let e = recipe.map(|r| r.eval.clone()).unwrap_or_default();
    let mut models = Vec::new();
    if let Some(r) = recipe {
        let student = distill_train::trainer::run_root(r).join("final");
        anyhow::ensure!(
            student.join("config.json").exists(),
            "{}: no exported student here; run `distill train --recipe ...` first",
            student.display()
        );
        models.push(ModelSpec {
            label: "student".into(),
            reference: student.display().to_string(),
        });
        models.push(ModelSpec {
            label: "base".into(),
            reference: r.student.model.clone(),
        });
        if let Some(t) = &r.teacher.local_model {
            models.push(ModelSpec {
                label: "teacher".into(),
                reference: t.clone(),
            });
        }
        models.extend(e.models.iter().map(|m| model_spec(m)));
    }
    models.extend(args.models.iter().map(|m| model_spec(m)));
    dedup_labels(&mut models);

    let mut tasks: Vec<TaskSpec> = e.tasks.iter().map(|t| task_spec(args, t)).collect();
    tasks.extend(args.tasks.iter().map(|t| task_spec(args, t)));
    let max_examples = args.max_examples.or(e.max_examples);
    for t in &mut tasks {
        t.max_examples = max_examples;
    }

    let held_out = match (&args.held_out, recipe) {
        (Some(dir), _) => Some(HeldOutSpec {
            dataset: dir.clone(),
            share: args
                .held_out_share
                .unwrap_or(recipe.map_or(1.0, |r| r.data.held_out)),
            seq_len: args.seq_len,
            max_examples,
            baseline: args.baseline.clone(),
        }),
        (None, Some(r)) if e.held_out => Some(HeldOutSpec {
            dataset: r.data.dataset.clone(),
            share: args.held_out_share.unwrap_or(r.data.held_out),
            seq_len: r.train.seq_len,
            max_examples,
            baseline: args.baseline.clone(),
        }),
        _ => None,
    };
    let teacher = args
        .teacher
        .clone()
        .or_else(|| recipe.and_then(|r| r.teacher.local_model.clone()));
    let probes = if args.probe_file.is_some() || args.probes || e.probes {
        Some(args.probe_file.clone())
    } else {
        None
    };
    let training_prompts = match (&args.train_data, recipe) {
        (Some(dir), _) => Some(training_prompts(dir, args.held_out_share.unwrap_or(0.0))?),
        (None, Some(r)) => Some(training_prompts(&r.data.dataset, r.data.held_out)?),
        _ => None,
    };
    let sampling = if args.r1_sampling {
        Sampling {
            top_k: args.top_k.unwrap_or(e.top_k),
            ..Sampling::R1
        }
    } else {
        Sampling {
            temperature: args.temperature.unwrap_or(e.temperature),
            top_p: args.top_p.unwrap_or(e.top_p),
            top_k: args.top_k.unwrap_or(e.top_k),
        }
    };
    anyhow::ensure!(
        (0.0..=2.0).contains(&sampling.temperature) && sampling.top_p > 0.0 && sampling.top_p <= 1.0,
        "--temperature must be in [0, 2] and --top-p in (0, 1]"
    );
    if let Some(b) = &args.baseline {
        let labels: Vec<&str> = models.iter().map(|m: &ModelSpec| m.label.as_str()).collect();
        anyhow::ensure!(
            labels.contains(&b.as_str()),
            "--baseline {b}: no model has that label; the labels are {}",
            labels.join(", ")
        );
    }
    Ok(Plan {
        models,
        tasks,
        held_out,
        teacher,
        teacher_top_k: e.teacher_top_k,
        probes,
        training_prompts,
        exclude_contaminated: args.exclude_contaminated || e.exclude_contaminated,
        sampling,
        n: args.n.unwrap_or(e.n).max(1),
        max_new_tokens: args.max_new_tokens.unwrap_or(e.max_new_tokens),
        seed: args.seed.unwrap_or(e.seed),
        batch_size: args.batch_size.unwrap_or(e.batch_size).max(1),
        kv_cache_gib: args.kv_cache_gib.or(e.kv_cache_gib),
        stop: args.stop.clone(),
        device: format!("{device:?}").to_lowercase(),
    })
}

/// `LABEL=MODEL`, or MODEL labelled by its last path component (`final` by its run's name).
fn model_spec(text: &str) -> ModelSpec {
    if let Some((label, reference)) = text.split_once('=')
        && !label.is_empty()
        && !label.contains('/')
    {
        return ModelSpec {
            label: label.to_string(),
            reference: reference.to_string(),
        };
    }
    let path = Path::new(text.trim_end_matches('/'));
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let label = match name(path).as_deref() {
        Some("final") => path.parent().and_then(name).unwrap_or_else(|| "final".into()),
        Some(n) => n.to_string(),
        None => text.to_string(),
    };
    ModelSpec {
        label,
        reference: text.to_string(),
    }
}

/// Labels name report rows and files: two models may not share one.
fn dedup_labels(models: &mut [ModelSpec]) {
    for i in 1..models.len() {
        let taken = models[..i].iter().filter(|m| m.label == models[i].label).count();
        if taken > 0 {
            models[i].label = format!("{}-{}", models[i].label, taken + 1);
        }
    }
}

/// The user turns of a dataset's samples that training used (not held out).
fn training_prompts(dir: &Path, held_out: f64) -> anyhow::Result<TrainingPrompts> {
    let samples = distill_data::shards::read_samples(dir)?;
    let texts: Vec<String> = samples
        .iter()
        .filter(|s| !is_held_out(&s.prompt_id, held_out))
        .filter_map(|s| {
            s.messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| m.content.clone())
        })
        .collect();
    Ok(TrainingPrompts::new(texts.iter().map(String::as_str)))
}

/// (label, metrics.jsonl) of each run to plot: the recipe's own run first.
fn metrics_logs(args: &Args, recipe: Option<&Recipe>) -> Vec<(String, PathBuf)> {
    let mut logs: Vec<(String, PathBuf)> = args.metrics.iter().map(|m| metrics_arg(m)).collect();
    if let Some(r) = recipe {
        let log = distill_train::trainer::run_root(r)
            .join("runs")
            .join(distill_train::metrics::METRICS_FILE);
        if log.exists() {
            logs.insert(0, (r.name.clone(), log));
        }
    }
    logs
}

/// `LABEL=FILE`, or a bare FILE labelled by its run: `<train.out>/<name>/runs/metrics.jsonl`
/// is `<name>`.
fn metrics_arg(arg: &str) -> (String, PathBuf) {
    if let Some((label, file)) = arg
        .split_once('=')
        .filter(|(l, _)| !l.is_empty() && !l.contains('/'))
    {
        return (label.to_string(), PathBuf::from(file));
    }
    let path = PathBuf::from(arg);
    let run_dir = match path.parent() {
        Some(p) if p.file_name().is_some_and(|n| n == "runs") => p.parent(),
        p => p,
    };
    let label = run_dir
        .and_then(Path::file_name)
        .map_or_else(|| "run".to_string(), |n| n.to_string_lossy().into_owned());
    (label, path)
}

fn summary(report: &Report) -> String {
    let mut s = String::new();
    for m in &report.models {
        for t in &m.tasks {
            s.push_str(&format!(
                "{:<16} {:<24} accuracy {} (n={})\n",
                m.label,
                t.task,
                t.accuracy.display(3),
                t.examples
            ));
        }
        if let Some(h) = &m.held_out {
            let kl = h
                .kl_to_teacher
                .as_ref()
                .map_or(String::new(), |k| format!(", KL to teacher {}", k.display(3)));
            s.push_str(&format!(
                "{:<16} {:<24} NLL/token {}, perplexity {:.2}{kl}\n",
                m.label,
                "held-out",
                h.nll.display(3),
                h.perplexity
            ));
        }
    }
    s
}

struct EvalJob {
    plan: Plan,
}

impl Job for EvalJob {
    type Output = (Report, Vec<distill_eval::report::ExampleRecord>);

    fn run<B: Kernels>(self, device: B::Device) -> anyhow::Result<Self::Output>
    where
        Autodiff<B>: Kernels + BackendTypes<Device = B::Device>,
    {
        Ok(run::evaluate::<B>(&self.plan, &device, &StageBars::default())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_labelled_by_their_run_or_explicitly() {
        let label = |a: &str| metrics_arg(a).0;
        assert_eq!(label("ckpt/runs/sft/runs/metrics.jsonl"), "sft");
        assert_eq!(label("logs/kd/metrics.jsonl"), "kd");
        assert_eq!(label("metrics.jsonl"), "run");
        assert_eq!(
            metrics_arg("kd 0.5=a/b=c/metrics.jsonl"),
            ("kd 0.5".to_string(), PathBuf::from("a/b=c/metrics.jsonl"))
        );
        // An `=` inside a path is not a label.
        assert_eq!(label("a/b=c/metrics.jsonl"), "b=c");
    }
}
