//! `tokenizer.json` (the tokenizers crate), the special tokens named in
//! `tokenizer_config.json`, and the chat template from `chat_template.jinja` or
//! `tokenizer_config.json` (string or list form), as transformers reads them.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result, read, read_json};
use crate::limits::{
    MAX_ADDED_TOKENS, MAX_CONFIG_BYTES, MAX_MERGES, MAX_TEMPLATE_BYTES, MAX_TOKEN_BYTES, MAX_TOKENIZER_BYTES,
    MAX_VOCAB, check_file,
};
use crate::template::{ChatTemplate, Message};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const TEMPLATE_FILE: &str = "chat_template.jinja";

/// The special tokens transformers exposes as `tokenizer.bos_token` etc.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
}

#[derive(Deserialize, Default)]
struct TokenizerConfig {
    bos_token: Option<Value>,
    eos_token: Option<Value>,
    pad_token: Option<Value>,
    unk_token: Option<Value>,
    chat_template: Option<Value>,
}

/// A token is written as "text" or as an AddedToken dict {"content": "text", ...}.
fn token_text(v: &Option<Value>) -> Option<String> {
    match v.as_ref()? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// Counted once: tokenizers' `get_vocab_size(true)` copies the whole vocabulary into a map
    /// on every call (tens of milliseconds at 152k tokens), and generation reads it at every
    /// decode step.
    vocab_size: usize,
    pub specials: SpecialTokens,
    pub chat_template: Option<ChatTemplate>,
    /// sha256 of tokenizer.json: manifests record it so a dataset is never trained with a
    /// different tokenizer than the one that made it.
    pub hash: String,
    pub files: Vec<PathBuf>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("specials", &self.specials)
            .field("chat_template", &self.chat_template)
            .field("hash", &self.hash)
            .finish()
    }
}

impl TextTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        check_file(&path, MAX_TOKENIZER_BYTES)?;
        let bytes = read(&path)?;
        check_shape(&bytes, &path)?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| ModelError::invalid(&path, format!("cannot load tokenizer: {e}")))?;
        let hash = format!("{:x}", Sha256::digest(&bytes));
        let mut files = vec![path];

        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config: TokenizerConfig = if config_path.exists() {
            files.push(config_path.clone());
            check_file(&config_path, MAX_CONFIG_BYTES)?;
            read_json(&config_path)?
        } else {
            TokenizerConfig::default()
        };
        let specials = SpecialTokens {
            bos: token_text(&config.bos_token),
            eos: token_text(&config.eos_token),
            pad: token_text(&config.pad_token),
            unk: token_text(&config.unk_token),
        };
        let template_path = dir.join(TEMPLATE_FILE);
        let source = if template_path.exists() {
            check_file(&template_path, MAX_TEMPLATE_BYTES as u64)?;
            let text = String::from_utf8(read(&template_path)?)
                .map_err(|_| ModelError::invalid(&template_path, "not UTF-8"))?;
            files.push(template_path.clone());
            Some((text, template_path))
        } else {
            template_from_config(config.chat_template.as_ref(), &config_path)?
                .map(|text| (text, config_path.clone()))
        };
        let chat_template = source
            .map(|(text, path)| {
                ChatTemplate::new(
                    text,
                    &path,
                    specials.bos.as_deref().unwrap_or(""),
                    specials.eos.as_deref().unwrap_or(""),
                )
            })
            .transpose()?;
        Ok(TextTokenizer {
            vocab_size: inner.get_vocab_size(true),
            inner,
            specials,
            chat_template,
            hash,
            files,
        })
    }

    /// Token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor adds
    /// (e.g. Llama's BOS). Text rendered by a chat template already holds its specials.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::invalid("tokenizer.json", format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::invalid("tokenizer.json", format!("cannot decode ids: {e}")))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// How many of this vocabulary's ids name the same token in `other`: (same, compared).
    /// Tokenizers of one family (Qwen2.5 and DeepSeek-R1-Distill-Qwen) differ in their
    /// tokenizer.json, and so in hash, while sharing the ids of every ordinary token.
    pub fn shared_ids(&self, other: &TextTokenizer) -> (usize, usize) {
        let n = self.vocab_size().min(other.vocab_size()) as u32;
        let same = (0..n)
            .filter(|&id| {
                let a = self.id_to_token(id);
                a.is_some() && a == other.id_to_token(id)
            })
            .count();
        (same, self.vocab_size())
    }

    /// Added tokens flagged special, sorted by id.
    pub fn added_special_tokens(&self) -> Vec<(u32, String)> {
        let mut out: Vec<(u32, String)> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        out.sort();
        out
    }

    pub fn template(&self) -> Result<&ChatTemplate> {
        self.chat_template.as_ref().ok_or_else(|| {
            ModelError::invalid(
                TOKENIZER_CONFIG_FILE,
                "this model has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json)",
            )
        })
    }

    /// Renders and tokenizes a prompt, as `apply_chat_template(..., tokenize=True)`.
    pub fn encode_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.template()?.render(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// The tokenizers crate's tokenizer, for vocabulary-level work in this crate (token_map).
    pub(crate) fn raw(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// `chat_template` is a string, or a list of {"name", "template"} of which "default" is used.
fn template_from_config(value: Option<&Value>, path: &Path) -> Result<Option<String>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => {
            let named = |want: &str| {
                items.iter().find_map(|item| {
                    (item.get("name")?.as_str()? == want)
                        .then(|| item.get("template")?.as_str().map(str::to_string))
                        .flatten()
                })
            };
            named("default").map(Some).ok_or_else(|| {
                ModelError::invalid(path, "chat_template is a list without a \"default\" entry")
            })
        }
        Some(_) => Err(ModelError::invalid(
            path,
            "chat_template must be a string or a list",
        )),
    }
}

/// Refuses a tokenizer.json whose counts or token lengths are over [`crate::limits`], before
/// the tokenizers crate builds its tables from it (a few bytes of JSON per vocabulary entry
/// become over a hundred in its maps). Counted while parsing, nothing kept; serde_json's
/// nesting limit (128) holds for this parse and the tokenizers crate's.
fn check_shape(bytes: &[u8], path: &Path) -> Result<()> {
    serde_json::from_slice::<shape::Tokenizer>(bytes)
        .map(drop)
        .map_err(|e| {
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or_default();
            ModelError::invalid(path, format!("cannot load tokenizer: {msg}"))
        })
}

/// tokenizer.json's sized parts: `model.vocab` (a map of token to id, or Unigram's list of
/// [token, score]), `model.merges`, `added_tokens`.
mod shape {
    use std::fmt;

    use serde::Deserialize;
    use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};

    use super::{MAX_ADDED_TOKENS, MAX_MERGES, MAX_TOKEN_BYTES, MAX_VOCAB};

    // The fields are read by serde, for the checks their types make; nothing is kept.
    #[derive(Deserialize)]
    #[allow(dead_code)]
    pub struct Tokenizer {
        #[serde(default)]
        added_tokens: Option<Seq<AddedToken, AddedTokens>>,
        #[serde(default)]
        model: Option<Model>,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Model {
        #[serde(default)]
        vocab: Option<Vocab>,
        #[serde(default)]
        merges: Option<Seq<IgnoredAny, Merges>>,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct AddedToken {
        id: Id,
        content: Text,
    }

    /// A named count limit for [`Seq`].
    trait Limit {
        const FIELD: &'static str;
        const MAX: usize;
    }
    struct AddedTokens;
    impl Limit for AddedTokens {
        const FIELD: &'static str = "added_tokens";
        const MAX: usize = MAX_ADDED_TOKENS;
    }
    struct Merges;
    impl Limit for Merges {
        const FIELD: &'static str = "model.merges";
        const MAX: usize = MAX_MERGES;
    }
    struct UnigramVocab;
    impl Limit for UnigramVocab {
        const FIELD: &'static str = "model.vocab";
        const MAX: usize = MAX_VOCAB;
    }

    fn too_many<E: de::Error>(field: &str, max: usize) -> E {
        E::custom(format!("{field} has more than {max} entries, the limit"))
    }

    /// A list of `T`, refused at its `L::MAX + 1`-th item.
    struct Seq<T, L>(std::marker::PhantomData<(T, L)>);

    impl<'de, T: Deserialize<'de>, L: Limit> Deserialize<'de> for Seq<T, L> {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<T, L>(std::marker::PhantomData<(T, L)>);
            impl<'de, T: Deserialize<'de>, L: Limit> Visitor<'de> for V<T, L> {
                type Value = Seq<T, L>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    write!(f, "a list ({})", L::FIELD)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                    let mut n = 0usize;
                    while seq.next_element::<T>()?.is_some() {
                        n += 1;
                        if n > L::MAX {
                            return Err(too_many(L::FIELD, L::MAX));
                        }
                    }
                    Ok(Seq(std::marker::PhantomData))
                }
            }
            d.deserialize_seq(V(std::marker::PhantomData))
        }
    }

    /// A token id, refused at [`MAX_VOCAB`] or above (ids size the id-to-token tables).
    struct Id;

    impl<'de> Deserialize<'de> for Id {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let id = u64::deserialize(d)?;
            if id >= MAX_VOCAB as u64 {
                return Err(de::Error::custom(format!(
                    "token id {id} is over the limit of {}",
                    MAX_VOCAB - 1
                )));
            }
            Ok(Id)
        }
    }

    /// A token's text, refused past [`MAX_TOKEN_BYTES`].
    struct Text;

    impl<'de> Deserialize<'de> for Text {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Text;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a token string")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                    if v.len() > MAX_TOKEN_BYTES {
                        return Err(E::custom(format!(
                            "a token of {} bytes is over the {MAX_TOKEN_BYTES}-byte limit",
                            v.len()
                        )));
                    }
                    Ok(Text)
                }
            }
            d.deserialize_str(V)
        }
    }

    /// `model.vocab`: {token: id} (BPE, WordPiece, WordLevel) or [[token, score], ...] (Unigram).
    struct Vocab;

    impl<'de> Deserialize<'de> for Vocab {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Vocab;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a map of token to id or a list of [token, score]")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vocab, A::Error> {
                    let mut n = 0usize;
                    while map.next_entry::<Text, Id>()?.is_some() {
                        n += 1;
                        if n > MAX_VOCAB {
                            return Err(too_many("model.vocab", MAX_VOCAB));
                        }
                    }
                    Ok(Vocab)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vocab, A::Error> {
                    Seq::<(Text, IgnoredAny), UnigramVocab>::deserialize(
                        de::value::SeqAccessDeserializer::new(seq),
                    )
                    .map(|_| Vocab)
                }
            }
            d.deserialize_any(V)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{fixtures, scratch_copy};

    #[derive(Deserialize)]
    struct Expected {
        encode: Vec<EncodeCase>,
        chat: Vec<ChatCase>,
    }
    #[derive(Deserialize)]
    struct EncodeCase {
        text: String,
        ids: Vec<u32>,
    }
    #[derive(Deserialize)]
    struct ChatCase {
        messages: Vec<Message>,
        add_generation_prompt: bool,
        text: String,
    }

    fn expected() -> Expected {
        serde_json::from_slice(&std::fs::read(fixtures().join("tokenizer/expected.json")).unwrap()).unwrap()
    }

    #[test]
    fn encodes_and_renders_as_transformers() {
        let expected = expected();
        for dir in ["tokenizer", "tiny-qwen2", "tiny-llama"] {
            let tok = TextTokenizer::from_dir(&fixtures().join(dir)).unwrap();
            for case in &expected.encode {
                assert_eq!(
                    tok.encode(&case.text, false).unwrap(),
                    case.ids,
                    "{dir}: {:?}",
                    case.text
                );
                assert_eq!(tok.decode(&case.ids, false).unwrap(), case.text);
            }
            for case in &expected.chat {
                let text = tok
                    .template()
                    .unwrap()
                    .render(&case.messages, case.add_generation_prompt)
                    .unwrap();
                assert_eq!(text, case.text, "{dir}");
            }
            assert_eq!(tok.specials.eos.as_deref(), Some("<|im_end|>"));
            assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
        }
    }

    #[test]
    fn template_source_follows_transformers_precedence() {
        let llama = TextTokenizer::from_dir(&fixtures().join("tiny-llama")).unwrap();
        assert!(llama.chat_template.unwrap().source.ends_with(TEMPLATE_FILE));
        let qwen = TextTokenizer::from_dir(&fixtures().join("tiny-qwen2")).unwrap();
        assert!(
            qwen.chat_template
                .unwrap()
                .source
                .ends_with(TOKENIZER_CONFIG_FILE)
        );
    }

    #[test]
    fn list_form_templates_and_added_token_dicts_are_read() {
        let tmp = scratch_copy("tiny-qwen2");
        let config = r#"{
            "bos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": false},
            "eos_token": "<|im_end|>",
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}
            ]}"#;
        std::fs::write(tmp.path().join(TOKENIZER_CONFIG_FILE), config).unwrap();
        let tok = TextTokenizer::from_dir(tmp.path()).unwrap();
        assert_eq!(tok.specials.bos.as_deref(), Some("<|endoftext|>"));
        let text = tok
            .template()
            .unwrap()
            .render(&[Message::new("user", "hi")], false)
            .unwrap();
        assert_eq!(text, "<|endoftext|>hi");
    }

    #[test]
    fn broken_tokenizer_files_are_named() {
        let tmp = scratch_copy("tiny-qwen2");
        std::fs::write(tmp.path().join(TOKENIZER_FILE), "{\"version\": ").unwrap();
        let err = TextTokenizer::from_dir(tmp.path()).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("cannot load tokenizer"),
            "{err}"
        );
        std::fs::remove_file(tmp.path().join(TOKENIZER_FILE)).unwrap();
        let err = TextTokenizer::from_dir(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        let tmp = scratch_copy("tiny-qwen2");
        std::fs::write(tmp.path().join(TOKENIZER_CONFIG_FILE), "{\"chat_template\": 3}").unwrap();
        let err = TextTokenizer::from_dir(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("chat_template must be a string or a list"), "{err}");
    }

    /// tiny-qwen2's tokenizer.json with `edit` applied, in a scratch model directory.
    fn hostile_tokenizer(edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
        let tmp = scratch_copy("tiny-qwen2");
        let path = tmp.path().join(TOKENIZER_FILE);
        let mut json: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        edit(&mut json);
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        tmp
    }

    fn load_err(dir: &Path) -> String {
        TextTokenizer::from_dir(dir).unwrap_err().to_string()
    }

    #[test]
    fn tokenizer_sizes_over_the_limits_are_refused_before_loading() {
        // An id near u32::MAX would size token_map's id table at 100 GB.
        let tmp = hostile_tokenizer(|j| {
            j["model"]["vocab"]["evil"] = serde_json::json!(4_000_000_000u64);
        });
        let err = load_err(tmp.path());
        assert!(
            err.contains(
                "tokenizer.json: cannot load tokenizer: token id 4000000000 is over the limit of 2097151"
            ),
            "{err}"
        );
        let tmp = hostile_tokenizer(|j| {
            j["added_tokens"][0]["content"] = Value::String("x".repeat(MAX_TOKEN_BYTES + 1));
        });
        let err = load_err(tmp.path());
        assert!(
            err.contains("a token of 65537 bytes is over the 65536-byte limit"),
            "{err}"
        );
        let tmp = hostile_tokenizer(|j| {
            let token = serde_json::json!({"id": 0, "content": "a", "special": true});
            j["added_tokens"] = Value::Array(vec![token; MAX_ADDED_TOKENS + 1]);
        });
        let err = load_err(tmp.path());
        assert!(
            err.contains("added_tokens has more than 262144 entries, the limit"),
            "{err}"
        );
    }

    #[test]
    fn deep_nesting_and_oversized_files_are_refused() {
        let tmp = scratch_copy("tiny-qwen2");
        let path = tmp.path().join(TOKENIZER_FILE);
        // serde_json stops at 128 levels; a dependency enabling its `unbounded_depth` would
        // turn this into a stack overflow.
        let deep = format!(
            "{{\"model\": {{\"x\": {}{}}}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        std::fs::write(&path, deep).unwrap();
        let err = load_err(tmp.path());
        assert!(
            err.contains("tokenizer.json") && err.contains("recursion limit exceeded"),
            "{err}"
        );
        // Sparse: the size is refused before a byte is read.
        std::fs::File::create(&path)
            .unwrap()
            .set_len(MAX_TOKENIZER_BYTES + 1)
            .unwrap();
        let err = load_err(tmp.path());
        assert!(
            err.contains("tokenizer.json: 268435457 bytes, over the 268435456-byte limit"),
            "{err}"
        );
        let tmp = scratch_copy("tiny-qwen2");
        std::fs::write(tmp.path().join(TEMPLATE_FILE), "x".repeat(MAX_TEMPLATE_BYTES + 1)).unwrap();
        let err = load_err(tmp.path());
        assert!(
            err.contains("chat_template.jinja: 1048577 bytes, over the 1048576-byte limit"),
            "{err}"
        );
    }
}
