//! Recipes: one TOML file per experiment, sections `[teacher] [student] [data] [gen]
//! [soft_labels] [train] [loss] [lora] [on_policy] [eval]`. Unknown keys are errors (with the line),
//! `--set section.key=value` overrides any key, every value is range-checked (all problems at
//! once, each with its line or its `--set`), and the resolved recipe is saved beside every
//! output so a run can always be reproduced from its own directory.

mod eval;
mod generation;
mod on_policy;
mod train;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use eval::EvalSection;
pub use generation::{
    DataSection, Endpoint, GenSection, LogprobDtype, MAX_API_TOP_LOGPROBS, SoftLabelSection, SoftLabelSource,
    TeacherSection,
};
pub use on_policy::{OnPolicyDivergence, OnPolicySection, OnPolicyTeacher};
pub use train::{
    BaseQuant, KlKind, LoraSection, LossSection, MissingMass, Schedule, StudentSection, TrainSection,
};

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// Shows the OS error in its message, so it is no `source()`: the CLI prints each cause
    /// of the chain after the message, and would print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}:{line}: {msg}")]
    Parse { path: PathBuf, line: usize, msg: String },
    #[error("{path}: --set {arg}: {msg}")]
    Override { path: PathBuf, arg: String, msg: String },
    /// Values that parse but are out of range: every one found, each with where it was set.
    #[error("{}", invalid_text(path, problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

/// One setting that parses but cannot be used.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// `section.key`, as written in the TOML and in `--set` (`name` for the run name).
    pub key: String,
    /// Where the value came from.
    pub origin: Origin,
    pub msg: String,
}

/// Where a recipe value was set.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// This line of the recipe file.
    Line(usize),
    /// This `--set section.key=value` argument.
    Set(String),
    /// Nowhere: the built-in default (out of range only next to another setting).
    Default,
}

impl Problem {
    fn text(&self, path: &Path) -> String {
        let (path, key, msg) = (path.display(), &self.key, &self.msg);
        match &self.origin {
            Origin::Line(line) => format!("{path}:{line}: {key}: {msg}"),
            Origin::Set(arg) => format!("{path}: --set {arg}: {key}: {msg}"),
            Origin::Default => format!("{path}: {key} (the default): {msg}"),
        }
    }
}

/// One problem on one line; several as a count followed by one indented line each.
fn invalid_text(path: &Path, problems: &[Problem]) -> String {
    match problems {
        [one] => one.text(path),
        _ => {
            let mut out = format!("{}: {} invalid settings:", path.display(), problems.len());
            for p in problems {
                out.push_str("\n  ");
                out.push_str(&p.text(path));
            }
            out
        }
    }
}

/// A key whose resolved value differs between two recipes ([`Recipe::changes_since`]).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyChange {
    /// `section.key`.
    pub key: String,
    /// The values as TOML; None where the key is unset (an optional setting left out).
    pub was: Option<String>,
    pub now: Option<String>,
}

impl std::fmt::Display for KeyChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "unset".into());
        write!(f, "{} was {}, is {}", self.key, show(&self.was), show(&self.now))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Run name: names the checkpoint and log directories.
    pub name: String,
    #[serde(default)]
    pub teacher: TeacherSection,
    #[serde(default)]
    pub student: StudentSection,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    #[serde(rename = "gen")]
    pub generation: GenSection,
    #[serde(default)]
    pub soft_labels: SoftLabelSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub loss: LossSection,
    #[serde(default)]
    pub lora: LoraSection,
    #[serde(default)]
    pub on_policy: OnPolicySection,
    #[serde(default)]
    pub eval: EvalSection,
    /// The file this recipe was read from (not part of the TOML).
    #[serde(skip)]
    pub source: PathBuf,
}

impl Recipe {
    /// Reads `path`, applies `overrides` (each `section.key=value`, value in TOML syntax or a
    /// bare string), and validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|error| RecipeError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(&text, path, overrides)
    }

    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let parse_err = |e: toml::de::Error| RecipeError::Parse {
            path: path.to_path_buf(),
            line: e.span().map_or(0, |s| line_of(text, s.start)),
            msg: e.message().trim().to_string(),
        };
        // Typed parse of the file as written first, so errors carry its line numbers.
        let mut recipe: Recipe = toml::from_str(text).map_err(parse_err)?;
        if !overrides.is_empty() {
            let mut table: toml::Table = toml::from_str(text).map_err(parse_err)?;
            for arg in overrides {
                apply_override(&mut table, arg).map_err(|msg| RecipeError::Override {
                    path: path.to_path_buf(),
                    arg: arg.clone(),
                    msg,
                })?;
            }
            recipe = toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| RecipeError::Override {
                    path: path.to_path_buf(),
                    arg: overrides.join(" "),
                    msg: e.message().trim().to_string(),
                })?;
        }
        recipe.source = path.to_path_buf();
        let problems = recipe.problems();
        if !problems.is_empty() {
            let mut problems: Vec<Problem> = problems
                .into_iter()
                .map(|(key, msg)| Problem {
                    origin: origin_of(text, overrides, &key),
                    key,
                    msg,
                })
                .collect();
            // In the order a reader meets them: down the file, then defaults, then the --sets.
            problems.sort_by_key(|p| match &p.origin {
                Origin::Line(line) => (0, *line),
                Origin::Default => (1, 0),
                Origin::Set(arg) => (2, overrides.iter().position(|o| o == arg).unwrap_or(0)),
            });
            return Err(RecipeError::Invalid {
                path: path.to_path_buf(),
                problems,
            });
        }
        Ok(recipe)
    }

    /// Every setting out of range, as (`section.key`, what is wrong), in schema order.
    fn problems(&self) -> Vec<(String, String)> {
        let mut c = Checks::default();
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            c.fail(
                "name",
                format!("`{}` must be non-empty [A-Za-z0-9._-]", self.name),
            );
        }
        generation::validate(self, &mut c);
        train::validate(self, &mut c);
        on_policy::validate(self, &mut c);
        eval::validate(self, &mut c);
        c.problems
    }

    /// The resolved recipe as TOML, as saved beside outputs.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a recipe always serializes")
    }

    /// sha256 of the resolved TOML: manifests record it.
    pub fn hash(&self) -> String {
        format!("{:x}", Sha256::digest(self.to_toml().as_bytes()))
    }

    /// The keys (`section.key`) whose resolved values differ from `earlier`, a resolved
    /// recipe as [`Recipe::to_toml`] wrote it (beside a checkpoint, say), in key order.
    pub fn changes_since(&self, earlier: &str) -> Result<Vec<KeyChange>, toml::de::Error> {
        let was = flatten(toml::from_str(earlier)?);
        let now = flatten(toml::from_str(&self.to_toml()).expect("a resolved recipe parses"));
        let keys: std::collections::BTreeSet<&String> = was.keys().chain(now.keys()).collect();
        Ok(keys
            .into_iter()
            .filter(|k| was.get(*k) != now.get(*k))
            .map(|k| KeyChange {
                key: k.clone(),
                was: was.get(k).map(|v| v.to_string()),
                now: now.get(k).map(|v| v.to_string()),
            })
            .collect())
    }
}

/// `section.key` -> value for each key of each section, `key` -> value at the top level.
fn flatten(table: toml::Table) -> std::collections::BTreeMap<String, toml::Value> {
    let mut out = std::collections::BTreeMap::new();
    for (section, value) in table {
        match value {
            toml::Value::Table(keys) => {
                for (key, v) in keys {
                    out.insert(format!("{section}.{key}"), v);
                }
            }
            v => {
                out.insert(section, v);
            }
        }
    }
    out
}

/// The problems validation finds, each under its `section.key`.
#[derive(Default)]
pub(crate) struct Checks {
    problems: Vec<(String, String)>,
}

impl Checks {
    pub(crate) fn fail(&mut self, key: &str, msg: String) {
        self.problems.push((key.to_string(), msg));
    }

    /// A count: at least 1.
    pub(crate) fn at_least_1(&mut self, key: &str, value: u64) {
        if value == 0 {
            self.fail(key, "must be at least 1, got 0".into());
        }
    }

    /// An optional count: unset, or at least 1.
    pub(crate) fn unset_or_at_least_1(&mut self, key: &str, value: Option<u64>) {
        if value == Some(0) {
            self.fail(key, "must be at least 1 (or left out), got 0".into());
        }
    }

    /// A finite number > 0.
    pub(crate) fn positive(&mut self, key: &str, value: f64) {
        if !value.is_finite() {
            self.fail(key, format!("must be a finite number > 0, got {value}"));
        } else if value <= 0.0 {
            self.fail(key, format!("must be > 0, got {value}"));
        }
    }

    /// A finite number >= 0.
    pub(crate) fn non_negative(&mut self, key: &str, value: f64) {
        if !(value.is_finite() && value >= 0.0) {
            self.fail(key, format!("must be a finite number >= 0, got {value}"));
        }
    }

    /// `value` in `range`, which is written as a mathematician would: `[0, 1)`.
    pub(crate) fn within(&mut self, key: &str, value: f64, range: Interval) {
        let (lo, hi) = range.bounds();
        let ok = match range {
            Interval::Closed(..) => (lo..=hi).contains(&value),
            Interval::ClosedOpen(..) => (lo..hi).contains(&value),
            Interval::OpenClosed(..) => value > lo && value <= hi,
        };
        if !ok {
            self.fail(key, format!("must be in {range}, got {value}"));
        }
    }
}

/// An interval of allowed values (NaN is in none).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Interval {
    /// [lo, hi]
    Closed(f64, f64),
    /// [lo, hi)
    ClosedOpen(f64, f64),
    /// (lo, hi]
    OpenClosed(f64, f64),
}

impl Interval {
    /// [0, 1]: a share or ratio.
    pub(crate) const UNIT: Interval = Interval::Closed(0.0, 1.0);

    fn bounds(self) -> (f64, f64) {
        match self {
            Interval::Closed(lo, hi) | Interval::ClosedOpen(lo, hi) | Interval::OpenClosed(lo, hi) => {
                (lo, hi)
            }
        }
    }
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Interval::Closed(lo, hi) => write!(f, "[{lo}, {hi}]"),
            Interval::ClosedOpen(lo, hi) => write!(f, "[{lo}, {hi})"),
            Interval::OpenClosed(lo, hi) => write!(f, "({lo}, {hi}]"),
        }
    }
}

/// Where `key` (`section.key`) got its value: the last `--set` of it (or of its whole
/// section), else its line in `text`, else the default.
fn origin_of(text: &str, overrides: &[String], key: &str) -> Origin {
    let set = overrides.iter().rev().find(|arg| {
        let k = arg.split_once('=').map_or(arg.as_str(), |(k, _)| k).trim();
        k == key || key.strip_prefix(k).is_some_and(|rest| rest.starts_with('.'))
    });
    if let Some(arg) = set {
        return Origin::Set(arg.clone());
    }
    line_of_key(text, key).map_or(Origin::Default, Origin::Line)
}

/// 1-based line where `key` (`section.key`, dotted as deep as it goes) is written in `text`.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut at = None;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == part)?;
        at = Some(k.span().start);
        if parts.peek().is_some() {
            table = v.get_ref().as_table()?;
        }
    }
    at.map(|at| line_of(text, at))
}

/// 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// `section.key=value` -> table[section][key] = value. The value is read as TOML
/// (`3`, `1e-4`, `true`, `"x"`, `[1, 2]`), else taken as a string.
fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), String> {
    let (key, raw) = arg.split_once('=').ok_or("expected section.key=value")?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err("expected section.key=value".into());
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let (last, path) = parts.split_last().expect("non-empty");
    let mut cur = table;
    for p in path {
        cur = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is not a section"))?;
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, overrides: &[&str]) -> Result<Recipe, RecipeError> {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Recipe::parse(text, Path::new("r.toml"), &o)
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let err = parse("name = \"x\"\n[train]\nlr = 1e-4\nlearning_rat = 3\n", &[]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("r.toml:4:") && msg.contains("learning_rat"),
            "{msg}"
        );
    }

    #[test]
    fn overrides_set_typed_values_and_round_trip() {
        let r = parse(
            "name = \"x\"\n",
            &[
                "train.lr=3e-5",
                "lora.enabled=false",
                "student.model=Qwen/Qwen2.5-0.5B",
            ],
        )
        .unwrap();
        assert_eq!(r.train.lr, 3e-5);
        assert!(!r.lora.enabled);
        assert_eq!(r.student.model, "Qwen/Qwen2.5-0.5B");
        let again = Recipe::parse(&r.to_toml(), Path::new("resolved.toml"), &[]).unwrap();
        assert_eq!(again.to_toml(), r.to_toml());
        assert_eq!(again.hash(), r.hash());
    }

    #[test]
    fn bad_overrides_name_the_argument() {
        let err = parse("name = \"x\"\n", &["train.nope=1"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--set train.nope=1") && err.contains("nope"),
            "{err}"
        );
        let err = parse("name = \"x\"\n", &["trainlr"]).unwrap_err().to_string();
        assert!(err.contains("expected section.key=value"), "{err}");
    }

    #[test]
    fn values_out_of_range_name_file_line_and_key() {
        let err = parse("name = \"x\"\n[loss]\nkd_ratio = 1.5\n", &[])
            .unwrap_err()
            .to_string();
        assert_eq!(err, "r.toml:3: loss.kd_ratio: must be in [0, 1], got 1.5");
    }

    /// One case per kind of check; each names the file, the line and `section.key`.
    #[test]
    fn each_kind_of_bad_value_is_named_with_its_line() {
        for (text, want) in [
            // Counts.
            (
                "[train]\nepochs = 0",
                "r.toml:3: train.epochs: must be > 0, got 0",
            ),
            (
                "[train]\nepochs = -1",
                "r.toml:3: train.epochs: must be > 0, got -1",
            ),
            (
                "[train]\nmax_steps = 0",
                "r.toml:3: train.max_steps: must be at least 1 (or left out), got 0",
            ),
            (
                "[train]\ncheckpoint_every = 0",
                "r.toml:3: train.checkpoint_every: must be at least 1, got 0",
            ),
            (
                "[train]\nmicro_batch = 0",
                "r.toml:3: train.micro_batch: must be at least 1, got 0",
            ),
            ("[lora]\nr = 0", "r.toml:3: lora.r: must be at least 1, got 0"),
            ("[gen]\nn = 0", "r.toml:3: gen.n: must be at least 1, got 0"),
            (
                "[eval]\nbatch_size = 0",
                "r.toml:3: eval.batch_size: must be at least 1, got 0",
            ),
            (
                "[eval]\nkv_cache_gib = 0.0",
                "r.toml:3: eval.kv_cache_gib: must be > 0, got 0",
            ),
            (
                "[on_policy]\nkv_cache_gib = -2.0",
                "r.toml:3: on_policy.kv_cache_gib: must be > 0, got -2",
            ),
            (
                "[soft_labels]\nk = 0",
                "r.toml:3: soft_labels.k: must be at least 1, got 0",
            ),
            // Positive and finite.
            ("[train]\nlr = 0.0", "r.toml:3: train.lr: must be > 0, got 0"),
            (
                "[train]\nlr = inf",
                "r.toml:3: train.lr: must be a finite number > 0, got inf",
            ),
            (
                "[train]\nlr = nan",
                "r.toml:3: train.lr: must be a finite number > 0, got NaN",
            ),
            ("[train]\neps = 0.0", "r.toml:3: train.eps: must be > 0, got 0"),
            (
                "[loss]\ntemperature = 0.0",
                "r.toml:3: loss.temperature: must be > 0, got 0",
            ),
            (
                "[lora]\nalpha = -16.0",
                "r.toml:3: lora.alpha: must be > 0, got -16",
            ),
            // Finite and >= 0.
            (
                "[train]\nweight_decay = -0.1",
                "r.toml:3: train.weight_decay: must be a finite number >= 0, got -0.1",
            ),
            (
                "[train]\nmax_grad_norm = -1.0",
                "r.toml:3: train.max_grad_norm: must be a finite number >= 0, got -1",
            ),
            // Intervals.
            (
                "[train]\nbeta1 = 1.0",
                "r.toml:3: train.beta1: must be in [0, 1), got 1",
            ),
            (
                "[train]\nbeta2 = -0.5",
                "r.toml:3: train.beta2: must be in [0, 1), got -0.5",
            ),
            (
                "[lora]\ndropout = 1.0",
                "r.toml:3: lora.dropout: must be in [0, 1), got 1",
            ),
            (
                "[gen]\ntop_p = 0.0",
                "r.toml:3: gen.top_p: must be in (0, 1], got 0",
            ),
            (
                "[eval]\ntemperature = 2.5",
                "r.toml:3: eval.temperature: must be in [0, 2], got 2.5",
            ),
            (
                "[train]\nmin_lr_ratio = 2.0",
                "r.toml:3: train.min_lr_ratio: must be in [0, 1], got 2",
            ),
            // Dotted keys and inline tables are found too.
            ("train.lr = -1", "r.toml:2: train.lr: must be > 0, got -1"),
            ("lora = { r = 0 }", "r.toml:2: lora.r: must be at least 1, got 0"),
        ] {
            let err = parse(&format!("name = \"x\"\n{text}\n"), &[])
                .unwrap_err()
                .to_string();
            assert_eq!(err, want, "{text}");
        }
    }

    #[test]
    fn bad_values_from_overrides_name_the_set() {
        let text = "name = \"x\"\n[train]\nlr = 1e-4\n";
        let err = parse(text, &["train.lr=-1"]).unwrap_err().to_string();
        assert_eq!(err, "r.toml: --set train.lr=-1: train.lr: must be > 0, got -1");
        // The last --set of a key is the one that counts.
        let err = parse(text, &["train.epochs=0", "train.epochs=-2"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "r.toml: --set train.epochs=-2: train.epochs: must be > 0, got -2"
        );
    }

    #[test]
    fn a_default_out_of_range_next_to_another_setting_says_so() {
        let err = parse("name = \"x\"\n[gen]\nretry_max_delay_s = 0.5\n", &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "r.toml: gen.retry_base_delay_s (the default): must be in [0, gen.retry_max_delay_s = 0.5], got 1"
        );
    }

    /// What recompute keeps cannot be set with recompute off: it would do nothing.
    #[test]
    fn recompute_knobs_without_recompute_are_refused() {
        let text = "name = \"x\"\n\n[train]\nrecompute = false\noffload_block_inputs = true\n";
        let err = parse(text, &["train.block_inputs_every=2"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "r.toml:5: train.offload_block_inputs: works with train.recompute = true, which is off"
            ),
            "{err}"
        );
        assert!(err.contains("train.block_inputs_every: works with"), "{err}");
        assert!(parse("name = \"x\"\n\n[train]\noffload_block_inputs = true\n", &[]).is_ok());
    }

    /// All problems at once, in file order (not schema order), the --sets after the lines.
    #[test]
    fn every_bad_value_is_listed_at_once() {
        let text = "name = \"x\"\n\n[eval]\ntop_p = 0.0\n\n[lora]\nr = 0\n\n[train]\nepochs = 0\nlr = -1e-4\nbeta2 = 1.0\n";
        let err = parse(text, &["loss.temperature=0"]).unwrap_err();
        let RecipeError::Invalid { problems, .. } = &err else {
            panic!("{err}")
        };
        let got: Vec<(&str, &Origin)> = problems.iter().map(|p| (p.key.as_str(), &p.origin)).collect();
        assert_eq!(
            got,
            [
                ("eval.top_p", &Origin::Line(4)),
                ("lora.r", &Origin::Line(7)),
                ("train.epochs", &Origin::Line(10)),
                ("train.lr", &Origin::Line(11)),
                ("train.beta2", &Origin::Line(12)),
                ("loss.temperature", &Origin::Set("loss.temperature=0".into())),
            ]
        );
        let lines: Vec<String> = err.to_string().lines().map(String::from).collect();
        assert_eq!(
            lines,
            [
                "r.toml: 6 invalid settings:",
                "  r.toml:4: eval.top_p: must be in (0, 1], got 0",
                "  r.toml:7: lora.r: must be at least 1, got 0",
                "  r.toml:10: train.epochs: must be > 0, got 0",
                "  r.toml:11: train.lr: must be > 0, got -0.0001",
                "  r.toml:12: train.beta2: must be in [0, 1), got 1",
                "  r.toml: --set loss.temperature=0: loss.temperature: must be > 0, got 0",
            ]
        );
    }

    #[test]
    fn changes_since_names_each_changed_key() {
        let was = parse("name = \"x\"\n[train]\nlr = 1e-4\n", &[]).unwrap();
        assert!(was.changes_since(&was.to_toml()).unwrap().is_empty());
        let now = parse(
            "name = \"x\"\n[train]\nlr = 2e-4\nmax_steps = 10\n[lora]\ntargets = [\"q_proj\"]\n",
            &[],
        )
        .unwrap();
        let changes: Vec<String> = now
            .changes_since(&was.to_toml())
            .unwrap()
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(
            changes,
            [
                "lora.targets was [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"], is [\"q_proj\"]",
                "train.lr was 0.0001, is 0.0002",
                "train.max_steps was unset, is 10",
            ]
        );
        assert!(now.changes_since("name = ").is_err());
    }

    #[test]
    fn nf4_base_weights_are_a_lora_option() {
        let qlora = parse("name = \"x\"\n[lora]\nquantize = \"nf4\"\n", &[]).unwrap();
        assert_eq!(qlora.lora.quantize, BaseQuant::Nf4);
        let err = parse("name = \"x\"\n[lora]\nenabled = false\nquantize = \"nf4\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("r.toml:4: lora.quantize: "), "{err}");
        let err = parse("name = \"x\"\n[lora]\nquantize = \"int3\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("int3") && err.contains("nf4"), "{err}");
    }
}
