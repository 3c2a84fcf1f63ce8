//! The two passes a softmax-family loss makes over each [N, V] chunk of LM-head logits:
//! row statistics ([`super::Kernels::softmax_stats`]) and the dense-plus-sparse gradient
//! ([`super::Kernels::softmax_grad`]). Here as burn ops (the defaults); on CUDA each is one
//! kernel (`cuda_logits`), since at V = 151,936 every separate op is a full pass over
//! 600 MB of f32.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, IndexingUpdateOp, Int, Tensor};

/// [`super::Kernels::softmax_stats`] as burn ops.
pub fn stats_default<B: Backend>(
    z: Tensor<B, 2>,
    t: f64,
    limit: usize,
) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) {
    let z = z.cast(DType::F32).narrow(1, 0, limit); // [N, limit]
    let max = z.clone().max_dim(1); // [N, 1]
    let shifted = z - max.clone();
    let sum = shifted.clone().exp().sum_dim(1);
    let sum_t = if t == 1.0 {
        sum.clone()
    } else {
        shifted.div_scalar(t).exp().sum_dim(1)
    };
    (max, sum, sum_t)
}

/// [`super::Kernels::softmax_grad`] as burn ops.
#[allow(clippy::too_many_arguments)]
pub fn grad_default<B: Backend>(
    z: Tensor<B, 2>,
    max: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Option<Tensor<B, 2>>,
    t: f64,
    limit: usize,
    ids: Tensor<B, 2, Int>,
    values: Tensor<B, 2>,
    dtype: FloatDType,
) -> Tensor<B, 2> {
    let [n, v] = z.dims();
    let shifted = z.cast(DType::F32).narrow(1, 0, limit) - max; // [N, limit]
    let mut g = shifted.clone().exp() * a;
    if let Some(b) = b {
        g = g + shifted.div_scalar(t).exp() * b;
    }
    if limit < v {
        let pad = Tensor::zeros([n, v - limit], (&g.device(), DType::F32));
        g = Tensor::cat(vec![g, pad], 1);
    }
    g.scatter(1, ids, values, IndexingUpdateOp::Add).cast(dtype)
}
