//! The training metrics log (`metrics.jsonl`) and the training-curve plot drawn from it.
//!
//! One JSON object per logged step, appended and flushed as soon as the step is done, so a
//! crash keeps every completed line. A crash in the middle of a write can leave a torn last
//! line: the reader skips it, and reopening the log for appending cuts it off first so the
//! next line starts clean.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use distill_plot::plotters::coord::Shift;
use distill_plot::plotters::prelude::*;
use distill_plot::{AxisLabels, LegendEntry, Mark, PALETTE, PlotError};
use serde::{Deserialize, Deserializer, Serialize};

/// The log's file name inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Width and height of the plot written by [`plot_curves`], in pixels.
pub const PLOT_SIZE: (u32, u32) = (1200, 900);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot open metrics log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write metrics log {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read metrics log {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}:{line}: not a metrics record")]
    Parse {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("metrics record for {path} has extra key {key:?}, which clashes with a standard field")]
    ExtraKeyClash { path: PathBuf, key: String },
    #[error("metrics log {path} has no records to plot")]
    NothingToPlot { path: PathBuf },
    #[error("cannot draw training curves into {path}: {message}")]
    Plot { path: PathBuf, message: String },
    #[error("cannot write training-curve image {path}")]
    WritePng {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One line of `metrics.jsonl`.
///
/// JSON has no NaN or infinity: serde_json writes a non-finite float as `null`, and the
/// reader turns `null` back into NaN, so a diverging run still logs (and reads back) its steps.
/// Floats are written exactly (shortest round-trip form); reading them back in Rust can be one
/// ulp off, since the workspace's serde_json is built without `float_roundtrip`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    pub step: u64,
    #[serde(deserialize_with = "null_as_nan")]
    pub loss: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub kl: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub ce: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub lr: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub grad_norm: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub tokens_per_s: f64,
    /// Accelerator memory in use, when the backend can tell; written as `null` otherwise.
    pub mem_gb: Option<f64>,
    /// Anything else the trainer wants on the line (e.g. `"epoch"`, `"eval_loss"`).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn null_as_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The standard keys, which `extra` must not repeat (the line would carry the key twice).
const STANDARD_KEYS: [&str; 8] = [
    "step",
    "loss",
    "kl",
    "ce",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mem_gb",
];

/// Appends [`MetricsRecord`]s to a JSONL file.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens (creating it and its parent directories if needed) the log at `path` for
    /// appending. A torn last line left by a crash is cut off first.
    pub fn open(path: &Path) -> Result<Self, MetricsError> {
        let open_err = |source| MetricsError::Open {
            path: path.into(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(open_err)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .create(true)
            .append(true)
            .open(path)
            .map_err(open_err)?;
        truncate_torn_tail(&mut file).map_err(open_err)?;
        Ok(Self {
            path: path.into(),
            file,
        })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `record` as one line and flushes it to the OS before returning.
    pub fn append(&mut self, record: &MetricsRecord) -> Result<(), MetricsError> {
        if let Some(key) = record.extra.keys().find(|k| STANDARD_KEYS.contains(&k.as_str())) {
            return Err(MetricsError::ExtraKeyClash {
                path: self.path.clone(),
                key: key.clone(),
            });
        }
        let mut line = serde_json::to_vec(record).expect("a MetricsRecord always serializes");
        line.push(b'\n');
        // One write_all on an O_APPEND, unbuffered file: the line reaches the OS whole or, if
        // the process dies mid-call, as a torn tail that open() and read_metrics() handle.
        self.file
            .write_all(&line)
            .and_then(|()| self.file.flush())
            .map_err(|source| MetricsError::Write {
                path: self.path.clone(),
                source,
            })
    }
}

/// Cuts the file back to just after its last newline (to empty when it has none).
fn truncate_torn_tail(file: &mut File) -> io::Result<()> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut bytes)?;
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if keep < bytes.len() {
        file.set_len(keep as u64)?;
    }
    Ok(())
}

/// Reads every record of a metrics log. A last line with no newline that does not parse is a
/// write torn by a crash and is skipped; an unparsable line anywhere else is an error.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>, MetricsError> {
    let text = std::fs::read_to_string(path).map_err(|source| MetricsError::Read {
        path: path.into(),
        source,
    })?;
    let ends_cleanly = text.is_empty() || text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut records = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(record) => records.push(record),
            Err(_) if i + 1 == lines.len() && !ends_cleanly => break,
            Err(source) => {
                return Err(MetricsError::Parse {
                    path: path.into(),
                    line: i + 1,
                    source,
                });
            }
        }
    }
    Ok(records)
}

/// After a resume from a checkpoint the log can hold a step twice (logged, crashed before the
/// next checkpoint, logged again); the later line is the run that continued.
fn latest_per_step(records: Vec<MetricsRecord>) -> Vec<MetricsRecord> {
    let by_step: BTreeMap<u64, MetricsRecord> = records.into_iter().map(|r| (r.step, r)).collect();
    by_step.into_values().collect()
}

// ---------------------------------------------------------------------------------------------
// Plotting.

/// Draws the training curves of `metrics_jsonl` into a PNG at `out_png`: the loss and the CE
/// in the upper panel, the KL to the teacher in its own panel below (it is two orders of
/// magnitude smaller than the CE; a run without a KL term has no such panel), the learning
/// rate at the bottom.
pub fn plot_curves(metrics_jsonl: &Path, out_png: &Path) -> Result<(), MetricsError> {
    let records = latest_per_step(read_metrics(metrics_jsonl)?);
    if records.is_empty() {
        return Err(MetricsError::NothingToPlot {
            path: metrics_jsonl.into(),
        });
    }
    let steps = step_range(records[0].step, records[records.len() - 1].step);
    let panels = curve_panels(&records);
    render(out_png, |rgb| draw_panels("Training curves", &panels, steps, rgb))
}

/// Draws into a white RGB buffer of [`PLOT_SIZE`] and writes it to `out_png`.
fn render(out_png: &Path, draw: impl FnOnce(&mut [u8]) -> Result<(), String>) -> Result<(), MetricsError> {
    distill_plot::render(out_png, PLOT_SIZE, draw).map_err(|e| match e {
        PlotError::Draw(message) => MetricsError::Plot {
            path: out_png.into(),
            message,
        },
        PlotError::Write(source) => MetricsError::WritePng {
            path: out_png.into(),
            source,
        },
    })
}

/// The x range from the first to the last step, widened when they are one step.
fn step_range(first: u64, last: u64) -> Range<f64> {
    let (first, last) = (first as f64, last as f64);
    if last > first {
        first..last
    } else {
        first - 1.0..first + 1.0
    }
}

/// Draws several runs' curves on shared axes, one colour per run: the cross-entropy on the
/// training text (which every run logs, whatever its loss weights) in the upper panel, the
/// KL to the teacher in the lower one (runs without a KL term leave it). `runs`: (label,
/// metrics.jsonl).
pub fn plot_runs(runs: &[(String, PathBuf)], out_png: &Path) -> Result<(), MetricsError> {
    let mut ce = Vec::with_capacity(runs.len());
    let mut kl = Vec::with_capacity(runs.len());
    let (mut first_step, mut last_step) = (u64::MAX, 0);
    for (i, (label, path)) in runs.iter().enumerate() {
        let records = latest_per_step(read_metrics(path)?);
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Err(MetricsError::NothingToPlot { path: path.clone() });
        };
        (first_step, last_step) = (first_step.min(first.step), last_step.max(last.step));
        let color = PALETTE[i % PALETTE.len()];
        ce.push(curve(&records, label, color, |r| r.ce));
        kl.push(curve(&records, label, color, |r| r.kl));
    }
    // A CE-only run logs KL 0 throughout: no teacher, nothing to draw.
    kl.retain(Curve::has_signal);
    let panels = [
        Panel {
            y_desc: "CE on the training text",
            curves: ce,
        },
        Panel {
            y_desc: "KL to the teacher",
            curves: kl,
        },
    ];
    let steps = step_range(first_step, last_step);
    render(out_png, |rgb| draw_panels("Training runs", &panels, steps, rgb))
}

/// One line on a panel.
struct Curve {
    label: String,
    color: RGBColor,
    /// (step, value), finite values only: NaN steps leave a gap-free line over their neighbours.
    points: Vec<(f64, f64)>,
}

impl Curve {
    /// Whether the curve is more than zero throughout (what a run without that term logs).
    fn has_signal(&self) -> bool {
        self.points.iter().any(|&(_, v)| v != 0.0)
    }
}

fn curve(records: &[MetricsRecord], label: &str, color: RGBColor, field: fn(&MetricsRecord) -> f64) -> Curve {
    let points = records
        .iter()
        .map(|r| (r.step as f64, field(r)))
        .filter(|(_, v)| v.is_finite())
        .collect();
    Curve {
        label: label.to_owned(),
        color,
        points,
    }
}

/// Curves that share a y axis, stacked with the other panels over one step axis.
struct Panel {
    y_desc: &'static str,
    curves: Vec<Curve>,
}

impl Panel {
    /// The y range covering every finite point, padded 5% so lines do not run along the frame.
    fn value_range(&self) -> Range<f64> {
        let values = self.curves.iter().flat_map(|c| c.points.iter().map(|&(_, v)| v));
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        if !lo.is_finite() {
            return 0.0..1.0; // nothing finite to show: an empty, labelled panel
        }
        let pad = if hi > lo {
            (hi - lo) * 0.05
        } else {
            lo.abs().max(1e-12) * 0.1
        };
        lo - pad..hi + pad
    }
}

/// One run's panels: loss and CE (on one scale: the loss is their weighted sum with the KL),
/// the KL on its own scale when the run has a KL term, and the learning rate.
fn curve_panels(records: &[MetricsRecord]) -> Vec<Panel> {
    let mut panels = vec![Panel {
        y_desc: "loss and CE",
        curves: vec![
            curve(records, "loss", PALETTE[0], |r| r.loss),
            curve(records, "ce", PALETTE[2], |r| r.ce),
        ],
    }];
    let kl = curve(records, "kl", PALETTE[3], |r| r.kl);
    if kl.has_signal() {
        panels.push(Panel {
            y_desc: "KL to the teacher",
            curves: vec![kl],
        });
    }
    panels.push(Panel {
        y_desc: "learning rate",
        curves: vec![curve(records, "lr", PALETTE[4], |r| r.lr)],
    });
    panels
}

/// Labels on a panel's y axis.
const Y_TICKS: usize = 6;
/// Labels on the step axis.
const X_TICKS: usize = 10;

/// Draws `panels` stacked under `title` over one step axis, the first twice as tall as the
/// others, with one legend beside them that lists every label once.
fn draw_panels(title: &str, panels: &[Panel], steps: Range<f64>, rgb: &mut [u8]) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    let root = BitMapBackend::with_buffer(rgb, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 28)).map_err(err)?;
    let mut legend: Vec<LegendEntry> = Vec::new();
    for c in panels.iter().flat_map(|p| &p.curves) {
        if !legend.iter().any(|e| e.label == c.label) {
            legend.push(LegendEntry {
                label: &c.label,
                color: c.color,
                mark: Mark::Line,
            });
        }
    }
    let (plots, legend_area) = distill_plot::split_for_legend(&root, &legend)?;
    distill_plot::draw_side_legend(&legend_area, &legend)?;
    let height = plots.dim_in_pixel().1;
    let shares = panels.len() as u32 + 1;
    let breaks: Vec<u32> = (1..panels.len() as u32)
        .map(|i| height * (i + 1) / shares)
        .collect();
    let areas = plots.split_by_breakpoints([0u32; 0], breaks);
    for (i, (panel, area)) in panels.iter().zip(&areas).enumerate() {
        // The step axis is named once, under the bottom panel.
        let x_desc = if i + 1 == panels.len() { "step" } else { "" };
        draw_panel(area, panel, x_desc, steps.clone())?;
    }
    root.present().map_err(err)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    x_desc: &str,
    steps: Range<f64>,
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let values = panel.value_range();
    let (x_labels, y_labels) = (
        AxisLabels::new(&steps, X_TICKS),
        AxisLabels::new(&values, Y_TICKS),
    );
    let mut chart = ChartBuilder::on(area)
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(96)
        .build_cartesian_2d(steps, values)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(X_TICKS)
        .y_labels(Y_TICKS)
        .x_desc(x_desc)
        .y_desc(panel.y_desc)
        .x_label_formatter(&|v| x_labels.format(*v))
        .y_label_formatter(&|v| y_labels.format(*v))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(err)?;
    for c in &panel.curves {
        chart
            .draw_series(LineSeries::new(c.points.iter().copied(), c.color.stroke_width(2)))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Six significant digits: serde_json's default (non-`float_roundtrip`) parser can be one
    /// ulp off on 16-17 digit decimals, which would make exact round-trip comparisons flaky.
    fn sig6(x: f64) -> f64 {
        format!("{x:.5e}").parse().unwrap()
    }

    fn record(step: u64) -> MetricsRecord {
        let t = step as f64;
        MetricsRecord {
            step,
            loss: sig6(3.0 * (-t / 40.0).exp() + 0.5),
            kl: sig6(2.0 * (-t / 30.0).exp() + 0.2),
            ce: sig6((-t / 60.0).exp() + 0.3),
            lr: sig6(1e-4 * (t / 10.0).min(1.0) * (1.0 - t / 200.0)),
            grad_norm: 1.0,
            tokens_per_s: 1234.5,
            mem_gb: None,
            extra: serde_json::Map::new(),
        }
    }

    #[test]
    fn lines_have_the_documented_keys_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/metrics.jsonl");
        let mut log = MetricsLog::open(&path).unwrap();
        let mut with_extra = record(2);
        with_extra.mem_gb = Some(1.5);
        with_extra.extra.insert("epoch".into(), json!(0));
        log.append(&record(1)).unwrap();
        log.append(&with_extra).unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let keys: Vec<&str> = first.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, STANDARD_KEYS);
        assert!(first["mem_gb"].is_null());
        assert_eq!(read_metrics(&path).unwrap(), [record(1), with_extra]);
    }

    #[test]
    fn non_finite_values_are_logged_as_null_and_read_back_as_nan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let mut diverged = record(3);
        diverged.loss = f64::NAN;
        diverged.grad_norm = f64::INFINITY;
        MetricsLog::open(&path).unwrap().append(&diverged).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains(r#""loss":null"#));
        let back = &read_metrics(&path).unwrap()[0];
        assert!(back.loss.is_nan() && back.grad_norm.is_nan());
        assert_eq!(back.kl, diverged.kl);
    }

    #[test]
    fn a_torn_last_line_is_skipped_by_the_reader_and_cut_by_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let mut log = MetricsLog::open(&path).unwrap();
        log.append(&record(1)).unwrap();
        log.append(&record(2)).unwrap();
        drop(log);
        // A crash halfway through writing step 3.
        let line = serde_json::to_string(&record(3)).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&line.as_bytes()[..line.len() / 2]).unwrap();
        drop(f);
        assert_eq!(read_metrics(&path).unwrap(), [record(1), record(2)]);

        let mut log = MetricsLog::open(&path).unwrap();
        log.append(&record(3)).unwrap();
        assert_eq!(read_metrics(&path).unwrap(), [record(1), record(2), record(3)]);
    }

    #[test]
    fn a_bad_line_in_the_middle_is_an_error_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let good = serde_json::to_string(&record(1)).unwrap();
        std::fs::write(&path, format!("{good}\n{{\"step\": oops\n{good}\n")).unwrap();
        match read_metrics(&path) {
            Err(MetricsError::Parse { path: p, line: 2, .. }) => assert_eq!(p, path),
            other => panic!("expected a parse error on line 2, got {other:?}"),
        }
    }

    #[test]
    fn extra_keys_may_not_shadow_standard_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let mut r = record(1);
        r.extra.insert("loss".into(), json!(1.0));
        let err = MetricsLog::open(&path).unwrap().append(&r).unwrap_err();
        assert!(
            matches!(err, MetricsError::ExtraKeyClash { ref key, .. } if key == "loss"),
            "{err}"
        );
    }

    #[test]
    fn resumed_steps_keep_the_later_line() {
        let mut again = record(2);
        again.loss = 9.0;
        let kept = latest_per_step(vec![record(1), record(2), record(3), again.clone()]);
        assert_eq!(kept, [record(1), again, record(3)]);
    }

    #[test]
    fn plot_is_a_png_of_the_documented_size_with_something_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join(METRICS_FILE);
        let mut log = MetricsLog::open(&log_path).unwrap();
        for step in (0..=200).step_by(5) {
            log.append(&record(step)).unwrap();
        }
        let png_path = dir.path().join("plots/curves.png");
        plot_curves(&log_path, &png_path).unwrap();
        if let Some(keep) = std::env::var_os("DISTILL_KEEP_PLOT") {
            std::fs::copy(&png_path, keep).unwrap();
        }

        let decoder = png::Decoder::new(io::BufReader::new(File::open(&png_path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), PLOT_SIZE);
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let drawn = pixels.chunks_exact(3).filter(|px| *px != [255, 255, 255]).count();
        // Axes, text and three curves: well above nothing, well below everything.
        let total = (PLOT_SIZE.0 * PLOT_SIZE.1) as usize;
        assert!(
            drawn > total / 100 && drawn < total / 2,
            "{drawn} of {total} pixels drawn"
        );
        // The loss curve's colour is actually there, not just black axes.
        assert!(pixels.chunks_exact(3).any(|px| px == [31, 119, 180]));
    }

    #[test]
    fn runs_share_one_plot_in_their_own_colours() {
        let dir = tempfile::tempdir().unwrap();
        let mut runs = Vec::new();
        // Eight runs, as an experiment's arms: each keeps a colour of its own.
        let arms = [
            "sft",
            "kd",
            "kd-t2",
            "kd-rev",
            "kd-jsd",
            "kd-renorm",
            "sft-lr",
            "kd-lr",
        ];
        for (i, name) in arms.iter().enumerate() {
            let with_kl = i % 2 == 1;
            let path = dir.path().join(name).join(METRICS_FILE);
            let mut log = MetricsLog::open(&path).unwrap();
            for step in (0..=100).step_by(5) {
                let mut r = record(step);
                if !with_kl {
                    r.kl = 0.0;
                }
                log.append(&r).unwrap();
            }
            runs.push((name.to_string(), path));
        }
        let png_path = dir.path().join("runs.png");
        plot_runs(&runs, &png_path).unwrap();
        let decoder = png::Decoder::new(io::BufReader::new(File::open(&png_path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut pixels).unwrap();
        for RGBColor(r, g, b) in &PALETTE[..arms.len()] {
            let color = [*r, *g, *b];
            assert!(pixels.chunks_exact(3).any(|px| px == color), "{color:?} missing");
        }
        let empty = dir.path().join("empty").join(METRICS_FILE);
        MetricsLog::open(&empty).unwrap();
        runs.push(("empty".into(), empty.clone()));
        assert!(matches!(
            plot_runs(&runs, &png_path),
            Err(MetricsError::NothingToPlot { path }) if path == empty
        ));
    }

    /// The tiny recipe's run: CE about 5.5, KL about 0.03 (or none), the learning rate warming
    /// up to 3e-3 over 3 steps and decaying to 0 at step 20.
    fn tiny_run(kl: f64) -> Vec<MetricsRecord> {
        (1..=20)
            .map(|step| {
                let mut r = record(step);
                let t = step as f64;
                r.ce = 5.5 - 0.01 * t;
                r.kl = kl * (1.0 + 0.1 * (t / 3.0).sin());
                r.loss = 0.5 * r.kl + 0.5 * r.ce;
                r.lr = 3e-3 * (t / 3.0).min(1.0) * ((20.0 - t) / 17.0).min(1.0);
                r
            })
            .collect()
    }

    fn labels(panels: &[Panel]) -> Vec<Vec<&str>> {
        panels
            .iter()
            .map(|p| p.curves.iter().map(|c| c.label.as_str()).collect())
            .collect()
    }

    #[test]
    fn kl_gets_a_panel_and_a_scale_of_its_own() {
        let panels = curve_panels(&tiny_run(0.03));
        assert_eq!(labels(&panels), [vec!["loss", "ce"], vec!["kl"], vec!["lr"]]);
        // The KL spans its panel instead of lying flat at the bottom of the CE's 0-6.
        let kl = panels[1].value_range();
        assert!(kl.start > 0.02 && kl.end < 0.04, "{kl:?}");
        assert!(panels[0].value_range().start > 2.0);
        // A run without a KL term has no KL panel.
        assert_eq!(
            labels(&curve_panels(&tiny_run(0.0))),
            [vec!["loss", "ce"], vec!["lr"]]
        );
    }

    #[test]
    fn the_learning_rate_axis_labels_are_distinct() {
        use distill_plot::plotters::coord::ranged1d::Ranged;
        use distill_plot::plotters::coord::types::RangedCoordf64;
        let panels = curve_panels(&tiny_run(0.03));
        let range = panels.last().unwrap().value_range();
        let format = AxisLabels::new(&range, Y_TICKS);
        let coord: RangedCoordf64 = range.into();
        let ticks: Vec<String> = coord
            .key_points(Y_TICKS)
            .into_iter()
            .map(|v| format.format(v))
            .collect();
        assert!(ticks.len() >= 3, "{ticks:?}");
        let mut unique = ticks.clone();
        unique.dedup();
        assert_eq!(unique, ticks);
        assert!(ticks.contains(&"3.0e-3".to_string()), "{ticks:?}");
    }

    #[test]
    fn a_single_step_and_an_empty_log_are_handled() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join(METRICS_FILE);
        let mut log = MetricsLog::open(&log_path).unwrap();
        let png_path = dir.path().join("curves.png");
        assert!(matches!(
            plot_curves(&log_path, &png_path),
            Err(MetricsError::NothingToPlot { .. })
        ));
        log.append(&record(0)).unwrap();
        plot_curves(&log_path, &png_path).unwrap();
        assert!(png_path.exists());
    }
}
