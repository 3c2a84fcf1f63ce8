//! The block inputs that recompute keeps between the forward and the backward, on the device
//! or parked in host memory (`train.offload_block_inputs`, what Unsloth calls offloaded
//! gradient checkpointing).
//!
//! Parked inputs go out as the forward hands them over and come back one ahead of the
//! backward's need: taking input i starts fetching input i - 1, whose copy then runs beside
//! block i's backward (on CUDA, on a copy stream of its own: `distill_kernels::cuda::offload`).

use burn::tensor::Tensor;
use distill_kernels::{Fetched, MemoryPolicy, Parked};

/// The inputs of the blocks, first block first, handed back last first.
pub(super) enum BlockInputs<B: MemoryPolicy> {
    Device(Vec<Tensor<B, 3>>),
    Host {
        parked: Vec<Parked<B>>,
        /// The next input down, on its way back.
        next: Option<Fetched<B>>,
    },
}

impl<B: MemoryPolicy> BlockInputs<B> {
    pub(super) fn new(offload: bool) -> Self {
        if offload {
            BlockInputs::Host {
                parked: Vec::new(),
                next: None,
            }
        } else {
            BlockInputs::Device(Vec::new())
        }
    }

    pub(super) fn push(&mut self, x: Tensor<B, 3>) -> Result<(), String> {
        match self {
            BlockInputs::Device(xs) => xs.push(x),
            BlockInputs::Host { parked, .. } => parked.push(B::park(x)?),
        }
        Ok(())
    }

    /// The last input not yet taken, on its device, in its dtype.
    pub(super) fn pop(&mut self) -> Result<Tensor<B, 3>, String> {
        match self {
            BlockInputs::Device(xs) => xs.pop().ok_or_else(|| "no block input left".to_string()),
            BlockInputs::Host { parked, next } => {
                let this = match next.take() {
                    Some(fetched) => fetched,
                    None => B::fetch(parked.pop().ok_or("no block input left")?)?,
                };
                if let Some(below) = parked.pop() {
                    *next = Some(B::fetch(below)?);
                }
                B::land(this)
            }
        }
    }
}
