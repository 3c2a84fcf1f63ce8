//! Equivalence of two parsed answers, following math-verify's rules (the answer against the
//! reference, which math-verify calls the gold):
//!
//! - an equation answer is unwrapped to its right side when the reference is not an equation
//!   (`x = 5` matches `5`), and an assignment reference (`x = 5`) when the answer is not one;
//! - equations and inequalities match when their sides' differences are proportional (a
//!   positive factor for inequalities, flipped ones included: `x > 2` = `2 < x`); an
//!   inequality reference matches the interval it describes;
//! - a reference set or comma list matches any order (`1, 2` = `2, 1`); a tuple matches in
//!   order; `(a, b)` is also the open interval; intervals match with the same ends and
//!   brackets; unions match in any order; matrices element by element;
//! - a decimal on either side compares after rounding both to 6 places (math-verify's
//!   `float_rounding`: `0.333333` = `1/3`, `0.33` ≠ `1/3`); otherwise numbers compare exactly
//!   as rationals, and expressions by value: exactly where both are rational, else within
//!   1e-9 relative, with variables at a few fixed pseudo-random points;
//! - `p%` matches `p` and `p/100`; words compare without case or spaces.

use super::expr::{Node, RelOp};
use super::number::{Num, close};

/// Points each expression with variables is evaluated at.
const POINTS: u64 = 6;
/// math-verify's `float_rounding`: decimals compare at this many places.
const DECIMAL_PLACES: u32 = 6;
/// Collections longer than this do not match (bounds the pairwise matching).
const MAX_ITEMS: usize = 200;
/// Nesting of structures compared (tuples of sets of ...).
const MAX_DEPTH: usize = 16;

/// Whether `answer` means what `reference` means.
pub(crate) fn equivalent(answer: &Node, reference: &Node) -> bool {
    equiv(answer, reference, 0)
}

fn equiv(ans: &Node, gold: &Node, depth: usize) -> bool {
    if depth > MAX_DEPTH {
        return false;
    }
    let (ans, gold) = unwrap_equations(ans, gold);
    let interval;
    let gold = match relation_as_interval(gold) {
        Some(i) if is_set_like(ans) => {
            interval = i;
            &interval
        }
        _ => gold,
    };
    match (ans, gold) {
        (Node::Text(a), g) => text_of(g).is_some_and(|g| g == *a),
        (a, Node::Text(g)) => text_of(a).is_some_and(|a| a == *g),
        (Node::Rel { parts: ap, ops: ao }, Node::Rel { parts: gp, ops: go }) => {
            relations_equal(ap, ao, gp, go, depth)
        }
        (Node::Rel { .. }, _) | (_, Node::Rel { .. }) => false,
        _ if is_collection(ans) || is_collection(gold) => collections_equal(ans, gold, depth + 1),
        _ => scalars_equal(ans, gold),
    }
}

/// A word answer's text, or a one-letter variable's name (`\text{B}` = `B`).
fn text_of(n: &Node) -> Option<&str> {
    match n {
        Node::Text(s) | Node::Var(s) => Some(s),
        Node::E => Some("e"),
        _ => None,
    }
}

fn is_equation(n: &Node) -> bool {
    matches!(n, Node::Rel { ops, .. } if ops.iter().all(|o| *o == RelOp::Eq))
}

/// An equation whose left side is a variable or a product of variables (`x = 5`, `ab = 2`).
fn is_assignment(n: &Node) -> bool {
    fn symbols(n: &Node) -> bool {
        match n {
            Node::Var(_) => true,
            Node::Mul(a, b) => symbols(a) && symbols(b),
            _ => false,
        }
    }
    matches!(n, Node::Rel { parts, .. } if is_equation(n) && symbols(&parts[0]))
}

fn last_part(n: &Node) -> &Node {
    match n {
        Node::Rel { parts, .. } => parts.last().unwrap_or(n),
        _ => n,
    }
}

/// math-verify's unwrapping: an equation answer against a non-equation reference keeps its
/// last right side; an assignment reference against a non-equation answer keeps its own.
fn unwrap_equations<'a>(ans: &'a Node, gold: &'a Node) -> (&'a Node, &'a Node) {
    if is_equation(ans) && !is_equation(gold) {
        (last_part(ans), gold)
    } else if is_assignment(gold) && !is_equation(ans) {
        (ans, last_part(gold))
    } else {
        (ans, gold)
    }
}

fn is_set_like(n: &Node) -> bool {
    matches!(n, Node::Interval { .. } | Node::Union(_) | Node::Set(_))
        || matches!(n, Node::Tuple(v) if v.len() == 2)
}

fn is_collection(n: &Node) -> bool {
    matches!(
        n,
        Node::Tuple(_)
            | Node::Set(_)
            | Node::List(_)
            | Node::Interval { .. }
            | Node::Union(_)
            | Node::Matrix(_)
    )
}

fn has_vars(n: &Node) -> bool {
    let mut v = Vec::new();
    n.vars(&mut v);
    !v.is_empty()
}

/// `x > 2` -> `(2, \infty)`, `1 \le x < 3` -> `[1, 3)`: an inequality in one variable with
/// constant bounds, as the interval it describes.
fn relation_as_interval(n: &Node) -> Option<Node> {
    let Node::Rel { parts, ops } = n else { return None };
    let inf = || Box::new(Node::Inf);
    let neg_inf = || Box::new(Node::Neg(Box::new(Node::Inf)));
    let bound = |c: &Node| (!has_vars(c)).then(|| Box::new(c.clone()));
    let interval = |lo, hi, lo_closed, hi_closed| Node::Interval {
        lo,
        hi,
        lo_closed,
        hi_closed,
    };
    match (parts.as_slice(), ops.as_slice()) {
        ([Node::Var(_), c], [op]) => {
            let c = bound(c)?;
            Some(match op {
                RelOp::Lt | RelOp::Le => interval(neg_inf(), c, false, *op == RelOp::Le),
                RelOp::Gt | RelOp::Ge => interval(c, inf(), *op == RelOp::Ge, false),
                _ => return None,
            })
        }
        ([c, v @ Node::Var(_)], [op]) => relation_as_interval(&Node::Rel {
            parts: vec![v.clone(), c.clone()],
            ops: vec![flip(*op)],
        }),
        ([a, Node::Var(_), b], [o1, o2]) => {
            let (a, b) = (bound(a)?, bound(b)?);
            let up = |o: &RelOp| matches!(o, RelOp::Lt | RelOp::Le);
            let down = |o: &RelOp| matches!(o, RelOp::Gt | RelOp::Ge);
            if up(o1) && up(o2) {
                Some(interval(a, b, *o1 == RelOp::Le, *o2 == RelOp::Le))
            } else if down(o1) && down(o2) {
                Some(interval(b, a, *o2 == RelOp::Ge, *o1 == RelOp::Ge))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// The relation read right to left (`<` becomes `>`).
fn flip(op: RelOp) -> RelOp {
    match op {
        RelOp::Lt => RelOp::Gt,
        RelOp::Le => RelOp::Ge,
        RelOp::Gt => RelOp::Lt,
        RelOp::Ge => RelOp::Le,
        o => o,
    }
}

fn relations_equal(ap: &[Node], ao: &[RelOp], gp: &[Node], go: &[RelOp], depth: usize) -> bool {
    let all_eq = |ops: &[RelOp]| ops.iter().all(|o| *o == RelOp::Eq);
    if all_eq(ao) && all_eq(go) {
        // Chains `x = 2 + 3 = 5` compare as their first = last.
        let (a, g) = ((&ap[0], &ap[ap.len() - 1]), (&gp[0], &gp[gp.len() - 1]));
        return relation_matches(a.0, RelOp::Eq, a.1, g.0, RelOp::Eq, g.1, depth);
    }
    ao.len() == go.len()
        && (0..ao.len())
            .all(|i| relation_matches(&ap[i], ao[i], &ap[i + 1], &gp[i], go[i], &gp[i + 1], depth))
}

/// `al aop ar` against `gl gop gr`, either way round.
fn relation_matches(
    al: &Node,
    aop: RelOp,
    ar: &Node,
    gl: &Node,
    gop: RelOp,
    gr: &Node,
    depth: usize,
) -> bool {
    // Orient both as `l < r`, `l <= r`, `l = r` or `l != r`.
    let orient = |l, op, r| match op {
        RelOp::Gt | RelOp::Ge => (r, flip(op), l),
        _ => (l, op, r),
    };
    let (al, aop, ar) = orient(al, aop, ar);
    let (gl, gop, gr) = orient(gl, gop, gr);
    if aop != gop {
        return false;
    }
    if aop == RelOp::Eq {
        // The same variable on one side: compare the other sides (`x = 1/3` = `x = 0.333333`).
        for (a_var, a_val, g_var, g_val) in [
            (al, ar, gl, gr),
            (ar, al, gr, gl),
            (al, ar, gr, gl),
            (ar, al, gl, gr),
        ] {
            if let (Node::Var(x), Node::Var(y)) = (a_var, g_var)
                && x == y
            {
                return equiv(a_val, g_val, depth + 1);
            }
        }
    }
    let diff = |l: &Node, r: &Node| Node::Sub(Box::new(l.clone()), Box::new(r.clone()));
    let positive_only = matches!(aop, RelOp::Lt | RelOp::Le);
    proportional(&diff(al, ar), &diff(gl, gr), positive_only)
}

/// Whether `a = c·b` for one constant `c` (positive when asked) at every sample point.
fn proportional(a: &Node, b: &Node, positive_only: bool) -> bool {
    let mut ratio: Option<f64> = None;
    let mut seen = 0;
    for (x, y) in sample_values(a, b) {
        seen += 1;
        let (zx, zy) = (close(x, 0.0), close(y, 0.0));
        if zx != zy {
            return false;
        }
        if zx {
            continue;
        }
        let r = x / y;
        match ratio {
            None => ratio = Some(r),
            Some(r0) if !close(r, r0) => return false,
            _ => {}
        }
    }
    seen > 0 && ratio.is_none_or(|r| !positive_only || r > 0.0)
}

fn collections_equal(ans: &Node, gold: &Node, depth: usize) -> bool {
    let eq = |a: &Node, g: &Node| equiv(a, g, depth);
    let open = |lo_closed: &bool, hi_closed: &bool| !lo_closed && !hi_closed;
    match (ans, gold) {
        (Node::Matrix(a), Node::Matrix(g)) => {
            a.len() == g.len()
                && a.iter()
                    .zip(g)
                    .all(|(ra, rg)| ra.len() == rg.len() && ra.iter().zip(rg).all(|(x, y)| eq(x, y)))
        }
        (
            Node::Interval {
                lo: al,
                hi: ah,
                lo_closed: alc,
                hi_closed: ahc,
            },
            Node::Interval {
                lo: gl,
                hi: gh,
                lo_closed: glc,
                hi_closed: ghc,
            },
        ) => alc == glc && ahc == ghc && eq(al, gl) && eq(ah, gh),
        (
            Node::Interval {
                lo,
                hi,
                lo_closed,
                hi_closed,
            },
            Node::Tuple(g),
        ) if g.len() == 2 => open(lo_closed, hi_closed) && eq(lo, &g[0]) && eq(hi, &g[1]),
        (
            Node::Tuple(a),
            Node::Interval {
                lo,
                hi,
                lo_closed,
                hi_closed,
            },
        ) if a.len() == 2 => open(lo_closed, hi_closed) && eq(&a[0], lo) && eq(&a[1], hi),
        (Node::Union(a), Node::Union(g)) => unordered(a, g, depth),
        (_, Node::Set(g) | Node::List(g)) => match ans {
            Node::Set(a) | Node::List(a) | Node::Tuple(a) => unordered(a, g, depth),
            a if !is_collection(a) => unordered(std::slice::from_ref(a), g, depth),
            _ => false,
        },
        (Node::Set(a) | Node::List(a) | Node::Tuple(a), Node::Tuple(g)) => {
            a.len() == g.len() && a.iter().zip(g).all(|(x, y)| eq(x, y))
        }
        (Node::Set(a) | Node::List(a), g) if !is_collection(g) => a.len() == 1 && eq(&a[0], g),
        _ => false,
    }
}

/// The same items in any order, repeats counting once (`1, 2, 2` = `1, 2`, as sets).
fn unordered(a: &[Node], g: &[Node], depth: usize) -> bool {
    if a.len() > MAX_ITEMS || g.len() > MAX_ITEMS {
        return false;
    }
    let (a, g) = (distinct(a, depth), distinct(g, depth));
    if a.len() != g.len() {
        return false;
    }
    let mut used = vec![false; a.len()];
    g.iter().all(
        |y| match (0..a.len()).find(|&i| !used[i] && equiv(a[i], y, depth)) {
            Some(i) => {
                used[i] = true;
                true
            }
            None => false,
        },
    )
}

/// The items, without those equivalent to an earlier one.
fn distinct(items: &[Node], depth: usize) -> Vec<&Node> {
    let mut kept: Vec<&Node> = Vec::new();
    for item in items {
        if !kept.iter().any(|k| equiv(item, k, depth)) {
            kept.push(item);
        }
    }
    kept
}

/// A literal written with a decimal point or exponent (`0.5`, `-1.25`, `2e3`).
fn is_decimal(n: &Node) -> bool {
    match n {
        Node::Num { decimal, .. } => *decimal,
        Node::Neg(x) => is_decimal(x),
        _ => false,
    }
}

fn constant(n: &Node) -> Option<Num> {
    if has_vars(n) { None } else { n.eval(&|_| None) }
}

fn scalars_equal(a: &Node, g: &Node) -> bool {
    match (a, g) {
        (Node::Percent(x), Node::Percent(y)) => return scalars_equal(x, y),
        (Node::Percent(x), other) | (other, Node::Percent(x)) => {
            // `50%` is 50 or 0.5, whichever the other side wrote.
            return scalars_equal(x, other) || values_equal(a, g);
        }
        _ => {}
    }
    if (is_decimal(a) || is_decimal(g))
        && let (Some(x), Some(y)) = (constant(a), constant(g))
    {
        return x.rounded(DECIMAL_PLACES).same(y.rounded(DECIMAL_PLACES));
    }
    values_equal(a, g)
}

/// Equal values: exact between rationals, else within tolerance; with variables, at every
/// sample point where both are defined (at least two).
fn values_equal(a: &Node, g: &Node) -> bool {
    if let (Some(x), Some(y)) = (constant(a), constant(g)) {
        return x.same(y);
    }
    let mut agreed = 0;
    for (x, y) in sample_values(a, g) {
        if !close(x, y) {
            return false;
        }
        agreed += 1;
    }
    agreed >= 2
}

/// Both expressions at each sample point where both are finite numbers.
fn sample_values(a: &Node, b: &Node) -> Vec<(f64, f64)> {
    let mut vars = Vec::new();
    a.vars(&mut vars);
    b.vars(&mut vars);
    let points = if vars.is_empty() { 1 } else { POINTS };
    (0..points)
        .filter_map(|p| {
            let at = |name: &str| Some(sample(name, p));
            let (x, y) = (a.eval(&at)?.f64(), b.eval(&at)?.f64());
            (x.is_finite() && y.is_finite()).then_some((x, y))
        })
        .collect()
}

/// A variable's value at point `p`: in ±[0.5, 3.5), positive at the first three points.
fn sample(name: &str, p: u64) -> f64 {
    // FNV-1a over the name and the point.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes().chain(p.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let magnitude = 0.5 + (h % 3_000_000) as f64 / 1e6;
    if p < 3 || h & (1 << 40) == 0 {
        magnitude
    } else {
        -magnitude
    }
}
