//! The decoder Qwen2 and Llama share, in HF order: Linear, RMSNorm, Rotary, MLP, Attention,
//! DecoderLayer, Model, CausalLm. Module field names equal HF tensor names, so
//! `model.layers.3.self_attn.q_proj.weight` is `self.model.layers[3].self_attn.q_proj.weight`.
//! All heavy math goes through [`Kernels`].

use burn::module::{Module, Param};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Distribution, Int, Tensor, TensorData};

use crate::config::{DecoderConfig, RopeScaling};
use crate::ops::Kernels;

/// A linear layer in burn's layout: weight [in, out] (HF stores [out, in]; the loader transposes).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Kernels> Linear<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        <B as Kernels>::linear(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()))
    }

    fn init(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        Linear {
            weight: Param::from_tensor(random([d_in, d_out], device)),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
        }
    }
}

#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub eps: f64,
}

impl<B: Kernels> RmsNorm<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        <B as Kernels>::rms_norm(x, self.weight.val(), self.eps)
    }

    fn init(size: usize, eps: f64, device: &B::Device) -> Self {
        RmsNorm {
            weight: Param::from_tensor(Tensor::ones([size], device)),
            eps,
        }
    }
}

/// HF's rotate_half RoPE (not burn's interleaved `RotaryEncoding`). The angle tables are made
/// on the host for just the positions in use, in f32 as transformers does.
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Vec<f32>,
}

impl Rotary {
    pub fn new(config: &DecoderConfig) -> Self {
        let dim = config.head_dim;
        let base = config.rope_theta as f32;
        let inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
            .collect();
        let inv_freq = match config.rope_scaling {
            RopeScaling::None => inv_freq,
            RopeScaling::Linear { factor } => inv_freq.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => llama3_inv_freq(
                &inv_freq,
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                old_len as f32,
            ),
        };
        Rotary { inv_freq }
    }

    /// cos and sin tables for `positions`, each [positions.len(), head_dim] (both halves equal).
    pub fn tables<B: Backend>(
        &self,
        positions: impl Iterator<Item = usize>,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        let mut rows = 0;
        for p in positions {
            for _half in 0..2 {
                for f in &self.inv_freq {
                    let angle = p as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
            rows += 1;
        }
        let shape = [rows, 2 * half];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }

    /// x: [B, H, T, hd], cos/sin: [T, hd] -> [B, H, T, hd].
    pub fn apply<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 4> {
        let half = x.dims()[3] / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let cos = cos.clone().unsqueeze::<4>().cast(x.dtype());
        let sin = sin.clone().unsqueeze::<4>().cast(x.dtype());
        x * cos + rotated * sin
    }
}

/// transformers' `_compute_llama3_parameters`: long wavelengths are divided by `factor`,
/// short ones kept, the band between interpolated smoothly.
fn llama3_inv_freq(inv_freq: &[f32], factor: f32, low: f32, high: f32, old_len: f32) -> Vec<f32> {
    let low_freq_wavelen = old_len / low;
    let high_freq_wavelen = old_len / high;
    inv_freq
        .iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen < high_freq_wavelen {
                f
            } else if wavelen > low_freq_wavelen {
                f / factor
            } else {
                let smooth = (old_len / wavelen - low) / (high - low);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect()
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Kernels> Mlp<B> {
    /// SwiGLU. x: [B, T, C] -> [B, T, C].
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = silu(self.gate_proj.forward(x.clone())); // [B, T, I]
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

/// Keys and values of past positions, per layer: [B, n_kv_heads, S, hd] each.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's k/v for `layer` and returns the full history.
    fn append(&mut self, layer: usize, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (k, v) = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        (k, v)
    }
}

/// What every layer of one forward call shares: rotary tables and the attention mask.
struct Step<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    /// [T, S] with true = masked; None when every query may see every key.
    mask: Option<Tensor<B, 2, Bool>>,
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
}

impl<B: Kernels> Attention<B> {
    /// x: [B, T, C] -> [B, T, C].
    fn forward(
        &self,
        x: Tensor<B, 3>,
        step: &Step<B>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let heads = |y: Tensor<B, 3>, n: usize| y.reshape([b, t, n, self.head_dim]).swap_dims(1, 2);
        let q = heads(self.q_proj.forward(x.clone()), self.num_heads); // [B, H, T, hd]
        let k = heads(self.k_proj.forward(x.clone()), self.num_kv_heads); // [B, KV, T, hd]
        let v = heads(self.v_proj.forward(x), self.num_kv_heads);
        let q = Rotary::apply(q, &step.cos, &step.sin);
        let k = Rotary::apply(k, &step.cos, &step.sin);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v), // [B, KV, S, hd]
            None => (k, v),
        };
        let s = k.dims()[2];
        let k = self.repeat_kv(k);
        let v = self.repeat_kv(v);
        let mask = step
            .mask
            .clone()
            .map(|m| m.unsqueeze::<4>().expand([b, self.num_heads, t, s]));
        let y = <B as Kernels>::attention(q, k, v, mask); // [B, H, T, hd]
        let y = y.swap_dims(1, 2).reshape([b, t, self.num_heads * self.head_dim]);
        self.o_proj.forward(y)
    }

    /// [B, KV, S, hd] -> [B, H, S, hd], each KV head serving H/KV query heads in turn (as HF).
    fn repeat_kv(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let groups = self.num_heads / self.num_kv_heads;
        if groups == 1 {
            return x;
        }
        let [b, kv, s, hd] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .expand([b, kv, groups, s, hd])
            .reshape([b, kv * groups, s, hd])
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Kernels> DecoderLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        step: &Step<B>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), step, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

#[derive(Module, Debug)]
pub struct Model<B: Backend> {
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

/// A decoder-only causal LM: `Qwen2ForCausalLM` or `LlamaForCausalLM`.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub model: Model<B>,
    /// None when the head is tied to `model.embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub config: DecoderConfig,
    #[module(skip)]
    pub rotary: Rotary,
}

impl<B: Kernels> CausalLm<B> {
    /// Random weights (N(0, 0.02), norms 1, biases 0): for benchmarks at real shapes.
    pub fn init(config: &DecoderConfig, device: &B::Device) -> Self {
        let c = config;
        let (h, q, kv) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let layers = (0..c.num_hidden_layers)
            .map(|_| DecoderLayer {
                self_attn: Attention {
                    q_proj: Linear::init(h, q, c.qkv_bias, device),
                    k_proj: Linear::init(h, kv, c.qkv_bias, device),
                    v_proj: Linear::init(h, kv, c.qkv_bias, device),
                    o_proj: Linear::init(q, h, c.o_bias, device),
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                },
                mlp: Mlp {
                    gate_proj: Linear::init(h, c.intermediate_size, c.mlp_bias, device),
                    up_proj: Linear::init(h, c.intermediate_size, c.mlp_bias, device),
                    down_proj: Linear::init(c.intermediate_size, h, c.mlp_bias, device),
                },
                input_layernorm: RmsNorm::init(h, c.rms_norm_eps, device),
                post_attention_layernorm: RmsNorm::init(h, c.rms_norm_eps, device),
            })
            .collect();
        CausalLm {
            model: Model {
                embed_tokens: Param::from_tensor(random([c.vocab_size, h], device)),
                layers,
                norm: RmsNorm::init(h, c.rms_norm_eps, device),
            },
            lm_head: (!c.tie_word_embeddings).then(|| Linear::init(h, c.vocab_size, false, device)),
            config: config.clone(),
            rotary: Rotary::new(config),
        }
    }

    /// Full-sequence causal forward: logits for every position. input_ids: [B, T] -> [B, T, V].
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.logits(self.hidden_states(input_ids, None))
    }

    /// Incremental forward: `input_ids` [B, T] continue the sequence held in `cache`, which is
    /// extended in place. Returns logits [B, T, V] for the new positions.
    pub fn forward_cached(&self, input_ids: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        self.logits(self.hidden_states(input_ids, Some(cache)))
    }

    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.config.num_hidden_layers)
    }

    /// Final-norm hidden states [B, T, C]; losses that chunk over the vocabulary start here.
    pub fn hidden_states(
        &self,
        input_ids: Tensor<B, 2, Int>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let device = input_ids.device();
        let t = input_ids.dims()[1];
        let past = cache.as_ref().map_or(0, |c| c.len());
        let (cos, sin) = self.rotary.tables::<B>(past..past + t, &device);
        let step = Step {
            cos,
            sin,
            mask: causal_mask::<B>(t, past, &device),
        };
        let mut x = burn::tensor::module::embedding(self.model.embed_tokens.val(), input_ids); // [B, T, C]
        for (i, layer) in self.model.layers.iter().enumerate() {
            x = layer.forward(x, &step, cache.as_deref_mut().map(|c| (c, i)));
        }
        self.model.norm.forward(x)
    }

    /// hidden: [B, T, C] -> logits [B, T, V].
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => <B as Kernels>::linear(hidden, self.model.embed_tokens.val().transpose(), None),
        }
    }
}

/// [T, past + T] with true where key j lies after query i (at absolute position past + i).
/// None for a single query, which may see every cached key.
fn causal_mask<B: Backend>(t: usize, past: usize, device: &B::Device) -> Option<Tensor<B, 2, Bool>> {
    if t == 1 {
        return None;
    }
    let s = past + t;
    let data: Vec<bool> = (0..t).flat_map(|i| (0..s).map(move |j| j > past + i)).collect();
    Some(Tensor::from_data(TensorData::new(data, [t, s]), device))
}

fn random<B: Backend, const D: usize>(shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 0.02), device)
}
