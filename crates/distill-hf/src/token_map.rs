//! Teacher tokens, as OpenAI-compatible servers return them in `logprobs.content[]`, mapped to
//! a student's token ids (byte-level BPE vocabularies: Qwen2, Llama 3, SmolLM2, GPT-2).
//!
//! A returned token names its text three ways, tried in this order:
//! 1. `token_id:N` (vLLM's `--return-tokens-as-token-ids`): id N. vLLM also sends `bytes`
//!    then, but they are the bytes of the string "token_id:N", so the id form comes first.
//!    N is the teacher's id, right only when teacher and student share the vocabulary; the
//!    re-tokenization check below catches it when they do not.
//! 2. `bytes` (a list of ints): the token's UTF-8 bytes. OpenAI, llama.cpp and Ollama send the
//!    true bytes, so a character split across tokens maps exactly; vLLM and SGLang send the
//!    bytes of the decoded string, where a split character is already U+FFFD.
//! 3. Otherwise the token string's UTF-8 bytes.
//!
//! Bytes map to a vocabulary entry through GPT-2's bytes_to_unicode table (the form
//! byte-level BPE vocabularies store tokens in); added tokens (`<|im_end|>`) are matched on
//! their content.
//!
//! The check: the bytes of the sampled tokens are concatenated and re-tokenized with the
//! student's tokenizer (no special tokens added). The stored ids are that re-tokenization
//! (what the student reads when trained on the same text), and a position carries the
//! teacher's top-k only where a teacher token covers exactly the same bytes with the same id.
//! Every other position is all padding (no soft label there). Teacher tokens that do not map
//! to an id, or map but do not line up, count as mismatches.

use std::borrow::Cow;
use std::collections::HashMap;

use distill_core::TokenLogprob;

use crate::error::{ModelError, Result};
use crate::tokenizer::{TOKENIZER_FILE, TextTokenizer};

/// The padding id of a missing alternative (the soft-label store's `PAD_ID`).
pub const PAD_ID: u32 = u32::MAX;

/// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68
/// bytes for U+0100 onwards, in byte order.
fn byte_to_char() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        table[b as usize] = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("U+0100..U+0143 are chars");
            next += 1;
            c
        };
    }
    table
}

/// A student vocabulary indexed by token bytes.
#[derive(Debug, Clone)]
pub struct TokenMap {
    by_bytes: HashMap<Vec<u8>, u32>,
    /// id -> bytes; None for ids the vocabulary skips.
    bytes_of: Vec<Option<Vec<u8>>>,
}

/// How a returned token names its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRef<'a> {
    Id(u32),
    Bytes(Cow<'a, [u8]>),
}

/// Reads a returned token (see the module docs for the order).
pub fn token_ref<'a>(token: &'a str, bytes: Option<&'a [u8]>) -> TokenRef<'a> {
    if let Some(id) = token.strip_prefix("token_id:").and_then(|n| n.parse().ok()) {
        return TokenRef::Id(id);
    }
    match bytes {
        Some(b) => TokenRef::Bytes(Cow::Borrowed(b)),
        None => TokenRef::Bytes(Cow::Borrowed(token.as_bytes())),
    }
}

impl TokenMap {
    /// Indexes `tok`'s vocabulary; refuses vocabularies that are not byte-level BPE
    /// (SentencePiece `▁`/`<0xNN>` vocabularies such as Llama 2's).
    pub fn new(tok: &TextTokenizer) -> Result<TokenMap> {
        let raw = tok.raw();
        if !is_byte_level(raw) {
            return Err(ModelError::invalid(
                TOKENIZER_FILE,
                "soft labels from API logprobs need a byte-level BPE vocabulary (Qwen2, Llama 3, GPT-2 style: a ByteLevel decoder); this tokenizer has none (SentencePiece-style vocabularies are not supported); HINT: re-score locally with a teacher that shares the student's tokenizer",
            ));
        }
        let unicode_to_byte: HashMap<char, u8> = byte_to_char()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let added: HashMap<u32, String> = raw
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, t.content))
            .collect();
        let vocab = raw.get_vocab(true);
        let max_id = vocab.values().copied().max().map_or(0, |m| m as usize + 1);
        let mut bytes_of = vec![None; max_id];
        let mut by_bytes = HashMap::with_capacity(vocab.len());
        for (text, &id) in &vocab {
            let bytes = match added.get(&id) {
                Some(content) => Some(content.as_bytes().to_vec()),
                None => text.chars().map(|c| unicode_to_byte.get(&c).copied()).collect(),
            };
            let Some(bytes) = bytes else { continue };
            // An added token wins over an ordinary one with the same bytes: the tokenizer
            // matches added tokens first.
            if added.contains_key(&id) || !by_bytes.contains_key(&bytes) {
                by_bytes.insert(bytes.clone(), id);
            }
            bytes_of[id as usize] = Some(bytes);
        }
        Ok(TokenMap { by_bytes, bytes_of })
    }

    pub fn id_of_bytes(&self, bytes: &[u8]) -> Option<u32> {
        self.by_bytes.get(bytes).copied()
    }

    pub fn bytes_of(&self, id: u32) -> Option<&[u8]> {
        self.bytes_of.get(id as usize)?.as_deref()
    }

    /// The student id of a returned token, and its bytes.
    pub fn resolve(&self, r: &TokenRef) -> Option<(u32, Vec<u8>)> {
        match r {
            TokenRef::Id(id) => self.bytes_of(*id).map(|b| (*id, b.to_vec())),
            TokenRef::Bytes(b) => self.id_of_bytes(b).map(|id| (id, b.to_vec())),
        }
    }
}

/// A ByteLevel decoder (alone or in a sequence) marks a byte-level BPE vocabulary.
fn is_byte_level(raw: &tokenizers::Tokenizer) -> bool {
    fn has_byte_level(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(m) => {
                m.get("type").and_then(|t| t.as_str()) == Some("ByteLevel") || m.values().any(has_byte_level)
            }
            serde_json::Value::Array(a) => a.iter().any(has_byte_level),
            _ => false,
        }
    }
    raw.get_decoder()
        .and_then(|d| serde_json::to_value(d).ok())
        .is_some_and(|v| has_byte_level(&v))
}

/// Counts over the teacher tokens of one or more samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MappingStats {
    pub samples: u64,
    /// Teacher tokens with text (the denominator of the mismatch rate).
    pub tokens: u64,
    /// Teacher tokens with no bytes at all (an end-of-sequence token a server renders as
    /// ""): not stored, not counted as mismatches.
    pub empty: u64,
    /// Sampled tokens with no student id.
    pub unmapped: u64,
    /// Sampled tokens with a student id whose bytes the student's re-tokenization splits or
    /// merges differently (no soft label there).
    pub misaligned: u64,
    /// Top-k alternatives seen, and those with no student id (dropped: their mass is missing).
    pub alternatives: u64,
    pub unmapped_alternatives: u64,
}

impl MappingStats {
    /// Share of teacher tokens that do not carry over: (unmapped + misaligned) / tokens.
    pub fn mismatch_rate(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            (self.unmapped + self.misaligned) as f64 / self.tokens as f64
        }
    }

    pub fn add(&mut self, o: &MappingStats) {
        self.samples += o.samples;
        self.tokens += o.tokens;
        self.empty += o.empty;
        self.unmapped += o.unmapped;
        self.misaligned += o.misaligned;
        self.alternatives += o.alternatives;
        self.unmapped_alternatives += o.unmapped_alternatives;
    }
}

/// One sample's soft labels in student ids (the soft-label store's record, before storage).
#[derive(Debug, Clone, PartialEq)]
pub struct MappedLabels {
    /// (T,) the student's tokenization of the generated bytes.
    pub ids: Vec<u32>,
    pub k: usize,
    /// (T, k) most likely first; [`PAD_ID`] pads.
    pub top_ids: Vec<u32>,
    /// (T, k) natural logs; -inf pads.
    pub top_logprobs: Vec<f32>,
    pub stats: MappingStats,
}

/// A teacher token after mapping: where its bytes sit in the response and its student id.
struct Placed<'a> {
    start: usize,
    end: usize,
    id: Option<u32>,
    token: &'a TokenLogprob,
}

/// Maps one response's token logprobs to student ids with the top `k` alternatives per
/// position (see the module docs).
pub fn map_sample(
    map: &TokenMap,
    tok: &TextTokenizer,
    tokens: &[TokenLogprob],
    k: usize,
) -> Result<MappedLabels> {
    let mut stats = MappingStats {
        samples: 1,
        ..MappingStats::default()
    };
    // Teacher tokens laid out over the response's bytes.
    let mut bytes = Vec::new();
    let mut placed = Vec::with_capacity(tokens.len());
    for t in tokens {
        let r = token_ref(&t.token, t.bytes.as_deref());
        let (id, own) = match map.resolve(&r) {
            Some((id, b)) => (Some(id), b),
            None => match r {
                TokenRef::Bytes(b) => (None, b.into_owned()),
                // An id outside the student's vocabulary: its text is unknown.
                TokenRef::Id(_) => (None, Vec::new()),
            },
        };
        if own.is_empty() {
            stats.empty += 1;
            continue;
        }
        stats.tokens += 1;
        stats.unmapped += u64::from(id.is_none());
        let start = bytes.len();
        bytes.extend_from_slice(&own);
        placed.push(Placed {
            start,
            end: bytes.len(),
            id,
            token: t,
        });
    }
    // A response cut off mid-character is not UTF-8: its tail re-tokenizes as U+FFFD and does
    // not line up, which the counts show.
    let text = String::from_utf8_lossy(&bytes);
    let ids = tok.encode(&text, false)?;

    let mut top_ids = vec![PAD_ID; ids.len() * k];
    let mut top_logprobs = vec![f32::NEG_INFINITY; ids.len() * k];
    let (mut i, mut start) = (0usize, 0usize);
    let mut aligned = 0u64;
    for (j, &sid) in ids.iter().enumerate() {
        let end = start + map.bytes_of(sid).map_or(0, <[u8]>::len);
        while i < placed.len() && placed[i].start < start {
            i += 1;
        }
        if let Some(p) = placed.get(i)
            && p.start == start
            && p.end == end
            && p.id == Some(sid)
        {
            aligned += 1;
            let row = j * k..(j + 1) * k;
            fill_alternatives(
                map,
                p.token,
                &mut top_ids[row.clone()],
                &mut top_logprobs[row],
                &mut stats,
            );
            i += 1;
        }
        start = end;
    }
    stats.misaligned = stats.tokens - stats.unmapped - aligned;
    Ok(MappedLabels {
        ids,
        k,
        top_ids,
        top_logprobs,
        stats,
    })
}

/// The mapped alternatives of one position, most likely first, each id once, up to k.
fn fill_alternatives(
    map: &TokenMap,
    t: &TokenLogprob,
    ids: &mut [u32],
    lps: &mut [f32],
    stats: &mut MappingStats,
) {
    let mut alts: Vec<_> = t.top_logprobs.iter().collect();
    alts.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
    let mut n = 0;
    for a in alts {
        stats.alternatives += 1;
        let Some((id, _)) = map.resolve(&token_ref(&a.token, a.bytes.as_deref())) else {
            stats.unmapped_alternatives += 1;
            continue;
        };
        if n == ids.len() || ids[..n].contains(&id) {
            continue;
        }
        ids[n] = id;
        lps[n] = a.logprob;
        n += 1;
    }
}

#[cfg(test)]
mod tests;
