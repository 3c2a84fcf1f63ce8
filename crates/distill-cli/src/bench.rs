//! `distill bench`: the performance suite of issue #6 on random-init models of real shapes.
//!
//!   B1 gemm      GEMM TFLOP/s on the training shapes (projections, LM head, LoRA), fwd and bwd
//!   B2 loss      the chunked KL + CE loss against a full-logits one: time and peak memory
//!   B3 lora      LoRA distillation step (KL on a top-k teacher + CE): tok/s, MFU, peak memory
//!   B4 full      full fine-tuning step: the same
//!   B5 memory    longest sequence at batch 1 whose peak memory stays under a cap
//!   B6 generate  greedy generation tok/s, prompt -> new tokens, at the given batch sizes
//!
//! The parent process plans the cases and runs each one in a child process (this binary with
//! a hidden `--run-case`), so every case's peak memory is its own and an out-of-memory panic
//! ends only that case. Training cases time [`distill_train::trainer::optimizer_step`], the
//! function `distill train` runs for every step. Rows go to stdout as a table and, with
//! `--json`, to a JSON-lines file that `bench/compare.py` sets beside PyTorch's.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use burn::backend::Autodiff;
use burn::tensor::backend::BackendTypes;
use distill_core::recipe::{BaseQuant, LoraSection};
use distill_hf::tokenizer::TextTokenizer;
use distill_infer::generate::{GenerationConfig, Request, Sampling, generate};
use distill_models::{CausalLm, DecoderConfig, Kernels};
use distill_train::bench::{self as lib, Gemm, TrainBench};
use serde_json::{Map, Value, json};

use crate::backend::{DeviceArg, Job, run_on};

/// Prefix of the lines a case process prints its rows on.
const ROW_PREFIX: &str = "distill-bench-row: ";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Benchmarks to run: gemm (B1), loss (B2), lora (B3), full (B4), memory (B5),
    /// generate (B6), train (B3 and B4), or B1..B6. Default: all.
    #[arg(value_name = "BENCH")]
    which: Vec<String>,
    /// The same as a comma-separated list, e.g. `--only B1,B3`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// A directory with a Hugging Face config.json: the model shape (repeatable). Weights are
    /// random (`CausalLm::init`); none are read.
    #[arg(long = "config", value_name = "DIR", required = true)]
    configs: Vec<PathBuf>,
    /// Also write the rows to this file, one JSON object per line.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Rows per step (B1-B4 use batch x seq tokens).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 2048)]
    seq: usize,
    /// Untimed steps (or calls) before timing: autotuning and allocation happen there.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed optimizer steps (B3, B4).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Timed calls per GEMM shape and per loss variant (B1, B2).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// LoRA rank on all seven linear layers (alpha = 2r).
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    /// Teacher top-k of the KL term (kd_ratio 0.5); 0 trains on CE alone.
    #[arg(long, default_value_t = 20)]
    top_k: usize,
    /// Tokens per loss chunk ([loss] chunk_tokens).
    #[arg(long, default_value_t = 1024)]
    chunk_tokens: usize,
    /// Recompute blocks in backward ([train] recompute): on, off, or auto (on above 4B
    /// matmul parameters, as the PyTorch baseline enables gradient checkpointing).
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    recompute: String,
    /// Matmul peak in TFLOP/s that MFU divides by. Default: measured first, a square bf16
    /// GEMM of --peak-n.
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Size of the square GEMM measuring the peak (default 8192 on CUDA, 256 on CPU).
    #[arg(long)]
    peak_n: Option<usize>,
    /// B3/B4/B5: KL from a local teacher (a random model of the student's config, in bf16 or
    /// nf4) instead of synthetic top-k soft labels: the memory of a recipe with [teacher]
    /// local_model.
    #[arg(long, default_value = "off", value_parser = ["off", "bf16", "nf4"])]
    local_teacher: String,
    /// LoRA cases (B3, B5 lora): the frozen base's storage, none (bf16) or nf4 (QLoRA).
    #[arg(long, default_value = "none", value_parser = ["none", "nf4"])]
    quantize: String,
    /// B5: what trains, lora or full.
    #[arg(long, default_value = "lora", value_parser = ["lora", "full"])]
    mem_mode: String,
    /// B5: the memory cap in GiB (process peak, see docs/PERFORMANCE.md).
    #[arg(long, default_value_t = 24.0)]
    mem_cap_gib: f64,
    /// B5: first sequence length tried; doubled until over the cap, then bisected.
    #[arg(long, default_value_t = 2048)]
    mem_start: usize,
    #[arg(long, default_value_t = 65536)]
    mem_max: usize,
    /// B5: the answer's resolution in tokens.
    #[arg(long, default_value_t = 1024)]
    mem_step: usize,
    /// B5: stop probing after this many seconds and report the bracket found so far.
    #[arg(long, default_value_t = 300.0)]
    mem_budget_s: f64,
    /// B6: batch sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    gen_batch: Vec<usize>,
    /// B6: prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// B6: new tokens per sequence (no EOS: every sequence runs to the end).
    #[arg(long, default_value_t = 256)]
    new_tokens: usize,
    /// B6: sample at this temperature over the whole vocabulary (top-p 1, as on-policy
    /// distillation samples) instead of greedy decoding (0).
    #[arg(long, default_value_t = 0.0)]
    gen_temperature: f64,
    /// B3/B4: also time each phase of the step (inputs, forward, teacher, loss, backward, grad
    /// norm, optimizer), with a device sync after each; the row gets `phases` and the log a line
    /// per phase, with the memory it left in use and the pool's reservation after it in the
    /// first step (CUDA). The syncs slow the step: compare profiled rows with each other.
    #[arg(long)]
    profile: bool,
    /// Internal: run case N of the plan in this process.
    #[arg(long, hide = true)]
    run_case: Option<usize>,
    /// Internal: the sequence length of a B5 probe.
    #[arg(long, hide = true)]
    probe_seq: Option<usize>,
}

/// One unit of work, run in its own process.
#[derive(Debug, Clone, PartialEq)]
enum Case {
    /// The square GEMM MFU is measured against.
    Peak,
    Gemm(usize),
    Loss {
        config: usize,
        /// One [tokens, V] block of logits (as a full-logits loss), else --chunk-tokens.
        naive: bool,
        /// Differentiate with burn's autodiff instead of the closed-form gradient.
        autodiff: bool,
    },
    Train {
        config: usize,
        lora: bool,
    },
    Memory(usize),
    Generate {
        config: usize,
        batch: usize,
    },
}

const ALL: [&str; 6] = ["B1", "B2", "B3", "B4", "B5", "B6"];

fn selected(args: &Args) -> anyhow::Result<Vec<&'static str>> {
    let names: Vec<&String> = args.which.iter().chain(&args.only).collect();
    if names.is_empty() {
        return Ok(ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in names {
        let ids: &[&'static str] = match name.to_ascii_lowercase().as_str() {
            "b1" | "gemm" => &["B1"],
            "b2" | "loss" => &["B2"],
            "b3" | "lora" => &["B3"],
            "b4" | "full" => &["B4"],
            "train" => &["B3", "B4"],
            "b5" | "memory" => &["B5"],
            "b6" | "generate" => &["B6"],
            "all" => &ALL,
            other => anyhow::bail!(
                "unknown benchmark `{other}`; use gemm, loss, lora, full, train, memory, generate or B1..B6"
            ),
        };
        out.extend(ids);
    }
    Ok(ALL.iter().copied().filter(|b| out.contains(b)).collect())
}

/// Every case, benchmark by benchmark, config by config; the peak first. Parent and child
/// build the same plan from the same arguments, so a case is named by its index.
fn plan(args: &Args) -> anyhow::Result<Vec<Case>> {
    let mut cases = vec![Case::Peak];
    for b in selected(args)? {
        for config in 0..args.configs.len() {
            match b {
                "B1" => cases.push(Case::Gemm(config)),
                "B2" => {
                    for (naive, autodiff) in [(false, false), (false, true), (true, true)] {
                        cases.push(Case::Loss {
                            config,
                            naive,
                            autodiff,
                        });
                    }
                }
                "B3" => cases.push(Case::Train { config, lora: true }),
                "B4" => cases.push(Case::Train { config, lora: false }),
                "B5" => cases.push(Case::Memory(config)),
                "B6" => cases.extend(
                    args.gen_batch
                        .iter()
                        .map(|&batch| Case::Generate { config, batch }),
                ),
                _ => unreachable!(),
            }
        }
    }
    Ok(cases)
}

pub fn run(args: Args, device: Option<DeviceArg>) -> anyhow::Result<()> {
    let device = DeviceArg::resolve(device);
    let cases = plan(&args)?;
    let configs = args
        .configs
        .iter()
        .map(|dir| DecoderConfig::from_dir(dir).with_context(|| format!("--config {}", dir.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(i) = args.run_case {
        let case = cases
            .get(i)
            .with_context(|| format!("no case {i} in a plan of {}", cases.len()))?;
        return run_case(&args, &configs, case, device);
    }
    Parent::new(args, device)?.run_all(&cases, &configs)
}

/// The orchestrating process: runs each case in a child, collects and prints the rows.
struct Parent {
    args: Args,
    device: DeviceArg,
    rows: Vec<Value>,
    peak: Option<f64>,
}

impl Parent {
    fn new(args: Args, device: DeviceArg) -> anyhow::Result<Self> {
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

    fn run_all(mut self, cases: &[Case], configs: &[DecoderConfig]) -> anyhow::Result<()> {
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
    fn child(&self, i: usize, case: &Case, probe_seq: Option<usize>) -> anyhow::Result<Vec<Value>> {
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

    /// B5: the longest sequence at batch 1 whose step stays under the cap. Doubles from
    /// --mem-start until a probe fails (over the cap, or out of memory), then bisects down to
    /// --mem-step; each probe is one child process.
    fn envelope(&self, i: usize, case: &Case, config: usize, c: &DecoderConfig) -> anyhow::Result<Value> {
        let a = &self.args;
        let started = Instant::now();
        let cap = a.mem_cap_gib;
        let mut probes: Vec<Value> = Vec::new();
        let (mut good, mut bad): (Option<(usize, Value)>, Option<usize>) = (None, None);
        let probe = |seq: usize, probes: &mut Vec<Value>| -> anyhow::Result<Option<Value>> {
            eprintln!("B5 probe: seq {seq}");
            let rows = self.child(i, case, Some(seq))?;
            let row = rows.into_iter().next().unwrap_or(Value::Null);
            let peak = row.get("peak_gib").and_then(Value::as_f64);
            let ok = row.get("error").is_none() && !row.is_null() && peak.is_none_or(|p| p <= cap);
            probes.push(json!({"seq": seq, "ok": ok, "peak_gib": peak}));
            Ok(ok.then_some(row))
        };
        let out_of_time = || started.elapsed().as_secs_f64() > a.mem_budget_s;
        let lora = a.mem_mode == "lora";
        let static_gib = static_train_bytes(c, lora.then_some(a.lora_r), base_quant(a, lora)) as f64 / GIB;
        let step = a.mem_step.max(1);
        let mut seq = a.mem_start.max(step);
        if static_gib > cap {
            // Weights, gradients and moments alone exceed the cap: one probe at the shortest
            // length measures by how much, and no length can fit.
            seq = step;
        }
        // Upward: double until a probe fails or the maximum passes.
        loop {
            match probe(seq, &mut probes)? {
                Some(row) => {
                    good = Some((seq, row));
                    if seq >= a.mem_max || out_of_time() {
                        break;
                    }
                    seq = (seq * 2).min(a.mem_max);
                }
                None => {
                    bad = Some(seq);
                    break;
                }
            }
        }
        // Downward when even the start failed.
        while good.is_none() && seq > step && static_gib <= cap && !out_of_time() {
            seq = (seq / 2).max(step) / step * step;
            match probe(seq, &mut probes)? {
                Some(row) => good = Some((seq, row)),
                None => bad = Some(seq),
            }
        }
        // Bisect between the longest good and the shortest bad.
        while let (Some((lo, _)), Some(hi)) = (&good, bad) {
            if hi - lo <= step || out_of_time() {
                break;
            }
            let mid = (lo + (hi - lo) / 2) / step * step;
            if mid <= *lo {
                break;
            }
            match probe(mid, &mut probes)? {
                Some(row) => good = Some((mid, row)),
                None => bad = Some(mid),
            }
        }
        let mut row = base_row(
            "B5",
            &model_name(&a.configs[config]),
            &format!(
                "{} bs1 under {cap} GiB",
                match (lora, base_quant(a, lora)) {
                    (true, BaseQuant::Nf4) => "qlora nf4",
                    (true, BaseQuant::None) => "lora",
                    (false, _) => "full",
                }
            ),
        );
        let resolved = match (&good, bad) {
            (Some((lo, _)), Some(hi)) => hi - lo <= step,
            (Some((lo, _)), None) => *lo >= a.mem_max,
            (None, _) => seq <= step || static_gib > cap,
        };
        row.insert("seq".into(), json!(good.as_ref().map(|(s, _)| *s).unwrap_or(0)));
        row.insert("first_failing_seq".into(), json!(bad));
        row.insert("resolved".into(), json!(resolved));
        row.insert("cap_gib".into(), json!(cap));
        row.insert("static_gib".into(), json!(static_gib));
        if let Some((_, best)) = &good {
            for key in [
                "peak_gib",
                "mem_method",
                "pool_gib",
                "tokens_per_s",
                "device",
                "config",
            ] {
                if let Some(v) = best.get(key) {
                    row.insert(key.into(), v.clone());
                }
            }
        }
        row.insert("probes".into(), Value::Array(probes));
        Ok(Value::Object(row))
    }
}

fn case_bench(case: &Case) -> &'static str {
    match case {
        Case::Peak => "peak",
        Case::Gemm(_) => "B1",
        Case::Loss { .. } => "B2",
        Case::Train { lora: true, .. } => "B3",
        Case::Train { lora: false, .. } => "B4",
        Case::Memory(_) => "B5",
        Case::Generate { .. } => "B6",
    }
}

fn case_config(case: &Case) -> Option<usize> {
    match *case {
        Case::Peak => None,
        Case::Gemm(c) | Case::Memory(c) => Some(c),
        Case::Loss { config, .. } | Case::Train { config, .. } | Case::Generate { config, .. } => {
            Some(config)
        }
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// Weights, gradients and AdamW moments before any activation: bf16 frozen weights (the
/// decoder layers' at 4.5 bits in NF4) and f32 adapters (LoRA), or f32 master weights, f32
/// gradients and two f32 moments (full).
fn static_train_bytes(c: &DecoderConfig, lora_r: Option<usize>, quantize: BaseQuant) -> u64 {
    // matmul_params counts the head once; an untied model also stores the embeddings.
    let embed = (c.vocab_size * c.hidden_size) as u64;
    let params = lib::matmul_params(c) + if c.tie_word_embeddings { 0 } else { embed };
    let layers = lib::layer_matmul_params(c) * c.num_hidden_layers as u64;
    match lora_r {
        Some(r) => {
            let targets: Vec<String> = LoraSection::default().targets;
            let frozen = match quantize {
                BaseQuant::None => 2 * params,
                BaseQuant::Nf4 => 2 * (params - layers) + layers * 9 / 16,
            };
            frozen + 16 * lib::lora_params(c, r, &targets)
        }
        None => 16 * params,
    }
}

/// The directory's name: `bench/configs/qwen2.5-7b` -> `qwen2.5-7b`.
fn model_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

fn device_label(device: DeviceArg) -> String {
    match device {
        DeviceArg::Cpu => "cpu (f32)".into(),
        DeviceArg::Cuda(n) => format!("cuda:{n} (bf16)"),
    }
}

fn base_row(bench: &str, model: &str, case: &str) -> Map<String, Value> {
    let mut row = Map::new();
    row.insert("framework".into(), json!("distill"));
    row.insert("bench".into(), json!(bench));
    row.insert("model".into(), json!(model));
    row.insert("case".into(), json!(case));
    row
}

fn recompute_for(args: &Args, c: &DecoderConfig) -> bool {
    match args.recompute.as_str() {
        "on" => true,
        "off" => false,
        _ => lib::matmul_params(c) > 4_000_000_000,
    }
}

// ---------------------------------------------------------------------------------------
// A case, in its own process.

fn run_case(args: &Args, configs: &[DecoderConfig], case: &Case, device: DeviceArg) -> anyhow::Result<()> {
    let watch = MemWatch::start(device);
    let job = CaseJob {
        args: args.clone(),
        configs: configs.to_vec(),
        case: case.clone(),
        device,
        pool_peak: Arc::new(AtomicU64::new(0)),
        driver_peak: Arc::new(AtomicU64::new(0)),
    };
    let pool_peak = job.pool_peak.clone();
    let driver_peak = job.driver_peak.clone();
    let mut rows = run_on(device, job)?;
    let driver = driver_pool_peaks(device, false)
        .map(|(used, reserved)| (used.max(driver_peak.load(Ordering::Relaxed)), reserved));
    let memory = watch.finish();
    let pool = pool_peak.load(Ordering::Relaxed);
    let mut out = std::io::stdout().lock();
    for row in &mut rows {
        if let Value::Object(map) = row {
            map.insert("peak_gib".into(), json!(memory.peak_gib));
            map.insert("mem_method".into(), json!(memory.method));
            if pool > 0 {
                map.insert("pool_gib".into(), json!(pool as f64 / GIB));
            }
            if let Some((used, reserved)) = driver {
                map.insert("driver_used_high_gib".into(), json!(used as f64 / GIB));
                map.insert("driver_reserved_high_gib".into(), json!(reserved as f64 / GIB));
            }
            map.insert("device".into(), json!(memory.device));
            map.insert(
                "version".into(),
                json!(concat!("distill ", env!("CARGO_PKG_VERSION"), ", burn 0.21.0")),
            );
        }
        writeln!(out, "{ROW_PREFIX}{}", serde_json::to_string(row)?)?;
    }
    Ok(())
}

struct CaseJob {
    args: Args,
    configs: Vec<DecoderConfig>,
    case: Case,
    device: DeviceArg,
    /// The largest cubecl pool reservation seen between steps (CUDA).
    pool_peak: Arc<AtomicU64>,
    /// The driver pool's most handed out, over the profile's readings (each resets it).
    driver_peak: Arc<AtomicU64>,
}

impl CaseJob {
    fn sample_pool(&self) {
        if let Some((_, reserved)) = pool_bytes(self.device) {
            self.pool_peak.fetch_max(reserved, Ordering::Relaxed);
        }
    }

    fn peak_n(&self) -> usize {
        self.args.peak_n.unwrap_or(match self.device {
            DeviceArg::Cpu => 256,
            DeviceArg::Cuda(_) => 8192,
        })
    }
}

impl Job for CaseJob {
    type Output = Vec<Value>;

    fn run<B: Kernels>(self, device: B::Device) -> anyhow::Result<Vec<Value>>
    where
        Autodiff<B>: Kernels + BackendTypes<Device = B::Device>,
    {
        let a = &self.args;
        let peak = a.peak_tflops;
        let tokens = a.batch * a.seq;
        let dtype = match self.device {
            DeviceArg::Cpu => "f32",
            DeviceArg::Cuda(_) => "bf16",
        };
        let mut rows = Vec::new();
        let model_of = |c: usize| model_name(&a.configs[c]);
        match self.case {
            Case::Peak => {
                let n = self.peak_n();
                let g = Gemm::new(format!("square {n}"), n, n, n);
                let (fwd, _) = lib::bench_gemm::<B>(&g, a.warmup.max(1), a.iters, &device);
                let mut row = base_row("peak", "", &format!("square {n}x{n}x{n} fwd"));
                row.insert("tflops".into(), json!(g.fwd_flops() / fwd / 1e12));
                row.insert("ms".into(), json!(fwd * 1e3));
                row.insert("config".into(), json!({"m": n, "k": n, "n": n, "dtype": dtype}));
                rows.push(row);
            }
            Case::Gemm(ci) => {
                let c = &self.configs[ci];
                let n = self.peak_n();
                let mut gemms = lib::training_gemms(c, tokens, a.chunk_tokens, a.lora_r);
                gemms.push(Gemm::new(format!("square {n}"), n, n, n));
                for g in gemms {
                    eprintln!("B1 {}: {} x {} x {}", g.name, g.m, g.k, g.n);
                    let (fwd, fwd_bwd) = lib::bench_gemm::<B>(&g, a.warmup.max(1), a.iters, &device);
                    let shape = format!("{}x{}x{}", g.m, g.k, g.n);
                    let config = json!({"m": g.m, "k": g.k, "n": g.n, "dtype": dtype, "iters": a.iters});
                    let fwd_tf = g.fwd_flops() / fwd / 1e12;
                    let mut row = base_row("B1", &model_of(ci), &format!("{} {shape} fwd", g.name));
                    row.insert("tflops".into(), json!(fwd_tf));
                    row.insert("mfu".into(), json!(lib::mfu(fwd_tf, peak)));
                    row.insert("ms".into(), json!(fwd * 1e3));
                    row.insert("config".into(), config.clone());
                    rows.push(row);
                    // Backward = (forward + backward) - forward: dX and dW, 4mkn.
                    let bwd = fwd_bwd - fwd;
                    let bwd_tf = (bwd > 0.0).then(|| 2.0 * g.fwd_flops() / bwd / 1e12);
                    let mut row = base_row("B1", &model_of(ci), &format!("{} {shape} bwd", g.name));
                    row.insert("tflops".into(), json!(bwd_tf));
                    row.insert("mfu".into(), json!(bwd_tf.and_then(|t| lib::mfu(t, peak))));
                    row.insert("ms".into(), json!(bwd * 1e3));
                    row.insert("fwd_bwd_ms".into(), json!(fwd_bwd * 1e3));
                    row.insert("config".into(), config);
                    rows.push(row);
                }
            }
            Case::Loss {
                config: ci,
                naive,
                autodiff,
            } => {
                let c = &self.configs[ci];
                let chunk = if naive { tokens } else { a.chunk_tokens.min(tokens) };
                eprintln!(
                    "B2 {}: {tokens} tokens, vocab {}, chunk {chunk}",
                    model_of(ci),
                    c.vocab_size
                );
                let secs = lib::bench_loss::<B>(
                    c,
                    tokens,
                    chunk,
                    a.top_k,
                    !autodiff,
                    a.warmup.max(1),
                    a.iters,
                    &device,
                    &mut || self.sample_pool(),
                );
                let tf = lib::loss_flops(c, tokens) / secs / 1e12;
                let name = match (naive, autodiff) {
                    (true, _) => "naive full logits".to_string(),
                    (false, true) => format!("chunked {chunk} autodiff"),
                    (false, false) => format!("chunked {chunk}"),
                };
                let mut row = base_row("B2", &model_of(ci), &name);
                row.insert("tokens_per_s".into(), json!(tokens as f64 / secs));
                row.insert("tflops".into(), json!(tf));
                row.insert("mfu".into(), json!(lib::mfu(tf, peak)));
                row.insert("ms".into(), json!(secs * 1e3));
                row.insert(
                    "config".into(),
                    json!({"tokens": tokens, "hidden": c.hidden_size, "vocab": c.vocab_size,
                           "chunk_tokens": chunk, "top_k": a.top_k, "dtype": dtype,
                           "gradient": if autodiff { "autodiff" } else { "closed form" }}),
                );
                rows.push(row);
            }
            Case::Train { config: ci, .. } | Case::Memory(ci) => {
                let c = &self.configs[ci];
                let probe = matches!(self.case, Case::Memory(_));
                let lora = if probe {
                    a.mem_mode == "lora"
                } else {
                    lora_of(&self.case)
                };
                let (batch, seq) = match (probe, a.probe_seq) {
                    (true, Some(s)) => (1, s),
                    (true, None) => anyhow::bail!("a B5 case runs with --probe-seq"),
                    _ => (a.batch, a.seq),
                };
                let b = TrainBench {
                    batch,
                    seq,
                    lora_r: lora.then_some(a.lora_r),
                    quantize: base_quant(a, lora),
                    local_teacher: match a.local_teacher.as_str() {
                        "bf16" => Some(BaseQuant::None),
                        "nf4" => Some(BaseQuant::Nf4),
                        _ => None,
                    },
                    recompute: if probe { true } else { recompute_for(a, c) },
                    top_k: a.top_k,
                    chunk_tokens: a.chunk_tokens,
                    warmup: if probe { 1 } else { a.warmup },
                    steps: if probe { 1 } else { a.steps.max(1) },
                    seed: 42,
                    profile: a.profile && !probe,
                };
                eprintln!(
                    "{} {}: {} x {} tokens, {}, recompute {}",
                    case_bench(&self.case),
                    model_of(ci),
                    batch,
                    seq,
                    if lora { "LoRA" } else { "full fine-tune" },
                    b.recompute
                );
                let times = lib::bench_train::<B>(c, &b, &device, &mut || self.sample_pool(), &|| {
                    let (in_use, reserved) = pool_bytes(self.device)?;
                    let peak = driver_pool_peaks(self.device, true).map(|(used, _)| used);
                    if let Some(p) = peak {
                        self.driver_peak.fetch_max(p, Ordering::Relaxed);
                    }
                    Some(lib::PoolSample {
                        in_use,
                        reserved,
                        peak,
                    })
                })?;
                let targets: Vec<String> = LoraSection::default().targets;
                let flops = lib::train_flops_per_token(c, seq, b.lora_r.map(|r| (r, &targets[..])));
                let tps = times.tokens_per_second();
                let tf = flops * tps / 1e12;
                let mode = if b.quantize == BaseQuant::Nf4 {
                    format!("qlora nf4 r{}", a.lora_r)
                } else if lora {
                    format!("lora r{}", a.lora_r)
                } else {
                    "full".to_string()
                };
                let name = format!(
                    "{mode} {batch}x{seq}{}{}",
                    if b.recompute { " recompute" } else { "" },
                    match a.local_teacher.as_str() {
                        "off" => String::new(),
                        t => format!(" + {t} teacher"),
                    }
                );
                let mut row = base_row(case_bench(&self.case), &model_of(ci), &name);
                row.insert("tokens_per_s".into(), json!(tps));
                row.insert("tflops".into(), json!(tf));
                row.insert("mfu".into(), json!(lib::mfu(tf, peak)));
                row.insert("ms".into(), json!(times.mean_seconds() * 1e3));
                row.insert(
                    "step_ms".into(),
                    json!(times.seconds.iter().map(|s| s * 1e3).collect::<Vec<_>>()),
                );
                row.insert("losses".into(), json!(times.losses));
                if !times.phases.is_empty() {
                    let gib = |b: Option<u64>| b.map(|b| b as f64 / GIB);
                    if let Some(setup) = gib(times.setup_peak_bytes) {
                        eprintln!("  setup (model, optimizer, teacher): peak {setup:.2} GiB");
                    }
                    for p in &times.phases {
                        let peak = gib(p.peak_bytes)
                            .map(|g| format!("   peak {g:>6.2} GiB"))
                            .unwrap_or_default();
                        let memory = match (gib(p.in_use_bytes), gib(p.reserved_bytes)) {
                            (Some(used), Some(pool)) => {
                                format!("   in use {used:>6.2} GiB{peak}   pool {pool:>6.2} GiB (first step)")
                            }
                            _ => String::new(),
                        };
                        eprintln!(
                            "  phase {:<10} host {:>9.2} ms   synced {:>9.2} ms{memory}",
                            p.name,
                            p.host_seconds * 1e3,
                            p.total_seconds * 1e3
                        );
                    }
                    let phases: Vec<Value> = times
                        .phases
                        .iter()
                        .map(|p| {
                            json!({"phase": p.name, "host_ms": p.host_seconds * 1e3, "ms": p.total_seconds * 1e3,
                                   "in_use_gib": gib(p.in_use_bytes), "peak_gib": gib(p.peak_bytes),
                                   "pool_gib_first_step": gib(p.reserved_bytes)})
                        })
                        .collect();
                    row.insert("phases".into(), Value::Array(phases));
                }
                row.insert(
                    "config".into(),
                    json!({"batch": batch, "seq": seq, "mode": mode, "recompute": b.recompute,
                           "top_k": a.top_k, "kd_ratio": b.recipe().loss.kd_ratio,
                           "local_teacher": a.local_teacher, "quantize": a.quantize,
                           "chunk_tokens": a.chunk_tokens, "warmup": b.warmup, "steps": b.steps,
                           "optimizer": "AdamW (f32 moments)", "dtype": dtype}),
                );
                rows.push(row);
            }
            Case::Generate { config: ci, batch } => {
                let c = &self.configs[ci];
                rows.push(bench_generate::<B>(
                    a,
                    c,
                    &model_of(ci),
                    batch,
                    peak,
                    dtype,
                    &device,
                )?);
            }
        }
        Ok(rows.into_iter().map(Value::Object).collect())
    }
}

/// The frozen base's storage: --quantize, for LoRA cases only.
fn base_quant(args: &Args, lora: bool) -> BaseQuant {
    match args.quantize.as_str() {
        "nf4" if lora => BaseQuant::Nf4,
        _ => BaseQuant::None,
    }
}

fn lora_of(case: &Case) -> bool {
    matches!(case, Case::Train { lora: true, .. })
}

/// B6: `batch` random prompts of --prompt-len tokens, --new-tokens greedy tokens each through
/// `distill_infer::generate` (the KV-cached batched decoder eval and serve use), no EOS. One
/// untimed call of the same size first.
fn bench_generate<B: Kernels>(
    a: &Args,
    c: &DecoderConfig,
    model_name: &str,
    batch: usize,
    peak: Option<f64>,
    dtype: &str,
    device: &B::Device,
) -> anyhow::Result<Map<String, Value>> {
    eprintln!(
        "B6 {model_name}: batch {batch}, {} prompt -> {} new tokens",
        a.prompt_len, a.new_tokens
    );
    B::seed(device, 42);
    let model = CausalLm::<B>::init(c, device);
    let tokenizer = bench_tokenizer(&a.configs, c)?;
    let mut rng = 5u64;
    let requests: Vec<Request> = (0..batch)
        .map(|i| Request {
            prompt: lib::random_rows(1, a.prompt_len, c.vocab_size, &mut rng)[0]
                .input_ids
                .clone(),
            seed: i as u64,
        })
        .collect();
    let sampling = match a.gen_temperature {
        t if t > 0.0 => Sampling {
            temperature: t,
            top_p: 1.0,
            top_k: 0,
        },
        _ => Sampling::GREEDY,
    };
    let cfg = GenerationConfig {
        max_new_tokens: a.new_tokens,
        sampling,
        stop: Vec::new(),
        eos: Vec::new(),
        batch_size: batch,
        logprobs: None,
    };
    for _ in 0..a.warmup.min(1) {
        generate(&model, &tokenizer, &requests, &cfg, device, |_, _| {})?;
    }
    let _ = B::sync(device);
    let started = Instant::now();
    let (_, stats) = generate(&model, &tokenizer, &requests, &cfg, device, |_, _| {})?;
    let _ = B::sync(device);
    let secs = started.elapsed().as_secs_f64();
    let processed = (batch * (a.prompt_len + a.new_tokens)) as f64;
    let tf = lib::generate_flops_per_token(c) * processed / secs / 1e12;
    let mut row = base_row(
        "B6",
        model_name,
        &format!(
            "bs{batch} {}->{}{}",
            a.prompt_len,
            a.new_tokens,
            match a.gen_temperature {
                t if t > 0.0 => format!(" sampled t{t}"),
                _ => String::new(),
            }
        ),
    );
    row.insert("tokens_per_s".into(), json!(stats.new_tokens as f64 / secs));
    row.insert("tflops".into(), json!(tf));
    row.insert("mfu".into(), json!(lib::mfu(tf, peak)));
    row.insert("ms".into(), json!(secs * 1e3));
    row.insert("new_tokens".into(), json!(stats.new_tokens));
    row.insert(
        "config".into(),
        json!({"batch": batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
               "sampling": if a.gen_temperature > 0.0 { "sampled" } else { "greedy" },
               "temperature": a.gen_temperature, "kv_cache": true, "dtype": dtype}),
    );
    Ok(row)
}

/// The model directory's tokenizer when it has one, else a one-token word-level tokenizer
/// (random ids decode to nothing; generation only decodes at the end).
fn bench_tokenizer(dirs: &[PathBuf], c: &DecoderConfig) -> anyhow::Result<TextTokenizer> {
    if let Some(dir) = dirs
        .iter()
        .find(|d| d.join("tokenizer.json").exists() && DecoderConfig::from_dir(d).is_ok_and(|dc| dc == *c))
    {
        return Ok(TextTokenizer::from_dir(dir)?);
    }
    let dir = std::env::temp_dir().join(format!("distill-bench-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // A word per id, so that the tokenizer covers the model's whole vocabulary: generation
    // never samples ids past the tokenizer.
    let vocab: Map<String, Value> = std::iter::once(("<unk>".to_string(), json!(0)))
        .chain((1..c.vocab_size).map(|i| (format!("w{i}"), json!(i))))
        .collect();
    let tokenizer_json = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json.to_string())?;
    let tokenizer = TextTokenizer::from_dir(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(tokenizer?)
}

// ---------------------------------------------------------------------------------------
// Peak memory.

/// What a case process measured.
struct Memory {
    peak_gib: Option<f64>,
    method: &'static str,
    device: String,
}

/// Peak memory of this process's case. CUDA: `nvidia-smi` polled every 20 ms in a child
/// process, the device's memory.used minus what it was before the case touched the GPU (so
/// the CUDA context counts, as it does on a user's card). CPU: the process's peak resident
/// set (VmHWM, reset at the start).
enum MemWatch {
    Smi {
        baseline_mib: f64,
        max_mib: Arc<Mutex<f64>>,
        poller: std::process::Child,
        reader: std::thread::JoinHandle<()>,
        index: usize,
        name: String,
    },
    Cuda(usize),
    Cpu,
}

impl MemWatch {
    fn start(device: DeviceArg) -> MemWatch {
        match device {
            DeviceArg::Cpu => {
                // Writing 5 resets the peak RSS (Linux >= 4.0); where not, VmHWM is since start.
                let _ = std::fs::write("/proc/self/clear_refs", "5");
                MemWatch::Cpu
            }
            DeviceArg::Cuda(index) => Self::start_smi(index).unwrap_or(MemWatch::Cuda(index)),
        }
    }

    fn start_smi(index: usize) -> Option<MemWatch> {
        let query = |field: &str| -> Option<String> {
            let out = Command::new("nvidia-smi")
                .args([
                    &format!("--query-gpu={field}"),
                    "--format=csv,noheader,nounits",
                    "-i",
                    &index.to_string(),
                ])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let baseline_mib: f64 = query("memory.used")?.parse().ok()?;
        let name = query("name").unwrap_or_default();
        let mut poller = Command::new("nvidia-smi")
            .args([
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-i",
                &index.to_string(),
                "-lms",
                "20",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let max_mib = Arc::new(Mutex::new(baseline_mib));
        let stdout = poller.stdout.take()?;
        let sink = max_mib.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = line.trim().parse::<f64>() {
                    let mut m = sink.lock().unwrap_or_else(|e| e.into_inner());
                    *m = m.max(v);
                }
            }
        });
        Some(MemWatch::Smi {
            baseline_mib,
            max_mib,
            poller,
            reader,
            index,
            name,
        })
    }

    fn finish(self) -> Memory {
        match self {
            MemWatch::Smi {
                baseline_mib,
                max_mib,
                mut poller,
                reader,
                index,
                name,
            } => {
                // Let the poller see the last allocations before it stops.
                std::thread::sleep(std::time::Duration::from_millis(60));
                let _ = poller.kill();
                let _ = poller.wait();
                let _ = reader.join();
                let max = *max_mib.lock().unwrap_or_else(|e| e.into_inner());
                Memory {
                    peak_gib: Some((max - baseline_mib).max(0.0) * 1024.0 * 1024.0 / GIB),
                    method: "nvidia-smi memory.used peak - baseline (20 ms polling)",
                    device: format!("cuda:{index} {name}"),
                }
            }
            MemWatch::Cuda(index) => Memory {
                peak_gib: None,
                method: "none (nvidia-smi unavailable; see pool_gib)",
                device: format!("cuda:{index}"),
            },
            MemWatch::Cpu => Memory {
                peak_gib: vm_hwm_bytes().map(|b| b as f64 / GIB),
                method: "VmHWM (process peak RSS)",
                device: "cpu".into(),
            },
        }
    }
}

fn vm_hwm_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes of cubecl's memory pools on the CUDA device (this thread's stream): (in use,
/// reserved).
#[cfg(feature = "cuda")]
fn pool_bytes(device: DeviceArg) -> Option<(u64, u64)> {
    use burn::cubecl::Runtime;
    use burn::cubecl::cuda::CudaRuntime;
    match device {
        DeviceArg::Cuda(n) => {
            let client = CudaRuntime::client(&burn::backend::cuda::CudaDevice::new(n));
            client
                .memory_usage()
                .ok()
                .map(|u| (u.bytes_in_use, u.bytes_reserved))
        }
        DeviceArg::Cpu => None,
    }
}

#[cfg(not(feature = "cuda"))]
fn pool_bytes(_device: DeviceArg) -> Option<(u64, u64)> {
    None
}

/// The CUDA driver pool's (handed out, reserved) high-water marks for this process, in bytes:
/// with nvidia-smi's peak they split the peak into cubecl's buffers, the pool's slack and the
/// rest (context, module code, cuBLAS workspaces).
#[cfg(feature = "cuda")]
fn driver_pool_peaks(device: DeviceArg, reset: bool) -> Option<(u64, u64)> {
    match device {
        DeviceArg::Cuda(n) => {
            distill_kernels::cuda::pool::driver_pool_peaks(&burn::backend::cuda::CudaDevice::new(n), reset)
                .map_err(|e| eprintln!("note: no driver pool figures ({e})"))
                .ok()
        }
        DeviceArg::Cpu => None,
    }
}

#[cfg(not(feature = "cuda"))]
fn driver_pool_peaks(_device: DeviceArg, _reset: bool) -> Option<(u64, u64)> {
    None
}

// ---------------------------------------------------------------------------------------
// The table.

fn print_table(rows: &[Value]) {
    println!(
        "{:<5} {:<14} {:<46} {:>11} {:>9} {:>6} {:>9} {:>10}",
        "bench", "model", "case", "tok/s", "TFLOP/s", "MFU", "peak GiB", "ms"
    );
    for row in rows {
        println!("{}", table_line(row));
    }
}

fn table_line(row: &Value) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let argv = [&["distill-bench", "--config", "a", "--config", "b"][..], extra].concat();
        <Cli as clap::Parser>::parse_from(argv).args
    }

    #[test]
    fn names_and_issue_numbers_select_the_same_cases() {
        let by_name = plan(&args(&["gemm", "train"])).unwrap();
        let by_id = plan(&args(&["--only", "B4,B1,B3"])).unwrap();
        assert_eq!(by_name, by_id);
        assert_eq!(
            by_name,
            vec![
                Case::Peak,
                Case::Gemm(0),
                Case::Gemm(1),
                Case::Train {
                    config: 0,
                    lora: true
                },
                Case::Train {
                    config: 1,
                    lora: true
                },
                Case::Train {
                    config: 0,
                    lora: false
                },
                Case::Train {
                    config: 1,
                    lora: false
                },
            ]
        );
        assert_eq!(plan(&args(&[])).unwrap().len(), 1 + 2 * (1 + 3 + 1 + 1 + 1 + 1));
        let gen_cases = plan(&args(&["generate", "--gen-batch", "1,64"])).unwrap();
        assert_eq!(gen_cases.len(), 1 + 2 * 2);
        assert!(plan(&args(&["B9"])).is_err());
    }
}
