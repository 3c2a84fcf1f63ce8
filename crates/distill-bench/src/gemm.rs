//! B1: the GEMMs of a training step's shapes, forward and backward.

use burn::backend::Autodiff;
use burn::tensor::backend::BackendTypes;
use burn::tensor::{Distribution, Tensor};
use distill_models::{DecoderConfig, Kernels, ModelKernels};

use crate::flops::dims;
use crate::time_calls;

type Ad<B> = Autodiff<B>;

/// One GEMM of the training step: x [m, k] @ w [k, n].
#[derive(Debug, Clone, PartialEq)]
pub struct Gemm {
    pub name: String,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl Gemm {
    pub fn new(name: impl Into<String>, m: usize, k: usize, n: usize) -> Self {
        Gemm {
            name: name.into(),
            m,
            k,
            n,
        }
    }

    /// 2·m·k·n: the forward product; the backward (dX and dW) is twice this.
    pub fn fwd_flops(&self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }
}

/// The GEMMs of one training step at `tokens` tokens: every projection, the LM head as the
/// chunked loss runs it (`chunk` tokens), and the LoRA factors at rank `r`.
pub fn training_gemms(c: &DecoderConfig, tokens: usize, chunk: usize, r: usize) -> Vec<Gemm> {
    let (h, q, kv, i) = {
        let (h, q, kv, i) = dims(c);
        (h as usize, q as usize, kv as usize, i as usize)
    };
    let mut gemms = vec![
        Gemm::new("q_proj", tokens, h, q),
        Gemm::new("k_proj/v_proj", tokens, h, kv),
        Gemm::new("o_proj", tokens, q, h),
        Gemm::new("gate_proj/up_proj", tokens, h, i),
        Gemm::new("down_proj", tokens, i, h),
        Gemm::new(
            format!("lm_head (chunk {})", chunk.min(tokens)),
            chunk.min(tokens),
            h,
            c.vocab_size,
        ),
    ];
    if r > 0 {
        gemms.push(Gemm::new(format!("lora_A r{r} (gate/up)"), tokens, h, r));
        gemms.push(Gemm::new(format!("lora_B r{r} (gate/up)"), tokens, r, i));
        gemms.push(Gemm::new(format!("lora_A r{r} (down)"), tokens, i, r));
    }
    gemms
}

/// Mean seconds of the forward product alone (inner backend, as the no-graph forward runs
/// it) and of forward + backward (autodiff, gradients of x and w from a ones seed, as a
/// training step runs it), both through [`ModelKernels::linear`].
pub fn bench_gemm<B: Kernels>(g: &Gemm, warmup: usize, iters: usize, device: &B::Device) -> (f64, f64)
where
    Ad<B>: Kernels + BackendTypes<Device = B::Device>,
{
    let x = Tensor::<B, 2>::random([g.m, g.k], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<B, 2>::random([g.k, g.n], Distribution::Normal(0.0, 0.02), device);
    let fwd = time_calls::<B>(device, warmup, iters, || {
        drop(<B as ModelKernels>::linear(x.clone(), w.clone(), None));
    });
    let fwd_bwd = time_calls::<B>(device, warmup, iters, || {
        let xa = Tensor::<Ad<B>, 2>::from_inner(x.clone()).require_grad();
        let wa = Tensor::<Ad<B>, 2>::from_inner(w.clone()).require_grad();
        let grads = <Ad<B> as ModelKernels>::linear(xa.clone(), wa.clone(), None).backward();
        drop((xa.grad(&grads), wa.grad(&grads)));
    });
    (fwd, fwd_bwd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flops::tests::toy;

    #[test]
    fn training_gemms_cover_projections_head_and_adapters() {
        let c = toy();
        let g = training_gemms(&c, 16, 8, 2);
        assert_eq!(g[0], Gemm::new("q_proj", 16, 4, 4));
        assert_eq!(g[5], Gemm::new("lm_head (chunk 8)", 8, 4, 10));
        assert_eq!(g.len(), 9);
        assert_eq!(training_gemms(&c, 16, 8, 0).len(), 6);
    }
}
