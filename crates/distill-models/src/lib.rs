//! Qwen2 and Llama causal LMs in burn, loaded from Hugging Face model directories.
//!
//! Data flow: `distill_hf::hub::resolve` turns `org/name[@rev]` or a path into a local
//! directory and `distill_hf::DecoderConfig::from_dir` reads its config.json;
//! [`CausalLm::load`] puts the safetensors on a device.

pub mod init_student;
mod load;
pub mod paged;
pub mod transformer;

pub use distill_hf::{Architecture, DecoderConfig, ModelError, Result};
pub use distill_kernels::{Kernels, MemoryPolicy, ModelKernels, TrainKernels};
pub use paged::PagedKv;
pub use transformer::{CausalLm, KvCache};

#[cfg(test)]
mod parity_tests;
#[cfg(test)]
mod test_util;
