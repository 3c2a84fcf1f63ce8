//! LaTeX normalisation: the answer as written, reduced to the plain math the parser reads.
//!
//! Removes what does not change an answer's meaning: math delimiters (`$`, `\(`, `\[`),
//! `\boxed{}`, `\left`/`\right`, spacing commands, `\displaystyle`, degree signs, currency,
//! `\text{}`-style wrappers, trailing units (`5\text{ cm}`, `18 dollars`), thousands separators
//! (`1{,}000`, `1\,000`), a trailing period; `\dfrac`/`\tfrac` become `\frac`, "and"/"or"
//! between answers become commas, and "percent" becomes `%`.

/// Inputs longer than this are not normalised or parsed, only compared as trimmed text.
pub(crate) const MAX_LEN: usize = 1000;

/// Stands in for `\\` while single-backslash commands are replaced.
const ROW_BREAK: &str = "\u{1}";

/// Macros whose argument is kept and the macro dropped.
const WRAPPERS: [&str; 12] = [
    "\\boxed",
    "\\fbox",
    "\\textbf",
    "\\textit",
    "\\textrm",
    "\\textnormal",
    "\\text",
    "\\mathrm",
    "\\mathbf",
    "\\mathit",
    "\\mbox",
    "\\operatorname",
];

/// Plain substitutions, applied in order.
const REPLACEMENTS: [(&str, &str); 40] = [
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("\\cfrac", "\\frac"),
    ("\\dbinom", "\\binom"),
    ("\\tbinom", "\\binom"),
    ("\\left.", ""),
    ("\\right.", ""),
    ("\\left", ""),
    ("\\right", ""),
    ("\\middle", ""),
    ("\\displaystyle", ""),
    ("\\limits", ""),
    ("{,}", ","),
    ("\\!", ""),
    ("\\qquad", " "),
    ("\\quad", " "),
    ("\\,", " "),
    ("\\;", " "),
    ("\\:", " "),
    ("\\ ", " "),
    ("~", " "),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("\\circ", ""),
    ("\\degree", ""),
    ("°", ""),
    ("\\%", "%"),
    ("\\$", ""),
    ("$", ""),
    ("\\(", ""),
    ("\\)", ""),
    ("\\[", ""),
    ("\\]", ""),
    ("**", ""),
    ("−", "-"),
    ("×", "\\times "),
    ("·", "\\cdot "),
    ("÷", "\\div "),
    ("π", "\\pi "),
    ("∞", "\\infty "),
];

/// The answer reduced to plain math; inputs over [`MAX_LEN`] come back trimmed only.
pub(crate) fn normalize(s: &str) -> String {
    let s = s.trim();
    if s.len() > MAX_LEN {
        return s.to_string();
    }
    // `\\` (a matrix row break) is set aside so that `\\ `, `\\[` are not read as `\ `, `\[`.
    let mut s = unwrap_macros(s, &["\\boxed", "\\fbox"]).replace("\\\\", ROW_BREAK);
    for (from, to) in REPLACEMENTS {
        if s.contains(from) {
            s = s.replace(from, to);
        }
    }
    s = s.replace(ROW_BREAK, "\\\\");
    for _ in 0..2 {
        s = strip_trailing_text_unit(&s);
    }
    s = unwrap_macros(&s, &WRAPPERS);
    s = replace_words(&s);
    s = strip_trailing_unit_words(&s);
    let s = s.trim().trim_end_matches(['.', ' ']).trim();
    join_thousands(s).unwrap_or_else(|| s.to_string())
}

/// `\name{X}` -> `X` for every listed macro (the argument may hold nested braces).
fn unwrap_macros(s: &str, names: &[&str]) -> String {
    let mut out = s.to_string();
    for name in names {
        let mut from = 0;
        while let Some(rel) = out[from..].find(name) {
            let at = from + rel;
            let after = at + name.len();
            // `\text` must not match the start of `\textbf`: the macro name ends here.
            let rest = &out[after..];
            if rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
                from = after;
                continue;
            }
            let open = after + (rest.len() - rest.trim_start().len());
            match out[open..].strip_prefix('{').and_then(braced) {
                Some(inner) => {
                    let inner = inner.to_string();
                    out.replace_range(at..open + inner.len() + 2, &inner);
                    from = at;
                }
                None => from = after,
            }
        }
    }
    out
}

/// The content up to the `}` closing an already-opened `{`; None when it never closes.
pub(crate) fn braced(s: &str) -> Option<&str> {
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

/// `5\text{ cm}`, `3\mbox{ inches}^2` -> `5`, `3`: a final text macro of unit-like words after
/// a value (a digit, letter, `}` or `)`).
fn strip_trailing_text_unit(s: &str) -> String {
    let trimmed = s.trim_end();
    // An optional power on the unit: `^2`, `^{2}`.
    let body = ["^{2}", "^{3}", "^2", "^3"]
        .iter()
        .find_map(|p| trimmed.strip_suffix(p))
        .unwrap_or(trimmed);
    let Some(inner_end) = body.strip_suffix('}').map(str::len) else {
        return s.to_string();
    };
    for name in ["\\text", "\\mbox", "\\mathrm", "\\textrm"] {
        let Some(at) = body.rfind(&format!("{name}{{")) else {
            continue;
        };
        let open = at + name.len() + 1;
        if braced(&body[open..]).map(str::len) != inner_end.checked_sub(open) {
            continue;
        }
        let unit = &body[open..inner_end];
        let prefix = body[..at].trim_end();
        let unit_like = unit.chars().any(|c| c.is_alphabetic())
            && unit
                .chars()
                .all(|c| c.is_alphabetic() || " .^0123456789/".contains(c))
            && !is_joining_word(unit.trim());
        let after_value = prefix
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '}' || c == ')');
        if unit_like && after_value {
            return prefix.to_string();
        }
    }
    s.to_string()
}

fn is_joining_word(w: &str) -> bool {
    w.eq_ignore_ascii_case("and") || w.eq_ignore_ascii_case("or")
}

/// Whole words: "and" / "or" between answers -> `,`, "percent" -> `%`.
fn replace_words(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphabetic()) {
        let len = rest[start..]
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len() - start);
        let word = &rest[start..start + len];
        let command = rest[..start].ends_with('\\');
        out.push_str(&rest[..start]);
        if command {
            out.push_str(word);
        } else if is_joining_word(word) {
            // Also swallow a comma before it: "1, 2, and 3".
            let kept = out.trim_end().trim_end_matches(',').len();
            out.truncate(kept);
            out.push(',');
        } else if ["percent", "percentage", "pct"]
            .iter()
            .any(|p| word.eq_ignore_ascii_case(p))
        {
            out.truncate(out.trim_end().len());
            out.push('%');
        } else {
            out.push_str(word);
        }
        rest = &rest[start + len..];
    }
    out.push_str(rest);
    out
}

/// `18 dollars`, `5 square feet` -> `18`, `5`: plain words (two letters or more) after a
/// number, where the part before holds no letters outside LaTeX commands.
fn strip_trailing_unit_words(s: &str) -> String {
    let mut s = s.trim_end().to_string();
    while let Some((head, word)) = s.rsplit_once(' ') {
        let head = head.trim_end();
        let is_word = word.len() >= 2 && word.chars().all(|c| c.is_ascii_alphabetic());
        if !is_word || head.is_empty() || !is_numeric_prefix(head) {
            break;
        }
        s = head.to_string();
    }
    s
}

/// Digits, operators and LaTeX commands only, ending in a digit or a closing brace.
fn is_numeric_prefix(s: &str) -> bool {
    let mut in_command = false;
    for c in s.chars() {
        match c {
            '\\' => in_command = true,
            c if c.is_ascii_alphabetic() => {
                if !in_command {
                    return false;
                }
            }
            _ => in_command = false,
        }
    }
    s.chars().any(|c| c.is_ascii_digit()) && s.ends_with(|c: char| c.is_ascii_digit() || c == '}' || c == '%')
}

/// `1,000,000`, `12 345.5` -> digits only: the whole answer one number grouped by thousands.
fn join_thousands(s: &str) -> Option<String> {
    let body = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    for sep in [',', ' '] {
        let groups: Vec<&str> = int.split(sep).map(str::trim).collect();
        let grouped = groups.len() > 1
            && (1..=3).contains(&groups[0].len())
            && groups[1..].iter().all(|g| g.len() == 3)
            && groups.iter().all(|g| g.chars().all(|c| c.is_ascii_digit()));
        if grouped && (sep == ',' || !int.contains(',')) {
            let sign = if s.starts_with('-') { "-" } else { "" };
            let dot = if body.contains('.') { "." } else { "" };
            return Some(format!("{sign}{}{dot}{frac}", groups.concat()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_table() {
        let table = [
            ("$\\boxed{5}$", "5"),
            ("\\(x\\)", "x"),
            ("\\left( 1, 2 \\right)", "( 1, 2 )"),
            ("\\dfrac{1}{2}", "\\frac{1}{2}"),
            ("5\\text{ cm}", "5"),
            ("5 \\text{cm}^2", "5"),
            ("\\frac{1}{2}\\mbox{ inches}", "\\frac{1}{2}"),
            ("\\text{Evelyn}", "Evelyn"),
            ("\\textbf{(A)}", "(A)"),
            ("18 dollars", "18"),
            ("\\text{18 dollars}", "18"),
            ("90^\\circ", "90"),
            ("90^{\\circ}", "90"),
            ("50\\%", "50%"),
            ("50 percent", "50%"),
            ("1{,}000", "1000"),
            ("1,000,000", "1000000"),
            ("1\\,000", "1000"),
            ("-12 345.5", "-12345.5"),
            ("1,00", "1,00"),
            ("12.", "12"),
            ("1, 2, and 3", "1, 2, 3"),
            ("1 \\text{ or } 2", "1,  2"),
            ("\\text{even}", "even"),
            ("x \\text{ and } y", "x,  y"),
            ("\\$18.00", "18.00"),
            ("−7", "-7"),
            (
                "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
                "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
            ),
        ];
        let wrong: Vec<String> = table
            .iter()
            .filter(|(input, want)| normalize(input) != *want)
            .map(|(input, want)| format!("{input:?} -> {:?}, want {want:?}", normalize(input)))
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn overlong_input_is_left_alone() {
        let long = format!("  {}  ", "1+".repeat(MAX_LEN));
        assert_eq!(normalize(&long), long.trim());
    }
}
