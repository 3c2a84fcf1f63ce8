//! Builds a [`CausalLm`] from a Hugging Face model directory.

use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use distill_core::recipe::BaseQuant;
use distill_hf::config::DecoderConfig;
use distill_hf::error::Result;
use distill_kernels::Kernels;

use crate::transformer::{
    Attention, CausalLm, DecoderLayer, Embedding, Linear, Mlp, Model, RmsNorm, Rotary, Weight,
};
use distill_hf::weights::{Checkpoint, HostTensor};
use distill_kernels::nf4::Nf4;

/// Reads tensors by HF name onto a device; names and shapes were checked up front.
struct Reader<'a, B: Backend> {
    ckpt: &'a Checkpoint,
    device: &'a B::Device,
    /// How the decoder layers' linear weights are held (the LM head stays dense).
    quantize: BaseQuant,
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

    fn linear(&self, prefix: &str, bias: bool, quantize: BaseQuant) -> Result<Linear<B>> {
        let weight = self.host(&format!("{prefix}.weight"))?;
        let weight = match quantize {
            BaseQuant::None => Weight::Dense(Param::from_tensor(self.tensor(weight.transposed()))),
            // Quantized from the checkpoint's values, one tensor at a time: the dense model
            // never exists on the device.
            BaseQuant::Nf4 => {
                let [out, inp] = [weight.shape[0], weight.shape[1]];
                Weight::Nf4(Nf4::quantize(&weight.data, [out, inp], self.device))
            }
        };
        Ok(Linear {
            weight,
            bias: if bias {
                Some(self.vector(&format!("{prefix}.bias"))?)
            } else {
                None
            },
            lora: None,
        })
    }

    /// A decoder layer's linear layer, stored as the load asked.
    fn layer_linear(&self, prefix: &str, bias: bool) -> Result<Linear<B>> {
        self.linear(prefix, bias, self.quantize)
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
        Self::load_with(dir, device, BaseQuant::None)
    }

    /// [`CausalLm::load`] with the decoder layers' linear weights held as `quantize` says
    /// (NF4 for a QLoRA run); embeddings, norms, biases and the LM head stay dense.
    pub fn load_with(dir: &Path, device: &B::Device, quantize: BaseQuant) -> Result<Self> {
        let config = DecoderConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        ckpt.check(&config.expected_tensors(), config.architecture.hf_name())?;
        Self::from_checkpoint_with(config, &ckpt, device, quantize)
    }

    pub fn from_checkpoint(config: DecoderConfig, ckpt: &Checkpoint, device: &B::Device) -> Result<Self> {
        Self::from_checkpoint_with(config, ckpt, device, BaseQuant::None)
    }

    fn from_checkpoint_with(
        config: DecoderConfig,
        ckpt: &Checkpoint,
        device: &B::Device,
        quantize: BaseQuant,
    ) -> Result<Self> {
        let c = &config;
        let r = Reader::<B> {
            ckpt,
            device,
            quantize,
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(DecoderLayer {
                self_attn: Attention {
                    q_proj: r.layer_linear(&format!("{p}.self_attn.q_proj"), c.qkv_bias)?,
                    k_proj: r.layer_linear(&format!("{p}.self_attn.k_proj"), c.qkv_bias)?,
                    v_proj: r.layer_linear(&format!("{p}.self_attn.v_proj"), c.qkv_bias)?,
                    o_proj: r.layer_linear(&format!("{p}.self_attn.o_proj"), c.o_bias)?,
                    qkv: None,
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                },
                mlp: Mlp {
                    gate_proj: r.layer_linear(&format!("{p}.mlp.gate_proj"), c.mlp_bias)?,
                    up_proj: r.layer_linear(&format!("{p}.mlp.up_proj"), c.mlp_bias)?,
                    down_proj: r.layer_linear(&format!("{p}.mlp.down_proj"), c.mlp_bias)?,
                    gate_up: None,
                },
                input_layernorm: r.norm(&format!("{p}.input_layernorm.weight"), c.rms_norm_eps)?,
                post_attention_layernorm: r
                    .norm(&format!("{p}.post_attention_layernorm.weight"), c.rms_norm_eps)?,
            });
        }
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(r.linear("lm_head", false, BaseQuant::None)?)
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
