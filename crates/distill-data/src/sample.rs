//! The sample record: one JSON object per line of `<dataset>/samples-NNNNN.jsonl`.
//!
//! ```json
//! {"key": "9f2c…", "prompt_id": "17", "sample_index": 0,
//!  "messages": [{"role": "user", "content": "…"},
//!               {"role": "assistant", "content": "<think>\n…\n</think>\n\nThe answer is \\boxed{72}."}],
//!  "reasoning": "…", "answer": "The answer is \\boxed{72}.", "finish_reason": "stop", "truncated": false,
//!  "usage": {"prompt_tokens": 80, "completion_tokens": 412, "reasoning_tokens": 380, "cached_tokens": 0},
//!  "teacher_model": "deepseek-reasoner", "endpoint": "https://api.deepseek.com", "latency_s": 12.3,
//!  "attempts": 1, "timestamp": "2026-11-22T15:04:05.123Z",
//!  "reference": "72", "extracted": "72", "correct": true}
//! ```
//!
//! Readers must ignore fields they do not know: later versions may add some.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use distill_core::Message;

/// Token counts as the server reported them. `reasoning_tokens` and `cached_tokens` appear
/// where the server reports them (DeepSeek: `completion_tokens_details.reasoning_tokens`,
/// `prompt_cache_hit_tokens`; OpenAI form: `prompt_tokens_details.cached_tokens`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// A finished teacher response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// sha256 (hex) of teacher model, request messages, sampling parameters and sample index:
    /// the identity of the request, the same on every run that would send the same request.
    pub key: String,
    /// The prompt's id in its source (an id field, else its 0-based position).
    pub prompt_id: String,
    /// Which of the `n` samples of this prompt (0-based).
    pub sample_index: u32,
    /// The request messages followed by the assistant turn (see [`assistant_turn`]).
    pub messages: Vec<Message>,
    pub reasoning: String,
    pub answer: String,
    /// As the server said: "stop", "length", ...
    pub finish_reason: String,
    /// `finish_reason == "length"`: cut off by max_tokens; left out of training by default.
    pub truncated: bool,
    pub usage: Usage,
    /// The model name the server returned (may differ from the one requested).
    pub teacher_model: String,
    /// Base URL of the endpoint that answered.
    pub endpoint: String,
    /// Seconds from sending the successful attempt to having its whole response.
    pub latency_s: f64,
    /// Attempts it took (1 = first try).
    pub attempts: u32,
    /// RFC 3339, UTC, when the response was complete.
    pub timestamp: String,
    /// The prompt's reference answer (already extracted, e.g. "72"), where the source has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The final answer extracted from `answer` (see [`crate::extract`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extracted: Option<String>,
    /// Whether `extracted` matches `reference`; absent without a reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correct: Option<bool>,
}

impl Sample {
    /// Whether training should use this sample under the dataset's filter (recorded in its
    /// manifest): truncated samples only with `keep_truncated`; with `keep_only_correct`, only
    /// samples marked correct (samples without a reference are kept).
    pub fn keep_for_training(&self, keep_truncated: bool, keep_only_correct: bool) -> bool {
        (keep_truncated || !self.truncated) && (!keep_only_correct || self.correct != Some(false))
    }
}

/// A request that did not produce a sample: one line of `<dataset>/errors.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub key: String,
    pub prompt_id: String,
    pub sample_index: u32,
    /// HTTP status of the last attempt; absent for connection errors and timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub message: String,
    pub attempts: u32,
    pub endpoint: String,
    pub timestamp: String,
}

/// The assistant turn a sample stores: `<think>\n{reasoning}\n</think>\n\n{answer}` from a
/// thinking teacher (an empty block too, when it chose not to think), the answer alone from a
/// teacher that does not think, so the student learns the text the teacher wrote.
pub fn assistant_turn(reasoning: Option<&str>, answer: &str) -> String {
    match reasoning {
        Some(r) => format!("<think>\n{r}\n</think>\n\n{answer}"),
        None => answer.to_string(),
    }
}

/// Whether a prompt belongs to the held-out share (`data.held_out`): decided by a hash of its
/// id, so train and eval agree without a stored split and a prompt's samples never straddle it.
pub fn is_held_out(prompt_id: &str, share: f64) -> bool {
    if share <= 0.0 {
        return false;
    }
    let digest = Sha256::digest(prompt_id.as_bytes());
    let x = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    (x as f64 / u64::MAX as f64) < share
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(truncated: bool, correct: Option<bool>) -> Sample {
        Sample {
            key: "k".into(),
            prompt_id: "0".into(),
            sample_index: 0,
            messages: vec![],
            reasoning: String::new(),
            answer: String::new(),
            finish_reason: if truncated { "length" } else { "stop" }.into(),
            truncated,
            usage: Usage::default(),
            teacher_model: "m".into(),
            endpoint: "e".into(),
            latency_s: 0.0,
            attempts: 1,
            timestamp: String::new(),
            reference: None,
            extracted: None,
            correct,
        }
    }

    #[test]
    fn training_filter_follows_the_switches() {
        assert!(sample(false, None).keep_for_training(false, true));
        assert!(!sample(true, None).keep_for_training(false, false));
        assert!(sample(true, None).keep_for_training(true, false));
        assert!(!sample(false, Some(false)).keep_for_training(false, true));
        assert!(sample(false, Some(false)).keep_for_training(false, false));
        assert!(sample(false, Some(true)).keep_for_training(false, true));
    }

    #[test]
    fn held_out_is_stable_and_near_the_share() {
        let ids: Vec<String> = (0..20_000).map(|i| i.to_string()).collect();
        let held = ids.iter().filter(|id| is_held_out(id, 0.05)).count();
        assert!((800..1200).contains(&held), "{held}");
        assert_eq!(is_held_out("42", 0.05), is_held_out("42", 0.05));
        assert!(!ids.iter().any(|id| is_held_out(id, 0.0)));
    }

    #[test]
    fn records_ignore_unknown_fields_and_round_trip() {
        let s = sample(false, Some(true));
        let mut v = serde_json::to_value(&s).unwrap();
        v["future_field"] = serde_json::json!(1);
        let back: Sample = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
        assert_eq!(assistant_turn(Some("r"), "a"), "<think>\nr\n</think>\n\na");
        assert_eq!(assistant_turn(Some(""), "a"), "<think>\n\n</think>\n\na");
        assert_eq!(assistant_turn(None, "a"), "a");
    }
}
