//! Helpers shared by the CUDA test binaries (`--features cuda`).
#![allow(dead_code)]

use std::sync::{Arc, Mutex, MutexGuard, Once};

use burn::backend::cuda::CudaDevice;
use burn::backend::{Cuda, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};
use distill_kernels::cuda::{cublas, stream};

/// A test's turn on the GPU: see [`gpu`].
pub type Turn = MutexGuard<'static, ()>;

/// The seed every GPU test starts from (cubecl's generator and Flex's).
pub const SEED: u64 = 0x5EED;

/// Device 0 and this test's turn on it, or None when there is no CUDA device: the test
/// prints SKIPPED and passes, or fails under `DISTILL_REQUIRE_GPU=1`
/// (`distill_core::testing::skip_gpu_test`, via `stream::first_cuda_device`). Hold the turn
/// for the whole test: `let Some((_turn, device)) = gpu() else { return };`.
///
/// The tests of one binary take turns, whatever `--test-threads` says: they share state of
/// the process that one test's work changes under another's (cuBLAS's ordering and its
/// "last GEMM" in `cublas::describe`, the backends' one random generator, cubecl's autotune
/// cache: a shape being tuned by one test is run with the fallback kernel by another
/// meanwhile, and which kernel wins depends on what else runs on the GPU while it is timed).
/// Each turn starts with both generators at [`SEED`], so a test draws the same inputs
/// whichever tests ran before it. (Fallbacks are checked per thread:
/// `has_fallen_back_on_this_thread`.)
pub fn gpu() -> Option<(Turn, CudaDevice)> {
    static TURN: Mutex<()> = Mutex::new(());
    let device = stream::first_cuda_device()?;
    // A test that failed holding the turn poisons it; the next test's state is reset below.
    let turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    static CONFIG: Once = Once::new();
    CONFIG.call_once(lighter_autotune);
    <Cuda<f32> as Backend>::seed(&device, SEED); // one generator for every cubecl backend
    <Flex as Backend>::seed(&Default::default(), SEED);
    Some((turn, device))
}

/// Autotune at cubecl's `minimal` level unless `CUBECL_AUTOTUNE_LEVEL` says otherwise: the
/// level only sets how coarsely shapes are grouped into autotune keys (cubecl-runtime 0.10,
/// `tune::util::anchor`: powers of 2.5 instead of 2), and fewer keys are fewer tuning passes,
/// each of which compiles and times a batch of matmul and reduce kernels. cubecl 0.10 has no
/// switch that turns autotune off (burn's `autotune` feature does, at build time); each key is
/// tuned once per process and kept under the crate's `target/autotune` for later runs. Must
/// run before the first GPU operation, which reads the configuration.
fn lighter_autotune() {
    use burn_cubecl::cubecl::config::autotune::AutotuneLevel;
    use burn_cubecl::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    if std::env::var_os("CUBECL_AUTOTUNE_LEVEL").is_some() {
        return;
    }
    let mut slot = CubeClRuntimeConfig::storage().lock();
    if slot.is_none() {
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        config.autotune.level = AutotuneLevel::Minimal;
        *slot = Some(Arc::new(config));
    }
}

/// Whether the cuBLAS checks apply: cuBLAS on and libcublas loaded (call after a half-precision
/// GEMM has tried it). When the run chose `DISTILL_CUBLAS=off` they do not (nothing to check,
/// by request). When libcublas could not be loaded they cannot: SKIPPED, or a failure under
/// `DISTILL_REQUIRE_GPU=1`. cuBLAS off without being asked means a GEMM failed and switched it
/// off: a failure.
pub fn cublas_checks_apply() -> bool {
    let described = cublas::describe();
    if stream::ordering() == stream::Ordering::Off {
        let asked = std::env::var("DISTILL_CUBLAS").unwrap_or_default();
        assert!(
            matches!(asked.as_str(), "off" | "0"),
            "cuBLAS is off though DISTILL_CUBLAS={asked:?}: {described}"
        );
        return false;
    }
    if described.contains("libcublas loaded") {
        return true;
    }
    distill_core::testing::skip_gpu_test(&format!("the cuBLAS checks: {described}"));
    false
}

/// N(0, std²) values in `B`'s own float dtype, named explicitly: the device's default dtype is
/// shared by every backend on it (`Cuda<f32>` draws bf16 once a `Cuda<bf16>` test has run).
pub fn randn<B: Backend, const D: usize>(shape: [usize; D], std: f64, device: &B::Device) -> Tensor<B, D> {
    use burn::tensor::Element;
    Tensor::random(
        shape,
        Distribution::Normal(0.0, std),
        (device, <B::FloatElem as Element>::dtype()),
    )
}

pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

pub fn f32_of<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    t.cast(DType::F32)
}

/// max |got - want| / rms(want)
pub fn err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let rms = (want.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / want.len() as f64).sqrt();
    let max = got
        .iter()
        .zip(want)
        .map(|(g, w)| (f64::from(*g) - f64::from(*w)).abs())
        .fold(0.0, f64::max);
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output");
    max / rms.max(1e-30)
}
