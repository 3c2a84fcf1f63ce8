//! GPU checks of the ops with hand-written backward passes (`--features cuda`): blockwise
//! attention, RMSNorm and SwiGLU under `Autodiff<Cuda>`, against burn's own autodiff through
//! the same forward as separate ops. Each test prints SKIPPED and passes without a CUDA device.
//!
//!     cargo test -p distill-models --features cuda --test cuda_ops -- --nocapture
//!
//! In f32 the two must agree to rounding; in bf16 both are compared with the f32 result, and
//! ours may not be much further from it than burn's.
#![cfg(feature = "cuda")]

use burn::backend::{Autodiff, Cuda};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor, TensorData};
use distill_models::Kernels;
use distill_models::ops::{attention_autodiff, elementwise, rms_norm_default};

mod common;
use common::{err, gpu, host, randn};

type F = Autodiff<Cuda<f32>>;
type H = Autodiff<Cuda<half::bf16>>;

/// Output and input gradients of `f` under a fixed random weighting of the output.
fn run<B: AutodiffBackend, const D: usize>(
    inputs: &[Tensor<B, D>],
    f: &dyn Fn(Vec<Tensor<B, D>>) -> Tensor<B, D>,
    weight: &Tensor<B, D>,
) -> Vec<Vec<f32>> {
    let xs: Vec<Tensor<B, D>> = inputs.iter().map(|x| x.clone().require_grad()).collect();
    let y = f(xs.clone());
    let grads = (y.clone() * weight.clone()).sum().backward();
    let mut out = vec![host(y.inner())];
    out.extend(
        xs.iter()
            .map(|x| host(x.grad(&grads).expect("input has a gradient"))),
    );
    out
}

/// Compares ours with burn's in f32 (tight) and, in bf16, both with the f32 result.
fn compare(
    name: &str,
    f32_ours: &[Vec<f32>],
    f32_burn: &[Vec<f32>],
    bf16_ours: &[Vec<f32>],
    bf16_burn: &[Vec<f32>],
) {
    for (i, part) in ["out", "grad 0", "grad 1", "grad 2"]
        .iter()
        .enumerate()
        .take(f32_ours.len())
    {
        let exact = err(&f32_ours[i], &f32_burn[i]);
        let (ours, burns) = (err(&bf16_ours[i], &f32_burn[i]), err(&bf16_burn[i], &f32_burn[i]));
        eprintln!("  {name} {part:<7} f32 vs burn {exact:.2e}   bf16 err ours {ours:.2e} burn {burns:.2e}");
        assert!(
            exact < 1e-4,
            "{name} {part}: f32 differs from burn's by {exact:.3e}"
        );
        assert!(
            ours <= 2.0 * burns + 2e-2,
            "{name} {part}: bf16 error {ours:.3e}, burn's {burns:.3e}"
        );
    }
}

fn packed_mask<B: Backend>(b: usize, h: usize, t: usize, device: &B::Device) -> Tensor<B, 4, Bool> {
    let doc = |r: usize, i: usize| usize::from(r == 1 && i >= t / 3);
    let data: Vec<bool> = (0..b)
        .flat_map(|r| (0..t).flat_map(move |i| (0..t).map(move |j| j > i || doc(r, i) != doc(r, j))))
        .collect();
    Tensor::<B, 3, Bool>::from_data(TensorData::new(data, [b, t, t]), device)
        .unsqueeze_dim::<4>(1)
        .expand([b, h, t, t])
}

/// Blockwise (`Kernels::attention` under autodiff) or burn's attention, on a packed mask.
fn attention_on<B: AutodiffBackend + Kernels>(device: &B::Device, blockwise: bool) -> Vec<Vec<f32>> {
    let (b, h, t, hd) = (2, 4, 96, 64);
    B::seed(device, 5);
    let qkv: Vec<Tensor<B, 4>> = (0..3).map(|_| randn([b, h, t, hd], 1.0, device)).collect();
    let w = randn([b, h, t, hd], 1.0, device);
    let mask = packed_mask::<B>(b, h, t, device);
    run(
        &qkv,
        &|x: Vec<Tensor<B, 4>>| {
            let [q, k, v]: [Tensor<B, 4>; 3] = x.try_into().unwrap();
            if blockwise {
                <B as Kernels>::attention(q, k, v, Some(mask.clone()))
            } else {
                burn_attention(
                    q,
                    k,
                    v,
                    Some(mask.clone()),
                    None,
                    AttentionModuleOptions::default(),
                )
            }
        },
        &w,
    )
}

#[test]
fn cuda_blockwise_attention_matches_burns() {
    let Some(device) = gpu() else { return };
    let ours_f = attention_on::<F>(&device, true);
    let burn_f = attention_on::<F>(&device, false);
    let ours_h = attention_on::<H>(&device, true);
    let burn_h = attention_on::<H>(&device, false);
    compare("attention", &ours_f, &burn_f, &ours_h, &burn_h);
    // Several blocks per row (one head each): the same result.
    let (b, h, t, hd) = (2, 4, 96, 64);
    F::seed(&device, 5);
    let qkv: Vec<Tensor<F, 4>> = (0..3).map(|_| randn([b, h, t, hd], 1.0, &device)).collect();
    let w = randn([b, h, t, hd], 1.0, &device);
    let mask = packed_mask::<F>(b, h, t, &device);
    let small = run(
        &qkv,
        &|x: Vec<Tensor<F, 4>>| {
            let [q, k, v]: [Tensor<F, 4>; 3] = x.try_into().unwrap();
            attention_autodiff(q, k, v, Some(mask.clone()), t * t * 4)
        },
        &w,
    );
    for (i, (a, b)) in small.iter().zip(&ours_f).enumerate() {
        assert!(
            err(a, b) < 1e-5,
            "part {i}: one head per block differs: {:.3e}",
            err(a, b)
        );
    }
}

#[test]
fn cuda_rms_norm_and_swiglu_nodes_match_burns() {
    let Some(device) = gpu() else { return };
    fn both<B: AutodiffBackend + Kernels>(device: &B::Device) -> [Vec<Vec<f32>>; 4] {
        B::seed(device, 7);
        let x: Tensor<B, 3> = randn([2, 64, 256], 1.0, device);
        let g: Tensor<B, 3> = randn([2, 64, 256], 1.0, device);
        let w3: Tensor<B, 3> = randn([2, 64, 256], 1.0, device);
        let scale: Tensor<B, 1> = randn::<B, 1>([256], 0.1, device).add_scalar(1.0);
        // RMSNorm's second input is a vector: treat it as [1, 1, C] for `run`, reshaped inside.
        let s3 = scale.clone().reshape([1, 1, 256]);
        let norm = |ours: bool| {
            run(
                &[x.clone(), s3.clone()],
                &|v: Vec<Tensor<B, 3>>| {
                    let [x, s]: [Tensor<B, 3>; 2] = v.try_into().unwrap();
                    let s = s.reshape([256]);
                    if ours {
                        B::rms_norm(x, s, 1e-6)
                    } else {
                        rms_norm_default(x, s, 1e-6)
                    }
                },
                &w3,
            )
        };
        let swiglu = |ours: bool| {
            run(
                &[g.clone(), x.clone()],
                &|v: Vec<Tensor<B, 3>>| {
                    let [g, u]: [Tensor<B, 3>; 2] = v.try_into().unwrap();
                    if ours {
                        B::swiglu(g, u)
                    } else {
                        elementwise::swiglu_default(g, u)
                    }
                },
                &w3,
            )
        };
        [norm(true), norm(false), swiglu(true), swiglu(false)]
    }
    let [nf, nbf, sf, sbf] = both::<F>(&device);
    let [nh, nbh, sh, sbh] = both::<H>(&device);
    compare("rms_norm", &nf, &nbf, &nh, &nbh);
    compare("swiglu", &sf, &sbf, &sh, &sbh);
}
