//! `config.json`: which architecture a directory holds, and the decoder shape both our
//! architectures share once their HF-specific fields are checked.

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result, read_json};
use crate::limits::{
    MAX_CONFIG_BYTES, MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN_SIZE, MAX_INTERMEDIATE_SIZE, MAX_LAYERS,
    MAX_PARAMETERS, MAX_POSITIONS, MAX_VOCAB, check_file,
};
use crate::{llama, qwen2};

/// The architectures distill can load, by their `architectures[0]` name in config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Qwen2,
    Llama,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
        }
    }
}

/// Everything the shared decoder needs, resolved from an architecture's own config.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Bias on q/k/v projections (always true for Qwen2, `attention_bias` for Llama).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama `attention_bias`), never for Qwen2.
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    /// `torch_dtype` / `dtype` as written, for display.
    pub torch_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// RoPE frequency scaling, as HF's `rope_scaling` dict.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Fields every HF causal-LM config shares; read first to pick the architecture.
#[derive(Deserialize)]
struct Header {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
}

/// `eos_token_id` is an int in most configs and a list in Llama 3.x.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The raw `rope_scaling` object; `rope_type` (new) or `type` (old) names the method.
#[derive(Deserialize, Debug, Clone, Default)]
pub struct RawRopeScaling {
    pub rope_type: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<f64>,
    /// transformers 5 moves `rope_theta` into `rope_parameters`.
    pub rope_theta: Option<f64>,
}

impl RawRopeScaling {
    /// Turns HF's dict into a method we implement, or an error naming what we do not.
    pub fn resolve(raw: Option<&RawRopeScaling>, path: &Path) -> Result<RopeScaling> {
        let Some(raw) = raw else {
            return Ok(RopeScaling::None);
        };
        let kind = raw
            .rope_type
            .as_deref()
            .or(raw.kind.as_deref())
            .unwrap_or("default");
        let need = |field: &str, value: Option<f64>| {
            value
                .ok_or_else(|| ModelError::invalid(path, format!("rope_scaling type {kind} needs `{field}`")))
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear {
                factor: need("factor", raw.factor)?,
            }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: need("factor", raw.factor)?,
                low_freq_factor: need("low_freq_factor", raw.low_freq_factor)?,
                high_freq_factor: need("high_freq_factor", raw.high_freq_factor)?,
                original_max_position_embeddings: need(
                    "original_max_position_embeddings",
                    raw.original_max_position_embeddings,
                )?,
            }),
            other => Err(ModelError::invalid(
                path,
                format!(
                    "rope_scaling type `{other}` is not supported (supported: default, linear, llama3); \
                     remove rope_scaling to run at the native context length"
                ),
            )),
        }
    }
}

/// Fields Qwen2 and Llama configs share, flattened into each architecture's config.
#[derive(Deserialize, Debug, Clone)]
pub struct CommonFields {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RawRopeScaling>,
    pub rope_parameters: Option<RawRopeScaling>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub tie_word_embeddings: Option<bool>,
    pub torch_dtype: Option<String>,
    pub dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<TokenIds>,
}

fn default_act() -> String {
    "silu".into()
}

impl CommonFields {
    /// The shared part of the resolution; architectures set their bias flags afterwards.
    pub fn resolve(
        &self,
        architecture: Architecture,
        default_rope_theta: f64,
        default_tied: bool,
        path: &Path,
    ) -> Result<DecoderConfig> {
        if self.hidden_act != "silu" {
            return Err(ModelError::invalid(
                path,
                format!("hidden_act `{}` is not supported (only silu)", self.hidden_act),
            ));
        }
        let heads = self.num_attention_heads.max(1);
        let scaling = self.rope_scaling.as_ref().or(self.rope_parameters.as_ref());
        let rope_theta = self
            .rope_theta
            .or(self.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(default_rope_theta);
        Ok(DecoderConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / heads),
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling: RawRopeScaling::resolve(scaling, path)?,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(default_tied),
            torch_dtype: self.torch_dtype.clone().or(self.dtype.clone()),
            bos_token_id: self.bos_token_id,
            eos_token_ids: self
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_default(),
        })
    }
}

impl DecoderConfig {
    /// Reads `dir/config.json` and resolves it for whichever architecture it names.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        check_file(path, MAX_CONFIG_BYTES)?;
        let header: Header = read_json(path)?;
        let arch = header
            .architectures
            .first()
            .map(String::as_str)
            .or(header.model_type.as_deref())
            .unwrap_or("<none>");
        let config = match arch {
            "Qwen2ForCausalLM" | "qwen2" => read_json::<qwen2::Qwen2Config>(path)?.resolve(path)?,
            "LlamaForCausalLM" | "llama" => read_json::<llama::LlamaConfig>(path)?.resolve(path)?,
            other => {
                return Err(ModelError::invalid(
                    path,
                    format!(
                        "architecture `{other}` is not supported (supported: Qwen2ForCausalLM, LlamaForCausalLM)"
                    ),
                ));
            }
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ModelError::invalid(path, format!("`{field}` must be positive")));
        }
        // Shapes size allocations (and every tensor list and parameter count below), so a
        // config from an untrusted directory is held to limits far above released models.
        let limited = [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_HIDDEN_SIZE),
            ("intermediate_size", self.intermediate_size, MAX_INTERMEDIATE_SIZE),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_key_value_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_POSITIONS,
            ),
        ];
        if let Some((field, value, max)) = limited.iter().find(|(_, v, max)| v > max) {
            return Err(ModelError::invalid(
                path,
                format!("`{field}` is {value}, over the limit of {max}"),
            ));
        }
        // Within those limits the count fits in 64 bits (under 2^52).
        let params = self.parameter_count() as u64;
        if params > MAX_PARAMETERS {
            return Err(ModelError::invalid(
                path,
                format!("the shape implies {params} parameters, over the limit of {MAX_PARAMETERS}"),
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(ModelError::invalid(
                path,
                format!(
                    "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ModelError::invalid(
                path,
                format!("head_dim ({}) must be even for rotary embeddings", self.head_dim),
            ));
        }
        Ok(())
    }

    pub fn num_kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Every tensor the checkpoint must hold, with its HF shape ([out, in] for linear weights).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut linear = |name: &str, rows: usize, cols: usize, bias: bool| {
                out.push((format!("{p}.{name}.weight"), vec![rows, cols]));
                if bias {
                    out.push((format!("{p}.{name}.bias"), vec![rows]));
                }
            };
            linear("self_attn.q_proj", q, h, self.qkv_bias);
            linear("self_attn.k_proj", kv, h, self.qkv_bias);
            linear("self_attn.v_proj", kv, h, self.qkv_bias);
            linear("self_attn.o_proj", h, q, self.o_bias);
            linear("mlp.gate_proj", i, h, self.mlp_bias);
            linear("mlp.up_proj", i, h, self.mlp_bias);
            linear("mlp.down_proj", h, i, self.mlp_bias);
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }

    pub fn parameter_count(&self) -> usize {
        self.expected_tensors()
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<DecoderConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        DecoderConfig::from_file(&path)
    }

    /// Qwen2.5-7B-Instruct's config.json as released (transformers 4.x field names).
    const QWEN25_7B: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
      "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
      "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
      "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
      "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
      "sliding_window": 131072, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "transformers_version": "4.43.1", "use_cache": true, "use_sliding_window": false,
      "vocab_size": 152064}"#;

    /// Llama-3.1-8B-Instruct's config.json as released.
    const LLAMA31_8B: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
      "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
      "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
      "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
      "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256}"#;

    #[test]
    fn reads_qwen25_7b_and_counts_its_parameters() {
        let c = parse(QWEN25_7B).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen2);
        assert_eq!((c.head_dim, c.num_kv_groups()), (128, 7));
        assert!(c.qkv_bias && !c.o_bias && !c.tie_word_embeddings);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.eos_token_ids, vec![151645]);
        // Qwen reports 7.61B parameters for Qwen2.5-7B.
        assert_eq!(c.parameter_count(), 7_615_616_512);
    }

    #[test]
    fn reads_llama31_8b_with_llama3_rope_and_eos_list() {
        let c = parse(LLAMA31_8B).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0
            }
        );
        assert_eq!(c.parameter_count(), 8_030_261_248);
    }

    #[test]
    fn sliding_window_is_refused_with_the_fix() {
        let json = QWEN25_7B.replace(r#""use_sliding_window": false"#, r#""use_sliding_window": true"#);
        let err = parse(&json).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("use_sliding_window"),
            "{err}"
        );
        assert!(err.contains("set it to false"), "{err}");
    }

    #[test]
    fn unsupported_rope_and_architecture_are_named() {
        let yarn = QWEN25_7B.replace(
            r#""rope_theta": 1000000.0"#,
            r#""rope_theta": 1000000.0, "rope_scaling": {"type": "yarn", "factor": 4.0}"#,
        );
        assert!(
            parse(&yarn)
                .unwrap_err()
                .to_string()
                .contains("rope_scaling type `yarn`")
        );
        let mistral = QWEN25_7B.replace("Qwen2ForCausalLM", "MistralForCausalLM");
        assert!(
            parse(&mistral)
                .unwrap_err()
                .to_string()
                .contains("`MistralForCausalLM` is not supported")
        );
    }

    #[test]
    fn bad_json_and_bad_fields_name_file_and_line() {
        let err = parse("{\n  \"architectures\": [\"Qwen2ForCausalLM\"],\n  oops\n}").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("config.json") && msg.contains("line 3"), "{msg}");
        let err = parse(&QWEN25_7B.replace(r#""num_key_value_heads": 4"#, r#""num_key_value_heads": 5"#));
        assert!(
            err.unwrap_err()
                .to_string()
                .contains("not a multiple of num_key_value_heads")
        );
        let err = parse(&QWEN25_7B.replace(r#""hidden_size": 3584,"#, "")).unwrap_err();
        assert!(err.to_string().contains("hidden_size"), "{err}");
    }

    #[test]
    fn absurd_sizes_are_refused_naming_the_field() {
        for (from, to, want) in [
            (
                r#""vocab_size": 152064"#,
                r#""vocab_size": 1000000000000"#,
                "`vocab_size` is 1000000000000, over the limit of 2097152",
            ),
            (
                r#""num_hidden_layers": 28"#,
                r#""num_hidden_layers": 1000000"#,
                "`num_hidden_layers` is 1000000, over the limit of 1024",
            ),
            (
                r#""hidden_size": 3584"#,
                r#""hidden_size": 18446744073709551615"#,
                "`hidden_size` is 18446744073709551615, over the limit of 65536",
            ),
        ] {
            let err = parse(&QWEN25_7B.replace(from, to)).unwrap_err().to_string();
            assert!(err.ends_with(&format!("config.json: {want}")), "{err}");
        }
        // Each field within its limit, the whole over a trillion parameters.
        let huge = QWEN25_7B
            .replace(r#""hidden_size": 3584"#, r#""hidden_size": 65536"#)
            .replace(r#""num_hidden_layers": 28"#, r#""num_hidden_layers": 1024"#);
        let err = parse(&huge).unwrap_err().to_string();
        assert!(
            err.contains("parameters, over the limit of 1099511627776"),
            "{err}"
        );
    }

    #[test]
    fn an_oversized_or_special_config_file_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MAX_CONFIG_BYTES + 1).unwrap();
        let err = DecoderConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("config.json: 67108865 bytes, over the 67108864-byte limit"),
            "{err}"
        );
        #[cfg(unix)]
        {
            std::fs::remove_file(&path).unwrap();
            std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
            let err = DecoderConfig::from_file(&path).unwrap_err().to_string();
            assert!(err.ends_with("config.json: not a regular file"), "{err}");
        }
    }
}
