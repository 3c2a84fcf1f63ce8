//! B6: generation tok/s through the KV-cached batched decoder eval and serve use.

use std::path::PathBuf;
use std::time::Instant;

use distill_hf::tokenizer::TextTokenizer;
use distill_infer::generate::{Decoding, GenerationConfig, Request, Sampling, generate};
use distill_models::{CausalLm, DecoderConfig, Kernels};
use serde_json::{Map, Value, json};

use crate::Args;
use crate::flops::{generate_flops_per_token, mfu};
use crate::rows::base_row;
use crate::train::random_rows;

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
    };
    for _ in 0..a.warmup.min(1) {
        generate(&model, &tokenizer, &requests, &cfg, device, |_, _| {})?;
    }
    let _ = B::sync(device);
    let started = Instant::now();
    let (generations, stats) = generate(&model, &tokenizer, &requests, &cfg, device, |_, _| {})?;
    let _ = B::sync(device);
    let secs = started.elapsed().as_secs_f64();
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
    row.insert("tokens_per_s".into(), json!(stats.new_tokens as f64 / secs));
    row.insert("tflops".into(), json!(tf));
    row.insert("mfu".into(), json!(mfu(tf, peak)));
    row.insert("ms".into(), json!(secs * 1e3));
    row.insert("new_tokens".into(), json!(stats.new_tokens));
    row.insert("prefill_tokens".into(), json!(stats.prefill_tokens));
    // Two runs (two builds, or `DISTILL_DECODE` on and off) decoded the same tokens iff these match.
    let tokens = generations.iter().flat_map(|g| &g.tokens).copied();
    row.insert("tokens_fnv1a".into(), json!(format!("{:016x}", fnv1a(tokens))));
    row.insert(
        "config".into(),
        json!({"batch": batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
               "sampling": if a.gen_temperature > 0.0 { "sampled" } else { "greedy" },
               "temperature": a.gen_temperature, "top_p": a.gen_top_p, "samples_per_prompt": samples,
               "kv_cache": true, "dtype": dtype}),
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

/// FNV-1a over the tokens' little-endian bytes: a fingerprint of what a run decoded.
fn fnv1a(tokens: impl Iterator<Item = u32>) -> u64 {
    tokens
        .flat_map(u32::to_le_bytes)
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}
