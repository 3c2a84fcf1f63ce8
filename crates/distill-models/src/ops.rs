//! The kernel seam. Model code calls GEMMs, attention and normalisation only through
//! [`Kernels`], so a backend can swap in faster kernels (cuBLAS GEMMs, flash attention)
//! by overriding a method in its impl below, without touching `transformer.rs`.
//! This is burn's "backend extension" pattern; the defaults are burn's own ops.
//!
//! How a kernel is swapped in: a method that the inner backend overrides (CUDA: cuBLAS for
//! [`Kernels::gemm`] and [`Kernels::bmm`], `ops::cublas`), and for `Autodiff<B, C>` an op with
//! its own backward whose backward calls the inner backend's methods again, so forward and
//! backward both get the fast kernel: [`gemm_autodiff`], [`attention_autodiff`] (O(T) saved state, `attention`),
//! RMSNorm and SwiGLU through [`binary_autodiff`] (`elementwise`). Without autodiff, backends
//! that override nothing keep burn's ops bit for bit.

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{AttentionModuleOptions, FloatTensor};
use burn::tensor::{Bool, DType, FloatDType, Tensor, TensorMetadata, TensorPrimitive};

/// Attention with an O(T) backward state, block by block.
pub mod attention;
/// RMSNorm and SwiGLU with hand-written backward passes.
pub mod elementwise;

/// cuBLAS GEMMs on burn's CUDA tensors (the `cuda` feature).
#[cfg(feature = "cuda")]
pub mod cublas;
/// Attention's softmax and its backward as fused CUDA kernels (the `cuda` feature).
#[cfg(feature = "cuda")]
pub mod cuda_softmax;

pub trait Kernels: Backend {
    /// True where [`Kernels::gemm`] beats burn's matmul (cuBLAS on CUDA). Then `linear` is one
    /// [`Kernels::gemm`] over the flattened input ([`linear_via_gemm`]), and under `Autodiff` both
    /// backward GEMMs call it too. Where false, `linear` is burn's own, unchanged.
    const FAST_GEMM: bool = false;

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

    /// Scaled dot-product attention with scale 1/sqrt(head_dim).
    /// q: [B, H, Tq, hd], k/v: [B, H, Tk, hd] (K/V heads already repeated to H),
    /// mask: [B, H, Tq, Tk], true = masked out. Returns [B, H, Tq, hd].
    fn attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        mask: Option<Tensor<Self, 4, Bool>>,
    ) -> Tensor<Self, 4> {
        burn::tensor::module::attention(q, k, v, mask, None, AttentionModuleOptions::default())
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

    /// The backward of [`Kernels::attention_probs`] given dP = dO Vᵀ [r, h, T, S] f32 and
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

    /// The SwiGLU MLP's activation: silu(gate) * up, both [B, T, I].
    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        elementwise::swiglu_default(gate, up)
    }
}

/// [`Kernels::rms_norm`] as burn ops.
pub fn rms_norm_default<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    let dtype = x.dtype();
    let x32 = if dtype == DType::F32 {
        x
    } else {
        x.cast(DType::F32)
    };
    let inv_rms = x32.clone().square().mean_dim(2).add_scalar(eps).sqrt().recip(); // [B, T, 1]
    let normed = x32 * inv_rms;
    let normed = if dtype == DType::F32 {
        normed
    } else {
        normed.cast(dtype)
    };
    normed * weight.unsqueeze::<3>()
}

/// [`Kernels::gemm`] on tensors: a [m, k] @ b [k, n] -> [m, n].
pub fn gemm<B: Kernels>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
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

/// [`Kernels::bmm`] as burn ops: matmul, then a cast if `out` is not the result's dtype.
pub fn bmm_default<B: Backend>(a: FloatTensor<B>, b: FloatTensor<B>, out: FloatDType) -> FloatTensor<B> {
    let c = B::float_matmul(a, b);
    if c.dtype() == DType::from(out) {
        c
    } else {
        B::float_cast(c, out)
    }
}

/// [`Kernels::bmm`] on tensors: a [B, H, M, K] @ b [B, H, K, N] -> [B, H, M, N] in `out`.
pub fn bmm<B: Kernels>(a: Tensor<B, 4>, b: Tensor<B, 4>, out: FloatDType) -> Tensor<B, 4> {
    same_dtype("bmm", a.dtype(), b.dtype());
    tensor(B::bmm(prim(a), prim(b), out))
}

/// A float primitive as a tensor, and back: custom ops work on primitives.
pub(crate) fn tensor<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

pub(crate) fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// `linear` as a single [`Kernels::gemm`]: batch dims flattened into M (a reshape, free for a
/// contiguous x), then the bias broadcast-added. Under `Autodiff` the reshape and the add are
/// burn's tracked ops (dbias = dY summed over M by the add's backward) and the GEMM is
/// [`gemm_autodiff`].
pub fn linear_via_gemm<B: Kernels, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let k = dims[D - 1];
    let m: usize = dims[..D - 1].iter().product();
    let [k_w, n] = weight.dims();
    assert_eq!(k, k_w, "linear: x {dims:?} does not fit weight [{k_w}, {n}]");
    let x2 = x.reshape([m, k]); // (M, K)
    let y = gemm(x2, weight); // (M, N)
    let mut out = dims;
    out[D - 1] = n;
    let y = y.reshape(out); // (..., N)
    match bias {
        Some(bias) => y + bias.unsqueeze::<D>(),
        None => y,
    }
}

/// [`Kernels::gemm`] under autodiff, with its own backward (burn book, "custom kernels"):
/// dA = dC @ Bᵀ and dB = Aᵀ @ dC, each by the inner backend's `gemm` on transposed views, so
/// on CUDA the backward GEMMs are cuBLAS calls with transpose flags, not copies. Like burn's
/// linear, A is kept for the backward only if B needs a gradient, and B only if A does.
pub fn gemm_autodiff<B: Kernels, C: CheckpointStrategy>(
    a: FloatTensor<Autodiff<B, C>>,
    b: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct Gemm;

    impl<B: Kernels> Backward<B, 2> for Gemm {
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

/// [`Kernels::attention`] under autodiff with its own backward ([`attention`]): the graph
/// keeps Q, K, V, the output and the log-sum-exp per query, not the [B, H, T, S] scores and
/// probabilities burn's fallback keeps; the backward recomputes them block by block.
/// `DISTILL_ATTENTION=burn` switches back to burn's attention (for comparison).
pub fn attention_autodiff<B: Kernels, C: CheckpointStrategy>(
    q: Tensor<Autodiff<B, C>, 4>,
    k: Tensor<Autodiff<B, C>, 4>,
    v: Tensor<Autodiff<B, C>, 4>,
    mask: Option<Tensor<Autodiff<B, C>, 4, Bool>>,
    budget: usize,
) -> Tensor<Autodiff<B, C>, 4> {
    /// What the backward needs: Q, K, V, the mask, the output and the log-sum-exp.
    type Saved<B> = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        Option<<B as burn::tensor::backend::BackendTypes>::BoolTensorPrimitive>,
        FloatTensor<B>,
        FloatTensor<B>,
        usize,
    );

    #[derive(Debug)]
    struct Attention;

    impl<B: Kernels> Backward<B, 3> for Attention {
        type State = Saved<B>;

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_q, node_k, node_v] = ops.parents;
            let d_out = tensor::<B, 4>(grads.consume::<B>(&ops.node));
            let (q, k, v, mask, out, lse, budget) = ops.state;
            let mask = mask.map(Tensor::<B, 4, Bool>::from_primitive);
            let (dq, dk, dv) = attention::backward(
                &tensor(q),
                &tensor(k),
                &tensor(v),
                mask.as_ref(),
                &tensor(out),
                &tensor(lse),
                &d_out,
                budget,
            );
            for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
                if let Some(node) = node {
                    grads.register::<B>(node.id, prim(grad));
                }
            }
        }
    }

    let (qi, ki, vi) = (q.clone().inner(), k.clone().inner(), v.clone().inner());
    let (q, k, v) = (prim(q), prim(k), prim(v));
    let mask = mask.map(|m| m.into_primitive());
    let mask_inner = mask.clone().map(Tensor::<B, 4, Bool>::from_primitive);
    let out = match Attention
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, lse) = attention::forward(&qi, &ki, &vi, mask_inner.as_ref(), budget);
            let state = (
                prim(qi),
                prim(ki),
                prim(vi),
                mask,
                prim(out.clone()),
                prim(lse),
                budget,
            );
            prep.finish(state, prim(out))
        }
        OpsKind::UnTracked(prep) => {
            let (out, _) = attention::forward(&qi, &ki, &vi, mask_inner.as_ref(), budget);
            prep.finish(prim(out))
        }
    };
    tensor(out)
}

/// Whether training uses [`attention_autodiff`] (default) or burn's attention under autodiff
/// (`DISTILL_ATTENTION=burn`).
fn blockwise_attention() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| match std::env::var("DISTILL_ATTENTION").as_deref() {
        Err(_) | Ok("") | Ok("blockwise") => true,
        Ok("burn") => false,
        Ok(other) => {
            eprintln!("warning: DISTILL_ATTENTION={other:?} is not one of blockwise, burn; using blockwise");
            true
        }
    })
}

impl Kernels for Flex {}

impl<B: Kernels, C: CheckpointStrategy> Kernels for Autodiff<B, C> {
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

    fn attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        mask: Option<Tensor<Self, 4, Bool>>,
    ) -> Tensor<Self, 4> {
        if blockwise_attention() {
            attention_autodiff::<B, C>(q, k, v, mask, attention::BLOCK_BYTES)
        } else {
            burn::tensor::module::attention(q, k, v, mask, None, AttentionModuleOptions::default())
        }
    }
}

/// burn's CUDA backend (`Cuda<bf16>`, `Cuda<f32>`; built without the fusion decorator):
/// bf16/f16 GEMMs and batched GEMMs go to cuBLAS, anything cuBLAS is not used for (f32 inputs,
/// odd shapes, no libcublas, `DISTILL_CUBLAS=off`) to burn's matmul.
#[cfg(feature = "cuda")]
impl<F, I, BT> Kernels for burn_cubecl::CubeBackend<burn_cubecl::cubecl::cuda::CudaRuntime, F, I, BT>
where
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    const FAST_GEMM: bool = true;

    fn gemm(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        match cublas::gemm(a, b) {
            Ok(c) => c,
            Err((a, b)) => <Self as burn::tensor::ops::FloatTensorOps<Self>>::float_matmul(a, b),
        }
    }

    fn bmm(a: FloatTensor<Self>, b: FloatTensor<Self>, out: FloatDType) -> FloatTensor<Self> {
        match cublas::bmm(a, b, out.into()) {
            Ok(c) => c,
            Err((a, b)) => bmm_default::<Self>(a, b, out),
        }
    }

    fn attention_probs(
        scores: Tensor<Self, 4>,
        mask: Option<Tensor<Self, 4, Bool>>,
        scale: f64,
        p_dtype: FloatDType,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>) {
        if cuda_softmax::enabled() {
            let m = mask.clone().map(|m| m.into_primitive());
            match cuda_softmax::probs(&prim(scores.clone()), m.as_ref(), scale as f32, p_dtype.into()) {
                Ok((p, lse)) => return (tensor(p), tensor(lse)),
                Err(why) => fused_fallback(&why),
            }
        }
        attention::probs_default(scores, mask, scale, p_dtype)
    }

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
        if cuda_softmax::enabled() {
            let m = mask.clone().map(|m| m.into_primitive());
            let fused = cuda_softmax::probs_grad(
                &prim(scores.clone()),
                &prim(dp.clone()),
                &prim(lse.clone()),
                &prim(delta.clone()),
                m.as_ref(),
                scale as f32,
                ds_dtype.into(),
                p_dtype.into(),
            );
            match fused {
                Ok((ds, p)) => return (tensor(ds), tensor(p)),
                Err(why) => fused_fallback(&why),
            }
        }
        attention::probs_grad_default(scores, dp, lse, delta, mask, scale, ds_dtype, p_dtype)
    }
}

/// Notes once that the fused softmax kernels fell back to burn's ops, and why.
#[cfg(feature = "cuda")]
fn fused_fallback(why: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("note: attention softmax on burn's ops ({why}); later fallbacks are silent"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    type B = Autodiff<Flex>;

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
        const { assert!(!<Flex as Kernels>::FAST_GEMM && !<B as Kernels>::FAST_GEMM) };
    }
}
