//! Hugging Face model directory -> GGUF file that llama.cpp and Ollama load: hyperparameters,
//! tokenizer and chat template as llama.cpp's convert_hf_to_gguf.py writes them, Llama's q/k
//! rows permuted for ggml's RoPE, tensors in F32, F16, Q8_0, Q4_0 or the Q4_K_M mix.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value as Json;

use crate::error::{GgufError, Result};
use crate::ggml::GgmlType;
use crate::hfconfig::{Arch, Hparams, Llama3Rope};
use crate::import::ROPE_SCALING_KEY;
use crate::names::{hf_to_gguf, permute_rows};
use crate::reader::{Value, value_type};
use crate::tokenizer::{PreTokenizer, token_type};
use crate::writer::{TensorSpec, write_gguf};
use distill_hf::DecoderConfig;
use distill_hf::config::RopeScaling;

/// The quantization of the whole file, as llama.cpp's `llama-quantize` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    F32,
    F16,
    Q8_0,
    Q4_0,
    /// Q4_K for most matrices, Q6_K for the output head and for attn_v / ffn_down in the layers
    /// llama.cpp's Q4_K_M gives more bits.
    Q4KM,
}

impl Quant {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(Quant::F32),
            "f16" => Some(Quant::F16),
            "q8_0" => Some(Quant::Q8_0),
            "q4_0" => Some(Quant::Q4_0),
            "q4_k_m" => Some(Quant::Q4KM),
            _ => None,
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            Quant::F32 => 0,
            Quant::F16 => 1,
            Quant::Q4_0 => 2,
            Quant::Q8_0 => 7,
            Quant::Q4KM => 15,
        }
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third between.
fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    layer < n_layers / 8 || layer >= 7 * n_layers / 8 || (layer as i64 - (n_layers / 8) as i64) % 3 == 2
}

/// The type llama-quantize would give this tensor (llama-quant.cpp, for llama/qwen2 models).
fn tensor_type(quant: Quant, gguf_name: &str, dims: &[u64], n_layers: usize, tied: bool) -> GgmlType {
    if dims.len() < 2 || quant == Quant::F32 {
        return GgmlType::F32; // norms and biases stay f32 in every llama.cpp file type
    }
    let is_output = gguf_name == "output.weight" || (tied && gguf_name == "token_embd.weight");
    let layer = gguf_name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse::<usize>().ok());
    let part = gguf_name.split('.').nth(2).unwrap_or("");
    let wanted = match quant {
        Quant::F32 => GgmlType::F32,
        Quant::F16 => GgmlType::F16,
        Quant::Q8_0 => GgmlType::Q8_0,
        Quant::Q4_0 if is_output => GgmlType::Q6_K,
        Quant::Q4_0 => GgmlType::Q4_0,
        Quant::Q4KM if is_output => GgmlType::Q6_K,
        Quant::Q4KM => match (part, layer) {
            ("attn_v" | "ffn_down", Some(l)) if use_more_bits(l, n_layers) => GgmlType::Q6_K,
            _ => GgmlType::Q4_K,
        },
    };
    fallback(wanted, dims[0])
}

/// llama.cpp's `tensor_type_fallback`: rows that are not whole 256-blocks take a 32-block type,
/// rows that are not whole 32-blocks stay f16.
fn fallback(ty: GgmlType, row: u64) -> GgmlType {
    let ty = if row.is_multiple_of(ty.block_size() as u64) {
        ty
    } else {
        match ty {
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q6_K => GgmlType::Q8_0,
            other => other,
        }
    };
    if row.is_multiple_of(ty.block_size() as u64) {
        ty
    } else {
        GgmlType::F16
    }
}

/// The safetensors files of a model directory, mapped.
struct Weights {
    files: Vec<(PathBuf, Mmap)>,
    index: BTreeMap<String, usize>,
}

impl Weights {
    fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if index_path.exists() {
            let index: Json = read_json(&index_path)?;
            let mut shards: Vec<String> = index["weight_map"]
                .as_object()
                .ok_or_else(|| GgufError::invalid(&index_path, "no weight_map"))?
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for path in names {
            let file = File::open(&path).map_err(|e| GgufError::io(&path, e))?;
            // SAFETY: read-only map of a checkpoint nobody rewrites during export.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| GgufError::io(&path, e))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| GgufError::invalid(&path, format!("not a valid safetensors file: {e}")))?;
            for name in st.names() {
                index.insert(name.to_string(), files.len());
            }
            files.push((path, mmap));
        }
        Ok(Weights { files, index })
    }

    /// (shape, f32 data) of a tensor stored as F32, F16 or BF16.
    fn read(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (path, mmap) = &self.files[self.index[name]];
        let st = SafeTensors::deserialize(mmap).map_err(|e| GgufError::invalid(path, e.to_string()))?;
        let view = st
            .tensor(name)
            .map_err(|e| GgufError::invalid(path, e.to_string()))?;
        let b = view.data();
        let data = match view.dtype() {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(GgufError::tensor(
                    path,
                    name,
                    format!("dtype {other:?} (only F32, F16, BF16 are exported)"),
                ));
            }
        };
        Ok((view.shape().to_vec(), data))
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| GgufError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| GgufError::invalid(path, format!("invalid JSON: {e}")))
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub arch: Arch,
    pub tensors: usize,
    pub types: BTreeMap<String, usize>,
    /// Token texts that end a turn, for Ollama's `PARAMETER stop`.
    pub stop_tokens: Vec<String>,
    pub has_chat_template: bool,
}

/// Writes the model in `dir` to the GGUF file `out` (the caller makes that atomic).
pub fn export_gguf(dir: &Path, out: &Path, quant: Quant) -> Result<ExportSummary> {
    let config_path = dir.join("config.json");
    let config = DecoderConfig::from_file(&config_path)?;
    let hp = Hparams::from_decoder(config).map_err(|msg| GgufError::invalid(&config_path, msg))?;
    let weights = Weights::open(dir)?;
    let vocab = TokenizerExport::read(dir, &hp)?;

    let mut metadata = model_metadata(&hp, dir, quant);
    metadata.extend(vocab.metadata());

    let (specs, sources) = tensor_specs(&hp, &weights, quant, dir)?;
    let llama3 = Llama3Rope::from_hf(&hp.config.rope_scaling);
    if let Some(r) = &llama3 {
        metadata.push((ROPE_SCALING_KEY.into(), Value::String(r.to_json().to_string())));
    }
    let rope_factors = match &llama3 {
        Some(r) => Some(r.factors(hp.config.rope_theta, hp.config.head_dim)),
        None => None,
    };
    write_gguf(out, &metadata, &specs, |i| {
        let spec = &specs[i];
        let data = match &sources[i] {
            Source::RopeFactors => rope_factors.clone().expect("planned only with llama3 scaling"),
            Source::Hf { name, permute_heads } => {
                let (shape, data) = weights.read(name)?;
                match permute_heads {
                    Some(h) => permute_rows(&data, shape[0], *h),
                    None => data,
                }
            }
        };
        crate::quant::quantize(spec.ty, &data).map_err(|msg| GgufError::tensor(out, &spec.name, msg))
    })?;
    let mut types = BTreeMap::new();
    for s in &specs {
        *types.entry(s.ty.name().to_string()).or_insert(0) += 1;
    }
    Ok(ExportSummary {
        arch: hp.arch,
        tensors: specs.len(),
        types,
        stop_tokens: vocab.eos_text.into_iter().collect(),
        has_chat_template: vocab.chat_template.is_some(),
    })
}

enum Source {
    Hf {
        name: String,
        permute_heads: Option<usize>,
    },
    RopeFactors,
}

/// Every tensor to write with its type, in llama.cpp's order (embeddings, layers, head).
fn tensor_specs(
    hp: &Hparams,
    weights: &Weights,
    quant: Quant,
    dir: &Path,
) -> Result<(Vec<TensorSpec>, Vec<Source>)> {
    let mut planned: Vec<(String, String)> = Vec::new();
    for name in weights.index.keys() {
        if name.ends_with(".rotary_emb.inv_freq") {
            continue; // a buffer some exporters save; RoPE is recomputed from the config
        }
        if hp.config.tie_word_embeddings && name == "lm_head.weight" {
            continue; // a tied head saved anyway: llama.cpp reuses token_embd
        }
        let g = hf_to_gguf(name).ok_or_else(|| {
            GgufError::tensor(dir, name, "has no llama.cpp equivalent in the llama/qwen2 layout")
        })?;
        planned.push((g, name.clone()));
    }
    if !planned.iter().any(|(g, _)| g == "token_embd.weight") {
        return Err(GgufError::tensor(dir, "model.embed_tokens.weight", "missing"));
    }
    let order = |g: &str| -> (usize, usize, String) {
        match g.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
            Some((l, rest)) => (1, l.parse().unwrap_or(0), rest.to_string()),
            None if g.starts_with("token_embd") => (0, 0, g.into()),
            None => (2, 0, g.into()),
        }
    };
    planned.sort_by_key(|(g, _)| order(g));
    let mut specs = Vec::new();
    let mut sources = Vec::new();
    if Llama3Rope::from_hf(&hp.config.rope_scaling).is_some() {
        specs.push(TensorSpec {
            name: "rope_freqs.weight".into(),
            dims: vec![(hp.config.head_dim / 2) as u64],
            ty: GgmlType::F32,
        });
        sources.push(Source::RopeFactors);
    }
    for (g, hf) in planned {
        let shape = &weights_shape(weights, &hf)?;
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let ty = tensor_type(
            quant,
            &g,
            &dims,
            hp.config.num_hidden_layers,
            hp.config.tie_word_embeddings,
        );
        let part = g.split('.').nth(2).unwrap_or("");
        let permute_heads = match part {
            "attn_q" if hp.arch.permutes_qk() => Some(hp.config.num_attention_heads),
            "attn_k" if hp.arch.permutes_qk() => Some(hp.config.num_key_value_heads),
            _ => None,
        };
        specs.push(TensorSpec { name: g, dims, ty });
        sources.push(Source::Hf {
            name: hf,
            permute_heads,
        });
    }
    Ok((specs, sources))
}

fn weights_shape(weights: &Weights, name: &str) -> Result<Vec<usize>> {
    let (path, mmap) = &weights.files[weights.index[name]];
    let st = SafeTensors::deserialize(mmap).map_err(|e| GgufError::invalid(path, e.to_string()))?;
    let view = st
        .tensor(name)
        .map_err(|e| GgufError::invalid(path, e.to_string()))?;
    Ok(view.shape().to_vec())
}

fn u32v(v: usize) -> Value {
    Value::U32(v as u32)
}

/// `general.*` and `{arch}.*` keys, as convert_hf_to_gguf.py writes them.
fn model_metadata(hp: &Hparams, dir: &Path, quant: Quant) -> Vec<(String, Value)> {
    let arch = hp.arch.gguf_name();
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    let k = |s: &str| format!("{arch}.{s}");
    let mut m = vec![
        ("general.architecture".to_string(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name)),
        (k("vocab_size"), u32v(hp.config.vocab_size)),
        (k("context_length"), u32v(hp.config.max_position_embeddings)),
        (k("embedding_length"), u32v(hp.config.hidden_size)),
        (k("block_count"), u32v(hp.config.num_hidden_layers)),
        (k("feed_forward_length"), u32v(hp.config.intermediate_size)),
        (k("attention.head_count"), u32v(hp.config.num_attention_heads)),
        (k("attention.head_count_kv"), u32v(hp.config.num_key_value_heads)),
        (k("rope.freq_base"), Value::F32(hp.config.rope_theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(hp.config.rms_norm_eps as f32),
        ),
        (k("rope.dimension_count"), u32v(hp.config.head_dim)),
    ];
    if hp.config.head_dim != hp.config.hidden_size / hp.config.num_attention_heads {
        m.push((k("attention.key_length"), u32v(hp.config.head_dim)));
        m.push((k("attention.value_length"), u32v(hp.config.head_dim)));
    }
    if let RopeScaling::Linear { factor: f } = hp.config.rope_scaling {
        m.push((k("rope.scaling.type"), Value::String("linear".into())));
        m.push((k("rope.scaling.factor"), Value::F32(f as f32)));
    }
    m.push(("general.file_type".into(), Value::U32(quant.file_type())));
    m.push(("general.quantization_version".into(), Value::U32(2)));
    m
}

/// The tokenizer of a model directory, in GGUF's terms.
struct TokenizerExport {
    pre: &'static PreTokenizer,
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    bos: Option<u32>,
    eos: Option<u32>,
    eos_text: Option<String>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<String>,
}

/// A special token in tokenizer_config.json: "text" or {"content": "text", ...}.
fn token_text(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(m) => m.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The special token a TemplateProcessing post-processor (alone or in a Sequence) puts first.
fn template_prefix(post: &Json) -> Option<String> {
    match post["type"].as_str()? {
        "TemplateProcessing" => post["single"][0]["SpecialToken"]["id"]
            .as_str()
            .map(str::to_string),
        "Sequence" => post["processors"].as_array()?.iter().find_map(template_prefix),
        _ => None,
    }
}

impl TokenizerExport {
    fn read(dir: &Path, hp: &Hparams) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tok: Json = read_json(&tok_path)?;
        let bad = |msg: String| GgufError::invalid(&tok_path, msg);
        let model = &tok["model"];
        if model["type"] != "BPE" || model["byte_fallback"].as_bool().unwrap_or(false) {
            return Err(bad(
                "only byte-level BPE tokenizers (GPT-2 style: Qwen, Llama 3, SmolLM) can be exported; SentencePiece-style ones cannot yet".into(),
            ));
        }
        let pre = PreTokenizer::matching(&tok["pre_tokenizer"]).ok_or_else(|| {
            bad(format!(
                "pre_tokenizer {} matches none llama.cpp knows by name ({})",
                tok["pre_tokenizer"],
                PreTokenizer::supported_names()
            ))
        })?;
        if tok["normalizer"] != pre.normalizer() {
            return Err(bad(format!(
                "normalizer {} is not what llama.cpp's `{}` pre-tokenizer assumes ({})",
                tok["normalizer"],
                pre.names[0],
                pre.normalizer()
            )));
        }
        let mut by_id: BTreeMap<u32, (String, i32)> = BTreeMap::new();
        for (text, id) in model["vocab"]
            .as_object()
            .ok_or_else(|| bad("model.vocab is not a map".into()))?
        {
            let id = id
                .as_u64()
                .ok_or_else(|| bad(format!("vocab id of `{text}` is not a number")))?
                as u32;
            by_id.insert(id, (text.clone(), token_type::NORMAL));
        }
        for added in tok["added_tokens"].as_array().into_iter().flatten() {
            let (Some(id), Some(text)) = (added["id"].as_u64(), added["content"].as_str()) else {
                return Err(bad(format!("added token {added} has no id or content")));
            };
            let kind = if added["special"].as_bool().unwrap_or(false) {
                token_type::CONTROL
            } else {
                token_type::USER_DEFINED
            };
            by_id.insert(id as u32, (text.to_string(), kind));
        }
        // The embedding may have more rows than the tokenizer has tokens (Qwen pads to a
        // multiple of 128); llama.cpp's converter names those rows [PADn], type UNUSED.
        let n = hp
            .config
            .vocab_size
            .max(by_id.keys().next_back().map_or(0, |&k| k as usize + 1));
        if n > hp.config.vocab_size {
            return Err(bad(format!(
                "token ids reach {}, beyond vocab_size {} in config.json",
                n - 1,
                hp.config.vocab_size
            )));
        }
        let (mut tokens, mut types) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n as u32 {
            let (t, k) = by_id
                .remove(&i)
                .unwrap_or_else(|| (format!("[PAD{i}]"), token_type::UNUSED));
            tokens.push(t);
            types.push(k);
        }
        let merges = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| match m {
                Json::String(s) => Ok(s.clone()),
                Json::Array(p) if p.len() == 2 => Ok(format!(
                    "{} {}",
                    p[0].as_str().unwrap_or(""),
                    p[1].as_str().unwrap_or("")
                )),
                other => Err(bad(format!("merge {other} is not a pair"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();

        let config_path = dir.join("tokenizer_config.json");
        let tc: Json = if config_path.exists() {
            read_json(&config_path)?
        } else {
            Json::Null
        };
        let special = |key: &str| token_text(&tc[key]);
        let id_of = |t: &Option<String>| t.as_ref().and_then(|t| ids.get(t).copied());
        let eos_text =
            special("eos_token").or_else(|| hp.eos_token_id().and_then(|i| tokens.get(i as usize).cloned()));
        let bos_text = special("bos_token");
        let template_file = dir.join("chat_template.jinja");
        let chat_template = if template_file.exists() {
            Some(std::fs::read_to_string(&template_file).map_err(|e| GgufError::io(&template_file, e))?)
        } else {
            match &tc["chat_template"] {
                Json::String(s) => Some(s.clone()),
                Json::Array(items) => items
                    .iter()
                    .find(|i| i["name"] == "default")
                    .and_then(|i| i["template"].as_str().map(str::to_string)),
                _ => None,
            }
        };
        Ok(TokenizerExport {
            pre,
            bos: id_of(&bos_text).or(hp.config.bos_token_id),
            eos: id_of(&eos_text).or(hp.eos_token_id()),
            unk: id_of(&special("unk_token")),
            pad: id_of(&special("pad_token")),
            // Llama 3's tokenizer_config.json has no add_bos_token; its post-processor adds BOS.
            add_bos: tc["add_bos_token"]
                .as_bool()
                .unwrap_or_else(|| bos_text.is_some() && template_prefix(&tok["post_processor"]) == bos_text),
            add_eos: tc["add_eos_token"].as_bool().unwrap_or(false),
            eos_text,
            chat_template,
            tokens,
            types,
            merges,
        })
    }

    fn metadata(&self) -> Vec<(String, Value)> {
        let strings =
            |v: &[String]| Value::Array(value_type::STRING, v.iter().cloned().map(Value::String).collect());
        let mut m = vec![
            ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
            (
                "tokenizer.ggml.pre".into(),
                Value::String(self.pre.names[0].into()),
            ),
            ("tokenizer.ggml.tokens".into(), strings(&self.tokens)),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(
                    value_type::I32,
                    self.types.iter().map(|&t| Value::I32(t)).collect(),
                ),
            ),
            ("tokenizer.ggml.merges".into(), strings(&self.merges)),
        ];
        for (key, id) in [
            ("bos_token_id", self.bos),
            ("eos_token_id", self.eos),
            ("unknown_token_id", self.unk),
            ("padding_token_id", self.pad),
        ] {
            if let Some(id) = id {
                m.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
            }
        }
        m.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(self.add_bos)));
        m.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(self.add_eos)));
        if let Some(t) = &self.chat_template {
            m.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3's post-processor: ByteLevel then a template that starts with <|begin_of_text|>.
    #[test]
    fn bos_is_read_from_template_post_processors() {
        let llama3 = serde_json::json!({"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}
        ]});
        assert_eq!(template_prefix(&llama3).as_deref(), Some("<|begin_of_text|>"));
        let plain = serde_json::json!({"type": "ByteLevel", "add_prefix_space": true});
        assert_eq!(template_prefix(&plain), None);
        assert_eq!(template_prefix(&serde_json::Value::Null), None);
    }

    /// SmolLM2-135M's 30 layers under Q4_K_M: llama.cpp gives attn_v/ffn_down Q6_K in layers
    /// 0-2, 27-29 and every third from 5; rows of 576 are not whole 256-blocks, so those
    /// tensors fall back to Q8_0 (Q6_K) and Q5_0 (Q4_K) as llama-quantize does.
    #[test]
    fn q4_k_m_mix_follows_llama_quant() {
        let more: Vec<usize> = (0..30).filter(|&l| use_more_bits(l, 30)).collect();
        assert_eq!(more, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
        let t = |name: &str, dims: &[u64]| tensor_type(Quant::Q4KM, name, dims, 30, true);
        assert_eq!(t("blk.0.ffn_down.weight", &[1536, 576]), GgmlType::Q6_K);
        assert_eq!(t("blk.3.ffn_down.weight", &[1536, 576]), GgmlType::Q4_K);
        assert_eq!(t("blk.3.ffn_up.weight", &[576, 1536]), GgmlType::Q5_0);
        assert_eq!(t("blk.0.attn_v.weight", &[576, 192]), GgmlType::Q8_0);
        assert_eq!(t("token_embd.weight", &[576, 49152]), GgmlType::Q8_0);
        assert_eq!(t("blk.0.attn_norm.weight", &[576]), GgmlType::F32);
        let untied = |name: &str| tensor_type(Quant::Q4KM, name, &[4096, 1000], 32, false);
        assert_eq!(untied("token_embd.weight"), GgmlType::Q4_K);
        assert_eq!(untied("output.weight"), GgmlType::Q6_K);
        assert_eq!(
            tensor_type(Quant::Q8_0, "blk.0.attn_q.weight", &[48, 48], 2, false),
            GgmlType::F16
        );
    }
}
