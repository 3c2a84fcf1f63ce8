//! Teacher forcing: a model run over given token sequences, giving each loss position's
//! log-probability of the actual next token and, on request, the model's own top-k and its
//! log-probabilities at another model's top-k ids. Eval's held-out likelihood, local
//! re-scoring (soft labels) and on-policy teacher scoring all read models through it.

use burn::tensor::IndexingUpdateOp;

use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Int, Tensor};
use distill_data::examples::{Example, IGNORE};
use distill_models::{CausalLm, Kernels};

use crate::{InferError, host};

/// The id that pads a top-k row (soft-label shards use it for "no alternative").
pub const PAD: u32 = u32::MAX;

/// Loss positions per forward chunk: bounds the [chunk, V] f32 logits (152k vocab: 150 MB).
const CHUNK: usize = 256;

/// A sparse next-token distribution per loss position: ids and natural-log probabilities,
/// [n, k] row-major, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    pub k: usize,
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
}

impl TopK {
    pub fn positions(&self) -> usize {
        self.ids.len().checked_div(self.k).unwrap_or(0)
    }
}

/// What teacher forcing one example through one model gives, per loss position.
#[derive(Debug, Clone, PartialEq)]
pub struct Forced {
    /// log p(label) per loss position.
    pub label_logprobs: Vec<f32>,
    /// The model's most likely next token per loss position.
    pub argmax: Vec<u32>,
    /// The model's own top-k, when asked for.
    pub top: Option<TopK>,
    /// The model's log-probabilities at the teacher's top-k ids ([n, k]), when given them.
    pub at_teacher: Option<Vec<f32>>,
}

/// The loss positions of an example: where a label is set.
pub fn loss_positions(ex: &Example) -> Vec<usize> {
    ex.labels
        .iter()
        .enumerate()
        .filter(|(_, l)| **l != IGNORE)
        .map(|(i, _)| i)
        .collect()
}

/// Runs `ex` through `model` once. `top_k` > 0 also returns the model's top-k; `teacher`
/// (aligned to the same loss positions) also returns the model's log-probs at its ids.
pub fn teacher_force<B: Kernels>(
    model: &CausalLm<B>,
    ex: &Example,
    top_k: usize,
    teacher: Option<&TopK>,
    device: &B::Device,
) -> Result<Forced, InferError> {
    let teachers = teacher.map(|t| vec![t]);
    let mut out = teacher_force_batch(model, &[ex], top_k, teachers.as_deref(), device)?;
    Ok(out.pop().expect("one example in, one out"))
}

/// [`teacher_force`] for several examples in one forward pass: they are right-padded to the
/// longest (causal attention keeps padding out of every real position), and their loss
/// positions go through the head together, `CHUNK` at a time.
pub fn teacher_force_batch<B: Kernels>(
    model: &CausalLm<B>,
    exs: &[&Example],
    top_k: usize,
    teachers: Option<&[&TopK]>,
    device: &B::Device,
) -> Result<Vec<Forced>, InferError> {
    let positions: Vec<Vec<usize>> = exs.iter().map(|ex| loss_positions(ex)).collect();
    if let Some(ts) = teachers {
        for (t, p) in ts.iter().zip(&positions) {
            if t.positions() != p.len() {
                return Err(InferError::Invalid(format!(
                    "teacher targets cover {} positions, the example has {}",
                    t.positions(),
                    p.len()
                )));
            }
        }
    }
    let (b, t_len) = (
        exs.len(),
        exs.iter().map(|e| e.input_ids.len()).max().unwrap_or(0),
    );
    if b == 0 || t_len == 0 {
        return Ok(exs
            .iter()
            .map(|_| empty_forced(0, top_k, teachers.is_some()))
            .collect());
    }
    let ids: Vec<i64> = exs
        .iter()
        .flat_map(|e| {
            let pad = t_len - e.input_ids.len();
            e.input_ids
                .iter()
                .map(|&t| i64::from(t))
                .chain(std::iter::repeat_n(0, pad))
        })
        .collect();
    let hidden = model.hidden_states(host::int_tensor::<B, 2>(ids, [b, t_len], device), None); // [b, T, C]
    let c_dim = hidden.dims()[2];
    let hidden = hidden.reshape([b * t_len, c_dim]); // [b*T, C]
    // Every loss position of every example, in order: (flat row, label).
    let flat: Vec<(usize, i64)> = positions
        .iter()
        .enumerate()
        .flat_map(|(i, ps)| ps.iter().map(move |&p| (i * t_len + p, exs[i].labels[p])))
        .collect();
    let teacher_ids: Vec<i64> = teachers
        .map(|ts| {
            ts.iter()
                .flat_map(|t| t.ids.iter().map(|&i| if i == PAD { 0 } else { i64::from(i) }))
                .collect()
        })
        .unwrap_or_default();
    let tk = teachers.and_then(|ts| ts.first()).map_or(0, |t| t.k);
    let mut all = empty_forced(flat.len(), top_k, teachers.is_some());
    for start in (0..flat.len()).step_by(CHUNK) {
        let chunk = &flat[start..flat.len().min(start + CHUNK)];
        let c = chunk.len();
        let idx = host::int_tensor::<B, 1>(chunk.iter().map(|&(r, _)| r as i64).collect(), [c], device);
        let h = hidden.clone().select(0, idx).unsqueeze::<3>(); // [1, c, C]
        let logits = model.logits(h).squeeze_dim::<2>(0).cast(DType::F32); // [c, V]
        let logp = log_softmax(logits, 1); // [c, V]
        let labels = host::int_tensor::<B, 2>(chunk.iter().map(|&(_, l)| l).collect(), [c, 1], device);
        all.label_logprobs
            .extend(host::to_f32(logp.clone().gather(1, labels))?);
        all.argmax.extend(host::to_u32(logp.clone().argmax(1))?);
        if let Some(top) = all.top.as_mut() {
            let (values, indices) = top_k_rows(logp.clone(), top_k); // [c, k]
            top.logprobs.extend(host::to_f32(values)?);
            top.ids.extend(host::to_u32(indices)?);
        }
        if let Some(at) = all.at_teacher.as_mut() {
            // Padding ids gather position 0; their -inf teacher log-prob drops them later.
            let rows = teacher_ids[start * tk..(start + c) * tk].to_vec();
            at.extend(host::to_f32(
                logp.gather(1, host::int_tensor::<B, 2>(rows, [c, tk], device)),
            )?);
        }
    }
    Ok(split_forced(all, &positions, top_k, tk))
}

/// Up to this k, [`top_k_rows`] selects by rounds of max and mask.
const TOP_K_BY_ROUNDS: usize = 64;

/// The `k` largest entries of each row of `x` ([n, V]), largest first, and their column ids.
/// burn 0.21's `topk` sorts every row in full, and on CUDA it does so on the host: ~5 ms a
/// row at V = 49k, which made re-scoring 84k positions take 7 minutes. k rounds of a row max
/// plus masking the winner stay on the device. Ties go to the lower id on the CPU backend (as
/// a stable sort); a parallel max on a GPU may pick either of two equal entries.
pub fn top_k_rows<B: Kernels>(x: Tensor<B, 2>, k: usize) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    let [n, v] = x.dims();
    let k = k.min(v);
    if k > TOP_K_BY_ROUNDS {
        return x.topk_with_indices(k, 1);
    }
    let device = x.device();
    let masked = Tensor::<B, 2>::full([n, 1], f32::NEG_INFINITY, &device).cast(x.dtype());
    let (mut values, mut ids) = (Vec::with_capacity(k), Vec::with_capacity(k));
    let mut x = x;
    for _ in 0..k {
        let (value, id) = x.clone().max_dim_with_indices(1); // [n, 1]
        // Adding -inf at the winner takes it out of the next round.
        x = x.scatter(1, id.clone(), masked.clone(), IndexingUpdateOp::Add);
        values.push(value);
        ids.push(id);
    }
    (Tensor::cat(values, 1), Tensor::cat(ids, 1)) // [n, k]
}

fn empty_forced(n: usize, top_k: usize, with_teacher: bool) -> Forced {
    Forced {
        label_logprobs: Vec::with_capacity(n),
        argmax: Vec::with_capacity(n),
        top: (top_k > 0).then(|| TopK {
            k: top_k,
            ids: Vec::with_capacity(n * top_k),
            logprobs: Vec::with_capacity(n * top_k),
        }),
        at_teacher: with_teacher.then(Vec::new),
    }
}

/// Cuts the batch's concatenated results back into one [`Forced`] per example.
fn split_forced(all: Forced, positions: &[Vec<usize>], top_k: usize, tk: usize) -> Vec<Forced> {
    let mut at = 0;
    positions
        .iter()
        .map(|ps| {
            let r = at..at + ps.len();
            at += ps.len();
            Forced {
                label_logprobs: all.label_logprobs[r.clone()].to_vec(),
                argmax: all.argmax[r.clone()].to_vec(),
                top: all.top.as_ref().map(|t| TopK {
                    k: top_k,
                    ids: t.ids[r.start * top_k..r.end * top_k].to_vec(),
                    logprobs: t.logprobs[r.start * top_k..r.end * top_k].to_vec(),
                }),
                at_teacher: all
                    .at_teacher
                    .as_ref()
                    .map(|a| a[r.start * tk..r.end * tk].to_vec()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;

    use super::*;

    #[test]
    fn a_batch_forces_each_example_as_it_would_alone() {
        use burn::backend::Flex;
        let dir = std::env::var_os("DISTILL_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
            })
            .join("tiny-qwen2");
        let device = Default::default();
        let model = CausalLm::<Flex>::load(&dir, &device).unwrap();
        let ex = |ids: &[u32], n_prompt: usize| Example {
            input_ids: ids.to_vec(),
            labels: (0..ids.len())
                .map(|i| {
                    if i + 1 >= n_prompt && i + 1 < ids.len() {
                        i64::from(ids[i + 1])
                    } else {
                        IGNORE
                    }
                })
                .collect(),
            prompt_id: String::new(),
            key: String::new(),
        };
        let exs = [
            ex(&[5, 9, 30, 31, 200, 7], 2),
            ex(&[11, 12, 13], 1),
            ex(&[40, 41, 42, 43, 44, 45, 46, 47, 48], 5),
        ];
        let refs: Vec<&Example> = exs.iter().collect();
        let batch = teacher_force_batch(&model, &refs, 4, None, &device).unwrap();
        for (e, got) in exs.iter().zip(&batch) {
            let alone = teacher_force(&model, e, 4, None, &device).unwrap();
            assert_eq!(got.argmax, alone.argmax);
            assert_eq!(got.top.as_ref().unwrap().ids, alone.top.as_ref().unwrap().ids);
            for (a, b) in got.label_logprobs.iter().zip(&alone.label_logprobs) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
        assert_eq!(batch[2].label_logprobs.len(), 4);
    }

    #[test]
    fn top_k_rows_equals_a_full_sort() {
        use burn::backend::Flex;
        let device = Default::default();
        let mut rng = fastrand::Rng::with_seed(5);
        // Rounded values give exact ties: the lower id must come first, as in a stable sort.
        let (n, v) = (7, 300);
        let host: Vec<f32> = (0..n * v)
            .map(|_| (rng.f32() * 40.0).round() / 4.0 - 5.0)
            .collect();
        let x = Tensor::<Flex, 2>::from_data(TensorData::new(host.clone(), [n, v]), &device);
        for k in [1, 5, 64, 65] {
            let (values, ids) = top_k_rows(x.clone(), k);
            let (values, ids) = (host::to_f32(values).unwrap(), host::to_u32(ids).unwrap());
            for r in 0..n {
                let row = &host[r * v..(r + 1) * v];
                let mut order: Vec<u32> = (0..v as u32).collect();
                order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
                // Past 64 it is burn's own sort, which orders ties as it likes.
                if k <= TOP_K_BY_ROUNDS {
                    assert_eq!(&ids[r * k..(r + 1) * k], &order[..k], "row {r}, k {k}");
                }
                let want: Vec<f32> = order[..k].iter().map(|&i| row[i as usize]).collect();
                assert_eq!(&values[r * k..(r + 1) * k], &want[..], "row {r}, k {k}");
            }
        }
    }
}
