//! Drawing the next token of each row from its logits, as HF's `generate` does (temperature,
//! then top-k, then top-p) but on the device: [`ModelKernels::sample_rows`] returns only the
//! ids, so a decode step no longer copies [b, V] logits to the host and sorts them there.
//!
//! The rule, the same on every backend (this file's [`sample_row`] is the reference; CUDA's
//! kernel is `cuda/sample.rs`):
//! - temperature 0: the first index of the largest logit (torch.argmax);
//! - otherwise each token's weight is exp((z - max) / temperature);
//! - top-k keeps the tokens whose logit is at least the k-th largest (ties at the edge stay,
//!   as HF's `TopKLogitsWarper` keeps them);
//! - top-p then keeps the tokens whose logit is at least that of the token where the
//!   descending cumulative weight of the top-k set first reaches `top_p` of it (ties at the
//!   edge stay);
//! - the draw walks the kept tokens in id order and takes the first whose cumulative weight
//!   exceeds `uniform` x their total (if rounding leaves none, the last kept one of nonzero
//!   weight).
//!
//! Thresholds instead of a sorted candidate list are what lets a GPU block find the nucleus
//! by bisection over the logits without sorting 152k values; keeping the ties makes the
//! kept set a function of the logits alone, whatever order they are visited in.
//!
//! [`ModelKernels::sample_rows`]: crate::ModelKernels::sample_rows

/// How one row draws its token, and the uniform number in [0, 1) its draw uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    /// 0: greedy.
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: u32,
    /// 1 keeps every token.
    pub top_p: f32,
    pub uniform: f32,
}

/// Order-preserving map of a float to u32: a < b (as floats, -0 = +0 aside) iff key(a) <
/// key(b). The CUDA kernel bisects over these keys.
pub fn order_key(x: f32) -> u32 {
    let bits = x.to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// The token [`sample_row`]'s rule draws from `logits` (one row, candidates only).
///
/// Weights are exp of the f32 tempered logit in f64 and every sum is f64, on the device too:
/// in f32 the rounding of a sum over 152k weights moves the draw's target by several tokens'
/// worth, and the device (which adds in another order) would pick a neighbour.
pub fn sample_row(logits: &[f32], s: &RowSampling) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv_t = 1.0 / s.temperature;
    let weight = |z: f32| f64::from((z - max) * inv_t).exp();
    let floor = kept_floor(logits, s, weight);
    let kept = || logits.iter().enumerate().filter(move |(_, z)| **z >= floor);
    let total: f64 = kept().map(|(_, &z)| weight(z)).sum();
    let target = f64::from(s.uniform) * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &z) in kept() {
        let w = weight(z);
        acc += w;
        if w > 0.0 {
            last = i;
        }
        if target < acc {
            return i as u32;
        }
    }
    last as u32
}

/// The smallest logit that stays a candidate under top-k and top-p. Only top-p needs the
/// logits in order: without it, top-k's edge is one selection, and without either every
/// logit stays (no pass at all, as the whole-vocabulary sampling of on-policy training asks).
fn kept_floor(logits: &[f32], s: &RowSampling, weight: impl Fn(f32) -> f64) -> f32 {
    let by_value = |a: &f32, b: &f32| b.total_cmp(a);
    let n = logits.len();
    let k = match s.top_k as usize {
        0 => n,
        k => k.min(n),
    };
    if s.top_p >= 1.0 {
        if k == n {
            return f32::NEG_INFINITY;
        }
        let mut values = logits.to_vec();
        return *values.select_nth_unstable_by(k - 1, by_value).1;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    sorted.sort_unstable_by(by_value);
    // The top-k set: every logit at least the k-th largest.
    let top = sorted.iter().take_while(|&&z| z >= sorted[k - 1]);
    let goal = f64::from(s.top_p) * top.clone().map(|&z| weight(z)).sum::<f64>();
    let mut acc = 0.0;
    for &z in top {
        acc += weight(z);
        if acc >= goal {
            return z;
        }
    }
    sorted[k - 1]
}

/// The first index of the largest value (as torch.argmax).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &z) in row.iter().enumerate() {
        if z > row[best] {
            best = i;
        }
    }
    best as u32
}

/// [`sample_row`] over each row of `logits` ([rows.len(), v] row-major), rows in parallel:
/// the default of [`ModelKernels::sample_rows`](crate::ModelKernels::sample_rows).
pub fn sample_rows_host(logits: &[f32], v: usize, rows: &[RowSampling]) -> Vec<u32> {
    use rayon::prelude::*;
    logits
        .par_chunks(v)
        .zip(rows.par_iter())
        .map(|(row, s)| sample_row(row, s))
        .collect()
}

/// [`ModelKernels::sample_rows`](crate::ModelKernels::sample_rows) on the host: the logits'
/// candidate columns copied over in f32, then [`sample_rows_host`].
pub fn sample_rows_default<B: burn::tensor::backend::Backend>(
    logits: burn::tensor::Tensor<B, 2>,
    vocab: usize,
    rows: &[RowSampling],
) -> Result<Vec<u32>, String> {
    let [b, v] = logits.dims();
    if b != rows.len() {
        return Err(format!("{b} rows of logits for {} samplings", rows.len()));
    }
    let v = vocab.min(v);
    let host = candidates_on_host(logits, vocab)?;
    Ok(sample_rows_host(&host, v, rows))
}

/// The first `vocab` columns of `logits` [b, V] on the host in f32, row-major [b, min(vocab,
/// V)]: what a draw on the host reads.
pub fn candidates_on_host<B: burn::tensor::backend::Backend>(
    logits: burn::tensor::Tensor<B, 2>,
    vocab: usize,
) -> Result<Vec<f32>, String> {
    let v = vocab.min(logits.dims()[1]);
    if v == 0 {
        return Err("no candidate tokens".into());
    }
    logits
        .narrow(1, 0, v)
        .cast(burn::tensor::DType::F32)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| format!("logits to host: {e:?}"))
}

/// Token ids drawn for a decoding step, on their way to the host
/// ([`ModelKernels::sample_rows_ahead`](crate::ModelKernels::sample_rows_ahead)): `ids`
/// (`[B]`) feeds the next step on the device, `read` gives them on the host once they are
/// there.
pub struct SampledIds<B: burn::tensor::backend::Backend> {
    pub ids: burn::tensor::Tensor<B, 1, burn::tensor::Int>,
    pub read: PendingIds,
}

/// Ids being copied to the host: [`PendingIds::wait`] waits for the work queued before the
/// copy (the step that drew them), not for anything queued after it.
pub struct PendingIds(Box<dyn FnOnce() -> Result<Vec<u32>, String> + Send>);

impl PendingIds {
    /// Ids already on the host.
    pub fn ready(ids: Vec<u32>) -> Self {
        PendingIds(Box::new(move || Ok(ids)))
    }

    /// Ids that `arrive` waits for and returns.
    pub fn waiting(arrive: impl FnOnce() -> Result<Vec<u32>, String> + Send + 'static) -> Self {
        PendingIds(Box::new(arrive))
    }

    /// The ids, once on the host.
    pub fn wait(self) -> Result<Vec<u32>, String> {
        (self.0)()
    }
}

/// [`ModelKernels::sample_rows_ahead`](crate::ModelKernels::sample_rows_ahead) where ids are
/// drawn on the host: drawn now, then put on the device for the next step.
pub fn sample_rows_ahead_default<B: crate::ModelKernels>(
    logits: burn::tensor::Tensor<B, 2>,
    vocab: usize,
    rows: &[RowSampling],
) -> Result<SampledIds<B>, String> {
    let device = logits.device();
    let drawn = B::sample_rows(logits, vocab, rows)?;
    let data: Vec<i32> = drawn.iter().map(|&t| t as i32).collect();
    let ids = burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(data, [drawn.len()]), &device);
    Ok(SampledIds {
        ids,
        read: PendingIds::ready(drawn),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(temperature: f32, top_k: u32, top_p: f32, uniform: f32) -> RowSampling {
        RowSampling {
            temperature,
            top_k,
            top_p,
            uniform,
        }
    }

    /// The kept tokens' probabilities under the rule, from a full sort (ties kept).
    fn kept_probs(logits: &[f32], s: &RowSampling) -> Vec<f64> {
        let t = f64::from(s.temperature);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let w: Vec<f64> = logits.iter().map(|&z| ((f64::from(z) - max) / t).exp()).collect();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let mut keep = vec![false; logits.len()];
        let k = if s.top_k == 0 {
            logits.len()
        } else {
            s.top_k as usize
        };
        let kth = logits[order[k - 1]];
        let top: Vec<usize> = order.iter().copied().filter(|&i| logits[i] >= kth).collect();
        let top_total: f64 = top.iter().map(|&i| w[i]).sum();
        let mut acc = 0.0;
        let mut floor = kth;
        for &i in &top {
            acc += w[i];
            if acc >= f64::from(s.top_p) * top_total {
                floor = logits[i];
                break;
            }
        }
        for &i in &top {
            keep[i] = logits[i] >= floor;
        }
        let total: f64 = (0..logits.len()).filter(|&i| keep[i]).map(|i| w[i]).sum();
        (0..logits.len())
            .map(|i| if keep[i] { w[i] / total } else { 0.0 })
            .collect()
    }

    /// Draws `n` times with evenly spaced uniforms and compares the frequencies with the
    /// closed form: the walk is an inverse CDF, so spaced uniforms hit each token in
    /// proportion to its probability, to within 1/n.
    fn check_frequencies(logits: &[f32], t: f32, k: u32, p: f32) {
        let n = 20_000;
        let mut counts = vec![0usize; logits.len()];
        for j in 0..n {
            let u = (j as f32 + 0.5) / n as f32;
            counts[sample_row(logits, &row(t, k, p, u)) as usize] += 1;
        }
        let want = kept_probs(logits, &row(t, k, p, 0.0));
        for (i, (&c, &q)) in counts.iter().zip(&want).enumerate() {
            let got = c as f64 / n as f64;
            assert!(
                (got - q).abs() < 2.0 / n as f64 + 1e-5,
                "t {t} k {k} p {p}: token {i} drawn {got}, probability {q}"
            );
        }
    }

    #[test]
    fn draws_follow_the_tempered_filtered_softmax() {
        let logits = [1.0, 3.0, -2.0, 3.0, 0.5, 2.25, -0.5, 1.75];
        for (t, k, p) in [
            (1.0, 0, 1.0),
            (0.6, 0, 1.0),
            (1.3, 3, 1.0),
            (0.7, 0, 0.9),
            (1.0, 5, 0.8),
            (2.0, 0, 0.3),
        ] {
            check_frequencies(&logits, t, k, p);
        }
    }

    #[test]
    fn top_k_and_top_p_keep_the_ties_at_their_edge() {
        let logits = [2.0, 1.0, 2.0, 0.0, 1.0];
        // The 2nd largest is 2.0 (tied): top-k 1 keeps both 2.0s.
        let want = kept_probs(&logits, &row(1.0, 1, 1.0, 0.0));
        assert!(want[0] == 0.5 && want[2] == 0.5, "{want:?}");
        check_frequencies(&logits, 1.0, 1, 1.0);
        // top-p reaches 0.3 at the first 2.0, and its tie stays.
        check_frequencies(&logits, 1.0, 0, 0.3);
        let kept: Vec<u32> = (0..100)
            .map(|j| sample_row(&logits, &row(1.0, 0, 0.3, j as f32 / 100.0)))
            .collect();
        assert!(kept.iter().all(|&i| i == 0 || i == 2) && kept.contains(&0) && kept.contains(&2));
    }

    #[test]
    fn temperature_0_top_k_1_and_a_tiny_top_p_are_greedy() {
        let logits = [0.3, -1.0, 2.5, 2.4, 0.0];
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(sample_row(&logits, &row(0.0, 0, 1.0, u)), 2);
            assert_eq!(sample_row(&logits, &row(1.0, 1, 1.0, u)), 2);
            assert_eq!(sample_row(&logits, &row(1.0, 0, 1e-6, u)), 2);
        }
        // argmax takes the first of equal maxima, as torch does.
        assert_eq!(argmax(&[1.0, 4.0, 4.0]), 1);
    }

    #[test]
    fn the_walk_is_in_id_order_and_a_uniform_near_1_takes_the_last_kept_token() {
        // Equal weights: uniform u picks token floor(u * 4).
        let logits = [0.0f32; 4];
        for (u, want) in [(0.0, 0), (0.26, 1), (0.5, 2), (0.9999, 3)] {
            assert_eq!(sample_row(&logits, &row(1.0, 0, 1.0, u)), want, "u {u}");
        }
        // Rounding cannot run the walk off the end: the last kept token of nonzero weight is
        // taken.
        assert_eq!(sample_row(&[0.0, -1e9, 0.0, -1e9], &row(1.0, 0, 1.0, 1.0)), 2);
    }

    #[test]
    fn order_keys_sort_as_the_floats() {
        let xs = [
            f32::NEG_INFINITY,
            -3.5,
            -1.0,
            -1e-30,
            0.0,
            1e-30,
            0.25,
            7.0,
            f32::INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(order_key(w[0]) < order_key(w[1]), "{} {}", w[0], w[1]);
        }
    }
}
