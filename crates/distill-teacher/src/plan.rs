//! Prompts × samples -> requests, each with its ledger key.
//!
//! The key is sha256 (hex) of the JSON `{"model", "messages", "sampling", "sample_index"}`:
//! the teacher model as requested, the exact request messages (system prompt and suffix
//! applied), the sampling parameters and which of the n samples. Anything that changes what
//! would be sent changes the key; the endpoint, the prompt's id and its position do not.

use std::collections::HashSet;
use std::sync::Arc;

use distill_data::{Message, Prompt};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::api::Sampling;

/// What turns a prompt into requests (the recipe's `[teacher] model` and `[gen]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSetup {
    pub model: String,
    pub sampling: Sampling,
    pub system_prompt: Option<String>,
    /// Appended to the last user turn (DeepSeek's advice for math).
    pub prompt_suffix: String,
    /// Samples per prompt.
    pub n: u32,
}

/// One request to make.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub key: String,
    pub prompt_id: String,
    pub sample_index: u32,
    /// The request messages (shared by the prompt's n samples).
    pub messages: Arc<Vec<Message>>,
    pub reference: Option<Arc<str>>,
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub jobs: Vec<Job>,
    /// Prompts whose request messages equal an earlier prompt's: their keys would collide,
    /// so they are sent once.
    pub duplicate_prompts: usize,
}

/// The messages sent for `prompt`.
pub fn request_messages(prompt: &Prompt, setup: &RequestSetup) -> Vec<Message> {
    let mut messages = prompt.messages.clone();
    if let Some(system) = setup.system_prompt.as_ref().filter(|s| !s.is_empty())
        && !messages.iter().any(|m| m.role == "system")
    {
        messages.insert(0, Message::new("system", system.clone()));
    }
    if !setup.prompt_suffix.is_empty()
        && let Some(last) = messages.iter_mut().rev().find(|m| m.role == "user")
        && !last.content.ends_with(&setup.prompt_suffix)
    {
        last.content.push_str(&setup.prompt_suffix);
    }
    messages
}

/// The ledger key of one request.
pub fn request_key(model: &str, messages: &[Message], sampling: &Sampling, sample_index: u32) -> String {
    #[derive(Serialize)]
    struct KeyMaterial<'a> {
        model: &'a str,
        messages: &'a [Message],
        sampling: &'a Sampling,
        sample_index: u32,
    }
    let material = serde_json::to_vec(&KeyMaterial {
        model,
        messages,
        sampling,
        sample_index,
    })
    .expect("key material serializes");
    format!("{:x}", Sha256::digest(&material))
}

/// Every (prompt, sample) request, in prompt order then sample order.
pub fn plan(prompts: &[Prompt], setup: &RequestSetup) -> Plan {
    let mut out = Plan::default();
    let mut seen = HashSet::new();
    for prompt in prompts {
        let messages = request_messages(prompt, setup);
        let first_key = request_key(&setup.model, &messages, &setup.sampling, 0);
        if !seen.insert(first_key) {
            out.duplicate_prompts += 1;
            continue;
        }
        let messages = Arc::new(messages);
        let reference: Option<Arc<str>> = prompt.reference.as_deref().map(Arc::from);
        for i in 0..setup.n {
            out.jobs.push(Job {
                key: request_key(&setup.model, &messages, &setup.sampling, i),
                prompt_id: prompt.id.clone(),
                sample_index: i,
                messages: messages.clone(),
                reference: reference.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> RequestSetup {
        RequestSetup {
            model: "deepseek-reasoner".into(),
            sampling: Sampling {
                temperature: 0.6,
                top_p: 0.95,
                max_tokens: 8192,
                stop: vec![],
                seed: None,
            },
            system_prompt: None,
            prompt_suffix: " Box it.".into(),
            n: 2,
        }
    }

    fn prompt(id: &str, text: &str) -> Prompt {
        Prompt {
            id: id.into(),
            messages: vec![Message::new("user", text)],
            reference: Some("1".into()),
        }
    }

    #[test]
    fn keys_depend_on_what_is_sent_and_nothing_else() {
        let p = plan(
            &[prompt("a", "Q1"), prompt("b", "Q2"), prompt("c", "Q1")],
            &setup(),
        );
        assert_eq!(p.jobs.len(), 4);
        assert_eq!(p.duplicate_prompts, 1);
        assert_eq!(p.jobs[0].messages[0].content, "Q1 Box it.");
        let keys: HashSet<&str> = p.jobs.iter().map(|j| j.key.as_str()).collect();
        assert_eq!(keys.len(), 4);
        assert_eq!(p.jobs[0].key.len(), 64);
        // Same request, other prompt id: same key. Stable across runs.
        let again = plan(&[prompt("zz", "Q1")], &setup());
        assert_eq!(again.jobs[0].key, p.jobs[0].key);
        for change in [
            RequestSetup {
                model: "other".into(),
                ..setup()
            },
            RequestSetup {
                prompt_suffix: String::new(),
                ..setup()
            },
            RequestSetup {
                system_prompt: Some("S".into()),
                ..setup()
            },
            RequestSetup {
                sampling: Sampling {
                    temperature: 0.7,
                    ..setup().sampling
                },
                ..setup()
            },
            RequestSetup {
                sampling: Sampling {
                    seed: Some(1),
                    ..setup().sampling
                },
                ..setup()
            },
            RequestSetup {
                sampling: Sampling {
                    max_tokens: 10,
                    ..setup().sampling
                },
                ..setup()
            },
        ] {
            assert_ne!(
                plan(&[prompt("a", "Q1")], &change).jobs[0].key,
                p.jobs[0].key,
                "{change:?}"
            );
        }
    }

    #[test]
    fn system_prompt_and_suffix_apply_once() {
        let s = RequestSetup {
            system_prompt: Some("Be brief.".into()),
            ..setup()
        };
        let m = request_messages(&prompt("a", "Q Box it."), &s);
        assert_eq!(
            m,
            [
                Message::new("system", "Be brief."),
                Message::new("user", "Q Box it.")
            ]
        );
    }
}
