//! Mapping API tokens onto the tiny byte-level BPE fixture vocabulary (tests/fixtures/tokenizer,
//! trained on GSM8K questions: 256 byte tokens, a few merges, Qwen-style specials).

use distill_core::{TokenLogprob, TopLogprob};

use super::*;
use crate::test_util::fixtures;

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_dir(&fixtures().join("tiny-qwen2")).unwrap()
}

/// A returned token: `token` as a server writes it, `bytes` as given (or not).
fn api(token: &str, bytes: Option<&[u8]>, logprob: f32, top: Vec<TopLogprob>) -> TokenLogprob {
    TokenLogprob {
        token: token.into(),
        bytes: bytes.map(<[u8]>::to_vec),
        logprob,
        top_logprobs: top,
    }
}

fn alt(token: &str, bytes: &[u8], logprob: f32) -> TopLogprob {
    TopLogprob {
        token: token.into(),
        bytes: Some(bytes.to_vec()),
        logprob,
    }
}

/// What an OpenAI-style server returns when the teacher shares the student's vocabulary and
/// samples `text`'s canonical tokenization: the true bytes, the lossy string, and a top-2 of
/// the sampled token and its neighbour id.
fn served(map: &TokenMap, tok: &TextTokenizer, text: &str) -> (Vec<u32>, Vec<TokenLogprob>) {
    let ids = tok.encode(text, false).unwrap();
    let tokens = ids
        .iter()
        .map(|&id| {
            let b = map.bytes_of(id).unwrap();
            let other = map.bytes_of(id % 300 + 3).unwrap();
            let s = String::from_utf8_lossy(b);
            api(
                &s,
                Some(b),
                -0.1,
                vec![
                    alt(&s, b, -0.1),
                    alt(&String::from_utf8_lossy(other), other, -2.5),
                ],
            )
        })
        .collect();
    (ids, tokens)
}

#[test]
fn the_gpt2_byte_table_is_the_one_vocabularies_use() {
    let t = byte_to_char();
    assert_eq!(t[b' ' as usize], 'Ġ');
    assert_eq!(t[b'\n' as usize], 'Ċ');
    assert_eq!(t[b'a' as usize], 'a');
    assert_eq!(t[0xC3], 'Ã');
    assert_eq!(t[0xAD], '\u{143}'); // the last of the 68 moved bytes
    let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
    assert_eq!(distinct.len(), 256);
}

#[test]
fn canonical_responses_with_leading_spaces_map_exactly() {
    let tok = tokenizer();
    let map = TokenMap::new(&tok).unwrap();
    let text = "Natalia sold clips to 48 of her friends in April.\n\nThe answer is 72.";
    let (ids, tokens) = served(&map, &tok, text);
    assert!(
        tokens
            .iter()
            .any(|t| t.token.starts_with(' ') && t.token.len() > 1),
        "the fixture should have a word token with its leading space"
    );
    let m = map_sample(&map, &tok, &tokens, 3).unwrap();
    assert_eq!(m.ids, ids);
    assert_eq!(m.stats.mismatch_rate(), 0.0);
    assert_eq!(
        (m.stats.tokens, m.stats.unmapped, m.stats.misaligned),
        (ids.len() as u64, 0, 0)
    );
    for (j, &id) in ids.iter().enumerate() {
        let row = &m.top_ids[j * 3..j * 3 + 3];
        assert_eq!(row[0], id, "the sampled token is the most likely alternative");
        assert_eq!(row[2], PAD_ID, "two alternatives, k = 3: one pad");
        assert_eq!(m.top_logprobs[j * 3 + 2], f32::NEG_INFINITY);
        assert!((m.top_logprobs[j * 3 + 1] + 2.5).abs() < 1e-6);
    }
    // A token given only as its string maps the same way as its bytes.
    let space_word = tokens
        .iter()
        .find(|t| t.token.starts_with(' ') && t.token.len() > 1)
        .unwrap();
    assert_eq!(
        map.resolve(&token_ref(&space_word.token, None)),
        map.resolve(&token_ref(&space_word.token, space_word.bytes.as_deref()))
    );
}

#[test]
fn a_character_split_across_two_tokens_maps_through_its_bytes() {
    let tok = tokenizer();
    let map = TokenMap::new(&tok).unwrap();
    // é is C3 A9; the fixture vocabulary has no merge for it, so it is two byte tokens.
    let text = "Café owner";
    let ids = tok.encode(text, false).unwrap();
    let (c3, a9) = (
        map.id_of_bytes(&[0xC3]).unwrap(),
        map.id_of_bytes(&[0xA9]).unwrap(),
    );
    assert!(ids.windows(2).any(|w| w == [c3, a9]), "{ids:?}");
    // The server writes each half as U+FFFD but sends the true bytes.
    let tokens: Vec<TokenLogprob> = ids
        .iter()
        .map(|&id| {
            let b = map.bytes_of(id).unwrap();
            api(
                &String::from_utf8_lossy(b),
                Some(b),
                -0.2,
                vec![alt("x", b, -0.2)],
            )
        })
        .collect();
    assert!(tokens.iter().filter(|t| t.token == "\u{FFFD}").count() == 2);
    let m = map_sample(&map, &tok, &tokens, 2).unwrap();
    assert_eq!(m.ids, ids);
    assert_eq!(m.stats.mismatch_rate(), 0.0);

    // Without bytes (vLLM's form) each half is the string U+FFFD: the text is lost there.
    let lossy: Vec<TokenLogprob> = tokens
        .iter()
        .map(|t| api(&t.token, t.token.as_bytes().into(), t.logprob, vec![]))
        .collect();
    let m = map_sample(&map, &tok, &lossy, 2).unwrap();
    assert!(m.stats.unmapped + m.stats.misaligned >= 2, "{:?}", m.stats);
    assert_ne!(m.ids, ids);
}

#[test]
fn token_id_forms_map_by_id_even_with_vllm_bytes() {
    let tok = tokenizer();
    let map = TokenMap::new(&tok).unwrap();
    let text = "She has 3 apples.";
    let ids = tok.encode(text, false).unwrap();
    let tokens: Vec<TokenLogprob> = ids
        .iter()
        .map(|id| {
            let s = format!("token_id:{id}");
            // vLLM sends the bytes of the placeholder string.
            let alt_s = format!("token_id:{}", id + 1);
            api(
                &s,
                Some(s.as_bytes()),
                -0.3,
                vec![alt(&alt_s, alt_s.as_bytes(), -1.0)],
            )
        })
        .collect();
    let m = map_sample(&map, &tok, &tokens, 1).unwrap();
    assert_eq!(m.ids, ids);
    assert_eq!(m.stats.mismatch_rate(), 0.0);
    let firsts: Vec<u32> = (0..ids.len()).map(|j| m.top_ids[j]).collect();
    assert_eq!(firsts, ids.iter().map(|i| i + 1).collect::<Vec<_>>());
    // An id past the vocabulary does not map.
    assert_eq!(map.resolve(&token_ref("token_id:999999", None)), None);
}

#[test]
fn unknown_and_non_canonical_tokens_are_counted_and_left_without_labels() {
    let tok = tokenizer();
    let map = TokenMap::new(&tok).unwrap();
    // A teacher token the student has no single id for: " marbles" as one piece.
    assert_eq!(map.id_of_bytes(b" marbles"), None, "fixture has no such merge");
    let (_, mut tokens) = served(&map, &tok, "Tom has 12");
    tokens.push(api(" marbles", Some(b" marbles"), -0.5, vec![]));
    let pieces = tok.encode(" marbles", false).unwrap();
    assert!(pieces.len() > 1);
    let m = map_sample(&map, &tok, &tokens, 2).unwrap();
    assert_eq!((m.stats.unmapped, m.stats.misaligned), (1, 0));
    assert_eq!(m.ids, tok.encode("Tom has 12 marbles", false).unwrap());
    assert_eq!(&m.ids[m.ids.len() - pieces.len()..], &pieces[..]);
    for j in m.ids.len() - pieces.len()..m.ids.len() {
        assert_eq!(
            &m.top_ids[j * 2..j * 2 + 2],
            &[PAD_ID, PAD_ID],
            "no soft label where nothing lines up"
        );
    }
    assert!((m.stats.mismatch_rate() - 1.0 / m.stats.tokens as f64).abs() < 1e-12);

    // A non-canonical split: the teacher sampled a merged word byte by byte. Every byte maps
    // (byte-level vocabularies hold all 256) but the student re-merges them: none lines up.
    let (ids, _) = served(&map, &tok, "She sold the clips");
    let merged = *ids
        .iter()
        .find(|&&id| map.bytes_of(id).unwrap().len() >= 3)
        .unwrap();
    let word = map.bytes_of(merged).unwrap().to_vec();
    let tokens: Vec<TokenLogprob> = word
        .iter()
        .map(|b| api(&String::from_utf8_lossy(&[*b]), Some(&[*b]), -0.4, vec![]))
        .collect();
    let m = map_sample(&map, &tok, &tokens, 2).unwrap();
    assert_eq!(m.ids, [merged]);
    assert_eq!((m.stats.unmapped, m.stats.misaligned), (0, word.len() as u64));
    assert_eq!(m.stats.mismatch_rate(), 1.0);
    assert_eq!(m.top_ids, [PAD_ID, PAD_ID]);
}

#[test]
fn empty_tokens_and_alternatives_are_handled() {
    let tok = tokenizer();
    let map = TokenMap::new(&tok).unwrap();
    let a = map.bytes_of(tok.encode("a", false).unwrap()[0]).unwrap().to_vec();
    let b = map.bytes_of(tok.encode("b", false).unwrap()[0]).unwrap().to_vec();
    let tokens = vec![
        api(
            "a",
            Some(&a),
            -0.1,
            vec![
                // Out of order, an unknown one, a duplicate by bytes: sorted, dropped, deduped.
                alt("b", &b, -3.0),
                alt("zzzz-not-a-token", b"zzzz-not-a-token", -1.0),
                alt("a", &a, -0.1),
                alt("a", &a, -0.2),
            ],
        ),
        // An end-of-sequence token rendered as "" (skip_special_tokens).
        api("", Some(&[]), -0.01, vec![]),
    ];
    let m = map_sample(&map, &tok, &tokens, 4).unwrap();
    assert_eq!(m.ids.len(), 1);
    assert_eq!((m.stats.tokens, m.stats.empty), (1, 1));
    assert_eq!((m.stats.alternatives, m.stats.unmapped_alternatives), (4, 1));
    let (ia, ib) = (map.id_of_bytes(&a).unwrap(), map.id_of_bytes(&b).unwrap());
    assert_eq!(m.top_ids, [ia, ib, PAD_ID, PAD_ID]);
    assert_eq!(m.top_logprobs[..2], [-0.1, -3.0]);
    // Specials map by their content.
    assert_eq!(map.id_of_bytes(b"<|im_end|>"), Some(2));
}

#[test]
fn vocabularies_without_byte_level_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
        "model":{"type":"WordLevel","vocab":{"a":0,"[UNK]":1},"unk_token":"[UNK]"}}"#;
    std::fs::write(tmp.path().join("tokenizer.json"), json).unwrap();
    let tok = TextTokenizer::from_dir(tmp.path()).unwrap();
    let err = TokenMap::new(&tok).unwrap_err().to_string();
    assert!(err.contains("byte-level") && err.contains("HINT"), "{err}");
}
