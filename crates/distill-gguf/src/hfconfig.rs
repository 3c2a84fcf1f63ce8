//! Model hyperparameters both ways: GGUF `{arch}.*` metadata to an HF `config.json` that
//! transformers and `distill_hf::DecoderConfig` read, and a config.json read by
//! `distill_hf::DecoderConfig` back to metadata.

use distill_hf::config::{Architecture, DecoderConfig, RopeScaling};
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

impl Llama3Rope {
    /// The parameters of an HF `rope_scaling` of type llama3, if it is one.
    pub fn from_hf(scaling: &RopeScaling) -> Option<Self> {
        match *scaling {
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => Some(Llama3Rope {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }),
            _ => None,
        }
    }

    pub fn to_hf(&self) -> RopeScaling {
        RopeScaling::Llama3 {
            factor: self.factor,
            low_freq_factor: self.low_freq_factor,
            high_freq_factor: self.high_freq_factor,
            original_max_position_embeddings: self.original_max_position_embeddings,
        }
    }
}

/// The hyperparameters a conversion needs, whichever side they come from: the decoder config
/// `distill_hf` resolves (the one representation of config.json) and llama.cpp's name for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Hparams {
    pub arch: Arch,
    pub config: DecoderConfig,
}

impl Hparams {
    /// A config.json read by `distill_hf`, or a message naming what llama.cpp cannot take.
    pub fn from_decoder(config: DecoderConfig) -> Result<Hparams, String> {
        if config.mlp_bias {
            return Err("mlp_bias=true is not supported by llama.cpp's llama architecture".into());
        }
        let arch = match config.architecture {
            Architecture::Llama => Arch::Llama,
            Architecture::Qwen2 => Arch::Qwen2,
        };
        Ok(Hparams { arch, config })
    }

    /// The one end-of-sequence id GGUF stores (the first of config.json's list).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.config.eos_token_ids.first().copied()
    }

    /// `config.json` in the form transformers writes for these architectures.
    pub fn to_config_json(&self, torch_dtype: &str) -> Json {
        let c = &self.config;
        let mut j = json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.gguf_name(),
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "tie_word_embeddings": c.tie_word_embeddings,
            "torch_dtype": torch_dtype,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": self.eos_token_id(),
            "use_cache": true,
        });
        match &c.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                j["rope_scaling"] = json!({"rope_type": "linear", "factor": factor})
            }
            llama3 @ RopeScaling::Llama3 { .. } => {
                j["rope_scaling"] = Llama3Rope::from_hf(llama3)
                    .map(|r| r.to_json())
                    .unwrap_or_default()
            }
        }
        match self.arch {
            Arch::Llama => {
                j["attention_bias"] = json!(c.qkv_bias);
                j["mlp_bias"] = json!(false);
            }
            Arch::Qwen2 => {
                j["use_sliding_window"] = json!(false);
                j["sliding_window"] = json!(c.max_position_embeddings);
                j["max_window_layers"] = json!(c.num_hidden_layers);
            }
        }
        j
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

    /// config.json -> distill_hf -> Hparams -> the config.json import writes -> distill_hf
    /// again gives the same decoder: the two directions agree on every field llama.cpp keeps.
    #[test]
    fn config_json_round_trips_through_hparams() {
        for model in ["tiny-qwen2", "tiny-llama"] {
            let original = DecoderConfig::from_dir(&crate::test_util::fixtures().join(model)).unwrap();
            let hp = Hparams::from_decoder(original.clone()).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("config.json");
            std::fs::write(&path, hp.to_config_json("float32").to_string()).unwrap();
            let again = DecoderConfig::from_file(&path).unwrap();
            let mut want = original.clone();
            want.torch_dtype = Some("float32".into());
            want.eos_token_ids.truncate(1);
            assert_eq!(again, want, "{model}");
        }
    }

    #[test]
    fn mlp_bias_is_refused_with_its_name() {
        let mut config = DecoderConfig::from_dir(&crate::test_util::fixtures().join("tiny-llama")).unwrap();
        config.mlp_bias = true;
        let err = Hparams::from_decoder(config).unwrap_err();
        assert!(err.contains("mlp_bias"), "{err}");
    }
}
