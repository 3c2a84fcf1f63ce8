//! Final-answer extraction and equivalence: the teacher's (or a student's) final answer out of
//! free text, and whether it matches a reference. gen-data uses it to mark `correct` (and for
//! rejection sampling); `distill eval` uses it to score.
//!
//! Extraction looks, after any `</think>`, for (in order) the last `\boxed{...}` (nested
//! braces, `\fbox`, `\boxed 5`), the last GSM8K `#### n`, the last "answer is ..." / "Answer:"
//! phrase, and finally the last number. Equivalence compares numbers exactly as rationals
//! (`1,000` = `1000.00`, `$18` = `18 dollars`, `\frac{3}{4}` = `3/4` = `0.75`, `50\%` = `50`)
//! and everything else as text with LaTeX spacing, `\text{}` wrappers and case removed.

/// Where in the text the answer was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerSource {
    Boxed,
    Hashes,
    Phrase,
    LastNumber,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The answer as written (e.g. `\frac{1}{2}`, `1,000`, `$18`).
    pub text: String,
    pub source: AnswerSource,
}

/// The final answer in `text`, or None when there is nothing answer-like.
pub fn extract_answer(text: &str) -> Option<Answer> {
    let text = match text.rfind("</think>") {
        Some(i) => &text[i + "</think>".len()..],
        None => text,
    };
    let found = |text: String, source| Some(Answer { text, source });
    if let Some(b) = last_boxed(text) {
        return found(b, AnswerSource::Boxed);
    }
    if let Some(h) = after_hashes(text) {
        return found(h, AnswerSource::Hashes);
    }
    if let Some(p) = after_phrase(text) {
        return found(p, AnswerSource::Phrase);
    }
    last_number(text).map(|n| Answer {
        text: n,
        source: AnswerSource::LastNumber,
    })
}

/// The short reference answer of a dataset's reference field: the boxed or `#### n` answer of
/// a worked solution (MATH, GSM8K), else the whole field trimmed.
pub fn reference_answer(raw: &str) -> String {
    last_boxed(raw)
        .or_else(|| after_hashes(raw))
        .unwrap_or_else(|| raw.trim().to_string())
}

/// Whether two answers mean the same: numbers compare by value, anything else as normalised
/// text.
pub fn answers_match(answer: &str, reference: &str) -> bool {
    match (canonical(answer), canonical(reference)) {
        (Value::Num(a), Value::Num(b)) => a.same(&b),
        (Value::Text(a), Value::Text(b)) => !a.is_empty() && a == b,
        _ => false,
    }
}

/// The last `\boxed{...}` / `\fbox{...}` with non-empty content; braces may nest.
fn last_boxed(text: &str) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    for macro_name in ["\\boxed", "\\fbox"] {
        for (at, _) in text.match_indices(macro_name) {
            let rest = &text[at + macro_name.len()..];
            let content = if let Some(inner) = rest.strip_prefix('{') {
                braced(inner)
            } else if rest.starts_with(' ') {
                // `\boxed 5`: up to the next space or `$`.
                let r = rest.trim_start();
                let end = r.find([' ', '$', '\n']).unwrap_or(r.len());
                Some(&r[..end])
            } else {
                None
            };
            if let Some(c) = content.map(str::trim).filter(|c| !c.is_empty())
                && best.as_ref().is_none_or(|(b, _)| at > *b)
            {
                best = Some((at, c.to_string()));
            }
        }
    }
    best.map(|(_, s)| s)
}

/// The content up to the `}` closing an already-opened `{`; None when it never closes.
fn braced(s: &str) -> Option<&str> {
    let mut depth = 1usize;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&s[..i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// GSM8K's `#### 72`: the rest of the line after the last `####`.
fn after_hashes(text: &str) -> Option<String> {
    let at = text.rfind("####")?;
    let line = text[at + 4..].lines().next().unwrap_or("").trim();
    (!line.is_empty()).then(|| line.to_string())
}

/// "The final answer is 72." / "Answer: 72": the rest of the sentence after the last such phrase.
fn after_phrase(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let at = ["answer is", "answer:", "answer =", "answer would be"]
        .iter()
        .filter_map(|p| lower.rfind(p).map(|i| i + p.len()))
        .max()?;
    let rest = text[at..].trim_start_matches([' ', ':', '*', '\t']);
    let line = rest.lines().next().unwrap_or("");
    // End of sentence: ". " or a final period (not a decimal point).
    let mut end = line.len();
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'.' && bytes.get(i + 1).is_none_or(|n| !n.is_ascii_digit()) {
            end = i;
            break;
        }
    }
    let s = line[..end].trim().trim_matches('*').trim();
    (!s.is_empty() && s.chars().any(|c| c.is_alphanumeric())).then(|| s.to_string())
}

/// The last number in the text (`-1,234.5`, `3/4`).
fn last_number(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut last = None;
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() {
            let mut start = i;
            if start > 0 && (chars[start - 1] == '-' || chars[start - 1] == '.') {
                start -= 1;
            }
            let mut j = i;
            while j < chars.len() {
                let c = chars[j];
                let next_digit = chars.get(j + 1).is_some_and(|n| n.is_ascii_digit());
                if c.is_ascii_digit() || ((c == ',' || c == '.' || c == '/') && next_digit) {
                    j += 1;
                } else {
                    break;
                }
            }
            last = Some(chars[start..j].iter().collect::<String>());
            i = j;
        } else {
            i += 1;
        }
    }
    last
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Num(Num),
    Text(String),
}

/// An exact rational where it fits in i128, else a float.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Rat(i128, i128),
    Float(f64),
}

impl Num {
    fn rat(n: i128, d: i128) -> Option<Num> {
        if d == 0 {
            return None;
        }
        let g = gcd(n.unsigned_abs(), d.unsigned_abs()).max(1) as i128;
        let (mut n, mut d) = (n / g, d / g);
        if d < 0 {
            n = -n;
            d = -d;
        }
        Some(Num::Rat(n, d))
    }

    fn to_f64(self) -> f64 {
        match self {
            Num::Rat(n, d) => n as f64 / d as f64,
            Num::Float(f) => f,
        }
    }

    fn neg(self) -> Num {
        match self {
            Num::Rat(n, d) => Num::Rat(-n, d),
            Num::Float(f) => Num::Float(-f),
        }
    }

    fn div(self, other: Num) -> Option<Num> {
        match (self, other) {
            (Num::Rat(a, b), Num::Rat(c, d)) => match (a.checked_mul(d), b.checked_mul(c)) {
                (Some(n), Some(m)) => Num::rat(n, m),
                _ => Some(Num::Float(self.to_f64() / other.to_f64())),
            },
            _ if other.to_f64() == 0.0 => None,
            _ => Some(Num::Float(self.to_f64() / other.to_f64())),
        }
    }

    fn same(&self, other: &Num) -> bool {
        match (self, other) {
            (Num::Rat(a, b), Num::Rat(c, d)) => a == c && b == d,
            _ => {
                let (a, b) = (self.to_f64(), other.to_f64());
                (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
            }
        }
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Strips LaTeX and typography that do not change an answer's meaning.
fn clean(s: &str) -> String {
    let mut s = s.trim().to_string();
    // Unwrap \text{..}, \mathrm{..}, \textbf{..}, \mbox{..}, \boxed{..} to their content.
    for wrapper in [
        "\\text", "\\mathrm", "\\textbf", "\\mathbf", "\\mbox", "\\boxed", "\\textit",
    ] {
        while let Some(at) = s.find(&format!("{wrapper}{{")) {
            let inner_start = at + wrapper.len() + 1;
            match braced(&s[inner_start..]) {
                Some(inner) => {
                    let inner = inner.to_string();
                    s.replace_range(at..inner_start + inner.len() + 1, &inner);
                }
                None => break,
            }
        }
    }
    for (from, to) in [
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("{,}", ","),
        ("\\left", ""),
        ("\\right", ""),
        ("\\displaystyle", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\:", ""),
        ("\\ ", " "),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
        ("\\%", ""),
        ("%", ""),
        ("\\$", ""),
        ("$", ""),
        ("**", ""),
        ("\\(", ""),
        ("\\)", ""),
        ("\\[", ""),
        ("\\]", ""),
        ("−", "-"),
    ] {
        s = s.replace(from, to);
    }
    let mut s = s.trim().trim_end_matches('.').trim().to_string();
    // "x = 5" -> "5" (a single variable name then '=').
    if let Some((lhs, rhs)) = s.split_once('=') {
        let lhs = lhs.trim();
        if !lhs.is_empty() && lhs.len() <= 2 && lhs.chars().all(|c| c.is_ascii_alphabetic()) {
            s = rhs.trim().to_string();
        }
    }
    s
}

fn canonical(s: &str) -> Value {
    let s = clean(s);
    if let Some(n) = parse_value(&s) {
        return Value::Num(n);
    }
    // A number followed by unit words: "18 dollars", "5 cm".
    if let Some((head, tail)) = s.split_once(' ')
        && tail
            .chars()
            .all(|c| c.is_alphabetic() || c == ' ' || c == '.' || c == '^' || c.is_ascii_digit())
        && tail.chars().next().is_some_and(|c| c.is_alphabetic())
        && let Some(n) = parse_value(head)
    {
        return Value::Num(n);
    }
    let mut text: String = s
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_lowercase();
    // "(B)" = "B" for multiple choice.
    if text.len() == 3 && text.starts_with('(') && text.ends_with(')') {
        text = text[1..2].to_string();
    }
    Value::Text(text)
}

/// A number, a fraction `a/b`, or `\frac{a}{b}` / `\frac ab`, possibly negative.
fn parse_value(s: &str) -> Option<Num> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('-') {
        return parse_value(rest).map(Num::neg);
    }
    if let Some(rest) = s.strip_prefix('+') {
        return parse_value(rest);
    }
    if let Some(rest) = s.strip_prefix("\\frac") {
        let rest = rest.trim_start();
        let (num, rest) = frac_arg(rest)?;
        let (den, rest) = frac_arg(rest.trim_start())?;
        if !rest.trim().is_empty() {
            return None;
        }
        return parse_value(num)?.div(parse_value(den)?);
    }
    if let Some((a, b)) = s.split_once('/') {
        return parse_number(a.trim())?.div(parse_number(b.trim())?);
    }
    parse_number(s)
}

/// One `\frac` argument: `{...}` or a single character.
fn frac_arg(s: &str) -> Option<(&str, &str)> {
    if let Some(inner) = s.strip_prefix('{') {
        let content = braced(inner)?;
        Some((content, &inner[content.len() + 1..]))
    } else {
        let c = s.chars().next()?;
        Some((&s[..c.len_utf8()], &s[c.len_utf8()..]))
    }
}

/// `1234`, `1,234`, `-0.5`, `.5`, `12.`; thousands separators must group by three.
fn parse_number(s: &str) -> Option<Num> {
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let digits: String = if int.contains(',') {
        let groups: Vec<&str> = int.split(',').collect();
        let ok = !groups[0].is_empty()
            && groups[0].len() <= 3
            && groups[1..].iter().all(|g| g.len() == 3)
            && groups.iter().all(|g| g.chars().all(|c| c.is_ascii_digit()));
        if !ok {
            return None;
        }
        groups.concat()
    } else {
        if !int.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        int.to_string()
    };
    let all = format!("{digits}{frac}");
    let value = match (all.parse::<i128>(), 10i128.checked_pow(frac.len() as u32)) {
        (Ok(n), Some(d)) => Num::rat(n, d)?,
        _ => Num::Float(format!("{digits}.{frac}0").parse().ok()?),
    };
    Some(if neg { value.neg() } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction_table() {
        use AnswerSource::*;
        let table: &[(&str, Option<(&str, AnswerSource)>)] = &[
            ("so the total is \\boxed{72}.", Some(("72", Boxed))),
            ("\\boxed{\\frac{1}{2}}", Some(("\\frac{1}{2}", Boxed))),
            (
                "\\boxed{\\frac{\\sqrt{3}}{2}} and more",
                Some(("\\frac{\\sqrt{3}}{2}", Boxed)),
            ),
            ("first \\boxed{3} then \\boxed{5}", Some(("5", Boxed))),
            ("\\boxed{5} then \\boxed{}", Some(("5", Boxed))),
            ("$\\boxed 7$", Some(("7", Boxed))),
            ("\\fbox{12}", Some(("12", Boxed))),
            ("\\boxed{\\text{(B)}}", Some(("\\text{(B)}", Boxed))),
            ("\\boxed{\\{1, 2\\}}", Some(("\\{1, 2\\}", Boxed))),
            ("unclosed \\boxed{12 and 13", Some(("13", LastNumber))),
            ("Natalia sold 48+24 = 72 clips.\n#### 72", Some(("72", Hashes))),
            ("#### 1,000\n", Some(("1,000", Hashes))),
            ("The final answer is $18.", Some(("$18", Phrase))),
            ("**Answer:** 3/4\nthanks", Some(("3/4", Phrase))),
            ("so the answer is 0.5. Done", Some(("0.5", Phrase))),
            ("she has 5 apples and 7 pears, so 12", Some(("12", LastNumber))),
            ("costs -3.5 dollars", Some(("-3.5", LastNumber))),
            (
                "earned 1,234,567 in 2020, i.e. 3,000",
                Some(("3,000", LastNumber)),
            ),
            ("<think>maybe \\boxed{4}</think>It is 5.", Some(("5", LastNumber))),
            ("<think>the answer is 4</think>\\boxed{6}", Some(("6", Boxed))),
            ("no numbers here", None),
            ("", None),
        ];
        for (text, want) in table {
            let got = extract_answer(text).map(|a| (a.text, a.source));
            let want = want.map(|(t, s)| (t.to_string(), s));
            assert_eq!(got, want, "extracting from {text:?}");
        }
    }

    #[test]
    fn equivalence_table() {
        let same = [
            ("72", "72"),
            ("72.0", "72"),
            ("72.00", "72"),
            ("1,000", "1000"),
            ("1{,}000", "1000"),
            ("$18", "18"),
            ("\\$18.00", "18"),
            ("18 dollars", "18"),
            ("\\text{18 dollars}", "18"),
            ("18\\text{ dollars}", "18"),
            ("\\frac{1}{2}", "0.5"),
            ("\\dfrac{3}{4}", "3/4"),
            ("\\frac34", "0.75"),
            ("-\\frac{1}{3}", "-2/6"),
            ("50\\%", "50"),
            ("x = 5", "5"),
            ("x=-2", "-2"),
            ("90^\\circ", "90"),
            ("\\text{(B)}", "B"),
            ("(c)", "C"),
            ("\\left( 1, 2 \\right)", "(1,2)"),
            ("\\sqrt{2}", "\\sqrt{2}"),
            (".5", "1/2"),
            ("−7", "-7"),
            (
                "123456789012345678901234567890",
                "123456789012345678901234567890.0",
            ),
        ];
        for (a, b) in same {
            assert!(answers_match(a, b), "{a:?} should match {b:?}");
            assert!(answers_match(b, a), "{b:?} should match {a:?}");
        }
        let different = [
            ("72", "73"),
            ("0.33", "1/3"),
            ("1,00", "100"),
            ("12,34", "1234"),
            ("\\frac{1}{2}", "2"),
            ("-5", "5"),
            ("", ""),
            ("1/2", "2/1"),
            ("\\sqrt{2}", "\\sqrt{3}"),
            ("18 dollars", "180"),
        ];
        for (a, b) in different {
            assert!(!answers_match(a, b), "{a:?} should not match {b:?}");
        }
    }

    #[test]
    fn references_are_reduced_to_their_final_answer() {
        assert_eq!(
            reference_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72"),
            "72"
        );
        assert_eq!(
            reference_answer("so $x = \\boxed{\\frac{1}{2}}$."),
            "\\frac{1}{2}"
        );
        assert_eq!(reference_answer("  42 \n"), "42");
    }
}
