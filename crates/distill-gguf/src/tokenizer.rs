//! Tokenizers both ways: GGUF's `tokenizer.ggml.*` metadata to Hugging Face `tokenizer.json`
//! (+ `tokenizer_config.json` with the chat template), and back.
//!
//! GGUF stores the vocabulary, merges, token types and special ids, plus `tokenizer.ggml.pre`,
//! a name for the pre-tokenizer llama.cpp applies before BPE. [`PRE_TOKENIZERS`] maps each name
//! we support to the HF pre-tokenizer that splits text the same way (llama.cpp's regexes in
//! llama-vocab.cpp, in their original HF spelling).

use std::collections::HashMap;

use serde_json::{Value as Json, json};

/// llama.cpp token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEEPSEEK3_SPLITS: [&str; 3] = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];

/// One pre-tokenizer family: the `tokenizer.ggml.pre` names llama.cpp gives it (the first is
/// what we write), and how HF spells it.
pub struct PreTokenizer {
    pub names: &'static [&'static str],
    splits: &'static [&'static str],
    /// GPT-2's own regex inside ByteLevel (no explicit Split).
    byte_level_regex: bool,
    individual_digits: bool,
    nfc: bool,
    /// Llama 3's BPE takes whole words found in the vocabulary before merging.
    ignore_merges: bool,
}

pub const PRE_TOKENIZERS: &[PreTokenizer] = &[
    PreTokenizer {
        names: &["gpt-2", "default", "gpt2", "phi-2"],
        splits: &[],
        byte_level_regex: true,
        individual_digits: false,
        nfc: false,
        ignore_merges: false,
    },
    PreTokenizer {
        // llama.cpp: "\p{N}" then GPT-2's regex, as SmolLM's Digits + ByteLevel.
        names: &["smollm", "starcoder", "refact"],
        splits: &[],
        byte_level_regex: true,
        individual_digits: true,
        nfc: false,
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe"],
        splits: &[LLAMA3_SPLIT],
        byte_level_regex: false,
        individual_digits: false,
        nfc: false,
        ignore_merges: true,
    },
    PreTokenizer {
        names: &["qwen2", "deepseek-r1-qwen"],
        splits: &[QWEN2_SPLIT],
        byte_level_regex: false,
        individual_digits: false,
        nfc: true,
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["deepseek-v3"],
        splits: &DEEPSEEK3_SPLITS,
        byte_level_regex: false,
        individual_digits: false,
        nfc: false,
        ignore_merges: false,
    },
];

impl PreTokenizer {
    pub fn by_name(name: &str) -> Option<&'static PreTokenizer> {
        PRE_TOKENIZERS.iter().find(|p| p.names.contains(&name))
    }

    pub fn supported_names() -> String {
        PRE_TOKENIZERS
            .iter()
            .flat_map(|p| p.names.iter().copied())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The HF `pre_tokenizer` object.
    pub fn to_json(&self) -> Json {
        let byte_level = json!({
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
            "use_regex": self.byte_level_regex,
        });
        let mut parts: Vec<Json> = Vec::new();
        if self.individual_digits {
            parts.push(json!({"type": "Digits", "individual_digits": true}));
        }
        for split in self.splits {
            parts.push(json!({
                "type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": false,
            }));
        }
        if parts.is_empty() {
            return byte_level;
        }
        parts.push(byte_level);
        json!({"type": "Sequence", "pretokenizers": parts})
    }

    pub fn normalizer(&self) -> Json {
        if self.nfc {
            json!({"type": "NFC"})
        } else {
            Json::Null
        }
    }

    /// What decides how a pre-tokenizer splits text: types, regexes, digit and byte-level flags
    /// (offset-tracking flags such as trim_offsets do not change tokens).
    fn signature(pre: &Json) -> Vec<String> {
        let items: Vec<&Json> = match pre.get("type").and_then(Json::as_str) {
            Some("Sequence") => pre["pretokenizers"]
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default(),
            _ => vec![pre],
        };
        items
            .into_iter()
            .map(|p| match p.get("type").and_then(Json::as_str).unwrap_or("?") {
                "ByteLevel" => format!("ByteLevel(regex={})", p["use_regex"].as_bool().unwrap_or(true)),
                "Digits" => format!("Digits({})", p["individual_digits"].as_bool().unwrap_or(false)),
                "Split" => format!(
                    "Split({},{},{})",
                    p["pattern"]["Regex"]
                        .as_str()
                        .or(p["pattern"]["String"].as_str())
                        .unwrap_or("?"),
                    p["behavior"].as_str().unwrap_or("?"),
                    p["invert"].as_bool().unwrap_or(false)
                ),
                other => other.to_string(),
            })
            .collect()
    }

    /// The family whose HF form splits text as `pre` (a tokenizer.json `pre_tokenizer`) does.
    pub fn matching(pre: &Json) -> Option<&'static PreTokenizer> {
        let want = Self::signature(pre);
        PRE_TOKENIZERS
            .iter()
            .find(|p| Self::signature(&p.to_json()) == want)
    }
}

/// The tokenizer metadata of a GGUF file, read by [`crate::import`].
pub struct GgufVocab<'a> {
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE) or "llama" (SentencePiece).
    pub model: &'a str,
    pub pre: Option<&'a str>,
    pub tokens: Vec<&'a str>,
    pub token_types: Vec<i32>,
    pub scores: Vec<f32>,
    pub merges: Vec<&'a str>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    pub chat_template: Option<&'a str>,
}

/// Split "a b" as llama.cpp does: at the first space after the first character.
fn split_merge(merge: &str) -> Option<(&str, &str)> {
    let first = merge.chars().next()?.len_utf8();
    let at = merge[first..].find(' ')? + first;
    Some((&merge[..at], &merge[at + 1..]))
}

impl GgufVocab<'_> {
    fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize).copied())
    }

    fn kind(&self, id: usize) -> i32 {
        self.token_types.get(id).copied().unwrap_or(token_type::NORMAL)
    }

    /// `tokenizer.json`, or an error message (the caller names the file and key).
    pub fn tokenizer_json(&self) -> Result<Json, String> {
        let added = self.added_tokens();
        let (model, normalizer, pre_tokenizer, decoder) = match self.model {
            "gpt2" => self.byte_level_parts()?,
            "llama" => self.sentencepiece_parts(),
            other => {
                return Err(format!(
                    "tokenizer.ggml.model `{other}` is not supported (supported: gpt2, llama)"
                ));
            }
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": self.post_processor(),
            "decoder": decoder,
            "model": model,
        }))
    }

    /// CONTROL tokens are special added tokens, USER_DEFINED ones plain added tokens (as
    /// llama.cpp matches both whole in text); for SentencePiece also the unknown token.
    fn added_tokens(&self) -> Vec<Json> {
        (0..self.tokens.len())
            .filter_map(|id| {
                let special = match self.kind(id) {
                    token_type::CONTROL | token_type::UNKNOWN => true,
                    token_type::USER_DEFINED => false,
                    _ => return None,
                };
                Some(json!({
                    "id": id, "content": self.tokens[id], "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special,
                }))
            })
            .collect()
    }

    fn vocab_map(&self) -> serde_json::Map<String, Json> {
        let mut vocab = serde_json::Map::new();
        for (id, token) in self.tokens.iter().enumerate() {
            // A repeated spelling (some files pad with duplicates) keeps its first id.
            vocab.entry(token.to_string()).or_insert(json!(id));
        }
        vocab
    }

    fn byte_level_parts(&self) -> Result<(Json, Json, Json, Json), String> {
        let pre_name = self.pre.unwrap_or("default");
        let pre = PreTokenizer::by_name(pre_name).ok_or_else(|| {
            format!(
                "tokenizer.ggml.pre `{pre_name}` is not supported (supported: {}); its split rules are unknown, so text would tokenize differently than in llama.cpp",
                PreTokenizer::supported_names()
            )
        })?;
        let merges = self
            .merges
            .iter()
            .map(|m| {
                split_merge(m)
                    .map(|(a, b)| json!([a, b]))
                    .ok_or_else(|| format!("tokenizer.ggml.merges holds `{m}`, which is not two tokens"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let model = json!({
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": pre.ignore_merges, "vocab": self.vocab_map(), "merges": merges,
        });
        let decoder =
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
        Ok((model, pre.normalizer(), pre.to_json(), decoder))
    }

    /// SentencePiece BPE as transformers' LlamaTokenizerFast spells it: byte fallback, "▁" for
    /// spaces, merges recovered from the scores (transformers' `generate_merges`).
    fn sentencepiece_parts(&self) -> (Json, Json, Json, Json) {
        let mut normalizers = Vec::new();
        if self.add_space_prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
        }
        normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
        let model = json!({
            "type": "BPE", "dropout": null, "unk_token": self.token(self.unk),
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": self.vocab_map(),
            "merges": self.sentencepiece_merges(),
        });
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if self.add_space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        (
            model,
            json!({"type": "Sequence", "normalizers": normalizers}),
            Json::Null,
            json!({"type": "Sequence", "decoders": decoders}),
        )
    }

    /// Every split of every scored token into two vocabulary tokens, best score first; ties
    /// by shorter left part, then shorter right part, then vocabulary order.
    fn sentencepiece_merges(&self) -> Vec<Json> {
        let mut ids: HashMap<&str, usize> = HashMap::new();
        for (id, t) in self.tokens.iter().enumerate() {
            ids.entry(t).or_insert(id);
        }
        let mut merges: Vec<(&str, &str, f32)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (id, token) in self.tokens.iter().enumerate() {
            if !seen.insert(*token) {
                continue;
            }
            let score = self.scores.get(id).copied().unwrap_or(0.0);
            let mut local: Vec<(&str, &str, f32)> = token
                .char_indices()
                .skip(1)
                .map(|(at, _)| (&token[..at], &token[at..], score))
                .filter(|(l, r, _)| ids.contains_key(l) && ids.contains_key(r))
                .collect();
            local.sort_by_key(|(l, r, _)| (ids[l], ids[r]));
            merges.extend(local);
        }
        merges.sort_by(|a, b| {
            let key = |m: &(&str, &str, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
            let (ka, kb) = (key(a), key(b));
            kb.0.total_cmp(&ka.0).then(kb.1.cmp(&ka.1)).then(kb.2.cmp(&ka.2))
        });
        merges.into_iter().map(|(l, r, _)| json!([l, r])).collect()
    }

    /// BOS/EOS added by encode(add_special_tokens=True), as llama.cpp adds them.
    fn post_processor(&self) -> Json {
        let bos = self.token(self.bos).filter(|_| self.add_bos);
        let eos = self.token(self.eos).filter(|_| self.add_eos);
        if bos.is_none() && eos.is_none() {
            return if self.model == "gpt2" {
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
            } else {
                Json::Null
            };
        }
        let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
        let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
        // [BOS] A [EOS], and for pairs the same again for B with type id 1.
        let part = |seq: &str, type_id: u32| {
            bos.map(|t| special(t, type_id))
                .into_iter()
                .chain([sequence(seq, type_id)])
                .chain(eos.map(|t| special(t, type_id)))
                .collect::<Vec<_>>()
        };
        let single = part("A", 0);
        let pair: Vec<Json> = single.iter().cloned().chain(part("B", 1)).collect();
        let mut specials = serde_json::Map::new();
        for (t, id) in [(bos, self.bos), (eos, self.eos)] {
            if let (Some(t), Some(id)) = (t, id) {
                specials.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
            }
        }
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    }

    /// `tokenizer_config.json`: special tokens by text, BOS/EOS flags, the chat template.
    pub fn tokenizer_config(&self, model_max_length: Option<u64>) -> Json {
        let mut config = json!({
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "bos_token": self.token(self.bos),
            "eos_token": self.token(self.eos),
            "unk_token": self.token(self.unk),
            "pad_token": self.token(self.pad),
            "clean_up_tokenization_spaces": false,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        if let Some(n) = model_max_length {
            config["model_max_length"] = json!(n);
        }
        if let Some(t) = self.chat_template {
            config["chat_template"] = json!(t);
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_split_like_llama_cpp() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ", "t")));
        assert_eq!(
            split_merge("  x"),
            Some((" ", "x")),
            "a leading space is part of the left token"
        );
        assert_eq!(split_merge("ab"), None);
    }

    #[test]
    fn every_family_is_found_again_from_its_own_json() {
        for pre in PRE_TOKENIZERS {
            let found = PreTokenizer::matching(&pre.to_json()).unwrap();
            assert_eq!(found.names[0], pre.names[0]);
        }
        let plain =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        assert_eq!(PreTokenizer::matching(&plain).unwrap().names[0], "gpt-2");
        let unknown = json!({"type": "Whitespace"});
        assert!(PreTokenizer::matching(&unknown).is_none());
    }
}
