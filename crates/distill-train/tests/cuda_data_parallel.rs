//! GPU checks of data-parallel training's NCCL path (`distill train --gpus N`): NCCL's sums,
//! reductions and broadcasts across every visible GPU, and a one-GPU run through NCCL taking
//! the plain run's steps. Prints SKIPPED and passes without a CUDA device, or fails when
//! `DISTILL_REQUIRE_GPU=1` is set, as on the GPU machine.
//!
//!     DISTILL_REQUIRE_GPU=1 cargo test -p distill-train --features cuda --test cuda_data_parallel -- --nocapture
//!
//! NCCL is loaded as `libnccl.so` (tests/gpu/run.sh links PyTorch's `libnccl.so.2` so).
#![cfg(feature = "cuda")]

use std::path::Path;

use burn::backend::Cuda;
use burn::backend::cuda::CudaDevice;
use burn::tensor::{DType, Tensor, TensorData};
use distill_core::Recipe;
use distill_core::testing::tiny_train_recipe;
use distill_kernels::cuda::stream::cuda_devices;
use distill_train::parallel::Collective;
use distill_train::trainer::{TrainOptions, TrainReport, train, train_data_parallel};

type B = Cuda<half::bf16>;

/// Every GPU the driver shows, or None (SKIPPED) without one.
fn gpus() -> Option<Vec<CudaDevice>> {
    cuda_devices()
}

fn host(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn nccl_sums_reduces_and_broadcasts_across_every_visible_gpu() {
    let Some(devices) = gpus() else { return };
    let world = devices.len();
    let members = distill_train::nccl::members::<B>(&devices).unwrap();
    eprintln!("NCCL over {world} GPU(s)");
    let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = members
            .iter()
            .zip(&devices)
            .enumerate()
            .map(|(rank, (member, device))| {
                s.spawn(move || {
                    // 1000 elements: more than one NCCL chunk is not needed, but not one either.
                    let values: Vec<f32> = (0..1000).map(|i| (rank + 1) as f32 * i as f32).collect();
                    let x = Tensor::<B, 1>::from_data(TensorData::new(values, [1000]), (device, DType::F32));
                    let sum = member.all_reduce_sum(x.clone()).unwrap();
                    let onto_first = member.reduce_sum(0, x.clone()).unwrap();
                    assert_eq!(onto_first.is_some(), rank == 0);
                    if let Some(reduced) = onto_first {
                        assert_eq!(host(reduced), host(sum.clone()), "reduce onto GPU 0");
                    }
                    let from_last = member.broadcast(world - 1, x).unwrap();
                    (host(sum), host(from_last))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ranks_sum = (world * (world + 1) / 2) as f32;
    for (sum, from_last) in &results {
        for (i, (s, b)) in sum.iter().zip(from_last).enumerate() {
            assert_eq!(*s, ranks_sum * i as f32, "sum at {i}");
            assert_eq!(*b, world as f32 * i as f32, "broadcast at {i}");
        }
    }
}

fn recipe(out: &Path) -> Recipe {
    tiny_train_recipe(out, &["train.max_steps=4", "train.lr=1e-2", "lora.dropout=0"])
}

fn silent() -> TrainOptions<'static> {
    TrainOptions {
        resume: false,
        stop_after: None,
        progress: &distill_core::progress::Silent,
    }
}

/// `--gpus 1`: the data-parallel path with NCCL over one GPU gives the plain run's losses (an
/// all-reduce over one member is a copy).
#[test]
fn a_one_gpu_run_through_nccl_takes_the_plain_steps() {
    let Some(devices) = gpus() else { return };
    let device = devices[0].clone();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let plain: TrainReport = train::<B>(&recipe(a.path()), device.clone(), &silent()).unwrap();
    let members: Vec<Box<dyn Collective<B>>> =
        distill_train::nccl::members::<B>(std::slice::from_ref(&device)).unwrap();
    let nccl = train_data_parallel::<B>(&recipe(b.path()), vec![device], members, &silent()).unwrap();
    assert!(
        (plain.losses[0] - plain.losses[3]).abs() > 1e-3,
        "{:?}",
        plain.losses
    );
    for (x, y) in plain.losses.iter().zip(&nccl.losses) {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs(),
            "{:?} vs {:?}",
            plain.losses,
            nccl.losses
        );
    }
}
