//! Task sets with references and how an output is scored against them:
//!
//! - `math`: GSM8K (`#### n`), MATH (`\boxed{}`) or any record with a final answer; scored
//!   with distill-data's extractor and equivalence, the ones gen-data uses;
//! - `choice`: multiple choice (`question`, `choices` list, `answer` as letter, 0-based index
//!   or the choice's text); the prompt lists lettered choices, the letter is scored;
//! - `exact`: the answer text after reasoning must equal the reference after whitespace and
//!   case normalisation.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use distill_core::Message;
use distill_data::{PromptSpec, answers_match, extract_answer, load_prompts};
use distill_hf::hub::HubSettings;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::EvalError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Math,
    Choice,
    Exact,
}

impl std::str::FromStr for TaskKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "math" => Ok(TaskKind::Math),
            "choice" => Ok(TaskKind::Choice),
            "exact" => Ok(TaskKind::Exact),
            _ => Err(format!("`{s}` is not a task kind; use math, choice or exact")),
        }
    }
}

/// Where a task set comes from: a JSONL/JSON/Parquet file or `hf:org/name:split`.
#[derive(Debug, Clone, Default)]
pub struct TaskSpec {
    pub source: String,
    /// None: `choice` when records have a `choices` list, else `math`.
    pub kind: Option<TaskKind>,
    pub prompt_field: Option<String>,
    pub reference_field: Option<String>,
    pub id_field: Option<String>,
    pub max_examples: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskItem {
    pub id: String,
    /// Chat messages ending with the user's turn.
    pub messages: Vec<Message>,
    pub reference: String,
}

impl TaskItem {
    /// The user's last message: what contamination checks compare.
    pub fn user_text(&self) -> &str {
        self.messages.last().map_or("", |m| m.content.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct TaskSet {
    /// The file stem (e.g. `test` for gsm8k/test.jsonl), or the dataset ref.
    pub name: String,
    pub kind: TaskKind,
    pub items: Vec<TaskItem>,
}

/// What scoring one output found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scored {
    pub extracted: Option<String>,
    pub correct: bool,
}

pub fn load(spec: &TaskSpec, hub: &HubSettings) -> Result<TaskSet, EvalError> {
    let kind = match spec.kind {
        Some(k) => k,
        None if has_choices(&spec.source) => TaskKind::Choice,
        None => TaskKind::Math,
    };
    let items = match kind {
        TaskKind::Choice => load_choice(spec)?,
        TaskKind::Math | TaskKind::Exact => load_with_references(spec, hub)?,
    };
    Ok(TaskSet {
        name: set_name(&spec.source),
        kind,
        items,
    })
}

fn set_name(source: &str) -> String {
    match source.strip_prefix("hf:") {
        Some(r) => r.replace(['/', ':', '@'], "_"),
        None => {
            let p = Path::new(source);
            let stem = p
                .file_stem()
                .map_or(source.into(), |s| s.to_string_lossy().into_owned());
            match p.parent().and_then(|d| d.file_name()) {
                Some(dir) => format!("{}-{stem}", dir.to_string_lossy()),
                None => stem,
            }
        }
    }
}

fn load_with_references(spec: &TaskSpec, hub: &HubSettings) -> Result<Vec<TaskItem>, EvalError> {
    let prompts = load_prompts(
        &PromptSpec {
            source: spec.source.clone(),
            prompt_field: spec.prompt_field.clone(),
            reference_field: spec.reference_field.clone(),
            id_field: spec.id_field.clone(),
            max_prompts: spec.max_examples,
        },
        hub,
    )?;
    prompts
        .into_iter()
        .enumerate()
        .map(|(i, p)| match p.reference {
            Some(reference) => Ok(TaskItem {
                id: p.id,
                messages: p.messages,
                reference,
            }),
            None => Err(EvalError::Input {
                path: PathBuf::from(&spec.source),
                msg: format!(
                    "record {} has no reference answer; name its field with --reference-field",
                    i + 1
                ),
            }),
        })
        .collect()
}

/// Whether the first record of a local JSONL file has a `choices` list.
fn has_choices(source: &str) -> bool {
    let Ok(file) = std::fs::File::open(source) else {
        return false;
    };
    let first = std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .find(|l| !l.trim().is_empty());
    first
        .and_then(|l| serde_json::from_str::<Value>(&l).ok())
        .is_some_and(|v| v.get("choices").is_some_and(Value::is_array))
}

fn load_choice(spec: &TaskSpec) -> Result<Vec<TaskItem>, EvalError> {
    let path = PathBuf::from(&spec.source);
    let text = std::fs::read_to_string(&path).map_err(|e| EvalError::Input {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let limit = spec.max_examples.unwrap_or(usize::MAX);
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if items.len() >= limit {
            break;
        }
        let bad = |msg: String| EvalError::Input {
            path: path.clone(),
            msg: format!("line {}: {msg}", i + 1),
        };
        let v: Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        items.push(choice_item(&v, items.len(), spec).map_err(bad)?);
    }
    if items.is_empty() {
        return Err(EvalError::Input {
            path,
            msg: "holds no records".into(),
        });
    }
    Ok(items)
}

fn choice_item(v: &Value, index: usize, spec: &TaskSpec) -> Result<TaskItem, String> {
    let field = |name: &str| v.get(name).ok_or_else(|| format!("missing field `{name}`"));
    let question = field(spec.prompt_field.as_deref().unwrap_or("question"))?
        .as_str()
        .ok_or("the question is not a string")?;
    let choices: Vec<&str> = field("choices")?
        .as_array()
        .ok_or("`choices` is not a list")?
        .iter()
        .map(|c| c.as_str().ok_or("a choice is not a string"))
        .collect::<Result<_, _>>()?;
    if choices.is_empty() || choices.len() > 26 {
        return Err(format!("{} choices; need 1 to 26", choices.len()));
    }
    let answer = field(spec.reference_field.as_deref().unwrap_or("answer"))?;
    let reference = choice_letter(answer, &choices)?;
    let listed: String = choices
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{}. {c}\n", letter(i)))
        .collect();
    let prompt = format!(
        "{question}\n\n{listed}\nAnswer with the letter of the correct choice, as \"The answer is X\"."
    );
    let id = match spec.id_field.as_deref().or(v.get("id").map(|_| "id")) {
        Some(f) => match v.get(f) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => return Err(format!("missing id field `{f}`")),
        },
        None => index.to_string(),
    };
    Ok(TaskItem {
        id,
        messages: vec![Message::new("user", prompt)],
        reference,
    })
}

fn letter(i: usize) -> char {
    (b'A' + i as u8) as char
}

fn choice_letter(answer: &Value, choices: &[&str]) -> Result<String, String> {
    let n = choices.len();
    match answer {
        Value::Number(k) => match k.as_u64() {
            Some(k) if (k as usize) < n => Ok(letter(k as usize).to_string()),
            _ => Err(format!("answer index {k} is not one of the {n} choices")),
        },
        Value::String(s) => {
            let t = s.trim();
            if t.len() == 1 && t.as_bytes()[0].is_ascii_uppercase() && ((t.as_bytes()[0] - b'A') as usize) < n
            {
                return Ok(t.to_string());
            }
            choices
                .iter()
                .position(|c| c.trim() == t)
                .map(|i| letter(i).to_string())
                .ok_or_else(|| format!("answer `{t}` is neither a letter nor one of the choices"))
        }
        _ => Err("`answer` must be a letter, an index or the choice's text".into()),
    }
}

/// Scores the answer part of an output (reasoning already split off) against `reference`.
pub fn score(kind: TaskKind, answer: &str, reference: &str) -> Scored {
    match kind {
        TaskKind::Math => {
            let extracted = extract_answer(answer).map(|a| a.text);
            let correct = extracted.as_deref().is_some_and(|a| answers_match(a, reference));
            Scored { extracted, correct }
        }
        TaskKind::Choice => {
            let extracted = extract_choice(answer);
            let correct = extracted.as_deref() == Some(reference.trim());
            Scored { extracted, correct }
        }
        TaskKind::Exact => {
            let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
            let extracted = Some(answer.trim().to_string()).filter(|a| !a.is_empty());
            let correct = extracted.as_deref().is_some_and(|a| norm(a) == norm(reference));
            Scored { extracted, correct }
        }
    }
}

/// The chosen letter: after "answer is" / "Answer:" when present, else the last standalone
/// capital letter (word-bounded, optionally in parentheses).
pub fn extract_choice(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase(); // byte offsets stay valid in `text`
    for phrase in ["answer is", "answer:"] {
        if let Some(i) = lower.rfind(phrase)
            && let Some(l) = standalone_letters(&text[i + phrase.len()..]).first()
        {
            return Some(l.to_string());
        }
    }
    standalone_letters(text).last().map(|l| l.to_string())
}

fn standalone_letters(text: &str) -> Vec<char> {
    let chars: Vec<char> = text.chars().collect();
    (0..chars.len())
        .filter(|&i| {
            let c = chars[i];
            let before = i.checked_sub(1).map(|j| chars[j]);
            let after = chars.get(i + 1).copied();
            c.is_ascii_uppercase()
                && before.is_none_or(|b| !b.is_alphanumeric())
                && after.is_none_or(|a| !a.is_alphanumeric())
                // "I" and "A" as words: only when set apart like a choice, e.g. "(A)" or "A."
                && (!matches!(c, 'I' | 'A') || matches!(before, Some('(') | Some('*')) || matches!(after, Some(')') | Some('.') | None))
        })
        .map(|i| chars[i])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn math_scoring_uses_the_shared_extractor() {
        let s = score(
            TaskKind::Math,
            "So she pays $1,000.00 in total.\n#### 1000",
            "1000",
        );
        assert!(s.correct, "{s:?}");
        let s = score(TaskKind::Math, "The answer is \\boxed{\\dfrac{3}{4}}", "0.75");
        assert!(s.correct, "{s:?}");
        let s = score(TaskKind::Math, "The answer is \\boxed{-5}", "5");
        assert!(!s.correct);
        let s = score(TaskKind::Math, "no idea", "5");
        assert_eq!(s.extracted, None);
    }

    #[test]
    fn choice_letters_are_found_in_the_usual_phrasings() {
        assert_eq!(extract_choice("The answer is (C)."), Some("C".into()));
        assert_eq!(extract_choice("Answer: B"), Some("B".into()));
        assert_eq!(extract_choice("I think it is D"), Some("D".into()));
        assert_eq!(extract_choice("**A** is right"), Some("A".into()));
        assert_eq!(extract_choice("I am unsure"), None);
        assert!(score(TaskKind::Choice, "so the answer is B, not C", "B").correct);
    }

    #[test]
    fn choice_records_accept_letters_indices_and_text() {
        let spec = TaskSpec::default();
        let rec = serde_json::json!({"question": "2+2?", "choices": ["3", "4"], "answer": 1});
        let item = choice_item(&rec, 0, &spec).unwrap();
        assert_eq!(item.reference, "B");
        assert!(item.user_text().contains("A. 3\nB. 4\n"));
        let rec = serde_json::json!({"question": "q", "choices": ["x", "y"], "answer": "y", "id": 9});
        let item = choice_item(&rec, 0, &spec).unwrap();
        assert_eq!((item.reference.as_str(), item.id.as_str()), ("B", "9"));
        let rec = serde_json::json!({"question": "q", "choices": ["x"], "answer": "C"});
        assert!(choice_item(&rec, 0, &spec).unwrap_err().contains("`C`"));
    }

    #[test]
    fn exact_match_normalises_space_and_case() {
        assert!(score(TaskKind::Exact, "  New   York ", "new york").correct);
        assert!(!score(TaskKind::Exact, "York", "new york").correct);
    }

    #[test]
    fn gsm8k_test_file_loads_with_numeric_references() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/gsm8k/train-200.jsonl");
        let spec = TaskSpec {
            source: path.to_string_lossy().into_owned(),
            max_examples: Some(5),
            ..Default::default()
        };
        let set = load(&spec, &HubSettings::default()).unwrap();
        assert_eq!(set.kind, TaskKind::Math);
        assert_eq!(set.items.len(), 5);
        assert_eq!(set.name, "gsm8k-train-200");
        for item in &set.items {
            assert!(item.reference.parse::<f64>().is_ok(), "{item:?}");
        }
    }
}
