//! Numbers for answer comparison: an exact rational while it fits in i128, else an f64.
//!
//! Arithmetic stays exact through `+ - * /`, integer powers, perfect roots, factorials and
//! binomials; anything else (π, e, irrational roots, trigonometry, overflow) falls back to
//! f64. Every operation is bounded: no loop runs longer than a small constant.

/// The largest `n` for which `n!` and `binom(n, k)` are computed (beyond it: not a number).
const MAX_FACTORIAL: i128 = 1000;
/// The largest exponent an exact power is computed for (beyond it: f64).
const MAX_EXACT_EXPONENT: u32 = 256;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Num {
    /// Numerator and positive denominator, in lowest terms.
    Rat(i128, i128),
    Real(f64),
}

impl Num {
    pub(crate) fn int(n: i128) -> Num {
        Num::Rat(n, 1)
    }

    /// `n / d` in lowest terms; None when `d` is zero.
    pub(crate) fn rat(n: i128, d: i128) -> Option<Num> {
        if d == 0 {
            return None;
        }
        let g = gcd(n.unsigned_abs(), d.unsigned_abs()).max(1);
        // g divides both, so the quotients fit; i128::MIN / -1 cannot arise as g >= 1 is positive.
        let (mut n, mut d) = (n / g as i128, d / g as i128);
        if d < 0 {
            match (n.checked_neg(), d.checked_neg()) {
                (Some(a), Some(b)) => (n, d) = (a, b),
                _ => return Some(Num::Real(n as f64 / d as f64)),
            }
        }
        Some(Num::Rat(n, d))
    }

    pub(crate) fn f64(self) -> f64 {
        match self {
            Num::Rat(n, d) => n as f64 / d as f64,
            Num::Real(f) => f,
        }
    }

    pub(crate) fn is_exact(self) -> bool {
        matches!(self, Num::Rat(..))
    }

    /// The integer value, when this is an exact integer.
    pub(crate) fn as_int(self) -> Option<i128> {
        match self {
            Num::Rat(n, 1) => Some(n),
            _ => None,
        }
    }

    pub(crate) fn neg(self) -> Num {
        match self {
            Num::Rat(n, d) => n
                .checked_neg()
                .map_or(Num::Real(-(n as f64) / d as f64), |n| Num::Rat(n, d)),
            Num::Real(f) => Num::Real(-f),
        }
    }

    pub(crate) fn add(self, o: Num) -> Num {
        if let (Num::Rat(a, b), Num::Rat(c, d)) = (self, o) {
            let exact = (|| {
                let g = gcd(b.unsigned_abs(), d.unsigned_abs()) as i128;
                let n = a.checked_mul(d / g)?.checked_add(c.checked_mul(b / g)?)?;
                Num::rat(n, b.checked_mul(d / g)?)
            })();
            if let Some(r) = exact {
                return r;
            }
        }
        Num::Real(self.f64() + o.f64())
    }

    pub(crate) fn sub(self, o: Num) -> Num {
        self.add(o.neg())
    }

    pub(crate) fn mul(self, o: Num) -> Num {
        if let (Num::Rat(a, b), Num::Rat(c, d)) = (self, o) {
            let exact = (|| {
                let g1 = gcd(a.unsigned_abs(), d.unsigned_abs()).max(1) as i128;
                let g2 = gcd(c.unsigned_abs(), b.unsigned_abs()).max(1) as i128;
                Num::rat((a / g1).checked_mul(c / g2)?, (b / g2).checked_mul(d / g1)?)
            })();
            if let Some(r) = exact {
                return r;
            }
        }
        Num::Real(self.f64() * o.f64())
    }

    /// None on an exact division by zero (a float division by zero gives an infinity or NaN).
    pub(crate) fn div(self, o: Num) -> Option<Num> {
        match o {
            Num::Rat(0, _) => None,
            Num::Rat(c, d) => Some(self.mul(Num::rat(d, c)?)),
            Num::Real(f) => Some(Num::Real(self.f64() / f)),
        }
    }

    pub(crate) fn pow(self, e: Num) -> Num {
        if let (Num::Rat(n, d), Some(k)) = (self, e.as_int())
            && k.unsigned_abs() <= MAX_EXACT_EXPONENT as u128
        {
            let k32 = k.unsigned_abs() as u32;
            if let (Some(pn), Some(pd)) = (n.checked_pow(k32), d.checked_pow(k32)) {
                let r = if k >= 0 {
                    Num::rat(pn, pd)
                } else {
                    Num::rat(pd, pn)
                };
                if let Some(r) = r {
                    return r;
                }
            }
        }
        // A rational exponent p/q on an exact base: an exact q-th root when there is one.
        if let (Num::Rat(_, _), Num::Rat(p, q)) = (self, e)
            && q > 1
            && q <= 64
            && let Some(root) = self.root(q as u32)
            && root.is_exact()
        {
            return root.pow(Num::int(p));
        }
        Num::Real(self.f64().powf(e.f64()))
    }

    /// The real `k`-th root: exact for perfect powers, negative bases only for odd `k`.
    pub(crate) fn root(self, k: u32) -> Option<Num> {
        if k == 0 {
            return None;
        }
        if let Num::Rat(n, d) = self {
            if n < 0 && k.is_multiple_of(2) {
                return Some(Num::Real(f64::NAN));
            }
            if let (Some(rn), Some(rd)) = (int_root(n.unsigned_abs(), k), int_root(d.unsigned_abs(), k)) {
                let rn = rn as i128;
                return Num::rat(if n < 0 { -rn } else { rn }, rd as i128);
            }
        }
        let x = self.f64();
        Some(Num::Real(if x < 0.0 && !k.is_multiple_of(2) {
            -(-x).powf(1.0 / k as f64)
        } else {
            x.powf(1.0 / k as f64)
        }))
    }

    pub(crate) fn factorial(self) -> Option<Num> {
        let n = self.as_int().filter(|n| (0..=MAX_FACTORIAL).contains(n))?;
        let mut acc = Num::int(1);
        for i in 2..=n {
            acc = acc.mul(Num::int(i));
        }
        Some(acc)
    }

    pub(crate) fn binomial(self, k: Num) -> Option<Num> {
        let (n, k) = (self.as_int()?, k.as_int()?);
        if !(0..=MAX_FACTORIAL).contains(&n) {
            return None;
        }
        if k < 0 || k > n {
            return Some(Num::int(0));
        }
        let k = k.min(n - k);
        let mut acc = Num::int(1);
        for i in 0..k {
            acc = acc.mul(Num::int(n - i)).div(Num::int(i + 1))?;
        }
        Some(acc)
    }

    /// The value rounded to `places` decimals, as math-verify rounds a decimal answer before
    /// comparing it: exact for rationals that fit, else through f64.
    pub(crate) fn rounded(self, places: u32) -> Num {
        let scale = 10i128.pow(places);
        if let Num::Rat(n, d) = self {
            // Round half away from zero: floor((2|n|·s + d) / 2d).
            let exact = (|| {
                let twice = n.checked_abs()?.checked_mul(scale)?.checked_mul(2)?;
                let q = twice.checked_add(d)? / d.checked_mul(2)?;
                Num::rat(if n < 0 { -q } else { q }, scale)
            })();
            if let Some(r) = exact {
                return r;
            }
        }
        let s = scale as f64;
        Num::Real((self.f64() * s).round() / s)
    }

    /// Equality: exact between rationals, else within a relative 1e-9 (and 1e-12 near zero).
    pub(crate) fn same(self, o: Num) -> bool {
        match (self, o) {
            (Num::Rat(a, b), Num::Rat(c, d)) => a == c && b == d,
            _ => close(self.f64(), o.f64()),
        }
    }
}

/// Two floats equal up to rounding error: same infinity, or within 1e-9 relative / 1e-12 absolute.
pub(crate) fn close(a: f64, b: f64) -> bool {
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    if a.is_nan() || b.is_nan() {
        return false;
    }
    (a - b).abs() <= 1e-12_f64.max(1e-9 * a.abs().max(b.abs()))
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The exact integer `k`-th root of `n`, when `n` is a perfect `k`-th power.
fn int_root(n: u128, k: u32) -> Option<u128> {
    if n < 2 || k == 1 {
        return Some(n);
    }
    let guess = (n as f64).powf(1.0 / k as f64).round() as u128;
    (guess.saturating_sub(1)..=guess + 1).find(|r| r.checked_pow(k) == Some(n))
}

/// A decimal literal (`12`, `0.75`, `.5`, `1.5e-3`) as an exact rational where it fits.
pub(crate) fn parse_decimal(s: &str) -> Option<Num> {
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], s[i + 1..].parse::<i32>().ok()?),
        None => (s, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty()
        || !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit())
        || exp.unsigned_abs() > 400
    {
        return None;
    }
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    let scale = frac.len() as i32 - exp;
    let exact = (|| {
        let n: i128 = if digits.is_empty() {
            0
        } else {
            digits.parse().ok()?
        };
        let p = 10i128.checked_pow(scale.unsigned_abs())?;
        if scale >= 0 {
            Num::rat(n, p)
        } else {
            Some(Num::int(n.checked_mul(p)?))
        }
    })();
    exact.or_else(|| {
        format!(
            "{}{}e{exp}",
            if int.is_empty() { "0" } else { int },
            if frac.is_empty() {
                String::new()
            } else {
                format!(".{frac}")
            }
        )
        .parse()
        .ok()
        .map(Num::Real)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_arithmetic() {
        let half = Num::rat(1, 2).unwrap();
        assert_eq!(half.add(Num::rat(1, 3).unwrap()), Num::Rat(5, 6));
        assert_eq!(Num::int(2).pow(Num::int(10)), Num::int(1024));
        assert_eq!(Num::int(2).pow(Num::int(-2)), Num::Rat(1, 4));
        assert_eq!(Num::int(12).root(2), Some(Num::Real(12f64.sqrt())));
        assert_eq!(Num::int(8).root(3), Some(Num::int(2)));
        assert_eq!(Num::int(-8).root(3), Some(Num::int(-2)));
        assert_eq!(Num::int(4).pow(Num::rat(3, 2).unwrap()), Num::int(8));
        assert_eq!(Num::int(10).factorial(), Some(Num::int(3628800)));
        assert_eq!(Num::int(5).binomial(Num::int(2)), Some(Num::int(10)));
        assert_eq!(Num::int(1).div(Num::int(0)), None);
        assert!(Num::int(200).factorial().is_some_and(|n| !n.is_exact()));
        assert_eq!(Num::int(5000).factorial(), None);
    }

    #[test]
    fn decimals_and_rounding() {
        assert_eq!(parse_decimal("0.75"), Some(Num::Rat(3, 4)));
        assert_eq!(parse_decimal(".5"), Some(Num::Rat(1, 2)));
        assert_eq!(parse_decimal("1.5e3"), Some(Num::int(1500)));
        assert_eq!(parse_decimal("25e-2"), Some(Num::Rat(1, 4)));
        assert_eq!(parse_decimal("1e999"), None);
        assert_eq!(parse_decimal("."), None);
        assert!(parse_decimal("1e300").is_some_and(|n| (n.f64() - 1e300).abs() < 1e290));
        let third = Num::rat(1, 3).unwrap();
        assert_eq!(third.rounded(6), Num::Rat(333333, 1000000));
        assert_eq!(Num::rat(-2, 3).unwrap().rounded(6), Num::Rat(-666667, 1000000));
        assert!(close(0.1 + 0.2, 0.3));
        assert!(!close(1.0, 1.0 + 1e-6));
        assert!(close(f64::INFINITY, f64::INFINITY) && !close(f64::INFINITY, f64::NEG_INFINITY));
    }
}
