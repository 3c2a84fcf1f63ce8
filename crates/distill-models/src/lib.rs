//! Qwen2 and Llama causal LMs in burn, loaded from Hugging Face model directories.
//!
//! Data flow: [`hub::resolve`] turns `org/name[@rev]` or a path into a local directory;
//! [`DecoderConfig::from_dir`] reads config.json; [`CausalLm::load`] reads the safetensors;
//! [`tokenizer::TextTokenizer`] reads tokenizer.json and the chat template.

pub mod config;
pub mod error;
pub mod hub;
pub mod init_student;
pub mod llama;
mod load;
pub mod nf4;
pub mod ops;
pub mod qwen2;
pub mod template;
pub mod token_map;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

pub use config::{Architecture, DecoderConfig};
pub use error::{ModelError, Result};
pub use ops::Kernels;
pub use transformer::{CausalLm, KvCache};

#[cfg(test)]
mod parity_tests;
#[cfg(test)]
mod test_util;
