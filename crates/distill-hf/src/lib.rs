//! Hugging Face model files, read without burn: everything a tool needs to know about a model
//! directory before (or instead of) putting its weights on a device.
//!
//! Data flow: [`hub::resolve`] turns `org/name[@rev]` or a path into a local directory;
//! [`DecoderConfig::from_dir`] reads config.json (the only config.json parser: the GGUF
//! converter and the burn models both use it); [`tokenizer::TextTokenizer`] reads
//! tokenizer.json and the chat template; [`weights::Checkpoint`] indexes the safetensors;
//! [`token_map`] maps a teacher's token strings onto a student's vocabulary.

pub mod config;
pub mod error;
pub mod guard;
pub mod hub;
pub mod limits;
pub mod llama;
pub mod qwen2;
pub mod template;
pub mod token_map;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, DecoderConfig};
pub use error::{ModelError, Result};

#[cfg(test)]
mod test_util;
