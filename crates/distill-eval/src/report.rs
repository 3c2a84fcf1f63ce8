//! What `distill eval` writes: report.json (every metric with its standard error, 95%
//! interval and count), examples.jsonl (one line per scored output), report.md (side-by-side
//! tables) and PNG plots (accuracy with error bars, accuracy by reasoning length, probe
//! refusal rates per subject).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use distill_plot::PALETTE;
use distill_plot::plotters::prelude::*;
use serde::Serialize;

use crate::EvalError;
use crate::likelihood::{HeldOutScores, paired_difference};
use crate::probes::SubjectScores;
use crate::stats::Estimate;
use crate::tasks::TaskKind;
use distill_infer::generate::{FinishReason, Sampling};

pub const FORMAT_VERSION: u32 = 1;
pub const REPORT_JSON: &str = "report.json";
pub const REPORT_MD: &str = "report.md";
pub const EXAMPLES: &str = "examples.jsonl";
/// Per-example held-out scores of every model.
pub const HELD_OUT_ROWS: &str = "heldout.jsonl";

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub format_version: u32,
    pub tool_version: &'static str,
    pub settings: Settings,
    pub models: Vec<ModelReport>,
    /// Per task set: the ids of prompts also found among the training prompts.
    pub contamination: BTreeMap<String, Contamination>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub sampling: Sampling,
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub device: String,
    /// The model every other one is compared with on the held-out samples, example by example.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_out_baseline: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Contamination {
    pub training_prompts: usize,
    pub contaminated: Vec<String>,
    pub excluded: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub label: String,
    pub reference: String,
    pub parameters: Option<u64>,
    pub tasks: Vec<TaskReport>,
    pub held_out: Option<HeldOutScores>,
    pub probes: Option<BTreeMap<String, SubjectScores>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    pub task: String,
    pub kind: TaskKind,
    pub examples: usize,
    pub samples_per_prompt: usize,
    /// pass@1: per prompt the share of correct samples, averaged over prompts.
    pub accuracy: Estimate,
    /// Majority vote over the samples of a prompt (n > 1).
    pub maj_at_n: Option<Estimate>,
    /// Unbiased pass@n (n > 1).
    pub pass_at_n: Option<Estimate>,
    pub reasoning: ReasoningReport,
    pub mean_output_tokens: f64,
    /// None for scored predictions (no generation ran).
    pub tokens_per_second: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReasoningReport {
    /// Outputs that reasoned at all (a think block, closed or not).
    pub thinking: Estimate,
    /// Tokens inside `<think>`, over outputs that reasoned.
    pub reasoning_tokens: Estimate,
    /// Think blocks with nothing inside, over all outputs.
    pub empty: Estimate,
    /// Think blocks never closed, over all outputs.
    pub unclosed: Estimate,
    pub accuracy_by_length: Vec<LengthBucket>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LengthBucket {
    pub reasoning_tokens: String,
    pub outputs: usize,
    pub accuracy: Estimate,
}

/// One scored output (examples.jsonl).
#[derive(Debug, Clone, Serialize)]
pub struct ExampleRecord {
    pub model: String,
    pub task: String,
    pub id: String,
    pub sample: usize,
    pub prompt: String,
    pub output: String,
    pub reasoning_tokens: Option<usize>,
    pub unclosed_think: bool,
    pub extracted: Option<String>,
    pub reference: String,
    pub correct: bool,
    pub finish_reason: Option<FinishReason>,
    pub contaminated: bool,
}

/// Writes report.json, report.md, examples.jsonl and the plots into `out`; returns the
/// paths of the plots it drew.
/// Every model's per-example held-out scores, one JSON line each, for comparisons of your own.
fn write_held_out_rows(out: &Path, report: &Report) -> Result<(), EvalError> {
    let mut lines = String::new();
    for m in &report.models {
        for row in m.held_out.iter().flat_map(|h| &h.per_example) {
            let mut v = serde_json::to_value(row).map_err(|e| EvalError::Invalid(e.to_string()))?;
            v["model"] = m.label.clone().into();
            lines.push_str(&v.to_string());
            lines.push('\n');
        }
    }
    if lines.is_empty() {
        return Ok(());
    }
    write(&out.join(HELD_OUT_ROWS), lines.as_bytes())
}

pub fn write_all(out: &Path, report: &Report, examples: &[ExampleRecord]) -> Result<Vec<PathBuf>, EvalError> {
    std::fs::create_dir_all(out).map_err(EvalError::io(out))?;
    let json = serde_json::to_string_pretty(report).map_err(|e| EvalError::Invalid(e.to_string()))?;
    write(&out.join(REPORT_JSON), json.as_bytes())?;
    let mut lines = String::new();
    for e in examples {
        lines.push_str(&serde_json::to_string(e).map_err(|e| EvalError::Invalid(e.to_string()))?);
        lines.push('\n');
    }
    write(&out.join(EXAMPLES), lines.as_bytes())?;
    write_held_out_rows(out, report)?;
    let mut plots = Vec::new();
    if let Some(p) = accuracy_plot(out, report)? {
        plots.push(p);
    }
    if let Some(p) = length_plot(out, report)? {
        plots.push(p);
    }
    if let Some(p) = probe_plot(out, report)? {
        plots.push(p);
    }
    write(&out.join(REPORT_MD), markdown(report, &plots).as_bytes())?;
    Ok(plots)
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), EvalError> {
    distill_core::fsutil::write_atomic(path, bytes).map_err(EvalError::io(path))
}

/// The side-by-side tables.
pub fn markdown(report: &Report, plots: &[PathBuf]) -> String {
    let mut md = String::from("# Evaluation report\n\n");
    let s = &report.settings;
    let _ = writeln!(
        md,
        "Sampling: temperature {}, top_p {}, top_k {}; {} sample(s) per prompt; max {} new tokens; seed {}; device {}.\n\
         Figures are value ± half-width of the 95% interval (Wilson for shares of prompts, normal for means).\n",
        s.sampling.temperature,
        s.sampling.top_p,
        s.sampling.top_k,
        s.samples_per_prompt,
        s.max_new_tokens,
        s.seed,
        s.device
    );
    let tasks: Vec<(String, TaskKind)> = {
        let mut t: Vec<(String, TaskKind)> = Vec::new();
        for m in &report.models {
            for r in &m.tasks {
                if !t.iter().any(|(name, _)| name == &r.task) {
                    t.push((r.task.clone(), r.kind));
                }
            }
        }
        t
    };
    if !tasks.is_empty() {
        md.push_str("## Task accuracy (pass@1)\n\n| model |");
        for (t, _) in &tasks {
            let _ = write!(md, " {t} |");
        }
        md.push_str("\n|---|");
        md.push_str(&"---|".repeat(tasks.len()));
        md.push('\n');
        for m in &report.models {
            let _ = write!(md, "| {} |", m.label);
            for (t, _) in &tasks {
                let cell = m.tasks.iter().find(|r| &r.task == t).map_or("".into(), |r| {
                    let mut c = format!("{} (n={})", r.accuracy.display(3), r.examples);
                    if let Some(maj) = &r.maj_at_n {
                        let _ = write!(c, "; maj@{} {}", r.samples_per_prompt, maj.display(3));
                    }
                    c
                });
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
        md.push_str("\n## Reasoning\n\n| model | task | thinking | reasoning tokens | empty | unclosed | output tokens | tok/s |\n|---|---|---|---|---|---|---|---|\n");
        for m in &report.models {
            for r in &m.tasks {
                let g = &r.reasoning;
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {:.0} | {} |",
                    m.label,
                    r.task,
                    g.thinking.display(2),
                    g.reasoning_tokens.display(0),
                    g.empty.display(2),
                    g.unclosed.display(2),
                    r.mean_output_tokens,
                    r.tokens_per_second.map_or("-".into(), |t| format!("{t:.1}"))
                );
            }
        }
        md.push('\n');
    }
    if report.models.iter().any(|m| m.held_out.is_some()) {
        md.push_str("## Held-out teacher samples\n\n| model | examples | tokens | NLL/token | perplexity | KL(teacher‖model) | top-1 agreement |\n|---|---|---|---|---|---|---|\n");
        for m in &report.models {
            if let Some(h) = &m.held_out {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {:.2} | {} | {} |",
                    m.label,
                    h.examples,
                    h.tokens,
                    h.nll.display(3),
                    h.perplexity,
                    h.kl_to_teacher.as_ref().map_or("-".into(), |e| e.display(3)),
                    h.top1_agreement.as_ref().map_or("-".into(), |e| e.display(3)),
                );
            }
        }
        md.push('\n');
        paired_section(&mut md, report);
    }
    if report.models.iter().any(|m| m.probes.is_some()) {
        md.push_str("## Behaviour probes\n\n| model | subject | refusal | empty reasoning | stock answer | canned | answer tokens |\n|---|---|---|---|---|---|---|\n");
        for m in &report.models {
            for (subject, p) in m.probes.iter().flatten() {
                let _ = writeln!(
                    md,
                    "| {} | {subject} | {} | {} | {} | {} | {} |",
                    m.label,
                    p.refusal.display(2),
                    p.empty_reasoning.display(2),
                    p.stock_answer.display(2),
                    p.canned.display(2),
                    p.answer_tokens.display(0)
                );
            }
        }
        md.push('\n');
    }
    for (task, c) in &report.contamination {
        let _ = writeln!(
            md,
            "Contamination, {task}: {} of the prompts appear among {} training prompts{}.",
            c.contaminated.len(),
            c.training_prompts,
            if c.excluded {
                " (excluded from the scores)"
            } else {
                " (kept in the scores)"
            }
        );
    }
    for p in plots {
        if let Some(name) = p.file_name() {
            let name = name.to_string_lossy();
            let _ = writeln!(md, "\n![{name}]({name})");
        }
    }
    md
}

/// Each model minus the baseline, example by example, on the held-out samples.
fn paired_section(md: &mut String, report: &Report) {
    let Some(label) = &report.settings.held_out_baseline else {
        return;
    };
    let Some(base) = report
        .models
        .iter()
        .find(|m| &m.label == label)
        .and_then(|m| m.held_out.as_ref())
    else {
        return;
    };
    let _ = write!(
        md,
        "Paired against `{label}`: model minus `{label}` per example, mean over the examples both scored (negative NLL and KL, positive agreement: closer to the teacher than `{label}`).\n\n| model | examples | ΔNLL/token | ΔKL(teacher‖model) | Δtop-1 agreement |\n|---|---|---|---|---|\n"
    );
    for m in report.models.iter().filter(|m| &m.label != label) {
        let Some(d) = m.held_out.as_ref().and_then(|h| paired_difference(h, base)) else {
            continue;
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            m.label,
            d.nll.n,
            d.nll.display(3),
            d.kl_to_teacher.as_ref().map_or("-".into(), |e| e.display(3)),
            d.top1_agreement.as_ref().map_or("-".into(), |e| e.display(3)),
        );
    }
    md.push('\n');
}

// ---------------------------------------------------------------------------------------------
// Plots: grouped bars with 95% error bars, one group per category, one colour per model.

const SIZE: (u32, u32) = (1200, 700);

struct Bars<'a> {
    title: &'a str,
    y_label: &'a str,
    categories: Vec<String>,
    /// (model label, one estimate per category; NaN = no bar).
    series: Vec<(String, Vec<Estimate>)>,
}

fn accuracy_plot(out: &Path, report: &Report) -> Result<Option<PathBuf>, EvalError> {
    let mut categories: Vec<String> = Vec::new();
    for r in report.models.iter().flat_map(|m| &m.tasks) {
        if !categories.contains(&r.task) {
            categories.push(r.task.clone());
        }
    }
    if categories.is_empty() {
        return Ok(None);
    }
    let series = report
        .models
        .iter()
        .map(|m| {
            let per = categories
                .iter()
                .map(|c| {
                    m.tasks
                        .iter()
                        .find(|r| &r.task == c)
                        .map_or(nan(), |r| r.accuracy)
                })
                .collect();
            (m.label.clone(), per)
        })
        .collect();
    let bars = Bars {
        title: "Accuracy (pass@1) with 95% intervals",
        y_label: "accuracy",
        categories,
        series,
    };
    draw_bars(&out.join("accuracy.png"), &bars).map(Some)
}

fn length_plot(out: &Path, report: &Report) -> Result<Option<PathBuf>, EvalError> {
    let reasoning: Vec<(&ModelReport, &TaskReport)> = report
        .models
        .iter()
        .flat_map(|m| m.tasks.iter().map(move |t| (m, t)))
        .filter(|(_, t)| t.reasoning.thinking.value > 0.0)
        .collect();
    let Some((_, first)) = reasoning.first() else {
        return Ok(None);
    };
    let categories: Vec<String> = first
        .reasoning
        .accuracy_by_length
        .iter()
        .map(|b| b.reasoning_tokens.clone())
        .collect();
    let series = reasoning
        .iter()
        .map(|(m, t)| {
            let label = if report.models.iter().map(|m| m.tasks.len()).max() > Some(1) {
                format!("{} / {}", m.label, t.task)
            } else {
                m.label.clone()
            };
            (
                label,
                t.reasoning
                    .accuracy_by_length
                    .iter()
                    .map(|b| b.accuracy)
                    .collect(),
            )
        })
        .collect();
    let bars = Bars {
        title: "Accuracy by reasoning length (tokens inside <think>)",
        y_label: "accuracy",
        categories,
        series,
    };
    draw_bars(&out.join("accuracy_by_reasoning_length.png"), &bars).map(Some)
}

fn probe_plot(out: &Path, report: &Report) -> Result<Option<PathBuf>, EvalError> {
    let Some(first) = report.models.iter().find_map(|m| m.probes.as_ref()) else {
        return Ok(None);
    };
    let categories: Vec<String> = first.keys().cloned().collect();
    let series = report
        .models
        .iter()
        .filter_map(|m| {
            let p = m.probes.as_ref()?;
            Some((
                m.label.clone(),
                categories
                    .iter()
                    .map(|c| p.get(c).map_or(nan(), |s| s.refusal))
                    .collect(),
            ))
        })
        .collect();
    let bars = Bars {
        title: "Behaviour probes: refusal rate per subject",
        y_label: "refusal rate",
        categories,
        series,
    };
    draw_bars(&out.join("probes_refusal.png"), &bars).map(Some)
}

fn nan() -> Estimate {
    crate::stats::mean(&[])
}

fn draw_bars(path: &Path, bars: &Bars) -> Result<PathBuf, EvalError> {
    distill_plot::render(path, SIZE, |rgb| render_bars(bars, rgb)).map_err(|e| EvalError::Input {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    Ok(path.to_path_buf())
}

fn render_bars(bars: &Bars, rgb: &mut [u8]) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    let root = BitMapBackend::with_buffer(rgb, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let top = bars
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|e| e.ci95[1]))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let y_max = if top > 0.0 { top * 1.1 } else { 1.0 };
    let n_cat = bars.categories.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(bars.title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..n_cat as f64, 0.0..y_max)
        .map_err(err)?;
    let categories = bars.categories.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n_cat.max(1) * 2 + 1)
        .x_label_formatter(&move |x| {
            // Label only the centres of the groups.
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 1e-6 {
                categories.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(bars.y_label)
        .y_label_formatter(&|v| distill_plot::tick_label(*v))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(err)?;
    let k = bars.series.len().max(1) as f64;
    let width = 0.8 / k;
    for (s, (label, values)) in bars.series.iter().enumerate() {
        let color = PALETTE[s % PALETTE.len()];
        let x0 = |c: usize| c as f64 + 0.1 + s as f64 * width;
        let rects = values
            .iter()
            .enumerate()
            .filter(|(_, e)| e.value.is_finite())
            .map(|(c, e)| Rectangle::new([(x0(c), 0.0), (x0(c) + width * 0.9, e.value)], color.filled()));
        chart
            .draw_series(rects)
            .map_err(err)?
            .label(label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled()));
        let whiskers = values
            .iter()
            .enumerate()
            .filter(|(_, e)| e.value.is_finite() && e.ci95[0].is_finite() && e.ci95[1] > e.ci95[0])
            .map(|(c, e)| {
                let x = x0(c) + width * 0.45;
                PathElement::new(vec![(x, e.ci95[0]), (x, e.ci95[1])], BLACK.stroke_width(2))
            });
        chart.draw_series(whiskers).map_err(err)?;
    }
    distill_plot::draw_legend(&mut chart)?;
    root.present().map_err(err)
}
