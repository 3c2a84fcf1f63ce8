//! `[eval]`: held-out scoring (filled in by the eval stage).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Models to compare besides the trained student: HF dirs or org/name refs.
    pub models: Vec<String>,
    /// Task set with references, e.g. "../shared/data/gsm8k/test.jsonl".
    pub tasks: Option<String>,
    pub max_examples: Option<usize>,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// Samples per prompt (pass@1 is their mean; maj@n their vote).
    pub n: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            models: Vec::new(),
            tasks: None,
            max_examples: None,
            max_new_tokens: 1024,
            temperature: 0.0,
            top_p: 1.0,
            n: 1,
        }
    }
}
