//! Chat templates: the Jinja source a model ships, rendered with minijinja the way
//! transformers renders it (trim_blocks, lstrip_blocks, Python string methods,
//! `raise_exception`, `tojson` as `json.dumps`).
//!
//! A template comes with the model, so it is untrusted: each render runs on a worker thread
//! under [`crate::guard`] with the limits in [`crate::limits`] (instructions, output size,
//! memory, wall-clock time). A template that hits one is refused with an error naming its file,
//! at load when a short probe conversation already hits it, otherwise at the first render that
//! does, and every later render of it is refused with the same error.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind, context};

use crate::error::{ModelError, Result};
use crate::guard::{self, Limits, Stop};
use crate::limits::{MAX_TEMPLATE_BYTES, TEMPLATE_FUEL, TEMPLATE_LIMITS, TEMPLATE_OUTPUT_BYTES};

pub use distill_core::Message;

/// A parsed chat template and the special tokens it may reference.
pub struct ChatTemplate {
    compiled: Arc<Compiled>,
    /// Where the template came from, for errors and `inspect`.
    pub source: PathBuf,
    limits: Limits,
    /// The limit a render hit, once one has: the template is refused from then on.
    refused: OnceLock<String>,
    /// [`Self::end_of_turn`], rendered once: every training example needs it.
    end_of_turn: OnceLock<String>,
}

/// What a worker thread needs to render, shared so that nothing the caller allocated is freed
/// on the worker (which would lower its memory count).
struct Compiled {
    env: Environment<'static>,
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

/// Why a render failed: the template's own error, or a limit (which refuses the template).
enum Failure {
    Template(ModelError),
    Limit(String),
}

impl ChatTemplate {
    pub fn new(source_text: String, source: &Path, bos_token: &str, eos_token: &str) -> Result<Self> {
        Self::with_limits(source_text, source, bos_token, eos_token, TEMPLATE_LIMITS)
    }

    fn with_limits(
        source_text: String,
        source: &Path,
        bos_token: &str,
        eos_token: &str,
        limits: Limits,
    ) -> Result<Self> {
        if source_text.len() > MAX_TEMPLATE_BYTES {
            return Err(ModelError::invalid(
                source,
                format!(
                    "chat template is {} bytes, over the {MAX_TEMPLATE_BYTES}-byte limit",
                    source_text.len()
                ),
            ));
        }
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(TEMPLATE_FUEL));
        // Debug info would carry the template's variables out of the worker in its errors, to be
        // dropped on the caller's (smaller) stack; a deeply nested list takes one frame a level.
        env.set_debug(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source_text)
            .map_err(|e| template_error(source, &e))?;
        let template = ChatTemplate {
            compiled: Arc::new(Compiled {
                env,
                bos_token: bos_token.to_string(),
                eos_token: eos_token.to_string(),
            }),
            source: source.to_path_buf(),
            limits,
            refused: OnceLock::new(),
            end_of_turn: OnceLock::new(),
        };
        template.probe()?;
        Ok(template)
    }

    /// Renders a short conversation once, so that a template that hits a limit whatever the
    /// conversation is refused when the model is opened. The template's own errors (a
    /// `raise_exception` about roles, say) are left to real renders.
    fn probe(&self) -> Result<()> {
        let probe = [
            Message::new("system", "You are helpful."),
            Message::new("user", "hi"),
            Message::new("assistant", "hello"),
            Message::new("user", "bye"),
        ];
        match self.render(&probe, true) {
            Err(e) if self.refused.get().is_some() => Err(e),
            _ => Ok(()),
        }
    }

    /// Renders `messages` exactly as `tokenizer.apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        if let Some(msg) = self.refused.get() {
            return Err(ModelError::invalid(&self.source, msg.clone()));
        }
        match self.render_guarded(messages, add_generation_prompt) {
            Ok(text) => Ok(text),
            Err(Failure::Template(e)) => Err(e),
            Err(Failure::Limit(msg)) => {
                let msg = self.refused.get_or_init(|| msg).clone();
                Err(ModelError::invalid(&self.source, msg))
            }
        }
    }

    fn render_guarded(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, Failure> {
        let compiled = self.compiled.clone();
        let messages: Arc<[Message]> = messages.into();
        let worker_messages = messages.clone();
        let outcome = guard::run(self.limits, move || {
            compiled.render(&worker_messages, add_generation_prompt)
        });
        // Dropped here, after the worker, so that their memory is freed on this thread.
        drop(messages);
        let secs = self.limits.time.as_secs_f64();
        let mib = self.limits.memory >> 20;
        match outcome {
            Ok(Ok(text)) => Ok(text),
            Ok(Err(Rendered::TooLong)) => Err(Failure::Limit(format!(
                "chat template produced more than {TEMPLATE_OUTPUT_BYTES} bytes and was stopped"
            ))),
            Ok(Err(Rendered::Jinja(e))) if e.kind() == ErrorKind::OutOfFuel => Err(Failure::Limit(format!(
                "chat template ran more than {TEMPLATE_FUEL} instructions and was stopped{}",
                line_suffix(&e)
            ))),
            Ok(Err(Rendered::Jinja(e))) => Err(Failure::Template(template_error(&self.source, &e))),
            Err(Stop::Memory) => Err(Failure::Limit(format!(
                "chat template needed more than {mib} MiB of memory and was stopped"
            ))),
            Err(Stop::Time) => Err(Failure::Limit(format!(
                "chat template ran longer than {secs} s and was stopped"
            ))),
            Err(Stop::Panic(msg)) => Err(Failure::Template(ModelError::invalid(
                &self.source,
                format!("chat template crashed the renderer: {msg}"),
            ))),
            Err(Stop::Spawn(msg)) => Err(Failure::Template(ModelError::invalid(
                &self.source,
                format!("cannot start a thread to render the chat template: {msg}"),
            ))),
        }
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
        if let Some(text) = self.end_of_turn.get() {
            return Ok(text.clone());
        }
        const MARK: &str = "\u{E000}distill-marker\u{E000}";
        let probe = [Message::new("user", "hi"), Message::new("assistant", MARK)];
        let text = self.render(&probe, false)?;
        let end = match text.rfind(MARK) {
            Some(i) => text[i + MARK.len()..].to_string(),
            None => self.compiled.eos_token.clone(),
        };
        Ok(self.end_of_turn.get_or_init(|| end).clone())
    }
}

/// How a render on the worker ended, when it was not stopped.
enum Rendered {
    Jinja(Error),
    TooLong,
}

impl Compiled {
    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, Rendered> {
        let template = self.env.get_template("chat").map_err(Rendered::Jinja)?;
        let mut out = CappedOutput::default();
        let rendered = template.render_captured_to(
            context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            },
            &mut out,
        );
        if out.over {
            return Err(Rendered::TooLong);
        }
        rendered.map_err(Rendered::Jinja)?;
        // minijinja writes whole `str`s.
        String::from_utf8(out.bytes)
            .map_err(|_| Rendered::Jinja(Error::new(ErrorKind::WriteFailure, "output is not UTF-8")))
    }
}

/// The rendered text, refused past [`TEMPLATE_OUTPUT_BYTES`].
#[derive(Default)]
struct CappedOutput {
    bytes: Vec<u8>,
    over: bool,
}

impl io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len() + buf.len() > TEMPLATE_OUTPUT_BYTES {
            self.over = true;
            return Err(io::Error::other("over the output limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn line_suffix(e: &Error) -> String {
    e.line()
        .map(|l| format!(" (template line {l})"))
        .unwrap_or_default()
}

fn template_error(source: &Path, e: &Error) -> ModelError {
    ModelError::invalid(
        source,
        format!(
            "chat template error: {}{}",
            e.detail().unwrap_or(&e.to_string()),
            line_suffix(e)
        ),
    )
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

    /// The error a hostile template gets: at load when the probe conversation already hits a
    /// limit, otherwise at its first render.
    fn hostile(src: &str, limits: Limits) -> String {
        let path = Path::new("models/evil/chat_template.jinja");
        match ChatTemplate::with_limits(src.into(), path, "", "", limits) {
            Err(e) => e.to_string(),
            Ok(t) => t
                .render(&[Message::new("user", "hi")], true)
                .map(|text| format!("rendered {} bytes", text.len()))
                .unwrap_or_else(|e| e.to_string()),
        }
    }

    fn assert_refused(src: &str, limits: Limits, why: &str) {
        let err = hostile(src, limits);
        assert!(
            err.starts_with("models/evil/chat_template.jinja: chat template ")
                && err.contains(why)
                && !err.contains('\n'),
            "{src}\n{err}"
        );
    }

    #[test]
    fn a_runaway_template_is_stopped() {
        assert_refused(
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
            TEMPLATE_LIMITS,
            "ran more than 5000000 instructions and was stopped (template line 1)",
        );
    }

    /// Each of these asks for terabytes in a few instructions; fuel does not see it. (A 32 MiB
    /// budget keeps the test fast; the CLI test meets the default one.)
    #[test]
    fn templates_that_build_huge_values_are_stopped_by_the_memory_budget() {
        let limits = Limits {
            memory: 32 << 20,
            ..TEMPLATE_LIMITS
        };
        for src in [
            "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
            // Macro output is captured without going through the output cap.
            "{% macro d(n) %}{% if n == 0 %}x{% else %}{% set inner = d(n - 1) %}{{ inner }}{{ inner }}{% endif %}{% endmacro %}{{ d(40) | length }}",
            // A list that is a tree of 2^60 leaves, expanded.
            "{% set ns = namespace(x=[0]) %}{% for i in range(60) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}{{ ns.x | tojson | length }}",
            "{{ (range(100000) * 100000) | list | length }}",
            "{{ (range(100000) * 100000) | join | length }}",
            "{{ ((range(100000) * 100000) | tojson) | length }}",
            "{{ (('x' * 10000000) | replace('x', 'x' * 10000000)) | length }}",
            "{{ ('x' * 10000000).replace('x', 'yy' * 1000) | length }}",
            "{{ (('x\\n' * 1000000) | indent(10000000)) | length }}",
            "{{ ('%s%s' | format('x' * 100000000, 'x' * 100000000) ~ ('x' * 100000000)) | length }}",
        ] {
            assert_refused(src, limits, "needed more than 32 MiB of memory and was stopped");
        }
    }

    #[test]
    fn minijinja_refuses_huge_ranges_and_repeats_itself() {
        for (src, why) in [
            (
                "{{ range(10**9) | list | length }}",
                "range has too many elements",
            ),
            ("{{ ('x' * 10**9) | length }}", "repeated string is too large"),
        ] {
            assert_refused(src, TEMPLATE_LIMITS, why);
        }
    }

    #[test]
    fn output_past_the_cap_is_refused() {
        assert_refused(
            "{% for i in range(70) %}{{ 'x' * 1000000 }}{% endfor %}",
            TEMPLATE_LIMITS,
            "produced more than 67108864 bytes",
        );
    }

    #[test]
    fn a_template_that_loops_without_instructions_is_stopped_by_the_deadline() {
        // One `in` walks 10^17 items of a lazily repeated range, inside one instruction.
        let limits = Limits {
            time: std::time::Duration::from_millis(200),
            ..TEMPLATE_LIMITS
        };
        assert_refused(
            "{{ -1 in (range(100000) * 1000000000000) }}",
            limits,
            "ran longer than 0.2 s and was stopped",
        );
    }

    #[test]
    fn deep_nesting_and_recursion_end_in_errors_not_crashes() {
        let nested = "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x | length }}";
        assert_eq!(hostile(nested, TEMPLATE_LIMITS), "rendered 1 bytes");
        // As deep as fuel allows (800k levels): printed and dropped on the worker's stack.
        assert_refused(
            "{% set ns = namespace(x=[]) %}{% for a in range(8) %}{% for i in range(100000) %}{% set ns.x = [ns.x] %}{% endfor %}{% endfor %}{{ ns.x }}",
            TEMPLATE_LIMITS,
            "ran more than 5000000 instructions",
        );
        assert_refused(
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            TEMPLATE_LIMITS,
            "recursion",
        );
    }

    /// A template that behaves on the probe conversation and not on a longer one is refused at
    /// that render and at every render after it.
    #[test]
    fn a_template_that_hits_a_limit_once_is_refused_from_then_on() {
        let src = "{% if messages | length > 4 %}{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{% endif %}ok";
        let t = ChatTemplate::new(src.into(), Path::new("chat_template.jinja"), "", "").unwrap();
        assert_eq!(t.render(&[Message::new("user", "hi")], true).unwrap(), "ok");
        let long = vec![Message::new("user", "hi"); 5];
        let err = t.render(&long, true).unwrap_err().to_string();
        assert!(err.contains("needed more than 256 MiB"), "{err}");
        let again = t
            .render(&[Message::new("user", "hi")], true)
            .unwrap_err()
            .to_string();
        assert_eq!(again, err);
    }

    #[test]
    fn an_oversized_template_source_is_refused() {
        let src = "x".repeat(MAX_TEMPLATE_BYTES + 1);
        assert_refused(&src, TEMPLATE_LIMITS, "over the 1048576-byte limit");
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
