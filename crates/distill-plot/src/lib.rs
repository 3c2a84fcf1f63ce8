//! The plotting plumbing training curves (distill-train) and eval reports (distill-eval) share:
//! an embedded font, so plots get labels on machines without system fonts; one palette, so a
//! model keeps its colour across plots; short tick labels; and drawing into an RGB buffer that
//! is written as a PNG. Charts themselves stay with the crate that knows their data.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::OnceLock;

pub use plotters;
use plotters::style::{FontStyle, RGBColor};

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

/// Draws a chart's series labels as every plot here does: upper right, 16 px, on a
/// translucent white box with a black border.
pub fn draw_legend<'a, DB, CT>(chart: &mut plotters::chart::ChartContext<'a, DB, CT>) -> Result<(), String>
where
    DB: plotters::prelude::DrawingBackend + 'a,
    CT: plotters::coord::CoordTranslate,
{
    use plotters::prelude::*;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// Short tick labels for values from learning rates (1e-5) to token counts: plain decimals
/// without trailing zeros in between, scientific notation outside.
pub fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".to_owned();
    }
    if !(1e-3..1e5).contains(&v.abs()) {
        return format!("{v:.1e}");
    }
    let fixed = format!("{v:.3}");
    fixed.trim_end_matches('0').trim_end_matches('.').to_owned()
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

    #[test]
    fn tick_labels_stay_short() {
        let labels: Vec<String> = [0.0, 2.5, 3.0, 0.125, 1e-5, 2.5e-4, -0.5, 123456.0]
            .map(tick_label)
            .into();
        assert_eq!(
            labels,
            ["0", "2.5", "3", "0.125", "1.0e-5", "2.5e-4", "-0.5", "1.2e5"]
        );
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
