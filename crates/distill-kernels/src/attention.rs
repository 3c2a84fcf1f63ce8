//! Attention under autodiff that keeps O(T) per layer for the backward pass instead of
//! O(T²): the output and each query's log-sum-exp, as FlashAttention does. The backward
//! recomputes the scores block by block from Q and K. Forward and backward both walk the
//! batch and heads in blocks whose f32 scores stay under [`BLOCK_BYTES`], so a long
//! sequence never holds a whole [B, H, T, S] score tensor either.
//!
//! Why: burn 0.21's attention under autodiff is its fallback of separate ops, and autodiff
//! keeps each op's [B, H, T, S] inputs until the backward pass: every layer's scores,
//! masks and probabilities live at once (79 GiB for a 0.5B full step at 4 x 2048 tokens on
//! the H100, against PyTorch's 24 GiB). Here a layer keeps Q, K, V, O and the log-sum-exp.
//!
//! The scores come out of the Q Kᵀ GEMM in f32 ([`Kernels::bmm`]: cuBLAS writes its f32
//! accumulator on CUDA; elsewhere the GEMM's output is cast), the softmax is in f32, and the
//! probabilities are cast back to the value dtype for the P @ V GEMM, as burn's fallback does.
//! All six GEMMs (two forward, four backward) are [`Kernels::bmm`] calls, transposed operands
//! as `swap_dims(2, 3)` views.

use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, FloatDType, Tensor};

use crate::{ModelKernels, bmm};

/// Most bytes of f32 scores one block materialises ([rows, heads, T, S] x 4).
pub const BLOCK_BYTES: usize = 256 << 20;

/// A masked score: finite, so exp(masked - max) is 0 without inf - inf.
const MASKED: f32 = -1e30;

/// One block of the batch x heads grid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub rows: Range<usize>,
    pub heads: Range<usize>,
}

/// Blocks covering [batch, heads] with at most `budget` bytes of f32 scores each: whole
/// rows (all heads) at a time when a row fits, else groups of heads within one row.
pub fn blocks(batch: usize, heads: usize, t: usize, s: usize, budget: usize) -> Vec<Block> {
    let per_head = (t * s * 4).max(1);
    let per_row = per_head * heads;
    let mut out = Vec::new();
    if per_row <= budget {
        let rows = (budget / per_row).max(1);
        for r0 in (0..batch).step_by(rows) {
            out.push(Block {
                rows: r0..(r0 + rows).min(batch),
                heads: 0..heads,
            });
        }
    } else {
        let group = (budget / per_head).max(1);
        for r in 0..batch {
            for h0 in (0..heads).step_by(group) {
                out.push(Block {
                    rows: r..r + 1,
                    heads: h0..(h0 + group).min(heads),
                });
            }
        }
    }
    out
}

fn part<B: Backend>(x: &Tensor<B, 4>, b: &Block) -> Tensor<B, 4> {
    let [_, _, t, d] = x.dims();
    x.clone().slice([b.rows.clone(), b.heads.clone(), 0..t, 0..d])
}

fn part_mask<B: Backend>(m: &Tensor<B, 4, Bool>, b: &Block) -> Tensor<B, 4, Bool> {
    let [_, _, t, s] = m.dims();
    m.clone().slice([b.rows.clone(), b.heads.clone(), 0..t, 0..s])
}

/// Raw scores of one block in f32: q @ kᵀ, [r, h, T, S]. Scale and mask are applied by
/// [`Kernels::attention_probs`] and [`Kernels::attention_probs_grad`].
fn scores<B: ModelKernels>(q: Tensor<B, 4>, k: Tensor<B, 4>) -> Tensor<B, 4> {
    bmm(q, k.swap_dims(2, 3), FloatDType::F32)
}

/// scale * scores with masked entries at [`MASKED`].
fn scaled_masked<B: Backend>(
    scores: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    scale: f64,
) -> Tensor<B, 4> {
    let s = scores.mul_scalar(scale);
    match mask {
        Some(m) => s.mask_fill(m, MASKED),
        None => s,
    }
}

/// [`Kernels::attention_probs`] as burn ops.
pub fn probs_default<B: Backend>(
    scores: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    scale: f64,
    p_dtype: FloatDType,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let sc = scaled_masked(scores, mask, scale); // [r, h, T, S]
    let max = sc.clone().max_dim(3); // [r, h, T, 1]
    let e = (sc - max.clone()).exp();
    let sum = e.clone().sum_dim(3);
    ((e / sum.clone()).cast(p_dtype), max + sum.log())
}

/// [`Kernels::attention_probs_grad`] as burn ops.
#[allow(clippy::too_many_arguments)]
pub fn probs_grad_default<B: Backend>(
    scores: Tensor<B, 4>,
    dp: Tensor<B, 4>,
    lse: Tensor<B, 4>,
    delta: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    scale: f64,
    ds_dtype: FloatDType,
    p_dtype: FloatDType,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let p = (scaled_masked(scores, mask, scale) - lse).exp(); // [r, h, T, S] f32
    let ds = (p.clone() * (dp - delta)).mul_scalar(scale).cast(ds_dtype);
    (ds, p.cast(p_dtype))
}

/// Joins per-block results [r, h, .., ..] back into [B, H, .., ..]: heads within a row
/// first, then rows.
fn assemble<B: Backend>(parts: Vec<(Block, Tensor<B, 4>)>) -> Tensor<B, 4> {
    let mut rows: Vec<Tensor<B, 4>> = Vec::new();
    let mut row_heads: Vec<Tensor<B, 4>> = Vec::new();
    let mut current: Option<Range<usize>> = None;
    for (block, t) in parts {
        if current.as_ref().is_some_and(|r| *r != block.rows) {
            rows.push(Tensor::cat(std::mem::take(&mut row_heads), 1));
        }
        current = Some(block.rows);
        row_heads.push(t);
    }
    if !row_heads.is_empty() {
        rows.push(Tensor::cat(row_heads, 1));
    }
    Tensor::cat(rows, 0)
}

/// softmax((q @ kᵀ) / sqrt(hd), masked) @ v, and each query's log-sum-exp of its scores.
/// q: [B, H, T, hd], k/v: [B, H, S, hd], mask: [B, H, T, S] (true = masked out; no row may be
/// all masked). Returns ([B, H, T, hd] in v's dtype, [B, H, T, 1] f32).
pub fn forward<B: ModelKernels>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
    budget: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, t, _] = q.dims();
    let s = k.dims()[2];
    let v_dtype = FloatDType::from(v.dtype());
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    let scale = 1.0 / (q.dims()[3] as f64).sqrt();
    for block in blocks(b, h, t, s, budget) {
        let sc = scores(part(q, &block), part(k, &block)); // [r, h, T, S] f32
        let (p, lse) = B::attention_probs(sc, mask.map(|m| part_mask(m, &block)), scale, v_dtype);
        outs.push((block.clone(), bmm(p, part(v, &block), v_dtype))); // [r, h, T, hd]
        lses.push((block, lse)); // [r, h, T, 1]
    }
    (assemble(outs), assemble(lses))
}

/// Gradients of [`forward`]'s output for q, k and v, given the output gradient `d_out`
/// [B, H, T, hd], recomputing the probabilities P = exp(scores - lse) block by block:
///     dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP - rowsum(dO ∘ O)) / sqrt(hd),
///     dQ = dS K,   dK = dSᵀ Q.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: ModelKernels>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
    out: &Tensor<B, 4>,
    lse: &Tensor<B, 4>,
    d_out: &Tensor<B, 4>,
    budget: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, t, hd] = q.dims();
    let s = k.dims()[2];
    let inv_sqrt = 1.0 / (hd as f64).sqrt();
    let (q_dtype, v_dtype) = (FloatDType::from(q.dtype()), FloatDType::from(v.dtype()));
    let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
    for block in blocks(b, h, t, s, budget) {
        let (qb, kb, vb) = (part(q, &block), part(k, &block), part(v, &block));
        let dob = part(d_out, &block); // [r, h, T, hd]
        let sc = scores(qb.clone(), kb.clone()); // [r, h, T, S] f32
        let dp = bmm(dob.clone(), vb.swap_dims(2, 3), FloatDType::F32); // [r, h, T, S]
        let delta = (dob.clone().cast(DType::F32) * part(out, &block).cast(DType::F32)).sum_dim(3); // [r, h, T, 1]
        let (ds, p) = B::attention_probs_grad(
            sc,
            dp,
            part(lse, &block),
            delta,
            mask.map(|m| part_mask(m, &block)),
            inv_sqrt,
            q_dtype,
            v_dtype,
        ); // [r, h, T, S] each
        let dv = bmm(p.swap_dims(2, 3), dob, v_dtype); // [r, h, S, hd]
        dqs.push((block.clone(), bmm(ds.clone(), kb, q_dtype))); // [r, h, T, hd]
        dks.push((block.clone(), bmm(ds.swap_dims(2, 3), qb, q_dtype))); // [r, h, S, hd]
        dvs.push((block, dv));
    }
    (assemble(dqs), assemble(dks), assemble(dvs))
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorData;
    use burn::tensor::module::attention as burn_attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use distill_core::testing::TestRng;

    use super::*;
    use crate::{KeyRanges, attention_autodiff, repeat_kv};

    type AD = Autodiff<Flex>;

    #[test]
    fn blocks_cover_the_grid_once_within_the_budget() {
        let cases = [
            (4, 14, 2048, 2048, 256 << 20), // 235 MB a row: one row a block
            (4, 14, 256, 256, 256 << 20),   // all rows in one block
            (2, 14, 8192, 8192, 256 << 20), // 268 MB a head: one head a block
            (3, 4, 8, 8, 8 * 8 * 4 * 2),    // two heads a block
        ];
        for (b, h, t, s, budget) in cases {
            let blocks = blocks(b, h, t, s, budget);
            let mut seen = vec![0; b * h];
            for blk in &blocks {
                let bytes = blk.rows.len() * blk.heads.len() * t * s * 4;
                assert!(bytes <= budget.max(t * s * 4), "{blk:?}: {bytes} bytes");
                for r in blk.rows.clone() {
                    for hh in blk.heads.clone() {
                        seen[r * h + hh] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{b}x{h}: {seen:?}");
        }
        assert_eq!(blocks(4, 14, 2048, 2048, 256 << 20).len(), 4);
        assert_eq!(blocks(4, 14, 256, 256, 256 << 20).len(), 1);
        assert_eq!(blocks(2, 14, 8192, 8192, 256 << 20).len(), 28);
    }

    /// Packed causal key runs like the trainer's: row 0 one document, row 1 two.
    fn packed_keys(b: usize, t: usize) -> KeyRanges<AD> {
        let runs: Vec<Vec<(usize, usize)>> = (0..b)
            .map(|r| {
                (0..t)
                    .map(|i| (if r == 1 && i >= t / 2 { t / 2 } else { 0 }, i))
                    .collect()
            })
            .collect();
        KeyRanges::from_runs(&runs, &Default::default())
    }

    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec().unwrap()
    }

    fn assert_close(name: &str, ours: &[f32], theirs: &[f32]) {
        assert_eq!(ours.len(), theirs.len(), "{name}");
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
                "{name}[{i}]: {a} vs burn's {b}"
            );
        }
    }

    /// Output and all three gradients against burn's own attention under autodiff, with the
    /// blocks forced down to one head (several blocks per row) and to whole rows, with and
    /// without grouped K/V heads (burn's side repeats them; ours sums their gradients).
    #[test]
    fn blockwise_attention_matches_burns_values_and_gradients() {
        let device = Default::default();
        let (b, h, t, hd) = (2, 4, 6, 4);
        // Each input from its own generator: burn's is one for the process, which the tests
        // running beside this one draw from too.
        let rand = |seed: u64, heads: usize| {
            let values = TestRng::new(seed).normal_vec(b * heads * t * hd, 0.0, 1.0);
            Tensor::<AD, 4>::from_data(TensorData::new(values, [b, heads, t, hd]), &device)
        };
        for kv in [h, 2] {
            let (q0, k0, v0, w) = (rand(1, h), rand(2, kv), rand(3, kv), rand(4, h));
            for budget in [t * t * 4, BLOCK_BYTES] {
                for keys in [Some(packed_keys(b, t)), None] {
                    let run = |ours: bool| {
                        let (q, k, v) = (
                            q0.clone().require_grad(),
                            k0.clone().require_grad(),
                            v0.clone().require_grad(),
                        );
                        let out = if ours {
                            attention_autodiff(q.clone(), k.clone(), v.clone(), keys.as_ref(), budget)
                        } else {
                            let mask = keys
                                .as_ref()
                                .map(|r| r.dense(t).unsqueeze_dim::<4>(1).expand([b, h, t, t]));
                            burn_attention(
                                q.clone(),
                                repeat_kv(k.clone(), h),
                                repeat_kv(v.clone(), h),
                                mask,
                                None,
                                AttentionModuleOptions::default(),
                            )
                        };
                        // A weighted sum, so every output element gets a different gradient.
                        let grads = (out.clone() * w.clone()).sum().backward();
                        let g = |x: &Tensor<AD, 4>| values(x.grad(&grads).unwrap());
                        (values(out.inner()), g(&q), g(&k), g(&v))
                    };
                    let (ours, burns) = (run(true), run(false));
                    let case = format!("kv {kv}, budget {budget}, keys {}", keys.is_some());
                    assert_close(&format!("{case} out"), &ours.0, &burns.0);
                    assert_close(&format!("{case} dq"), &ours.1, &burns.1);
                    assert_close(&format!("{case} dk"), &ours.2, &burns.2);
                    assert_close(&format!("{case} dv"), &ours.3, &burns.3);
                }
            }
        }
    }

    /// One query, two keys, scores 0 and ln 3 after scaling: weights 1/4 and 3/4.
    #[test]
    fn closed_form_two_keys() {
        let device = Default::default();
        let hd = 4.0f32;
        let l3 = 3f32.ln() * hd.sqrt();
        let q = Tensor::<Flex, 4>::from_data(
            TensorData::new(vec![1.0f32, 0.0, 0.0, 0.0], [1, 1, 1, 4]),
            &device,
        );
        let k = Tensor::<Flex, 4>::from_data(
            TensorData::new(vec![0.0f32, 0.0, 0.0, 0.0, l3, 0.0, 0.0, 0.0], [1, 1, 2, 4]),
            &device,
        );
        let v = Tensor::<Flex, 4>::from_data(
            TensorData::new(vec![4.0f32, 0.0, 0.0, 0.0, 0.0, 8.0, 0.0, 0.0], [1, 1, 2, 4]),
            &device,
        );
        let (out, lse) = forward(&q, &k, &v, None, BLOCK_BYTES);
        assert_close("out", &values(out), &[1.0, 6.0, 0.0, 0.0]);
        assert_close("lse", &values(lse), &[4f32.ln()]);
    }
}
