//! One evaluation: every model over every task set, the held-out teacher samples and the
//! probes, into a [`Report`] and its per-example records.

use std::collections::HashMap;
use std::path::PathBuf;

use distill_data::examples::{DataOptions, Example, load_held_out};
use distill_hf::hub::{self, HubSettings};
use distill_hf::tokenizer::TextTokenizer;
use distill_models::{CausalLm, Kernels};

use crate::EvalError;
use crate::contamination::TrainingPrompts;
use crate::likelihood::{HeldOutAccumulator, HeldOutScores};
use crate::probes::{self, Probe, ProbeOutcome};
use crate::report::{
    Contamination, ExampleRecord, FORMAT_VERSION, GenerationSettings, LengthBucket, ModelReport,
    ReasoningReport, Report, Settings, TaskReport,
};
use crate::stats::{mean, mean_share, pass_at_k, proportion};
use crate::tasks::{self, TaskKind, TaskSet, TaskSpec, score};
use distill_infer::generate::{
    Decoding, FinishReason, Generation, GenerationConfig, GenerationStats, Request, Sampling, eos_ids,
    generate, kv_cache_tokens_holding,
};
use distill_infer::reasoning::{self, LENGTH_BUCKETS, Split, bucket_label, prompt_opens_think};
use distill_infer::score::{TopK, loss_positions, teacher_force};

/// A model to evaluate, under the name the report gives it.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub label: String,
    /// An HF directory or `org/name[@revision]`.
    pub reference: String,
}

/// Held-out teacher samples (a gen-data dataset) and which of them are held out.
#[derive(Debug, Clone)]
pub struct HeldOutSpec {
    pub dataset: PathBuf,
    /// The share of prompts held out from training (the recipe's `data.held_out`); 1 = all.
    pub share: f64,
    pub seq_len: usize,
    pub max_examples: Option<usize>,
    /// The model (by label) every other one is compared with, example by example.
    pub baseline: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub models: Vec<ModelSpec>,
    pub tasks: Vec<TaskSpec>,
    pub held_out: Option<HeldOutSpec>,
    /// A local teacher (sharing the students' tokenizer) whose top-k distribution held-out KL
    /// and top-1 agreement are measured against.
    pub teacher: Option<String>,
    pub teacher_top_k: usize,
    /// Run the behaviour probes: `Some(None)` the built-in set, `Some(Some(path))` a file.
    pub probes: Option<Option<PathBuf>>,
    pub training_prompts: Option<TrainingPrompts>,
    pub exclude_contaminated: bool,
    pub sampling: Sampling,
    /// Samples per prompt.
    pub n: usize,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub batch_size: usize,
    /// GiB the KV cache of the running batch may take; None: no limit.
    pub kv_cache_gib: Option<f64>,
    pub stop: Vec<String>,
    pub device: String,
}

pub use distill_core::progress::{Progress, Silent};

pub fn evaluate<B: Kernels>(
    plan: &Plan,
    device: &B::Device,
    progress: &dyn Progress,
) -> Result<(Report, Vec<ExampleRecord>), EvalError> {
    let settings = HubSettings::from_env();
    let task_sets = load_task_sets(plan)?;
    let contamination = contamination(plan, &task_sets);
    let teacher = match (&plan.held_out, &plan.teacher) {
        (Some(h), Some(t)) => Some(teacher_targets::<B>(
            t,
            h,
            plan.teacher_top_k,
            &settings,
            device,
            progress,
        )?),
        _ => None,
    };
    let probes = plan
        .probes
        .as_ref()
        .map(|p| probes::load(p.as_deref()))
        .transpose()?;

    let mut models = Vec::new();
    let mut examples = Vec::new();
    for spec in &plan.models {
        let dir = hub::resolve(&spec.reference, &settings)?;
        let tokenizer = TextTokenizer::from_dir(&dir)?;
        let model = CausalLm::<B>::load(&dir, device)?.into_decoding();
        let mut report = ModelReport {
            label: spec.label.clone(),
            reference: spec.reference.clone(),
            parameters: Some(model.config.parameter_count() as u64),
            tasks: Vec::new(),
            held_out: None,
            probes: None,
        };
        for set in &task_sets {
            let skip = contamination
                .get(&set.name)
                .filter(|c| c.excluded)
                .map(|c| c.contaminated.clone())
                .unwrap_or_default();
            let (task, records) = run_task(plan, spec, &model, &tokenizer, set, &skip, device, progress)?;
            report.tasks.push(task);
            examples.extend(records);
        }
        if let Some(h) = &plan.held_out {
            let targets = teacher.as_ref().filter(|t| t.tokenizer_hash == tokenizer.hash);
            report.held_out = Some(held_out(spec, &model, &tokenizer, h, targets, device, progress)?);
        }
        if let Some(probes) = &probes {
            report.probes = Some(run_probes(
                plan, spec, &model, &tokenizer, probes, device, progress,
            )?);
        }
        models.push(report);
    }
    let report = Report {
        format_version: FORMAT_VERSION,
        tool_version: distill_core::TOOL_VERSION,
        settings: Settings {
            generation: Some(GenerationSettings {
                sampling: plan.sampling.clone(),
                samples_per_prompt: plan.n,
                max_new_tokens: plan.max_new_tokens,
                seed: plan.seed,
                batch_size: plan.batch_size,
                device: plan.device.clone(),
            }),
            predictions: None,
            held_out_baseline: plan.held_out.as_ref().and_then(|h| h.baseline.clone()),
        },
        models,
        contamination,
    };
    Ok((report, examples))
}

fn load_task_sets(plan: &Plan) -> Result<Vec<TaskSet>, EvalError> {
    let hub = HubSettings::from_env();
    plan.tasks.iter().map(|t| tasks::load(t, &hub)).collect()
}

fn contamination(plan: &Plan, sets: &[TaskSet]) -> std::collections::BTreeMap<String, Contamination> {
    let Some(train) = &plan.training_prompts else {
        return Default::default();
    };
    sets.iter()
        .map(|set| {
            let contaminated = set
                .items
                .iter()
                .filter(|i| train.contains(i.user_text()))
                .map(|i| i.id.clone())
                .collect();
            (
                set.name.clone(),
                Contamination {
                    training_prompts: train.len(),
                    contaminated,
                    excluded: plan.exclude_contaminated,
                },
            )
        })
        .collect()
}

/// A seed per (prompt, sample) that does not depend on the model or the batch, so every model
/// sees the same random stream for the same prompt.
fn request_seed(seed: u64, id: &str, sample: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    splitmix(seed ^ h ^ (sample as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generation settings of `plan` for prompts of up to `longest_prompt` tokens. A KV cache
/// budget must hold the longest prompt and its `max_new_tokens`: a sample cut short for want of
/// cache would be scored as the model's answer.
fn generation_config<B: Kernels>(
    plan: &Plan,
    model: &CausalLm<B>,
    tokenizer: &TextTokenizer,
    longest_prompt: usize,
) -> Result<GenerationConfig, EvalError> {
    let longest = longest_prompt + plan.max_new_tokens;
    let kv_cache_tokens = match plan.kv_cache_gib {
        Some(gib) => Some(kv_cache_tokens_holding(model, gib, longest).map_err(|e| {
            EvalError::Invalid(format!(
                "--kv-cache-gib: {e} (the longest prompt and --max-new-tokens): raise it"
            ))
        })?),
        None => None,
    };
    Ok(GenerationConfig {
        decoding: Decoding {
            max_new_tokens: plan.max_new_tokens,
            sampling: plan.sampling.clone(),
            stop: plan.stop.clone(),
            eos: eos_ids(model, tokenizer),
            logprobs: None,
        },
        batch_size: plan.batch_size,
        kv_cache_tokens,
    })
}

/// Generates for `prompts` (chat messages) with progress; returns the outputs, whether each
/// prompt left the model inside `<think>`, and the throughput.
fn generate_for<B: Kernels>(
    plan: &Plan,
    model: &CausalLm<B>,
    tokenizer: &TextTokenizer,
    prompts: &[(&[distill_core::Message], u64)],
    label: &str,
    device: &B::Device,
    progress: &dyn Progress,
) -> Result<(Vec<Generation>, Vec<bool>, GenerationStats), EvalError> {
    let mut requests = Vec::with_capacity(prompts.len());
    let mut in_think = Vec::with_capacity(prompts.len());
    for (messages, seed) in prompts {
        let ids = tokenizer.encode_chat(messages, true)?;
        in_think.push(prompt_opens_think(&tokenizer.decode(&ids, false)?));
        requests.push(Request {
            prompt: ids,
            seed: *seed,
        });
    }
    progress.stage(label, requests.len() as u64);
    let longest_prompt = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    let cfg = generation_config(plan, model, tokenizer, longest_prompt)?;
    let (outputs, stats) = generate(model, tokenizer, &requests, &cfg, device, |_, _| {
        progress.advance(1)
    })?;
    progress.finish_stage();
    Ok((outputs, in_think, stats))
}

#[allow(clippy::too_many_arguments)]
fn run_task<B: Kernels>(
    plan: &Plan,
    spec: &ModelSpec,
    model: &CausalLm<B>,
    tokenizer: &TextTokenizer,
    set: &TaskSet,
    skip: &[String],
    device: &B::Device,
    progress: &dyn Progress,
) -> Result<(TaskReport, Vec<ExampleRecord>), EvalError> {
    let items: Vec<&tasks::TaskItem> = set.items.iter().filter(|i| !skip.contains(&i.id)).collect();
    let n = plan.n.max(1);
    let prompts: Vec<(&[distill_core::Message], u64)> = items
        .iter()
        .flat_map(|i| (0..n).map(move |s| (i.messages.as_slice(), request_seed(plan.seed, &i.id, s))))
        .collect();
    let label = format!("{} · {}", spec.label, set.name);
    let (outputs, in_think, stats) =
        generate_for(plan, model, tokenizer, &prompts, &label, device, progress)?;
    let contaminated: Vec<String> = plan
        .training_prompts
        .as_ref()
        .map(|t| {
            items
                .iter()
                .filter(|i| t.contains(i.user_text()))
                .map(|i| i.id.clone())
                .collect()
        })
        .unwrap_or_default();
    let mut scored = Vec::with_capacity(outputs.len());
    for (j, out) in outputs.iter().enumerate() {
        let item = items[j / n];
        let split = reasoning::split(&out.text, in_think[j]);
        let reasoning_tokens = match &split.reasoning {
            Some(r) if !r.is_empty() => Some(tokenizer.encode(r, false)?.len()),
            Some(_) => Some(0),
            None => None,
        };
        let s = score(set.kind, &split.answer, &item.reference);
        scored.push(ScoredOutput {
            record: ExampleRecord {
                model: spec.label.clone(),
                task: set.name.clone(),
                id: item.id.clone(),
                sample: j % n,
                prompt: item.user_text().to_string(),
                output: out.text.clone(),
                reasoning_tokens,
                unclosed_think: split.unclosed,
                extracted: s.extracted,
                reference: item.reference.clone(),
                correct: s.correct,
                finish_reason: Some(out.finish_reason),
                contaminated: contaminated.contains(&item.id),
            },
            split,
            output_tokens: out.tokens.len(),
        });
    }
    let mut report = task_report(&set.name, set.kind, n, &scored);
    report.tokens_per_second = Some(stats.tokens_per_second());
    Ok((report, scored.into_iter().map(|s| s.record).collect()))
}

/// An output with what scoring and reasoning statistics need.
pub struct ScoredOutput {
    pub record: ExampleRecord,
    pub split: Split,
    pub output_tokens: usize,
}

/// Aggregates scored outputs (n per prompt, consecutive) into a task report.
pub fn task_report(task: &str, kind: TaskKind, n: usize, scored: &[ScoredOutput]) -> TaskReport {
    let prompts = scored.len() / n.max(1);
    let per_prompt: Vec<&[ScoredOutput]> = scored.chunks(n.max(1)).collect();
    let correct: Vec<usize> = per_prompt
        .iter()
        .map(|g| g.iter().filter(|s| s.record.correct).count())
        .collect();
    let accuracy = if n == 1 {
        proportion(correct.iter().sum(), prompts)
    } else {
        mean_share(&correct.iter().map(|&c| c as f64 / n as f64).collect::<Vec<_>>())
    };
    let (maj_at_n, pass_at_n) = if n > 1 {
        let maj = per_prompt
            .iter()
            .filter(|g| {
                let answers: Vec<Option<&str>> = g.iter().map(|s| s.record.extracted.as_deref()).collect();
                let same = |a: &str, b: &str| score(kind, a, b).correct;
                crate::stats::majority(&answers, same)
                    .is_some_and(|winner| score(kind, winner, &g[0].record.reference).correct)
            })
            .count();
        let pass: Vec<f64> = correct.iter().map(|&c| pass_at_k(n, c, n)).collect();
        (Some(proportion(maj, prompts)), Some(mean_share(&pass)))
    } else {
        (None, None)
    };
    TaskReport {
        task: task.to_string(),
        kind,
        examples: prompts,
        samples_per_prompt: n,
        accuracy,
        maj_at_n,
        pass_at_n,
        reasoning: reasoning_report(scored),
        mean_output_tokens: mean(&scored.iter().map(|s| s.output_tokens as f64).collect::<Vec<_>>()).value,
        tokens_per_second: None,
    }
}

fn reasoning_report(scored: &[ScoredOutput]) -> ReasoningReport {
    let total = scored.len();
    let thinking: Vec<&ScoredOutput> = scored.iter().filter(|s| s.split.reasoning.is_some()).collect();
    let lengths: Vec<f64> = thinking
        .iter()
        .map(|s| s.record.reasoning_tokens.unwrap_or(0) as f64)
        .collect();
    let accuracy_by_length = LENGTH_BUCKETS
        .iter()
        .map(|&(lo, hi)| {
            let inside: Vec<&ScoredOutput> = scored
                .iter()
                .filter(|s| {
                    let len = s.record.reasoning_tokens.unwrap_or(0);
                    len >= lo && len < hi
                })
                .collect();
            LengthBucket {
                reasoning_tokens: bucket_label((lo, hi)),
                outputs: inside.len(),
                accuracy: proportion(inside.iter().filter(|s| s.record.correct).count(), inside.len()),
            }
        })
        .collect();
    ReasoningReport {
        thinking: proportion(thinking.len(), total),
        reasoning_tokens: mean(&lengths),
        empty: proportion(scored.iter().filter(|s| s.split.empty_reasoning()).count(), total),
        unclosed: proportion(scored.iter().filter(|s| s.split.unclosed).count(), total),
        accuracy_by_length,
    }
}

/// A local teacher's top-k over the held-out examples, keyed by sample key.
pub struct TeacherTargets {
    pub tokenizer_hash: String,
    pub by_key: HashMap<String, TopK>,
}

fn teacher_targets<B: Kernels>(
    reference: &str,
    h: &HeldOutSpec,
    k: usize,
    settings: &HubSettings,
    device: &B::Device,
    progress: &dyn Progress,
) -> Result<TeacherTargets, EvalError> {
    let dir = hub::resolve(reference, settings)?;
    let tokenizer = TextTokenizer::from_dir(&dir)?;
    let model = CausalLm::<B>::load(&dir, device)?;
    let examples = held_out_examples(h, &tokenizer)?;
    progress.stage("teacher top-k", examples.len() as u64);
    let mut by_key = HashMap::new();
    for ex in &examples {
        let forced = teacher_force(&model, ex, k, None, device)?;
        by_key.insert(ex.key.clone(), forced.top.expect("top-k was asked for"));
        progress.advance(1);
    }
    progress.finish_stage();
    Ok(TeacherTargets {
        tokenizer_hash: tokenizer.hash,
        by_key,
    })
}

fn held_out_examples(h: &HeldOutSpec, tokenizer: &TextTokenizer) -> Result<Vec<Example>, EvalError> {
    let opts = DataOptions {
        seq_len: h.seq_len,
        held_out: h.share,
        keep_truncated: true,
        keep_only_correct: false,
    };
    let mut examples = load_held_out(&h.dataset, tokenizer, &opts)?;
    if let Some(max) = h.max_examples {
        examples.truncate(max);
    }
    Ok(examples)
}

fn held_out<B: Kernels>(
    spec: &ModelSpec,
    model: &CausalLm<B>,
    tokenizer: &TextTokenizer,
    h: &HeldOutSpec,
    teacher: Option<&TeacherTargets>,
    device: &B::Device,
    progress: &dyn Progress,
) -> Result<HeldOutScores, EvalError> {
    let examples = held_out_examples(h, tokenizer)?;
    // Without a live teacher, the dataset's stored soft labels are the teacher's view.
    let stored = match teacher {
        Some(_) => None,
        None => stored_targets(&h.dataset, tokenizer, &examples)?,
    };
    let teacher = teacher.or(stored.as_ref());
    progress.stage(&format!("{} · held-out", spec.label), examples.len() as u64);
    let mut acc = HeldOutAccumulator::default();
    for ex in &examples {
        let targets = teacher.and_then(|t| t.by_key.get(&ex.key));
        let forced = teacher_force(model, ex, 0, targets, device)?;
        acc.add(&ex.key, &forced, targets);
        progress.advance(1);
    }
    progress.finish_stage();
    Ok(acc.finish())
}

/// The dataset's soft labels (`<dataset>/soft/`) as top-k targets over each example's loss
/// positions, when they exist and are in this tokenizer's ids. Positions a record does not
/// cover hold padding only and count in neither KL nor agreement.
fn stored_targets(
    dataset: &std::path::Path,
    tokenizer: &TextTokenizer,
    examples: &[Example],
) -> Result<Option<TeacherTargets>, EvalError> {
    let dir = distill_data::soft::soft_dir(dataset);
    if !dir.join(distill_data::soft::MANIFEST_FILE).exists() {
        return Ok(None);
    }
    let store = distill_data::soft::SoftLabels::open(&dir).map_err(|e| EvalError::Invalid(e.to_string()))?;
    if store.manifest().tokenizer_hash != tokenizer.hash {
        return Ok(None);
    }
    let k = store.manifest().k;
    let mut by_key = HashMap::new();
    for ex in examples {
        let Some(rec) = store
            .get(&ex.key)
            .map_err(|e| EvalError::Invalid(e.to_string()))?
        else {
            continue;
        };
        let labels: Vec<i64> = loss_positions(ex).iter().map(|&p| ex.labels[p]).collect();
        let Some(offset) = distill_data::examples::align(&labels, &rec.ids) else {
            continue;
        };
        let mut top = TopK {
            k,
            ids: Vec::with_capacity(labels.len() * k),
            logprobs: Vec::with_capacity(labels.len() * k),
        };
        for (p, &label) in labels.iter().enumerate() {
            match p
                .checked_sub(offset)
                .filter(|&j| j < rec.len() && i64::from(rec.ids[j]) == label)
            {
                Some(j) => {
                    let (ids, lps) = rec.position(j);
                    top.ids.extend_from_slice(ids);
                    top.logprobs.extend_from_slice(lps);
                }
                None => {
                    top.ids.extend(std::iter::repeat_n(distill_data::soft::PAD_ID, k));
                    top.logprobs.extend(std::iter::repeat_n(f32::NEG_INFINITY, k));
                }
            }
        }
        by_key.insert(ex.key.clone(), top);
    }
    Ok(Some(TeacherTargets {
        tokenizer_hash: tokenizer.hash.clone(),
        by_key,
    }))
}

fn run_probes<B: Kernels>(
    plan: &Plan,
    spec: &ModelSpec,
    model: &CausalLm<B>,
    tokenizer: &TextTokenizer,
    probes: &[Probe],
    device: &B::Device,
    progress: &dyn Progress,
) -> Result<std::collections::BTreeMap<String, probes::SubjectScores>, EvalError> {
    let messages: Vec<Vec<distill_core::Message>> = probes
        .iter()
        .map(|p| vec![distill_core::Message::new("user", p.prompt.clone())])
        .collect();
    let prompts: Vec<(&[distill_core::Message], u64)> = messages
        .iter()
        .zip(probes)
        .map(|(m, p)| (m.as_slice(), request_seed(plan.seed, &p.id, 0)))
        .collect();
    let label = format!("{} · probes", spec.label);
    let (outputs, in_think, _) = generate_for(plan, model, tokenizer, &prompts, &label, device, progress)?;
    let mut outcomes = Vec::with_capacity(probes.len());
    for ((probe, out), think) in probes.iter().zip(&outputs).zip(in_think) {
        let split = reasoning::split(&out.text, think);
        let answer_tokens = tokenizer.encode(&split.answer, false)?.len();
        outcomes.push(ProbeOutcome {
            probe,
            split,
            answer_tokens,
        });
    }
    Ok(probes::score(&outcomes))
}

/// Scores generations made elsewhere (`--predictions FILE.jsonl`): each line has `id` (or
/// `prompt`), the output in `output` (or `prediction`, `response`, `completion`), optionally
/// `model` (to compare several) and `reference` (else the task set's, by id).
/// Scores the predictions file at `path`; `tasks` (the `--tasks` argument and the set it
/// loaded) gives references by id or prompt to lines without their own.
pub fn score_predictions(
    path: &std::path::Path,
    tasks: Option<(&str, &TaskSet)>,
    kind: TaskKind,
) -> Result<(Vec<ModelReport>, Vec<ExampleRecord>), EvalError> {
    let set = tasks.map(|(_, set)| set);
    let text = std::fs::read_to_string(path).map_err(EvalError::io(path))?;
    let by_id: HashMap<&str, &tasks::TaskItem> = set
        .map(|s| s.items.iter().map(|i| (i.id.as_str(), i)).collect())
        .unwrap_or_default();
    let by_prompt: HashMap<String, &tasks::TaskItem> = set
        .map(|s| {
            s.items
                .iter()
                .map(|i| (crate::contamination::normalize(i.user_text()), i))
                .collect()
        })
        .unwrap_or_default();
    let mut per_model: Vec<(String, Vec<ScoredOutput>)> = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |msg: String| EvalError::Input {
            path: path.to_path_buf(),
            msg: format!("line {}: {msg}", i + 1),
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let field = |names: &[&str]| {
            names.iter().find_map(|n| match v.get(*n) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Number(x)) => Some(x.to_string()),
                _ => None,
            })
        };
        let output = field(&["output", "prediction", "response", "completion"])
            .ok_or_else(|| bad("no `output` (or `prediction`, `response`, `completion`) field".into()))?;
        let id = field(&["id"]);
        let prompt = field(&["prompt"]);
        let item = id.as_deref().and_then(|id| by_id.get(id)).or_else(|| {
            prompt
                .as_deref()
                .and_then(|p| by_prompt.get(&crate::contamination::normalize(p)))
        });
        let reference = field(&["reference", "answer"])
            .map(|r| distill_data::reference_answer(&r))
            .or_else(|| item.map(|i| i.reference.clone()))
            .ok_or_else(|| {
                bad(no_reference(
                    id.as_deref(),
                    prompt.is_some(),
                    tasks.map(|(source, _)| source),
                ))
            })?;
        let model = field(&["model"]).unwrap_or_else(|| "predictions".into());
        let split = reasoning::split(&output, false);
        let s = score(kind, &split.answer, &reference);
        let record = ExampleRecord {
            model: model.clone(),
            task: set.map_or("predictions".into(), |s| s.name.clone()),
            id: id
                .or_else(|| item.map(|i| i.id.clone()))
                .unwrap_or_else(|| i.to_string()),
            sample: 0,
            prompt: prompt
                .or_else(|| item.map(|i| i.user_text().to_string()))
                .unwrap_or_default(),
            output,
            reasoning_tokens: split.reasoning.as_ref().map(|r| r.split_whitespace().count()),
            unclosed_think: split.unclosed,
            extracted: s.extracted,
            reference,
            correct: s.correct,
            finish_reason: None::<FinishReason>,
            contaminated: false,
        };
        let scored = ScoredOutput {
            output_tokens: 0,
            record,
            split,
        };
        match per_model.iter_mut().find(|(m, _)| *m == model) {
            Some((_, v)) => v.push(scored),
            None => per_model.push((model, vec![scored])),
        }
    }
    if per_model.is_empty() {
        return Err(EvalError::Input {
            path: path.to_path_buf(),
            msg: "holds no predictions".into(),
        });
    }
    let task = set.map_or("predictions".to_string(), |s| s.name.clone());
    let mut reports = Vec::new();
    let mut records = Vec::new();
    for (model, scored) in per_model {
        let report = task_report(&task, kind, 1, &scored);
        reports.push(ModelReport {
            label: model.clone(),
            reference: path.display().to_string(),
            parameters: None,
            tasks: vec![report],
            held_out: None,
            probes: None,
        });
        records.extend(scored.into_iter().map(|s| s.record));
    }
    Ok((reports, records))
}

/// Why a prediction line has no reference: nothing to look it up in, or what it was looked up
/// by and where.
fn no_reference(id: Option<&str>, has_prompt: bool, tasks: Option<&str>) -> String {
    let Some(tasks) = tasks else {
        return "no `reference` field; pass --tasks FILE to look references up by `id` or `prompt`".into();
    };
    let by = match (id, has_prompt) {
        (Some(id), true) => format!("id `{id}` is not in {tasks}, nor is its prompt"),
        (Some(id), false) => format!("id `{id}` is not in {tasks}"),
        (None, true) => format!("its prompt is not in {tasks}"),
        (None, false) => format!("it has no `id` or `prompt` to find it in {tasks} by"),
    };
    format!("{by}, and the line has no `reference` field")
}
