//! A linear layer over an NF4 weight under autodiff ([`Kernels::linear_nf4`]): one node whose
//! backward state is the 4-bit codes and scales, not the dequantized weight.
//!
//! Why: as `dequantize` then a GEMM, the GEMM's node would keep the dequantized bf16 weight
//! for dx = dy W, so the graph would hold the whole base model in bf16 again, undoing QLoRA's
//! saving. Here the backward dequantizes once more (a pass over 4.5 bits a weight, against
//! the GEMM's 2·M·K·N flops) as bitsandbytes' `MatMul4Bit` does. The weight takes no gradient.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::Tensor;
use burn::tensor::ops::FloatTensor;

use super::{ModelKernels, flat_linear, prim, tensor};
use crate::nf4::Nf4Tensor;

/// x [M, K] @ Wᵀ, W the NF4 weight [N, K] dequantized to x's dtype: [M, N].
fn forward<B: ModelKernels>(x: FloatTensor<B>, w: &Nf4Tensor<B>) -> FloatTensor<B> {
    let x = tensor::<B, 2>(x);
    let dense = B::nf4_dequantize(w, x.dtype()); // [N, K]
    B::gemm(prim(x), prim(dense.transpose()))
}

/// [`Kernels::linear_nf4`] under autodiff, on x flattened to [M, K].
pub fn nf4_linear_autodiff<B: ModelKernels, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: Nf4Tensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct Node;

    impl<B: ModelKernels> Backward<B, 1> for Node {
        type State = Nf4Tensor<B>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node] = ops.parents;
            let dy = tensor::<B, 2>(grads.consume::<B>(&ops.node)); // [M, N]
            if let Some(node) = node {
                let w = B::nf4_dequantize(&ops.state, dy.dtype()); // [N, K]
                grads.register::<B>(node.id, B::gemm(prim(dy), prim(w))); // [M, K]
            }
        }
    }

    match Node.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let y = forward(x.primitive, &w);
            prep.finish(w, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, &w)),
    }
}

/// [`Kernels::linear_nf4`] under autodiff for x of any rank: [..., K] -> [..., N].
pub fn linear_nf4_autodiff<B: ModelKernels, C: CheckpointStrategy, const D: usize>(
    x: Tensor<Autodiff<B, C>, D>,
    w: &Nf4Tensor<Autodiff<B, C>>,
) -> Tensor<Autodiff<B, C>, D> {
    let [n, k] = w.shape;
    flat_linear(x, [k, n], |x2| {
        tensor(nf4_linear_autodiff::<B, C>(prim(x2), w.inner()))
    })
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{DType, Tensor, TensorData};

    use super::*;
    use crate::nf4::{Nf4, dequantize_default};

    type AD = Autodiff<Flex>;

    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().into_vec::<f32>().unwrap()
    }

    /// The node against burn's matmul over the dequantized weight: output and dx, for x of
    /// rank 3 and a weight spanning a partial block (7 x 10 = 70 values).
    #[test]
    fn the_node_gives_the_output_and_input_gradient_of_the_dequantized_weight() {
        let device = Default::default();
        let (n, k) = (7, 10);
        let hf: Vec<f32> = (0..n * k).map(|i| ((i * 29 % 23) as f32 - 11.0) / 13.0).collect();
        let w = Nf4::<AD>::quantize(&hf, [n, k], &device).tensor();
        let dense = dequantize_default(&w.inner(), DType::F32).transpose(); // [K, N]
        let xs: Vec<f32> = (0..2 * 3 * k)
            .map(|i| ((i * 17 % 31) as f32 - 15.0) / 9.0)
            .collect();
        let x = || Tensor::<AD, 3>::from_data(TensorData::new(xs.clone(), [2, 3, k]), &device).require_grad();
        let g = Tensor::<AD, 3>::from_data(
            TensorData::new(
                (0..2 * 3 * n).map(|i| (i % 5) as f32 - 2.0).collect::<Vec<f32>>(),
                [2, 3, n],
            ),
            &device,
        );

        let (x1, x2) = (x(), x());
        let ours = linear_nf4_autodiff::<Flex, _, 3>(x1.clone(), &w);
        let theirs = x2.clone().matmul(Tensor::<AD, 2>::from_inner(dense).unsqueeze());
        assert_eq!(ours.dims(), [2, 3, n]);
        let close = |a: Vec<f32>, b: Vec<f32>, what: &str| {
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-5 + 1e-5 * y.abs(), "{what}: {x} vs {y}");
            }
        };
        close(
            values(ours.clone().inner()),
            values(theirs.clone().inner()),
            "output",
        );
        let (ga, gb) = ((ours * g.clone()).sum().backward(), (theirs * g).sum().backward());
        close(values(x1.grad(&ga).unwrap()), values(x2.grad(&gb).unwrap()), "dx");
    }
}
