//! `LlamaForCausalLM`: Llama 3.x (with `rope_scaling` type llama3), SmolLM2 and
//! DeepSeek-R1-Distill-Llama. The layers live in `transformer.rs`; this file reads Llama's
//! config.json.

use std::path::Path;

use serde::Deserialize;

use crate::config::{Architecture, CommonFields, DecoderConfig};
use crate::error::Result;

/// Llama's config.json, as transformers writes it.
#[derive(Deserialize, Debug, Clone)]
pub struct LlamaConfig {
    #[serde(flatten)]
    pub common: CommonFields,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

impl LlamaConfig {
    pub fn resolve(&self, path: &Path) -> Result<DecoderConfig> {
        let mut config = self.common.resolve(Architecture::Llama, 10_000.0, false, path)?;
        config.qkv_bias = self.attention_bias;
        config.o_bias = self.attention_bias;
        config.mlp_bias = self.mlp_bias;
        Ok(config)
    }
}
