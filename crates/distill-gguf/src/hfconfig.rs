//! Model hyperparameters both ways: GGUF `{arch}.*` metadata to an HF `config.json` that
//! transformers and `distill_models::DecoderConfig` read, and `config.json` back to metadata.

use serde::Deserialize;
use serde_json::{Value as Json, json};

/// The architectures we convert: llama.cpp's name, HF's class and model_type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub fn from_gguf(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            _ => None,
        }
    }

    pub fn from_hf(config: &HfConfig) -> Option<Self> {
        let name = config
            .architectures
            .first()
            .map(String::as_str)
            .or(config.model_type.as_deref())?;
        match name {
            "LlamaForCausalLM" | "llama" => Some(Arch::Llama),
            "Qwen2ForCausalLM" | "qwen2" => Some(Arch::Qwen2),
            _ => None,
        }
    }

    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// llama.cpp's converter permutes Llama's q/k rows for ggml's adjacent-pair RoPE; Qwen2
    /// runs NeoX-style RoPE in llama.cpp and keeps HF's order.
    pub fn permutes_qk(self) -> bool {
        self == Arch::Llama
    }
}

/// Llama 3's RoPE frequency scaling, which GGUF stores as per-frequency factors
/// (`rope_freqs.weight`) rather than as parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

impl Llama3Rope {
    /// The factors convert_hf_to_gguf.py writes: 1 for high frequencies, `factor` for low
    /// ones, a smooth blend between.
    pub fn factors(&self, theta: f64, head_dim: usize) -> Vec<f32> {
        let low_wavelen = self.original_max_position_embeddings / self.low_freq_factor;
        let high_wavelen = self.original_max_position_embeddings / self.high_freq_factor;
        (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let f = if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    self.factor
                } else {
                    let smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    1.0 / ((1.0 - smooth) / self.factor + smooth)
                };
                f as f32
            })
            .collect()
    }

    /// Recovers the parameters from the factors, trying Llama 3's frequency factors (1, 4)
    /// with every power-of-two original context; None when nothing reproduces them.
    pub fn infer(factors: &[f32], theta: f64, head_dim: usize) -> Option<Self> {
        let factor = f64::from(factors.iter().copied().fold(f32::MIN, f32::max));
        (6..=20).map(|p| f64::from(1u32 << p)).find_map(|orig| {
            let candidate = Llama3Rope {
                factor,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: orig,
            };
            let ours = candidate.factors(theta, head_dim);
            let close = ours.len() == factors.len()
                && ours
                    .iter()
                    .zip(factors)
                    .all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0));
            close.then_some(candidate)
        })
    }

    pub fn to_json(&self) -> Json {
        json!({
            "rope_type": "llama3",
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        })
    }
}

/// The hyperparameters a conversion needs, whichever side they come from.
#[derive(Debug, Clone, PartialEq)]
pub struct Hparams {
    pub arch: Arch,
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
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear(f64),
    Llama3(Llama3Rope),
}

impl Hparams {
    /// `config.json` in the form transformers writes for these architectures.
    pub fn to_config_json(&self, torch_dtype: &str) -> Json {
        let mut c = json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.gguf_name(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "use_cache": true,
        });
        match &self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear(factor) => {
                c["rope_scaling"] = json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3(r) => c["rope_scaling"] = r.to_json(),
        }
        match self.arch {
            Arch::Llama => {
                c["attention_bias"] = json!(self.attention_bias);
                c["mlp_bias"] = json!(false);
            }
            Arch::Qwen2 => {
                c["use_sliding_window"] = json!(false);
                c["sliding_window"] = json!(self.max_position_embeddings);
                c["max_window_layers"] = json!(self.num_hidden_layers);
            }
        }
        c
    }
}

/// The config.json fields export reads (Qwen2 and Llama share them).
#[derive(Deserialize, Debug, Clone)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub model_type: Option<String>,
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
    pub rope_scaling: Option<Json>,
    /// transformers 5 moves rope_theta and the scaling dict here.
    pub rope_parameters: Option<Json>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    pub tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<Json>,
}

impl HfConfig {
    /// Resolved hyperparameters, or a message naming the unsupported field.
    pub fn hparams(&self) -> Result<Hparams, String> {
        let arch = Arch::from_hf(self).ok_or_else(|| {
            format!(
                "architecture {:?} is not supported (supported: LlamaForCausalLM, Qwen2ForCausalLM)",
                self.architectures
            )
        })?;
        if self.use_sliding_window {
            return Err("use_sliding_window=true is not supported".into());
        }
        if self.mlp_bias {
            return Err("mlp_bias=true is not supported by llama.cpp's llama architecture".into());
        }
        let params = self.rope_parameters.as_ref();
        let rope_theta = self
            .rope_theta
            .or_else(|| params?.get("rope_theta")?.as_f64())
            .unwrap_or(10_000.0);
        let scaling = self.rope_scaling.as_ref().or(params).filter(|v| !v.is_null());
        let rope_scaling = match scaling {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or(s.get("type"))
                    .and_then(Json::as_str)
                    .unwrap_or("default");
                let num = |k: &str| {
                    s.get(k)
                        .and_then(Json::as_f64)
                        .ok_or(format!("rope_scaling needs `{k}`"))
                };
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear(num("factor")?),
                    "llama3" => RopeScaling::Llama3(Llama3Rope {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?,
                    }),
                    other => {
                        return Err(format!(
                            "rope_scaling type `{other}` is not supported (default, linear, llama3)"
                        ));
                    }
                }
            }
        };
        let eos_token_id = match &self.eos_token_id {
            Some(Json::Array(ids)) => ids.first().and_then(Json::as_u64).map(|v| v as u32),
            Some(v) => v.as_u64().map(|v| v as u32),
            None => None,
        };
        let heads = self.num_attention_heads.max(1);
        Ok(Hparams {
            arch,
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
            rope_scaling,
            attention_bias: arch == Arch::Qwen2 || self.attention_bias,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            bos_token_id: self.bos_token_id,
            eos_token_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1's factors (convert_hf_to_gguf.py, theta 500000, head_dim 128) start at 1 for
    /// the fastest frequencies and end at 8 for the slowest; inference recovers the parameters.
    #[test]
    fn llama3_factors_round_trip_through_inference() {
        let rope = Llama3Rope {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let f = rope.factors(500_000.0, 128);
        assert_eq!(f.len(), 64);
        assert_eq!((f[0], f[63]), (1.0, 8.0));
        assert!(f.iter().any(|v| *v > 1.0 && *v < 8.0), "the blend band is empty");
        assert_eq!(Llama3Rope::infer(&f, 500_000.0, 128), Some(rope));
        let mut off = f.clone();
        off[40] *= 1.01;
        assert_eq!(Llama3Rope::infer(&off, 500_000.0, 128), None);
    }
}
