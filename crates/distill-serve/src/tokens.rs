//! What one token is, as logprobs responses show it: its raw bytes and their text.
//!
//! In a byte-level BPE vocabulary (GPT-2, Qwen, Llama 3) a multi-byte character split over
//! two tokens leaves each with part of its UTF-8 bytes. OpenAI reports those partial bytes in
//! `bytes`, so a client can join tokens back into text exactly (our gen-data client's
//! `token_map` relies on it); the token's text shows a partial character as U+FFFD.

use distill_hf::token_map::TokenMap;
use distill_hf::tokenizer::TextTokenizer;

/// The raw bytes of every token id of a tokenizer.
#[derive(Debug, Clone)]
pub struct Vocab {
    bytes: Vec<Vec<u8>>,
}

impl Vocab {
    /// Byte-level vocabularies through distill-models' [`TokenMap`]; others (SentencePiece)
    /// by decoding each token alone, which is the best they offer.
    pub fn new(tokenizer: &TextTokenizer) -> Vocab {
        let ids = 0..tokenizer.vocab_size() as u32;
        let bytes = match TokenMap::new(tokenizer) {
            Ok(map) => ids
                .map(|id| map.bytes_of(id).unwrap_or_default().to_vec())
                .collect(),
            Err(_) => ids
                .map(|id| tokenizer.decode(&[id], false).unwrap_or_default().into_bytes())
                .collect(),
        };
        Vocab { bytes }
    }

    /// A vocabulary of the given token bytes, id = position.
    pub fn from_bytes(bytes: Vec<Vec<u8>>) -> Vocab {
        Vocab { bytes }
    }

    /// The token's raw bytes; empty for ids past the tokenizer (a model's padding rows).
    pub fn bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// The token's text: its bytes as UTF-8, a partial character as U+FFFD (as decoding it
    /// alone gives).
    pub fn text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.bytes(id)).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> TextTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-qwen2");
        TextTokenizer::from_dir(&dir).unwrap()
    }

    #[test]
    fn token_bytes_join_into_the_text_and_token_texts_are_single_decodes() {
        let tok = fixture();
        let vocab = Vocab::new(&tok);
        let text = "Natalia sold clips to 48 of her friends in April.\nThen 24 more! <|im_end|>";
        let ids = tok.encode(text, false).unwrap();
        let joined: Vec<u8> = ids.iter().flat_map(|&i| vocab.bytes(i).to_vec()).collect();
        assert_eq!(String::from_utf8(joined).unwrap(), text);
        for &id in &ids {
            assert_eq!(vocab.text(id), tok.decode(&[id], false).unwrap(), "token {id}");
        }
        assert_eq!(vocab.bytes(2), b"<|im_end|>", "added tokens are their content");
        assert_eq!(vocab.bytes(u32::MAX), b"", "past the tokenizer");
    }

    #[test]
    fn a_character_split_over_tokens_gives_partial_bytes() {
        let tok = fixture();
        let vocab = Vocab::new(&tok);
        // The fixture has no merge for "é" (C3 A9): two byte tokens.
        let ids = tok.encode("é", false).unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(vocab.bytes(ids[0]), [0xc3]);
        assert_eq!(vocab.bytes(ids[1]), [0xa9]);
        assert_eq!(vocab.text(ids[0]), "\u{fffd}");
    }
}
