//! The plotting plumbing training curves (distill-train) and eval reports (distill-eval) share:
//! an embedded font, so plots get labels on machines without system fonts; one palette, so a
//! model keeps its colour across plots; legends beside the chart, never over its data; tick
//! labels that stay distinct; and drawing into an RGB buffer that is written as a PNG. Charts
//! themselves stay with the crate that knows their data.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

pub use plotters;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, IntoTextStyle, RGBColor};

/// A small ASCII subset of DejaVu Sans (licence beside it in assets/).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");

/// One colour per model or run: matplotlib's tab10, all ten, so that an experiment's ten
/// models (teacher, base, eight arms) never share a colour.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Why a plot was not written.
#[derive(Debug)]
pub enum PlotError {
    /// Drawing failed (plotters' message).
    Draw(String),
    /// Writing the PNG failed.
    Write(io::Error),
}

impl std::fmt::Display for PlotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlotError::Draw(msg) => write!(f, "drawing the plot: {msg}"),
            PlotError::Write(e) => write!(f, "writing the PNG: {e}"),
        }
    }
}

impl std::error::Error for PlotError {}

/// plotters' ab_glyph backend looks fonts up by family name in a process-wide table: call
/// this before drawing text as "sans-serif". [`render`] does.
pub fn register_font_once() -> Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err("the embedded font does not parse".to_owned())
    }
}

/// Draws into a white-initialisable RGB8 buffer of `size` (width, height) with the font
/// registered, and writes it to `out_png` (creating its directory).
pub fn render(
    out_png: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&mut [u8]) -> Result<(), String>,
) -> Result<(), PlotError> {
    register_font_once().map_err(PlotError::Draw)?;
    let (w, h) = size;
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    draw(&mut rgb).map_err(PlotError::Draw)?;
    write_png(out_png, &rgb, size).map_err(PlotError::Write)
}

/// How a legend entry shows its series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Line,
    Box,
}

/// One series in a legend.
#[derive(Debug, Clone, Copy)]
pub struct LegendEntry<'a> {
    pub label: &'a str,
    pub color: RGBColor,
    pub mark: Mark,
}

const LEGEND_FONT: u32 = 16;
const LEGEND_ROW: i32 = 24;
/// Room before a legend label: the mark and the gaps around it.
const LEGEND_MARK_WIDTH: u32 = 44;

/// A chart area and the legend column beside it.
pub type WithLegend<DB> = (DrawingArea<DB, Shift>, DrawingArea<DB, Shift>);

/// Splits `area` into a chart area and a column at its right wide enough for `entries`'
/// labels, for [`draw_side_legend`]: a legend beside the chart never covers its data.
pub fn split_for_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[LegendEntry],
) -> Result<WithLegend<DB>, String> {
    let font = ("sans-serif", LEGEND_FONT).into_text_style(area);
    let mut widest = 0;
    for e in entries {
        widest = widest.max(
            area.estimate_text_size(e.label, &font)
                .map_err(|e| e.to_string())?
                .0,
        );
    }
    let width = area.dim_in_pixel().0;
    let legend = (widest + LEGEND_MARK_WIDTH + 16).min(width / 3);
    Ok(area.split_horizontally(width - legend))
}

/// Draws `entries` top down in `area` (from [`split_for_legend`]), each with its colour's
/// line or box in front of its label.
pub fn draw_side_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[LegendEntry],
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let font = ("sans-serif", LEGEND_FONT).into_font().color(&BLACK);
    let top = 24;
    for (i, e) in entries.iter().enumerate() {
        let y = top + i as i32 * LEGEND_ROW;
        match e.mark {
            Mark::Line => area
                .draw(&PathElement::new([(6, y), (34, y)], e.color.stroke_width(3)))
                .map_err(err)?,
            Mark::Box => area
                .draw(&Rectangle::new([(12, y - 7), (28, y + 7)], e.color.filled()))
                .map_err(err)?,
        }
        let text = Text::new(
            e.label,
            (LEGEND_MARK_WIDTH as i32, y),
            font.clone().pos(Pos::new(HPos::Left, VPos::Center)),
        );
        area.draw(&text).map_err(err)?;
    }
    Ok(())
}

/// Tick labels for one axis: one format for all its ticks, with as many digits as their
/// spacing needs, so that neighbouring ticks never share a label (at three decimals a learning
/// rate's 0.0025 and 0.003 both read "0.003"). Values under 0.01 or from 1e5 up are written
/// in scientific notation (`2.5e-3`), others as plain decimals without trailing zeros.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AxisLabels {
    scientific: bool,
    /// Decimals: after the point, or of the mantissa when scientific.
    digits: usize,
    /// Half the finest tick spacing: anything smaller is zero (float noise, not "-0").
    zero: f64,
}

impl AxisLabels {
    /// For an axis over `range` carrying at most `ticks` labels (the count given to plotters'
    /// `x_labels`/`y_labels`).
    pub fn new(range: &Range<f64>, ticks: usize) -> Self {
        let span = range.end - range.start;
        let top = range.start.abs().max(range.end.abs());
        if !(span > 0.0 && span.is_finite()) || ticks == 0 {
            return Self {
                scientific: !(1e-2..1e5).contains(&top) && top > 0.0,
                digits: 3,
                zero: 0.0,
            };
        }
        // plotters puts ticks on multiples of 1, 2 or 5 x 10^k, at least span / ticks apart:
        // 10^step_exp is at most their spacing.
        let step_exp = (span / ticks as f64).log10().floor() as i32;
        let top_exp = top.log10().floor() as i32;
        let zero = 10f64.powi(step_exp) / 2.0;
        if (-2..5).contains(&top_exp) {
            Self {
                scientific: false,
                digits: (-step_exp).max(0) as usize,
                zero,
            }
        } else {
            Self {
                scientific: true,
                digits: (top_exp - step_exp).max(1) as usize,
                zero,
            }
        }
    }

    pub fn format(&self, v: f64) -> String {
        if v == 0.0 || v.abs() < self.zero {
            return "0".to_owned();
        }
        if self.scientific {
            return format!("{v:.*e}", self.digits);
        }
        let fixed = format!("{v:.*}", self.digits);
        if fixed.contains('.') {
            fixed.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            fixed
        }
    }
}

/// Writes an RGB8 buffer as a PNG, creating the parent directory.
pub fn write_png(path: &Path, rgb: &[u8], (w, h): (u32, u32)) -> io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut encoder = png::Encoder::new(io::BufWriter::new(File::create(path)?), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(io::Error::other)?;
    writer.write_image_data(rgb).map_err(io::Error::other)?;
    writer.finish().map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ticks plotters draws on `range` with `n` labels, with the labels [`AxisLabels`] gives.
    fn labelled_ticks(range: Range<f64>, n: usize) -> Vec<(f64, String)> {
        use plotters::coord::ranged1d::Ranged;
        use plotters::coord::types::RangedCoordf64;
        let labels = AxisLabels::new(&range, n);
        let coord: RangedCoordf64 = range.into();
        coord
            .key_points(n)
            .into_iter()
            .map(|v| (v, labels.format(v)))
            .collect()
    }

    fn assert_distinct_and_faithful(range: Range<f64>, n: usize) {
        let ticks = labelled_ticks(range.clone(), n);
        assert!(ticks.len() >= 2, "{range:?}: {ticks:?}");
        let spacing = ticks[1].0 - ticks[0].0;
        for pair in ticks.windows(2) {
            assert_ne!(pair[0].1, pair[1].1, "{range:?}: {ticks:?}");
        }
        for (v, label) in &ticks {
            let read: f64 = label
                .parse()
                .unwrap_or_else(|_| panic!("{label:?} is not a number"));
            assert!((read - v).abs() <= spacing * 1e-6, "{range:?}: {label} for {v}");
        }
    }

    #[test]
    fn learning_rate_ticks_read_distinctly() {
        // A warm-up to 3e-3 and its decay, padded as the curves plot pads it.
        let labels: Vec<String> = labelled_ticks(-1.5e-4..3.15e-3, 10)
            .into_iter()
            .map(|t| t.1)
            .collect();
        assert_eq!(
            labels,
            ["0", "5.0e-4", "1.0e-3", "1.5e-3", "2.0e-3", "2.5e-3", "3.0e-3"]
        );
        assert_distinct_and_faithful(-1.5e-4..3.15e-3, 10);
    }

    #[test]
    fn plain_decimals_in_between_without_trailing_zeros() {
        let labels: Vec<String> = labelled_ticks(0.0..6.0, 10).into_iter().map(|t| t.1).collect();
        assert_eq!(labels, ["0", "1", "2", "3", "4", "5", "6"]);
        let labels: Vec<String> = labelled_ticks(0.02..0.045, 6).into_iter().map(|t| t.1).collect();
        assert_eq!(labels, ["0.02", "0.025", "0.03", "0.035", "0.04", "0.045"]);
        assert_eq!(AxisLabels::new(&(0.0..2e5), 10).format(150_000.0), "1.5e5");
        // Float noise around zero is zero, not "-0".
        assert_eq!(AxisLabels::new(&(-1.0..1.0), 10).format(-1e-17), "0");
    }

    #[test]
    fn ticks_stay_distinct_at_every_scale() {
        for exp in -7..8 {
            let scale = 10f64.powi(exp);
            for (lo, hi) in [
                (0.0, 1.0),
                (0.0, 3.3),
                (0.2, 0.75),
                (-1.0, 2.5),
                (100.0, 101.3),
                (5.0, 5.02),
            ] {
                for n in [5, 10] {
                    assert_distinct_and_faithful(lo * scale..hi * scale, n);
                }
            }
        }
    }

    #[test]
    fn render_writes_a_png_of_the_given_size_and_reports_draw_errors() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sub/plot.png");
        render(&out, (40, 30), |rgb| {
            rgb.fill(200);
            Ok(())
        })
        .unwrap();
        let decoder = png::Decoder::new(io::BufReader::new(File::open(&out).unwrap()));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (40, 30));

        let failed = render(&dir.path().join("no.png"), (4, 4), |_| Err("boom".into()));
        assert!(matches!(failed, Err(PlotError::Draw(m)) if m == "boom"));
        assert!(!dir.path().join("no.png").exists());
    }
}
