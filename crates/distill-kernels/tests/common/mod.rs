//! Helpers shared by the CUDA test binaries (`--features cuda`).
#![allow(dead_code)]

use burn::backend::cuda::CudaDevice;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};

/// Device 0, or None (after printing SKIPPED) when there is no CUDA device.
pub fn gpu() -> Option<CudaDevice> {
    distill_kernels::cuda::cublas::first_cuda_device()
}

pub fn randn<B: Backend, const D: usize>(shape: [usize; D], std: f64, device: &B::Device) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, std), device)
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
