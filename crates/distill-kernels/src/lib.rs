//! The kernel seam. Model code (distill-models) calls GEMMs, attention and normalisation only
//! through [`ModelKernels`]; the trainer runs the loss's passes over logits and the optimizer
//! update through [`TrainKernels`]; both run the allocator as [`MemoryPolicy`] says.
//! [`Kernels`] is the three together. A backend swaps in faster kernels (cuBLAS GEMMs, flash
//! attention) by overriding a method in its impl (CUDA's: `cuda.rs`), without touching the
//! model or the trainer.
//! This is burn's "backend extension" pattern; the defaults are burn's own ops.
//!
//! How a kernel is swapped in: a method that the inner backend overrides (CUDA: cuBLAS for
//! [`ModelKernels::gemm`] and [`ModelKernels::bmm`], `cuda::cublas`; NVRTC-compiled kernels for
//! [`ModelKernels::flash_attention`] and its backward, the attention softmax, [`TrainKernels::softmax_stats`],
//! [`TrainKernels::softmax_grad`], [`TrainKernels::adamw`], RMSNorm and SwiGLU), and for `Autodiff<B, C>` an op with
//! its own backward whose backward calls the inner backend's methods again, so forward and
//! backward both get the fast kernel: [`gemm_autodiff`], [`attention_autodiff`] (O(T) saved
//! state: flash kernels, else `attention`'s blockwise path), RMSNorm and SwiGLU through
//! [`binary_autodiff`] (`elementwise`), RoPE ([`rope_autodiff`]), linears over f32 master
//! weights ([`master_linear`]: the weight cast again in the backward, not kept). Without autodiff, backends that override nothing keep
//! burn's ops bit for bit.

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{AttentionModuleOptions, FloatTensor};
use burn::tensor::{Bool, DType, FloatDType, Int, Tensor, TensorData, TensorMetadata, TensorPrimitive};

use crate::nf4::Nf4Tensor;

/// NF4 (QLoRA's 4-bit NormalFloat) weights: quantization, packing, dequantization.
pub mod nf4;

/// Attention with an O(T) backward state, block by block.
pub mod attention;
/// RMSNorm and SwiGLU with hand-written backward passes.
pub mod elementwise;
/// Linear layers over master weights of another dtype, cast again in the backward.
pub mod master_linear;
/// Linear layers over NF4 weights, dequantized again in the backward.
pub mod nf4_linear;
/// The MLP's down projection over SwiGLU, its input recomputed in the backward.
pub mod swiglu_linear;
pub use elementwise::rms_norm_default;
pub use swiglu_linear::LoraPair;
/// Layouts burn's strict contiguity check turns away: strides of size-1 dimensions.
pub mod layout;
/// The loss's passes over LM-head logits: row statistics and the gradient.
pub mod logits;
/// Tensors parked in host memory between the forward and the backward.
pub mod offload;
pub use offload::{Fetched, Parked};
/// What a fused decoding step reads: a decoder's weights and one step's inputs.
pub mod decode;
pub use decode::{CacheBuffers, DecodeInputs, DecodeLayer, DecodeWeights, PageTable, Projection, StepState};
/// The next token of each row, drawn from its logits on the device.
pub mod sample;
pub use sample::{PendingIds, RowSampling, SampledIds};

/// The CUDA backend's [`Kernels`] impl and its kernels: cuBLAS, NVRTC-compiled CUDA C, the
/// bridge to cubecl's stream (the `cuda` feature).
#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(feature = "cuda")]
pub use cuda::{Fallback, has_fallen_back, has_fallen_back_on_this_thread};

/// Which keys each query may see: the run of key positions `lo[r, i] ..= hi[r, i]` for query i
/// of batch row r (R rows: the batch, or 1 when all rows share them). Causal, packed-document
/// and left-padded attention are all such runs, so one [R, T] pair describes any mask the
/// models make, where a dense mask is [R, T, S]; a flash kernel skips whole key tiles outside
/// them ([`ModelKernels::flash_attention`]), the other paths expand them ([`KeyRanges::dense`]).
#[derive(Debug, Clone)]
pub struct KeyRanges<B: Backend> {
    /// [R, T] each.
    pub lo: Tensor<B, 2, Int>,
    pub hi: Tensor<B, 2, Int>,
    /// Known on the host: every run is `0 ..= i` (plain causal, keys and queries aligned), so a
    /// kernel that only does causal masks may take it without reading `lo` and `hi`.
    pub causal: bool,
}

impl<B: Backend> KeyRanges<B> {
    /// From per-row runs: `runs[r][i] = (lo, hi)`, every row of the same length.
    pub fn from_runs(runs: &[Vec<(usize, usize)>], device: &B::Device) -> Self {
        let (r, t) = (runs.len(), runs.first().map_or(0, Vec::len));
        let column = |pick: fn(&(usize, usize)) -> usize| {
            let data: Vec<i32> = runs.iter().flatten().map(|x| pick(x) as i32).collect();
            Tensor::from_data(TensorData::new(data, [r, t]), device)
        };
        let causal = runs
            .iter()
            .all(|row| row.iter().enumerate().all(|(i, &run)| run == (0, i)));
        KeyRanges {
            lo: column(|x| x.0),
            hi: column(|x| x.1),
            causal,
        }
    }

    /// The dense mask [R, T, S]: true where key j is outside query i's run (masked out).
    pub fn dense(&self, s: usize) -> Tensor<B, 3, Bool> {
        let [r, t] = self.lo.dims();
        let keys = Tensor::<B, 1, Int>::arange(0..s as i64, &self.lo.device())
            .reshape([1, 1, s])
            .expand([r, t, s]);
        let lo = self.lo.clone().reshape([r, t, 1]).expand([r, t, s]);
        let hi = self.hi.clone().reshape([r, t, 1]).expand([r, t, s]);
        keys.clone().lower(lo).bool_or(keys.greater(hi))
    }
}

impl<B: Backend, C: CheckpointStrategy> KeyRanges<Autodiff<B, C>> {
    /// The same ranges on the inner backend (they carry no gradient).
    pub fn inner(&self) -> KeyRanges<B> {
        KeyRanges {
            lo: self.lo.clone().inner(),
            hi: self.hi.clone().inner(),
            causal: self.causal,
        }
    }

    /// Ranges of the inner backend, for its autodiff wrapper.
    pub fn from_inner(r: KeyRanges<B>) -> Self {
        KeyRanges {
            lo: Tensor::from_inner(r.lo),
            hi: Tensor::from_inner(r.hi),
            causal: r.causal,
        }
    }
}

/// [B, KV, S, hd] -> [B, H, S, hd], each K/V head serving H/KV query heads in turn (as HF).
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, heads: usize) -> Tensor<B, 4> {
    let [b, kv, s, hd] = x.dims();
    let groups = heads / kv;
    if groups == 1 {
        return x;
    }
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, groups, s, hd])
        .reshape([b, heads, s, hd])
}

/// The gradient of [`repeat_kv`]: [B, H, S, hd] summed over each K/V head's group.
fn sum_groups<B: Backend>(x: Tensor<B, 4>, kv: usize) -> Tensor<B, 4> {
    let [b, h, s, hd] = x.dims();
    if h == kv {
        return x;
    }
    x.reshape([b, kv, h / kv, s, hd])
        .sum_dim(2)
        .reshape([b, kv, s, hd])
}

/// [`ModelKernels::attention`] without a fused kernel: K/V heads repeated, the key ranges expanded
/// to a dense mask, burn's attention.
pub fn attention_default<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    keys: Option<&KeyRanges<B>>,
) -> Tensor<B, 4> {
    let (k, v, mask) = dense_inputs(&q, &k, &v, keys);
    burn::tensor::module::attention(q, k, v, mask, None, AttentionModuleOptions::default())
}

/// What attention without key ranges or grouped heads takes: K and V repeated to the query
/// heads ([B, H, S, hd]) and the dense mask [B, H, T, S] (true = masked out).
fn dense_inputs<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    keys: Option<&KeyRanges<B>>,
) -> (Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 4, Bool>>) {
    let [b, h, t, _] = q.dims();
    let s = k.dims()[2];
    let mask = keys.map(|r| r.dense(s).unsqueeze_dim::<4>(1).expand([b, h, t, s]));
    (repeat_kv(k.clone(), h), repeat_kv(v.clone(), h), mask)
}

/// Model kernels: what a decoder's forward (and, under autodiff, its backward) runs. Each has a
/// burn-op default; CUDA overrides them with cuBLAS and fused kernels.
pub trait ModelKernels: Backend {
    /// True where [`ModelKernels::gemm`] beats burn's matmul (cuBLAS on CUDA). Then `linear` is one
    /// [`ModelKernels::gemm`] over the flattened input ([`linear_via_gemm`]), and under `Autodiff` both
    /// backward GEMMs call it too. Where false, `linear` is burn's own, unchanged.
    const FAST_GEMM: bool = false;

    /// True where [`ModelKernels::decode_step`] may run a step (CUDA).
    const FUSED_DECODE: bool = false;

    /// One 2-D GEMM on primitives: a [m, k] @ b [k, n] -> [m, n], same dtype in and out.
    /// `a` and `b` may be transposed views (`float_transpose`, strides swapped): a fast
    /// implementation takes those as op flags instead of copying.
    fn gemm(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(a, b)
    }

    /// Batched GEMM on primitives, attention's: a [B, H, M, K] @ b [B, H, K, N] -> [B, H, M, N]
    /// in dtype `out`. `out` other than the inputs' dtype is there for f32 scores from bf16
    /// Q and K: a fast implementation writes its f32 accumulator directly (no bf16 rounding,
    /// no cast kernel); the default rounds to the input dtype, then casts. `a` and `b` may be
    /// views transposed in their last two dims (`swap_dims(2, 3)`), taken as op flags by a
    /// fast implementation.
    fn bmm(a: FloatTensor<Self>, b: FloatTensor<Self>, out: FloatDType) -> FloatTensor<Self> {
        bmm_default::<Self>(a, b, out)
    }

    /// `acc + a @ b` in acc's dtype, shapes as [`ModelKernels::bmm`]: a gradient summed over chunks
    /// (f32 for bf16 a and b). The default is `bmm` into acc's dtype, then an add; CUDA
    /// accumulates in the GEMM (cuBLAS, beta = 1) into acc's buffer when nothing else holds
    /// it: no temporary the size of acc, no pass to add it.
    fn bmm_accumulate(
        acc: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        bmm_accumulate_default::<Self>(acc, a, b)
    }

    /// `x @ weight + bias`. x: [..., in], weight: [in, out], bias: [out] -> [..., out].
    fn linear<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, D> {
        if Self::FAST_GEMM {
            linear_via_gemm(x, weight, bias)
        } else {
            burn::tensor::module::linear(x, weight, bias)
        }
    }

    /// `residual + x @ weight`, a decoder layer's output projection and residual add.
    /// x: [B, T, in], weight: [in, out], residual: [B, T, out]. CUDA adds in the GEMM
    /// (cuBLAS, beta = 1) into the residual's buffer when nothing else holds it: one launch
    /// instead of two, and no [B, T, out] temporary.
    fn linear_residual(
        residual: Tensor<Self, 3>,
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 2>,
    ) -> Tensor<Self, 3> {
        residual + <Self as ModelKernels>::linear(x, weight, None)
    }

    /// `x @ weight` for a weight stored in another dtype than x: full fine-tuning's f32 master
    /// weights under bf16 activations, cast to x's dtype at use. x: [..., in], weight:
    /// [in, out] -> [..., out] in x's dtype. Under autodiff one node that keeps the master (a
    /// parameter, held anyway) instead of the cast, and casts again in the backward
    /// ([`master_linear`]); dW comes back in the master's dtype.
    fn linear_master<const D: usize>(x: Tensor<Self, D>, weight: Tensor<Self, 2>) -> Tensor<Self, D> {
        let w = weight.cast(x.dtype());
        <Self as ModelKernels>::linear(x, w, None)
    }

    /// [`ModelKernels::linear_master`] over an RMSNorm's output [B, T, in] -> [B, T, out]. Under
    /// autodiff the node keeps the norm's input and weight, which the norm's own node keeps
    /// anyway, instead of its output, and computes the output again in the backward for dW:
    /// one elementwise pass, for a [T, in] tensor less from the forward to the backward
    /// (two a layer: 11% of full fine-tuning's activations).
    fn linear_master_normed(x: &Normed<Self>, weight: Tensor<Self, 2>) -> Tensor<Self, 3> {
        Self::linear_master(x.out.clone(), weight)
    }

    /// An NF4 weight's values in HF layout [out, in], in `dtype` ([`crate::nf4`]).
    fn nf4_dequantize(w: &Nf4Tensor<Self>, dtype: DType) -> Tensor<Self, 2> {
        nf4::dequantize_default(w, dtype)
    }

    /// `x Wᵀ` for an NF4 weight W [out, in]: x [..., in] -> [..., out]. Under autodiff one node
    /// that keeps the 4-bit codes, not the dequantized W ([`nf4_linear`]).
    fn linear_nf4<const D: usize>(x: Tensor<Self, D>, w: &Nf4Tensor<Self>) -> Tensor<Self, D> {
        let dense = Self::nf4_dequantize(w, x.dtype());
        <Self as ModelKernels>::linear(x, dense.transpose(), None)
    }

    /// Scaled dot-product attention with scale 1/sqrt(head_dim), grouped K/V heads not
    /// repeated: q [B, H, T, hd], k/v [B, KV, S, hd] (query head h reads K/V head
    /// h / (H / KV)); `keys`: which keys each query sees, None = all. Returns [B, H, T, hd].
    fn attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        keys: Option<&KeyRanges<Self>>,
    ) -> Tensor<Self, 4> {
        attention_default(q, k, v, keys)
    }

    /// Attention of one query a row (a decoding step op by op) over a paged cache: q
    /// [B, H, 1, hd]; the keys and values the pools [slots, KV, hd] hold for positions 0..s
    /// of each row, read through `pages`; `keys` as [`ModelKernels::attention`]'s. Returns
    /// [B, H, 1, hd]. The default gathers the rows' positions first; CUDA reads the pages in
    /// place.
    fn paged_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        pages: &PageTable<'_, Self>,
        s: usize,
        keys: Option<&KeyRanges<Self>>,
    ) -> Tensor<Self, 4> {
        paged_attention_gathered(q, k, v, pages, s, keys)
    }

    /// A fused attention forward where this backend has one for these inputs, else None:
    /// (output [B, H, T, hd], log-sum-exp per query [B, H, T, 1] f32), shapes as
    /// [`ModelKernels::attention`].
    fn flash_attention(
        _q: &Tensor<Self, 4>,
        _k: &Tensor<Self, 4>,
        _v: &Tensor<Self, 4>,
        _keys: Option<&KeyRanges<Self>>,
    ) -> Option<(Tensor<Self, 4>, Tensor<Self, 4>)> {
        None
    }

    /// [`ModelKernels::flash_attention`] as training runs it, its output and log-sum-exp kept
    /// for [`ModelKernels::flash_attention_backward`]: a backend may use a fused attention
    /// there whose per-shape set-up only repeated shapes repay.
    fn flash_attention_for_training(
        q: &Tensor<Self, 4>,
        k: &Tensor<Self, 4>,
        v: &Tensor<Self, 4>,
        keys: Option<&KeyRanges<Self>>,
    ) -> Option<(Tensor<Self, 4>, Tensor<Self, 4>)> {
        Self::flash_attention(q, k, v, keys)
    }

    /// The backward of [`ModelKernels::flash_attention`]: (dq, dk, dv) from its inputs, its output
    /// and log-sum-exp, and the output's gradient; None where it has none.
    #[allow(clippy::too_many_arguments)]
    fn flash_attention_backward(
        _q: &Tensor<Self, 4>,
        _k: &Tensor<Self, 4>,
        _v: &Tensor<Self, 4>,
        _keys: Option<&KeyRanges<Self>>,
        _out: &Tensor<Self, 4>,
        _lse: &Tensor<Self, 4>,
        _d_out: &Tensor<Self, 4>,
    ) -> Option<(Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>)> {
        None
    }

    /// Attention's softmax over the keys of one block ([`attention`]): P = softmax(scale *
    /// scores, masked) in `p_dtype` and each query's log-sum-exp in f32. scores: [r, h, T, S]
    /// f32, unscaled (the Q Kᵀ GEMM's output); mask: [r, h, T, S], true = masked out.
    /// Returns (P [r, h, T, S], lse [r, h, T, 1]).
    fn attention_probs(
        scores: Tensor<Self, 4>,
        mask: Option<Tensor<Self, 4, Bool>>,
        scale: f64,
        p_dtype: FloatDType,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>) {
        attention::probs_default(scores, mask, scale, p_dtype)
    }

    /// The backward of [`ModelKernels::attention_probs`] given dP = dO Vᵀ [r, h, T, S] f32 and
    /// delta = rowsum(dO ∘ O) [r, h, T, 1] f32: dS = P ∘ (dP - delta) · scale in `ds_dtype`,
    /// and P, recomputed from the scores and lse, in `p_dtype`. Returns (dS, P).
    #[allow(clippy::too_many_arguments)]
    fn attention_probs_grad(
        scores: Tensor<Self, 4>,
        dp: Tensor<Self, 4>,
        lse: Tensor<Self, 4>,
        delta: Tensor<Self, 4>,
        mask: Option<Tensor<Self, 4, Bool>>,
        scale: f64,
        ds_dtype: FloatDType,
        p_dtype: FloatDType,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>) {
        attention::probs_grad_default(scores, dp, lse, delta, mask, scale, ds_dtype, p_dtype)
    }

    /// RMSNorm over the last dim, computed in f32 whatever the storage dtype (as HF does),
    /// then scaled by `weight` in the input dtype. x: [B, T, C], weight: [C].
    fn rms_norm(x: Tensor<Self, 3>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        rms_norm_default(x, weight, eps)
    }

    /// The backward of [`ModelKernels::rms_norm`] (`eps` as there): (dx [B, T, C], d weight [C])
    /// from its inputs and the output's gradient dy [B, T, C].
    fn rms_norm_backward(
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 1>,
        dy: Tensor<Self, 3>,
        eps: f64,
    ) -> (Tensor<Self, 3>, Tensor<Self, 1>) {
        elementwise::rms_norm_backward_default(x, weight, dy, eps)
    }

    /// Rotary position embedding in HF's rotate_half form: x · cos + rotate_half(x) · sin
    /// over the head dim. x: [B, H, T, hd]; cos, sin: [R, T, hd] (R = B, or 1 when the rows
    /// share positions), rounded to x's dtype as transformers does. Its backward is
    /// itself with -sin.
    fn rope(x: Tensor<Self, 4>, cos: &Tensor<Self, 3>, sin: &Tensor<Self, 3>) -> Tensor<Self, 4> {
        elementwise::rope_default(x, cos, sin)
    }

    /// A cached step's attention inputs out of one fused q|k|v projection, put where they go:
    /// y [B, T, (H + 2 KV) hd] plus `bias` [(H + 2 KV) hd] split into heads; q and k rotated
    /// ([`ModelKernels::rope`]; cos, sin [R, T, hd]); k and v written into the cache buffers
    /// `k_cache`, `v_cache` [B, KV, cap, hd] at positions `at..at + T`. Returns (q [B, H, T,
    /// hd], k_cache, v_cache). The default is column views, two RoPEs and two slice-assigns;
    /// CUDA does it in one kernel when it may write the buffers in place.
    #[allow(clippy::too_many_arguments)]
    fn rope_qkv(
        y: Tensor<Self, 3>,
        bias: Option<Tensor<Self, 1>>,
        heads: [usize; 2],
        cos: &Tensor<Self, 3>,
        sin: &Tensor<Self, 3>,
        k_cache: Tensor<Self, 4>,
        v_cache: Tensor<Self, 4>,
        at: usize,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        elementwise::rope_qkv_default(y, bias, heads, cos, sin, k_cache, v_cache, at)
    }

    /// The SwiGLU MLP's activation: silu(gate) * up, both [B, T, I].
    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        elementwise::swiglu_default(gate, up)
    }

    /// The backward of [`ModelKernels::swiglu`]: (d gate, d up) from its inputs and the output's
    /// gradient, all [B, T, I].
    fn swiglu_backward(
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        dy: Tensor<Self, 3>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 3>) {
        elementwise::swiglu_backward_default(gate, up, dy)
    }

    /// The SwiGLU MLP's down projection: swiglu(gate, up) W, plus (swiglu(gate, up) A) B with
    /// a LoRA adapter (A's scale folded in). gate, up: [B, T, I]; W: [I, N]; A: [I, r];
    /// B: [r, N] -> [B, T, N]. Under autodiff one node that keeps gate and up and recomputes
    /// their product in the backward ([`swiglu_linear`]).
    fn swiglu_linear(
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        w: LinearWeight<Self>,
        lora: Option<LoraPair<Self>>,
    ) -> Tensor<Self, 3> {
        swiglu_linear::swiglu_linear_default(gate, up, w, lora)
    }

    /// The first `len` positions of `x` along `dim`, as a view of x's buffer: the filled part
    /// of a KV cache, read by attention at every decode step. burn's `narrow` is a view only
    /// when both ends of the cut fall on the allocator's alignment, and otherwise copies the
    /// whole prefix, which is O(S) traffic per layer per token; a backend that can describe a
    /// shorter shape over the same buffer (CUDA) does so.
    fn prefix(x: Tensor<Self, 4>, dim: usize, len: usize) -> Tensor<Self, 4> {
        x.narrow(dim, 0, len)
    }

    /// Columns `start..start + len` of the last dim of `x`, as a view of x's buffer where the
    /// backend can describe one (CUDA: an offset and the same strides): q, k and v, or gate
    /// and up, out of one fused projection's output, read in place by the next kernels.
    /// burn's `narrow` is a view only when the cut falls on the allocator's alignment.
    fn columns<const D: usize>(x: Tensor<Self, D>, start: usize, len: usize) -> Tensor<Self, D> {
        x.narrow(D - 1, start, len)
    }

    /// The next token of each row of `logits` [b, V] by [`sample`]'s rule, row r drawn as
    /// `rows[r]` says; only the first `vocab` columns are candidates (embedding rows past the
    /// tokenizer are padding). Only the ids reach the host: CUDA draws on the device. The
    /// default copies the logits to the host and draws there.
    fn sample_rows(logits: Tensor<Self, 2>, vocab: usize, rows: &[RowSampling]) -> Result<Vec<u32>, String> {
        sample::sample_rows_default(logits, vocab, rows)
    }

    /// [`ModelKernels::sample_rows`] without waiting for the ids: they stay on the device as
    /// the next step's input, and come to the host while the GPU runs that step (a decoding
    /// loop one step ahead). The default draws on the host at once.
    fn sample_rows_ahead(
        logits: Tensor<Self, 2>,
        vocab: usize,
        rows: &[RowSampling],
    ) -> Result<SampledIds<Self>, String> {
        sample::sample_rows_ahead_default(logits, vocab, rows)
    }

    /// One decoding step of a whole decoder issued at once: the token of each row ->
    /// logits [B, V], with every layer's keys and values of position `x.at` written into its
    /// `caches` pools where `x.pages` puts them. The pools come back either way. None where the backend
    /// has no such path or cannot take these inputs: the caller then runs the layers op by
    /// op. CUDA issues the op-by-op path's kernels, in its order with its arguments, from one
    /// device-thread task, so both give the same logits bit for bit; the default has no
    /// such path ([`ModelKernels::FUSED_DECODE`] false: callers need not build its inputs).
    /// `state` is what the backend keeps between the steps of one cache.
    fn decode_step(
        _weights: &DecodeWeights<'_, Self>,
        _x: DecodeInputs<'_, Self>,
        caches: CacheBuffers<Self>,
        _state: &mut StepState,
    ) -> (Option<Tensor<Self, 2>>, CacheBuffers<Self>) {
        (None, caches)
    }
}

/// [`ModelKernels::paged_attention`] with the rows' positions gathered into contiguous keys
/// and values first, then [`ModelKernels::attention`]: the default, and CUDA's fallback.
pub fn paged_attention_gathered<B: ModelKernels>(
    q: Tensor<B, 4>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    pages: &PageTable<'_, B>,
    s: usize,
    keys: Option<&KeyRanges<B>>,
) -> Tensor<B, 4> {
    let (k, v) = (
        decode::gather_pages(k, pages, s),
        decode::gather_pages(v, pages, s),
    );
    <B as ModelKernels>::attention(q, k, v, keys)
}

/// Training-only kernels: the loss's passes over logits and the optimizer's update.
pub trait TrainKernels: Backend {
    /// Softmax statistics of each row of logits z [N, V] (any float dtype) over its first
    /// `limit` columns (the rest, vocabulary padding, take no part): (max, Σ exp(z - max),
    /// Σ exp((z - max) / t)), each [N, 1] f32.
    fn softmax_stats(
        z: Tensor<Self, 2>,
        t: f64,
        limit: usize,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 2>) {
        logits::stats_default(z, t, limit)
    }

    /// A softmax-family loss's gradient over logits z [N, V], in `dtype`:
    ///     g[i, j] = a[i] exp(z[i, j] - max[i]) + b[i] exp((z[i, j] - max[i]) / t)  (j < limit, else 0)
    /// plus `values[i, m]` at column `ids[i, m]` (repeated columns add up), summed in f32 and
    /// rounded once. max, a, b: [N, 1] f32 (b None: no second term); ids: [N, M] int, values:
    /// [N, M] f32.
    #[allow(clippy::too_many_arguments)]
    fn softmax_grad(
        z: Tensor<Self, 2>,
        max: Tensor<Self, 2>,
        a: Tensor<Self, 2>,
        b: Option<Tensor<Self, 2>>,
        t: f64,
        limit: usize,
        ids: Tensor<Self, 2, Int>,
        values: Tensor<Self, 2>,
        dtype: FloatDType,
    ) -> Tensor<Self, 2> {
        logits::grad_default(z, max, a, b, t, limit, ids, values, dtype)
    }

    /// One AdamW update of flat f32 tensors (an optimizer group): returns (p, m, v) with
    ///     m' = β1 m + a1 g,   v' = β2 v + a2 g²,   p' = decay · p - step · m' / (sqrt(v') + eps)
    /// where the scalars fold in the clipping scale, weight decay and bias corrections
    /// ([`AdamWScalars`]). The default is burn ops; CUDA runs it as one kernel.
    fn adamw(
        p: Tensor<Self, 1>,
        g: Tensor<Self, 1>,
        m: Tensor<Self, 1>,
        v: Tensor<Self, 1>,
        c: AdamWScalars,
    ) -> (Tensor<Self, 1>, Tensor<Self, 1>, Tensor<Self, 1>) {
        adamw_default(p, g, m, v, c)
    }

    /// Σ x² of an f32 [N] tensor, as [1]: a flat group's share of the global gradient norm.
    /// burn's square and sum in f64 by default (an f32 running sum over a group of millions
    /// drifts in the fifth digit); CUDA reads the group once, summing per-block partials.
    fn sum_squares(x: Tensor<Self, 1>) -> Tensor<Self, 1> {
        x.cast(burn::tensor::DType::F64)
            .square()
            .sum()
            .cast(burn::tensor::DType::F32)
    }

    /// The parts (any float dtypes) cast to f32 and laid end to end: [Σ n_i]. The optimizer's
    /// flat groups ([`TrainKernels::adamw`]): burn's `cat` is a kernel per part, hundreds a step
    /// for LoRA; CUDA copies up to 32 parts a launch.
    fn concat_f32(parts: Vec<Tensor<Self, 1>>) -> Tensor<Self, 1> {
        concat_f32_default(parts)
    }
}

/// How the backend's allocator is run: exact-size buffers and trims between a step's phases.
pub trait MemoryPolicy: Backend {
    /// Hands what the device's pool keeps for reuse back where later work can allocate any
    /// size: between a training step's phases whose tensors differ in size (activations, then
    /// the optimizer's flat groups) and at the step's end. Kept, a phase's freed buffers stayed
    /// reserved through the next ([`MemoryPolicy::exact_allocations`]). burn's `memory_cleanup` by
    /// default; CUDA first makes the driver keep what is freed for the next allocation.
    fn trim_memory(device: &Self::Device) {
        Self::memory_cleanup(device)
    }

    /// Makes the backend allocate each buffer at its exact size and keep a freed one for the
    /// next request of that size, until [`MemoryPolicy::trim_memory`]. Training calls it before the
    /// device's first use. cubecl's default cuts buffers from large pages per size class and
    /// keeps a page while any slice of it lives: a step's long-lived activations were scattered
    /// through pages otherwise free, so 1.5B LoRA reserved 21.4 GiB for 15.0 GiB in use.
    /// Nothing by default.
    fn exact_allocations() {}

    /// Starts copying `x` to host memory ([`offload`]); its device buffer is freed once the
    /// copy is done. The default copies at once through burn's `into_data`.
    fn park<const D: usize>(x: Tensor<Self, D>) -> Result<Parked<Self>, String> {
        offload::park_default(x)
    }

    /// Starts copying a parked tensor back into a new device buffer.
    fn fetch(parked: Parked<Self>) -> Result<Fetched<Self>, String> {
        offload::fetch_default(parked)
    }

    /// The fetched tensor, for work queued from now on, which reads it after its copy has
    /// arrived.
    fn land<const D: usize>(fetched: Fetched<Self>) -> Result<Tensor<Self, D>, String> {
        offload::land_default(fetched)
    }

    /// A parked tensor's contents, read on the host (a checkpoint of parked state), once its
    /// copy out has finished; it stays parked.
    fn read_parked(parked: &Parked<Self>) -> Result<TensorData, String> {
        offload::read_default(parked)
    }
}

/// Everything a backend provides to distill: [`ModelKernels`], [`TrainKernels`] and
/// [`MemoryPolicy`]. Implemented for every backend that has all three.
pub trait Kernels: ModelKernels + TrainKernels + MemoryPolicy {}

impl<B: ModelKernels + TrainKernels + MemoryPolicy> Kernels for B {}

/// An RMSNorm's output [B, T, C] with what made it, for the linear layers that read it
/// ([`ModelKernels::linear_master_normed`]).
#[derive(Debug, Clone)]
pub struct Normed<B: Backend> {
    pub out: Tensor<B, 3>,
    pub input: NormInput<B>,
}

/// An RMSNorm's input x [B, T, C], weight [C] (in x's dtype) and epsilon.
#[derive(Debug, Clone)]
pub struct NormInput<B: Backend> {
    pub x: Tensor<B, 3>,
    pub weight: Tensor<B, 1>,
    pub eps: f64,
}

impl<B: ModelKernels> NormInput<B> {
    /// The norm's output, [`ModelKernels::rms_norm`].
    pub fn output(&self) -> Tensor<B, 3> {
        B::rms_norm(self.x.clone(), self.weight.clone(), self.eps)
    }

    /// This RMSNorm applied: its output beside its input.
    pub fn normed(self) -> Normed<B> {
        Normed {
            out: self.output(),
            input: self,
        }
    }
}

impl<B: Backend, C: CheckpointStrategy> NormInput<Autodiff<B, C>> {
    /// The same on the inner backend.
    pub fn inner(&self) -> NormInput<B> {
        NormInput {
            x: self.x.clone().inner(),
            weight: self.weight.clone().inner(),
            eps: self.eps,
        }
    }
}

/// A linear layer's weight as the kernels take it.
#[derive(Debug, Clone)]
pub enum LinearWeight<B: Backend> {
    /// burn layout [in, out], in the activations' dtype.
    Dense(Tensor<B, 2>),
    /// burn layout [in, out] in another dtype (an f32 master weight): cast to the activations'
    /// dtype at each use, in the backward again ([`ModelKernels::linear_master`]).
    Master(Tensor<B, 2>),
    /// QLoRA's frozen base: dequantized to the activations' dtype at each use.
    Nf4(Nf4Tensor<B>),
}

impl<B: ModelKernels> LinearWeight<B> {
    /// The weight [in, out] in `dtype`; NF4 dequantized (a transposed view of HF's [out, in]).
    pub fn dense(&self, dtype: DType) -> Tensor<B, 2> {
        match self {
            LinearWeight::Dense(w) => w.clone(),
            LinearWeight::Master(w) => w.clone().cast(dtype),
            LinearWeight::Nf4(w) => B::nf4_dequantize(w, dtype).transpose(),
        }
    }

    /// x [..., in] through this weight (plus `bias` [out]): [`ModelKernels::linear`], or
    /// [`ModelKernels::linear_nf4`] and the bias added after.
    pub fn linear<const D: usize>(&self, x: Tensor<B, D>, bias: Option<Tensor<B, 1>>) -> Tensor<B, D> {
        match self {
            LinearWeight::Dense(w) => <B as ModelKernels>::linear(x, w.clone(), bias),
            LinearWeight::Master(w) => add_bias(B::linear_master(x, w.clone()), bias),
            LinearWeight::Nf4(w) => add_bias(B::linear_nf4(x, w), bias),
        }
    }

    /// [in, out].
    pub fn dims(&self) -> [usize; 2] {
        match self {
            LinearWeight::Dense(w) | LinearWeight::Master(w) => w.dims(),
            LinearWeight::Nf4(w) => [w.shape[1], w.shape[0]],
        }
    }
}

/// y [..., N] + bias [N], when there is one.
/// `t` in `dtype`, without a cast when it is already there. Parameters may be stored in
/// another dtype than the activations (f32 trainable weights in a bf16 model): cast at use, so
/// autodiff carries gradients back in the parameter's dtype.
pub fn cast_to<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

pub fn add_bias<B: Backend, const D: usize>(y: Tensor<B, D>, bias: Option<Tensor<B, 1>>) -> Tensor<B, D> {
    match bias {
        Some(b) => y + b.unsqueeze(),
        None => y,
    }
}

/// [`TrainKernels::concat_f32`] as burn ops; a single f32 part as it is (no copy).
pub fn concat_f32_default<B: Backend>(parts: Vec<Tensor<B, 1>>) -> Tensor<B, 1> {
    let mut parts: Vec<Tensor<B, 1>> = parts.into_iter().map(|p| p.cast(DType::F32)).collect();
    if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Tensor::cat(parts, 0)
    }
}

/// The scalars of one [`TrainKernels::adamw`] update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    pub beta1: f32,
    /// (1 - β1) times the gradient's scale.
    pub a1: f32,
    pub beta2: f32,
    /// (1 - β2) times the gradient's scale squared.
    pub a2: f32,
    /// 1 - lr · weight decay (1 without decay).
    pub decay: f32,
    /// The step size, bias corrections included.
    pub step: f32,
    pub eps: f32,
}

/// [`TrainKernels::adamw`] as burn ops.
pub fn adamw_default<B: Backend>(
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    c: AdamWScalars,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let m = m.mul_scalar(c.beta1) + g.clone().mul_scalar(c.a1);
    let v = v.mul_scalar(c.beta2) + g.square().mul_scalar(c.a2);
    let p = if c.decay == 1.0 { p } else { p.mul_scalar(c.decay) };
    let denom = v.clone().sqrt().add_scalar(c.eps);
    (p - (m.clone() / denom).mul_scalar(c.step), m, v)
}

/// [`ModelKernels::gemm`] on tensors: a [m, k] @ b [k, n] -> [m, n].
pub fn gemm<B: ModelKernels>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    same_dtype("gemm", a.dtype(), b.dtype());
    tensor(B::gemm(prim(a), prim(b)))
}

/// Panics on operands of two float dtypes. burn-cuda 0.21 runs a mixed-dtype op without
/// converting (it reads one buffer as the other's type), so the result would be silently
/// wrong on the GPU while the CPU backend gets it right; a panic names the caller's mistake.
pub fn same_dtype(op: &str, a: DType, b: DType) {
    assert_eq!(
        a, b,
        "{op}: operands of two dtypes ({a:?} and {b:?}); cast one first"
    );
}

/// [`ModelKernels::bmm`] as burn ops: matmul, then a cast if `out` is not the result's dtype.
pub fn bmm_default<B: Backend>(a: FloatTensor<B>, b: FloatTensor<B>, out: FloatDType) -> FloatTensor<B> {
    let c = B::float_matmul(a, b);
    if c.dtype() == DType::from(out) {
        c
    } else {
        B::float_cast(c, out)
    }
}

/// [`ModelKernels::bmm_accumulate`] as [`ModelKernels::bmm`] then an add.
pub fn bmm_accumulate_default<B: ModelKernels>(
    acc: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
) -> FloatTensor<B> {
    let out = acc.dtype().into();
    B::float_add(acc, B::bmm(a, b, out))
}

/// [`ModelKernels::bmm`] on tensors: a [B, H, M, K] @ b [B, H, K, N] -> [B, H, M, N] in `out`.
pub fn bmm<B: ModelKernels>(a: Tensor<B, 4>, b: Tensor<B, 4>, out: FloatDType) -> Tensor<B, 4> {
    same_dtype("bmm", a.dtype(), b.dtype());
    tensor(B::bmm(prim(a), prim(b), out))
}

/// [`ModelKernels::bmm_accumulate`] on tensors: acc + a @ b in acc's dtype.
pub fn bmm_accumulate<B: ModelKernels>(acc: Tensor<B, 4>, a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
    same_dtype("bmm_accumulate", a.dtype(), b.dtype());
    tensor(B::bmm_accumulate(prim(acc), prim(a), prim(b)))
}

/// A float primitive as a tensor, and back: custom ops work on primitives.
pub(crate) fn tensor<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

pub(crate) fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// `linear` as a single [`ModelKernels::gemm`]: batch dims flattened into M (a reshape, free for a
/// contiguous x), then the bias broadcast-added. Under `Autodiff` the reshape and the add are
/// burn's tracked ops (dbias = dY summed over M by the add's backward) and the GEMM is
/// [`gemm_autodiff`].
pub fn linear_via_gemm<B: ModelKernels, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    add_bias(flat_linear(x, weight.dims(), |x2| gemm(x2, weight)), bias) // (..., N)
}

/// A linear map of x [..., K] to [..., N] computed by `f` on x flattened to [M, K] (a reshape,
/// free for a contiguous x) and reshaped back. `weight` is [K, N], for the shape check.
pub fn flat_linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    [k_w, n]: [usize; 2],
    f: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let k = dims[D - 1];
    assert_eq!(k, k_w, "linear: x {dims:?} does not fit weight [{k_w}, {n}]");
    let y = f(x.reshape([dims[..D - 1].iter().product(), k])); // (M, N)
    let mut out = dims;
    out[D - 1] = n;
    y.reshape(out)
}

/// [`ModelKernels::gemm`] under autodiff, with its own backward (burn book, "custom kernels"):
/// dA = dC @ Bᵀ and dB = Aᵀ @ dC, each by the inner backend's `gemm` on transposed views, so
/// on CUDA the backward GEMMs are cuBLAS calls with transpose flags, not copies. Like burn's
/// linear, A is kept for the backward only if B needs a gradient, and B only if A does.
pub fn gemm_autodiff<B: ModelKernels, C: CheckpointStrategy>(
    a: FloatTensor<Autodiff<B, C>>,
    b: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct Gemm;

    impl<B: ModelKernels> Backward<B, 2> for Gemm {
        type State = (Option<NodeId>, Option<NodeId>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
            let [node_a, node_b] = ops.parents;
            let grad = grads.consume::<B>(&ops.node); // dC (m, n)
            let (a_state, b_state) = ops.state;
            if let Some(node) = node_a {
                let b: FloatTensor<B> =
                    checkpointer.retrieve_node_output(b_state.expect("B kept when A needs a grad"));
                let grad_a = B::gemm(grad.clone(), B::float_transpose(b)); // (m, n) @ (n, k)
                grads.register::<B>(node.id, grad_a);
            }
            if let Some(node) = node_b {
                let a: FloatTensor<B> =
                    checkpointer.retrieve_node_output(a_state.expect("A kept when B needs a grad"));
                let grad_b = B::gemm(B::float_transpose(a), grad); // (k, m) @ (m, n)
                grads.register::<B>(node.id, grad_b);
            }
        }
    }

    let a_tracked = a.is_tracked();
    let b_tracked = b.is_tracked();
    match Gemm
        .prepare::<C>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let a_state = b_tracked.then(|| prep.checkpoint(&a));
            let b_state = a_tracked.then(|| prep.checkpoint(&b));
            prep.finish((a_state, b_state), B::gemm(a.primitive, b.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(B::gemm(a.primitive, b.primitive)),
    }
}

/// An op of two float inputs whose backward is written by hand ([`binary_autodiff`]): the
/// graph keeps the two inputs and nothing else.
pub trait BinaryOp<B: Backend>: std::fmt::Debug + Clone + Send + 'static {
    /// The output, on the inner backend.
    fn forward(&self, a: FloatTensor<B>, b: FloatTensor<B>) -> FloatTensor<B>;
    /// (d a, d b) from the inputs and the output's gradient.
    fn backward(
        &self,
        a: FloatTensor<B>,
        b: FloatTensor<B>,
        d_out: FloatTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>);
}

/// `op` as one autodiff node.
pub fn binary_autodiff<B: Backend, C: CheckpointStrategy, Op: BinaryOp<B>>(
    op: Op,
    a: FloatTensor<Autodiff<B, C>>,
    b: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct Node<Op>(Op);

    impl<B: Backend, Op: BinaryOp<B>> Backward<B, 2> for Node<Op> {
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_a, node_b] = ops.parents;
            let d_out = grads.consume::<B>(&ops.node);
            let (a, b) = ops.state;
            let (da, db) = self.0.backward(a, b, d_out);
            if let Some(node) = node_a {
                grads.register::<B>(node.id, da);
            }
            if let Some(node) = node_b {
                grads.register::<B>(node.id, db);
            }
        }
    }

    match Node(op.clone())
        .prepare::<C>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = op.forward(a.primitive.clone(), b.primitive.clone());
            prep.finish((a.primitive, b.primitive), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(op.forward(a.primitive, b.primitive)),
    }
}

/// [`ModelKernels::rope`] as one autodiff node: the graph keeps the tables, not x; the backward
/// is the rotation by -angle, [`ModelKernels::rope`] with -sin.
pub fn rope_autodiff<B: ModelKernels, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    cos: Tensor<B, 3>,
    sin: Tensor<B, 3>,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct Rope;

    impl<B: ModelKernels> Backward<B, 1> for Rope {
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node] = ops.parents;
            let dy = grads.consume::<B>(&ops.node);
            let (cos, sin) = ops.state;
            if let Some(node) = node {
                let dx = B::rope(tensor(dy), &tensor(cos), &tensor::<B, 3>(sin).neg());
                grads.register::<B>(node.id, prim(dx));
            }
        }
    }

    match Rope.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let out = B::rope(tensor(x.primitive), &cos, &sin);
            prep.finish((prim(cos), prim(sin)), prim(out))
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(B::rope(tensor(x.primitive), &cos, &sin))),
    }
}

/// [`ModelKernels::attention`] under autodiff with its own backward: the graph keeps Q, K, V, the
/// output and the log-sum-exp per query, not the [B, H, T, S] scores and probabilities burn's
/// fallback keeps. Forward and backward are the backend's flash kernels where it has them
/// ([`ModelKernels::flash_attention`]), else the blockwise path ([`attention`]: K/V heads repeated,
/// dense mask, scores recomputed block by block in the backward).
/// `DISTILL_ATTENTION=blockwise` skips the flash kernels, `=burn` uses burn's attention (for
/// comparison).
pub fn attention_autodiff<B: ModelKernels, C: CheckpointStrategy>(
    q: Tensor<Autodiff<B, C>, 4>,
    k: Tensor<Autodiff<B, C>, 4>,
    v: Tensor<Autodiff<B, C>, 4>,
    keys: Option<&KeyRanges<Autodiff<B, C>>>,
    budget: usize,
) -> Tensor<Autodiff<B, C>, 4> {
    #[derive(Debug)]
    struct Attention;

    impl<B: ModelKernels> Backward<B, 3> for Attention {
        type State = Saved<B>;

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_q, node_k, node_v] = ops.parents;
            let d_out = tensor::<B, 4>(grads.consume::<B>(&ops.node));
            let (dq, dk, dv) = ops.state.backward(&d_out);
            for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
                if let Some(node) = node {
                    grads.register::<B>(node.id, prim(grad));
                }
            }
        }
    }

    let keys = keys.map(KeyRanges::inner);
    let (qi, ki, vi) = (q.clone().inner(), k.clone().inner(), v.clone().inner());
    let (q, k, v) = (prim(q), prim(k), prim(v));
    let out = match Attention
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let saved = Saved::forward(qi, ki, vi, keys, budget);
            let out = prim(saved.out.clone());
            prep.finish(saved, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(Saved::forward(qi, ki, vi, keys, budget).out)),
    };
    tensor(out)
}

/// What [`attention_autodiff`]'s backward needs: the inputs, the output, the log-sum-exp, and
/// which path computed them.
#[derive(Debug, Clone)]
struct Saved<B: Backend> {
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    keys: Option<KeyRanges<B>>,
    out: Tensor<B, 4>,
    lse: Tensor<B, 4>,
    /// None: the flash kernels; Some(bytes): the blockwise path with this score budget.
    blockwise: Option<usize>,
}

impl<B: ModelKernels> Saved<B> {
    fn forward(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        keys: Option<KeyRanges<B>>,
        budget: usize,
    ) -> Self {
        let flash = (attention_mode() == AttentionMode::Flash)
            .then(|| B::flash_attention_for_training(&q, &k, &v, keys.as_ref()))
            .flatten();
        let ((out, lse), blockwise) = match flash {
            Some(found) => (found, None),
            None => {
                let (kr, vr, mask) = dense_inputs(&q, &k, &v, keys.as_ref());
                (
                    attention::forward(&q, &kr, &vr, mask.as_ref(), budget),
                    Some(budget),
                )
            }
        };
        Saved {
            q,
            k,
            v,
            keys,
            out,
            lse,
            blockwise,
        }
    }

    fn backward(self, d_out: &Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let Saved {
            q,
            k,
            v,
            keys,
            out,
            lse,
            blockwise,
        } = self;
        if blockwise.is_none()
            && let Some(grads) = B::flash_attention_backward(&q, &k, &v, keys.as_ref(), &out, &lse, d_out)
        {
            return grads;
        }
        let kv = k.dims()[1];
        let (kr, vr, mask) = dense_inputs(&q, &k, &v, keys.as_ref());
        let budget = blockwise.unwrap_or(attention::BLOCK_BYTES);
        let (dq, dk, dv) = attention::backward(&q, &kr, &vr, mask.as_ref(), &out, &lse, d_out, budget);
        (dq, sum_groups(dk, kv), sum_groups(dv, kv))
    }
}

/// How training computes attention: `DISTILL_ATTENTION` = flash (default: the backend's fused
/// kernels where it has them, else blockwise), blockwise, or burn (burn's own attention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMode {
    Flash,
    Blockwise,
    Burn,
}

/// The [`AttentionMode`] from the environment, read once.
pub fn attention_mode() -> AttentionMode {
    static MODE: std::sync::OnceLock<AttentionMode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("DISTILL_ATTENTION").as_deref() {
        Err(_) | Ok("") | Ok("flash") => AttentionMode::Flash,
        Ok("blockwise") => AttentionMode::Blockwise,
        Ok("burn") => AttentionMode::Burn,
        Ok(other) => {
            eprintln!(
                "warning: DISTILL_ATTENTION={other:?} is not one of flash, blockwise, burn; using flash"
            );
            AttentionMode::Flash
        }
    })
}

impl ModelKernels for Flex {}
impl TrainKernels for Flex {}
impl MemoryPolicy for Flex {}

impl<B: Kernels, C: CheckpointStrategy> ModelKernels for Autodiff<B, C> {
    const FAST_GEMM: bool = B::FAST_GEMM;

    fn gemm(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        gemm_autodiff::<B, C>(a, b)
    }

    fn rms_norm(x: Tensor<Self, 3>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        tensor(binary_autodiff::<B, C, _>(
            elementwise::RmsNorm { eps },
            prim(x),
            prim(weight),
        ))
    }

    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        tensor(binary_autodiff::<B, C, _>(
            elementwise::SwiGlu,
            prim(gate),
            prim(up),
        ))
    }

    fn swiglu_linear(
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        w: LinearWeight<Self>,
        lora: Option<LoraPair<Self>>,
    ) -> Tensor<Self, 3> {
        swiglu_linear::swiglu_linear_autodiff::<B, C>(gate, up, w, lora)
    }

    fn nf4_dequantize(w: &Nf4Tensor<Self>, dtype: DType) -> Tensor<Self, 2> {
        Tensor::from_inner(B::nf4_dequantize(&w.inner(), dtype))
    }

    fn linear_nf4<const D: usize>(x: Tensor<Self, D>, w: &Nf4Tensor<Self>) -> Tensor<Self, D> {
        nf4_linear::linear_nf4_autodiff::<B, C, D>(x, w)
    }

    fn linear_master<const D: usize>(x: Tensor<Self, D>, weight: Tensor<Self, 2>) -> Tensor<Self, D> {
        master_linear::linear_master_autodiff::<B, C, D>(x, weight)
    }

    fn linear_master_normed(x: &Normed<Self>, weight: Tensor<Self, 2>) -> Tensor<Self, 3> {
        master_linear::linear_master_normed_autodiff::<B, C>(x, weight)
    }

    fn rope(x: Tensor<Self, 4>, cos: &Tensor<Self, 3>, sin: &Tensor<Self, 3>) -> Tensor<Self, 4> {
        tensor(rope_autodiff::<B, C>(
            prim(x),
            cos.clone().inner(),
            sin.clone().inner(),
        ))
    }

    fn attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        keys: Option<&KeyRanges<Self>>,
    ) -> Tensor<Self, 4> {
        match attention_mode() {
            AttentionMode::Burn => attention_default(q, k, v, keys),
            _ => attention_autodiff::<B, C>(q, k, v, keys, attention::BLOCK_BYTES),
        }
    }

    fn sample_rows(logits: Tensor<Self, 2>, vocab: usize, rows: &[RowSampling]) -> Result<Vec<u32>, String> {
        B::sample_rows(logits.inner(), vocab, rows)
    }
}

impl<B: Kernels, C: CheckpointStrategy> TrainKernels for Autodiff<B, C> {}

impl<B: Kernels, C: CheckpointStrategy> MemoryPolicy for Autodiff<B, C> {
    fn trim_memory(device: &Self::Device) {
        B::trim_memory(device)
    }

    fn exact_allocations() {
        B::exact_allocations()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    type B = Autodiff<Flex>;

    /// The host-side causal flag a cuDNN-only-causal path relies on: set for runs 0 ..= i in
    /// every row, not for packed documents, cached keys before the queries, or padding.
    #[test]
    fn key_ranges_know_when_they_are_plain_causal() {
        let device = Default::default();
        let flag = |runs: &[Vec<(usize, usize)>]| KeyRanges::<Flex>::from_runs(runs, &device).causal;
        let causal = |t: usize| (0..t).map(|i| (0, i)).collect::<Vec<_>>();
        assert!(flag(&[causal(5)]));
        assert!(flag(&[causal(5), causal(5)]));
        assert!(!flag(&[causal(4), vec![(0, 0), (0, 1), (2, 2), (2, 3)]]));
        assert!(!flag(&[(0..3).map(|i| (0, 10 + i)).collect()]));
        assert!(!flag(&[vec![(0, 0), (1, 1), (1, 2)]]));
        let ad = KeyRanges::<B>::from_runs(&[causal(3)], &device);
        assert!(ad.inner().causal && KeyRanges::<B>::from_inner(ad.inner()).causal);
    }

    /// Small integers: every product and sum below is exact in f32, so burn's autodiff, the
    /// custom backward and the closed form must agree exactly.
    fn ints(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7 + seed * 3) % 11) as f32 - 5.0).collect()
    }

    fn leaf<const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
        Tensor::<B, D>::from_data(TensorData::new(data, shape), &Default::default()).require_grad()
    }

    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    /// x [2, 3, K] @ w [K, N] (+ b): forward and dX, dW, db through `linear_via_gemm` (the custom
    /// backward) and through burn's own `linear`, both against the closed form for
    /// loss = sum(y * g): dX = g Wᵀ, dW = Σ_rows xᵀ g, db = Σ_rows g.
    fn check_linear(with_bias: bool, transposed_weight: bool) {
        let (k, n) = (4, 5);
        let xs = ints(2 * 3 * k, 1);
        let ws = ints(k * n, 2); // w [K, N] row-major
        let bs = ints(n, 3);
        let gs = ints(2 * 3 * n, 4);

        let run = |custom: bool| {
            let x = leaf(xs.clone(), [2, 3, k]);
            // The LM-head case: the weight is a transposed view of a [N, K] leaf.
            let (w_leaf, w) = if transposed_weight {
                let wt: Vec<f32> = (0..n * k).map(|i| ws[(i % k) * n + i / k]).collect();
                let leaf = leaf(wt, [n, k]);
                (leaf.clone(), leaf.transpose())
            } else {
                let leaf = leaf(ws.clone(), [k, n]);
                (leaf.clone(), leaf)
            };
            let b = with_bias.then(|| leaf(bs.clone(), [n]));
            let y = if custom {
                linear_via_gemm(x.clone(), w, b.clone())
            } else {
                burn::tensor::module::linear(x.clone(), w, b.clone())
            };
            let g = Tensor::<B, 3>::from_data(TensorData::new(gs.clone(), [2, 3, n]), &Default::default());
            let grads = (y.clone() * g).sum().backward();
            let gw = values(w_leaf.grad(&grads).unwrap());
            // Back to [K, N] order when the leaf was [N, K].
            let gw = if transposed_weight {
                (0..k * n).map(|i| gw[(i % n) * k + i / n]).collect()
            } else {
                gw
            };
            (
                values(y.inner()),
                values(x.grad(&grads).unwrap()),
                gw,
                b.map(|b| values(b.grad(&grads).unwrap())),
            )
        };

        // Closed form.
        let rows = 6;
        let mut y = vec![0f32; rows * n];
        let mut dx = vec![0f32; rows * k];
        let mut dw = vec![0f32; k * n];
        let mut db = vec![0f32; n];
        for r in 0..rows {
            for j in 0..n {
                let g = gs[r * n + j];
                y[r * n + j] = (0..k).map(|i| xs[r * k + i] * ws[i * n + j]).sum::<f32>()
                    + if with_bias { bs[j] } else { 0.0 };
                db[j] += g;
                for i in 0..k {
                    dx[r * k + i] += g * ws[i * n + j];
                    dw[i * n + j] += xs[r * k + i] * g;
                }
            }
        }
        let expected = (y, dx, dw, with_bias.then_some(db));
        assert_eq!(
            run(true),
            expected,
            "custom backward, bias {with_bias}, transposed {transposed_weight}"
        );
        assert_eq!(
            run(false),
            expected,
            "burn's linear, bias {with_bias}, transposed {transposed_weight}"
        );
    }

    #[test]
    fn custom_gemm_backward_equals_burn_autodiff_and_closed_form() {
        for with_bias in [false, true] {
            for transposed_weight in [false, true] {
                check_linear(with_bias, transposed_weight);
            }
        }
    }

    /// Only one side tracked (the chunked loss passes a frozen head): the op keeps what it needs.
    #[test]
    fn custom_gemm_backward_with_one_side_frozen() {
        let device = Default::default();
        let xs = ints(6 * 4, 1);
        let ws = ints(4 * 5, 2);
        let x = Tensor::<B, 2>::from_data(TensorData::new(xs.clone(), [6, 4]), &device);
        let w = Tensor::<B, 2>::from_data(TensorData::new(ws.clone(), [4, 5]), &device);

        let xg = x.clone().require_grad();
        let grads = linear_via_gemm(xg.clone(), w.clone(), None).sum().backward();
        let expect_dx: Vec<f32> = (0..24)
            .map(|i| (0..5).map(|j| ws[(i % 4) * 5 + j]).sum())
            .collect();
        assert_eq!(values(xg.grad(&grads).unwrap()), expect_dx);

        let wg = w.require_grad();
        let grads = linear_via_gemm(x, wg.clone(), None).sum().backward();
        let expect_dw: Vec<f32> = (0..20).map(|i| (0..6).map(|r| xs[r * 4 + i / 5]).sum()).collect();
        assert_eq!(values(wg.grad(&grads).unwrap()), expect_dw);
    }

    /// On backends without a fast GEMM `linear` stays burn's (CPU numerics unchanged).
    /// A mixed-dtype GEMM is refused, not computed: on burn-cuda it would read one operand's
    /// buffer as the other's type.
    #[test]
    #[should_panic(expected = "gemm: operands of two dtypes")]
    fn gemm_refuses_operands_of_two_dtypes() {
        let device = Default::default();
        let a = Tensor::<Flex, 2>::ones([2, 3], &device);
        let b = Tensor::<Flex, 2>::ones([3, 2], &device).cast(DType::BF16);
        let _ = gemm(a, b);
    }

    #[test]
    fn cpu_linear_is_burns() {
        const { assert!(!<Flex as ModelKernels>::FAST_GEMM && !<B as ModelKernels>::FAST_GEMM) };
    }
}
