//! Final-answer extraction and equivalence: the teacher's (or a student's) final answer out of
//! free text, and whether it matches a reference. gen-data uses it to mark `correct` (and for
//! rejection sampling); `distill eval` uses it to score.
//!
//! Extraction looks, after any `</think>`, for (in order) the last `\boxed{...}` (nested
//! braces, `\fbox`, `\boxed 5`), the last GSM8K `#### n`, the last "answer is ..." / "Answer:"
//! phrase, and finally the last number.
//!
//! Equivalence judges as math-verify (and so lighteval's MATH metric) does, without sympy:
//!
//! 1. [`latex`] normalises both sides: delimiters, `\boxed`, `\left`/`\right`, spacing,
//!    `\text{}` wrappers, trailing units (`5\text{ cm}` = `5`), degree signs, `\$`,
//!    `\dfrac`, thousands separators (`1{,}000`), a trailing period;
//! 2. texts equal once spaces and case are dropped match at once;
//! 3. [`expr`] parses each side into numbers, expressions (`\frac`, `\sqrt`, powers, `\pi`,
//!    implicit products, mixed numbers `2\frac12`), tuples, intervals, sets, comma lists,
//!    `\pm`, unions, equations, inequalities, matrices or words;
//! 4. [`compare`] decides: numbers exactly as rationals (a decimal rounds both sides to 6
//!    places first, as math-verify does), expressions by value (with variables, at fixed
//!    pseudo-random points), sets and comma lists in any order, tuples in order, `x = 5`
//!    against `5`, `50\%` against `50` or `0.5`, words without case.
//!
//! Where math-verify's verdict differs on purpose (`18 dollars` = `18`, `1\,000` = `1000`,
//! `1.5e3` = `1500`, `12.` = `12`, ...), `tests/fixtures/math_equivalence.jsonl` says so case
//! by case; `tests/fixtures/math_verify_agreement.py` checks the table against math-verify.
//! Unparseable answers (unknown commands, over-long input) match only as equal text.

mod compare;
mod expr;
mod latex;
mod number;

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

/// Whether `answer` means what `reference` means, judged as math-verify judges a MATH answer
/// (see the module documentation). Untrusted input is bounded: over [`latex::MAX_LEN`]
/// characters only the trimmed texts are compared.
pub fn answers_match(answer: &str, reference: &str) -> bool {
    let (answer, reference) = (latex::normalize(answer), latex::normalize(reference));
    let squash = |s: &str| {
        s.chars()
            .filter(|c| !c.is_whitespace())
            .flat_map(char::to_lowercase)
            .collect::<String>()
    };
    let (flat_answer, flat_reference) = (squash(&answer), squash(&reference));
    if flat_answer.is_empty() || flat_reference.is_empty() {
        return false;
    }
    if flat_answer == flat_reference {
        return true;
    }
    match (expr::parse(&answer), expr::parse(&reference)) {
        (Some(a), Some(r)) => compare::equivalent(&a, &r),
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
                latex::braced(inner)
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

    /// Hostile answers (huge powers and factorials, deep nesting, long input, many items)
    /// are judged without panicking; the length, token and depth caps keep each call short.
    #[test]
    fn untrusted_input_is_bounded() {
        let deep = format!("{}1{}", "(".repeat(5000), ")".repeat(5000));
        let nested_sqrt = format!("{}2{}", "\\sqrt{".repeat(40), "}".repeat(40));
        let many = (0..400).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
        let hostile = [
            "10^{10^{10^{10}}}".to_string(),
            "2^{2^{2^{2^{2^{2}}}}}".to_string(),
            "9999999999!".to_string(),
            "1000!".to_string(),
            "\\binom{1000}{500}".to_string(),
            "\\binom{100000000}{50000000}".to_string(),
            "1e400".to_string(),
            "0.000000000000000000000000000000000000000001".to_string(),
            "x^{x^{x^{x^{x}}}}".to_string(),
            deep.clone(),
            nested_sqrt,
            many.clone(),
            format!("{{{}}}", many),
            "\\frac{".repeat(300),
            "\\boxed{".repeat(300),
            "1+".repeat(2000) + "1",
            "\\left(".repeat(100),
            "|".repeat(200),
            "\\pm 1 \\pm 2 \\pm 3 \\pm 4 \\pm 5".to_string(),
            "\\begin{pmatrix}".to_string() + &"1 & ".repeat(300) + "\\end{pmatrix}",
        ];
        for a in &hostile {
            for b in &hostile {
                let _ = answers_match(a, b);
            }
            assert!(
                answers_match(a, a) || a.trim().is_empty(),
                "{a:.40} should match itself"
            );
        }
        assert!(!answers_match(&deep, "2"));
        assert!(answers_match("\\binom{1000}{500}", "\\binom{1000}{500}"));
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
