//! A small parser and evaluator for normalised answers: arithmetic with implicit
//! multiplication, `\frac`, `\sqrt`, powers, `\pi`, `e`, functions, factorials, `\binom`,
//! percentages, and the structures answers come in (tuples, intervals, sets, lists, unions,
//! equations and inequalities, matrices, plain words).
//!
//! Untrusted input is bounded: at most [`MAX_TOKENS`] tokens and [`MAX_DEPTH`] levels of
//! nesting; evaluation is linear in the tree's size.

use super::number::{Num, parse_decimal};

/// Longer token lists are not parsed (the answer is then compared as text).
pub(crate) const MAX_TOKENS: usize = 600;
/// Deeper nesting is not parsed.
pub(crate) const MAX_DEPTH: usize = 48;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    /// A literal; `decimal` when written with a point or an exponent (`0.5`, `1e3`).
    Num {
        value: Num,
        decimal: bool,
    },
    Var(String),
    Pi,
    E,
    Inf,
    Neg(Box<Node>),
    Add(Box<Node>, Box<Node>),
    Sub(Box<Node>, Box<Node>),
    Mul(Box<Node>, Box<Node>),
    Div(Box<Node>, Box<Node>),
    Pow(Box<Node>, Box<Node>),
    /// `a \pm b` (`minus_first` for `\mp`): expanded into two answers before comparing.
    PlusMinus(Box<Node>, Box<Node>, bool),
    Func(&'static str, Box<Node>),
    Log(Box<Node>, Box<Node>),
    Root(Box<Node>, Box<Node>),
    Factorial(Box<Node>),
    Binom(Box<Node>, Box<Node>),
    Percent(Box<Node>),
    /// Words (`\text{Evelyn}`), lower-cased without spaces.
    Text(String),
    /// `(a, b, ...)`; a pair is also the open interval `(a, b)`.
    Tuple(Vec<Node>),
    Interval {
        lo: Box<Node>,
        hi: Box<Node>,
        lo_closed: bool,
        hi_closed: bool,
    },
    /// `\{a, b\}`.
    Set(Vec<Node>),
    /// `a, b` at the top level (or inside `{}`).
    List(Vec<Node>),
    Union(Vec<Node>),
    /// `a op b op c ...`.
    Rel {
        parts: Vec<Node>,
        ops: Vec<RelOp>,
    },
    Matrix(Vec<Vec<Node>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

const FUNCTIONS: [&str; 18] = [
    "sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "ln",
    "log", "exp", "lg", "sqrt", "abs",
];

const GREEK: [&str; 30] = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "varepsilon",
    "zeta",
    "eta",
    "theta",
    "vartheta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "varphi",
    "chi",
    "psi",
    "omega",
    "Gamma",
    "Delta",
    "Theta",
    "Lambda",
    "Omega",
];

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// A number literal as written.
    Num(String),
    /// A one-letter variable (lower-cased), with its subscript.
    Var(String),
    /// Two letters or more that are not a function name.
    Word(String),
    /// A function name, written `\sin` or `sin`.
    Func(&'static str),
    /// Any other `\command`.
    Cmd(String),
    Begin(String),
    End(String),
    /// `\{` and `\}`.
    LSet,
    RSet,
    /// `\\` between matrix rows.
    RowSep,
    Rel(RelOp),
    Sym(char),
}

type Parsed<T> = Result<T, ()>;

/// The answer's structure, or None when it is not math this parser reads.
pub(crate) fn parse(s: &str) -> Option<Node> {
    let toks = tokenize(s)?;
    if toks.is_empty() || toks.len() > MAX_TOKENS {
        return None;
    }
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
        abs_open: 0,
    };
    let items = p.comma_list().ok()?;
    if p.pos != p.toks.len() {
        return None;
    }
    let mut expanded = Vec::new();
    for item in items {
        expanded.extend(expand_plus_minus(item));
    }
    Some(if expanded.len() == 1 {
        expanded.remove(0)
    } else {
        Node::List(expanded)
    })
}

fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let chars: Vec<char> = s.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if toks.len() > MAX_TOKENS {
            return None;
        }
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            // An exponent: `1.5e3`, `2E-4` (only when digits follow).
            if i < chars.len() && (chars[i] == 'e' || chars[i] == 'E') {
                let mut j = i + 1;
                if chars.get(j).is_some_and(|&c| c == '-' || c == '+') {
                    j += 1;
                }
                if chars.get(j).is_some_and(char::is_ascii_digit) {
                    i = j;
                    while i < chars.len() && chars[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            toks.push(Tok::Num(chars[start..i].iter().collect()));
        } else if c.is_ascii_alphabetic() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_alphabetic() {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if word.len() == 1 {
                let (name, next) = subscript(&chars, i, word.to_ascii_lowercase());
                i = next;
                toks.push(Tok::Var(name));
            } else if let Some(f) = FUNCTIONS.iter().find(|f| **f == word) {
                toks.push(Tok::Func(f));
            } else {
                toks.push(Tok::Word(word.to_ascii_lowercase()));
            }
        } else if c == '\\' {
            i += 1;
            let start = i;
            while i < chars.len() && chars[i].is_ascii_alphabetic() {
                i += 1;
            }
            if i == start {
                let next = *chars.get(i)?;
                i += 1;
                toks.push(match next {
                    '{' => Tok::LSet,
                    '}' => Tok::RSet,
                    '\\' => Tok::RowSep,
                    '|' => Tok::Sym('|'),
                    _ => return None,
                });
                continue;
            }
            let name: String = chars[start..i].iter().collect();
            if name == "begin" || name == "end" {
                // `\begin{pmatrix}`: the environment's name, up to its closing brace.
                i += chars[i..].iter().take_while(|c| c.is_whitespace()).count();
                if chars.get(i) != Some(&'{') {
                    return None;
                }
                let len = chars[i + 1..].iter().position(|&c| c == '}')?;
                let env: String = chars[i + 1..i + 1 + len].iter().collect();
                i += len + 2;
                toks.push(if name == "begin" {
                    Tok::Begin(env)
                } else {
                    Tok::End(env)
                });
            } else if let Some(f) = FUNCTIONS.iter().find(|f| **f == name) {
                toks.push(Tok::Func(f));
            } else if GREEK.contains(&name.as_str()) {
                let (name, next) = subscript(&chars, i, name.to_lowercase());
                i = next;
                toks.push(Tok::Var(name));
            } else {
                toks.push(match name.as_str() {
                    "le" | "leq" | "leqslant" => Tok::Rel(RelOp::Le),
                    "ge" | "geq" | "geqslant" => Tok::Rel(RelOp::Ge),
                    "lt" => Tok::Rel(RelOp::Lt),
                    "gt" => Tok::Rel(RelOp::Gt),
                    "ne" | "neq" => Tok::Rel(RelOp::Ne),
                    "lbrace" => Tok::LSet,
                    "rbrace" => Tok::RSet,
                    "vert" | "lvert" | "rvert" | "mid" => Tok::Sym('|'),
                    _ => Tok::Cmd(name),
                });
            }
        } else {
            i += 1;
            let next = chars.get(i).copied();
            toks.push(match (c, next) {
                ('<', Some('=')) | ('≤', _) => {
                    i += usize::from(c == '<');
                    Tok::Rel(RelOp::Le)
                }
                ('>', Some('=')) | ('≥', _) => {
                    i += usize::from(c == '>');
                    Tok::Rel(RelOp::Ge)
                }
                ('≠', _) => Tok::Rel(RelOp::Ne),
                ('=', _) => Tok::Rel(RelOp::Eq),
                ('<', _) => Tok::Rel(RelOp::Lt),
                ('>', _) => Tok::Rel(RelOp::Gt),
                _ if "+-*/^()[]{},|!%&'_".contains(c) => Tok::Sym(c),
                _ => return None,
            });
        }
    }
    Some(toks)
}

/// A variable's subscript (`x_1`, `a_{n+1}`) appended to its name; returns the next index.
fn subscript(chars: &[char], i: usize, mut name: String) -> (String, usize) {
    if chars.get(i) != Some(&'_') {
        return (name, i);
    }
    match chars.get(i + 1) {
        Some('{') => match chars[i + 2..].iter().position(|&c| c == '}') {
            Some(len) => {
                name.push('_');
                name.extend(chars[i + 2..i + 2 + len].iter().filter(|c| !c.is_whitespace()));
                (name, i + 3 + len)
            }
            None => (name, i),
        },
        Some(c) if c.is_ascii_alphanumeric() => {
            name.push('_');
            name.push(*c);
            (name, i + 2)
        }
        _ => (name, i),
    }
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
    /// Open `|...|` bars: a `|` then closes one instead of starting a product.
    abs_open: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn peek_sym(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Sym(c))
    }

    fn eat_sym(&mut self, c: char) -> bool {
        let hit = self.peek_sym(c);
        self.pos += usize::from(hit);
        hit
    }

    fn expect_sym(&mut self, c: char) -> Parsed<()> {
        if self.eat_sym(c) { Ok(()) } else { Err(()) }
    }

    fn next(&mut self) -> Parsed<Tok> {
        let t = self.toks.get(self.pos).cloned().ok_or(())?;
        self.pos += 1;
        Ok(t)
    }

    fn enter(&mut self) -> Parsed<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH { Err(()) } else { Ok(()) }
    }

    /// `item, item, ...` (one item at least).
    fn comma_list(&mut self) -> Parsed<Vec<Node>> {
        let mut items = vec![self.item()?];
        while self.eat_sym(',') {
            items.push(self.item()?);
        }
        Ok(items)
    }

    /// One answer: relations joined by `\cup`; all-word items become [`Node::Text`].
    fn item(&mut self) -> Parsed<Node> {
        self.enter()?;
        if let Some(text) = self.words() {
            self.depth -= 1;
            return Ok(text);
        }
        let mut parts = vec![self.relation()?];
        while self.peek() == Some(&Tok::Cmd("cup".into())) {
            self.pos += 1;
            parts.push(self.relation()?);
        }
        self.depth -= 1;
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Node::Union(parts)
        })
    }

    /// An item of words only (`Evelyn`, `no solution`), read as [`Node::Text`].
    fn words(&mut self) -> Option<Node> {
        let run = self.toks[self.pos..]
            .iter()
            .take_while(|t| matches!(t, Tok::Word(_) | Tok::Var(_) | Tok::Sym('\'' | '-')))
            .count();
        let span = &self.toks[self.pos..self.pos + run];
        let ends_item = matches!(
            self.toks.get(self.pos + run),
            None | Some(Tok::Sym(',' | ')' | ']' | '}' | '&') | Tok::RSet | Tok::RowSep | Tok::End(_))
        );
        if !ends_item || !span.iter().any(|t| matches!(t, Tok::Word(_))) {
            return None;
        }
        let text = span
            .iter()
            .filter_map(|t| match t {
                Tok::Word(w) | Tok::Var(w) => Some(w.as_str()),
                _ => None,
            })
            .collect();
        self.pos += run;
        Some(Node::Text(text))
    }

    fn relation(&mut self) -> Parsed<Node> {
        let mut parts = vec![self.sum()?];
        let mut ops = Vec::new();
        while let Some(Tok::Rel(op)) = self.peek() {
            ops.push(*op);
            self.pos += 1;
            parts.push(self.sum()?);
        }
        Ok(if ops.is_empty() {
            parts.remove(0)
        } else {
            Node::Rel { parts, ops }
        })
    }

    fn sum(&mut self) -> Parsed<Node> {
        let mut acc = self.term()?;
        loop {
            let op = match self.peek() {
                Some(Tok::Sym(c @ ('+' | '-'))) => *c,
                Some(Tok::Cmd(c)) if c == "pm" => '±',
                Some(Tok::Cmd(c)) if c == "mp" => '∓',
                _ => return Ok(acc),
            };
            self.pos += 1;
            let (a, b) = (Box::new(acc), Box::new(self.term()?));
            acc = match op {
                '+' => Node::Add(a, b),
                '-' => Node::Sub(a, b),
                pm => Node::PlusMinus(a, b, pm == '∓'),
            };
        }
    }

    fn term(&mut self) -> Parsed<Node> {
        let mut acc = self.unary()?;
        loop {
            let (div, explicit) = match self.peek() {
                Some(Tok::Sym('*')) => (false, true),
                Some(Tok::Sym('/')) => (true, true),
                Some(Tok::Cmd(c)) if c == "cdot" || c == "times" => (false, true),
                Some(Tok::Cmd(c)) if c == "div" => (true, true),
                Some(t) if self.starts_factor(t) => (false, false),
                _ => return Ok(acc),
            };
            self.pos += usize::from(explicit);
            let rhs = if explicit { self.unary()? } else { self.power()? };
            acc = if div {
                Node::Div(Box::new(acc), Box::new(rhs))
            } else {
                Node::Mul(Box::new(acc), Box::new(rhs))
            };
        }
    }

    /// Whether `t` can begin an implicitly multiplied factor (`2x`, `3\sqrt{2}`, `x(x+1)`).
    fn starts_factor(&self, t: &Tok) -> bool {
        match t {
            Tok::Num(_) | Tok::Var(_) | Tok::Word(_) | Tok::Func(_) | Tok::Begin(_) => true,
            Tok::Sym('(' | '{') => true,
            Tok::Sym('|') => self.abs_open == 0,
            Tok::Cmd(c) => matches!(c.as_str(), "frac" | "sqrt" | "binom" | "pi" | "infty"),
            _ => false,
        }
    }

    fn unary(&mut self) -> Parsed<Node> {
        self.enter()?;
        let leading_pm = matches!(self.peek(), Some(Tok::Cmd(c)) if c == "pm" || c == "mp");
        let node = if leading_pm {
            // `\pm 2`: the answers 2 and -2.
            let minus_first = self.next()? == Tok::Cmd("mp".into());
            let zero = Node::Num {
                value: Num::int(0),
                decimal: false,
            };
            Node::PlusMinus(Box::new(zero), Box::new(self.unary()?), minus_first)
        } else if self.eat_sym('-') {
            Node::Neg(Box::new(self.unary()?))
        } else if self.eat_sym('+') {
            self.unary()?
        } else {
            self.power()?
        };
        self.depth -= 1;
        Ok(node)
    }

    fn power(&mut self) -> Parsed<Node> {
        self.enter()?;
        let base = self.postfix()?;
        let node = if self.eat_sym('^') {
            let exp = if self.eat_sym('-') {
                Node::Neg(Box::new(self.power()?))
            } else {
                self.power()?
            };
            Node::Pow(Box::new(base), Box::new(exp))
        } else {
            base
        };
        self.depth -= 1;
        Ok(node)
    }

    fn postfix(&mut self) -> Parsed<Node> {
        let mut node = self.primary()?;
        loop {
            if self.eat_sym('!') {
                node = Node::Factorial(Box::new(node));
            } else if self.eat_sym('%') {
                node = Node::Percent(Box::new(node));
            } else {
                return Ok(node);
            }
        }
    }

    fn primary(&mut self) -> Parsed<Node> {
        self.enter()?;
        let node = match self.next()? {
            Tok::Num(s) => self.number(&s)?,
            Tok::Var(v) if v == "e" => Node::E,
            Tok::Var(v) => Node::Var(v),
            Tok::Word(w) => {
                // A product of one-letter variables: read the first, leave the rest as the
                // next token (so that `yx^2` is y·x², not (yx)²).
                let rest = &w[1..];
                self.pos -= 1;
                self.toks[self.pos] = if rest.len() > 1 {
                    Tok::Word(rest.into())
                } else {
                    Tok::Var(rest.into())
                };
                Node::Var(w[..1].to_string())
            }
            Tok::Sym(open @ ('(' | '[')) => self.bracket(open)?,
            Tok::Sym('{') => {
                let mut items = self.comma_list()?;
                self.expect_sym('}')?;
                if items.len() == 1 {
                    items.remove(0)
                } else {
                    Node::List(items)
                }
            }
            Tok::LSet => {
                let items = if self.peek() == Some(&Tok::RSet) {
                    Vec::new()
                } else {
                    self.comma_list()?
                };
                (self.next()? == Tok::RSet).then_some(()).ok_or(())?;
                Node::Set(items)
            }
            Tok::Sym('|') => {
                self.abs_open += 1;
                let inner = self.sum()?;
                self.abs_open -= 1;
                self.expect_sym('|')?;
                Node::Func("abs", Box::new(inner))
            }
            Tok::Func(f) => self.function(f)?,
            Tok::Begin(env) => self.matrix(&env)?,
            Tok::Cmd(c) => self.command(&c)?,
            _ => return Err(()),
        };
        self.depth -= 1;
        Ok(node)
    }

    /// A literal; an integer directly followed by `\frac{p}{q}` is a mixed number (`2\frac{1}{2}`).
    fn number(&mut self, s: &str) -> Parsed<Node> {
        let value = parse_decimal(s).ok_or(())?;
        let decimal = s.contains(['.', 'e', 'E']);
        if !decimal && self.peek() == Some(&Tok::Cmd("frac".into())) {
            // `arg` may split a digit token, so a failed try restores the tokens too.
            let (save, saved_toks) = (self.pos, self.toks.clone());
            self.pos += 1;
            if let (
                Ok(Node::Num {
                    value: p,
                    decimal: false,
                }),
                Ok(Node::Num {
                    value: q,
                    decimal: false,
                }),
            ) = (self.arg(), self.arg())
                && let Some(frac) = p.div(q)
            {
                return Ok(Node::Num {
                    value: value.add(frac),
                    decimal: false,
                });
            }
            self.pos = save;
            self.toks = saved_toks;
        }
        Ok(Node::Num { value, decimal })
    }

    /// `( ... )` or `[ ... ]`: a group, a tuple, or an interval with open or closed ends.
    fn bracket(&mut self, open: char) -> Parsed<Node> {
        let mut items = self.comma_list()?;
        let close = match self.next()? {
            Tok::Sym(c @ (')' | ']')) => c,
            _ => return Err(()),
        };
        match items.len() {
            1 if (open == '(') == (close == ')') => Ok(items.remove(0)),
            2 if open == '(' && close == ')' => Ok(Node::Tuple(items)),
            2 => {
                let hi = items.pop().ok_or(())?;
                let lo = items.pop().ok_or(())?;
                Ok(Node::Interval {
                    lo: Box::new(lo),
                    hi: Box::new(hi),
                    lo_closed: open == '[',
                    hi_closed: close == ']',
                })
            }
            n if n > 2 && (open == '(') == (close == ')') => Ok(Node::Tuple(items)),
            _ => Err(()),
        }
    }

    /// A macro argument: `{...}`, or one token (`\frac12` reads `1` and `2`).
    fn arg(&mut self) -> Parsed<Node> {
        if self.eat_sym('{') {
            let inner = self.item()?;
            self.expect_sym('}')?;
            return Ok(inner);
        }
        if let Some(Tok::Num(s)) = self.peek().cloned()
            && s.len() > 1
            && s.chars().all(|c| c.is_ascii_digit())
        {
            self.toks[self.pos] = Tok::Num(s[1..].to_string());
            return self.number(&s[..1]);
        }
        self.primary()
    }

    fn command(&mut self, name: &str) -> Parsed<Node> {
        Ok(match name {
            "frac" => {
                let (n, d) = (self.arg()?, self.arg()?);
                Node::Div(Box::new(n), Box::new(d))
            }
            "binom" => {
                let (n, k) = (self.arg()?, self.arg()?);
                Node::Binom(Box::new(n), Box::new(k))
            }
            "sqrt" => self.function("sqrt")?,
            "pi" => Node::Pi,
            "infty" | "inf" => Node::Inf,
            "emptyset" | "varnothing" => Node::Set(Vec::new()),
            _ => return Err(()),
        })
    }

    /// `\sin x`, `\sin^2(x)`, `\log_2 8`, `\sqrt[3]{x}`, `\ln(x)`.
    fn function(&mut self, f: &'static str) -> Parsed<Node> {
        if f == "sqrt" {
            let index = if self.eat_sym('[') {
                let n = self.sum()?;
                self.expect_sym(']')?;
                n
            } else {
                Node::Num {
                    value: Num::int(2),
                    decimal: false,
                }
            };
            return Ok(Node::Root(Box::new(index), Box::new(self.arg()?)));
        }
        let base = if self.eat_sym('_') {
            Some(self.arg()?)
        } else {
            None
        };
        let power = if self.eat_sym('^') {
            Some(self.arg()?)
        } else {
            None
        };
        let arg = if self.peek_sym('(') || self.peek_sym('{') {
            self.primary()?
        } else {
            self.function_arg()?
        };
        let applied = match (f, base) {
            ("log", Some(b)) => Node::Log(Box::new(b), Box::new(arg)),
            // `\log` without a base is the common logarithm, as in math-verify.
            ("lg" | "log", None) => Node::Log(
                Box::new(Node::Num {
                    value: Num::int(10),
                    decimal: false,
                }),
                Box::new(arg),
            ),
            (_, None) => Node::Func(f, Box::new(arg)),
            _ => return Err(()),
        };
        Ok(match power {
            Some(p) => Node::Pow(Box::new(applied), Box::new(p)),
            None => applied,
        })
    }

    /// An argument without parentheses: a product without functions (`\sin 2x` is sin(2x)).
    fn function_arg(&mut self) -> Parsed<Node> {
        let mut acc = self.power()?;
        while let Some(Tok::Num(_) | Tok::Var(_) | Tok::Word(_)) = self.peek() {
            acc = Node::Mul(Box::new(acc), Box::new(self.power()?));
        }
        Ok(acc)
    }

    /// `\begin{pmatrix} a & b \\ c & d \end{pmatrix}` (any `*matrix` environment).
    fn matrix(&mut self, env: &str) -> Parsed<Node> {
        if !env.ends_with("matrix") {
            return Err(());
        }
        let mut rows = vec![vec![]];
        loop {
            match self.peek() {
                Some(Tok::End(e)) if e == env => {
                    self.pos += 1;
                    break;
                }
                Some(Tok::RowSep) => {
                    self.pos += 1;
                    rows.push(vec![]);
                }
                Some(Tok::Sym('&')) => self.pos += 1,
                Some(_) => {
                    let cell = self.item()?;
                    rows.last_mut().ok_or(())?.push(cell);
                }
                None => return Err(()),
            }
        }
        if rows.last().is_some_and(Vec::is_empty) && rows.len() > 1 {
            rows.pop();
        }
        Ok(Node::Matrix(rows))
    }
}

/// `a \pm b` -> `a + b`, `a - b` (each `\pm` doubles the answers; at most 3 are expanded).
fn expand_plus_minus(node: Node) -> Vec<Node> {
    let mut out = vec![node];
    for _ in 0..3 {
        let mut next = Vec::new();
        let mut changed = false;
        for n in out {
            match split_pm(&n) {
                Some((a, b)) => {
                    next.push(a);
                    next.push(b);
                    changed = true;
                }
                None => next.push(n),
            }
        }
        out = next;
        if !changed {
            break;
        }
    }
    out
}

/// The two readings of the first `\pm` in `n`, if any (relations and sums only).
fn split_pm(n: &Node) -> Option<(Node, Node)> {
    match n {
        Node::PlusMinus(x, y, minus_first) => {
            let plus = Node::Add(x.clone(), y.clone());
            let minus = Node::Sub(x.clone(), y.clone());
            Some(if *minus_first {
                (minus, plus)
            } else {
                (plus, minus)
            })
        }
        Node::Add(x, y) | Node::Sub(x, y) | Node::Mul(x, y) | Node::Div(x, y) => {
            let rebuild = |l: Node, r: Node| match n {
                Node::Add(..) => Node::Add(Box::new(l), Box::new(r)),
                Node::Sub(..) => Node::Sub(Box::new(l), Box::new(r)),
                Node::Mul(..) => Node::Mul(Box::new(l), Box::new(r)),
                _ => Node::Div(Box::new(l), Box::new(r)),
            };
            if let Some((l1, l2)) = split_pm(x) {
                Some((rebuild(l1, (**y).clone()), rebuild(l2, (**y).clone())))
            } else {
                let (r1, r2) = split_pm(y)?;
                Some((rebuild((**x).clone(), r1), rebuild((**x).clone(), r2)))
            }
        }
        Node::Neg(x) => split_pm(x).map(|(p, q)| (Node::Neg(Box::new(p)), Node::Neg(Box::new(q)))),
        Node::Rel { parts, ops } => parts.iter().enumerate().find_map(|(i, p)| {
            let (p1, p2) = split_pm(p)?;
            let with = |q: Node| {
                let mut parts = parts.clone();
                parts[i] = q;
                Node::Rel {
                    parts,
                    ops: ops.clone(),
                }
            };
            Some((with(p1), with(p2)))
        }),
        _ => None,
    }
}

impl Node {
    /// The value, with each variable given by `var`; None where undefined (division by an
    /// exact zero, a structure, an unknown variable).
    pub(crate) fn eval(&self, var: &dyn Fn(&str) -> Option<f64>) -> Option<Num> {
        let e = |n: &Node| n.eval(var);
        Some(match self {
            Node::Num { value, .. } => *value,
            Node::Var(v) => Num::Real(var(v)?),
            Node::Pi => Num::Real(std::f64::consts::PI),
            Node::E => Num::Real(std::f64::consts::E),
            Node::Inf => Num::Real(f64::INFINITY),
            Node::Neg(x) => e(x)?.neg(),
            Node::Add(a, b) => e(a)?.add(e(b)?),
            Node::Sub(a, b) => e(a)?.sub(e(b)?),
            Node::Mul(a, b) => e(a)?.mul(e(b)?),
            Node::Div(a, b) => e(a)?.div(e(b)?)?,
            Node::Pow(a, b) => e(a)?.pow(e(b)?),
            Node::Root(k, x) => {
                let k = e(k)?;
                match k.as_int() {
                    Some(k) if (1..=64).contains(&k) => e(x)?.root(k as u32)?,
                    _ => e(x)?.pow(Num::int(1).div(k)?),
                }
            }
            Node::Func(f, x) => apply(f, e(x)?),
            Node::Log(b, x) => Num::Real(e(x)?.f64().ln() / e(b)?.f64().ln()),
            Node::Factorial(x) => e(x)?.factorial()?,
            Node::Binom(n, k) => e(n)?.binomial(e(k)?)?,
            Node::Percent(x) => e(x)?.div(Num::int(100))?,
            _ => return None,
        })
    }

    /// Every variable the tree names, each once, in order of appearance.
    pub(crate) fn vars(&self, out: &mut Vec<String>) {
        match self {
            Node::Var(v) => {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
            _ => self.children().iter().for_each(|c| c.vars(out)),
        }
    }

    fn children(&self) -> Vec<&Node> {
        match self {
            Node::Neg(x) | Node::Func(_, x) | Node::Factorial(x) | Node::Percent(x) => vec![x],
            Node::Add(a, b)
            | Node::Sub(a, b)
            | Node::Mul(a, b)
            | Node::Div(a, b)
            | Node::Pow(a, b)
            | Node::PlusMinus(a, b, _)
            | Node::Log(a, b)
            | Node::Root(a, b)
            | Node::Binom(a, b) => vec![a, b],
            Node::Interval { lo, hi, .. } => vec![lo, hi],
            Node::Tuple(v) | Node::Set(v) | Node::List(v) | Node::Union(v) | Node::Rel { parts: v, .. } => {
                v.iter().collect()
            }
            Node::Matrix(rows) => rows.iter().flatten().collect(),
            _ => vec![],
        }
    }
}

fn apply(f: &str, x: Num) -> Num {
    if f == "abs" {
        return if x.f64() < 0.0 { x.neg() } else { x };
    }
    if f == "sqrt" {
        return x.root(2).unwrap_or(Num::Real(f64::NAN));
    }
    let v = x.f64();
    Num::Real(match f {
        "sin" => v.sin(),
        "cos" => v.cos(),
        "tan" => v.tan(),
        "sec" => 1.0 / v.cos(),
        "csc" => 1.0 / v.sin(),
        "cot" => 1.0 / v.tan(),
        "arcsin" => v.asin(),
        "arccos" => v.acos(),
        "arctan" => v.atan(),
        "sinh" => v.sinh(),
        "cosh" => v.cosh(),
        "tanh" => v.tanh(),
        "ln" => v.ln(),
        "exp" => v.exp(),
        _ => f64::NAN,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(s: &str) -> Option<f64> {
        parse(s)?.eval(&|_| None).map(Num::f64)
    }

    #[test]
    fn arithmetic() {
        let table = [
            ("1+2*3", 7.0),
            ("2^{10}", 1024.0),
            ("-2^2", -4.0),
            ("2\\frac{1}{2}", 2.5),
            ("-2\\frac{1}{2}", -2.5),
            ("\\frac12", 0.5),
            ("\\frac{\\sqrt{3}}{2}", 3f64.sqrt() / 2.0),
            ("2\\sqrt3", 2.0 * 3f64.sqrt()),
            ("\\sqrt[3]{8}", 2.0),
            ("10!", 3628800.0),
            ("\\binom{5}{2}", 10.0),
            ("\\log_2 8", 3.0),
            ("|-3|", 3.0),
            ("3\\pi", 3.0 * std::f64::consts::PI),
            ("e^2", std::f64::consts::E.powi(2)),
            ("1.5e3", 1500.0),
            ("1.5\\times10^3", 1500.0),
            ("50%", 0.5),
            ("\\sin^2(1)+\\cos^2(1)", 1.0),
        ];
        for (s, want) in table {
            let got = value(s).unwrap_or(f64::NAN);
            assert!((got - want).abs() < 1e-9, "{s}: {got} != {want}");
        }
    }

    #[test]
    fn structures() {
        assert!(matches!(parse("(1, 2)"), Some(Node::Tuple(v)) if v.len() == 2));
        assert!(matches!(
            parse("[1, 3)"),
            Some(Node::Interval {
                lo_closed: true,
                hi_closed: false,
                ..
            })
        ));
        assert!(matches!(parse("\\{1, 2\\}"), Some(Node::Set(v)) if v.len() == 2));
        assert!(matches!(parse("1, 2, 3"), Some(Node::List(v)) if v.len() == 3));
        assert!(matches!(parse("2 \\pm \\sqrt{3}"), Some(Node::List(v)) if v.len() == 2));
        assert!(matches!(parse("(-\\infty, 1) \\cup (2, \\infty)"), Some(Node::Union(v)) if v.len() == 2));
        assert!(matches!(parse("x = 5"), Some(Node::Rel { ops, .. }) if ops == [RelOp::Eq]));
        assert!(
            matches!(parse("1 < x \\le 2"), Some(Node::Rel { ops, .. }) if ops == [RelOp::Lt, RelOp::Le])
        );
        assert!(
            matches!(parse("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}"), Some(Node::Matrix(r)) if r.len() == 2)
        );
        assert_eq!(parse("Evelyn"), Some(Node::Text("evelyn".into())));
        assert_eq!(parse("x_1"), Some(Node::Var("x_1".into())));
    }

    #[test]
    fn rejects_what_it_cannot_read_and_bounds_input() {
        for s in ["", "1 +", "(1, 2", "\\unknown{3}", "1 : 2", "\\frac{1}"] {
            assert_eq!(parse(s), None, "{s:?}");
        }
        let deep = format!("{}1{}", "(".repeat(200), ")".repeat(200));
        assert_eq!(parse(&deep), None);
        let long = "1+".repeat(MAX_TOKENS) + "1";
        assert_eq!(parse(&long), None);
    }
}
