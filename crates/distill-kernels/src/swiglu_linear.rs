//! The SwiGLU MLP's down projection with its input recomputed ([`Kernels::swiglu_linear`]):
//!     h = silu(gate) · up,   y = h W  (+ (h A) B with a LoRA adapter)
//!
//! Why: as separate nodes, swiglu keeps gate and up for its backward and the down projection's
//! GEMMs keep h for theirs (dW = hᵀ dY; LoRA's dA = hᵀ (dY Bᵀ)): three [.., I] tensors a
//! layer, h alone about a quarter of a layer's activation memory. As one node the graph keeps
//! gate and up, and the backward recomputes h with one elementwise pass, the way Unsloth's
//! fused MLP does. Same kernels, same rounding: the gradients equal the separate nodes'.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::Tensor;
use burn::tensor::ops::FloatTensor;

use super::{LinearWeight, ModelKernels, gemm, prim, tensor};

/// A LoRA adapter's two matrices as the GEMMs take them: A [I, r] (scale folded in), B [r, N].
pub type LoraPair<B> = (Tensor<B, 2>, Tensor<B, 2>);

/// [`Kernels::swiglu_linear`] as separate ops: what backends without autodiff run.
pub fn swiglu_linear_default<B: ModelKernels>(
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    w: LinearWeight<B>,
    lora: Option<LoraPair<B>>,
) -> Tensor<B, 3> {
    let h = <B as ModelKernels>::swiglu(gate, up); // [B, T, I]
    let y = w.linear(h.clone(), None); // [B, T, N]
    match lora {
        None => y,
        Some((a, b)) => y + <B as ModelKernels>::linear(<B as ModelKernels>::linear(h, a, None), b, None),
    }
}

/// What the backward needs: the activation's inputs and the weights; with LoRA also
/// t = h A [M, r] (r columns, kept: recomputing it would be a GEMM).
#[derive(Debug, Clone)]
struct Saved<B: ModelKernels> {
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    /// NF4: the codes, dequantized again in the backward; a master weight, cast again.
    w: LinearWeight<B>,
    lora: Option<(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>)>,
}

/// h = swiglu(gate, up) flattened to [M, I].
fn activation<B: ModelKernels>(gate: &Tensor<B, 3>, up: &Tensor<B, 3>) -> Tensor<B, 2> {
    let [b, t, i] = gate.dims();
    B::swiglu(gate.clone(), up.clone()).reshape([b * t, i])
}

/// The forward on the inner backend: (y [B, T, N], what the backward keeps).
fn forward<B: ModelKernels>(
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    w: LinearWeight<B>,
    lora: Option<LoraPair<B>>,
) -> (Tensor<B, 3>, Saved<B>) {
    let [b, t, _] = gate.dims();
    let n = w.dims()[1];
    let h = activation(&gate, &up); // [M, I]
    let y = gemm(h.clone(), w.dense(h.dtype())); // [M, N]
    let (y, lora) = match lora {
        None => (y, None),
        Some((a, lb)) => {
            let tt = gemm(h, a.clone()); // [M, r]
            (y + gemm(tt.clone(), lb.clone()), Some((a, lb, tt)))
        }
    };
    (y.reshape([b, t, n]), Saved { gate, up, w, lora })
}

/// Which inputs take a gradient, in the node's parent order: gate, up, W, A, B.
type Wanted = [bool; 5];

/// The gradients the node's parents want, same order, from dY [B, T, N].
fn backward<B: ModelKernels>(s: Saved<B>, dy: Tensor<B, 3>, want: Wanted) -> [Option<Tensor<B, 2>>; 5] {
    let [bt, t, n] = dy.dims();
    let dy = dy.reshape([bt * t, n]); // [M, N]
    let [want_gate, want_up, want_w, want_a, want_b] = want;
    let h = (want_w || want_a).then(|| activation(&s.gate, &s.up)); // [M, I], recomputed
    let mut grads: [Option<Tensor<B, 2>>; 5] = Default::default();
    if want_w {
        let dw = gemm(h.clone().expect("h when W wants a grad").transpose(), dy.clone()); // [I, N]
        // In the master's dtype, as its cast's backward would have returned it.
        grads[2] = Some(match &s.w {
            LinearWeight::Master(w) => dw.cast(w.dtype()),
            _ => dw,
        });
    }
    // dh from the base GEMM, plus LoRA's path.
    let mut dh = (want_gate || want_up).then(|| gemm(dy.clone(), s.w.dense(dy.dtype()).transpose())); // [M, I]
    if let Some((a, lb, tt)) = &s.lora {
        let dt = gemm(dy.clone(), lb.clone().transpose()); // [M, r]
        if want_b {
            grads[4] = Some(gemm(tt.clone().transpose(), dy)); // [r, N]
        }
        if want_a {
            grads[3] = Some(gemm(h.expect("h when A wants a grad").transpose(), dt.clone())); // [I, r]
        }
        dh = dh.map(|dh| dh + gemm(dt, a.clone().transpose()));
    }
    if let Some(dh) = dh {
        let dims = s.gate.dims();
        let (d_gate, d_up) = B::swiglu_backward(s.gate, s.up, dh.reshape(dims));
        let flat = |d: Tensor<B, 3>| d.reshape([dims[0] * dims[1], dims[2]]);
        grads[0] = want_gate.then(|| flat(d_gate));
        grads[1] = want_up.then(|| flat(d_up));
    }
    grads
}

/// [`Kernels::swiglu_linear`] under autodiff: one node whose graph keeps gate and up, not h.
pub fn swiglu_linear_autodiff<B: ModelKernels, C: CheckpointStrategy>(
    gate: Tensor<Autodiff<B, C>, 3>,
    up: Tensor<Autodiff<B, C>, 3>,
    w: LinearWeight<Autodiff<B, C>>,
    lora: Option<LoraPair<Autodiff<B, C>>>,
) -> Tensor<Autodiff<B, C>, 3> {
    let (w_inner, w_parent) = match w {
        LinearWeight::Dense(w) => (LinearWeight::Dense(w.clone().inner()), Some(prim(w))),
        LinearWeight::Master(w) => (LinearWeight::Master(w.clone().inner()), Some(prim(w))),
        LinearWeight::Nf4(w) => (LinearWeight::Nf4(w.inner()), None),
    };
    let inner = (
        gate.clone().inner(),
        up.clone().inner(),
        w_inner,
        lora.clone().map(|(a, b)| (a.inner(), b.inner())),
    );
    let (gate, up) = (prim(gate), prim(up));
    let lora = lora.map(|(a, b)| (prim(a), prim(b)));
    // Parents in the order gate, up, W, A, B, less those absent (an NF4 W is not a tensor of
    // the graph); `slots` maps each to its place in that order.
    tensor(match (&w_parent, &lora) {
        (Some(w), None) => node::<B, C, 3>([&gate, &up, w], [0, 1, 2], inner),
        (None, None) => node::<B, C, 2>([&gate, &up], [0, 1], inner),
        (Some(w), Some((a, b))) => node::<B, C, 5>([&gate, &up, w, a, b], [0, 1, 2, 3, 4], inner),
        (None, Some((a, b))) => node::<B, C, 4>([&gate, &up, a, b], [0, 1, 3, 4], inner),
    })
}

/// The forward as a node with these parents, each at `slots` in the order gate, up, W, A, B.
fn node<B: ModelKernels, C: CheckpointStrategy, const N: usize>(
    parents: [&FloatTensor<Autodiff<B, C>>; N],
    slots: [usize; N],
    (gate, up, w, lora): (Tensor<B, 3>, Tensor<B, 3>, LinearWeight<B>, Option<LoraPair<B>>),
) -> FloatTensor<Autodiff<B, C>>
where
    Node: Backward<B, N, State = (Saved<B>, [usize; 3], [usize; N])>,
{
    let gate_dims = gate.dims();
    match Node
        .prepare::<C>(parents.map(|p| p.node.clone()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (y, saved) = forward(gate, up, w, lora);
            prep.finish((saved, gate_dims, slots), prim(y))
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(forward(gate, up, w, lora).0)),
    }
}

/// The node, with 2 to 5 parents ([`swiglu_linear_autodiff`]).
#[derive(Debug)]
struct Node;

impl<B: ModelKernels, const N: usize> Backward<B, N> for Node {
    type State = (Saved<B>, [usize; 3], [usize; N]);

    /// Registers the wanted gradients; gate's and up's back in their [B, T, I] shape.
    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = tensor::<B, 3>(grads.consume::<B>(&ops.node));
        let (saved, gate_dims, slots) = ops.state;
        let mut want = [false; 5];
        for (slot, parent) in slots.iter().zip(&ops.parents) {
            want[*slot] = parent.is_some();
        }
        let mut computed = backward(saved, dy, want);
        for (slot, parent) in slots.iter().zip(&ops.parents) {
            if let (Some(node), Some(grad)) = (parent, computed[*slot].take()) {
                let grad = if *slot < 2 {
                    prim(grad.reshape(gate_dims))
                } else {
                    prim(grad)
                };
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{DType, Tensor, TensorData};
    use distill_core::testing::TestRng;

    use super::*;
    use crate::elementwise::swiglu_default;

    type AD = Autodiff<Flex>;

    /// N(0, 1) values from a generator of the test's own: burn's is one for the process, which
    /// the tests running beside this one draw from too.
    fn random<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<Flex, D> {
        let values = TestRng::new(seed).normal_vec(shape.iter().product(), 0.0, 1.0);
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec().unwrap()
    }

    /// gate, up, W, LoRA's A and B, and the output's weights. Made once and shared by both
    /// sides.
    struct Inputs {
        gate: Tensor<Flex, 3>,
        up: Tensor<Flex, 3>,
        w: Tensor<Flex, 2>,
        a: Tensor<Flex, 2>,
        b: Tensor<Flex, 2>,
        weights: Tensor<Flex, 3>,
    }

    fn inputs() -> Inputs {
        let (m, i, n, r) = ([2, 5], 12, 7, 3);
        Inputs {
            gate: random([m[0], m[1], i], 1),
            up: random([m[0], m[1], i], 2),
            w: random([i, n], 3).mul_scalar(0.3),
            a: random([i, r], 4).mul_scalar(0.5),
            b: random([r, n], 5),
            weights: random([m[0], m[1], n], 6),
        }
    }

    /// The output and every wanted gradient under a weighted sum, through `f`.
    fn run(
        f: impl Fn(Tensor<AD, 3>, Tensor<AD, 3>, Tensor<AD, 2>, Option<LoraPair<AD>>) -> Tensor<AD, 3>,
        x: &Inputs,
        with_lora: bool,
        train_w: bool,
    ) -> Vec<Vec<f32>> {
        let gate = Tensor::<AD, 3>::from_inner(x.gate.clone()).require_grad();
        let up = Tensor::<AD, 3>::from_inner(x.up.clone()).require_grad();
        let w = Tensor::<AD, 2>::from_inner(x.w.clone());
        let w = if train_w { w.require_grad() } else { w };
        let lora = with_lora.then(|| {
            (
                Tensor::<AD, 2>::from_inner(x.a.clone()).require_grad(),
                Tensor::<AD, 2>::from_inner(x.b.clone()).require_grad(),
            )
        });
        let y = f(gate.clone(), up.clone(), w.clone(), lora.clone());
        let grads = (y.clone() * Tensor::from_inner(x.weights.clone()))
            .sum()
            .backward();
        let mut out = vec![
            values(y.inner()),
            values(gate.grad(&grads).unwrap()),
            values(up.grad(&grads).unwrap()),
        ];
        if train_w {
            let dw = w.grad(&grads).unwrap();
            assert_eq!(dw.dtype(), w.dtype(), "dW in the weight's dtype");
            out.push(values(dw));
        }
        if let Some((a, b)) = lora {
            out.push(values(a.grad(&grads).unwrap()));
            out.push(values(b.grad(&grads).unwrap()));
        }
        out
    }

    /// The fused node against burn's autodiff through the same math as plain burn ops
    /// (silu(gate) · up, matmuls, no custom backward anywhere): output and the gradients of
    /// gate, up, W (full fine-tuning) and the adapter, with and without LoRA.
    #[test]
    fn recomputed_input_gives_the_gradients_of_separate_ops() {
        let reference = |g: Tensor<AD, 3>, u: Tensor<AD, 3>, w: Tensor<AD, 2>, lora: Option<LoraPair<AD>>| {
            let h = swiglu_default(g, u);
            let y = h.clone().matmul(w.unsqueeze());
            match lora {
                None => y,
                Some((a, b)) => y + h.matmul(a.unsqueeze()).matmul(b.unsqueeze()),
            }
        };
        for (with_lora, train_w) in [(false, true), (true, false), (true, true)] {
            let x = inputs();
            let ours = run(
                |g, u, w, l| swiglu_linear_autodiff::<Flex, _>(g, u, LinearWeight::Dense(w), l),
                &x,
                with_lora,
                train_w,
            );
            let theirs = run(reference, &x, with_lora, train_w);
            assert_eq!(ours.len(), theirs.len());
            for (k, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 1e-5 + 1e-4 * y.abs(),
                        "lora {with_lora}, train W {train_w}, output {k}: {x} vs {y}"
                    );
                }
            }
        }
    }

    /// With an NF4 base the node keeps the codes and dequantizes again for dh: the same output
    /// and gradients as the plain ops over the dequantized weight, with and without LoRA.
    #[test]
    fn an_nf4_base_gives_the_gradients_of_its_dequantized_weight() {
        let mut x = inputs();
        let [i, n] = x.w.dims();
        let hf: Vec<f32> = values(x.w.clone().transpose()); // [N, I]
        let nf4 = crate::nf4::Nf4::<AD>::quantize(&hf, [n, i], &Default::default()).tensor();
        x.w = crate::nf4::dequantize_default(&nf4.inner(), burn::tensor::DType::F32).transpose();
        for with_lora in [false, true] {
            let ours = run(
                |g, u, _, l| swiglu_linear_autodiff::<Flex, _>(g, u, LinearWeight::Nf4(nf4.clone()), l),
                &x,
                with_lora,
                false,
            );
            let theirs = run(
                |g, u, w, l| swiglu_linear_default::<AD>(g, u, LinearWeight::Dense(w), l),
                &x,
                with_lora,
                false,
            );
            for (k, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 1e-5 + 1e-4 * y.abs(),
                        "lora {with_lora}, output {k}: {x} vs {y}"
                    );
                }
            }
        }
    }

    /// A master weight (f32 under bf16 activations) is cast again in the backward instead of
    /// kept: the same output and gradients, to the bit, as the node over its bf16 cast, and dW
    /// in f32.
    #[test]
    fn a_master_weight_gives_the_gradients_of_its_cast() {
        let bf16 = |t: Tensor<Flex, 3>| t.cast(DType::BF16);
        let mut x = inputs();
        (x.gate, x.up, x.weights) = (bf16(x.gate), bf16(x.up), bf16(x.weights));
        (x.a, x.b) = (x.a.cast(DType::BF16), x.b.cast(DType::BF16));
        for with_lora in [false, true] {
            let ours = run(
                |g, u, w, l| swiglu_linear_autodiff::<Flex, _>(g, u, LinearWeight::Master(w), l),
                &x,
                with_lora,
                true,
            );
            let theirs = run(
                |g, u, w, l| {
                    swiglu_linear_autodiff::<Flex, _>(g, u, LinearWeight::Dense(w.cast(DType::BF16)), l)
                },
                &x,
                with_lora,
                true,
            );
            assert_eq!(ours, theirs, "lora {with_lora}");
        }
    }

    /// The unfused default (inference) computes the same output as the node.
    #[test]
    fn default_and_node_agree_forward() {
        let (g, u) = (random([1, 4, 6], 7), random([1, 4, 6], 8));
        let (w, a, b) = (random([6, 5], 9), random([6, 2], 10), random([2, 5], 11));
        let plain = swiglu_linear_default::<Flex>(
            g.clone(),
            u.clone(),
            LinearWeight::Dense(w.clone()),
            Some((a.clone(), b.clone())),
        );
        let node = swiglu_linear_autodiff::<Flex, _>(
            Tensor::<AD, 3>::from_inner(g),
            Tensor::from_inner(u),
            LinearWeight::Dense(Tensor::from_inner(w)),
            Some((Tensor::from_inner(a), Tensor::from_inner(b))),
        );
        assert_eq!(values(plain), values(node.inner()));
    }
}
