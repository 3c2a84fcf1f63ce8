//! GGUF, the file format of llama.cpp and Ollama: read (v2/v3, every metadata type),
//! dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), convert to a
//! Hugging Face model directory ([`import::import_gguf`]), and write students back as GGUF
//! ([`export::export_gguf`]: F32, F16, Q8_0, Q4_0, Q4_K_M). Ollama's model store is read by
//! [`ollama::resolve`].
//!
//! No burn here: conversion is file work, and this crate builds and tests in seconds.

pub mod dequant;
pub mod error;
pub mod export;
pub mod ggml;
pub mod hfconfig;
pub mod import;
pub mod names;
pub mod ollama;
pub mod output;
pub mod quant;
pub mod reader;
pub mod tokenizer;
pub mod writer;

#[cfg(test)]
mod test_util;

pub use error::{GgufError, Result};
pub use ggml::GgmlType;
pub use reader::{GgufFile, TensorInfo, Value};

use std::path::PathBuf;

/// A GGUF source as users name it: a file path, or `ollama:NAME[:TAG]` from Ollama's store.
pub fn resolve_source(text: &str) -> Result<PathBuf> {
    match text.strip_prefix(ollama::PREFIX) {
        Some(name) => {
            let root = ollama::models_dir().ok_or_else(|| GgufError::Ollama {
                name: name.to_string(),
                msg: "neither OLLAMA_MODELS nor HOME is set, so the model store cannot be found".into(),
            })?;
            ollama::resolve(name, &root)
        }
        None => Ok(PathBuf::from(text)),
    }
}
