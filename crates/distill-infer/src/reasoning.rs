//! The reasoning part of an output: what is inside `<think>`, whether it closed, and the
//! answer after it. R1 distills' chat templates open `<think>` in the prompt, so their
//! outputs often start inside the reasoning with no opening tag.

use serde::Serialize;

/// An output split into reasoning and answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Split {
    /// None when the model did not think at all (no tags, prompt not inside `<think>`).
    pub reasoning: Option<String>,
    /// The text after `</think>`; for an unclosed or absent think block, the whole output.
    pub answer: String,
    /// Thinking started and `</think>` never came.
    pub unclosed: bool,
}

impl Split {
    /// Thinking happened but held nothing but whitespace: R1's "canned answer" signature.
    pub fn empty_reasoning(&self) -> bool {
        matches!(&self.reasoning, Some(r) if r.trim().is_empty() && !self.unclosed)
    }
}

/// Whether a rendered prompt leaves the model inside a think block (R1-style templates end
/// the generation prompt with `<think>\n`).
pub fn prompt_opens_think(prompt: &str) -> bool {
    let tail = prompt.trim_end();
    match (tail.rfind("<think>"), tail.rfind("</think>")) {
        (Some(open), Some(close)) => open > close,
        (Some(_), None) => true,
        _ => false,
    }
}

/// Splits `output`; `in_think` says the prompt already opened `<think>`.
///
/// The answer of an unclosed block is the whole output, as open-r1 scores the full completion:
/// a student that reasons to the answer but never closes the tag still gets it extracted,
/// and the unclosed share is reported next to accuracy.
pub fn split(output: &str, in_think: bool) -> Split {
    let (body, opened) = match output.find("<think>") {
        Some(i) if !in_think || output[..i].trim().is_empty() => (&output[i + "<think>".len()..], true),
        _ => (output, in_think),
    };
    if !opened {
        return Split {
            reasoning: None,
            answer: output.trim().to_string(),
            unclosed: false,
        };
    }
    match body.find("</think>") {
        Some(end) => Split {
            reasoning: Some(body[..end].trim().to_string()),
            answer: body[end + "</think>".len()..].trim().to_string(),
            unclosed: false,
        },
        None => Split {
            reasoning: Some(body.trim().to_string()),
            answer: output.trim().to_string(),
            unclosed: true,
        },
    }
}

/// Reasoning-length buckets (in tokens) for accuracy by length: [lo, hi).
pub const LENGTH_BUCKETS: [(usize, usize); 5] =
    [(0, 1), (1, 256), (256, 1024), (1024, 4096), (4096, usize::MAX)];

pub fn bucket_label((lo, hi): (usize, usize)) -> String {
    match (lo, hi) {
        (0, 1) => "none".into(),
        (lo, usize::MAX) => format!(">={lo}"),
        (lo, hi) => format!("{lo}-{}", hi - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r1_style_output_starts_inside_the_think_block() {
        let s = split("First, 3+4=7.\n</think>\n\nThe answer is \\boxed{7}.", true);
        assert_eq!(s.reasoning.as_deref(), Some("First, 3+4=7."));
        assert_eq!(s.answer, "The answer is \\boxed{7}.");
        assert!(!s.unclosed && !s.empty_reasoning());
    }

    #[test]
    fn explicit_tags_and_empty_reasoning() {
        let s = split("<think>\n\n</think>\n\nI cannot discuss that.", false);
        assert_eq!(s.reasoning.as_deref(), Some(""));
        assert!(s.empty_reasoning());
        assert_eq!(s.answer, "I cannot discuss that.");
        // A template that opened <think> and a model that repeats the tag.
        let s = split("<think>\nhmm\n</think>\n42", true);
        assert_eq!(s.reasoning.as_deref(), Some("hmm"));
        assert_eq!(s.answer, "42");
    }

    #[test]
    fn unclosed_and_absent_reasoning() {
        let s = split("Let me think... 12 apples", true);
        assert!(s.unclosed && !s.empty_reasoning());
        assert_eq!(s.answer, "Let me think... 12 apples");
        let s = split("Paris.", false);
        assert_eq!(s.reasoning, None);
        assert_eq!(s.answer, "Paris.");
    }

    #[test]
    fn prompt_detection() {
        assert!(prompt_opens_think("<｜User｜>hi<｜Assistant｜><think>\n"));
        assert!(!prompt_opens_think("<|im_start|>assistant\n"));
        assert!(!prompt_opens_think("<think>a</think> b <|im_start|>assistant\n"));
    }

    #[test]
    fn buckets_are_labelled() {
        let labels: Vec<String> = LENGTH_BUCKETS.iter().map(|&b| bucket_label(b)).collect();
        assert_eq!(labels, ["none", "1-255", "256-1023", "1024-4095", ">=4096"]);
    }
}
