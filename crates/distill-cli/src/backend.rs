//! `--device`: which burn backend runs the tensors. CPU is burn's Flex backend in f32;
//! CUDA (with the `cuda` feature) is burn-cuda in bf16.

use std::str::FromStr;

use burn::backend::Autodiff;
use burn::tensor::backend::BackendTypes;
use distill_models::Kernels;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceArg::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device; use cpu, cuda or cuda:N")),
        }
    }
}

impl DeviceArg {
    /// CUDA when this build supports it and a driver is loaded, else CPU.
    pub fn resolve(arg: Option<DeviceArg>) -> DeviceArg {
        arg.unwrap_or(if cfg!(feature = "cuda") && nvidia_driver_present() {
            DeviceArg::Cuda(0)
        } else {
            DeviceArg::Cpu
        })
    }
}

fn nvidia_driver_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia/version").exists()
}

/// Work that runs on any backend (training on its autodiff wrapper too); [`run_on`] picks
/// the backend from the device.
pub trait Job {
    type Output;
    fn run<B: Kernels>(self, device: B::Device) -> anyhow::Result<Self::Output>
    where
        Autodiff<B>: Kernels + BackendTypes<Device = B::Device>;
}

pub fn run_on<J: Job>(device: DeviceArg, job: J) -> anyhow::Result<J::Output> {
    match device {
        DeviceArg::Cpu => job.run::<burn::backend::Flex>(Default::default()),
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda(n) => {
            job.run::<burn::backend::Cuda<half::bf16>>(burn::backend::cuda::CudaDevice::new(n))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceArg::Cuda(_) => anyhow::bail!(
            "this distill was built without CUDA; rebuild with `cargo build --release --features cuda`"
        ),
    }
}
