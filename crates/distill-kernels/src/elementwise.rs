//! RMSNorm and SwiGLU with hand-written backward passes, for training ([`super::BinaryOp`]):
//! the nodes call [`Kernels::rms_norm_backward`] and [`Kernels::swiglu_backward`], whose
//! defaults (burn ops) are here.
//!
//! Why: under burn's autodiff each of their ops is a graph node that keeps its inputs, and
//! RMSNorm works in f32: a [B, T, C] RMSNorm kept about four f32 copies of its input per
//! call, SwiGLU three [B, T, I] tensors. As single nodes they keep their two inputs, and the
//! backward recomputes the rest (1 / rms, sigmoid) from them.

use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor};

use super::{BinaryOp, ModelKernels, prim, tensor};

/// 1 / sqrt(mean(x²) + eps) over the last dim, in f32. x: [B, T, C] -> [B, T, 1].
fn inv_rms<B: Backend>(x32: Tensor<B, 3>, eps: f64) -> Tensor<B, 3> {
    x32.square().mean_dim(2).add_scalar(eps).sqrt().recip()
}

/// [`Kernels::rms_norm`] as burn ops.
pub fn rms_norm_default<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    let dtype = x.dtype();
    let x32 = if dtype == DType::F32 {
        x
    } else {
        x.cast(DType::F32)
    };
    let normed = x32.clone() * inv_rms(x32, eps); // [B, T, C] f32
    let normed = if dtype == DType::F32 {
        normed
    } else {
        normed.cast(dtype)
    };
    normed * weight.unsqueeze::<3>()
}

/// y = cast(x · inv_rms(x)) · w, as [`Kernels::rms_norm`]. a = x [B, T, C], b = w [C].
/// With n = x · inv_rms in f32 and g = dy · w:
///     dx = inv_rms · (g - n · mean(g · n)),  dw = sum over B, T of dy · cast(n).
#[derive(Debug, Clone, Copy)]
pub struct RmsNorm {
    pub eps: f64,
}

impl<B: ModelKernels> BinaryOp<B> for RmsNorm {
    fn forward(&self, x: FloatTensor<B>, w: FloatTensor<B>) -> FloatTensor<B> {
        prim(B::rms_norm(tensor(x), tensor(w), self.eps))
    }

    fn backward(
        &self,
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        dy: FloatTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let (dx, dw) = B::rms_norm_backward(tensor(x), tensor(w), tensor(dy), self.eps);
        (prim(dx), prim(dw))
    }
}

/// silu(gate) · up, as [`Kernels::swiglu`]. a = gate, b = up, both [B, T, I]. With
/// s = sigmoid(gate), in f32:
///     d up = dy · gate · s,  d gate = dy · up · s · (1 + gate · (1 - s)).
#[derive(Debug, Clone, Copy)]
pub struct SwiGlu;

impl<B: ModelKernels> BinaryOp<B> for SwiGlu {
    fn forward(&self, gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
        prim(B::swiglu(tensor::<B, 3>(gate), tensor(up)))
    }

    fn backward(
        &self,
        gate: FloatTensor<B>,
        up: FloatTensor<B>,
        dy: FloatTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let (d_gate, d_up) = B::swiglu_backward(tensor(gate), tensor(up), tensor(dy));
        (prim(d_gate), prim(d_up))
    }
}

/// [`Kernels::rms_norm_backward`] as burn ops: (dx [B, T, C], dw [C]).
pub fn rms_norm_backward_default<B: Backend>(
    x: Tensor<B, 3>,
    w: Tensor<B, 1>,
    dy: Tensor<B, 3>,
    eps: f64,
) -> (Tensor<B, 3>, Tensor<B, 1>) {
    let (x_dtype, w_dtype) = (x.dtype(), w.dtype());
    let x32 = x.cast(DType::F32);
    let inv = inv_rms(x32.clone(), eps); // [B, T, 1]
    let n = x32 * inv.clone(); // [B, T, C] f32
    let g = (dy.clone() * w.unsqueeze::<3>()).cast(DType::F32); // [B, T, C]
    let mean_gn = (g.clone() * n.clone()).mean_dim(2); // [B, T, 1]
    let dx = (inv * (g - n.clone() * mean_gn)).cast(x_dtype);
    let c = n.dims()[2];
    let dw = (dy * n.cast(x_dtype))
        .reshape([-1, c as i64])
        .sum_dim(0)
        .reshape([c]);
    (dx, dw.cast(w_dtype))
}

/// [`Kernels::swiglu_backward`] as burn ops, in f32: (d gate, d up), each [B, T, I].
pub fn swiglu_backward_default<B: Backend>(
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    dy: Tensor<B, 3>,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let dtype = gate.dtype();
    let (g, u, dy) = (gate.cast(DType::F32), up.cast(DType::F32), dy.cast(DType::F32));
    let s = sigmoid(g.clone());
    let d_up = dy.clone() * g.clone() * s.clone();
    let d_gate = dy * u * s.clone() * (g * s.neg().add_scalar(1.0)).add_scalar(1.0);
    (d_gate.cast(dtype), d_up.cast(dtype))
}

/// [`Kernels::rope`] as burn ops (transformers' `q * cos + rotate_half(q) * sin`, the tables
/// cast to x's dtype first).
pub fn rope_default<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>) -> Tensor<B, 4> {
    let half = x.dims()[3] / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let cos = cos.clone().unsqueeze_dim::<4>(1).cast(x.dtype()); // [R, 1, T, hd]
    let sin = sin.clone().unsqueeze_dim::<4>(1).cast(x.dtype());
    x * cos + rotated * sin
}

/// [`ModelKernels::rope_qkv`] as its parts: column views of y, RoPE, slice-assigns.
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv_default<B: ModelKernels>(
    y: Tensor<B, 3>,
    bias: Option<Tensor<B, 1>>,
    [heads, kv_heads]: [usize; 2],
    cos: &Tensor<B, 3>,
    sin: &Tensor<B, 3>,
    k_cache: Tensor<B, 4>,
    v_cache: Tensor<B, 4>,
    at: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let y = crate::add_bias(y, bias);
    let ([b, t, _], hd) = (y.dims(), cos.dims()[2]);
    // Heads `first..first + n` of y: [B, n, T, hd].
    let part = |first: usize, n: usize| {
        B::columns(y.clone(), first * hd, n * hd)
            .reshape([b, t, n, hd])
            .swap_dims(1, 2)
    };
    let q = B::rope(part(0, heads), cos, sin);
    let k = B::rope(part(heads, kv_heads), cos, sin);
    let v = part(heads + kv_heads, kv_heads);
    let range = [0..b, 0..kv_heads, at..at + t, 0..hd];
    (
        q,
        k_cache.slice_assign(range.clone(), k),
        v_cache.slice_assign(range, v),
    )
}

/// The forward both ops default to: silu(gate) · up.
pub fn swiglu_default<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    silu(gate) * up
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorData;
    use distill_core::testing::TestRng;

    use super::*;

    type AD = Autodiff<Flex>;

    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec().unwrap()
    }

    fn assert_close(name: &str, ours: &[f32], theirs: &[f32]) {
        assert_eq!(ours.len(), theirs.len(), "{name}");
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            assert!((a - b).abs() <= 1e-5 + 1e-4 * b.abs(), "{name}[{i}]: {a} vs {b}");
        }
    }

    /// N(0, 1) values from a generator of the test's own: burn's is one for the process, which
    /// the tests running beside this one draw from too.
    fn random<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<AD, D> {
        let values = TestRng::new(seed).normal_vec(shape.iter().product(), 0.0, 1.0);
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    /// Output and both gradients of one op against burn's autodiff through the same forward
    /// written as separate ops, under a weighted sum so each element's gradient differs.
    fn check<const DA: usize, const DB: usize>(
        name: &str,
        ours: impl Fn(Tensor<AD, DA>, Tensor<AD, DB>) -> Tensor<AD, 3>,
        reference: impl Fn(Tensor<AD, DA>, Tensor<AD, DB>) -> Tensor<AD, 3>,
        a: Tensor<AD, DA>,
        b: Tensor<AD, DB>,
    ) {
        let w = random(ours(a.clone(), b.clone()).dims(), 9);
        let run = |f: &dyn Fn(Tensor<AD, DA>, Tensor<AD, DB>) -> Tensor<AD, 3>| {
            let (a, b) = (a.clone().require_grad(), b.clone().require_grad());
            let y = f(a.clone(), b.clone());
            let grads = (y.clone() * w.clone()).sum().backward();
            (
                values(y.inner()),
                values(a.grad(&grads).unwrap()),
                values(b.grad(&grads).unwrap()),
            )
        };
        let (o, r) = (run(&ours), run(&reference));
        assert_close(&format!("{name} out"), &o.0, &r.0);
        assert_close(&format!("{name} grad a"), &o.1, &r.1);
        assert_close(&format!("{name} grad b"), &o.2, &r.2);
    }

    #[test]
    fn rms_norm_backward_matches_autodiff() {
        let x = random([2, 3, 8], 1);
        let w = random([8], 2).add_scalar(1.0);
        check(
            "rms_norm",
            |x, w| AD::rms_norm(x, w, 1e-6),
            |x, w| rms_norm_default(x, w, 1e-6),
            x,
            w,
        );
    }

    #[test]
    fn swiglu_backward_matches_autodiff() {
        check(
            "swiglu",
            AD::swiglu,
            swiglu_default,
            random([2, 3, 8], 3),
            random([2, 3, 8], 4),
        );
    }

    /// RoPE's node (backward: the rotation by -angle) against burn's autodiff through the
    /// default ops, with angle tables (both halves equal, as `Rotary::tables` makes them) shared
    /// by the rows or one per row.
    #[test]
    fn rope_backward_matches_autodiff() {
        let x = random([2, 3, 5, 8], 5);
        let w = random([2, 3, 5, 8], 6);
        for rows in [1, 2] {
            let angles: Vec<f32> = (0..rows * 5 * 8)
                .map(|i| {
                    let (r, t, j) = (i / 40, i / 8 % 5, i % 4);
                    0.3 * (r + 1) as f32 * (t + 2) as f32 / (j + 1) as f32
                })
                .collect();
            let table = |f: fn(f32) -> f32| {
                let data = TensorData::new(angles.iter().map(|a| f(*a)).collect::<Vec<f32>>(), [rows, 5, 8]);
                Tensor::<AD, 3>::from_data(data, &Default::default())
            };
            let (cos, sin) = (table(f32::cos), table(f32::sin));
            let run = |ours: bool| {
                let x = x.clone().require_grad();
                let y = if ours {
                    AD::rope(x.clone(), &cos, &sin)
                } else {
                    rope_default(x.clone(), &cos, &sin)
                };
                let grads = (y.clone() * w.clone()).sum().backward();
                (values(y.inner()), values(x.grad(&grads).unwrap()))
            };
            let (o, r) = (run(true), run(false));
            assert_close("rope out", &o.0, &r.0);
            assert_close("rope grad", &o.1, &r.1);
        }
    }

    /// x = [3, 4]: rms = sqrt(12.5), so y = x / sqrt(12.5) · w.
    #[test]
    fn rms_norm_closed_form() {
        let device = Default::default();
        let x = Tensor::<Flex, 3>::from_data(TensorData::new(vec![3.0f32, 4.0], [1, 1, 2]), &device);
        let w = Tensor::<Flex, 1>::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), &device);
        let y = values(Flex::rms_norm(x, w, 0.0));
        let r = 12.5f32.sqrt();
        assert_close("y", &y, &[3.0 / r, 8.0 / r]);
    }
}
