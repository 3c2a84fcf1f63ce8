//! The rows: JSON objects, one per measurement, and the table they print as.

use std::path::Path;

use serde_json::{Map, Value, json};

pub(crate) const GIB: f64 = (1u64 << 30) as f64;

/// The directory's name: `bench/configs/qwen2.5-7b` -> `qwen2.5-7b`.
pub(crate) fn model_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

pub(crate) fn base_row(bench: &str, model: &str, case: &str) -> Map<String, Value> {
    let mut row = Map::new();
    row.insert("framework".into(), json!("distill"));
    row.insert("bench".into(), json!(bench));
    row.insert("model".into(), json!(model));
    row.insert("case".into(), json!(case));
    row
}

pub(crate) fn print_table(rows: &[Value]) {
    println!(
        "{:<5} {:<14} {:<46} {:>11} {:>9} {:>6} {:>9} {:>10}",
        "bench", "model", "case", "tok/s", "TFLOP/s", "MFU", "peak GiB", "ms"
    );
    for row in rows {
        println!("{}", table_line(row));
    }
}

pub(crate) fn table_line(row: &Value) -> String {
    let s = |k: &str| row.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let f = |k: &str, prec: usize| {
        row.get(k).and_then(Value::as_f64).map_or("-".to_string(), |v| {
            // Three significant digits for small values (CPU runs), fixed decimals otherwise.
            let prec = if v != 0.0 && v.abs() < 1.0 {
                prec.max(3)
            } else {
                prec
            };
            format!("{v:.prec$}")
        })
    };
    let mut case = s("case");
    if row.get("bench").and_then(Value::as_str) == Some("B5") {
        case = format!("{case}: seq {}", row.get("seq").unwrap_or(&Value::Null));
    }
    if let Some(e) = row.get("error").and_then(Value::as_str) {
        case = format!("{case} FAILED: {e}");
    }
    format!(
        "{:<5} {:<14} {:<46} {:>11} {:>9} {:>6} {:>9} {:>10}",
        s("bench"),
        s("model"),
        case,
        f("tokens_per_s", 0),
        f("tflops", 1),
        f("mfu", 3),
        f("peak_gib", 2),
        f("ms", 2)
    )
}
