//! B1's attention rows: one layer's attention alone at a config's heads, batch 1, causal, as a
//! training step runs it (on CUDA cuDNN's fused attention where libcudnn loads, else the flash
//! kernels), forward and forward + backward, at long sequence lengths. `bench/attention/attention.py` times PyTorch
//! SDPA's backends on the same shapes.

use burn::backend::Autodiff;
use burn::tensor::backend::BackendTypes;
use burn::tensor::{Distribution, Tensor};
use distill_kernels::KeyRanges;
use distill_models::{DecoderConfig, Kernels, ModelKernels};

use crate::time_calls;

type Ad<B> = Autodiff<B>;

/// FLOPs of the causal forward over one row of `seq` tokens: QKᵀ and PV over the keys each
/// query sees, counted as half the square (FlashAttention's and cuDNN's convention). The
/// backward is 2.5 times this (five products of the same size where the forward has two).
pub fn causal_fwd_flops(c: &DecoderConfig, seq: usize) -> f64 {
    2.0 * 2.0 * (c.num_attention_heads * c.head_dim) as f64 * (seq as f64) * (seq as f64) / 2.0
}

/// Query i sees keys 0 ..= i, one row shared by the batch.
fn causal<B: burn::tensor::backend::Backend>(seq: usize, device: &B::Device) -> KeyRanges<B> {
    let runs = vec![(0..seq).map(|i| (0, i)).collect::<Vec<_>>()];
    KeyRanges::from_runs(&runs, device)
}

/// Mean seconds of the forward alone (inner backend, as training's forward runs it: output and
/// log-sum-exp kept for the backward) and of forward + backward (autodiff, gradients of q, k and
/// v from a ones seed) at `seq` tokens. q is [1, H, T, hd] and k/v [1, KV, T, hd], each a view of
/// [1, T, heads, hd] memory as the model's projections make them.
pub fn bench_attention<B: Kernels>(
    c: &DecoderConfig,
    seq: usize,
    warmup: usize,
    iters: usize,
    device: &B::Device,
) -> (f64, f64)
where
    Ad<B>: Kernels + BackendTypes<Device = B::Device>,
{
    let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let heads =
        |n| Tensor::<B, 4>::random([1, seq, n, hd], Distribution::Normal(0.0, 1.0), device).swap_dims(1, 2);
    let (q, k, v) = (heads(h), heads(kv), heads(kv));
    let keys = causal::<B>(seq, device);
    let fwd =
        time_calls::<B>(
            device,
            warmup,
            iters,
            || match <B as ModelKernels>::flash_attention_for_training(&q, &k, &v, Some(&keys)) {
                Some(found) => drop(found),
                None => drop(<B as ModelKernels>::attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    Some(&keys),
                )),
            },
        );
    let keys_ad = KeyRanges::<Ad<B>>::from_inner(keys.clone());
    let fwd_bwd = time_calls::<B>(device, warmup, iters, || {
        let [qa, ka, va] = [&q, &k, &v].map(|x| Tensor::<Ad<B>, 4>::from_inner(x.clone()).require_grad());
        let grads =
            <Ad<B> as ModelKernels>::attention(qa.clone(), ka.clone(), va.clone(), Some(&keys_ad)).backward();
        drop((qa.grad(&grads), ka.grad(&grads), va.grad(&grads)));
    });
    (fwd, fwd_bwd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flops::tests::toy;

    #[test]
    fn causal_flops_count_half_the_square() {
        // 2 heads of 2 at T = 4: QKᵀ and PV over 16 / 2 = 8 query-key pairs, 2 * 2 FLOPs per
        // pair and head dim each: 2 * 2 * 2 * 2 * 8.
        assert_eq!(causal_fwd_flops(&toy(), 4), 128.0);
    }
}
