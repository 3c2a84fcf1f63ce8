//! GPU check of the KL + CE loss on the backend training uses (`Autodiff<Cuda<bf16>>`) against
//! the CPU (`Autodiff<Flex>`, f32, itself checked against PyTorch in `loss::tests`), for every
//! loss kind and both gradient paths (closed form and autodiff). Prints SKIPPED and passes
//! without a CUDA device, or fails when `DISTILL_REQUIRE_GPU=1` is set, as on the GPU machine
//! (`distill_core::testing::skip_gpu_test`, through `first_cuda_device`).
//!
//!     DISTILL_REQUIRE_GPU=1 cargo test -p distill-train --features cuda --test cuda_loss -- --nocapture
//!
//! Why: burn-cuda runs a binary op on two different float dtypes without converting either,
//! and a bf16 `present` mask times f32 per-token KL made every autodiff-path KD loss on the
//! GPU wrong (values and gradients) while the CPU tests passed. The teacher targets here are
//! built with the backend's default dtype on purpose: bf16 on CUDA.
#![cfg(feature = "cuda")]

use burn::backend::{Autodiff, Cuda, Flex};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use distill_core::recipe::{KlKind, MissingMass};
use distill_models::Kernels;
use distill_train::loss::{ChunkedLoss, HeadWeight, LossConfig, TeacherTargets, chunked_loss};

type Gpu = Autodiff<Cuda<half::bf16>>;
type Cpu = Autodiff<Flex>;

const N: usize = 96;
const C: usize = 64;
const K: usize = 32;

/// A small deterministic generator (no rand dependency): uniform in [0, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.next().max(1e-12), self.next());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Rounded to bf16 on the host, so CPU and GPU start from the same numbers.
fn bf16_round(x: f64) -> f32 {
    half::bf16::from_f64(x).to_f32()
}

/// Host-side inputs: hidden [N, C], weight [C, V], labels [N], the teacher's top-K ids and
/// log-probs [N, K] (rows 3, 10, .. list three fewer ids), present [N] (every fifth row none).
struct Inputs {
    v: usize,
    hidden: Vec<f32>,
    weight: Vec<f32>,
    labels: Vec<i64>,
    ids: Vec<i64>,
    logprobs: Vec<f32>,
    present: Vec<f32>,
}

fn inputs(v: usize, seed: u64) -> Inputs {
    let mut g = Lcg(seed);
    let hidden = (0..N * C).map(|_| bf16_round(g.normal())).collect();
    let weight = (0..C * v).map(|_| bf16_round(0.5 * g.normal())).collect();
    let labels = (0..N).map(|_| (g.next() * v as f64) as i64).collect();
    let (mut ids, mut logprobs) = (Vec::new(), Vec::new());
    for row in 0..N {
        // A peaked teacher: logits N(0, 3), log-softmax in f64, the K largest.
        let z: Vec<f64> = (0..v).map(|_| 3.0 * g.normal()).collect();
        let max = z.iter().cloned().fold(f64::MIN, f64::max);
        let lse = max + z.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| z[b].total_cmp(&z[a]));
        for (j, &id) in order.iter().take(K).enumerate() {
            let absent = row % 7 == 3 && j >= K - 3;
            ids.push(if absent { 0 } else { id as i64 });
            logprobs.push(if absent {
                f32::NEG_INFINITY
            } else {
                bf16_round(z[id] - lse)
            });
        }
    }
    let present = (0..N).map(|r| if r % 5 == 4 { 0.0 } else { 1.0 }).collect();
    Inputs {
        v,
        hidden,
        weight,
        labels,
        ids,
        logprobs,
        present,
    }
}

/// (total, ce, kl) per token, grad_hidden and grad_weight ([C, V] order), from `chunked_loss`
/// on backend `AD`, the weight given as an lm_head [C, V] or as tied embeddings [V, C].
fn run<AD>(
    x: &Inputs,
    cfg: &LossConfig,
    tied: bool,
    device: &burn::tensor::Device<AD>,
) -> (Vec<f64>, Vec<f32>, Vec<f32>)
where
    AD: AutodiffBackend + Kernels,
    AD::InnerBackend: Kernels,
{
    type I<AD> = <AD as AutodiffBackend>::InnerBackend;
    let f = |data: &[f32], shape: Vec<usize>| {
        Tensor::<I<AD>, 2>::from_data(TensorData::new(data.to_vec(), shape), device)
    };
    let teacher = TeacherTargets::Sparse {
        ids: Tensor::<I<AD>, 2, Int>::from_data(TensorData::new(x.ids.clone(), [N, K]), device),
        logprobs: f(&x.logprobs, vec![N, K]),
        present: Some(Tensor::from_data(TensorData::new(x.present.clone(), [N]), device)),
    };
    let labels = Tensor::<I<AD>, 1, Int>::from_data(TensorData::new(x.labels.clone(), [N]), device);
    let weight = if tied {
        HeadWeight::Vc(f(&transpose(&x.weight, C, x.v), vec![x.v, C]))
    } else {
        HeadWeight::Cv(f(&x.weight, vec![C, x.v]))
    };
    let out: ChunkedLoss<I<AD>> = chunked_loss::<AD>(
        f(&x.hidden, vec![N, C]),
        weight,
        labels,
        &teacher,
        cfg,
        32,
        true,
        1.0 / N as f64,
    );
    let per_token = [out.total, out.ce, out.kl].map(|s| s / N as f64).to_vec();
    let host = |t: Tensor<I<AD>, 2>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    let grad_w = host(out.grad_weight.expect("asked for"));
    let grad_w = if tied { transpose(&grad_w, x.v, C) } else { grad_w };
    (per_token, host(out.grad_hidden), grad_w)
}

/// A row-major [rows, cols] matrix transposed.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| m[(i % rows) * cols + i / rows])
        .collect()
}

/// ‖a - b‖ / ‖b‖.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        d += (f64::from(*x) - f64::from(*y)).powi(2);
        n += f64::from(*y).powi(2);
    }
    (d / n.max(1e-30)).sqrt()
}

#[test]
fn cuda_bf16_loss_matches_cpu_for_every_kind_and_gradient_path() {
    let Some(device) = distill_kernels::cuda::stream::first_cuda_device() else {
        return;
    };
    let cases: [(&str, KlKind, f64, f64, MissingMass, f64); 6] = [
        (
            "forward",
            KlKind::Forward,
            0.0,
            1.0,
            MissingMass::OtherBucket,
            0.5,
        ),
        (
            "forward T2",
            KlKind::Forward,
            0.0,
            2.0,
            MissingMass::OtherBucket,
            0.5,
        ),
        (
            "reverse",
            KlKind::Reverse,
            0.0,
            1.0,
            MissingMass::OtherBucket,
            0.5,
        ),
        ("jsd 0.5", KlKind::Jsd, 0.5, 1.0, MissingMass::OtherBucket, 0.5),
        (
            "renormalize",
            KlKind::Forward,
            0.0,
            1.0,
            MissingMass::Renormalize,
            0.5,
        ),
        (
            "ce only",
            KlKind::Forward,
            0.0,
            1.0,
            MissingMass::OtherBucket,
            0.0,
        ),
    ];
    let mut failures = Vec::new();
    for v in [1000, 49152] {
        let x = inputs(v, 7 + v as u64);
        for (name, kind, beta, temperature, missing_mass, kd_ratio) in cases {
            let cfg = |analytic_grad| LossConfig {
                kd_ratio,
                kind,
                beta,
                temperature,
                missing_mass,
                vocab_limit: None,
                analytic_grad,
            };
            // The CPU's autodiff path is the reference (PyTorch-checked).
            let (want, want_grad, want_grad_w) = run::<Cpu>(&x, &cfg(false), false, &Default::default());
            for (analytic, tied) in [(true, false), (true, true), (false, false), (false, true)] {
                let (got, grad, grad_w) = run::<Gpu>(&x, &cfg(analytic), tied, &device);
                let value_err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
                    .fold(0.0, f64::max);
                let grad_err = rel_l2(&grad, &want_grad);
                let grad_w_err = rel_l2(&grad_w, &want_grad_w);
                let path = match (analytic, tied) {
                    (true, false) => "closed form",
                    (true, true) => "closed, tied",
                    (false, false) => "autodiff",
                    (false, true) => "autodiff, tied",
                };
                eprintln!(
                    "V {v:>6} {name:<12} {path:<14} total/ce/kl {:.4}/{:.4}/{:.4} (cpu {:.4}/{:.4}/{:.4}) \
                     value err {value_err:.1e} grad err {grad_err:.1e} weight grad err {grad_w_err:.1e}",
                    got[0], got[1], got[2], want[0], want[1], want[2]
                );
                // bf16 logits (2^-9 relative) bound all three; a dtype or layout bug is off by O(1).
                if value_err > 2e-2 || grad_err > 5e-2 || grad_w_err > 5e-2 {
                    failures.push(format!(
                        "V {v} {name} {path}: value {value_err:.2e}, grad {grad_err:.2e}, weight grad {grad_w_err:.2e}"
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "GPU loss differs from the CPU's:\n{}",
        failures.join("\n")
    );
}
