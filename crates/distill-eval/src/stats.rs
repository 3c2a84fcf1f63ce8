//! Estimates with their uncertainty: means with standard errors, proportions with Wilson
//! intervals, the unbiased pass@k estimator and majority voting.

use serde::Serialize;

/// z for a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// A metric as reported: its value, standard error, 95% interval and sample count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub value: f64,
    pub stderr: f64,
    pub ci95: [f64; 2],
    pub n: usize,
}

impl Estimate {
    /// "0.412 ± 0.031" (half-width of the 95% interval), or "n/a" without data.
    pub fn display(&self, digits: usize) -> String {
        if self.n == 0 || !self.value.is_finite() {
            return "n/a".into();
        }
        let half = (self.ci95[1] - self.ci95[0]) / 2.0;
        format!("{:.digits$} ± {:.digits$}", self.value, half)
    }
}

/// Mean of per-example values with the standard error of the mean (sample standard
/// deviation / sqrt(n)) and a normal 95% interval.
pub fn mean(values: &[f64]) -> Estimate {
    let n = values.len();
    if n == 0 {
        return Estimate {
            value: f64::NAN,
            stderr: f64::NAN,
            ci95: [f64::NAN, f64::NAN],
            n,
        };
    }
    let m = values.iter().sum::<f64>() / n as f64;
    let stderr = if n > 1 {
        let var = values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1) as f64;
        (var / n as f64).sqrt()
    } else {
        f64::NAN
    };
    let half = Z95 * stderr;
    Estimate {
        value: m,
        stderr,
        ci95: if half.is_finite() {
            [m - half, m + half]
        } else {
            [m, m]
        },
        n,
    }
}

/// [`mean`] of values in [0, 1] (per-problem pass rates): the normal interval clipped to
/// [0, 1], which a few problems with extreme rates would otherwise overrun (pass@1 12.5% over
/// four problems reading "-12% to 37%").
pub fn mean_share(values: &[f64]) -> Estimate {
    let mut e = mean(values);
    e.ci95 = [e.ci95[0].max(0.0), e.ci95[1].min(1.0)];
    e
}

/// A share of successes with the Wilson score interval, which stays inside [0, 1] and is
/// honest at 0/n and n/n, where the normal interval collapses to a point.
pub fn proportion(successes: usize, n: usize) -> Estimate {
    if n == 0 {
        return mean(&[]);
    }
    let (k, nf) = (successes as f64, n as f64);
    let p = k / nf;
    let z2 = Z95 * Z95;
    let centre = (p + z2 / (2.0 * nf)) / (1.0 + z2 / nf);
    let half = Z95 / (1.0 + z2 / nf) * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt();
    Estimate {
        value: p,
        stderr: (p * (1.0 - p) / nf).sqrt(),
        ci95: [(centre - half).max(0.0), (centre + half).min(1.0)],
        n,
    }
}

/// The unbiased pass@k of Chen et al. (2021): the chance that at least one of k samples drawn
/// without replacement from n generations, c of them correct, is correct:
/// 1 - C(n-c, k) / C(n, k), computed as a product to stay finite for large n.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    assert!(
        k >= 1 && k <= n && c <= n,
        "pass@{k} needs 1 <= k <= n = {n} and c = {c} <= n"
    );
    if n - c < k {
        return 1.0;
    }
    let miss: f64 = (n - c + 1..=n).map(|i| 1.0 - k as f64 / i as f64).product();
    1.0 - miss
}

/// The most frequent answer among `answers` under `same` (answers that mean the same vote
/// together); ties go to the answer seen first. None when no sample gave an answer.
pub fn majority<'a>(answers: &[Option<&'a str>], same: impl Fn(&str, &str) -> bool) -> Option<&'a str> {
    let mut groups: Vec<(&'a str, usize)> = Vec::new();
    for a in answers.iter().flatten() {
        match groups.iter_mut().find(|(rep, _)| same(rep, a)) {
            Some((_, count)) => *count += 1,
            None => groups.push((a, 1)),
        }
    }
    let best = groups.iter().map(|&(_, c)| c).max()?;
    groups.into_iter().find(|&(_, c)| c == best).map(|(rep, _)| rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force over all k-subsets: the definition pass@k estimates.
    fn pass_at_k_by_enumeration(n: usize, c: usize, k: usize) -> f64 {
        let (mut hit, mut total) = (0u64, 0u64);
        for mask in 0u32..(1 << n) {
            if mask.count_ones() as usize != k {
                continue;
            }
            total += 1;
            // Samples 0..c are the correct ones.
            if (0..c).any(|i| mask & (1 << i) != 0) {
                hit += 1;
            }
        }
        hit as f64 / total as f64
    }

    #[test]
    fn pass_at_k_equals_the_subset_definition() {
        for n in 1..=8 {
            for c in 0..=n {
                for k in 1..=n {
                    let want = pass_at_k_by_enumeration(n, c, k);
                    let got = pass_at_k(n, c, k);
                    assert!((got - want).abs() < 1e-12, "n={n} c={c} k={k}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn pass_at_1_is_the_share_correct() {
        assert!((pass_at_k(16, 5, 1) - 5.0 / 16.0).abs() < 1e-12);
        assert_eq!(pass_at_k(200, 0, 10), 0.0);
        assert_eq!(pass_at_k(200, 195, 10), 1.0);
    }

    #[test]
    fn wilson_interval_matches_the_closed_form() {
        // Reference values: statsmodels' proportion_confint(k, n, method="wilson"), i.e.
        // the Wilson score formula evaluated independently in Python.
        let e = proportion(7, 20);
        assert!((e.ci95[0] - 0.181_191_8).abs() < 1e-6, "{e:?}");
        assert!((e.ci95[1] - 0.567_145_7).abs() < 1e-6, "{e:?}");
        let zero = proportion(0, 10);
        assert_eq!(zero.ci95[0], 0.0);
        assert!((zero.ci95[1] - 0.277_532_8).abs() < 1e-6, "{zero:?}");
    }

    #[test]
    fn mean_reports_the_standard_error_of_the_mean() {
        let e = mean(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(e.value, 2.5);
        // sample sd = sqrt(5/3); se = sd / 2
        assert!((e.stderr - (5.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
        assert_eq!(e.n, 4);
        assert!(mean(&[]).value.is_nan());
    }

    #[test]
    fn a_mean_of_shares_keeps_its_interval_inside_0_and_1() {
        // One of four problems at 0.5, three at 0: the normal interval starts below 0.
        let rates = [0.5, 0.0, 0.0, 0.0];
        assert!(mean(&rates).ci95[0] < 0.0);
        let e = mean_share(&rates);
        assert_eq!((e.value, e.ci95[0]), (0.125, 0.0));
        assert_eq!(e.ci95[1], mean(&rates).ci95[1]);
        assert_eq!(mean_share(&[1.0, 1.0, 0.5]).ci95[1], 1.0);
    }

    #[test]
    fn majority_groups_equivalent_answers_and_breaks_ties_by_order() {
        let same = |a: &str, b: &str| a.trim_start_matches('$') == b.trim_start_matches('$');
        let votes = [Some("$18"), Some("7"), None, Some("18"), Some("7")];
        // "$18" and "18" are one group of 2, "7" a group of 2: the first seen wins.
        assert_eq!(majority(&votes, same), Some("$18"));
        assert_eq!(majority(&[Some("3"), Some("4"), Some("4")], same), Some("4"));
        assert_eq!(majority(&[None, None], same), None);
    }
}
