//! A case, in its own process: run on the caller's backend, its peak memory measured, its
//! rows printed for the parent.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::backend::Autodiff;
use burn::tensor::backend::BackendTypes;
use distill_core::recipe::{BaseQuant, LoraSection};
use distill_models::{DecoderConfig, Kernels};
use serde_json::{Value, json};

use crate::attention::{bench_attention, causal_fwd_flops};
use crate::flops::{matmul_params, mfu, train_flops_per_token};
use crate::gemm::{Gemm, bench_gemm, training_gemms};
use crate::generate::bench_generate;
use crate::loss::{bench_loss, loss_flops};
use crate::plan::{Case, case_bench};
use crate::rows::{GIB, base_row, model_name};
use crate::train::{PoolSample, TrainBench, bench_train};
use crate::watch::{MemWatch, driver_pool_peaks, pool_bytes};
use crate::{Args, Device, ROW_PREFIX, Rows};

fn recompute_for(args: &Args, c: &DecoderConfig) -> bool {
    match args.recompute.as_str() {
        "on" => true,
        "off" => false,
        _ => matmul_params(c) > 4_000_000_000,
    }
}

/// Case `case` in this process: `run_on` runs the job on the device's backend; the rows, with
/// the peak memory and the pools' figures added, go to stdout on [`ROW_PREFIX`] lines.
pub(crate) fn run_case(
    args: &Args,
    configs: &[DecoderConfig],
    case: &Case,
    device: Device,
    run_on: impl FnOnce(CaseJob) -> anyhow::Result<Rows>,
) -> anyhow::Result<()> {
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
    let mut rows = run_on(job)?;
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
            if let Some(path) = training_attention(device) {
                map.insert("attention".into(), json!(path));
            }
            map.insert(
                "version".into(),
                json!(concat!("distill ", env!("CARGO_PKG_VERSION"), ", burn 0.21.0")),
            );
        }
        writeln!(out, "{ROW_PREFIX}{}", serde_json::to_string(row)?)?;
    }
    Ok(())
}

/// Which attention training used on a CUDA device, for the rows: cuDNN's fused attention, or
/// distill's flash kernels and why.
#[cfg(feature = "cuda")]
fn training_attention(device: Device) -> Option<String> {
    use distill_kernels::cuda::cudnn;
    match device {
        Device::Cuda(_) => {
            cudnn::available();
            Some(cudnn::describe())
        }
        Device::Cpu => None,
    }
}

#[cfg(not(feature = "cuda"))]
fn training_attention(_device: Device) -> Option<String> {
    None
}

/// One case of the plan, to run on a backend: [`CaseJob::measure`].
pub struct CaseJob {
    args: Args,
    configs: Vec<DecoderConfig>,
    case: Case,
    device: Device,
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
            Device::Cpu => 256,
            Device::Cuda(_) => 8192,
        })
    }

    /// Runs the case on backend `B` (its autodiff wrapper for training) on `device`, which
    /// is the job's [`Device`]; the rows it measured.
    pub fn measure<B: Kernels>(self, device: B::Device) -> anyhow::Result<Rows>
    where
        Autodiff<B>: Kernels + BackendTypes<Device = B::Device>,
    {
        let a = &self.args;
        let peak = a.peak_tflops;
        let tokens = a.batch * a.seq;
        let dtype = match self.device {
            Device::Cpu => "f32",
            Device::Cuda(_) => "bf16",
        };
        let mut rows = Vec::new();
        let model_of = |c: usize| model_name(&a.configs[c]);
        match self.case {
            Case::Peak => {
                let n = self.peak_n();
                let g = Gemm::new(format!("square {n}"), n, n, n);
                let (fwd, _) = bench_gemm::<B>(&g, a.warmup.max(1), a.iters, &device);
                let mut row = base_row("peak", "", &format!("square {n}x{n}x{n} fwd"));
                row.insert("tflops".into(), json!(g.fwd_flops() / fwd / 1e12));
                row.insert("ms".into(), json!(fwd * 1e3));
                row.insert("config".into(), json!({"m": n, "k": n, "n": n, "dtype": dtype}));
                rows.push(row);
            }
            Case::Gemm(ci) => {
                let c = &self.configs[ci];
                let n = self.peak_n();
                let mut gemms = training_gemms(c, tokens, a.chunk_tokens, a.lora_r);
                gemms.push(Gemm::new(format!("square {n}"), n, n, n));
                for g in gemms {
                    eprintln!("B1 {}: {} x {} x {}", g.name, g.m, g.k, g.n);
                    let (fwd, fwd_bwd) = bench_gemm::<B>(&g, a.warmup.max(1), a.iters, &device);
                    let shape = format!("{}x{}x{}", g.m, g.k, g.n);
                    let config = json!({"m": g.m, "k": g.k, "n": g.n, "dtype": dtype, "iters": a.iters});
                    let fwd_tf = g.fwd_flops() / fwd / 1e12;
                    let mut row = base_row("B1", &model_of(ci), &format!("{} {shape} fwd", g.name));
                    row.insert("tflops".into(), json!(fwd_tf));
                    row.insert("mfu".into(), json!(mfu(fwd_tf, peak)));
                    row.insert("ms".into(), json!(fwd * 1e3));
                    row.insert("config".into(), config.clone());
                    rows.push(row);
                    // Backward = (forward + backward) - forward: dX and dW, 4mkn.
                    let bwd = fwd_bwd - fwd;
                    let bwd_tf = (bwd > 0.0).then(|| 2.0 * g.fwd_flops() / bwd / 1e12);
                    let mut row = base_row("B1", &model_of(ci), &format!("{} {shape} bwd", g.name));
                    row.insert("tflops".into(), json!(bwd_tf));
                    row.insert("mfu".into(), json!(bwd_tf.and_then(|t| mfu(t, peak))));
                    row.insert("ms".into(), json!(bwd * 1e3));
                    row.insert("fwd_bwd_ms".into(), json!(fwd_bwd * 1e3));
                    row.insert("config".into(), config);
                    rows.push(row);
                }
            }
            Case::Attention(ci) => {
                let c = &self.configs[ci];
                for &seq in &a.attention_seq {
                    eprintln!(
                        "B1 {} attention: 1 x {seq}, {} / {} heads of {}, causal",
                        model_of(ci),
                        c.num_attention_heads,
                        c.num_key_value_heads,
                        c.head_dim
                    );
                    let (fwd, fwd_bwd) = bench_attention::<B>(c, seq, a.warmup.max(1), a.iters, &device);
                    let flops = causal_fwd_flops(c, seq);
                    let config = json!({"batch": 1, "seq": seq, "heads": c.num_attention_heads,
                                        "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
                                        "mask": "causal", "dtype": dtype, "iters": a.iters});
                    for (pass, secs, f) in [("fwd", fwd, flops), ("fwd+bwd", fwd_bwd, 3.5 * flops)] {
                        let tf = f / secs / 1e12;
                        let mut row =
                            base_row("B1", &model_of(ci), &format!("attention causal 1x{seq} {pass}"));
                        row.insert("tflops".into(), json!(tf));
                        row.insert("mfu".into(), json!(mfu(tf, peak)));
                        row.insert("ms".into(), json!(secs * 1e3));
                        row.insert("config".into(), config.clone());
                        rows.push(row);
                    }
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
                let secs = bench_loss::<B>(
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
                let tf = loss_flops(c, tokens) / secs / 1e12;
                let name = match (naive, autodiff) {
                    (true, _) => "naive full logits".to_string(),
                    (false, true) => format!("chunked {chunk} autodiff"),
                    (false, false) => format!("chunked {chunk}"),
                };
                let mut row = base_row("B2", &model_of(ci), &name);
                row.insert("tokens_per_s".into(), json!(tokens as f64 / secs));
                row.insert("tflops".into(), json!(tf));
                row.insert("mfu".into(), json!(mfu(tf, peak)));
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
                    mlp_chunk_tokens: a.mlp_chunk_tokens,
                    offload_block_inputs: a.offload_block_inputs,
                    offload_optimizer: a.offload_optimizer,
                    block_inputs_every: a.block_inputs_every,
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
                let times = bench_train::<B>(c, &b, &device, &mut || self.sample_pool(), &|| {
                    let (in_use, reserved) = pool_bytes(self.device)?;
                    let peak = driver_pool_peaks(self.device, true).map(|(used, _)| used);
                    if let Some(p) = peak {
                        self.driver_peak.fetch_max(p, Ordering::Relaxed);
                    }
                    Some(PoolSample {
                        in_use,
                        reserved,
                        peak,
                    })
                })?;
                let targets: Vec<String> = LoraSection::default().targets;
                let flops = train_flops_per_token(c, seq, b.lora_r.map(|r| (r, &targets[..])));
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
                row.insert("mfu".into(), json!(mfu(tf, peak)));
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
                           "chunk_tokens": a.chunk_tokens, "mlp_chunk_tokens": a.mlp_chunk_tokens,
                           "offload_block_inputs": a.offload_block_inputs, "offload_optimizer": a.offload_optimizer,
                           "block_inputs_every": a.block_inputs_every, "warmup": b.warmup, "steps": b.steps,
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
pub(crate) fn base_quant(args: &Args, lora: bool) -> BaseQuant {
    match args.quantize.as_str() {
        "nf4" if lora => BaseQuant::Nf4,
        _ => BaseQuant::None,
    }
}

fn lora_of(case: &Case) -> bool {
    matches!(case, Case::Train { lora: true, .. })
}
