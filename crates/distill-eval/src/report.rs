//! What `distill eval` writes: report.json (every metric with its standard error, 95%
//! interval and count), examples.jsonl (one line per scored output), report.md (side-by-side
//! tables) and PNG plots (accuracy with error bars, accuracy by reasoning length, probe
//! refusal rates per subject).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use distill_plot::plotters::prelude::*;
use distill_plot::plotters::style::IntoTextStyle;
use distill_plot::plotters::style::text_anchor::{HPos, Pos, VPos};
use distill_plot::{AxisLabels, LegendEntry, Mark, PALETTE};
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
    /// How the models were run; None when the report scores predictions made elsewhere.
    #[serde(flatten)]
    pub generation: Option<GenerationSettings>,
    /// The predictions file scored instead of running models.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predictions: Option<PathBuf>,
    /// The model every other one is compared with on the held-out samples, example by example.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_out_baseline: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationSettings {
    pub sampling: Sampling,
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub device: String,
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

/// Writes report.json, examples.jsonl, heldout.jsonl, the plots and report.md into `out`;
/// report.md links the plots drawn here and `more_plots` (PNGs the caller drew into `out`,
/// such as training curves). Returns every plot report.md links.
pub fn write_all(
    out: &Path,
    report: &Report,
    examples: &[ExampleRecord],
    more_plots: Vec<PathBuf>,
) -> Result<Vec<PathBuf>, EvalError> {
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
    for plot in [accuracy_plot, length_plot, probe_plot] {
        plots.extend(plot(out, report)?);
    }
    plots.extend(more_plots);
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
    // Sampling settings mean something only where a model generated (tasks or probes).
    let generated = report
        .models
        .iter()
        .any(|m| !m.tasks.is_empty() || m.probes.is_some());
    match (&s.generation, &s.predictions) {
        (Some(g), _) if !generated => {
            let _ = writeln!(md, "Device {}; no outputs were generated.", g.device);
        }
        (Some(g), _) => {
            let _ = writeln!(
                md,
                "Sampling: temperature {}, top_p {}, top_k {}; {} sample(s) per prompt; max {} new tokens; seed {}; device {}.",
                g.sampling.temperature,
                g.sampling.top_p,
                g.sampling.top_k,
                g.samples_per_prompt,
                g.max_new_tokens,
                g.seed,
                g.device
            );
        }
        (None, Some(p)) => {
            let _ = writeln!(md, "Scored predictions from `{}`: no model was run.", p.display());
        }
        (None, None) => {}
    }
    md.push_str(
        "Figures are value ± half-width of the 95% interval (Wilson for shares of prompts, normal for means).\n\n",
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
    if !plots.is_empty() {
        md.push_str("\n## Plots\n");
    }
    for p in plots {
        if let Some(name) = p.file_name() {
            let name = name.to_string_lossy();
            let _ = writeln!(md, "\n![{name}]({})", link_target(&name));
        }
    }
    md
}

/// A file name as a Markdown link target: `<...>` keeps spaces and parentheses (a run
/// labelled `kd (t=2)`) from ending the link early.
fn link_target(name: &str) -> String {
    if name.contains([' ', '(', ')']) {
        format!("<{name}>")
    } else {
        name.to_owned()
    }
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
// Categories whose labels do not fit side by side (the 22 probe subjects) become horizontal
// bars with the labels down the side.

const WIDTH: u32 = 1200;
const VERTICAL_HEIGHT: u32 = 700;
/// Room the value axis, margins and the legend take from the width, for the label fit.
const CHROME_WIDTH: u32 = 360;
/// About the width of one character of a 15 px label.
const LABEL_CHAR_WIDTH: u32 = 9;
const VALUE_TICKS: usize = 10;

struct Bars<'a> {
    title: &'a str,
    /// What the categories are: the category axis' title.
    category_label: &'a str,
    value_label: &'a str,
    categories: Vec<String>,
    /// (model label, one estimate per category; NaN = no bar).
    series: Vec<(String, Vec<Estimate>)>,
}

impl Bars<'_> {
    /// Whether the category labels need the long side: they do not fit under vertical bars.
    fn horizontal(&self) -> bool {
        let chars: usize = self.categories.iter().map(|c| c.chars().count() + 2).sum();
        chars as u32 * LABEL_CHAR_WIDTH > WIDTH - CHROME_WIDTH
    }

    fn size(&self) -> (u32, u32) {
        if self.horizontal() {
            let per_category = (14 * self.series.len() as u32 + 10).max(26);
            (WIDTH, 160 + per_category * self.categories.len() as u32)
        } else {
            (WIDTH, VERTICAL_HEIGHT)
        }
    }

    /// The value axis: from a little below zero, so a bar of zero stands clear of the frame,
    /// to above the highest interval, leaving room for the value labels.
    fn value_range(&self) -> std::ops::Range<f64> {
        let top = self
            .series
            .iter()
            .flat_map(|(_, v)| v.iter().flat_map(|e| [e.value, e.ci95[1]]))
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let top = if top > 0.0 { top } else { 1.0 };
        -0.03 * top..1.15 * top
    }
}

/// One bar as drawn: where it sits on the category axis, its value, its 95% interval (the
/// whisker) and the label written past the whisker's end.
#[derive(Debug, Clone, PartialEq)]
struct BarMark {
    series: usize,
    /// (start, end) on the category axis, where category i spans [i, i + 1).
    band: (f64, f64),
    value: f64,
    whisker: Option<(f64, f64)>,
    label: String,
}

fn bar_marks(bars: &Bars) -> Vec<BarMark> {
    let width = 0.8 / bars.series.len().max(1) as f64;
    let mut marks = Vec::new();
    for (s, (_, values)) in bars.series.iter().enumerate() {
        for (c, e) in values.iter().enumerate().filter(|(_, e)| e.value.is_finite()) {
            let start = c as f64 + 0.1 + s as f64 * width;
            let [lo, hi] = e.ci95;
            marks.push(BarMark {
                series: s,
                band: (start, start + width * 0.9),
                value: e.value,
                whisker: (lo.is_finite() && hi > lo).then_some((lo, hi)),
                label: value_text(e.value),
            });
        }
    }
    marks
}

/// A bar's value as written beside it: "0" for nothing, else two decimals.
fn value_text(v: f64) -> String {
    if v == 0.0 { "0".into() } else { format!("{v:.2}") }
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
        category_label: "task",
        value_label: "accuracy",
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
        title: "Accuracy by reasoning length, with 95% intervals",
        category_label: "tokens inside <think>",
        value_label: "accuracy",
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
        title: "Behaviour probes: refusal rate per subject, with 95% intervals",
        category_label: "subject",
        value_label: "refusal rate",
        categories,
        series,
    };
    draw_bars(&out.join("probes_refusal.png"), &bars).map(Some)
}

fn nan() -> Estimate {
    crate::stats::mean(&[])
}

fn draw_bars(path: &Path, bars: &Bars) -> Result<PathBuf, EvalError> {
    let size = bars.size();
    distill_plot::render(path, size, |rgb| render_bars(bars, size, rgb)).map_err(|e| EvalError::Input {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    Ok(path.to_path_buf())
}

fn render_bars(bars: &Bars, size: (u32, u32), rgb: &mut [u8]) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    let root = BitMapBackend::with_buffer(rgb, size).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(bars.title, ("sans-serif", 26)).map_err(err)?;
    let legend: Vec<LegendEntry> = bars
        .series
        .iter()
        .enumerate()
        .map(|(s, (label, _))| LegendEntry {
            label,
            color: PALETTE[s % PALETTE.len()],
            mark: Mark::Box,
        })
        .collect();
    let (area, legend_area) = distill_plot::split_for_legend(&root, &legend)?;
    distill_plot::draw_side_legend(&legend_area, &legend)?;

    let horizontal = bars.horizontal();
    let n_cat = bars.categories.len();
    let categories = 0.0..n_cat as f64;
    let values = bars.value_range();
    let value_labels = AxisLabels::new(&values, VALUE_TICKS);
    // (position on the category axis, value) -> chart coordinates; the first category on top
    // when they run down the side.
    let point = move |c: f64, v: f64| if horizontal { (v, n_cat as f64 - c) } else { (c, v) };
    let label_font = ("sans-serif", 15).into_text_style(&area);
    let mut widest = 0;
    for c in &bars.categories {
        widest = widest.max(area.estimate_text_size(c, &label_font).map_err(err)?.0);
    }
    let (x_range, y_range) = if horizontal {
        (values.clone(), categories)
    } else {
        (categories, values.clone())
    };
    let mut chart = ChartBuilder::on(&area)
        .margin(20)
        .x_label_area_size(70)
        .y_label_area_size(if horizontal { widest + 50 } else { 90 })
        .build_cartesian_2d(x_range, y_range)
        .map_err(err)?;
    let names = bars.categories.clone();
    // Category labels at the centres of the groups only (ticks fall every half category).
    let category_text = move |at: f64| {
        let c = if horizontal { n_cat as f64 - at } else { at };
        if (c - c.floor() - 0.5).abs() < 1e-6 {
            names.get(c.floor() as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let tick_text = |at: f64, on_category_axis: bool| {
        if on_category_axis {
            category_text(at)
        } else {
            value_labels.format(at)
        }
    };
    let (x_desc, y_desc) = if horizontal {
        (bars.value_label, bars.category_label)
    } else {
        (bars.category_label, bars.value_label)
    };
    let category_ticks = n_cat.max(1) * 2 + 1;
    let mut mesh = chart.configure_mesh();
    if horizontal {
        mesh.disable_y_mesh()
            .x_labels(VALUE_TICKS)
            .y_labels(category_ticks);
    } else {
        mesh.disable_x_mesh()
            .x_labels(category_ticks)
            .y_labels(VALUE_TICKS);
    }
    mesh.x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| tick_text(*v, !horizontal))
        .y_label_formatter(&|v| tick_text(*v, horizontal))
        .label_style(label_font.clone())
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(err)?;
    // The zero line the bars stand on.
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![point(0.0, 0.0), point(n_cat as f64, 0.0)],
            BLACK.mix(0.4).stroke_width(1),
        )))
        .map_err(err)?;
    let value_font = ("sans-serif", 13).into_font().color(&BLACK);
    let label_pos = if horizontal {
        Pos::new(HPos::Left, VPos::Center)
    } else {
        Pos::new(HPos::Center, VPos::Bottom)
    };
    for m in bar_marks(bars) {
        let color = PALETTE[m.series % PALETTE.len()];
        let (b0, b1) = m.band;
        let mid = (b0 + b1) / 2.0;
        // The bar, and its end as a thick line in the bar's colour: a bar of zero is that line
        // on the zero line, not nothing.
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [point(b0, 0.0), point(b1, m.value)],
                color.mix(0.75).filled(),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![point(b0, m.value), point(b1, m.value)],
                color.stroke_width(4),
            )))
            .map_err(err)?;
        // The interval: a thin black whisker with caps, drawn over the bar.
        let end = match m.whisker {
            Some((lo, hi)) => {
                let cap = (b1 - b0) / 4.0;
                let style = BLACK.stroke_width(1);
                chart
                    .draw_series([
                        PathElement::new(vec![point(mid, lo), point(mid, hi)], style),
                        PathElement::new(vec![point(mid - cap, lo), point(mid + cap, lo)], style),
                        PathElement::new(vec![point(mid - cap, hi), point(mid + cap, hi)], style),
                    ])
                    .map_err(err)?;
                hi.max(m.value)
            }
            None => m.value,
        };
        let offset = if horizontal { (6, 0) } else { (0, -4) };
        let label =
            EmptyElement::at(point(mid, end)) + Text::new(m.label, offset, value_font.clone().pos(label_pos));
        chart.draw_series(std::iter::once(label)).map_err(err)?;
    }
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn estimate(value: f64, ci95: [f64; 2]) -> Estimate {
        Estimate {
            value,
            stderr: (ci95[1] - ci95[0]) / 3.92,
            ci95,
            n: 10,
        }
    }

    fn bars(categories: &[&str], series: Vec<(String, Vec<Estimate>)>) -> Bars<'static> {
        Bars {
            title: "t",
            category_label: "task",
            value_label: "accuracy",
            categories: categories.iter().map(|c| c.to_string()).collect(),
            series,
        }
    }

    #[test]
    fn a_zero_bar_is_drawn_as_zero_with_its_interval_apart() {
        let b = bars(
            &["a", "b"],
            vec![(
                "m".into(),
                vec![estimate(0.0, [0.0, 0.3]), estimate(0.5, [0.3, 0.7])],
            )],
        );
        let marks = bar_marks(&b);
        assert_eq!(marks.len(), 2);
        assert_eq!((marks[0].value, marks[0].label.as_str()), (0.0, "0"));
        assert_eq!(marks[0].whisker, Some((0.0, 0.3)));
        assert_eq!(marks[1].label, "0.50");
        // The value axis starts below zero: a bar of zero is not on the frame.
        assert!(b.value_range().start < 0.0 && b.value_range().end > 0.7);

        // Drawn: the series' own colour (the bar's end line) appears over the first category,
        // left of the legend, though the bar has no height.
        let size = b.size();
        let mut rgb = vec![0u8; (size.0 * size.1 * 3) as usize];
        distill_plot::register_font_once().unwrap();
        let zero_only = bars(
            &["a", "b"],
            vec![("m".into(), vec![estimate(0.0, [0.0, 0.3]); 2])],
        );
        render_bars(&zero_only, size, &mut rgb).unwrap();
        let RGBColor(r, g, b) = PALETTE[0];
        let width = size.0 as usize;
        let in_left_half = rgb
            .chunks_exact(3)
            .enumerate()
            .filter(|(i, px)| i % width < width / 2 && *px == [r, g, b])
            .count();
        assert!(in_left_half > 20, "{in_left_half} pixels of the bar's colour");
    }

    #[test]
    fn no_value_no_bar() {
        let b = bars(&["a"], vec![("m".into(), vec![nan()])]);
        assert!(bar_marks(&b).is_empty());
    }

    #[test]
    fn many_categories_run_down_the_side() {
        let few = bars(&["gsm8k-test", "math-500"], vec![("m".into(), vec![nan(); 2])]);
        assert!(!few.horizontal());
        assert_eq!(few.size(), (WIDTH, VERTICAL_HEIGHT));
        let subjects: Vec<String> = (0..22).map(|i| format!("Subject number {i}")).collect();
        let subjects: Vec<&str> = subjects.iter().map(String::as_str).collect();
        let many = bars(
            &subjects,
            vec![("m".into(), vec![nan(); 22]), ("n".into(), vec![nan(); 22])],
        );
        assert!(many.horizontal());
        // Each subject gets its rows: the plot grows with them.
        assert!(many.size().1 >= 22 * 26 + 100, "{:?}", many.size());
    }

    fn report(settings: Settings) -> Report {
        Report {
            format_version: FORMAT_VERSION,
            tool_version: "test",
            settings,
            models: Vec::new(),
            contamination: BTreeMap::new(),
        }
    }

    #[test]
    fn scored_predictions_report_no_sampling_settings() {
        let r = report(Settings {
            generation: None,
            predictions: Some("preds.jsonl".into()),
            held_out_baseline: None,
        });
        let md = markdown(&r, &[]);
        assert!(!md.contains("Sampling") && !md.contains("temperature"), "{md}");
        assert!(md.contains("Scored predictions from `preds.jsonl`"), "{md}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["settings"],
            serde_json::json!({"predictions": "preds.jsonl"})
        );

        let r = report(Settings {
            generation: Some(GenerationSettings {
                sampling: Sampling::GREEDY,
                samples_per_prompt: 4,
                max_new_tokens: 64,
                seed: 1,
                batch_size: 8,
                device: "cpu".into(),
            }),
            predictions: None,
            held_out_baseline: None,
        });
        // Held-out scoring alone generates nothing: no sampling to report.
        let md = markdown(&r, &[]);
        assert!(!md.contains("Sampling") && md.contains("Device cpu"), "{md}");
        let mut r = r;
        r.models.push(ModelReport {
            label: "m".into(),
            reference: "m".into(),
            parameters: None,
            tasks: Vec::new(),
            held_out: None,
            probes: Some(BTreeMap::new()),
        });
        assert!(markdown(&r, &[]).contains("4 sample(s) per prompt; max 64 new tokens"));
        // report.json keeps the settings' keys where they were.
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["settings"]["samples_per_prompt"], 4);
        assert_eq!(json["settings"]["device"], "cpu");
    }

    #[test]
    fn plots_are_linked_by_relative_name() {
        let r = report(Settings {
            generation: None,
            predictions: None,
            held_out_baseline: None,
        });
        let md = markdown(
            &r,
            &[
                PathBuf::from("/out/eval/accuracy.png"),
                PathBuf::from("/out/eval/training_curves-kd (t=2).png"),
            ],
        );
        assert!(md.contains("## Plots"), "{md}");
        assert!(md.contains("![accuracy.png](accuracy.png)"), "{md}");
        assert!(md.contains("(<training_curves-kd (t=2).png>)"), "{md}");
        assert!(!md.contains("/out/eval"), "{md}");
    }
}
