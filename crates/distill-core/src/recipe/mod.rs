//! Recipes: one TOML file per experiment, sections `[teacher] [student] [data] [gen]
//! [soft_labels] [train] [loss] [lora] [eval]`. Unknown keys are errors (with the line),
//! `--set section.key=value` overrides any key, and the resolved recipe is saved beside every
//! output so a run can always be reproduced from its own directory.

mod eval;
mod generation;
mod train;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use eval::EvalSection;
pub use generation::{
    DataSection, Endpoint, GenSection, LogprobDtype, MAX_API_TOP_LOGPROBS, SoftLabelSection, SoftLabelSource,
    TeacherSection,
};
pub use train::{
    BaseQuant, KlKind, LoraSection, LossSection, MissingMass, Schedule, StudentSection, TrainSection,
};

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {msg}")]
    Parse { path: PathBuf, line: usize, msg: String },
    #[error("{path}: --set {arg}: {msg}")]
    Override { path: PathBuf, arg: String, msg: String },
    #[error("{path}: [{section}] {field}: {msg}")]
    Invalid {
        path: PathBuf,
        section: &'static str,
        field: &'static str,
        msg: String,
    },
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
    pub eval: EvalSection,
    /// The file this recipe was read from (not part of the TOML).
    #[serde(skip)]
    pub source: PathBuf,
}

impl Recipe {
    /// Reads `path`, applies `overrides` (each `section.key=value`, value in TOML syntax or a
    /// bare string), and validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Io {
            path: path.to_path_buf(),
            source,
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
        recipe.validate()?;
        Ok(recipe)
    }

    fn validate(&self) -> Result<(), RecipeError> {
        let invalid = |section, field, msg: String| RecipeError::Invalid {
            path: self.source.clone(),
            section,
            field,
            msg,
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(invalid(
                "recipe",
                "name",
                format!("`{}` must be non-empty [A-Za-z0-9._-]", self.name),
            ));
        }
        generation::validate(self, &invalid)?;
        train::validate(self, &invalid)?;
        eval::validate(self, &invalid)?;
        Ok(())
    }

    /// The resolved recipe as TOML, as saved beside outputs.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a recipe always serializes")
    }

    /// sha256 of the resolved TOML: manifests record it.
    pub fn hash(&self) -> String {
        format!("{:x}", Sha256::digest(self.to_toml().as_bytes()))
    }
}

pub(crate) type Invalid<'a> = dyn Fn(&'static str, &'static str, String) -> RecipeError + 'a;

/// A share or ratio: `value` must lie in [0, 1].
pub(crate) fn in_unit_interval(
    invalid: &Invalid,
    section: &'static str,
    field: &'static str,
    value: f64,
) -> Result<(), RecipeError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(invalid(section, field, format!("must be in [0, 1], got {value}")))
    }
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
    fn values_out_of_range_name_section_and_field() {
        let err = parse("name = \"x\"\n[loss]\nkd_ratio = 1.5\n", &[])
            .unwrap_err()
            .to_string();
        assert_eq!(err, "r.toml: [loss] kd_ratio: must be in [0, 1], got 1.5");
    }

    #[test]
    fn nf4_base_weights_are_a_lora_option() {
        let qlora = parse("name = \"x\"\n[lora]\nquantize = \"nf4\"\n", &[]).unwrap();
        assert_eq!(qlora.lora.quantize, BaseQuant::Nf4);
        let err = parse("name = \"x\"\n[lora]\nenabled = false\nquantize = \"nf4\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("r.toml: [lora] quantize: "), "{err}");
        let err = parse("name = \"x\"\n[lora]\nquantize = \"int3\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("int3") && err.contains("nf4"), "{err}");
    }
}
