//! GGUF file -> Hugging Face model directory: config.json, generation_config.json,
//! model.safetensors (bf16 or f32, written one tensor at a time), tokenizer.json and
//! tokenizer_config.json (with the chat template).

use std::collections::BTreeMap;
use std::path::Path;

use distill_core::tensorfile::{self, FileDtype};
use serde_json::json;

use crate::error::{GgufError, Result};
use crate::hfconfig::{Arch, Hparams, Llama3Rope};
use crate::names::{gguf_to_hf, unpermute_rows};
use crate::reader::GgufFile;
use crate::tokenizer::GgufVocab;
use distill_hf::config::{Architecture, DecoderConfig, RopeScaling};

/// Element type of the written safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    /// Half the size; rounds values that do not fit bf16's 8-bit mantissa.
    Bf16,
    /// Exact: every dequantized value is an f32.
    F32,
}

impl OutDtype {
    fn torch_name(self) -> &'static str {
        match self {
            OutDtype::Bf16 => "bfloat16",
            OutDtype::F32 => "float32",
        }
    }

    fn file_dtype(self) -> FileDtype {
        match self {
            OutDtype::Bf16 => FileDtype::Bf16,
            OutDtype::F32 => FileDtype::F32,
        }
    }
}

/// What an import wrote, for the CLI to print.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub arch: Arch,
    pub name: Option<String>,
    pub tensors: usize,
    pub parameters: u64,
    /// Source tensor count per ggml type, e.g. {"Q4_1": 210, "F32": 61}.
    pub source_types: BTreeMap<String, usize>,
    pub has_chat_template: bool,
}

/// Custom key in our exports holding the exact HF rope_scaling dict; llama.cpp ignores it.
pub const ROPE_SCALING_KEY: &str = "distill.rope_scaling";

/// Converts `src` into the (existing, empty) directory `out`.
pub fn import_gguf(src: &Path, out: &Path, dtype: OutDtype) -> Result<ImportSummary> {
    let file = GgufFile::open(src)?;
    let hp = read_hparams(&file)?;
    let vocab = read_vocab(&file)?;
    let path = file.path();

    let tokenizer = vocab
        .tokenizer_json()
        .map_err(|msg| GgufError::metadata(path, "tokenizer.ggml", msg))?;
    let tok_config = vocab.tokenizer_config(Some(hp.config.max_position_embeddings as u64));
    let generation = json!({
        "bos_token_id": hp.config.bos_token_id,
        "eos_token_id": hp.eos_token_id(),
        "do_sample": false,
    });
    write_json(&out.join("config.json"), &hp.to_config_json(dtype.torch_name()))?;
    write_json(&out.join("generation_config.json"), &generation)?;
    write_json(&out.join("tokenizer.json"), &tokenizer)?;
    write_json(&out.join("tokenizer_config.json"), &tok_config)?;

    let plan = tensor_plan(&file)?;
    write_safetensors(&file, &hp, &plan, dtype, &out.join("model.safetensors"))?;

    let mut source_types = BTreeMap::new();
    for t in &file.tensors {
        *source_types.entry(t.ty.name().to_string()).or_insert(0) += 1;
    }
    Ok(ImportSummary {
        arch: hp.arch,
        name: file.get_str("general.name")?.map(str::to_string),
        tensors: plan.len(),
        parameters: plan
            .iter()
            .map(|(g, _)| file.tensor(g).map_or(0, |t| t.n_elements()))
            .sum(),
        source_types,
        has_chat_template: vocab.chat_template.is_some(),
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(path, text + "\n").map_err(|e| GgufError::io(path, e))
}

/// Hyperparameters from `{arch}.*` metadata and the tensor shapes.
pub fn read_hparams(file: &GgufFile) -> Result<Hparams> {
    let path = file.path();
    let arch_name = file.require_str("general.architecture")?;
    let arch = Arch::from_gguf(arch_name).ok_or_else(|| {
        GgufError::metadata(
            path,
            "general.architecture",
            format!("`{arch_name}` is not supported (supported: llama, qwen2)"),
        )
    })?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let usize_of = |k: &str| -> Result<usize> { Ok(file.require_u64(&key(k))? as usize) };
    let hidden = usize_of("embedding_length")?;
    let heads = usize_of("attention.head_count")?;
    if heads == 0 {
        return Err(GgufError::metadata(
            path,
            key("attention.head_count"),
            "must be positive",
        ));
    }
    let kv_heads = file
        .get_u64(&key("attention.head_count_kv"))?
        .map_or(heads, |v| v as usize);
    let head_dim = file
        .get_u64(&key("attention.key_length"))?
        .map_or(hidden / heads, |v| v as usize);
    if let Some(rot) = file.get_u64(&key("rope.dimension_count"))?
        && rot as usize != head_dim
    {
        return Err(GgufError::metadata(
            path,
            key("rope.dimension_count"),
            format!("partial rotary ({rot} of {head_dim} dims) is not supported"),
        ));
    }
    let embd = file
        .tensor("token_embd.weight")
        .ok_or_else(|| GgufError::tensor(path, "token_embd.weight", "missing"))?;
    let vocab_size = embd.shape()[0];
    let rope_theta = file.get_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0);
    let rope_scaling = read_rope_scaling(file, arch_name, rope_theta, head_dim)?;
    let attention_bias = arch == Arch::Qwen2 || file.tensor("blk.0.attn_q.bias").is_some();
    let config = DecoderConfig {
        architecture: match arch {
            Arch::Llama => Architecture::Llama,
            Arch::Qwen2 => Architecture::Qwen2,
        },
        vocab_size,
        hidden_size: hidden,
        intermediate_size: usize_of("feed_forward_length")?,
        num_hidden_layers: usize_of("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        max_position_embeddings: usize_of("context_length")?,
        rms_norm_eps: file
            .get_f64(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| GgufError::metadata(path, key("attention.layer_norm_rms_epsilon"), "missing"))?,
        rope_theta,
        rope_scaling,
        qkv_bias: attention_bias,
        // Llama's attention_bias covers o_proj too; Qwen2 has none there.
        o_bias: attention_bias && arch == Arch::Llama,
        mlp_bias: false,
        tie_word_embeddings: file.tensor("output.weight").is_none(),
        torch_dtype: None,
        bos_token_id: file.get_u64("tokenizer.ggml.bos_token_id")?.map(|v| v as u32),
        eos_token_ids: file
            .get_u64("tokenizer.ggml.eos_token_id")?
            .map(|v| v as u32)
            .into_iter()
            .collect(),
    };
    Ok(Hparams { arch, config })
}

/// Linear scaling from `{arch}.rope.scaling.*`; Llama 3 scaling from `rope_freqs.weight`.
fn read_rope_scaling(file: &GgufFile, arch: &str, theta: f64, head_dim: usize) -> Result<RopeScaling> {
    let path = file.path();
    let type_key = format!("{arch}.rope.scaling.type");
    match file.get_str(&type_key)? {
        None | Some("none") => {}
        Some("linear") => {
            let factor_key = format!("{arch}.rope.scaling.factor");
            let factor = file
                .get_f64(&factor_key)?
                .ok_or_else(|| GgufError::metadata(path, &factor_key, "missing for linear scaling"))?;
            return Ok(RopeScaling::Linear { factor });
        }
        Some(other) => {
            return Err(GgufError::metadata(
                path,
                type_key,
                format!("rope scaling `{other}` is not supported (none, linear, llama3)"),
            ));
        }
    }
    if file.tensor("rope_freqs.weight").is_none() {
        return Ok(RopeScaling::None);
    }
    let factors = file.read_f32("rope_freqs.weight")?;
    let exact = file
        .get_str(ROPE_SCALING_KEY)?
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .and_then(|v| {
            Some(Llama3Rope {
                factor: v["factor"].as_f64()?,
                low_freq_factor: v["low_freq_factor"].as_f64()?,
                high_freq_factor: v["high_freq_factor"].as_f64()?,
                original_max_position_embeddings: v["original_max_position_embeddings"].as_f64()?,
            })
        });
    exact
        .or_else(|| Llama3Rope::infer(&factors, theta, head_dim))
        .map(|r| r.to_hf())
        .ok_or_else(|| {
            GgufError::tensor(
                path,
                "rope_freqs.weight",
                "per-frequency RoPE factors that match no Llama 3 scaling (low 1, high 4) we can express in config.json",
            )
        })
}

/// `tokenizer.ggml.*` and the chat template.
pub fn read_vocab(file: &GgufFile) -> Result<GgufVocab<'_>> {
    let path = file.path();
    let tokens = file.get_strings("tokenizer.ggml.tokens")?.ok_or_else(|| {
        GgufError::metadata(
            path,
            "tokenizer.ggml.tokens",
            "missing: this file has no tokenizer",
        )
    })?;
    let ints = |key: &str| -> Result<Vec<i32>> {
        file.get_array(key)?
            .unwrap_or_default()
            .iter()
            .map(|v| {
                v.as_i64().map(|i| i as i32).ok_or_else(|| {
                    GgufError::metadata(path, key, format!("expected integers, found {}", v.type_name()))
                })
            })
            .collect()
    };
    let token_types = ints("tokenizer.ggml.token_type")?;
    let scores = file
        .get_array("tokenizer.ggml.scores")?
        .unwrap_or_default()
        .iter()
        .map(|v| v.as_f64().map(|f| f as f32))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| GgufError::metadata(path, "tokenizer.ggml.scores", "expected numbers"))?;
    for (key, len) in [
        ("tokenizer.ggml.token_type", token_types.len()),
        ("tokenizer.ggml.scores", scores.len()),
    ] {
        if len != 0 && len != tokens.len() {
            return Err(GgufError::metadata(
                path,
                key,
                format!("{len} entries for {} tokens", tokens.len()),
            ));
        }
    }
    let id = |key: &str| -> Result<Option<u32>> {
        match file.get_u64(key)? {
            Some(v) if v as usize >= tokens.len() => Err(GgufError::metadata(
                path,
                key,
                format!("token id {v} is outside the vocabulary of {}", tokens.len()),
            )),
            v => Ok(v.map(|v| v as u32)),
        }
    };
    let model = file.require_str("tokenizer.ggml.model")?;
    Ok(GgufVocab {
        model,
        pre: file.get_str("tokenizer.ggml.pre")?,
        merges: file.get_strings("tokenizer.ggml.merges")?.unwrap_or_default(),
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?,
        pad: id("tokenizer.ggml.padding_token_id")?,
        // llama.cpp's defaults when a file does not say: BOS for SentencePiece vocabularies.
        add_bos: file
            .get_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(model == "llama"),
        add_eos: file.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        add_space_prefix: file
            .get_bool("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(model == "llama"),
        chat_template: file.get_str("tokenizer.chat_template")?,
        tokens,
        token_types,
        scores,
    })
}

/// (GGUF name, HF name) of every tensor to write, sorted by HF name; every tensor must map
/// and be of a type we dequantize.
fn tensor_plan(file: &GgufFile) -> Result<Vec<(String, String)>> {
    let mut plan = Vec::new();
    for t in &file.tensors {
        if t.name == "rope_freqs.weight" {
            continue; // turned into config.json's rope_scaling
        }
        let hf = gguf_to_hf(&t.name).ok_or_else(|| {
            GgufError::tensor(
                file.path(),
                &t.name,
                "has no Hugging Face equivalent in the llama/qwen2 layout",
            )
        })?;
        if !t.ty.can_dequantize() {
            return Err(GgufError::tensor(
                file.path(),
                &t.name,
                format!(
                    "ggml type {} cannot be dequantized here (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K); pick another quantization of this model",
                    t.ty.name()
                ),
            ));
        }
        plan.push((t.name.clone(), hf));
    }
    plan.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(plan)
}

/// Number of heads whose rows llama.cpp permuted in this tensor, if any.
fn permuted_heads(hp: &Hparams, gguf_name: &str) -> Option<usize> {
    if !hp.arch.permutes_qk() {
        return None;
    }
    let part = gguf_name.strip_prefix("blk.")?.split('.').nth(1)?;
    match part {
        "attn_q" => Some(hp.config.num_attention_heads),
        "attn_k" => Some(hp.config.num_key_value_heads),
        _ => None,
    }
}

/// Streams model.safetensors: each tensor dequantized, un-permuted and encoded in turn, so
/// memory holds one tensor at a time.
fn write_safetensors(
    file: &GgufFile,
    hp: &Hparams,
    plan: &[(String, String)],
    dtype: OutDtype,
    out_path: &Path,
) -> Result<()> {
    let entries: Vec<(String, Vec<usize>)> = plan
        .iter()
        .map(|(g, hf)| (hf.clone(), file.tensor(g).expect("planned from the file").shape()))
        .collect();
    let tensor = |i: usize| -> Result<Vec<f32>> {
        let g = &plan[i].0;
        let data = file.read_f32(g)?;
        let Some(heads) = permuted_heads(hp, g) else {
            return Ok(data);
        };
        let rows = entries[i].1[0];
        if !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
            return Err(GgufError::tensor(
                file.path(),
                g,
                format!("{rows} rows do not split into {heads} heads of even size"),
            ));
        }
        Ok(unpermute_rows(&data, rows, heads))
    };
    tensorfile::write_safetensors(out_path, &entries, dtype.file_dtype(), tensor, |e| {
        GgufError::io(out_path, e)
    })
}
