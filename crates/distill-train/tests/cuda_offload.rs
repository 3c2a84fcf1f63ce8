//! GPU check of offloaded gradient checkpointing (`train.offload_block_inputs`): block inputs
//! parked in pinned host memory and copied on a stream of their own train as those kept on
//! the device. The copies themselves are checked bit for bit in distill-kernels' `cuda_ops`.
//! Prints SKIPPED and passes without a CUDA device, or fails when `DISTILL_REQUIRE_GPU=1`.
//!
//!     DISTILL_REQUIRE_GPU=1 cargo test -p distill-train --features cuda --test cuda_offload -- --nocapture
#![cfg(feature = "cuda")]

use burn::backend::Cuda;
use distill_core::testing::tiny_train_recipe;
use distill_kernels::cuda::stream::first_cuda_device;
use distill_train::trainer::{TrainOptions, train};

type B = Cuda<half::bf16>;

#[test]
fn cuda_offloaded_block_inputs_train_as_kept_ones() {
    let Some(device) = first_cuda_device() else { return };
    let losses = |offload: bool| {
        let out = tempfile::tempdir().unwrap();
        let recipe = tiny_train_recipe(
            out.path(),
            &[
                "train.max_steps=4",
                "train.lr=1e-2",
                "lora.dropout=0",
                "train.recompute=true",
                &format!("train.offload_block_inputs={offload}"),
            ],
        );
        let options = TrainOptions {
            resume: false,
            stop_after: None,
            progress: &distill_core::progress::Silent,
        };
        train::<B>(&recipe, device.clone(), &options).unwrap().losses
    };
    let (kept, parked) = (losses(false), losses(true));
    assert!((kept[0] - kept[3]).abs() > 1e-3, "the run must learn: {kept:?}");
    for (k, p) in kept.iter().zip(&parked) {
        assert!(
            (k - p).abs() <= 1e-5 * k.abs(),
            "kept {kept:?}, parked {parked:?}"
        );
    }
}
