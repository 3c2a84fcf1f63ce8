//! Training data: gen-data samples rendered with the student's chat template (reasoning
//! kept), loss on assistant tokens only, packed into fixed-length rows without leakage
//! between samples, shuffled per epoch from the seed, split by prompt into train / held-out.

use std::path::{Path, PathBuf};

use crate::{Sample, is_held_out};
use distill_hf::tokenizer::TextTokenizer;

/// Label of positions that carry no loss.
pub const IGNORE: i64 = -100;

#[derive(Debug, thiserror::Error)]
pub enum ExampleError {
    #[error(transparent)]
    Dataset(#[from] crate::DataError),
    #[error("{path}: sample {line}: {msg}")]
    Record { path: PathBuf, line: usize, msg: String },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

/// One tokenized sample: ids and next-token labels (IGNORE on prompt tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// labels[i] is the target for position i (= input_ids[i + 1] on completion tokens).
    pub labels: Vec<i64>,
    pub prompt_id: String,
    /// The sample's key (samples-*.jsonl `key`): what soft labels are stored under.
    pub key: String,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DataStats {
    pub records: usize,
    pub train: usize,
    pub held_out: usize,
    pub skipped_truncated_generation: usize,
    pub skipped_incorrect: usize,
    pub skipped_too_long: usize,
    pub truncated_to_seq_len: usize,
    pub train_tokens: usize,
    pub train_loss_tokens: usize,
    /// Torn last lines skipped (a write cut off by a crash), one at most a shard.
    pub torn_lines: Vec<crate::shards::TornLine>,
}

pub struct DataOptions {
    pub seq_len: usize,
    pub held_out: f64,
    pub keep_truncated: bool,
    pub keep_only_correct: bool,
}

/// Reads, renders and tokenizes every sample; returns (train, held_out, stats).
pub fn load_examples(
    dir: &Path,
    tokenizer: &TextTokenizer,
    opts: &DataOptions,
) -> Result<(Vec<Example>, Vec<Example>, DataStats), ExampleError> {
    let (train, held, stats) = split_examples(dir, tokenizer, opts)?;
    if train.is_empty() {
        return Err(ExampleError::Invalid {
            path: dir.to_path_buf(),
            msg: format!("no usable training samples ({stats:?})"),
        });
    }
    Ok((train, held, stats))
}

/// The held-out examples alone (what `distill eval` scores), tokenized exactly as training
/// tokenizes them; `opts.held_out` = 1 takes every sample.
pub fn load_held_out(
    dir: &Path,
    tokenizer: &TextTokenizer,
    opts: &DataOptions,
) -> Result<Vec<Example>, ExampleError> {
    let (_, held, stats) = split_examples(dir, tokenizer, opts)?;
    if held.is_empty() {
        return Err(ExampleError::Invalid {
            path: dir.to_path_buf(),
            msg: format!(
                "no held-out samples at held-out share {} ({stats:?}); HINT: a dataset made for evaluation alone takes --held-out-share 1",
                opts.held_out
            ),
        });
    }
    Ok(held)
}

fn split_examples(
    dir: &Path,
    tokenizer: &TextTokenizer,
    opts: &DataOptions,
) -> Result<(Vec<Example>, Vec<Example>, DataStats), ExampleError> {
    let template = tokenizer.template().map_err(|e| ExampleError::Invalid {
        path: dir.to_path_buf(),
        msg: format!("tokenizer: {e}"),
    })?;
    let (samples, torn_lines) = crate::shards::read_samples_noting_torn(dir)?;
    if samples.is_empty() {
        return Err(ExampleError::Invalid {
            path: dir.to_path_buf(),
            msg: "no samples-*.jsonl records here; run `distill gen-data` first or point [data] dataset at the right directory"
                .into(),
        });
    }
    let mut stats = DataStats {
        records: samples.len(),
        torn_lines,
        ..Default::default()
    };
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for (i, rec) in samples.iter().enumerate() {
        if !rec.keep_for_training(opts.keep_truncated, opts.keep_only_correct) {
            if rec.truncated && !opts.keep_truncated {
                stats.skipped_truncated_generation += 1;
            } else {
                stats.skipped_incorrect += 1;
            }
            continue;
        }
        let Some(ex) = tokenize(rec, tokenizer, template, opts.seq_len, &mut stats).map_err(|msg| {
            ExampleError::Record {
                path: dir.to_path_buf(),
                line: i + 1,
                msg,
            }
        })?
        else {
            continue;
        };
        if is_held_out(&ex.prompt_id, opts.held_out) {
            held.push(ex);
        } else {
            stats.train_tokens += ex.input_ids.len();
            stats.train_loss_tokens += ex.labels.iter().filter(|&&l| l != IGNORE).count();
            train.push(ex);
        }
    }
    stats.train = train.len();
    stats.held_out = held.len();
    Ok((train, held, stats))
}

/// Renders a sample with the student's template (reasoning kept) and tokenizes it; None when
/// its prompt alone fills the sequence.
fn tokenize(
    rec: &Sample,
    tokenizer: &TextTokenizer,
    template: &distill_hf::template::ChatTemplate,
    seq_len: usize,
    stats: &mut DataStats,
) -> Result<Option<Example>, String> {
    let (prompt, completion) = template
        .render_for_training(&rec.messages)
        .map_err(|e| e.to_string())?;
    let p = tokenizer.encode(&prompt, false).map_err(|e| e.to_string())?;
    let c = tokenizer.encode(&completion, false).map_err(|e| e.to_string())?;
    if p.len() + 1 >= seq_len {
        stats.skipped_too_long += 1;
        return Ok(None);
    }
    let mut ex = example(p, c, rec.prompt_id.clone(), rec.key.clone());
    if ex.input_ids.len() > seq_len {
        stats.truncated_to_seq_len += 1;
        ex.input_ids.truncate(seq_len);
        ex.labels.truncate(seq_len);
        *ex.labels.last_mut().expect("seq_len > 0") = IGNORE;
    }
    Ok(Some(ex))
}

/// `prompt` then `completion` as one example: each completion token is the label of the
/// position before it; the prompt carries no loss.
pub fn example(prompt: Vec<u32>, completion: Vec<u32>, prompt_id: String, key: String) -> Example {
    let n_prompt = prompt.len();
    let input_ids: Vec<u32> = prompt.into_iter().chain(completion).collect();
    let labels = (0..input_ids.len())
        .map(|i| match input_ids.get(i + 1) {
            Some(&next) if i + 1 >= n_prompt => i64::from(next),
            _ => IGNORE,
        })
        .collect();
    Example {
        input_ids,
        labels,
        prompt_id,
        key,
    }
}

/// One row of `seq_len` tokens holding one or more examples.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Document index per token; padding gets its own index.
    pub docs: Vec<u32>,
    /// The sample key of each document, by document index (soft labels are found by it).
    pub keys: Vec<String>,
}

/// Packs examples in order into rows of exactly `seq_len` (first fit in sequence), or one
/// example per row when `packing` is off. Padding carries no loss and attends only to itself.
pub fn pack(examples: &[Example], seq_len: usize, packing: bool, pad_id: u32) -> Vec<Row> {
    let mut rows = Vec::new();
    let empty = || Row {
        input_ids: Vec::new(),
        labels: Vec::new(),
        docs: Vec::new(),
        keys: Vec::new(),
    };
    let mut cur = empty();
    let mut doc = 0u32;
    for ex in examples {
        let fits = cur.input_ids.len() + ex.input_ids.len() <= seq_len;
        if !cur.input_ids.is_empty() && (!packing || !fits) {
            rows.push(finish_row(
                std::mem::replace(&mut cur, empty()),
                seq_len,
                pad_id,
                doc,
            ));
            doc = 0;
        }
        cur.input_ids.extend(&ex.input_ids);
        cur.labels.extend(&ex.labels);
        cur.docs.extend(std::iter::repeat_n(doc, ex.input_ids.len()));
        cur.keys.push(ex.key.clone());
        doc += 1;
    }
    if !cur.input_ids.is_empty() {
        rows.push(finish_row(cur, seq_len, pad_id, doc));
    }
    rows
}

fn finish_row(mut row: Row, seq_len: usize, pad_id: u32, pad_doc: u32) -> Row {
    let pad = seq_len - row.input_ids.len();
    row.input_ids.extend(std::iter::repeat_n(pad_id, pad));
    row.labels.extend(std::iter::repeat_n(IGNORE, pad));
    row.docs.extend(std::iter::repeat_n(pad_doc, pad));
    row
}

/// Deterministic shuffle (splitmix64-driven Fisher-Yates) so a resumed run sees the same order.
pub fn shuffled<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
    let mut out = items.to_vec();
    let mut state = seed;
    for i in (1..out.len()).rev() {
        let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
        out.swap(i, j);
    }
    out
}

/// A uniform draw in [0, 1) from a splitmix64 state.
pub fn uniform01(state: &mut u64) -> f64 {
    (splitmix64(state) >> 11) as f64 / (1u64 << 53) as f64
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The packed rows of one epoch: examples shuffled with (seed, epoch), then packed.
pub fn epoch_rows(
    examples: &[Example],
    seed: u64,
    epoch: u64,
    seq_len: usize,
    packing: bool,
    pad_id: u32,
) -> Vec<Row> {
    let order = shuffled(examples, seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    pack(&order, seq_len, packing, pad_id)
}

/// Tokens a record must share with the end of a cut example's labels to align (see [`align`]).
const MIN_CUT_OVERLAP: usize = 8;

/// Where `ids` (a record's response tokens) starts among `labels` (an example's label
/// tokens): the first offset at which they agree over the record's whole length, or, for an
/// example cut at seq_len, over the rest of the labels (at least 8 tokens, or the whole
/// record if shorter, so a chance match of a token or two does not count). None when they
/// do not line up.
pub fn align(labels: &[i64], ids: &[u32]) -> Option<usize> {
    if ids.is_empty() {
        return None;
    }
    let matches = |o: usize| {
        let m = ids.len().min(labels.len() - o);
        let full = m == ids.len();
        let enough = full || m >= ids.len().min(MIN_CUT_OVERLAP);
        enough && m > 0 && labels[o..o + m].iter().zip(ids).all(|(&l, &t)| l == i64::from(t))
    };
    (0..labels.len()).find(|&o| matches(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], n_prompt: usize) -> Example {
        example(
            ids[..n_prompt].to_vec(),
            ids[n_prompt..].to_vec(),
            format!("{ids:?}"),
            format!("key-{ids:?}"),
        )
    }

    #[test]
    fn labels_cover_completion_tokens_only() {
        let e = ex(&[10, 11, 12, 13, 14], 2);
        // position 1 (last prompt token) predicts 12, the first completion token.
        assert_eq!(e.labels, vec![IGNORE, 12, 13, 14, IGNORE]);
    }

    #[test]
    fn packing_fills_rows_and_pads_without_loss() {
        let a = ex(&[1, 2, 3], 1);
        let b = ex(&[4, 5], 1);
        let c = ex(&[6, 7, 8, 9], 2);
        let rows = pack(&[a.clone(), b.clone(), c.clone()], 6, true, 0);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].input_ids, vec![1, 2, 3, 4, 5, 0]);
        assert_eq!(rows[0].docs, vec![0, 0, 0, 1, 1, 2]);
        assert_eq!(rows[0].labels, vec![2, 3, IGNORE, 5, IGNORE, IGNORE]);
        assert_eq!(rows[1].input_ids, vec![6, 7, 8, 9, 0, 0]);
        let unpacked = pack(&[a, b, c], 6, false, 0);
        assert_eq!(unpacked.len(), 3);
        assert!(unpacked.iter().all(|r| r.input_ids.len() == 6));
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let items: Vec<u32> = (0..50).collect();
        let a = shuffled(&items, 7);
        assert_eq!(a, shuffled(&items, 7));
        assert_ne!(a, shuffled(&items, 8));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, items);
    }

    #[test]
    fn records_align_at_the_start_inside_or_cut_by_seq_len() {
        let labels = [10, 11, 12, 13, 14, 99];
        // Re-scored: the whole label span.
        assert_eq!(align(&labels, &[10, 11, 12, 13, 14, 99]), Some(0));
        // API capture: the template added a token before and an end-of-turn after.
        assert_eq!(align(&labels, &[11, 12, 13, 14]), Some(1));
        // The example was cut at seq_len: the record runs past the labels.
        let cut: Vec<i64> = (10..20).collect();
        let record: Vec<u32> = (10..25).collect();
        assert_eq!(align(&cut, &record), Some(0));
        assert_eq!(
            align(&cut[..4], &record),
            None,
            "4 shared tokens are too few to trust"
        );
        assert_eq!(
            align(&labels, &[13, 14, 99, 7]),
            None,
            "3 of 4 tokens is a chance match"
        );
        // Too little overlap, or different tokens.
        assert_eq!(align(&labels, &[99, 7, 8, 9]), None);
        assert_eq!(align(&labels, &[11, 13]), None);
        assert_eq!(align(&labels, &[]), None);
    }
}
