//! The orchestrating process: each case in a child process, the rows collected and printed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::Context;
use distill_models::DecoderConfig;
use serde_json::{Value, json};

use crate::plan::{Case, case_bench, case_config};
use crate::rows::{base_row, model_name, print_table, table_line};
use crate::{Args, Device, ROW_PREFIX};

/// The orchestrating process: runs each case in a child, collects and prints the rows.
pub(crate) struct Parent {
    pub(crate) args: Args,
    device: Device,
    rows: Vec<Value>,
    peak: Option<f64>,
}

impl Parent {
    pub(crate) fn new(args: Args, device: Device) -> anyhow::Result<Self> {
        if let Some(path) = &args.json {
            std::fs::write(path, "").with_context(|| format!("cannot write {}", path.display()))?;
        }
        let peak = args.peak_tflops;
        Ok(Parent {
            args,
            device,
            rows: Vec::new(),
            peak,
        })
    }

    pub(crate) fn run_all(mut self, cases: &[Case], configs: &[DecoderConfig]) -> anyhow::Result<()> {
        eprintln!(
            "distill bench: {} case(s) on {}, each in its own process",
            cases.len() - 1,
            device_label(self.device)
        );
        for (i, case) in cases.iter().enumerate() {
            match case {
                Case::Peak if self.peak.is_some() => continue,
                Case::Peak => {
                    let rows = self.child(i, case, None)?;
                    self.peak = rows
                        .iter()
                        .find_map(|r| r.get("tflops").and_then(Value::as_f64))
                        .filter(|p| *p > 0.0);
                    if self.peak.is_none() {
                        eprintln!("warning: the peak GEMM did not run; MFU is left out");
                    }
                    self.record(rows)?;
                }
                Case::Memory(config) => {
                    let row = self.envelope(i, case, *config, &configs[*config])?;
                    self.record(vec![row])?;
                }
                _ => {
                    let rows = self.child(i, case, None)?;
                    self.record(rows)?;
                }
            }
        }
        print_table(&self.rows);
        if let Some(path) = &self.args.json {
            eprintln!("rows: {}", path.display());
        }
        Ok(())
    }

    fn record(&mut self, rows: Vec<Value>) -> anyhow::Result<()> {
        for row in &rows {
            eprintln!("  {}", table_line(row));
        }
        self.rows.extend(rows);
        if let Some(path) = &self.args.json {
            let mut text = String::new();
            for row in &self.rows {
                text.push_str(&serde_json::to_string(row)?);
                text.push('\n');
            }
            std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    }

    /// Runs case `i` in a child process; its rows, or one row saying how it failed.
    pub(crate) fn child(
        &self,
        i: usize,
        case: &Case,
        probe_seq: Option<usize>,
    ) -> anyhow::Result<Vec<Value>> {
        let exe = std::env::current_exe().context("cannot find the distill executable")?;
        let mut cmd = Command::new(exe);
        cmd.args(std::env::args_os().skip(1))
            .arg("--run-case")
            .arg(i.to_string());
        if let Some(seq) = probe_seq {
            cmd.arg("--probe-seq").arg(seq.to_string());
        }
        if self.args.peak_tflops.is_none()
            && let Some(peak) = self.peak
        {
            cmd.arg("--peak-tflops").arg(format!("{peak}"));
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start a benchmark process")?;
        let mut rows = Vec::new();
        let stdout = child.stdout.take().expect("piped");
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            match line.strip_prefix(ROW_PREFIX) {
                Some(json) => rows.push(serde_json::from_str(json).context("a case printed a bad row")?),
                None => println!("{line}"),
            }
        }
        let status = child.wait()?;
        if !status.success() && rows.is_empty() {
            let mut row = base_row(case_bench(case), &self.model_name(case), &format!("{case:?}"));
            row.insert(
                "error".into(),
                json!(format!("the case process failed ({status}); see stderr above")),
            );
            rows.push(Value::Object(row));
        }
        Ok(rows)
    }

    fn model_name(&self, case: &Case) -> String {
        case_config(case)
            .map(|c| model_name(&self.args.configs[c]))
            .unwrap_or_default()
    }
}

fn device_label(device: Device) -> String {
    match device {
        Device::Cpu => "cpu (f32)".into(),
        Device::Cuda(n) => format!("cuda:{n} (bf16)"),
    }
}
