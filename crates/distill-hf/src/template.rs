//! Chat templates: the Jinja source a model ships, rendered with minijinja the way
//! transformers renders it (trim_blocks, lstrip_blocks, Python string methods,
//! `raise_exception`, `tojson` as `json.dumps`), with a fuel limit so an untrusted template
//! cannot run forever and a size limit on what it may produce.

use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind, context};

use crate::error::{ModelError, Result};

/// Instructions one render may execute; HF templates need a few thousand per message.
const FUEL: u64 = 5_000_000;
/// Largest rendered prompt we accept (bytes).
const MAX_OUTPUT: usize = 64 << 20;

pub use distill_core::Message;

/// A parsed chat template and the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for errors and `inspect`.
    pub source: PathBuf,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

impl ChatTemplate {
    pub fn new(source_text: String, source: &Path, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source_text)
            .map_err(|e| template_error(source, &e))?;
        Ok(ChatTemplate {
            env,
            source: source.to_path_buf(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders `messages` exactly as `tokenizer.apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| template_error(&self.source, &e))?;
        let text = template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| template_error(&self.source, &e))?;
        if text.len() > MAX_OUTPUT {
            return Err(ModelError::invalid(
                &self.source,
                format!(
                    "chat template produced {} bytes, over the {MAX_OUTPUT}-byte limit",
                    text.len()
                ),
            ));
        }
        Ok(text)
    }

    /// Splits a conversation whose last turn is the assistant's into the prompt (the template's
    /// rendering up to the generation prompt) and the completion: that turn's content kept
    /// verbatim, reasoning included, followed by the template's end-of-turn text. Templates
    /// such as R1-Distill's drop `<think>...</think>` from assistant turns when rendering
    /// history; training on reasoning needs the full turn, which this gives.
    pub fn render_for_training(&self, messages: &[Message]) -> Result<(String, String)> {
        let (last, history) = match messages.split_last() {
            Some((last, history)) if last.role == "assistant" => (last, history),
            _ => {
                return Err(ModelError::invalid(
                    &self.source,
                    "render_for_training needs a conversation ending with an assistant turn",
                ));
            }
        };
        let prompt = self.render(history, true)?;
        let mut content = last.content.as_str();
        // Templates that open the reasoning in the generation prompt (R1's "<think>\n") would
        // otherwise see it twice.
        for opener in ["<think>\n", "<think>"] {
            if prompt.ends_with(opener) && content.starts_with(opener) {
                content = &content[opener.len()..];
                break;
            }
        }
        Ok((prompt, format!("{content}{}", self.end_of_turn()?)))
    }

    /// What the template writes after an assistant message's content, found by rendering a
    /// marker: "<|im_end|>\n" for ChatML, "<｜end▁of▁sentence｜>" for R1, "<|eot_id|>" for Llama 3.
    pub fn end_of_turn(&self) -> Result<String> {
        const MARK: &str = "\u{E000}distill-marker\u{E000}";
        let probe = [Message::new("user", "hi"), Message::new("assistant", MARK)];
        let text = self.render(&probe, false)?;
        Ok(match text.rfind(MARK) {
            Some(i) => text[i + MARK.len()..].to_string(),
            None => self.eos_token.clone(),
        })
    }
}

fn template_error(source: &Path, e: &Error) -> ModelError {
    let line = e
        .line()
        .map(|l| format!(" (template line {l})"))
        .unwrap_or_default();
    let what = match e.kind() {
        ErrorKind::OutOfFuel => "chat template ran too long and was stopped".to_string(),
        _ => format!("chat template error: {}", e.detail().unwrap_or(&e.to_string())),
    };
    ModelError::invalid(source, format!("{what}{line}"))
}

fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// Llama 3.x templates print today's date through this.
fn strftime_now(format: String) -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    let (y, m, d) = civil_from_days(days);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    format
        .replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", MONTHS[(m - 1) as usize])
        .replace("%b", &MONTHS[(m - 1) as usize][..3])
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `tojson` as Python's `json.dumps(x, ensure_ascii=False, indent=indent)`, which is what
/// transformers installs: ", " and ": " separators, non-ASCII kept.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_py_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                write_py_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;
    use crate::test_util::fixtures;

    #[derive(Deserialize)]
    struct Case {
        template: String,
        bos_token: String,
        eos_token: String,
        messages: Vec<Message>,
        add_generation_prompt: bool,
        text: String,
    }

    fn cases() -> Vec<Case> {
        let path = fixtures().join("templates/expected.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn load(name: &str, bos: &str, eos: &str) -> ChatTemplate {
        let path = fixtures().join(format!("templates/{name}.jinja"));
        ChatTemplate::new(std::fs::read_to_string(&path).unwrap(), &path, bos, eos).unwrap()
    }

    /// Llama 3.1 prints today's date; transformers' fixture run had none and printed its default.
    fn normalise_date(text: &str) -> String {
        text.lines()
            .map(|l| {
                if l.starts_with("Today Date: ") {
                    "Today Date: <date>"
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn real_templates_render_as_transformers_does() {
        let cases = cases();
        assert_eq!(cases.len(), 12);
        for case in cases {
            let template = load(&case.template, &case.bos_token, &case.eos_token);
            let ours = template
                .render(&case.messages, case.add_generation_prompt)
                .unwrap();
            assert_eq!(
                normalise_date(&ours),
                normalise_date(&case.text),
                "{} with {} messages",
                case.template,
                case.messages.len()
            );
        }
    }

    #[test]
    fn r1_training_render_keeps_the_reasoning_the_template_drops() {
        let bos = "<｜begin▁of▁sentence｜>";
        let eos = "<｜end▁of▁sentence｜>";
        let template = load("deepseek-r1-distill-qwen", bos, eos);
        let messages = [
            Message::new("user", "What is 6 * 7?"),
            Message::new("assistant", "<think>\nsix sevens\n</think>\n\n42"),
        ];
        // The template itself strips everything up to </think> ...
        assert!(!template.render(&messages, false).unwrap().contains("six sevens"));
        // ... the training render keeps it, without doubling the "<think>\n" the prompt opens.
        let (prompt, completion) = template.render_for_training(&messages).unwrap();
        assert_eq!(
            prompt,
            format!("{bos}<｜User｜>What is 6 * 7?<｜Assistant｜><think>\n")
        );
        assert_eq!(completion, format!("six sevens\n</think>\n\n42{eos}"));
    }

    #[test]
    fn chatml_end_of_turn_is_found_by_rendering() {
        let template = load("qwen2.5-instruct", "", "<|im_end|>");
        assert_eq!(template.end_of_turn().unwrap(), "<|im_end|>\n");
        let (prompt, completion) = template
            .render_for_training(&[
                Message::new("user", "hi"),
                Message::new("assistant", "<think>\nx\n</think>\n\ny"),
            ])
            .unwrap();
        assert!(prompt.ends_with("<|im_start|>assistant\n"));
        assert_eq!(completion, "<think>\nx\n</think>\n\ny<|im_end|>\n");
        let llama = load("llama3.1-instruct", "<|begin_of_text|>", "<|eot_id|>");
        assert_eq!(llama.end_of_turn().unwrap(), "<|eot_id|>");
    }

    #[test]
    fn raise_exception_and_syntax_errors_name_the_template() {
        let path = Path::new("tokenizer_config.json");
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok".into(),
            path,
            "",
            "",
        )
        .unwrap();
        let err = t
            .render(&[Message::new("assistant", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("Conversation must start with user"),
            "{err}"
        );
        let err = ChatTemplate::new("{% for x in %}".into(), path, "", "")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("tokenizer_config.json: chat template error"),
            "{err}"
        );
    }

    #[test]
    fn a_runaway_template_is_stopped() {
        let path = Path::new("chat_template.jinja");
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}".into(),
            path,
            "",
            "",
        )
        .unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("ran too long"), "{err}");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}".into(),
            Path::new("t.jinja"),
            "",
            "",
        )
        .unwrap();
        let out = t.render(&[Message::new("user", "café <b>")], false).unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"café <b>\"}|{\n  \"role\": \"user\",\n  \"content\": \"café <b>\"\n}"
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_658), (2026, 7, 24));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
