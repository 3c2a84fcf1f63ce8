//! GPU checks of what training parks in pinned host memory, copied on a stream of its own:
//! block inputs (`train.offload_block_inputs`) and AdamW's moments (`train.offload_optimizer`)
//! train as those kept on the device. The copies themselves are checked bit for bit in
//! distill-kernels' `cuda_ops`. Prints SKIPPED and passes without a CUDA device, or fails when
//! `DISTILL_REQUIRE_GPU=1`.
//!
//!     DISTILL_REQUIRE_GPU=1 cargo test -p distill-train --features cuda --test cuda_offload -- --nocapture
#![cfg(feature = "cuda")]

use burn::backend::Cuda;
use burn::backend::cuda::CudaDevice;
use distill_core::testing::tiny_train_recipe;
use distill_kernels::cuda::stream::first_cuda_device;
use distill_train::trainer::{TrainOptions, train};

type B = Cuda<half::bf16>;

/// The losses of 4 steps of the tiny recipe on the GPU with `settings`.
fn losses(device: &CudaDevice, settings: &[&str]) -> Vec<f64> {
    let out = tempfile::tempdir().unwrap();
    let mut all = vec!["train.max_steps=4", "lora.dropout=0"];
    all.extend_from_slice(settings);
    let recipe = tiny_train_recipe(out.path(), &all);
    let options = TrainOptions {
        resume: false,
        stop_after: None,
        progress: &distill_core::progress::Silent,
    };
    train::<B>(&recipe, device.clone(), &options).unwrap().losses
}

fn assert_same_steps(kept: &[f64], parked: &[f64]) {
    assert!((kept[0] - kept[3]).abs() > 1e-3, "the run must learn: {kept:?}");
    for (k, p) in kept.iter().zip(parked) {
        assert!(
            (k - p).abs() <= 1e-5 * k.abs(),
            "kept {kept:?}, parked {parked:?}"
        );
    }
}

#[test]
fn cuda_offloaded_block_inputs_train_as_kept_ones() {
    let Some(device) = first_cuda_device() else { return };
    let run = |offload: &str| losses(&device, &["train.lr=1e-2", "train.recompute=true", offload]);
    assert_same_steps(
        &run("train.offload_block_inputs=false"),
        &run("train.offload_block_inputs=true"),
    );
}

/// Full fine-tuning: a decayed and an undecayed group, each parked and fetched every step.
#[test]
fn cuda_offloaded_optimizer_state_trains_as_kept_state() {
    let Some(device) = first_cuda_device() else { return };
    let run = |offload: &str| losses(&device, &["train.lr=3e-3", "lora.enabled=false", offload]);
    let kept = run("train.offload_optimizer=false");
    let again = run("train.offload_optimizer=false");
    let parked = run("train.offload_optimizer=true");
    eprintln!("kept {kept:?}\nagain {again:?}\nparked {parked:?}");
    assert_eq!(kept, again, "full fine-tuning on the GPU must repeat itself");
    assert_same_steps(&kept, &parked);
}
