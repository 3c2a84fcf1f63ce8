//! The kernel seam. Model code calls GEMMs, attention and normalisation only through
//! [`Kernels`], so a backend can swap in faster kernels (cuBLAS GEMMs, flash attention)
//! by overriding a method in its impl below, without touching `transformer.rs`.
//! This is burn's "backend extension" pattern; the defaults are burn's own ops.

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Tensor};

pub trait Kernels: Backend {
    /// `x @ weight + bias`. x: [..., in], weight: [in, out], bias: [out] -> [..., out].
    fn linear<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, D> {
        burn::tensor::module::linear(x, weight, bias)
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

    /// RMSNorm over the last dim, computed in f32 whatever the storage dtype (as HF does),
    /// then scaled by `weight` in the input dtype. x: [B, T, C], weight: [C].
    fn rms_norm(x: Tensor<Self, 3>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
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
}

impl Kernels for Flex {}
impl<B: Kernels> Kernels for Autodiff<B> {}
#[cfg(feature = "cuda")]
impl Kernels for burn::backend::Cuda<half::bf16> {}
#[cfg(feature = "cuda")]
impl Kernels for burn::backend::Cuda<f32> {}
