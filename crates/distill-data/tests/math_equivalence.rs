//! The MATH answer-equivalence table: `answers_match` on every case of
//! `fixtures/math_equivalence.jsonl`, which records math-verify's verdict per case
//! (`fixtures/math_verify_agreement.py` produces and checks that column). Our verdict must be
//! the table's `expected`, and `expected` must be math-verify's verdict unless the case says
//! why it differs. Every failing case is reported at once.

use distill_data::answers_match;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    topic: String,
    answer: String,
    reference: String,
    expected: bool,
    math_verify: Option<bool>,
    #[serde(default)]
    reason: Option<String>,
}

fn cases() -> Vec<Case> {
    include_str!("fixtures/math_equivalence.jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {}: {e}", i + 1)))
        .collect()
}

#[test]
fn answers_are_judged_as_math_verify_judges_them() {
    let cases = cases();
    assert!(cases.len() >= 150, "the table has {} cases", cases.len());
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let at = format!(
            "line {} [{}] {:?} vs reference {:?}",
            i + 1,
            c.topic,
            c.answer,
            c.reference
        );
        let got = answers_match(&c.answer, &c.reference);
        if got != c.expected {
            failures.push(format!("{at}: answers_match = {got}, expected {}", c.expected));
        }
        let reason = c.reason.as_deref().is_some_and(|r| !r.trim().is_empty());
        match c.math_verify {
            Some(mv) if mv != c.expected && !reason => failures.push(format!(
                "{at}: expected {} but math-verify says {mv}, with no reason",
                c.expected
            )),
            Some(mv) if mv == c.expected && reason => failures.push(format!(
                "{at}: a reason for a difference, but math-verify agrees ({mv})"
            )),
            _ => {}
        }
    }
    let agree = cases.iter().filter(|c| c.math_verify == Some(c.expected)).count();
    let given = cases.iter().filter(|c| c.math_verify.is_some()).count();
    println!(
        "{} cases; expected agrees with math-verify on {agree} of {given} with a verdict",
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
