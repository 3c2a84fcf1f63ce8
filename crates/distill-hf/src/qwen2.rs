//! `Qwen2ForCausalLM`: the Qwen2.5 family and DeepSeek-R1-Distill-Qwen.
//!
//! Qwen2 is the Llama decoder with bias on the q/k/v projections, so the layers themselves
//! live in `transformer.rs`; this file reads Qwen2's config.json and says which of its
//! features we honour.

use std::path::Path;

use serde::Deserialize;

use crate::config::{Architecture, CommonFields, DecoderConfig};
use crate::error::{ModelError, Result};

/// Qwen2's config.json, as transformers writes it.
#[derive(Deserialize, Debug, Clone)]
pub struct Qwen2Config {
    #[serde(flatten)]
    pub common: CommonFields,
    #[serde(default)]
    pub use_sliding_window: bool,
    pub sliding_window: Option<usize>,
    pub max_window_layers: Option<usize>,
}

impl Qwen2Config {
    pub fn resolve(&self, path: &Path) -> Result<DecoderConfig> {
        if self.use_sliding_window {
            // Every Qwen2.5 and R1-Distill checkpoint ships with it off; with it on, layers at
            // or above max_window_layers attend to a window only, which we do not implement.
            return Err(ModelError::invalid(
                path,
                format!(
                    "use_sliding_window=true (sliding_window={:?}, max_window_layers={:?}) is not supported; \
                     set it to false to use full attention in every layer as Qwen2.5 releases do",
                    self.sliding_window, self.max_window_layers
                ),
            ));
        }
        let mut config = self.common.resolve(Architecture::Qwen2, 10_000.0, false, path)?;
        config.qkv_bias = true;
        Ok(config)
    }
}
