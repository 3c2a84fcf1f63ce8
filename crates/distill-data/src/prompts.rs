//! Prompt sets: JSONL (or a JSON array), Parquet, or an HF dataset ref (`hf:org/name:split`),
//! each record mapped to chat messages, an id and an optional reference answer.
//!
//! Field mapping (`data.prompt_field`): a field holding text (one user turn) or an OpenAI
//! `messages` array (kept up to the last user turn); `a+b` joins fields with a blank line
//! (`instruction+input`; later fields may be missing or empty). Unset, the first present of
//! `prompt`, `question`, `problem`, `instruction(+input)`, `messages` is used.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::DataError;
use crate::extract::reference_answer;
use crate::hub::dataset_files;
use crate::sample::Message;
use distill_hf::hub::HubSettings;

/// Where prompts come from and how records map to them (the recipe's `[data]`).
#[derive(Debug, Clone, Default)]
pub struct PromptSpec {
    /// A `.jsonl`/`.json`/`.parquet` path, or `hf:org/name[@revision][:selector]`.
    pub source: String,
    pub prompt_field: Option<String>,
    /// Unset: the first present of `final_answer`, `reference`, `answer`, `solution`.
    pub reference_field: Option<String>,
    /// Unset: `id` when records have one, else the record's 0-based position.
    pub id_field: Option<String>,
    pub max_prompts: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub id: String,
    /// Chat messages ending with a user turn.
    pub messages: Vec<Message>,
    /// The reference's final answer (see [`reference_answer`]), when the record has one.
    pub reference: Option<String>,
}

const AUTO_PROMPT: [&str; 5] = ["prompt", "question", "problem", "instruction+input", "messages"];
const AUTO_REFERENCE: [&str; 4] = ["final_answer", "reference", "answer", "solution"];

/// Reads every prompt of `spec.source` (up to `max_prompts`).
pub fn load_prompts(spec: &PromptSpec, hub: &HubSettings) -> Result<Vec<Prompt>, DataError> {
    let files = match spec.source.strip_prefix("hf:") {
        Some(r) => dataset_files(r, hub)?,
        None => vec![PathBuf::from(&spec.source)],
    };
    let limit = spec.max_prompts.unwrap_or(usize::MAX);
    let mut out = Vec::new();
    for file in &files {
        if out.len() >= limit {
            break;
        }
        read_records(file, &mut |line, record| {
            if out.len() >= limit {
                return Ok(false);
            }
            let prompt = to_prompt(record, out.len(), spec).map_err(|msg| DataError::Record {
                path: file.clone(),
                line,
                msg,
            })?;
            out.push(prompt);
            Ok(true)
        })?;
    }
    if out.is_empty() {
        return Err(DataError::Format {
            path: PathBuf::from(&spec.source),
            msg: "holds no prompts".into(),
        });
    }
    Ok(out)
}

type OnRecord<'a> = dyn FnMut(usize, Map<String, Value>) -> Result<bool, DataError> + 'a;

/// Calls `f(line_or_row, record)` for each record until it returns false.
fn read_records(path: &Path, f: &mut OnRecord) -> Result<(), DataError> {
    let name = path.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".parquet") {
        return read_parquet(path, f);
    }
    let file = std::fs::File::open(path).map_err(DataError::io(path))?;
    let mut reader = std::io::BufReader::new(file);
    // A `.json` file may hold one array of records instead of lines.
    if name.ends_with(".json") {
        let buf = reader.fill_buf().map_err(DataError::io(path))?;
        if buf.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
            let all: Vec<Value> = serde_json::from_reader(reader).map_err(|e| DataError::Record {
                path: path.to_path_buf(),
                line: e.line(),
                msg: e.to_string(),
            })?;
            for (i, v) in all.into_iter().enumerate() {
                let record = as_object(v).map_err(|msg| DataError::Record {
                    path: path.to_path_buf(),
                    line: i + 1,
                    msg,
                })?;
                if !f(i + 1, record)? {
                    break;
                }
            }
            return Ok(());
        }
    }
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(DataError::io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| DataError::Record {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        let v: Value = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        if !f(i + 1, as_object(v).map_err(bad)?)? {
            break;
        }
    }
    Ok(())
}

fn as_object(v: Value) -> Result<Map<String, Value>, String> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(format!("expected a JSON object, got {}", kind(&other))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(feature = "parquet")]
fn read_parquet(path: &Path, f: &mut OnRecord) -> Result<(), DataError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |msg: String| DataError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let file = std::fs::File::open(path).map_err(DataError::io(path))?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(e.to_string()))?;
    let rows = reader.get_row_iter(None).map_err(|e| bad(e.to_string()))?;
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| DataError::Record {
            path: path.to_path_buf(),
            line: i + 1,
            msg: e.to_string(),
        })?;
        let record = as_object(row.to_json_value()).map_err(bad)?;
        if !f(i + 1, record)? {
            break;
        }
    }
    Ok(())
}

#[cfg(not(feature = "parquet"))]
fn read_parquet(path: &Path, _f: &mut OnRecord) -> Result<(), DataError> {
    Err(DataError::Unsupported {
        path: path.to_path_buf(),
        msg: "this build reads no Parquet; build distill-data with the `parquet` feature (the distill CLI has it)".into(),
    })
}

/// One record -> one prompt; the error names the field at fault.
fn to_prompt(record: Map<String, Value>, index: usize, spec: &PromptSpec) -> Result<Prompt, String> {
    let messages = match &spec.prompt_field {
        Some(field) => {
            prompt_from(&record, field)?.ok_or_else(|| format!("no field `{}`", field.split('+').next().unwrap_or(field)))?
        }
        None => AUTO_PROMPT
            .iter()
            .map(|f| prompt_from(&record, f))
            .find_map(Result::transpose)
            .transpose()?
            .ok_or_else(|| {
                format!(
                    "no prompt field (looked for prompt, question, problem, instruction, messages; has {}); set data.prompt_field",
                    record.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
                )
            })?,
    };
    let reference = match &spec.reference_field {
        Some(field) => text_of(&record, field).map_err(|e| format!("`{field}`: {e}"))?,
        None => AUTO_REFERENCE
            .iter()
            .find_map(|f| text_of(&record, f).ok().flatten()),
    }
    .map(|r| reference_answer(&r))
    .filter(|r| !r.is_empty());
    let id = match &spec.id_field {
        Some(field) => text_of(&record, field)
            .map_err(|e| format!("`{field}`: {e}"))?
            .ok_or_else(|| format!("no field `{field}` (data.id_field)"))?,
        None => text_of(&record, "id")
            .ok()
            .flatten()
            .unwrap_or_else(|| index.to_string()),
    };
    Ok(Prompt {
        id,
        messages,
        reference,
    })
}

/// A string or number field as text; Ok(None) when absent or null.
fn text_of(record: &Map<String, Value>, field: &str) -> Result<Option<String>, String> {
    match record.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(format!("expected text, got {}", kind(other))),
    }
}

/// The messages `field` gives, Ok(None) when the record lacks it.
fn prompt_from(record: &Map<String, Value>, field: &str) -> Result<Option<Vec<Message>>, String> {
    let mut parts = field.split('+');
    let first = parts.next().unwrap_or(field);
    let Some(value) = record.get(first).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let mut text = match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            if field.contains('+') {
                return Err(format!("`{first}` is an array; cannot join it with other fields"));
            }
            return messages_from(items)
                .map(Some)
                .map_err(|e| format!("`{first}`: {e}"));
        }
        other => {
            return Err(format!(
                "`{first}`: expected text or messages, got {}",
                kind(other)
            ));
        }
    };
    for extra in parts {
        if let Some(more) = text_of(record, extra).map_err(|e| format!("`{extra}`: {e}"))?
            && !more.trim().is_empty()
        {
            text.push_str("\n\n");
            text.push_str(&more);
        }
    }
    if text.trim().is_empty() {
        return Err(format!("`{first}` is empty"));
    }
    Ok(Some(vec![Message::new("user", text)]))
}

/// OpenAI-form messages, up to and including the last user turn.
fn messages_from(items: &[Value]) -> Result<Vec<Message>, String> {
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let role = item.get("role").and_then(Value::as_str);
        let content = item.get("content").and_then(Value::as_str);
        match (role, content) {
            (Some(r), Some(c)) => messages.push(Message::new(r, c)),
            _ => return Err(format!("message {i} lacks a string `role` and `content`")),
        }
    }
    let last_user = messages
        .iter()
        .rposition(|m| m.role == "user")
        .ok_or("has no user turn")?;
    messages.truncate(last_user + 1);
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(lines: &str, spec: PromptSpec) -> Result<Vec<Prompt>, DataError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, lines).unwrap();
        load_prompts(
            &PromptSpec {
                source: path.to_string_lossy().into_owned(),
                ..spec
            },
            &HubSettings::default(),
        )
    }

    #[test]
    fn gsm8k_lines_map_out_of_the_box() {
        let p = load(
            "{\"question\": \"Natalia sold 48 clips?\", \"answer\": \"48+24=72\\n#### 72\"}\n\n{\"question\": \"Q2\", \"answer\": \"#### 1,000\"}\n",
            PromptSpec::default(),
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].id, "0");
        assert_eq!(p[0].messages, [Message::new("user", "Natalia sold 48 clips?")]);
        assert_eq!(p[0].reference.as_deref(), Some("72"));
        assert_eq!(p[1].id, "1");
        assert_eq!(p[1].reference.as_deref(), Some("1,000"));
    }

    #[test]
    fn field_mapping_forms() {
        let p = load(
            "{\"id\": 7, \"instruction\": \"Sum these\", \"input\": \"1 2\"}\n{\"id\": \"b\", \"instruction\": \"Say hi\", \"input\": \"\"}\n",
            PromptSpec::default(),
        )
        .unwrap();
        assert_eq!(p[0].id, "7");
        assert_eq!(p[0].messages[0].content, "Sum these\n\n1 2");
        assert_eq!(p[1].messages[0].content, "Say hi");
        assert_eq!(p[1].reference, None);

        let p = load(
            "{\"messages\": [{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", \"content\": \"U\"}, {\"role\": \"assistant\", \"content\": \"A\"}]}\n",
            PromptSpec::default(),
        )
        .unwrap();
        assert_eq!(
            p[0].messages,
            [Message::new("system", "S"), Message::new("user", "U")]
        );

        let p = load(
            "{\"q\": \"text\", \"gold\": 12, \"uid\": \"x-1\"}\n",
            PromptSpec {
                prompt_field: Some("q".into()),
                reference_field: Some("gold".into()),
                id_field: Some("uid".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((p[0].id.as_str(), p[0].reference.as_deref()), ("x-1", Some("12")));
    }

    #[test]
    fn bad_records_name_file_line_and_field() {
        let err = load(
            "{\"question\": \"a\"}\n{\"text\": \"b\"}\n",
            PromptSpec::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("p.jsonl:2:") && err.contains("data.prompt_field") && err.contains("text"),
            "{err}"
        );
        let err = load("{\"question\": \"a\"}\nnot json\n", PromptSpec::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("p.jsonl:2:"), "{err}");
        let err = load(
            "{\"question\": \"a\"}\n",
            PromptSpec {
                prompt_field: Some("prompt".into()),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("p.jsonl:1: no field `prompt`"), "{err}");
        let err = load("", PromptSpec::default()).unwrap_err().to_string();
        assert!(err.contains("holds no prompts"), "{err}");
        let err = load_prompts(
            &PromptSpec {
                source: "/nonexistent/p.jsonl".into(),
                ..Default::default()
            },
            &HubSettings::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("/nonexistent/p.jsonl: "), "{err}");
    }

    #[test]
    fn max_prompts_and_json_arrays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(
            &path,
            "[{\"prompt\": \"a\"}, {\"prompt\": \"b\"}, {\"prompt\": \"c\"}]",
        )
        .unwrap();
        let p = load_prompts(
            &PromptSpec {
                source: path.to_string_lossy().into_owned(),
                max_prompts: Some(2),
                ..Default::default()
            },
            &HubSettings::default(),
        )
        .unwrap();
        assert_eq!(
            p.iter()
                .map(|p| p.messages[0].content.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[cfg(feature = "parquet")]
    #[test]
    fn parquet_files_read_like_jsonl() {
        use parquet::basic::Compression;
        use parquet::data_type::{ByteArray, ByteArrayType};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use std::sync::Arc;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train-00000-of-00001.parquet");
        let schema = Arc::new(
            parquet::schema::parser::parse_message_type(
                "message schema { REQUIRED BYTE_ARRAY question (UTF8); REQUIRED BYTE_ARRAY answer (UTF8); }",
            )
            .unwrap(),
        );
        let props = Arc::new(
            WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .build(),
        );
        let mut writer =
            SerializedFileWriter::new(std::fs::File::create(&path).unwrap(), schema, props).unwrap();
        let mut group = writer.next_row_group().unwrap();
        let columns = [["Q one", "Q two"], ["so #### 5", "#### 1,200"]];
        let mut i = 0;
        while let Some(mut col) = group.next_column().unwrap() {
            let values: Vec<ByteArray> = columns[i].iter().map(|s| ByteArray::from(*s)).collect();
            col.typed::<ByteArrayType>()
                .write_batch(&values, None, None)
                .unwrap();
            col.close().unwrap();
            i += 1;
        }
        group.close().unwrap();
        writer.close().unwrap();

        let p = load_prompts(
            &PromptSpec {
                source: path.to_string_lossy().into_owned(),
                ..Default::default()
            },
            &HubSettings::default(),
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].messages[0].content, "Q two");
        assert_eq!(p[1].reference.as_deref(), Some("1,200"));
        assert_eq!(p[0].id, "0");
    }

    #[cfg(not(feature = "parquet"))]
    #[test]
    fn parquet_without_the_feature_says_how_to_get_it() {
        let err = load_prompts(
            &PromptSpec {
                source: "x.parquet".into(),
                ..Default::default()
            },
            &HubSettings::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`parquet` feature"), "{err}");
    }

    #[test]
    fn the_shared_gsm8k_set_loads_whole() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/gsm8k/train-200.jsonl");
        let p = load_prompts(
            &PromptSpec {
                source: path.to_string_lossy().into_owned(),
                ..Default::default()
            },
            &HubSettings::default(),
        )
        .unwrap();
        assert_eq!(p.len(), 200);
        assert!(
            p.iter()
                .all(|p| p.reference.as_deref().is_some_and(|r| !r.contains("####")))
        );
    }
}
