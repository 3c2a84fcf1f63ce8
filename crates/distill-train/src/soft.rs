//! Stored soft labels (a dataset's `soft/` shards: the teacher's top-k per response token) as
//! sparse teacher targets for training rows, read from the memory-mapped store one sample at
//! a time as rows need them.
//!
//! A record's token ids are aligned to the example's label tokens by search: records from
//! local re-scoring cover exactly the label span; records captured from an API cover the
//! tokens the teacher generated, which the chat template may frame differently (a `<think>`
//! the template adds, an end-of-turn token after). Label positions the record does not
//! cover, and samples without a record or whose tokens do not line up, train on CE alone.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use distill_data::examples::align;
use distill_data::soft::{SoftLabels, SoftRecord, soft_dir};
use distill_hf::tokenizer::TextTokenizer;

use crate::loss::TeacherTargets;
use distill_data::examples::{Example, IGNORE, Row};

#[derive(Debug, thiserror::Error)]
pub enum SoftTargetError {
    #[error(transparent)]
    Store(#[from] distill_data::soft::SoftError),
    #[error("{0}")]
    Refused(String),
}

/// How many examples found usable soft labels.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct SoftStats {
    pub aligned: usize,
    /// No record under the sample's key.
    pub missing: usize,
    /// A record whose tokens are not found among the example's label tokens.
    pub unaligned: usize,
}

pub struct SoftTargets {
    store: SoftLabels,
    k: usize,
    /// Per sample key: the index of the label position where the record's position 0 falls.
    offsets: HashMap<String, usize>,
}

impl SoftTargets {
    /// The dataset's soft labels joined to `examples`, or None when it has none.
    pub fn open<'a>(
        dataset: &Path,
        tokenizer: &TextTokenizer,
        examples: impl IntoIterator<Item = &'a Example>,
    ) -> Result<Option<(SoftTargets, SoftStats)>, SoftTargetError> {
        let dir = soft_dir(dataset);
        if !dir.join("manifest.json").exists() {
            return Ok(None);
        }
        let store = SoftLabels::open(&dir)?;
        let m = store.manifest();
        if m.tokenizer_hash != tokenizer.hash {
            return Err(SoftTargetError::Refused(format!(
                "{}: soft labels are in the ids of tokenizer {} (sha256 {}), the student's is sha256 {}; \
                 HINT: re-score the samples with a teacher that shares the student's tokenizer (`distill gen-data --rescore`)",
                dir.display(),
                m.tokenizer,
                short(&m.tokenizer_hash),
                short(&tokenizer.hash)
            )));
        }
        let k = m.k;
        let mut offsets = HashMap::new();
        let mut stats = SoftStats::default();
        for ex in examples {
            let Some(rec) = store.get(&ex.key)? else {
                stats.missing += 1;
                continue;
            };
            match align(&label_tokens(ex), &rec.ids) {
                Some(o) => {
                    offsets.insert(ex.key.clone(), o);
                    stats.aligned += 1;
                }
                None => stats.unaligned += 1,
            }
        }
        Ok(Some((SoftTargets { store, k, offsets }, stats)))
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Sparse targets for the loss positions of `rows`, in the order the trainer selects them
    /// (row by row, left to right): ids [N, k], log-probs [N, k], present [N].
    pub fn for_rows<B: Backend>(
        &self,
        rows: &[Row],
        device: &B::Device,
    ) -> Result<TeacherTargets<B>, SoftTargetError> {
        let k = self.k;
        let (mut ids, mut logprobs, mut present) = (Vec::new(), Vec::new(), Vec::new());
        let mut records: HashMap<&str, Option<SoftRecord>> = HashMap::new();
        for row in rows {
            // Label positions seen so far per document of this row.
            let mut seen: HashMap<u32, usize> = HashMap::new();
            for (i, &label) in row.labels.iter().enumerate() {
                if label == IGNORE {
                    continue;
                }
                let doc = row.docs[i];
                let nth = seen.entry(doc).or_default();
                let index = *nth;
                *nth += 1;
                let key = row.keys.get(doc as usize).map(String::as_str);
                let entry = match key.and_then(|k| self.offsets.get(k).map(|&o| (k, o))) {
                    Some((key, offset)) => {
                        if !records.contains_key(key) {
                            records.insert(key, self.store.get(key)?);
                        }
                        let rec = records[key].as_ref();
                        index.checked_sub(offset).and_then(|j| {
                            rec.filter(|r| j < r.len() && i64::from(r.ids[j]) == label)
                                .map(|r| r.position(j))
                        })
                    }
                    None => None,
                };
                // A stored position whose alternatives are all padding has no soft label
                // (API capture could not map the teacher's token there).
                let entry = entry.filter(|(tid, tlp)| {
                    tid.iter()
                        .zip(*tlp)
                        .any(|(&id, lp)| id != distill_data::soft::PAD_ID && lp.is_finite())
                });
                match entry {
                    Some((tid, tlp)) => {
                        for (&id, &lp) in tid.iter().zip(tlp) {
                            let absent = id == distill_data::soft::PAD_ID || !lp.is_finite();
                            ids.push(if absent { 0 } else { i64::from(id) });
                            logprobs.push(if absent { f32::NEG_INFINITY } else { lp });
                        }
                        present.push(1.0f32);
                    }
                    None => {
                        ids.extend(std::iter::repeat_n(0i64, k));
                        logprobs.extend(std::iter::repeat_n(f32::NEG_INFINITY, k));
                        present.push(0.0);
                    }
                }
            }
        }
        let n = present.len();
        // f32 whatever the backend's default float (bf16 on CUDA): the teacher's rest mass is
        // 1 - the sum of k probabilities, which bf16 log-probs would shift by up to ~1%.
        let f32_on = (device, DType::F32);
        Ok(TeacherTargets::Sparse {
            ids: Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, k]), device),
            logprobs: Tensor::from_data(TensorData::new(logprobs, [n, k]), f32_on),
            present: Some(Tensor::from_data(TensorData::new(present, [n]), f32_on)),
        })
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// The label token at each loss position of an example, in order.
fn label_tokens(ex: &Example) -> Vec<i64> {
    ex.labels.iter().copied().filter(|&l| l != IGNORE).collect()
}
