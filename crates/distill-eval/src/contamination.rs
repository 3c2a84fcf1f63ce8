//! Contamination: evaluation prompts that also appear among a run's training prompts,
//! exactly or after whitespace and case normalisation, or inside a training prompt (gen-data
//! wraps questions in instructions such as "Please reason step by step").

use std::collections::HashSet;

/// The form prompts are compared in: lowercase, whitespace runs collapsed, trimmed.
pub fn normalize(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Eval prompts shorter than this (normalised) are matched exactly only: short strings
/// occur inside unrelated prompts by chance.
const MIN_CONTAINED: usize = 24;

/// The normalised training prompts.
#[derive(Debug, Clone, Default)]
pub struct TrainingPrompts {
    prompts: HashSet<String>,
    ordered: Vec<String>,
}

impl TrainingPrompts {
    pub fn new<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let prompts: HashSet<String> = texts.into_iter().map(normalize).collect();
        let ordered = prompts.iter().cloned().collect();
        TrainingPrompts { prompts, ordered }
    }

    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    pub fn contains(&self, prompt: &str) -> bool {
        let p = normalize(prompt);
        self.prompts.contains(&p) || (p.len() >= MIN_CONTAINED && self.ordered.iter().any(|t| t.contains(&p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_survive_whitespace_and_case_but_not_edits() {
        let train = TrainingPrompts::new(["Natalia sold clips to 48 of her friends.\nHow many?"]);
        assert!(train.contains("natalia  sold clips to 48 of her friends. how many?  "));
        assert!(!train.contains("Natalia sold clips to 49 of her friends. How many?"));
        assert_eq!(train.len(), 1);
        // A question inside a prompt template counts; a short fragment does not.
        let train = TrainingPrompts::new(["Natalia sold 48 clips. How many?\nPlease reason step by step."]);
        assert!(train.contains("natalia sold 48 clips. how many?"));
        assert!(!train.contains("How many?"));
    }
}
