//! Builds a [`CausalLm`] from a Hugging Face model directory.

use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::config::DecoderConfig;
use crate::error::Result;
use crate::ops::Kernels;
use crate::transformer::{Attention, CausalLm, DecoderLayer, Embedding, Linear, Mlp, Model, RmsNorm, Rotary};
use crate::weights::{Checkpoint, HostTensor};

/// Reads tensors by HF name onto a device; names and shapes were checked up front.
struct Reader<'a, B: Backend> {
    ckpt: &'a Checkpoint,
    device: &'a B::Device,
}

impl<B: Backend> Reader<'_, B> {
    fn host(&self, name: &str) -> Result<HostTensor> {
        self.ckpt.read_f32(name)
    }

    fn tensor<const D: usize>(&self, t: HostTensor) -> Tensor<B, D> {
        Tensor::from_data(TensorData::new(t.data, t.shape), self.device)
    }

    fn vector(&self, name: &str) -> Result<Param<Tensor<B, 1>>> {
        Ok(Param::from_tensor(self.tensor(self.host(name)?)))
    }

    fn matrix(&self, name: &str) -> Result<Param<Tensor<B, 2>>> {
        Ok(Param::from_tensor(self.tensor(self.host(name)?)))
    }

    fn linear(&self, prefix: &str, bias: bool) -> Result<Linear<B>> {
        let weight = self.host(&format!("{prefix}.weight"))?.transposed();
        Ok(Linear {
            weight: Param::from_tensor(self.tensor(weight)),
            bias: if bias {
                Some(self.vector(&format!("{prefix}.bias"))?)
            } else {
                None
            },
            lora: None,
        })
    }

    fn norm(&self, name: &str, eps: f64) -> Result<RmsNorm<B>> {
        Ok(RmsNorm {
            weight: self.vector(name)?,
            eps,
        })
    }
}

impl<B: Kernels> CausalLm<B> {
    /// Loads config.json and the safetensors weights of `dir`. Every tensor the config implies
    /// must be present with its shape, and no other may be, before any is read.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let config = DecoderConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        ckpt.check(&config.expected_tensors(), config.architecture.hf_name())?;
        Self::from_checkpoint(config, &ckpt, device)
    }

    pub fn from_checkpoint(config: DecoderConfig, ckpt: &Checkpoint, device: &B::Device) -> Result<Self> {
        let c = &config;
        let r = Reader::<B> { ckpt, device };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(DecoderLayer {
                self_attn: Attention {
                    q_proj: r.linear(&format!("{p}.self_attn.q_proj"), c.qkv_bias)?,
                    k_proj: r.linear(&format!("{p}.self_attn.k_proj"), c.qkv_bias)?,
                    v_proj: r.linear(&format!("{p}.self_attn.v_proj"), c.qkv_bias)?,
                    o_proj: r.linear(&format!("{p}.self_attn.o_proj"), c.o_bias)?,
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                },
                mlp: Mlp {
                    gate_proj: r.linear(&format!("{p}.mlp.gate_proj"), c.mlp_bias)?,
                    up_proj: r.linear(&format!("{p}.mlp.up_proj"), c.mlp_bias)?,
                    down_proj: r.linear(&format!("{p}.mlp.down_proj"), c.mlp_bias)?,
                },
                input_layernorm: r.norm(&format!("{p}.input_layernorm.weight"), c.rms_norm_eps)?,
                post_attention_layernorm: r
                    .norm(&format!("{p}.post_attention_layernorm.weight"), c.rms_norm_eps)?,
            });
        }
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(r.linear("lm_head", false)?)
        };
        Ok(CausalLm {
            model: Model {
                embed_tokens: Embedding {
                    weight: r.matrix("model.embed_tokens.weight")?,
                },
                layers,
                norm: r.norm("model.norm.weight", c.rms_norm_eps)?,
            },
            lm_head,
            rotary: Rotary::new(c),
            config,
        })
    }
}
