//! `distill bench`: the speed suite lives in distill-bench; this is its wiring to `--device`.
//! The suite re-invokes this binary with a hidden `--run-case` for each case, and that child
//! runs the case on the backend [`run_on`] picks.

use burn::backend::Autodiff;
use burn::tensor::backend::BackendTypes;
use distill_bench::{CaseJob, Device, Rows};
use distill_models::Kernels;

use crate::backend::{DeviceArg, Job, run_on};

pub use distill_bench::Args;

pub fn run(args: Args, device: Option<DeviceArg>) -> anyhow::Result<()> {
    let device = DeviceArg::resolve(device);
    let bench_device = match device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda(n) => Device::Cuda(n),
    };
    distill_bench::run(args, bench_device, |job| run_on(device, Case(job)))
}

/// A case of the suite as a [`Job`], so that [`run_on`] runs it on the device's backend.
struct Case(CaseJob);

impl Job for Case {
    type Output = Rows;

    fn run<B: Kernels>(self, device: B::Device) -> anyhow::Result<Rows>
    where
        Autodiff<B>: Kernels + BackendTypes<Device = B::Device>,
    {
        self.0.measure::<B>(device)
    }
}
