//! A linear layer over a master weight in another dtype than its input under autodiff
//! ([`Kernels::linear_master`]): full fine-tuning's f32 weights under bf16 activations.
//!
//! Why: as `cast` then a GEMM, the GEMM's node keeps the cast weight for dx = dy Wᵀ, so from
//! the forward to the backward the graph held a bf16 copy of every weight beside the f32
//! masters (2.9 GiB at 1.5B, 1 byte in 10 of full fine-tuning's peak). Here the node keeps
//! the master, a parameter held anyway, and the backward casts it again: a pass over the
//! weight (6 bytes a weight) against the GEMM's 2·M·K·N flops. dW is the bf16 GEMM's output
//! cast to the master's dtype, what the cast's own backward did: the gradients are the same
//! bits as before.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor};

use super::{ModelKernels, NormInput, Normed, flat_linear, prim, tensor};

/// What the backward reads: x [M, K] when W takes a gradient, the master W [K, N] when x
/// does.
#[derive(Debug, Clone)]
struct Saved<B: ModelKernels> {
    x: Option<Input<B>>,
    w: Option<Tensor<B, 2>>,
    w_dtype: DType,
}

/// x as the backward gets it: kept, or made again from the RMSNorm that made it.
#[derive(Debug, Clone)]
enum Input<B: ModelKernels> {
    Kept(Tensor<B, 2>),
    Norm(NormInput<B>),
}

impl<B: ModelKernels> Input<B> {
    /// x [M, K].
    fn value(self) -> Tensor<B, 2> {
        match self {
            Input::Kept(x) => x,
            Input::Norm(n) => {
                let [b, t, k] = n.x.dims();
                n.output().reshape([b * t, k])
            }
        }
    }
}

/// x [M, K] @ cast(W [K, N]) -> [M, N] in x's dtype.
fn forward<B: ModelKernels>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
    super::gemm(x.clone(), w.clone().cast(x.dtype()))
}

/// [`Kernels::linear_master`] under autodiff, on x flattened to [M, K]; `norm`: the RMSNorm
/// whose output x is, to make x again in the backward rather than keep it.
fn master_linear_node<B: ModelKernels, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
    norm: Option<NormInput<B>>,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct Node;

    impl<B: ModelKernels> Backward<B, 2> for Node {
        type State = Saved<B>;

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x, node_w] = ops.parents;
            let dy = tensor::<B, 2>(grads.consume::<B>(&ops.node)); // [M, N]
            let s = ops.state;
            if let Some(node) = node_x {
                let w = s.w.expect("W kept when x needs a grad").cast(dy.dtype()); // [K, N]
                grads.register::<B>(node.id, prim(super::gemm(dy.clone(), w.transpose()))); // [M, K]
            }
            if let Some(node) = node_w {
                let x = s.x.expect("x kept when W needs a grad").value(); // [M, K]
                let dw = super::gemm(x.transpose(), dy).cast(s.w_dtype); // [K, N]
                grads.register::<B>(node.id, prim(dw));
            }
        }
    }

    let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
    let x_in = tensor::<B, 2>(x.primitive);
    let w_in = tensor::<B, 2>(w.primitive);
    match Node
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = forward(&x_in, &w_in);
            let saved = Saved {
                w_dtype: w_in.dtype(),
                x: w_tracked.then(|| norm.map_or(Input::Kept(x_in), Input::Norm)),
                w: x_tracked.then_some(w_in),
            };
            prep.finish(saved, prim(y))
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(forward(&x_in, &w_in))),
    }
}

/// [`Kernels::linear_master`] under autodiff for x of any rank: [..., K] -> [..., N].
pub fn linear_master_autodiff<B: ModelKernels, C: CheckpointStrategy, const D: usize>(
    x: Tensor<Autodiff<B, C>, D>,
    w: Tensor<Autodiff<B, C>, 2>,
) -> Tensor<Autodiff<B, C>, D> {
    let [k, n] = w.dims();
    flat_linear(x, [k, n], |x2| {
        tensor(master_linear_node::<B, C>(prim(x2), prim(w), None))
    })
}

/// [`Kernels::linear_master_normed`] under autodiff: [B, T, K] -> [B, T, N].
pub fn linear_master_normed_autodiff<B: ModelKernels, C: CheckpointStrategy>(
    x: &Normed<Autodiff<B, C>>,
    w: Tensor<Autodiff<B, C>, 2>,
) -> Tensor<Autodiff<B, C>, 3> {
    // The norm's input and weight only: the output is what the node is not to keep.
    let norm = x.input.inner();
    let [k, n] = w.dims();
    flat_linear(x.out.clone(), [k, n], |x2| {
        tensor(master_linear_node::<B, C>(prim(x2), prim(w), Some(norm)))
    })
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{DType, Tensor, TensorData};
    use distill_core::testing::TestRng;

    use super::*;
    use crate::NormInput;

    type AD = Autodiff<Flex>;

    /// N(mean, std²) values from the test's own generator: burn's is one for the process,
    /// which the tests running beside this one draw from too.
    fn normal<const D: usize>(rng: &mut TestRng, shape: [usize; D], mean: f64, std: f64) -> Tensor<Flex, D> {
        let values = rng.normal_vec(shape.iter().product(), mean, std);
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec().unwrap()
    }

    /// The node against what it replaces on CUDA, burn's cast then the GEMM-based linear, with
    /// f32 masters under bf16 activations: the output, dx (in bf16) and dW (in f32) must be the
    /// same bits, with either side frozen too.
    #[test]
    fn the_node_gives_the_cast_weights_output_and_gradients() {
        let mut rng = TestRng::new(3);
        let (k, n) = (12, 7);
        let x0 = normal(&mut rng, [2, 5, k], 0.0, 1.0).cast(DType::BF16);
        let w0 = normal(&mut rng, [k, n], 0.0, 0.3);
        let g = normal(&mut rng, [2, 5, n], 0.0, 1.0).cast(DType::BF16);
        for (train_x, train_w) in [(true, true), (true, false), (false, true)] {
            let run = |node: bool| {
                let x = Tensor::<AD, 3>::from_inner(x0.clone());
                let x = if train_x { x.require_grad() } else { x };
                let w = Tensor::<AD, 2>::from_inner(w0.clone());
                let w = if train_w { w.require_grad() } else { w };
                let y = if node {
                    linear_master_autodiff::<Flex, _, 3>(x.clone(), w.clone())
                } else {
                    super::super::linear_via_gemm(x.clone(), w.clone().cast(DType::BF16), None)
                };
                assert_eq!(y.dtype(), DType::BF16);
                let grads = (y.clone() * Tensor::from_inner(g.clone())).sum().backward();
                let dx = x.grad(&grads).map(|d| (d.dtype(), values(d)));
                let dw = w.grad(&grads).map(|d| (d.dtype(), values(d)));
                (values(y.inner()), dx, dw)
            };
            let (ours, theirs) = (run(true), run(false));
            assert_eq!(ours, theirs, "x trained {train_x}, W trained {train_w}");
            assert_eq!(ours.1.is_some(), train_x);
            assert_eq!(ours.2.as_ref().map(|d| d.0), train_w.then_some(DType::F32));
        }
    }

    /// Over an RMSNorm's output, the node that makes the output again in the backward gives
    /// the bits of the node that keeps it: y, and the gradients of the norm's input and weight
    /// and of W (two linears reading one norm, as q and k do).
    #[test]
    fn a_norm_made_again_gives_the_kept_norms_gradients() {
        let mut rng = TestRng::new(5);
        let (c, n) = (12, 7);
        let x0 = normal(&mut rng, [2, 5, c], 0.0, 1.0).cast(DType::BF16);
        let nw0 = normal(&mut rng, [c], 1.0, 0.2);
        let w0 = normal(&mut rng, [c, n], 0.0, 0.3);
        let g = normal(&mut rng, [2, 5, n], 0.0, 1.0).cast(DType::BF16);
        let run = |made_again: bool| {
            let x = Tensor::<AD, 3>::from_inner(x0.clone()).require_grad();
            let nw = Tensor::<AD, 1>::from_inner(nw0.clone()).require_grad();
            let (w1, w2) = (
                Tensor::<AD, 2>::from_inner(w0.clone()).require_grad(),
                Tensor::<AD, 2>::from_inner(w0.clone().mul_scalar(0.5)).require_grad(),
            );
            let normed = NormInput {
                x: x.clone(),
                weight: nw.clone().cast(DType::BF16),
                eps: 1e-6,
            }
            .normed();
            let y = if made_again {
                linear_master_normed_autodiff::<Flex, _>(&normed, w1.clone())
                    + linear_master_normed_autodiff::<Flex, _>(&normed, w2.clone())
            } else {
                linear_master_autodiff::<Flex, _, 3>(normed.out.clone(), w1.clone())
                    + linear_master_autodiff::<Flex, _, 3>(normed.out.clone(), w2.clone())
            };
            let grads = (y.clone() * Tensor::from_inner(g.clone())).sum().backward();
            let grad = |t: Option<Tensor<Flex, 1>>| values(t.unwrap());
            [
                values(y.inner()),
                values(x.grad(&grads).unwrap()),
                grad(nw.grad(&grads)),
                values(w1.grad(&grads).unwrap()),
                values(w2.grad(&grads).unwrap()),
            ]
        };
        assert_eq!(run(true), run(false));
    }
}
