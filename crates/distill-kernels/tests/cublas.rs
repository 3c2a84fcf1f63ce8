//! GPU checks of the cuBLAS GEMMs behind `Kernels::linear` on `Cuda<bf16>`, and of the batched
//! GEMMs behind `Kernels::bmm` (attention's) on `Cuda<bf16>` and `Cuda<f32>` (`--features cuda`).
//! Each test prints SKIPPED and passes when there is no CUDA device, or fails when
//! `DISTILL_REQUIRE_GPU=1` is set, as on the GPU machine (the README's GPU test command); the
//! tests take turns on the GPU (`common::gpu`).
//!
//!     DISTILL_REQUIRE_GPU=1 cargo test -p distill-kernels --features cuda --test cublas    # checks
//!     cargo test -p distill-kernels --features cuda --test cublas -- --ignored --nocapture  # TFLOP/s
//!
//! Errors are measured against the f64 product of the same inputs, computed on the host (so a
//! check does not depend on which kernels burn's autotune picks), as max |out - ref| / rms(ref);
//! bf16 rounding of the output alone gives up to ~2^-8 of max|ref|.
#![cfg(feature = "cuda")]

use std::time::Instant;

use burn::backend::cuda::CudaDevice;
use burn::backend::{Autodiff, Cuda};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{DType, Distribution, FloatDType, Tensor};
use distill_kernels::bmm;
use distill_kernels::cuda::{cublas, stream};
use distill_kernels::{Kernels, ModelKernels};

type G = Cuda<half::bf16>;
type AD = Autodiff<G>;

mod common;
use common::{cublas_checks_apply, err, gpu, host, randn};

/// bf16 output rounding is <= 2^-9 relative; a few ulps over rms covers max|ref| ~ 5 rms.
const TOL: f64 = 2.5e-2;

fn check(what: &str, err: f64) {
    eprintln!("  {what:<58} cuBLAS err {err:.2e}");
    assert!(err <= TOL, "{what}: cuBLAS error {err:.3e} > {TOL:e}");
}

struct Case {
    name: &'static str,
    /// x's leading dims; K is appended
    batch: &'static [usize],
    k: usize,
    n: usize,
    bias: bool,
    /// the weight is a transposed view of an [N, K] tensor (tied LM head)
    transposed: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "small odd 37x64x48",
        batch: &[37],
        k: 64,
        n: 48,
        bias: false,
        transposed: false,
    },
    Case {
        name: "M=1001 (not /8), 896x4864",
        batch: &[1001],
        k: 896,
        n: 4864,
        bias: false,
        transposed: false,
    },
    Case {
        name: "3-D [3,333,896] x 896x4864 + bias",
        batch: &[3, 333],
        k: 896,
        n: 4864,
        bias: true,
        transposed: false,
    },
    Case {
        name: "LM head: [2,301,896] x E[1003,896]^T",
        batch: &[2, 301],
        k: 896,
        n: 1003,
        bias: false,
        transposed: true,
    },
    Case {
        name: "LoRA A 1001x896x16",
        batch: &[1001],
        k: 896,
        n: 16,
        bias: false,
        transposed: false,
    },
    Case {
        name: "LoRA B 1001x16x896",
        batch: &[1001],
        k: 16,
        n: 896,
        bias: false,
        transposed: false,
    },
];

/// Forward: `Kernels::linear` (cuBLAS) against the f64 product of the same bf16 values.
fn forward_case<const D: usize>(c: &Case, device: &CudaDevice) {
    let mut shape = [0; D];
    shape[..D - 1].copy_from_slice(c.batch);
    shape[D - 1] = c.k;
    let m: usize = c.batch.iter().product();
    let x = randn::<G, D>(shape, 1.0, device);
    let w = weight::<G>(c, device);
    let b = c.bias.then(|| randn::<G, 1>([c.n], 1.0, device));

    let mut want = host_bmm(&host(x.clone()), &host(w.clone()), 1, m, c.k, c.n);
    if let Some(b) = &b {
        let b = host(b.clone());
        for row in want.chunks_mut(c.n) {
            row.iter_mut().zip(&b).for_each(|(y, b)| *y += b);
        }
    }
    let ours = <G as ModelKernels>::linear(x, w, b);
    check(&format!("fwd  {}", c.name), err(&host(ours), &want));
}

fn weight<B: Backend>(c: &Case, device: &B::Device) -> Tensor<B, 2> {
    let std = 1.0 / (c.k as f64).sqrt();
    if c.transposed {
        randn::<B, 2>([c.n, c.k], std, device).transpose()
    } else {
        randn::<B, 2>([c.k, c.n], std, device)
    }
}

/// Backward under `Autodiff<Cuda<bf16>>`: loss = sum(y * g), so dY = g and
/// dX = g Wᵀ, dW = Xᵀ g, db = Σ g, against the f64 products of the same bf16 values.
fn backward_case<const D: usize>(c: &Case, device: &CudaDevice) {
    let mut shape = [0; D];
    shape[..D - 1].copy_from_slice(c.batch);
    shape[D - 1] = c.k;
    let mut yshape = shape;
    yshape[D - 1] = c.n;
    let m: usize = c.batch.iter().product();
    let x0 = randn::<G, D>(shape, 1.0, device);
    let w_src = if c.transposed {
        randn::<G, 2>([c.n, c.k], 1.0 / (c.k as f64).sqrt(), device)
    } else {
        randn::<G, 2>([c.k, c.n], 1.0 / (c.k as f64).sqrt(), device)
    };
    let b0 = c.bias.then(|| randn::<G, 1>([c.n], 1.0, device));
    let g0 = randn::<G, D>(yshape, 1.0, device);

    let x = Tensor::<AD, D>::from_inner(x0.clone()).require_grad();
    let w_leaf = Tensor::<AD, 2>::from_inner(w_src.clone()).require_grad();
    let w = if c.transposed {
        w_leaf.clone().transpose()
    } else {
        w_leaf.clone()
    };
    let b = b0.map(|b| Tensor::<AD, 1>::from_inner(b).require_grad());
    let y = <AD as ModelKernels>::linear(x.clone(), w, b.clone());
    let grads = (y * Tensor::from_inner(g0.clone())).sum().backward();
    let dw = w_leaf.grad(&grads).unwrap();
    let dw = if c.transposed { dw.transpose() } else { dw }; // as [K, N]

    // [M, K], [K, N] and [M, N] on the host, in row-major order.
    let (x_h, g_h) = (host(x0), host(g0));
    let w_h = host(if c.transposed { w_src.transpose() } else { w_src });
    let want_dx = host_bmm(&g_h, &transposed(&w_h, c.k, c.n), 1, m, c.n, c.k);
    let want_dw = host_bmm(&transposed(&x_h, m, c.k), &g_h, 1, c.k, m, c.n);
    check(
        &format!("dX   {}", c.name),
        err(&host(x.grad(&grads).unwrap()), &want_dx),
    );
    check(&format!("dW   {}", c.name), err(&host(dw), &want_dw));
    if let Some(b) = b {
        let mut want_db = vec![0f32; c.n];
        for row in g_h.chunks(c.n) {
            want_db.iter_mut().zip(row).for_each(|(s, g)| *s += g);
        }
        check(
            &format!("db   {}", c.name),
            err(&host(b.grad(&grads).unwrap()), &want_db),
        );
    }
}

fn run_cases(device: &CudaDevice, f2: fn(&Case, &CudaDevice), f3: fn(&Case, &CudaDevice)) {
    for c in CASES {
        match c.batch.len() {
            1 => f2(c, device),
            2 => f3(c, device),
            _ => unreachable!(),
        }
    }
}

#[test]
fn cuda_cublas_forward_matches_f32_reference() {
    let Some((_turn, device)) = gpu() else { return };
    run_cases(&device, forward_case::<2>, forward_case::<3>);
    eprintln!("{}", cublas::describe());
}

#[test]
fn cuda_cublas_gradients_match_f32_reference() {
    let Some((_turn, device)) = gpu() else { return };
    run_cases(&device, backward_case::<2>, backward_case::<3>);
    eprintln!("{}", cublas::describe());
}

/// 24 layers h = relu(h W_i) + h with no host read in between: cubecl kernels consume each
/// cuBLAS output at once and intermediates are freed and their memory reused, so missing
/// stream ordering shows up as garbage. Reference: the same chain read back to the host after
/// every layer, which orders each GEMM after the kernels before it whatever the ordering does.
fn chain(device: &CudaDevice) -> f64 {
    let (m, k, layers) = (1000, 896, 24);
    let ws: Vec<Tensor<G, 2>> = (0..layers)
        .map(|_| randn::<G, 2>([k, k], (1.0 / k as f64).sqrt(), device))
        .collect();
    let x = randn::<G, 2>([m, k], 1.0, device);
    let layer = |h: Tensor<G, 2>, w: &Tensor<G, 2>| {
        burn::tensor::activation::relu(<G as ModelKernels>::linear(h.clone(), w.clone(), None)) + h
    };
    let mut h = x.clone();
    for w in &ws {
        h = layer(h, w);
    }
    let mut r = x;
    for w in &ws {
        r = layer(r, w);
        let _ = host(r.clone());
    }
    err(&host(h), &host(r))
}

/// The same GEMMs on the same values: equal but for a kernel choice that may differ between
/// runs (cuBLAS's split-K), far below the O(1) error of a read before its write finished.
const CHAIN_TOL: f64 = 1e-3;

#[test]
fn cuda_cublas_chain_is_ordered_with_cubecl_kernels() {
    let Some((_turn, device)) = gpu() else { return };
    let e = chain(&device);
    eprintln!(
        "  24-layer chain, one thread: err {e:.2e}; {}",
        cublas::describe()
    );
    assert!(e < CHAIN_TOL, "chain error {e:.3e}");
    // Two more threads: two more cubecl streams (stream ids) and their own stream lookups.
    let errs: Vec<f64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2).map(|_| s.spawn(|| chain(&device))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!(
        "  24-layer chain, two threads: errs {errs:.3?}; {}",
        cublas::describe()
    );
    assert!(errs.iter().all(|e| *e < CHAIN_TOL), "chain errors {errs:?}");
}

/// The default ordering must have found cubecl's stream (no host syncs); if this fails the
/// GEMMs are still right (host-synced) but slower; the message says why.
#[test]
fn cuda_cublas_runs_on_cubecl_stream() {
    let Some((_turn, device)) = gpu() else { return };
    if stream::ordering() != stream::Ordering::Stream {
        // A legitimate skip, also under DISTILL_REQUIRE_GPU=1, only when the run itself chose
        // another ordering (DISTILL_CUBLAS=sync or off): this test is about the default, which
        // such a run does not use. Any other way here, a cuBLAS error switched cuBLAS off.
        let asked = std::env::var("DISTILL_CUBLAS").unwrap_or_default();
        assert!(
            matches!(asked.as_str(), "sync" | "off" | "0"),
            "cuBLAS ordering {:?} though DISTILL_CUBLAS={asked:?}: {}",
            stream::ordering(),
            cublas::describe()
        );
        eprintln!("SKIPPED: DISTILL_CUBLAS={asked} chose {:?}", stream::ordering());
        return;
    }
    let x = randn::<G, 2>([64, 64], 1.0, &device);
    let _ = host(<G as ModelKernels>::linear(x.clone(), x, None));
    let d = cublas::describe();
    eprintln!("  {d}");
    assert!(d.contains("on cubecl's stream"), "{d}");
}

// ---------------------------------------------------------------------------------------------
// Batched GEMMs: `Kernels::bmm`, attention's [B, H] matrix products.

/// How a bmm operand [B, H, rows, cols] is laid out in memory.
#[derive(Clone, Copy, Debug)]
enum View {
    /// contiguous
    Plain,
    /// [B, H, cols, rows].swap_dims(2, 3), as Kᵀ in Q Kᵀ: cuBLAS's transpose flag
    Transposed,
    /// [B, rows, H, cols].swap_dims(1, 2), as Q after the head split: the [B, H] matrices are
    /// not one stride apart, so the operand is copied to contiguous first
    HeadsInner,
    /// heads 1..=H of a contiguous [B, H + 2, rows, cols]: with B = 1, a view at an offset read
    /// in place (an attention block of some heads of one row)
    HeadSlice,
    /// one [rows, cols] matrix expanded over [B, H]: zero batch strides, copied first
    Broadcast,
}

struct BmmCase {
    name: &'static str,
    /// [B, H]
    batch: [usize; 2],
    m: usize,
    k: usize,
    n: usize,
    a: View,
    b: View,
    /// f32 output from half inputs (attention's scores)
    f32_out: bool,
}

const fn bmm_case(name: &'static str, batch: [usize; 2], a: View, b: View, f32_out: bool) -> BmmCase {
    // M, K, N all different, so a swapped transpose flag or leading dimension cannot pass.
    BmmCase {
        name,
        batch,
        m: 67,
        k: 40,
        n: 53,
        a,
        b,
        f32_out,
    }
}

const BMM_CASES: &[BmmCase] = &[
    bmm_case("plain", [2, 3], View::Plain, View::Plain, false),
    bmm_case(
        "B transposed (Q Kᵀ)",
        [2, 3],
        View::Plain,
        View::Transposed,
        false,
    ),
    bmm_case(
        "A transposed (Pᵀ dO)",
        [2, 3],
        View::Transposed,
        View::Plain,
        false,
    ),
    bmm_case(
        "both transposed",
        [2, 3],
        View::Transposed,
        View::Transposed,
        false,
    ),
    bmm_case(
        "f32 out, B transposed (scores)",
        [2, 3],
        View::Plain,
        View::Transposed,
        true,
    ),
    bmm_case(
        "f32 out, A transposed",
        [2, 3],
        View::Transposed,
        View::Plain,
        true,
    ),
    bmm_case("f32 out, one matrix", [1, 1], View::Plain, View::Transposed, true),
    bmm_case(
        "A heads inner (copied)",
        [2, 3],
        View::HeadsInner,
        View::Transposed,
        false,
    ),
    // M = 64: each head of A is 64 x 40 x 2 bytes, a multiple of cubecl's 512-byte slice
    // alignment, so the slice is a view at an offset rather than a copy (see the test).
    BmmCase {
        name: "A head slice, one row (offset view)",
        batch: [1, 3],
        m: 64,
        k: 40,
        n: 53,
        a: View::HeadSlice,
        b: View::Plain,
        f32_out: false,
    },
    bmm_case(
        "A head slice, two rows (copied)",
        [2, 3],
        View::HeadSlice,
        View::Plain,
        true,
    ),
    bmm_case(
        "B broadcast over [B, H] (copied)",
        [2, 3],
        View::Plain,
        View::Broadcast,
        false,
    ),
    BmmCase {
        name: "attention-like 256x64x256, B transposed, f32 out",
        batch: [1, 2],
        m: 256,
        k: 64,
        n: 256,
        a: View::Plain,
        b: View::Transposed,
        f32_out: true,
    },
];

/// A random operand of `dtype`, named explicitly: a device's default float dtype is shared by
/// every backend on it, so `Cuda<f32>` draws bf16 once a bf16 test has run in the process.
fn operand<B: Backend>(
    view: View,
    [bt, h]: [usize; 2],
    rows: usize,
    cols: usize,
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, 4> {
    let randn =
        |shape: [usize; 4]| Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), (device, dtype));
    match view {
        View::Plain => randn([bt, h, rows, cols]),
        View::Transposed => randn([bt, h, cols, rows]).swap_dims(2, 3),
        View::HeadsInner => randn([bt, rows, h, cols]).swap_dims(1, 2),
        View::HeadSlice => randn([bt, h + 2, rows, cols]).slice([0..bt, 1..h + 1, 0..rows, 0..cols]),
        View::Broadcast => randn([1, 1, rows, cols]).expand([bt, h, rows, cols]),
    }
}

/// a [batch, m, k] @ b [batch, k, n] in f64 on the host, from the values as read back; rows
/// are spread over the host's cores (the largest case is a few GFLOP).
fn host_bmm(a: &[f32], b: &[f32], batch: usize, m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!((a.len(), b.len()), (batch * m * k, batch * k * n));
    let mut c = vec![0f32; batch * m * n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let rows_per = (batch * m).div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (chunk, out) in c.chunks_mut(rows_per * n).enumerate() {
            s.spawn(move || {
                let mut acc = vec![0f64; n];
                for (r, out_row) in out.chunks_mut(n).enumerate() {
                    let row = chunk * rows_per + r; // over batch * m
                    let (p, a_row) = (row / m, &a[row * k..(row + 1) * k]);
                    acc.fill(0.0);
                    for (j, &aj) in a_row.iter().enumerate() {
                        let b_row = &b[(p * k + j) * n..(p * k + j + 1) * n];
                        acc.iter_mut()
                            .zip(b_row)
                            .for_each(|(s, &bv)| *s += f64::from(aj) * f64::from(bv));
                    }
                    out_row.iter_mut().zip(&acc).for_each(|(o, &v)| *o = v as f32);
                }
            });
        }
    });
    c
}

/// The [cols, rows] transpose of a row-major [rows, cols] matrix.
fn transposed(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols * rows)
        .map(|i| v[(i % rows) * cols + i / rows])
        .collect()
}

/// Every case through `Kernels::bmm`, against the f64 product of the same inputs. With half
/// inputs, each case must have gone to cuBLAS (when it is on and loaded:
/// `cublas_checks_apply`); with f32 inputs, none: they are burn's matmul.
fn bmm_cases<B: Kernels>(device: &B::Device, half: bool) {
    let mut cublas_checked = None;
    for c in BMM_CASES {
        let in_dtype = if half { DType::BF16 } else { DType::F32 };
        let a = operand::<B>(c.a, c.batch, c.m, c.k, in_dtype, device);
        let b = operand::<B>(c.b, c.batch, c.k, c.n, in_dtype, device);
        let out = if c.f32_out {
            FloatDType::F32
        } else {
            in_dtype.into()
        };
        let batch = c.batch[0] * c.batch[1];
        let want = host_bmm(&host(a.clone()), &host(b.clone()), batch, c.m, c.k, c.n);
        let before = cublas::issued_on_this_thread();
        let ours = bmm(a, b, out);
        let by_cublas = cublas::issued_on_this_thread() > before;
        assert_eq!(ours.dtype(), DType::from(out), "{}: output dtype", c.name);
        assert_eq!(
            ours.dims(),
            [c.batch[0], c.batch[1], c.m, c.n],
            "{}: output shape",
            c.name
        );
        let e = err(&host(ours), &want);
        let what = format!("bmm {:?} {}", in_dtype, c.name);
        if !half {
            // burn's f32 matmul, which autotune may run in TF32: this test is about the
            // routing, so the result is held to the half-precision tolerance.
            eprintln!("  {what:<58} burn err {e:.2e}");
            assert!(!by_cublas, "{what}: f32 inputs went to cuBLAS");
            assert!(e <= TOL, "{what}: burn's error {e:.3e} > {TOL:e}");
            continue;
        }
        if *cublas_checked.get_or_insert_with(cublas_checks_apply) {
            assert!(
                by_cublas,
                "{what}: fell back to burn's matmul ({})",
                cublas::describe()
            );
        }
        if c.f32_out {
            // Products of bf16 are exact in f32 and the sum is f32: far below one bf16 rounding
            // of the output (~4e-3 here), which a bf16-then-cast result would show.
            eprintln!("  {what:<58} cuBLAS err {e:.2e}");
            assert!(e < 1e-4, "{what}: error {e:.3e} is a rounded, not an f32, result");
        } else {
            check(&what, e);
        }
    }
}

#[test]
fn cuda_bmm_bf16_matches_the_host_product() {
    let Some((_turn, device)) = gpu() else { return };
    // The one-row head slice must reach cuBLAS as a view at an offset, or that case tests a copy.
    let slice = operand::<G>(View::HeadSlice, [1, 3], 64, 40, DType::BF16, &device);
    let offset = slice.into_primitive().tensor().handle.offset_start;
    assert!(
        offset.is_some_and(|o| o > 0),
        "head slice is not an offset view: {offset:?}"
    );
    bmm_cases::<G>(&device, true);
    eprintln!("{}", cublas::describe());
}

#[test]
fn cuda_bmm_f32_inputs_fall_back_to_burn_matmul() {
    let Some((_turn, device)) = gpu() else { return };
    bmm_cases::<Cuda<f32>>(&device, false);
}

/// `bmm_accumulate` as the loss runs it (a tied head's dW: hᵀ [C, len] a transposed view, times
/// G [len, V], into an f32 sum): cuBLAS adds into the sum's own buffer, and the result is the
/// f64 sum of the same values. A sum held elsewhere too is not written over: that call falls
/// back to a new tensor and the other holder keeps its values.
#[test]
fn cuda_bmm_accumulate_adds_into_an_f32_sum() {
    let Some((_turn, device)) = gpu() else { return };
    let (c, len, v) = (96, 64, 1000);
    let acc = randn::<G, 4>([1, 1, c, v], 1.0, &device).cast(DType::F32);
    let h = randn::<G, 2>([len, c], 1.0, &device);
    let ht = h.clone().reshape([1, 1, len, c]).swap_dims(2, 3); // [1, 1, C, len], a view
    let g = randn::<G, 4>([1, 1, len, v], 1.0, &device);
    let before = host(acc.clone());
    let product = host_bmm(&host(ht.clone()), &host(g.clone()), 1, c, len, v);
    let want: Vec<f32> = before.iter().zip(&product).map(|(a, p)| a + p).collect();

    let accumulated = cublas::accumulated_on_this_thread();
    let sum = distill_kernels::bmm_accumulate(acc, ht.clone(), g.clone());
    let in_place = cublas::accumulated_on_this_thread() > accumulated;
    assert_eq!((sum.dtype(), sum.dims()), (DType::F32, [1, 1, c, v]));
    let e = err(&host(sum), &want);
    eprintln!("  bmm_accumulate in place (cuBLAS: {in_place})   err {e:.2e}");
    assert!(e < 1e-5, "accumulated sum off by {e:.3e}");
    if cublas_checks_apply() {
        assert!(
            in_place,
            "the accumulating GEMM fell back ({})",
            cublas::describe()
        );
    }

    let acc = Tensor::<G, 4>::from_data(
        burn::tensor::TensorData::new(before.clone(), [1, 1, c, v]),
        (&device, DType::F32),
    );
    let kept = acc.clone();
    let accumulated = cublas::accumulated_on_this_thread();
    let sum = distill_kernels::bmm_accumulate(acc, ht, g);
    assert_eq!(
        cublas::accumulated_on_this_thread(),
        accumulated,
        "a shared sum was accumulated in place"
    );
    assert!(err(&host(sum), &want) < 1e-5, "shared sum: wrong result");
    assert_eq!(host(kept), before, "a sum held elsewhere was written over");
}

// ---------------------------------------------------------------------------------------------
// Timing harness: `-- --ignored --nocapture`.

fn time(iters: usize, device: &CudaDevice, mut f: impl FnMut()) -> f64 {
    for _ in 0..5 {
        f(); // warm up: burn autotunes each new shape
    }
    G::sync(device).unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    G::sync(device).unwrap();
    t.elapsed().as_secs_f64() / iters as f64
}

fn prim<const D: usize>(t: &Tensor<G, D>) -> FloatTensor<G> {
    t.clone().into_primitive().tensor()
}

#[test]
#[ignore = "timing harness: run on the GPU with --ignored --nocapture"]
fn cuda_bench_gemm_tflops() {
    let Some((_turn, device)) = gpu() else { return };
    // The ordering is the process's: put back the one found, also if a panic ends the test.
    struct Restore(stream::Ordering);
    impl Drop for Restore {
        fn drop(&mut self) {
            stream::set_ordering(self.0);
        }
    }
    let _restore = Restore(stream::ordering());
    eprintln!("bf16, M x K x N, TFLOP/s (mean over iterations after 5 warm-ups)");
    let shapes = [
        (8192, 896, 4864),
        (8192, 3584, 18944),
        (8192, 896, 896),
        (8192, 896, 16),
    ];
    for (m, k, n) in shapes {
        let iters = if m * k * n > 100_000_000_000 { 10 } else { 30 };
        let flop = 2.0 * (m * k * n) as f64;
        let x = randn::<G, 2>([m, k], 1.0, &device);
        let w = randn::<G, 2>([k, n], 0.03, &device);
        let dy = randn::<G, 2>([m, n], 1.0, &device);
        let tf = |secs: f64, gemms: f64| gemms * flop / secs / 1e12;

        // Forward: one GEMM.
        let burn_fwd = time(iters, &device, || drop(G::float_matmul(prim(&x), prim(&w))));
        stream::set_ordering(stream::Ordering::Stream);
        let ours_fwd = time(iters, &device, || {
            drop(<G as ModelKernels>::gemm(prim(&x), prim(&w)))
        });
        stream::set_ordering(stream::Ordering::Sync);
        let sync_fwd = time(iters, &device, || {
            drop(<G as ModelKernels>::gemm(prim(&x), prim(&w)))
        });
        stream::set_ordering(stream::Ordering::Stream);

        // Forward + both backward GEMMs on transposed views, as the autodiff op issues them.
        let three = |mm: fn(_, _) -> _| {
            drop(mm(prim(&x), prim(&w))); // Y = X W
            drop(mm(prim(&dy), G::float_transpose(prim(&w)))); // dX = dY Wᵀ
            drop(mm(G::float_transpose(prim(&x)), prim(&dy))); // dW = Xᵀ dY
        };
        let burn_3 = time(iters, &device, || three(G::float_matmul));
        let ours_3 = time(iters, &device, || three(<G as ModelKernels>::gemm));

        // The whole autodiff linear (incl. the sum's backward fill and autodiff bookkeeping).
        let ad = |ours: bool| {
            let xa = Tensor::<AD, 2>::from_inner(x.clone()).require_grad();
            let wa = Tensor::<AD, 2>::from_inner(w.clone()).require_grad();
            let y = if ours {
                <AD as ModelKernels>::linear(xa, wa, None)
            } else {
                burn::tensor::module::linear(xa, wa, None)
            };
            drop(y.sum().backward());
        };
        let burn_ad = time(iters, &device, || ad(false));
        let ours_ad = time(iters, &device, || ad(true));

        eprintln!("{m}x{k}x{n}:");
        eprintln!(
            "  fwd          burn {:7.1}  cuBLAS {:7.1}  cuBLAS host-synced {:7.1}  ({:.3} / {:.3} / {:.3} ms)",
            tf(burn_fwd, 1.0),
            tf(ours_fwd, 1.0),
            tf(sync_fwd, 1.0),
            burn_fwd * 1e3,
            ours_fwd * 1e3,
            sync_fwd * 1e3
        );
        eprintln!(
            "  fwd+bwd GEMMs burn {:7.1}  cuBLAS {:7.1}  ({:.3} / {:.3} ms)",
            tf(burn_3, 3.0),
            tf(ours_3, 3.0),
            burn_3 * 1e3,
            ours_3 * 1e3
        );
        eprintln!(
            "  autodiff linear fwd+bwd (+sum) burn {:7.1}  ours {:7.1}  ({:.3} / {:.3} ms)",
            tf(burn_ad, 3.0),
            tf(ours_ad, 3.0),
            burn_ad * 1e3,
            ours_ad * 1e3
        );
    }

    // Host-sync cost on a train-like sequence of small GEMMs with kernels in between.
    let (m, k) = (8192, 896);
    let ws: Vec<Tensor<G, 2>> = (0..16).map(|_| randn::<G, 2>([k, k], 0.03, &device)).collect();
    let x = randn::<G, 2>([m, k], 1.0, &device);
    let seq = || {
        let mut h = x.clone();
        for w in &ws {
            h = burn::tensor::activation::silu(<G as ModelKernels>::linear(h, w.clone(), None));
        }
        drop(h);
    };
    let mut row = Vec::new();
    for o in [
        stream::Ordering::Off,
        stream::Ordering::Stream,
        stream::Ordering::Sync,
    ] {
        stream::set_ordering(o);
        row.push((o, time(10, &device, seq) * 1e3));
    }
    stream::set_ordering(stream::Ordering::Stream);
    eprintln!("16 x (8192x896x896 GEMM + silu), ms per sequence: {row:.3?}");
    eprintln!("{}", cublas::describe());
}
