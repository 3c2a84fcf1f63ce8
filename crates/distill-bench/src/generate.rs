//! B6: generation tok/s through the KV-cached batched decoder eval and serve use.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use burn::tensor::Tensor;
use distill_hf::tokenizer::TextTokenizer;
use distill_infer::generate::{
    Decoding, GenerationConfig, Request, Sampling, generate, kv_cache_tokens_in_gib,
};
use distill_models::{CausalLm, DecoderConfig, Kernels};
use serde_json::{Map, Value, json};

use crate::flops::{generate_flops_per_token, matmul_params, mfu};
use crate::rows::base_row;
use crate::train::random_rows;
use crate::{Args, time_calls};

/// B6: `batch` random prompts of --prompt-len tokens, --new-tokens greedy tokens each through
/// `distill_infer::generate` (the KV-cached batched decoder eval and serve use), no EOS. One
/// untimed call of the same size first.
pub(crate) fn bench_generate<B: Kernels>(
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
    let (gbps, gbps_from) = bandwidth_gbps::<B>(a, dtype, device);
    B::seed(device, 42);
    // As serve and eval hold it: the decoding copy made once, outside the timing.
    let model = CausalLm::<B>::init(c, device).into_decoding();
    let tokenizer = bench_tokenizer(&a.configs, c)?;
    let mut rng = 5u64;
    let samples = a.gen_samples.clamp(1, batch.max(1));
    let prompts: Vec<Vec<u32>> = (0..batch.div_ceil(samples))
        .map(|_| {
            random_rows(1, a.prompt_len, c.vocab_size, &mut rng)[0]
                .input_ids
                .clone()
        })
        .collect();
    let requests: Vec<Request> = (0..batch)
        .map(|i| Request {
            prompt: prompts[i / samples].clone(),
            seed: i as u64,
        })
        .collect();
    let sampling = match a.gen_temperature {
        t if t > 0.0 => Sampling {
            temperature: t,
            top_p: a.gen_top_p,
            top_k: 0,
        },
        _ => Sampling::GREEDY,
    };
    let cfg = GenerationConfig {
        decoding: Decoding {
            max_new_tokens: a.new_tokens,
            sampling,
            stop: Vec::new(),
            eos: Vec::new(),
            logprobs: None,
        },
        batch_size: batch,
        kv_cache_tokens: a.kv_cache_gib.map(|gib| kv_cache_tokens_in_gib(&model, gib)),
    };
    for _ in 0..a.warmup.min(1) {
        generate(&model, &tokenizer, &requests, &cfg, device, |_, _| {})?;
    }
    let _ = B::sync(device);
    let issued = fused_steps();
    let started = Instant::now();
    let (generations, stats) = generate(&model, &tokenizer, &requests, &cfg, device, |_, _| {})?;
    let _ = B::sync(device);
    let secs = started.elapsed().as_secs_f64();
    let issued = fused_steps()
        .zip(issued)
        .map(|(after, before)| after.since(&before));
    let processed = (batch * (a.prompt_len + a.new_tokens)) as f64;
    let tf = generate_flops_per_token(c) * processed / secs / 1e12;
    let mut row = base_row(
        "B6",
        model_name,
        &format!(
            "bs{batch} {}->{}{}",
            a.prompt_len,
            a.new_tokens,
            match a.gen_temperature {
                t if t > 0.0 && a.gen_top_p < 1.0 => format!(" sampled t{t} p{}", a.gen_top_p),
                t if t > 0.0 => format!(" sampled t{t}"),
                _ => String::new(),
            } + &match samples {
                1 => String::new(),
                n => format!(" x{n} per prompt"),
            }
        ),
    );
    let tokens_per_s = stats.new_tokens as f64 / secs;
    row.insert("tokens_per_s".into(), json!(tokens_per_s));
    // What a step must read at the least sets the fastest it can go: batch tokens a step.
    let elem = if dtype == "bf16" { 2 } else { 4 };
    let step_bytes = decode_step_bytes(c, batch, a.prompt_len, a.new_tokens, elem);
    let limit = batch as f64 * gbps * 1e9 / step_bytes;
    row.insert("bandwidth_gbps".into(), json!(gbps));
    row.insert("bandwidth_from".into(), json!(gbps_from));
    row.insert("bandwidth_limit_tokens_per_s".into(), json!(limit));
    row.insert("of_bandwidth_limit".into(), json!(tokens_per_s / limit));
    row.insert("tflops".into(), json!(tf));
    row.insert("mfu".into(), json!(mfu(tf, peak)));
    row.insert("ms".into(), json!(secs * 1e3));
    if let Some(f) = issued {
        f.add_to(&mut row);
    }
    row.insert("new_tokens".into(), json!(stats.new_tokens));
    row.insert("prefill_tokens".into(), json!(stats.prefill_tokens));
    row.insert("preemptions".into(), json!(stats.preemptions));
    row.insert("kv_pages_peak".into(), json!(stats.kv_pages_peak));
    // Two runs (two builds, or `DISTILL_DECODE` on and off) decoded the same tokens iff these match.
    let tokens = generations.iter().flat_map(|g| &g.tokens).copied();
    row.insert("tokens_fnv1a".into(), json!(format!("{:016x}", fnv1a(tokens))));
    row.insert(
        "config".into(),
        json!({"batch": batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
               "sampling": if a.gen_temperature > 0.0 { "sampled" } else { "greedy" },
               "temperature": a.gen_temperature, "top_p": a.gen_top_p, "samples_per_prompt": samples,
               "kv_cache": true, "kv_cache_gib": a.kv_cache_gib, "dtype": dtype}),
    );
    Ok(row)
}

/// The fused decoding steps' counts and times so far in this process (CUDA's
/// `decode::issued`, `timing::spans` and `timing::profile`), or between two readings.
struct FusedSteps {
    /// Replayed from a CUDA graph, captured into one, all.
    counts: [usize; 3],
    /// The device thread's host time issuing them.
    issuing: Duration,
    /// Steps whose GPU span was read, and the spans' total.
    spans: (usize, Duration),
    /// Profiled launches (`DISTILL_DECODE_PROFILE=1`): name, count, GPU time.
    profile: Vec<(&'static str, usize, Duration)>,
}

#[cfg(feature = "cuda")]
fn fused_steps() -> Option<FusedSteps> {
    use distill_kernels::cuda::{decode, timing};
    let (counts, issuing) = decode::issued();
    Some(FusedSteps {
        counts,
        issuing,
        spans: timing::spans(),
        profile: timing::profile(),
    })
}

#[cfg(not(feature = "cuda"))]
fn fused_steps() -> Option<FusedSteps> {
    None
}

impl FusedSteps {
    fn since(&self, before: &FusedSteps) -> FusedSteps {
        let earlier = |name| {
            let p = before.profile.iter().find(|p| p.0 == name);
            p.map_or((0, Duration::ZERO), |p| (p.1, p.2))
        };
        FusedSteps {
            counts: std::array::from_fn(|i| self.counts[i] - before.counts[i]),
            issuing: self.issuing - before.issuing,
            spans: (self.spans.0 - before.spans.0, self.spans.1 - before.spans.1),
            profile: self
                .profile
                .iter()
                .map(|&(name, n, t)| {
                    let (n0, t0) = earlier(name);
                    (name, n - n0, t - t0)
                })
                .filter(|p| p.1 > 0)
                .collect(),
        }
    }

    /// How the steps went out (from a CUDA graph or not), the host time issuing each, its
    /// GPU span, and where profiled its launches' GPU time by name: each a step's mean in µs.
    fn add_to(&self, row: &mut Map<String, Value>) {
        let [replayed, captured, steps] = self.counts;
        let per_step = |t: Duration, n: usize| t.as_secs_f64() * 1e6 / n.max(1) as f64;
        row.insert("fused_steps".into(), json!(steps));
        row.insert("graph_replays".into(), json!(replayed));
        row.insert("graph_captures".into(), json!(captured));
        row.insert("issue_us_per_step".into(), json!(per_step(self.issuing, steps)));
        // The mean of the steps whose span was read (none: null).
        let gpu = (self.spans.0 > 0).then(|| per_step(self.spans.1, self.spans.0));
        row.insert("gpu_us_per_step".into(), json!(gpu));
        if !self.profile.is_empty() {
            let launches: Map<String, Value> = self
                .profile
                .iter()
                .map(|&(name, _, t)| (name.to_string(), json!(per_step(t, steps))))
                .collect();
            row.insert("profile_us_per_step".into(), Value::Object(launches));
        }
    }
}

/// Bytes a decoding step reads at the least, each value `elem` bytes: every linear layer's
/// weights and the LM head's (tied or not), and the keys and values each of `batch` rows
/// attends to, at the generation's mean length (`prompt` + `new` / 2). The embedding gather,
/// norms and biases are left out.
pub(crate) fn decode_step_bytes(
    c: &DecoderConfig,
    batch: usize,
    prompt: usize,
    new: usize,
    elem: usize,
) -> f64 {
    let weights = matmul_params(c) as f64;
    let kv_per_position = (c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim) as f64;
    let positions = prompt as f64 + new as f64 / 2.0;
    (weights + batch as f64 * kv_per_position * positions) * elem as f64
}

/// The bandwidth B6's limit divides by, in GB/s, and where it came from: --peak-gbps, or a
/// scale (`x * 1.5`) of 512 MiB of bf16 on CUDA (16 MiB of f32 on CPU), read once and written
/// once, the mean of five calls after two.
fn bandwidth_gbps<B: Kernels>(a: &Args, dtype: &str, device: &B::Device) -> (f64, String) {
    if let Some(g) = a.peak_gbps.filter(|g| *g > 0.0) {
        return (g, "--peak-gbps".into());
    }
    let (bytes, dt) = match dtype {
        "bf16" => (512usize << 20, burn::tensor::DType::BF16),
        _ => (16 << 20, burn::tensor::DType::F32),
    };
    let x = Tensor::<B, 1>::ones([bytes / dt.size()], device).cast(dt);
    let secs = time_calls::<B>(device, 2, 5, || drop(x.clone().mul_scalar(1.5)));
    let gbps = 2.0 * bytes as f64 / secs / 1e9;
    (
        gbps,
        format!("measured: a scale of {} MiB, read and written", bytes >> 20),
    )
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

/// FNV-1a over the tokens' little-endian bytes: a fingerprint of what a run decoded.
fn fnv1a(tokens: impl Iterator<Item = u32>) -> u64 {
    tokens
        .flat_map(u32::to_le_bytes)
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-0.5B's bytes a step: transformers counts 494,032,768 parameters, of which the
    /// biases (24 x (896 + 2 x 128)) and norms (49 x 896) are not read as GEMM weights; the
    /// head is the tied embedding, read once. The KV cache at batch 64, 128 -> 256 tokens:
    /// 256 positions on average, 24 layers of K and V over 2 heads of 64.
    #[test]
    fn a_decoding_step_reads_the_gemm_weights_and_the_mean_kv_cache() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/configs/qwen2.5-0.5b");
        let c = DecoderConfig::from_dir(&dir).unwrap();
        let gemm_params = 494_032_768u64 - 24 * (896 + 2 * 128) - 49 * 896;
        assert_eq!(decode_step_bytes(&c, 1, 0, 0, 2), (2 * gemm_params) as f64);
        let kv = 64.0 * (24 * 2 * 2 * 64) as f64 * 256.0 * 2.0;
        assert_eq!(
            decode_step_bytes(&c, 64, 128, 256, 2),
            (2 * gemm_params) as f64 + kv
        );
    }
}
