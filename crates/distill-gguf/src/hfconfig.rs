//! Model hyperparameters both ways: GGUF `{arch}.*` metadata to an HF `config.json` that
//! transformers and `distill_hf::DecoderConfig` read, and a config.json read by
//! `distill_hf::DecoderConfig` back to metadata.

use distill_hf::config::{Architecture, DecoderConfig, RopeScaling as HfRope};
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

impl Hparams {
    /// The hyperparameters of a config.json that `distill_hf` has read (the one parser of
    /// config.json), or a message naming what llama.cpp cannot take.
    pub fn from_decoder(config: &DecoderConfig) -> Result<Hparams, String> {
        let arch = match config.architecture {
            Architecture::Llama => Arch::Llama,
            Architecture::Qwen2 => Arch::Qwen2,
        };
        if config.mlp_bias {
            return Err("mlp_bias=true is not supported by llama.cpp's llama architecture".into());
        }
        let rope_scaling = match config.rope_scaling {
            HfRope::None => RopeScaling::None,
            HfRope::Linear { factor } => RopeScaling::Linear(factor),
            HfRope::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => RopeScaling::Llama3(Llama3Rope {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }),
        };
        Ok(Hparams {
            arch,
            vocab_size: config.vocab_size,
            hidden_size: config.hidden_size,
            intermediate_size: config.intermediate_size,
            num_hidden_layers: config.num_hidden_layers,
            num_attention_heads: config.num_attention_heads,
            num_key_value_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            max_position_embeddings: config.max_position_embeddings,
            rms_norm_eps: config.rms_norm_eps,
            rope_theta: config.rope_theta,
            rope_scaling,
            // Qwen2 always has q/k/v biases; Llama's attention_bias sets them (and o_proj's).
            attention_bias: config.qkv_bias,
            tie_word_embeddings: config.tie_word_embeddings,
            bos_token_id: config.bos_token_id,
            eos_token_id: config.eos_token_ids.first().copied(),
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
