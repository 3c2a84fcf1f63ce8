//! The decoder Qwen2 and Llama share, in HF order: Linear, RMSNorm, Rotary, MLP, Attention,
//! DecoderLayer, Model, CausalLm. Module field names equal HF tensor names, so
//! `model.layers.3.self_attn.q_proj.weight` is `self.model.layers[3].self_attn.q_proj.weight`.
//! All heavy math goes through [`Kernels`].

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};

use distill_core::recipe::BaseQuant;
use distill_hf::config::{DecoderConfig, RopeScaling};

use crate::paged::{PagedKv, PagedStep};
use distill_kernels::cast_to;
use distill_kernels::nf4::Nf4;
use distill_kernels::{
    DecodeInputs, DecodeLayer, DecodeWeights, Kernels, KeyRanges, LinearWeight, ModelKernels, NormInput,
    Normed, Projection, StepState, add_bias,
};

/// A linear layer with an optional LoRA adapter.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Weight<B>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub lora: Option<Lora<B>>,
}

/// A linear layer's weight: dense in burn's layout [in, out] (HF stores [out, in]; the loader
/// transposes), or NF4 in HF's layout, for a QLoRA run's frozen base ([`Nf4`]). Parameter
/// names leave the variant out (`q_proj.weight`, `q_proj.weight.codes`).
#[derive(Module, Debug)]
pub enum Weight<B: Backend> {
    Dense(Param<Tensor<B, 2>>),
    Nf4(Nf4<B>),
}

impl<B: Backend> Weight<B> {
    /// [in, out] either way.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Weight::Dense(w) => w.dims(),
            Weight::Nf4(w) => w.dims(),
        }
    }

    /// The dense weight; None when quantized.
    pub fn dense(&self) -> Option<&Param<Tensor<B, 2>>> {
        match self {
            Weight::Dense(w) => Some(w),
            Weight::Nf4(_) => None,
        }
    }
}

/// LoRA: y += scale * (x A) B, never forming W + A B. A: [in, r], B: [r, out] (PEFT's
/// lora_A.weight and lora_B.weight, transposed like every weight here).
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    pub lora_a: Param<Tensor<B, 2>>,
    pub lora_b: Param<Tensor<B, 2>>,
    #[module(skip)]
    pub scale: f64,
    #[module(skip)]
    pub dropout: f64,
}

impl<B: Kernels> Linear<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let y = self.weight_for(dtype).linear(x.clone(), self.bias_for(dtype));
        match &self.lora {
            None => y,
            Some(lora) => {
                let x = if lora.drops(&x.device()) {
                    let keep = x.random_like(Distribution::Bernoulli(1.0 - lora.dropout));
                    (x * keep).div_scalar(1.0 - lora.dropout)
                } else {
                    x
                };
                let (a, b) = lora.pair(dtype);
                let delta = <B as ModelKernels>::linear(<B as ModelKernels>::linear(x, a, None), b, None); // [.., out]
                y + delta
            }
        }
    }

    /// `forward(x.out)` for an RMSNorm's output: with an f32 master weight and no adapter,
    /// [`ModelKernels::linear_master_normed`](distill_kernels::ModelKernels::linear_master_normed), which keeps the norm's input for dW, not x.
    pub fn forward_normed(&self, x: &Normed<B>) -> Tensor<B, 3> {
        let dtype = x.out.dtype();
        match (self.weight_for(dtype), &self.lora) {
            (LinearWeight::Master(w), None) => add_bias(
                <B as ModelKernels>::linear_master_normed(x, w),
                self.bias_for(dtype),
            ),
            _ => self.forward(x.out.clone()),
        }
    }

    /// `forward(swiglu(gate, up))` through [`ModelKernels::swiglu_linear`](distill_kernels::ModelKernels::swiglu_linear), so that training keeps
    /// gate and up but not their product. gate, up: [B, T, in] -> [B, T, out].
    pub fn forward_swiglu(&self, gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
        let dtype = gate.dtype();
        if self.lora.as_ref().is_some_and(|l| l.drops(&gate.device())) {
            // The adapter sees a dropped-out h, the base GEMM the whole: two inputs, not one.
            return self.forward(<B as ModelKernels>::swiglu(gate, up));
        }
        let lora = self.lora.as_ref().map(|l| l.pair(dtype));
        let y = <B as ModelKernels>::swiglu_linear(gate, up, self.weight_for(dtype), lora);
        add_bias(y, self.bias_for(dtype))
    }

    /// `residual + forward(x)`, added in the GEMM ([`ModelKernels::linear_residual`]) for a
    /// dense weight in x's dtype with no bias or adapter (the decoding copy's).
    pub fn forward_residual(&self, residual: Tensor<B, 3>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match (&self.weight, &self.bias, &self.lora) {
            (Weight::Dense(w), None, None) if w.val().dtype() == x.dtype() => {
                <B as ModelKernels>::linear_residual(residual, x, w.val())
            }
            _ => residual + self.forward(x),
        }
    }

    /// The bias, if any, in the activations' dtype.
    fn bias_for(&self, dtype: burn::tensor::DType) -> Option<Tensor<B, 1>> {
        self.bias.as_ref().map(|b| cast_to(b.val(), dtype))
    }

    /// This layer as decoding reads it under activations of `dtype`: a dense weight and the
    /// bias in that dtype. When `merge`, an adapter is merged into the weight and an NF4
    /// weight is dequantized (with its adapter merged in), so a token costs one GEMM; else
    /// the adapter's pair is in that dtype with its scale folded into A (dropout off).
    /// Tensors already so are shared, not copied.
    fn for_decoding(&self, dtype: burn::tensor::DType, merge: bool) -> Self {
        let bias = self.bias.as_ref().map(|b| cast_param(b, dtype));
        if let Some(dense) = merge.then(|| self.merged_f32()).flatten() {
            return Linear {
                weight: Weight::Dense(Param::from_tensor(cast_to(dense, dtype))),
                bias,
                lora: None,
            };
        }
        let weight = match &self.weight {
            Weight::Dense(w) => Weight::Dense(cast_param(w, dtype)),
            Weight::Nf4(w) => Weight::Nf4(w.clone()),
        };
        let lora = self.lora.as_ref().map(|l| {
            let (a, b) = l.pair(dtype);
            Lora {
                lora_a: Param::from_tensor(a),
                lora_b: Param::from_tensor(b),
                scale: 1.0,
                dropout: 0.0,
            }
        });
        Linear { weight, bias, lora }
    }

    /// Whether the decoding copy has something to merge here: an adapter, or an NF4 weight.
    fn merges(&self) -> bool {
        self.lora.is_some() || matches!(self.weight, Weight::Nf4(_))
    }

    /// W + scale·A·B in f32, [in, out], rounded once to the decoding dtype by the caller; an
    /// NF4 W dequantized. None when there is nothing to merge ([`Linear::merges`]).
    fn merged_f32(&self) -> Option<Tensor<B, 2>> {
        if !self.merges() {
            return None;
        }
        let f32 = burn::tensor::DType::F32;
        let w = match &self.weight {
            Weight::Dense(w) => cast_to(w.val(), f32),
            Weight::Nf4(w) => <B as ModelKernels>::nf4_dequantize(&w.tensor(), f32).transpose(),
        };
        Some(match &self.lora {
            Some(lora) => {
                let (a, b) = lora.pair(f32);
                w + a.matmul(b)
            }
            None => w,
        })
    }

    /// Bytes of the dense weight a merge makes in `dtype` ([`Linear::merged_f32`]).
    fn merged_bytes(&self, dtype: burn::tensor::DType) -> usize {
        if self.merges() { self.dense_bytes(dtype) } else { 0 }
    }

    /// Bytes of this layer's weight, dense in `dtype`.
    fn dense_bytes(&self, dtype: burn::tensor::DType) -> usize {
        self.weight.dims().iter().product::<usize>() * dtype.size()
    }

    /// The weight as the kernels take it, for activations of `dtype`.
    fn weight_for(&self, dtype: burn::tensor::DType) -> LinearWeight<B> {
        match &self.weight {
            Weight::Dense(w) => match w.val() {
                w if w.dtype() == dtype => LinearWeight::Dense(w),
                w => LinearWeight::Master(w),
            },
            Weight::Nf4(w) => LinearWeight::Nf4(w.tensor()),
        }
    }

    fn init(d_in: usize, d_out: usize, bias: bool, quantize: BaseQuant, device: &B::Device) -> Self {
        let weight = match quantize {
            BaseQuant::None => Weight::Dense(Param::from_tensor(random([d_in, d_out], device))),
            // Drawn on the device, quantized on the host: one layer's dense weight at a time.
            BaseQuant::Nf4 => {
                let w = random::<B, 2>([d_out, d_in], device).into_data().convert::<f32>();
                let w = w.into_vec::<f32>().expect("f32 values");
                Weight::Nf4(Nf4::quantize(&w, [d_out, d_in], device))
            }
        };
        Linear {
            weight,
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
            lora: None,
        }
    }
}

impl<B: Backend> Lora<B> {
    /// Whether dropout applies: a rate, and training, i.e. an autodiff backend.
    fn drops(&self, device: &B::Device) -> bool {
        self.dropout > 0.0 && B::ad_enabled(device)
    }

    /// (A, B) in `dtype`, the scale on A [in, r]: on the delta [.., out] it was a pass over
    /// the activations in the forward and another in the backward, for every adapted layer.
    fn pair(&self, dtype: burn::tensor::DType) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let a = match self.scale {
            1.0 => self.lora_a.val(),
            scale => self.lora_a.val().mul_scalar(scale),
        };
        (cast_to(a, dtype), cast_to(self.lora_b.val(), dtype))
    }
}

/// Linear layers that read one input, as one GEMM: their weights side by side [in, Σ out]
/// and their biases likewise (zeros for a part without). Each part's output is a column view
/// of the GEMM's output ([`ModelKernels::columns`]), so q, k and v (or gate and up) cost one
/// launch and one bias add instead of one of each per part. Only the decoding copy has these.
#[derive(Module, Debug)]
pub struct Fused<B: Backend> {
    pub weight: Tensor<B, 2>,
    pub bias: Option<Tensor<B, 1>>,
    /// Each part's output width, in order.
    #[module(skip)]
    pub widths: Vec<usize>,
}

impl<B: Kernels> Fused<B> {
    /// The parts side by side, and the parts again as views of the fused weight and bias (so
    /// that the copy holds each weight once). None unless every part is a dense weight
    /// without an adapter, all in one dtype.
    fn of<const N: usize>(parts: &[Linear<B>; N]) -> Option<(Self, [Linear<B>; N])> {
        let weights: Vec<Tensor<B, 2>> = parts
            .iter()
            .map(|p| match (&p.weight, &p.lora) {
                (Weight::Dense(w), None) => Some(w.val()),
                _ => None,
            })
            .collect::<Option<_>>()?;
        let dtype = weights[0].dtype();
        if weights.iter().any(|w| w.dtype() != dtype) {
            return None;
        }
        let widths: Vec<usize> = weights.iter().map(|w| w.dims()[1]).collect();
        let bias = parts.iter().any(|p| p.bias.is_some()).then(|| {
            let device = weights[0].device();
            let biases = parts
                .iter()
                .zip(&widths)
                .map(|(p, &n)| match &p.bias {
                    Some(b) => cast_to(b.val(), dtype),
                    None => Tensor::<B, 1>::zeros([n], &device).cast(dtype),
                })
                .collect();
            Tensor::cat(biases, 0)
        });
        let fused = Fused {
            weight: Tensor::cat(weights, 1),
            bias,
            widths,
        };
        let views = std::array::from_fn(|i| {
            let (start, n) = (fused.start(i), fused.widths[i]);
            let view = <B as ModelKernels>::columns(fused.weight.clone(), start, n);
            Linear {
                weight: Weight::Dense(Param::from_tensor(view)),
                bias: parts[i]
                    .bias
                    .as_ref()
                    .and(fused.bias.as_ref())
                    .map(|b| Param::from_tensor(<B as ModelKernels>::columns(b.clone(), start, n))),
                lora: None,
            }
        });
        Some((fused, views))
    }

    /// x [B, T, in] -> the GEMM's output [B, T, Σ out], bias not added.
    fn project(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        <B as ModelKernels>::linear(x, self.weight.clone(), None)
    }

    /// x [B, T, in] -> each of the N parts' output [B, T, out_i], views of one GEMM's output.
    fn forward<const N: usize>(&self, x: Tensor<B, 3>) -> [Tensor<B, 3>; N] {
        debug_assert_eq!(N, self.widths.len());
        let y = <B as ModelKernels>::linear(x, self.weight.clone(), self.bias.clone()); // [B, T, Σ out]
        std::array::from_fn(|i| <B as ModelKernels>::columns(y.clone(), self.start(i), self.widths[i]))
    }

    /// Where part i's columns start.
    fn start(&self, i: usize) -> usize {
        self.widths[..i].iter().sum()
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
        self.forward_normed(x).out
    }

    /// [`RmsNorm::forward`] with its input beside the output, for linear layers that read it
    /// ([`Linear::forward_normed`]).
    pub fn forward_normed(&self, x: Tensor<B, 3>) -> Normed<B> {
        // The weight in the activations' dtype: an f32 master weight times bf16 activations
        // is a mixed-dtype kernel, which burn-cuda does not convert (NaN on the H100).
        let weight = cast_to(self.weight.val(), x.dtype());
        NormInput {
            x,
            weight,
            eps: self.eps,
        }
        .normed()
    }

    /// This norm with its weight in `dtype`, for the decoding copy.
    fn for_decoding(&self, dtype: burn::tensor::DType) -> Self {
        RmsNorm {
            weight: cast_param(&self.weight, dtype),
            eps: self.eps,
        }
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

    /// cos and sin tables for one position list per row, each [R, T, hd] (both halves equal).
    pub fn tables<B: Backend>(
        &self,
        positions: &[Vec<usize>],
        device: &B::Device,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let t = positions.first().map_or(0, Vec::len);
        assert!(positions.iter().all(|p| p.len() == t), "ragged position rows");
        let hd = 2 * self.inv_freq.len();
        let push_row = |p: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>| {
            for _half in 0..2 {
                for f in &self.inv_freq {
                    let angle = p as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        };
        let n = positions.len() * t;
        let (mut cos, mut sin) = (Vec::with_capacity(n * hd), Vec::with_capacity(n * hd));
        let end = positions.iter().flatten().copied().max().map_or(0, |m| m + 1);
        if end > n {
            // Few tokens at far positions (a decode step): per token.
            for &p in positions.iter().flatten() {
                push_row(p, &mut cos, &mut sin);
            }
        } else {
            // A row per position, copied per token: packed training rows repeat positions
            // across documents, and sin/cos per token took tens of ms of host time a step.
            let (mut cos_of, mut sin_of) = (Vec::with_capacity(end * hd), Vec::with_capacity(end * hd));
            for p in 0..end {
                push_row(p, &mut cos_of, &mut sin_of);
            }
            for &p in positions.iter().flatten() {
                cos.extend_from_slice(&cos_of[p * hd..(p + 1) * hd]);
                sin.extend_from_slice(&sin_of[p * hd..(p + 1) * hd]);
            }
        }
        let shape = [positions.len(), t, hd];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
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
    /// gate and up as one GEMM, in the decoding copy ([`Fused`]); None elsewhere.
    #[module(skip)]
    pub gate_up: Option<Fused<B>>,
}

impl<B: Kernels> Mlp<B> {
    /// SwiGLU. x: the post-attention norm's output [B, T, C] -> [B, T, C].
    pub fn forward(&self, x: &Normed<B>) -> Tensor<B, 3> {
        let gate = self.gate_proj.forward_normed(x); // [B, T, I]
        let up = self.up_proj.forward_normed(x);
        self.down_proj.forward_swiglu(gate, up)
    }

    /// `h + forward(x)` for x, the norm of h, taken whole so that it is gone before the
    /// add: in the decoding copy the add then writes into h's buffer
    /// ([`Linear::forward_residual`]).
    fn forward_residual(&self, h: Tensor<B, 3>, x: Normed<B>) -> Tensor<B, 3> {
        match &self.gate_up {
            Some(gate_up) => {
                let Normed { out, input } = x;
                drop(input);
                let [gate, up] = gate_up.forward(out); // [B, T, I] each
                self.down_proj
                    .forward_residual(h, <B as ModelKernels>::swiglu(gate, up))
            }
            None => h + self.forward(&x),
        }
    }
}

/// Where a forward call keeps its keys and values: a contiguous cache (a prefill, one
/// sequence's steps), or the running batch's pages during a decoding step op by op.
pub enum CacheRef<'a, B: Backend> {
    Contiguous(&'a mut KvCache<B>),
    Paged(&'a mut PagedStep<B>),
}

impl<B: Backend> CacheRef<'_, B> {
    fn reborrow(&mut self) -> CacheRef<'_, B> {
        match self {
            CacheRef::Contiguous(c) => CacheRef::Contiguous(c),
            CacheRef::Paged(p) => CacheRef::Paged(p),
        }
    }
}

/// Keys and values of the positions computed so far, per layer: [B, KV, cap, hd] buffers of
/// which the first `len` positions are filled. A forward call writes its positions in place
/// and attention reads a view of the filled part, so a token costs no copy of the history;
/// buffers grow by doubling. (Growing by concatenation copied the whole cache at every token
/// of every layer: O(S²) traffic over a long generation.) A prefill's cache; batched
/// decoding keeps its rows in a [`PagedKv`].
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerCache<B>>>,
}

#[derive(Debug, Clone)]
struct LayerCache<B: Backend> {
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    len: usize,
}

/// Positions a new buffer has room for beyond what it holds: new buffers round up to this.
const CACHE_BLOCK: usize = 256;

impl<B: ModelKernels> LayerCache<B> {
    fn capacity(&self) -> usize {
        self.k.dims()[2]
    }

    /// The filled part, as views of the buffers (never a copy: [`ModelKernels::prefix`]).
    fn filled(&self) -> (Tensor<B, 4>, Tensor<B, 4>) {
        (
            B::prefix(self.k.clone(), 2, self.len),
            B::prefix(self.v.clone(), 2, self.len),
        )
    }

    /// A cache holding `k`, `v` [B, KV, S, hd] with room for `cap` >= S positions.
    fn holding(k: Tensor<B, 4>, v: Tensor<B, 4>, cap: usize) -> Self {
        let [b, h, s, d] = k.dims();
        let (k, v) = if cap == s {
            (k, v)
        } else {
            let buffer = |x: Tensor<B, 4>| {
                let options = (&x.device(), x.dtype());
                Tensor::empty([b, h, cap, d], options).slice_assign([0..b, 0..h, 0..s, 0..d], x)
            };
            (buffer(k), buffer(v))
        };
        LayerCache { k, v, len: s }
    }

    /// Empty buffers [B, KV, cap, hd] with room for `t` positions and a block more.
    fn empty([b, h, t, d]: [usize; 4], options: (&B::Device, burn::tensor::DType)) -> Self {
        let cap = (t + 1).next_multiple_of(CACHE_BLOCK);
        let buffer = || Tensor::empty([b, h, cap, d], options);
        LayerCache {
            k: buffer(),
            v: buffer(),
            len: 0,
        }
    }

    /// This cache with room for `t` more positions: the same buffers, or buffers twice as
    /// large holding the filled part.
    fn with_room(self, t: usize) -> Self {
        let end = self.len + t;
        if end <= self.capacity() {
            return self;
        }
        let (k, v) = self.filled();
        Self::holding(k, v, end.max(2 * self.capacity()).next_multiple_of(CACHE_BLOCK))
    }
}

impl<B: ModelKernels> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Layer `l`'s filled keys and values [B, KV, len, hd], as views.
    pub(crate) fn layer(&self, l: usize) -> (Tensor<B, 4>, Tensor<B, 4>) {
        self.layers[l].as_ref().expect("a filled cache layer").filled()
    }

    /// Appends this step's k/v [B, KV, T, hd] for `layer` and returns the full history, as
    /// views.
    fn append(&mut self, layer: usize, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, h, t, d] = k.dims();
        let options = (&k.device(), k.dtype());
        let (_, k, v) = self.append_with(layer, [b, h, t, d], options, |kb, vb, at| {
            let range = [0..b, 0..h, at..at + t, 0..d];
            ((), kb.slice_assign(range.clone(), k), vb.slice_assign(range, v))
        });
        (k, v)
    }

    /// Appends `shape`'s [B, KV, T, hd] positions for `layer` through `write`, which gets the
    /// buffers with room for them and the position they go at, and returns its own result
    /// and the buffers written; then the full history, as views. The buffers are moved
    /// into `write` and no view of them outlives a step, so they can be written in place.
    fn append_with<R>(
        &mut self,
        layer: usize,
        shape: [usize; 4],
        options: (&B::Device, burn::tensor::DType),
        write: impl FnOnce(Tensor<B, 4>, Tensor<B, 4>, usize) -> (R, Tensor<B, 4>, Tensor<B, 4>),
    ) -> (R, Tensor<B, 4>, Tensor<B, 4>) {
        let slot = &mut self.layers[layer];
        let room = match slot.take() {
            Some(cache) => cache.with_room(shape[2]),
            None => LayerCache::empty(shape, options),
        };
        let (out, k, v) = write(room.k, room.v, room.len);
        let (k, v) = slot
            .insert(LayerCache {
                k,
                v,
                len: room.len + shape[2],
            })
            .filled();
        (out, k, v)
    }
}

/// What every layer of one forward call shares: rotary tables for the query positions and
/// which keys each query sees. R (rows) is the batch size, or 1 when all rows share them.
#[derive(Debug, Clone)]
pub struct Context<B: Backend> {
    /// [R, T, hd] each.
    pub cos: Tensor<B, 3>,
    pub sin: Tensor<B, 3>,
    /// [R, T] key runs; None when every query may see every key.
    pub keys: Option<KeyRanges<B>>,
}

impl<B: Backend> Context<B> {
    /// Plain causal attention for `t` new positions after `past` cached ones.
    pub fn causal(rotary: &Rotary, t: usize, past: usize, device: &B::Device) -> Self {
        let positions: Vec<usize> = (past..past + t).collect();
        let (cos, sin) = rotary.tables(&[positions], device);
        let keys = (t > 1).then(|| KeyRanges::from_runs(&[(0..t).map(|i| (0, past + i)).collect()], device));
        Context { cos, sin, keys }
    }

    /// A left-padded batch: row r starts with `pads[r]` padding tokens that no query may see
    /// and that do not count as positions, followed by its sequence. `t` new positions follow
    /// `past` cached ones (padding included in both).
    pub fn left_padded(rotary: &Rotary, pads: &[usize], t: usize, past: usize, device: &B::Device) -> Self {
        let positions: Vec<Vec<usize>> = pads
            .iter()
            .map(|&pad| (past..past + t).map(|i| i.saturating_sub(pad)).collect())
            .collect();
        let (cos, sin) = rotary.tables(&positions, device);
        let runs: Vec<Vec<(usize, usize)>> = pads
            .iter()
            .map(|&pad| {
                // A padding query sees only itself: a fully masked row would softmax to NaN.
                (past..past + t)
                    .map(|i| if i < pad { (i, i) } else { (pad, i) })
                    .collect()
            })
            .collect();
        Context {
            cos,
            sin,
            keys: Some(KeyRanges::from_runs(&runs, device)),
        }
    }

    /// Packed rows: several documents per row, `doc[r][i]` naming the document of token i;
    /// a document's tokens are one contiguous run. Positions restart at 0 in each document and
    /// no token attends across documents, so a packed row computes exactly what the
    /// documents would compute alone.
    pub fn packed(rotary: &Rotary, docs: &[Vec<u32>], device: &B::Device) -> Self {
        let starts: Vec<Vec<usize>> = docs.iter().map(|row| document_starts(row)).collect();
        let positions: Vec<Vec<usize>> = starts
            .iter()
            .map(|row| row.iter().enumerate().map(|(i, &start)| i - start).collect())
            .collect();
        let (cos, sin) = rotary.tables(&positions, device);
        let runs: Vec<Vec<(usize, usize)>> = starts
            .iter()
            .map(|row| row.iter().enumerate().map(|(i, &start)| (start, i)).collect())
            .collect();
        Context {
            cos,
            sin,
            keys: Some(KeyRanges::from_runs(&runs, device)),
        }
    }
}

/// The first token of each token's document (documents are contiguous runs of one id).
fn document_starts(doc: &[u32]) -> Vec<usize> {
    let mut start = 0;
    (0..doc.len())
        .map(|i| {
            if i > 0 && doc[i] != doc[i - 1] {
                start = i;
            }
            start
        })
        .collect()
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    /// q, k and v as one GEMM, in the decoding copy ([`Fused`]); None elsewhere.
    #[module(skip)]
    pub qkv: Option<Fused<B>>,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
}

impl<B: Kernels> Attention<B> {
    /// x: the input norm's output [B, T, C] -> the heads' outputs, before o_proj
    /// [B, T, H * hd].
    fn attend(
        &self,
        x: &Normed<B>,
        ctx: &Context<B>,
        cache: Option<(CacheRef<'_, B>, usize)>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.out.dims();
        let (q, k, v) = match (&self.qkv, cache) {
            (_, Some((CacheRef::Paged(step), layer))) => {
                let (q, k, v) = match &self.qkv {
                    Some(qkv) => self.fused_heads(qkv, x, ctx),
                    None => self.rotated_heads(x, ctx),
                };
                step.write(layer, k, v);
                let y = step.attend(layer, q, ctx.keys.as_ref()); // [B, H, 1, hd]
                return y.reshape([b, t, self.num_heads * self.head_dim]);
            }
            (Some(qkv), Some((CacheRef::Contiguous(cache), layer))) => {
                self.fused_into_cache(qkv, x, ctx, cache, layer)
            }
            (_, None) => self.rotated_heads(x, ctx),
            (_, Some((CacheRef::Contiguous(cache), layer))) => {
                let (q, k, v) = self.rotated_heads(x, ctx);
                let (k, v) = cache.append(layer, k, v); // [B, KV, S, hd]
                (q, k, v)
            }
        };
        let y = <B as ModelKernels>::attention(q, k, v, ctx.keys.as_ref()); // [B, H, T, hd]
        // A decode step's [B, H, 1, hd] is [B, 1, H, hd] in memory: reshaped as it is, it stays
        // a view, where the swapped view's strides made burn's reshape copy it.
        let y = if t == 1 { y } else { y.swap_dims(1, 2) };
        y.reshape([b, t, self.num_heads * self.head_dim])
    }

    /// q [B, H, T, hd], k and v [B, KV, T, hd] of this step, q and k rotated.
    fn rotated_heads(&self, x: &Normed<B>, ctx: &Context<B>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, _] = x.out.dims();
        let heads = |y: Tensor<B, 3>, n: usize| y.reshape([b, t, n, self.head_dim]).swap_dims(1, 2);
        let [q, k, v] = match &self.qkv {
            Some(qkv) => qkv.forward(x.out.clone()),
            None => [&self.q_proj, &self.k_proj, &self.v_proj].map(|p| p.forward_normed(x)),
        };
        let q = <B as ModelKernels>::rope(heads(q, self.num_heads), &ctx.cos, &ctx.sin);
        let k = <B as ModelKernels>::rope(heads(k, self.num_kv_heads), &ctx.cos, &ctx.sin);
        (q, k, heads(v, self.num_kv_heads))
    }

    /// The decoding copy's step over pages: [`Attention::fused_into_cache`]'s kernel, its k and
    /// v written into a one-position buffer. Returns q [B, H, T, hd] and k, v [B, KV, T, hd].
    fn fused_heads(
        &self,
        qkv: &Fused<B>,
        x: &Normed<B>,
        ctx: &Context<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, _] = x.out.dims();
        let y = qkv.project(x.out.clone()); // [B, T, (H + 2 KV) hd]
        let shape = [b, self.num_kv_heads, t, self.head_dim];
        let options = (&y.device(), y.dtype());
        let (kb, vb) = (Tensor::empty(shape, options), Tensor::empty(shape, options));
        let heads = [self.num_heads, self.num_kv_heads];
        <B as ModelKernels>::rope_qkv(y, qkv.bias.clone(), heads, &ctx.cos, &ctx.sin, kb, vb, 0)
    }

    /// The decoding copy's cached step: one kernel splits the fused projection into heads,
    /// rotates q and k and writes k and v into the cache ([`ModelKernels::rope_qkv`]).
    /// Returns q [B, H, T, hd] and the cached k, v [B, KV, S, hd].
    fn fused_into_cache(
        &self,
        qkv: &Fused<B>,
        x: &Normed<B>,
        ctx: &Context<B>,
        cache: &mut KvCache<B>,
        layer: usize,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, _] = x.out.dims();
        let y = qkv.project(x.out.clone()); // [B, T, (H + 2 KV) hd]
        let shape = [b, self.num_kv_heads, t, self.head_dim];
        let heads = [self.num_heads, self.num_kv_heads];
        cache.append_with(layer, shape, (&y.device(), y.dtype()), |kb, vb, at| {
            <B as ModelKernels>::rope_qkv(y, qkv.bias.clone(), heads, &ctx.cos, &ctx.sin, kb, vb, at)
        })
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// The layer's seven linear layers, attention's then the MLP's.
    pub fn linears(&self) -> [&Linear<B>; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }
}

impl<B: Kernels> DecoderLayer<B> {
    /// The linear layers the decoding copy would fuse and has not: q, k, v; gate, up.
    fn fusable(&self) -> Vec<&Linear<B>> {
        let (a, m) = (&self.self_attn, &self.mlp);
        let qkv = a.qkv.is_none().then_some([&a.q_proj, &a.k_proj, &a.v_proj]);
        let gate_up = m.gate_up.is_none().then_some([&m.gate_proj, &m.up_proj]);
        qkv.into_iter()
            .flatten()
            .chain(gate_up.into_iter().flatten())
            .collect()
    }

    /// This layer as [`CausalLm::for_decoding`] copies it: linears as [`Linear::for_decoding`]
    /// makes them, q/k/v and gate/up fused when `fuse` ([`Fused`]), norms in `dtype`. A
    /// group fused already (a decoding copy's) is shared, not fused again.
    fn for_decoding(&self, dtype: burn::tensor::DType, merge: bool, fuse: bool) -> Self {
        let (a, m) = (&self.self_attn, &self.mlp);
        let copy = |l: &Linear<B>| l.for_decoding(dtype, merge);
        let (qkv, [q_proj, k_proj, v_proj]) =
            fused(fuse, &a.qkv, [&a.q_proj, &a.k_proj, &a.v_proj].map(copy), dtype);
        let (gate_up, [gate_proj, up_proj]) =
            fused(fuse, &m.gate_up, [&m.gate_proj, &m.up_proj].map(copy), dtype);
        DecoderLayer {
            self_attn: Attention {
                q_proj,
                k_proj,
                v_proj,
                o_proj: copy(&a.o_proj),
                qkv,
                ..a.clone()
            },
            mlp: Mlp {
                gate_proj,
                up_proj,
                down_proj: copy(&m.down_proj),
                gate_up,
            },
            input_layernorm: self.input_layernorm.for_decoding(dtype),
            post_attention_layernorm: self.post_attention_layernorm.for_decoding(dtype),
        }
    }

    /// x: [B, T, C] -> [B, T, C]. `cache` is a KV cache and this layer's index, when decoding.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &Context<B>,
        cache: Option<(CacheRef<'_, B>, usize)>,
    ) -> Tensor<B, 3> {
        self.mlp_residual(self.attention_residual(x, ctx, cache))
    }

    /// The block's first half: x [B, T, C] -> x + o_proj(attention(norm(x))) [B, T, C].
    pub fn attention_residual(
        &self,
        x: Tensor<B, 3>,
        ctx: &Context<B>,
        cache: Option<(CacheRef<'_, B>, usize)>,
    ) -> Tensor<B, 3> {
        // The norm's output (which holds its input) is gone before the residual add.
        let y = self
            .self_attn
            .attend(&self.input_layernorm.forward_normed(x.clone()), ctx, cache);
        self.self_attn.o_proj.forward_residual(x, y)
    }

    /// The block's second half: h [B, T, C] -> h + mlp(norm(h)) [B, T, C]. Each token on its
    /// own, so it may run over any split of the tokens.
    pub fn mlp_residual(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let normed = self.post_attention_layernorm.forward_normed(h.clone());
        self.mlp.forward_residual(h, normed)
    }

    /// [`DecoderLayer::forward`] (no KV cache) with the MLP half over at most `chunk` tokens at
    /// a time (0: all at once): its [tokens, intermediate] activations are a block's largest
    /// at long sequence lengths. The same values up to the split of the work.
    pub fn forward_mlp_chunked(&self, x: Tensor<B, 3>, ctx: &Context<B>, chunk: usize) -> Tensor<B, 3> {
        let h = self.attention_residual(x, ctx, None);
        let [b, t, c] = h.dims();
        let spans = token_chunks(b * t, chunk);
        if spans.len() < 2 {
            return self.mlp_residual(h);
        }
        let flat = h.reshape([1, b * t, c]);
        let parts = spans
            .into_iter()
            .map(|s| self.mlp_residual(flat.clone().slice([0..1, s, 0..c])))
            .collect();
        Tensor::cat(parts, 1).reshape([b, t, c])
    }
}

/// `0..n` in consecutive spans of at most `chunk` (0: one span).
pub fn token_chunks(n: usize, chunk: usize) -> Vec<std::ops::Range<usize>> {
    let chunk = if chunk == 0 { n.max(1) } else { chunk };
    (0..n).step_by(chunk).map(|s| s..(s + chunk).min(n)).collect()
}

/// Token embeddings [V, C] (same layout as HF).
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
}

#[derive(Module, Debug)]
pub struct Model<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

/// The most bytes of weights [`CausalLm::for_decoding`] makes anew. Merging a LoRA or QLoRA
/// model costs a dense copy of every adapted or NF4 weight while it decodes (Qwen2.5-0.5B's
/// linear layers: about 0.7 GB in bf16, 1.5B: 2.6 GB, 7B: 13 GB); fusing q/k/v and gate/up
/// costs their weights again where they were not merged (a bf16 model without adapters:
/// 0.5B 0.5 GB, 1.5B 1.7 GB, 7B 8.5 GB). Under this, sampling runs as fast as the bf16 base
/// model or faster; over it (7B on a 24 GB or 12 GB card), nothing is fused, and adapters
/// stay apart and NF4 weights are dequantized at every use, as in training, unless the
/// merge alone fits.
pub const MERGE_ADAPTERS_UP_TO: usize = 4 << 30;

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
        Self::init_with(config, device, BaseQuant::None)
    }

    /// [`CausalLm::init`] with the decoder layers' linear weights held as `quantize` says
    /// (as [`CausalLm::load_with`]).
    pub fn init_with(config: &DecoderConfig, device: &B::Device, quantize: BaseQuant) -> Self {
        let c = config;
        let (h, q, kv) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let layers = (0..c.num_hidden_layers)
            .map(|_| DecoderLayer {
                self_attn: Attention {
                    q_proj: Linear::init(h, q, c.qkv_bias, quantize, device),
                    k_proj: Linear::init(h, kv, c.qkv_bias, quantize, device),
                    v_proj: Linear::init(h, kv, c.qkv_bias, quantize, device),
                    o_proj: Linear::init(q, h, c.o_bias, quantize, device),
                    qkv: None,
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                },
                mlp: Mlp {
                    gate_proj: Linear::init(h, c.intermediate_size, c.mlp_bias, quantize, device),
                    up_proj: Linear::init(h, c.intermediate_size, c.mlp_bias, quantize, device),
                    down_proj: Linear::init(c.intermediate_size, h, c.mlp_bias, quantize, device),
                    gate_up: None,
                },
                input_layernorm: RmsNorm::init(h, c.rms_norm_eps, device),
                post_attention_layernorm: RmsNorm::init(h, c.rms_norm_eps, device),
            })
            .collect();
        CausalLm {
            model: Model {
                embed_tokens: Embedding {
                    weight: Param::from_tensor(random([c.vocab_size, h], device)),
                },
                layers,
                norm: RmsNorm::init(h, c.rms_norm_eps, device),
            },
            lm_head: (!c.tie_word_embeddings)
                .then(|| Linear::init(h, c.vocab_size, false, BaseQuant::None, device)),
            config: config.clone(),
            rotary: Rotary::new(config),
        }
    }

    /// A copy to decode many tokens with: every weight in the activations' dtype, each LoRA
    /// adapter merged into its weight (an NF4 weight dequantized), and q/k/v and gate/up
    /// each fused into one GEMM ([`Fused`]), while the weights this makes take at most
    /// [`MERGE_ADAPTERS_UP_TO`] bytes. A decode step then runs no casts, one GEMM per linear
    /// layer instead of three and an add (and a dequantization), and four GEMMs a layer
    /// instead of seven: at small batches a step costs what its kernel launches cost. What
    /// full fine-tuning (f32 masters, a tied head cast whole at every token) or LoRA would
    /// recompute per token is computed once. Over the budget, adapters stay apart (their
    /// scales folded into A) and weights already in that dtype are shared.
    pub fn for_decoding(&self) -> Self {
        self.for_decoding_merging_up_to(MERGE_ADAPTERS_UP_TO)
    }

    /// [`CausalLm::for_decoding`] for a model that only generates from now on (serve, eval,
    /// `generate`, `bench generate`): it is consumed a layer at a time, so fusing q/k/v and
    /// gate/up costs no memory beyond one layer's parts, and every model gets the fused
    /// GEMMs, not only those whose fused weights fit the copy's budget. Merges stay under
    /// [`MERGE_ADAPTERS_UP_TO`]: an NF4 weight dequantized takes four times its memory. Its
    /// own [`CausalLm::for_decoding`] shares its weights.
    pub fn into_decoding(self) -> Self {
        let merge = self.merged_bytes() <= MERGE_ADAPTERS_UP_TO;
        self.decoding_copy(merge, true)
    }

    /// [`CausalLm::for_decoding`] with the budget given: the copy fuses and merges when all
    /// the weights it makes anew fit in `budget_bytes`, else only merges when its merged
    /// weights fit, else neither.
    pub fn for_decoding_merging_up_to(&self, budget_bytes: usize) -> Self {
        let dtype = <B::FloatElem as burn::tensor::Element>::dtype();
        let merged_bytes = self.merged_bytes();
        // Fused weights are made anew, merged or not.
        let fused_bytes = merged_bytes
            + (self.model.layers.iter())
                .flat_map(DecoderLayer::fusable)
                .map(|x| x.dense_bytes(dtype) - x.merged_bytes(dtype))
                .sum::<usize>();
        let fuse = fused_bytes <= budget_bytes;
        let merge = fuse || merged_bytes <= budget_bytes;
        // A clone shares every tensor: the copy is made beside the model, which keeps its own.
        self.clone().decoding_copy(merge, fuse)
    }

    /// Bytes of the dense weights merging the adapters (and dequantizing NF4 weights) makes,
    /// in the decoding dtype.
    fn merged_bytes(&self) -> usize {
        let dtype = <B::FloatElem as burn::tensor::Element>::dtype();
        (self.model.layers.iter())
            .flat_map(DecoderLayer::linears)
            .chain(self.lm_head.iter())
            .map(|x| x.merged_bytes(dtype))
            .sum()
    }

    /// The decoding copy of this model, merged and fused as told, made a layer at a time:
    /// each layer's own tensors are dropped as its copy is made, unless shared elsewhere.
    fn decoding_copy(self, merge: bool, fuse: bool) -> Self {
        let dtype = <B::FloatElem as burn::tensor::Element>::dtype();
        let CausalLm {
            model,
            lm_head,
            config,
            rotary,
        } = self;
        let Model {
            embed_tokens,
            layers,
            norm,
        } = model;
        CausalLm {
            model: Model {
                embed_tokens: Embedding {
                    weight: cast_param(&embed_tokens.weight, dtype),
                },
                layers: (layers.into_iter())
                    .map(|l| l.for_decoding(dtype, merge, fuse))
                    .collect(),
                norm: norm.for_decoding(dtype),
            },
            lm_head: lm_head.map(|h| h.for_decoding(dtype, merge)),
            config,
            rotary,
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

    /// An empty paged cache for batched decoding ([`CausalLm::decode_step`]).
    pub fn new_paged_cache(&self) -> PagedKv<B> {
        PagedKv::new(self.config.num_hidden_layers)
    }

    /// Positions of KV cache `bytes` hold: every layer's keys and values of one position, in
    /// the dtype of the model's activations.
    pub fn kv_cache_positions(&self, bytes: u64) -> usize {
        let c = &self.config;
        let elem = self.model.embed_tokens.weight.dtype().size();
        let per_position = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * elem;
        (bytes / per_position.max(1) as u64) as usize
    }

    /// One decoding step of batched generation: `ids` (a token per row) continue the rows
    /// `cache` holds, left-padded by `pads` ([`Context::left_padded`]). Returns logits [B, V].
    /// A backend with a fused step runs the whole model at once over the cache's pages
    /// ([`ModelKernels::decode_step`]: CUDA, for the decoding copy's fused bf16 weights);
    /// otherwise the rows' positions are gathered into a contiguous cache, the layers run op
    /// by op, to the same logits, and the new position goes back into the pages.
    pub fn decode_step(
        &self,
        ids: &[u32],
        pads: &[usize],
        cache: &mut PagedKv<B>,
        device: &B::Device,
    ) -> Tensor<B, 2> {
        let rows = self.model.embed_tokens.weight.dims()[0];
        // The fused step gathers embedding rows unchecked.
        let in_table = ids.iter().all(|&t| (t as usize) < rows);
        let data: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        let ids = Tensor::from_data(TensorData::new(data, [ids.len()]), device);
        self.decode_step_with(ids, in_table, pads, cache, device)
    }

    /// [`CausalLm::decode_step`] for ids already on the device: the tokens the last step
    /// drew from this model's logits ([`ModelKernels::sample_rows_ahead`]), so each is a row
    /// of its embedding table.
    pub fn decode_step_ids(
        &self,
        ids: Tensor<B, 1, Int>,
        pads: &[usize],
        cache: &mut PagedKv<B>,
        device: &B::Device,
    ) -> Tensor<B, 2> {
        self.decode_step_with(ids, true, pads, cache, device)
    }

    fn decode_step_with(
        &self,
        ids: Tensor<B, 1, Int>,
        fusable: bool,
        pads: &[usize],
        cache: &mut PagedKv<B>,
        device: &B::Device,
    ) -> Tensor<B, 2> {
        cache.reserve(1);
        let ctx = Context::left_padded(&self.rotary, pads, 1, cache.len(), device);
        let mut step = cache.begin_step(device);
        let fused = if fusable && !cache.is_empty() {
            self.fused_step(ids.clone(), &ctx, &mut step, &mut cache.step)
        } else {
            None
        };
        let logits = fused.unwrap_or_else(|| {
            let b = ids.dims()[0];
            let cache = Some(CacheRef::Paged(&mut step));
            let hidden = self.hidden_states_in(ids.reshape([b, 1]), &ctx, cache); // [B, 1, C]
            self.logits(hidden).squeeze_dim::<2>(1)
        });
        cache.end_step(step);
        logits
    }

    /// [`CausalLm::decode_step`] through the backend's fused step, or None (nothing changed)
    /// where there is none for this model, cache or backend.
    fn fused_step(
        &self,
        ids: Tensor<B, 1, Int>,
        ctx: &Context<B>,
        step: &mut PagedStep<B>,
        state: &mut StepState,
    ) -> Option<Tensor<B, 2>> {
        if !<B as ModelKernels>::FUSED_DECODE {
            return None;
        }
        let weights = self.decode_weights()?;
        let pools = step.take_pools();
        let x = DecodeInputs {
            ids,
            cos: &ctx.cos,
            sin: &ctx.sin,
            keys: ctx.keys.as_ref(),
            at: step.at,
            pages: step.pages(),
        };
        let (logits, pools) = <B as ModelKernels>::decode_step(&weights, x, pools, state);
        step.put_pools(pools);
        logits
    }

    /// The weights a fused decoding step reads, if this is a decoding copy whose linear
    /// layers are all dense, without adapters (q/k/v and gate/up fused or not).
    fn decode_weights(&self) -> Option<DecodeWeights<'_, B>> {
        fn plain<B: Backend>(l: &Linear<B>) -> Option<(&Tensor<B, 2>, Option<&Tensor<B, 1>>)> {
            match (&l.weight, &l.lora) {
                (Weight::Dense(w), None) => Some((&**w, l.bias.as_deref())),
                _ => None,
            }
        }
        fn projection<'a, B: Kernels>(
            fused: &'a Option<Fused<B>>,
            parts: &[&'a Linear<B>],
        ) -> Option<Projection<'a, B>> {
            match fused {
                Some(f) => Some(vec![(&f.weight, f.bias.as_ref())]),
                None => parts.iter().map(|p| plain(p)).collect(),
            }
        }
        fn unbiased<B: Backend>(l: &Linear<B>) -> Option<&Tensor<B, 2>> {
            plain(l).filter(|(_, b)| b.is_none()).map(|(w, _)| w)
        }
        let eps = self.model.norm.eps;
        let layers = self
            .model
            .layers
            .iter()
            .map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                let norms = [&l.input_layernorm, &l.post_attention_layernorm];
                if norms.iter().any(|n| n.eps != eps) {
                    return None;
                }
                Some(DecodeLayer {
                    input_norm: &*l.input_layernorm.weight,
                    qkv: projection(&a.qkv, &[&a.q_proj, &a.k_proj, &a.v_proj])?,
                    o_proj: unbiased(&a.o_proj)?,
                    post_norm: &*l.post_attention_layernorm.weight,
                    gate_up: projection(&m.gate_up, &[&m.gate_proj, &m.up_proj])?,
                    down_proj: unbiased(&m.down_proj)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let embed = &*self.model.embed_tokens.weight;
        let lm_head = match &self.lm_head {
            Some(head) => unbiased(head)?.clone(),
            None => embed.clone().transpose(),
        };
        let first = &self.model.layers.first()?.self_attn;
        Some(DecodeWeights {
            embed,
            layers,
            norm: &*self.model.norm.weight,
            lm_head,
            eps,
            heads: [first.num_heads, first.num_kv_heads],
            head_dim: first.head_dim,
        })
    }

    /// Final-norm hidden states [B, T, C]; losses that chunk over the vocabulary start here.
    pub fn hidden_states(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let t = input_ids.dims()[1];
        let past = cache.as_ref().map_or(0, |c| c.len());
        let ctx = Context::causal(&self.rotary, t, past, &input_ids.device());
        self.hidden_states_with(input_ids, &ctx, cache)
    }

    /// Final-norm hidden states [B, T, C] under a caller-built context (positions and mask),
    /// e.g. [`Context::left_padded`] for batched generation.
    pub fn hidden_states_with(
        &self,
        input_ids: Tensor<B, 2, Int>,
        ctx: &Context<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.hidden_states_in(input_ids, ctx, cache.map(CacheRef::Contiguous))
    }

    fn hidden_states_in(
        &self,
        input_ids: Tensor<B, 2, Int>,
        ctx: &Context<B>,
        mut cache: Option<CacheRef<'_, B>>,
    ) -> Tensor<B, 3> {
        let mut x = self.embed(input_ids);
        for (i, layer) in self.model.layers.iter().enumerate() {
            x = layer.forward(x, ctx, cache.as_mut().map(|c| (c.reborrow(), i)));
        }
        self.model.norm.forward(x)
    }

    /// Forward over packed rows (see [`Context::packed`]): logits [B, T, V].
    pub fn forward_packed(&self, input_ids: Tensor<B, 2, Int>, docs: &[Vec<u32>]) -> Tensor<B, 3> {
        self.logits(self.hidden_states_packed(input_ids, docs))
    }

    /// Final-norm hidden states [B, T, C] of packed rows.
    pub fn hidden_states_packed(&self, input_ids: Tensor<B, 2, Int>, docs: &[Vec<u32>]) -> Tensor<B, 3> {
        let ctx = Context::packed(&self.rotary, docs, &input_ids.device());
        self.hidden_states_with(input_ids, &ctx, None)
    }

    /// Token embeddings in the backend's float dtype (bf16 under CUDA) whatever the table's:
    /// full fine-tuning keeps f32 master weights, and activations taking their dtype would run
    /// every GEMM in f32 (off cuBLAS) and every elementwise op at twice the traffic.
    /// input_ids: [B, T] -> [B, T, C].
    pub fn embed(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let x = burn::tensor::module::embedding(self.model.embed_tokens.weight.val(), input_ids);
        cast_to(x, <B::FloatElem as burn::tensor::Element>::dtype())
    }

    /// hidden: [B, T, C] -> logits [B, T, V].
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let w = cast_to(self.model.embed_tokens.weight.val(), hidden.dtype());
                <B as ModelKernels>::linear(hidden, w.transpose(), None)
            }
        }
    }
}

/// `parts` fused when `fuse` and they can be ([`Fused::of`]), else as they are.
fn fused<B: Kernels, const N: usize>(
    fuse: bool,
    already: &Option<Fused<B>>,
    parts: [Linear<B>; N],
    dtype: burn::tensor::DType,
) -> (Option<Fused<B>>, [Linear<B>; N]) {
    // The parts of a fused group are views of its weight: copied, they still are.
    if let Some(f) = already.as_ref().filter(|f| f.weight.dtype() == dtype) {
        return (Some(f.clone()), parts);
    }
    match fuse.then(|| Fused::of(&parts)).flatten() {
        Some((fused, views)) => (Some(fused), views),
        None => (None, parts),
    }
}

/// `p` in `dtype`: the same parameter when it is already, else a cast copy.
fn cast_param<B: Backend, const D: usize>(
    p: &Param<Tensor<B, D>>,
    dtype: burn::tensor::DType,
) -> Param<Tensor<B, D>> {
    match p.val() {
        t if t.dtype() == dtype => p.clone(),
        t => Param::from_tensor(t.cast(dtype)),
    }
}

fn random<B: Backend, const D: usize>(shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 0.02), device)
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    fn dense(keys: Option<KeyRanges<Flex>>, s: usize) -> Vec<bool> {
        keys.expect("a mask").dense(s).into_data().into_vec().unwrap()
    }

    fn rotary() -> Rotary {
        Rotary {
            inv_freq: vec![1.0, 0.5],
        }
    }

    /// Packed rows: key j hidden from query i when j > i or the two tokens belong to
    /// different documents.
    #[test]
    fn packed_keys_are_causal_within_documents() {
        let rows: Vec<Vec<u32>> = vec![
            vec![0, 0, 0, 1, 1, 2, 3, 3],
            vec![0; 8],
            vec![0, 1, 2, 3, 4, 5, 6, 7],
            vec![5, 5, 9, 9, 9, 9, u32::MAX, u32::MAX],
        ];
        let ctx = Context::<Flex>::packed(&rotary(), &rows, &Default::default());
        let t = 8;
        let want: Vec<bool> = rows
            .iter()
            .flat_map(|d| (0..t).flat_map(move |i| (0..t).map(move |j| j > i || d[j] != d[i])))
            .collect();
        assert_eq!(dense(ctx.keys, t), want);
    }

    /// Left padding after cached positions: a query sees the keys from its row's first real
    /// token up to itself; a padding query sees only itself. Causal: everything up to itself.
    #[test]
    fn left_padded_and_causal_keys_match_their_definitions() {
        let (pads, t, past) = ([0, 2, 3], 3, 2);
        let s = past + t;
        let ctx = Context::<Flex>::left_padded(&rotary(), &pads, t, past, &Default::default());
        let want: Vec<bool> = pads
            .iter()
            .flat_map(|&pad| {
                (0..t).flat_map(move |i| (0..s).map(move |j| j > past + i || (j < pad && j != past + i)))
            })
            .collect();
        assert_eq!(dense(ctx.keys, s), want);

        let ctx = Context::<Flex>::causal(&rotary(), t, past, &Default::default());
        let want: Vec<bool> = (0..t).flat_map(|i| (0..s).map(move |j| j > past + i)).collect();
        assert_eq!(dense(ctx.keys, s), want);
        assert!(
            Context::<Flex>::causal(&rotary(), 1, past, &Default::default())
                .keys
                .is_none()
        );
    }

    /// LoRA dropout (PEFT's lora_dropout): in training the adapter's input has each element
    /// zeroed with probability p and the rest scaled by 1 / (1 - p) while the base weight sees
    /// it whole; at inference (no autodiff) nothing is dropped. Both forward paths: the plain
    /// one and the MLP's down projection (`forward_swiglu`). With A = B = I and scale 1 the
    /// adapter's share of the output is its input, so each element shows whether it was kept.
    #[test]
    fn lora_dropout_applies_to_the_adapters_input_in_training_only() {
        use burn::module::AutodiffModule;
        type AD = burn::backend::Autodiff<Flex>;
        let device = Default::default();
        let (n, rows, p) = (8, 64, 0.5);
        // Nonzero values of both signs, so a kept element never reads as dropped.
        let data = |salt: usize| -> Vec<f32> {
            (0..rows * n)
                .map(|i| {
                    let v = ((i * 7 + salt) % 17) as f32 * 0.1 + 0.05;
                    if i % 3 == 0 { -v } else { v }
                })
                .collect()
        };
        let t3 = |v: Vec<f32>| Tensor::<Flex, 3>::from_data(TensorData::new(v, [1, rows, n]), &device);
        let eye: Vec<f32> = (0..n * n)
            .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
            .collect();
        let eye = || {
            Param::from_tensor(Tensor::<AD, 2>::from_data(
                TensorData::new(eye.clone(), [n, n]),
                &device,
            ))
        };
        let w = Tensor::<Flex, 2>::from_data(TensorData::new(data(3)[..n * n].to_vec(), [n, n]), &device);
        let layer = Linear::<AD> {
            weight: Weight::Dense(Param::from_tensor(Tensor::from_inner(w.clone()))),
            bias: None,
            lora: Some(Lora {
                lora_a: eye(),
                lora_b: eye(),
                scale: 1.0,
                dropout: p,
            }),
        };
        let values = |t: Tensor<Flex, 3>| t.into_data().into_vec::<f32>().unwrap();
        // Every element of `adapter_out` is 0 or input / (1 - p); about p of them are 0.
        let check = |path: &str, adapter_in: Tensor<Flex, 3>, adapter_out: Tensor<Flex, 3>| {
            let (x, d) = (values(adapter_in), values(adapter_out));
            let mut dropped = 0;
            for (x, d) in x.iter().zip(&d) {
                let kept = x / (1.0 - p as f32);
                if d.abs() <= 1e-5 {
                    dropped += 1;
                } else {
                    assert!(
                        (d - kept).abs() <= 1e-4 * kept.abs() + 1e-5,
                        "{path}: {d}, input {x}"
                    );
                }
            }
            let share = dropped as f64 / x.len() as f64;
            assert!(
                (0.3..0.7).contains(&share),
                "{path}: {dropped} of {} dropped",
                x.len()
            );
        };

        let x = t3(data(0));
        let base = x.clone().matmul(w.clone().unsqueeze());
        let y = layer.forward(Tensor::<AD, 3>::from_inner(x.clone())).inner();
        check("forward", x.clone(), y - base.clone());
        let y = layer.valid().forward(x.clone());
        let exact = values(base + x);
        for (a, b) in values(y).iter().zip(&exact) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "inference: {a} vs {b}");
        }

        let (gate, up) = (t3(data(1)), t3(data(2)));
        let h = distill_kernels::elementwise::swiglu_default(gate.clone(), up.clone());
        let y = layer
            .forward_swiglu(Tensor::from_inner(gate), Tensor::from_inner(up))
            .inner();
        check("forward_swiglu", h.clone(), y - h.matmul(w.unsqueeze()));
    }

    /// Activations take the backend's float dtype, not the embedding table's: full
    /// fine-tuning keeps an f32 master table under bf16 CUDA (here the mirror image: a bf16
    /// table under f32 Flex), and the whole forward would otherwise run in the table's dtype.
    #[test]
    fn embeddings_come_out_in_the_backend_float_dtype() {
        let config = DecoderConfig::from_dir(&crate::test_util::fixtures().join("tiny-qwen2")).unwrap();
        let device = Default::default();
        let mut model = CausalLm::<Flex>::init(&config, &device);
        model.model.embed_tokens.weight = model
            .model
            .embed_tokens
            .weight
            .map(|w| w.cast(burn::tensor::DType::BF16));
        let ids = Tensor::<Flex, 2, Int>::from_data([[1, 2, 3]], &device);
        assert_eq!(model.embed(ids).dtype(), burn::tensor::DType::F32);
    }

    /// The copy generation decodes with computes what the model computes: adapters with a
    /// scale other than 1 (merged into their weights, or folded into A when kept apart) and
    /// weights held in another dtype than the activations (cast once in the copy, at every
    /// use in the model).
    #[test]
    fn the_decoding_copy_computes_what_the_model_computes() {
        use burn::tensor::DType;
        let device = Default::default();
        let mut model = CausalLm::<Flex>::init(&tiny_qwen2(), &device);
        for layer in &mut model.model.layers {
            for linear in [&mut layer.self_attn.q_proj, &mut layer.mlp.down_proj] {
                linear.lora = Some(drawn_lora(linear.weight.dims(), 0.1, &device));
            }
            // Qwen2's q/k/v biases, drawn (init makes them zeros): fused, they are one add.
            for linear in [
                &mut layer.self_attn.q_proj,
                &mut layer.self_attn.k_proj,
                &mut layer.self_attn.v_proj,
            ] {
                let bias = linear.bias.as_mut().expect("Qwen2 has q/k/v biases");
                *bias = Param::from_tensor(random(bias.dims(), &device));
            }
            let up = &mut layer.mlp.up_proj;
            if let Weight::Dense(w) = &up.weight {
                up.weight = Weight::Dense(Param::from_tensor(w.val().cast(DType::BF16)));
            }
        }
        model.model.embed_tokens.weight = model
            .model
            .embed_tokens
            .weight
            .clone()
            .map(|w| w.cast(DType::BF16));
        let merged_bytes: usize = model
            .model
            .layers
            .iter()
            .flat_map(DecoderLayer::linears)
            .map(|l| l.merged_bytes(DType::F32))
            .sum();
        // Adapters kept apart (no budget), merged into their weights (a budget for just
        // that), then merged with q/k/v and gate/up fused (the default).
        for (budget, merged, fused) in [
            (0, false, false),
            (merged_bytes, true, false),
            (MERGE_ADAPTERS_UP_TO, true, true),
        ] {
            let what = format!("merged: {merged}, fused: {fused}");
            let copy = model.for_decoding_merging_up_to(budget);
            let layer = &copy.model.layers[0];
            assert!(matches!(&layer.mlp.up_proj.weight, Weight::Dense(w) if w.val().dtype() == DType::F32));
            let lora = layer.self_attn.q_proj.lora.as_ref().map(|l| l.scale);
            assert_eq!(lora, (!merged).then_some(1.0), "{what}");
            assert_eq!(layer.self_attn.qkv.is_some(), fused, "{what}");
            assert_eq!(layer.mlp.gate_up.is_some(), fused, "{what}");
            assert_same_logits(&copy, &model, &what);
        }
    }

    /// A model that only generates is made its decoding copy (`into_decoding`): fused and
    /// merged whatever the budget says of a copy beside it, with the model's logits; and the
    /// copy's own decoding copy (what `generate` makes of it) keeps its fused groups under a
    /// budget of nothing, so it shares them rather than fusing again.
    #[test]
    fn a_model_made_its_decoding_copy_is_fused_and_shared_by_its_own_copy() {
        let device = Default::default();
        let mut model = CausalLm::<Flex>::init(&tiny_qwen2(), &device);
        let q = &mut model.model.layers[0].self_attn.q_proj;
        q.lora = Some(drawn_lora(q.weight.dims(), 0.0, &device));
        let copy = model.for_decoding_merging_up_to(0);
        let owned = model.clone().into_decoding();
        for layer in &owned.model.layers {
            assert!(layer.self_attn.qkv.is_some() && layer.mlp.gate_up.is_some());
            assert!(layer.self_attn.q_proj.lora.is_none());
        }
        assert_same_logits(&owned, &model, "into_decoding");
        assert!(
            copy.model.layers[0].self_attn.qkv.is_none(),
            "a budget of 0 fuses nothing anew"
        );
        let again = owned.for_decoding_merging_up_to(0);
        for layer in &again.model.layers {
            assert!(layer.self_attn.qkv.is_some() && layer.mlp.gate_up.is_some());
        }
        assert_same_logits(&again, &model, "the copy's copy");
    }

    /// A QLoRA model's decoding copy: NF4 weights dequantized with their adapters merged in
    /// (dense, no adapter) under the budget, left as they are over it, computing what the
    /// model computes either way.
    #[test]
    fn the_decoding_copy_of_an_nf4_model_computes_what_it_computes() {
        let device = Default::default();
        let mut model = CausalLm::<Flex>::init_with(&tiny_qwen2(), &device, BaseQuant::Nf4);
        for layer in &mut model.model.layers {
            let v = &mut layer.self_attn.v_proj;
            v.lora = Some(drawn_lora(v.weight.dims(), 0.0, &device));
        }
        for (budget, merged) in [(0, false), (MERGE_ADAPTERS_UP_TO, true)] {
            let copy = model.for_decoding_merging_up_to(budget);
            let v = &copy.model.layers[0].self_attn.v_proj;
            assert_eq!(matches!(v.weight, Weight::Dense(_)), merged);
            assert_eq!(v.lora.is_none(), merged);
            assert_same_logits(&copy, &model, &format!("merged: {merged}"));
        }
    }

    /// A rank-4 adapter with drawn A and B (B is zeros at init, which would make it a no-op)
    /// and a scale other than 1, for a weight of `[d_in, d_out]`.
    fn drawn_lora(
        [d_in, d_out]: [usize; 2],
        dropout: f64,
        device: &burn::tensor::Device<Flex>,
    ) -> Lora<Flex> {
        Lora {
            lora_a: Param::from_tensor(random([d_in, 4], device)),
            lora_b: Param::from_tensor(random([4, d_out], device)),
            scale: 2.0,
            dropout,
        }
    }

    /// `copy` and `model` give the same logits on two fixed rows, within 1e-5 of the largest.
    fn assert_same_logits(copy: &CausalLm<Flex>, model: &CausalLm<Flex>, what: &str) {
        let ids = Tensor::<Flex, 2, Int>::from_data([[1, 5, 9, 2], [7, 3, 3, 8]], &Default::default());
        let logits = |m: &CausalLm<Flex>| m.forward(ids.clone()).into_data().into_vec::<f32>().unwrap();
        assert_within(&logits(copy), &logits(model), 1e-5, what);
    }

    /// Every value of `got` within `tol` times the largest |value| of `want` of its own.
    fn assert_within(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= tol * scale, "{what}: {g} vs {w}");
        }
    }

    /// Decoding through the cache, across its buffers' growth (a prefill, then a token at a
    /// time past 256 and 512 positions), computes what one forward over the whole sequence
    /// computes.
    #[test]
    fn cached_decoding_across_buffer_growth_equals_the_full_forward() {
        cached_decoding_equals_the_full_forward::<Flex>(&tiny_qwen2(), &Default::default(), 1e-4);
    }

    /// The same on CUDA in bf16, where attention reads the cache's filled part as a view of
    /// its buffers ([`ModelKernels::prefix`]) at lengths that are not on the allocator's
    /// alignment, through the flash kernel (which takes head dim 64: the fixture's 16 goes
    /// to burn's attention, autotuned anew at every length). bf16 keeps about 3 significant
    /// digits.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_cached_decoding_across_buffer_growth_equals_the_full_forward() {
        let Some(device) = distill_kernels::cuda::stream::first_cuda_device() else {
            return;
        };
        let mut config = tiny_qwen2();
        config.head_dim = 64;
        config.hidden_size = config.num_attention_heads * config.head_dim;
        config.max_position_embeddings = 1024;
        cached_decoding_equals_the_full_forward::<burn::backend::Cuda<half::bf16>>(&config, &device, 3e-2);
    }

    /// The fused decoding step, replayed from a CUDA graph and issued directly, against the
    /// op-by-op one on the GPU, over paged caches of 16-slot pages: three left-padded rows of
    /// different prompt lengths, 300 steps (each row taking new pages, and the pools growing
    /// under the graph), the middle row leaving at step 150 and a short row joining at step
    /// 220 (padded by zero pages; each a new batch: a new graph), with an untied LM head and
    /// with a tied one. With the decoding copy's fused projections the logits
    /// must be equal bit for bit at every step, since all three issue the same kernels with
    /// the same arguments; with projections left apart (a copy over its budget), where the op
    /// path adds the MLP's residual after its GEMM instead of in it, the two fused modes bit
    /// for bit and the op path within bf16's rounding (3e-2 of the largest logit). The fused
    /// path must have run, and nearly every graph step must have been a replay. At four
    /// steps each row's logits are checked against a forward over its whole sequence without
    /// a cache (3e-2), which reads no page: the paged kernels' addressing is checked against
    /// another path, not only against itself.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_fused_decoding_steps_equal_the_op_by_op_steps() {
        use distill_kernels::cuda::decode::{self, Mode};
        type B = burn::backend::Cuda<half::bf16>;
        let Some(device) = distill_kernels::cuda::stream::first_cuda_device() else {
            return;
        };
        for (tied, fuse) in [(false, true), (true, true), (false, false)] {
            let mut config = tiny_qwen2();
            config.head_dim = 64;
            config.hidden_size = config.num_attention_heads * config.head_dim;
            config.tie_word_embeddings = tied;
            let model = CausalLm::<B>::init(&config, &device);
            let model = model.for_decoding_merging_up_to(if fuse { MERGE_ADAPTERS_UP_TO } else { 0 });
            assert_eq!(model.model.layers[0].self_attn.qkv.is_some(), fuse);
            let prompts: [&[u32]; 3] = [
                &[5, 9, 14, 3, 8],
                &[1, 2, 3, 4, 5, 6, 7, 8, 9],
                &[40, 41, 42, 43, 44, 45, 46],
            ];
            let width = prompts.iter().map(|p| p.len()).max().unwrap();
            let mut pads: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
            let ids: Vec<i64> = prompts
                .iter()
                .flat_map(|p| std::iter::repeat_n(0, width - p.len()).chain(p.iter().map(|&t| i64::from(t))))
                .collect();
            let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [3, width]), &device);
            let ctx = Context::left_padded(&model.rotary, &pads, width, 0, &device);
            let mut prefill = model.new_cache();
            model.hidden_states_with(input, &ctx, Some(&mut prefill));
            let layers = config.num_hidden_layers;
            let paged = || {
                let mut c = PagedKv::<B>::with_page_len(layers, 16);
                c.admit(&prefill, &[0, 1, 2], &pads);
                c
            };
            let (mut graph, mut direct, mut ops) = (paged(), paged(), paged());
            let host = |t: Tensor<B, 2>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
            let replayed = decode::issued().0[0];
            let mut rows = vec![0, 1, 2];
            // Each row's tokens so far, for the reference: a forward over the whole sequence
            // without a cache (the flash forward, not the decoding kernels).
            let mut seqs: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
            for step in 0..300 {
                if step == 150 {
                    let keep = [0, 2];
                    for c in [&mut graph, &mut direct, &mut ops] {
                        c.select_rows(&keep);
                    }
                    rows = keep.map(|r| rows[r]).to_vec();
                    pads = keep.map(|r| pads[r]).to_vec();
                }
                if step == 220 {
                    let short = [60u32, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71];
                    let ids: Vec<i64> = short.iter().map(|&t| i64::from(t)).collect();
                    let input =
                        Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, short.len()]), &device);
                    let mut joining = model.new_cache();
                    let ctx = Context::causal(&model.rotary, short.len(), 0, &device);
                    model.hidden_states_with(input, &ctx, Some(&mut joining));
                    for c in [&mut graph, &mut direct, &mut ops] {
                        c.admit(&joining, &[0], &[0]);
                    }
                    rows.push(3);
                    pads.push(width + step - short.len());
                    seqs.push(short.to_vec());
                }
                let tokens: Vec<u32> = rows
                    .iter()
                    .map(|r| ((step * 7 + r * 13) % 97 + 1) as u32)
                    .collect();
                let run = |mode, cache: &mut PagedKv<B>| {
                    decode::set_mode(mode);
                    let before = decode::steps_on_this_thread();
                    let logits = host(model.decode_step(&tokens, &pads, cache, &device));
                    let fused = decode::steps_on_this_thread() == before + 1;
                    assert_eq!(fused, mode != Mode::Ops, "step {step}, {mode:?}: fused or not");
                    logits
                };
                let (a, b, c) = (
                    run(Mode::Graph, &mut graph),
                    run(Mode::Direct, &mut direct),
                    run(Mode::Ops, &mut ops),
                );
                decode::set_mode(Mode::Graph);
                assert_eq!(a.len(), rows.len() * config.vocab_size);
                let first = a.iter().zip(&b).position(|(x, y)| x.to_bits() != y.to_bits());
                assert_eq!(
                    first, None,
                    "tied {tied}, fused {fuse}, step {step}: graph and direct differ at {first:?}"
                );
                if fuse {
                    let first = a.iter().zip(&c).position(|(x, y)| x.to_bits() != y.to_bits());
                    assert_eq!(
                        first, None,
                        "tied {tied}, step {step}: logits differ at {first:?}"
                    );
                } else {
                    assert_within(&a, &c, 3e-2, &format!("step {step}, projections apart"));
                }
                let v = config.vocab_size;
                for (i, &r) in rows.iter().enumerate() {
                    seqs[r].push(tokens[i]);
                    if [0, 149, 221, 299].contains(&step) {
                        let ids: Vec<i64> = seqs[r].iter().map(|&t| i64::from(t)).collect();
                        let n = ids.len();
                        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
                        let full = model.forward(input).narrow(1, n - 1, 1).reshape([1, v]);
                        let what = format!(
                            "tied {tied}, fused {fuse}, step {step}, row {r} against its full forward"
                        );
                        assert_within(&a[i * v..(i + 1) * v], &host(full), 3e-2, &what);
                    }
                }
            }
            for c in [&graph, &direct, &ops] {
                assert_eq!(c.len(), width + 300);
            }
            // Three batches, each a direct step and a capture before its replays.
            let replays = decode::issued().0[0] - replayed;
            assert!(
                replays >= 294,
                "tied {tied}, fused {fuse}: {replays} of 300 steps replayed"
            );
        }
    }

    fn tiny_qwen2() -> DecoderConfig {
        DecoderConfig::from_dir(&crate::test_util::fixtures().join("tiny-qwen2")).unwrap()
    }

    /// A 100-token prefill, then 500 single steps across the buffers' growth past 256 and 512
    /// positions, through the decoding copy as generation runs it (q/k/v and gate/up fused):
    /// the last step's logits against the model's one forward over all 600 tokens, within
    /// `tol` of the largest logit.
    fn cached_decoding_equals_the_full_forward<B: Kernels>(
        config: &DecoderConfig,
        device: &B::Device,
        tol: f32,
    ) {
        let model = CausalLm::<B>::init(config, device);
        let n = 600;
        let ids: Vec<i64> = (0..n).map(|i| (i * 37 % 97) as i64 + 1).collect();
        let tensor = |ids: &[i64]| {
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
        };
        let full = model.forward(tensor(&ids)); // [1, n, V]
        let decoding = model.for_decoding();
        assert!(decoding.model.layers[0].self_attn.qkv.is_some());
        let mut cache = decoding.new_cache();
        let mut last = decoding.forward_cached(tensor(&ids[..100]), &mut cache);
        for i in 100..n {
            last = decoding.forward_cached(tensor(&ids[i..i + 1]), &mut cache);
        }
        assert_eq!(cache.len(), n);
        let v = full.dims()[2];
        let host = |t: Tensor<B, 3>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
        let want = host(full.narrow(1, n - 1, 1));
        let got = host(last);
        assert_eq!(got.len(), v);
        assert_within(&got, &want, tol, "the last step's logits");
    }
}
