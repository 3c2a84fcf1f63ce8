//! Held-out likelihood: how likely each model finds the teacher's responses (per-token NLL,
//! perplexity) and how close its next-token distribution is to the teacher's
//! (KL(teacher || model) over the teacher's top-k plus a rest bucket, top-1 agreement), from
//! the teacher-forced passes of `distill_infer::score`.

use std::collections::HashMap;

use distill_infer::score::{Forced, PAD, TopK};
use serde::Serialize;

use crate::stats::{Estimate, mean};
/// KL(p || q) over the teacher's top-k ids plus one bucket for the rest of the vocabulary,
/// per position; the form the trainer's "other bucket" loss uses, a lower bound of the full
/// KL that tightens as k grows. Padding entries (id u32::MAX or -inf log-prob) are skipped.
pub fn sparse_kl(teacher: &TopK, model_at_teacher: &[f32]) -> Vec<f64> {
    let k = teacher.k;
    (0..teacher.positions())
        .map(|pos| {
            let (mut kl, mut p_sum, mut q_sum) = (0.0f64, 0.0f64, 0.0f64);
            let row = pos * k..(pos + 1) * k;
            let entries = teacher.ids[row.clone()]
                .iter()
                .zip(&teacher.logprobs[row.clone()]);
            for ((&id, &lp), &lq) in entries.zip(&model_at_teacher[row]) {
                let (lp, lq) = (f64::from(lp), f64::from(lq));
                if id == PAD || !lp.is_finite() {
                    continue;
                }
                let p = lp.exp();
                kl += p * (lp - lq);
                p_sum += p;
                q_sum += lq.exp();
            }
            let (p_rest, q_rest) = ((1.0 - p_sum).max(0.0), (1.0 - q_sum).max(1e-12));
            if p_rest > 0.0 {
                kl += p_rest * (p_rest.ln() - q_rest.ln());
            }
            kl.max(0.0)
        })
        .collect()
}

/// Held-out scores of one model, each an estimate over examples (a sample's mean per token),
/// with the token-weighted figures beside them.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOutScores {
    pub examples: usize,
    pub tokens: usize,
    /// Mean over examples of the per-token NLL (nats).
    pub nll: Estimate,
    /// Total NLL / total tokens, and its exponential.
    pub nll_per_token: f64,
    pub perplexity: f64,
    /// KL(teacher || model) per token, mean over examples (nats), when teacher targets exist.
    pub kl_to_teacher: Option<Estimate>,
    /// Share of positions where the model's top token is the teacher's, mean over examples.
    pub top1_agreement: Option<Estimate>,
    /// Every example's scores (eval writes them to heldout.jsonl, not report.json).
    #[serde(skip)]
    pub per_example: Vec<ExampleScore>,
}

/// One held-out example's scores: what a paired comparison of two models matches on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExampleScore {
    pub key: String,
    pub tokens: usize,
    /// Mean NLL per token (nats).
    pub nll: f64,
    pub kl_to_teacher: Option<f64>,
    pub top1_agreement: Option<f64>,
}

/// `model - baseline` per example, averaged over the examples both scored: two models on the
/// same samples differ far less from sample to sample than either does alone, so this
/// interval is what says whether one beat the other.
#[derive(Debug, Clone, Serialize)]
pub struct PairedDifference {
    pub nll: Estimate,
    pub kl_to_teacher: Option<Estimate>,
    pub top1_agreement: Option<Estimate>,
}

pub fn paired_difference(model: &HeldOutScores, baseline: &HeldOutScores) -> Option<PairedDifference> {
    let base: HashMap<&str, &ExampleScore> =
        baseline.per_example.iter().map(|e| (e.key.as_str(), e)).collect();
    let pairs: Vec<(&ExampleScore, &ExampleScore)> = model
        .per_example
        .iter()
        .filter_map(|m| base.get(m.key.as_str()).map(|b| (m, *b)))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let diff = |f: fn(&ExampleScore) -> Option<f64>| {
        let d: Vec<f64> = pairs.iter().filter_map(|(m, b)| Some(f(m)? - f(b)?)).collect();
        (!d.is_empty()).then(|| mean(&d))
    };
    Some(PairedDifference {
        nll: diff(|e| Some(e.nll))?,
        kl_to_teacher: diff(|e| e.kl_to_teacher),
        top1_agreement: diff(|e| e.top1_agreement),
    })
}

/// Accumulates [`Forced`] results into [`HeldOutScores`].
#[derive(Default)]
pub struct HeldOutAccumulator {
    rows: Vec<ExampleScore>,
    total_nll: f64,
    tokens: usize,
}

impl HeldOutAccumulator {
    /// Scores example `key`; one without loss positions counts nowhere.
    pub fn add(&mut self, key: &str, forced: &Forced, teacher: Option<&TopK>) {
        let n = forced.label_logprobs.len();
        if n == 0 {
            return;
        }
        let sum: f64 = forced.label_logprobs.iter().map(|&l| -f64::from(l)).sum();
        self.total_nll += sum;
        self.tokens += n;
        let mut row = ExampleScore {
            key: key.to_string(),
            tokens: n,
            nll: sum / n as f64,
            kl_to_teacher: None,
            top1_agreement: None,
        };
        if let (Some(t), Some(at)) = (teacher, forced.at_teacher.as_ref()) {
            // Positions where the teacher has a distribution (stored soft labels may not
            // cover every label position).
            let labelled: Vec<usize> = (0..n)
                .filter(|&p| (p * t.k..(p + 1) * t.k).any(|j| t.ids[j] != PAD && t.logprobs[j].is_finite()))
                .collect();
            if !labelled.is_empty() {
                let kl = sparse_kl(t, at);
                let m = labelled.len() as f64;
                row.kl_to_teacher = Some(labelled.iter().map(|&p| kl[p]).sum::<f64>() / m);
                let agree = labelled
                    .iter()
                    .filter(|&&p| t.ids[p * t.k] == forced.argmax[p])
                    .count();
                row.top1_agreement = Some(agree as f64 / m);
            }
        }
        self.rows.push(row);
    }

    pub fn finish(self) -> HeldOutScores {
        let per_token = if self.tokens > 0 {
            self.total_nll / self.tokens as f64
        } else {
            f64::NAN
        };
        let some = |f: fn(&ExampleScore) -> Option<f64>| {
            let v: Vec<f64> = self.rows.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| mean(&v))
        };
        HeldOutScores {
            examples: self.rows.len(),
            tokens: self.tokens,
            nll: mean(&self.rows.iter().map(|r| r.nll).collect::<Vec<_>>()),
            nll_per_token: per_token,
            perplexity: per_token.exp(),
            kl_to_teacher: some(|r| r.kl_to_teacher),
            top1_agreement: some(|r| r.top1_agreement),
            per_example: self.rows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(rows: &[(&str, f64, Option<f64>)]) -> HeldOutScores {
        let acc = HeldOutAccumulator {
            rows: rows
                .iter()
                .map(|&(key, nll, kl)| ExampleScore {
                    key: key.into(),
                    tokens: 10,
                    nll,
                    kl_to_teacher: kl,
                    top1_agreement: None,
                })
                .collect(),
            ..Default::default()
        };
        acc.finish()
    }

    #[test]
    fn paired_difference_matches_examples_by_key() {
        // The model is better by exactly 0.1 on every shared example, whatever the spread
        // between examples; "c" has no partner and "d" no KL in the baseline.
        let base = scores(&[("a", 1.0, Some(0.5)), ("b", 3.0, Some(1.5)), ("d", 2.0, None)]);
        let model = scores(&[
            ("b", 2.9, Some(1.3)),
            ("a", 0.9, Some(0.3)),
            ("c", 9.0, Some(9.0)),
            ("d", 1.9, Some(0.1)),
        ]);
        let d = paired_difference(&model, &base).unwrap();
        assert_eq!(d.nll.n, 3);
        assert!(
            (d.nll.value + 0.1).abs() < 1e-12 && d.nll.stderr < 1e-12,
            "{:?}",
            d.nll
        );
        let kl = d.kl_to_teacher.unwrap();
        assert_eq!(kl.n, 2);
        assert!((kl.value + 0.2).abs() < 1e-12);
        assert!(d.top1_agreement.is_none());
        // The per-model interval is wide (examples differ by 2 nats); the paired one is not.
        assert!(base.nll.stderr > 0.5);
        assert!(paired_difference(&model, &scores(&[("z", 1.0, None)])).is_none());
    }

    #[test]
    fn sparse_kl_with_full_support_is_the_exact_kl() {
        // k = vocabulary: no rest bucket, so the sum is KL(p || q) in closed form.
        let p = [0.5f64, 0.3, 0.2];
        let q = [0.2f64, 0.5, 0.3];
        let teacher = TopK {
            k: 3,
            ids: vec![0, 1, 2],
            logprobs: p.iter().map(|v| v.ln() as f32).collect(),
        };
        let at: Vec<f32> = q.iter().map(|v| v.ln() as f32).collect();
        let want: f64 = p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum();
        let got = sparse_kl(&teacher, &at)[0];
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn sparse_kl_puts_the_missing_mass_in_one_bucket() {
        // top-1 of p = [0.6, 0.4 spread], q = [0.3, 0.7 spread]:
        // 0.6 ln(0.6/0.3) + 0.4 ln(0.4/0.7).
        let teacher = TopK {
            k: 2,
            ids: vec![5, u32::MAX],
            logprobs: vec![0.6f32.ln(), f32::NEG_INFINITY],
        };
        let at = vec![0.3f32.ln(), 0.0];
        let want = 0.6 * (0.6f64 / 0.3).ln() + 0.4 * (0.4f64 / 0.7).ln();
        assert!((sparse_kl(&teacher, &at)[0] - want).abs() < 1e-6);
    }
}
