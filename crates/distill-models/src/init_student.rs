//! Student initialisation by layer selection, as DistilBERT and Minitron do: keep some of a
//! teacher's decoder blocks (every other one, or a given list), renumber them 0..L'-1, and copy
//! the embeddings, final norm and untied head unchanged. The result is an ordinary HF model
//! directory (config.json, model.safetensors, tokenizer files) that transformers also loads.
//!
//! Tensors are copied as stored, byte for byte: a bf16 teacher gives a bf16 student with no
//! f32 round trip, so the kept blocks compute exactly what they computed in the teacher.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use serde_json::Value;

use distill_hf::config::DecoderConfig;
use distill_hf::error::{ModelError, read_json};
use distill_hf::tokenizer::{TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};
use distill_hf::weights::{Checkpoint, SINGLE_FILE};

/// Files copied verbatim from the source when present (config.json is rewritten instead).
pub const COPIED_FILES: [&str; 5] = [
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    TEMPLATE_FILE,
    "generation_config.json",
    "special_tokens_map.json",
];

const CONFIG_FILE: &str = "config.json";
/// config.json keys holding one entry per layer (transformers validates their length).
const PER_LAYER_KEYS: [&str; 1] = ["layer_types"];
const LAYER_PREFIX: &str = "model.layers.";

#[derive(Debug, thiserror::Error)]
pub enum InitStudentError {
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The layer selection does not fit the source model; the caller names its flag or key.
    #[error("{0}")]
    Selection(String),
    #[error("{path}: already exists and is not empty; pass --force to replace it")]
    OutputExists { path: PathBuf },
    /// Shows the OS error in its message, so it is no `source()`: the CLI prints each cause
    /// of the chain after the message, and would print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: cannot write safetensors: {msg}")]
    Write { path: PathBuf, msg: String },
}

type Result<T, E = InitStudentError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InitStudentError + '_ {
    move |error| InitStudentError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Which of the source's decoder blocks the student keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerSelection {
    /// These 0-based indices, strictly increasing (unsorted or repeated lists are refused:
    /// reordering or duplicating blocks is more likely a typo than a plan).
    List(Vec<usize>),
    /// Layers 0, step, 2*step, ...; with `keep_last` also the final layer, which Minitron-style
    /// pruning keeps because it feeds the final norm and head.
    Every { step: usize, keep_last: bool },
}

impl LayerSelection {
    /// The kept indices for a source of `num_layers` blocks, increasing and in range.
    pub fn resolve(&self, num_layers: usize) -> Result<Vec<usize>> {
        let refuse = |msg: String| Err(InitStudentError::Selection(msg));
        match self {
            LayerSelection::List(layers) => {
                if layers.is_empty() {
                    return refuse("the layer list is empty; keep at least one layer".into());
                }
                if let Some(&bad) = layers.iter().find(|&&l| l >= num_layers) {
                    return refuse(format!(
                        "layer {bad} is out of range; the source has {num_layers} layers (0-{})",
                        num_layers - 1
                    ));
                }
                if let Some(pair) = layers.windows(2).find(|w| w[0] >= w[1]) {
                    let why = if pair[0] == pair[1] {
                        "repeated"
                    } else {
                        "not increasing"
                    };
                    return refuse(format!(
                        "layers must be strictly increasing, but {} then {} is {why}",
                        pair[0], pair[1]
                    ));
                }
                Ok(layers.clone())
            }
            LayerSelection::Every { step, keep_last } => {
                if *step == 0 {
                    return refuse("the step must be at least 1".into());
                }
                let mut kept: Vec<usize> = (0..num_layers).step_by(*step).collect();
                if *keep_last && kept.last() != Some(&(num_layers - 1)) {
                    kept.push(num_layers - 1);
                }
                Ok(kept)
            }
        }
    }
}

/// What [`init_student`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct InitSummary {
    pub source_layers: usize,
    /// Source indices kept, in order; student layer i is source layer `kept[i]`.
    pub kept: Vec<usize>,
    pub params_before: usize,
    pub params_after: usize,
    /// Stored tensors per dtype in the student, e.g. {"BF16": 21}.
    pub dtypes: BTreeMap<String, usize>,
    /// The files written under the output directory, config and weights first.
    pub files: Vec<String>,
}

/// Builds the student from the model directory `source` into `out`, atomically: everything is
/// written to a temporary directory beside `out`, checked, then renamed into place.
pub fn init_student(
    source: &Path,
    out: &Path,
    selection: &LayerSelection,
    force: bool,
) -> Result<InitSummary> {
    let config = DecoderConfig::from_dir(source)?;
    let checkpoint = Checkpoint::open(source)?;
    checkpoint.check(&config.expected_tensors(), config.architecture.hf_name())?;
    let kept = selection.resolve(config.num_hidden_layers)?;
    check_destination(out, force)?;
    let (student, dtypes, files) = write_dir(out, |tmp| {
        write_config(&source.join(CONFIG_FILE), &kept, &tmp.join(CONFIG_FILE))?;
        let dtypes = write_weights(&checkpoint, &kept, &tmp.join(SINGLE_FILE))?;
        let mut files = vec![CONFIG_FILE.to_string(), SINGLE_FILE.to_string()];
        files.extend(copy_side_files(source, tmp)?);
        // Load the result as every consumer will before it can replace anything.
        let student = DecoderConfig::from_dir(tmp)?;
        Checkpoint::open(tmp)?.check(&student.expected_tensors(), student.architecture.hf_name())?;
        Ok((student, dtypes, files))
    })?;
    Ok(InitSummary {
        source_layers: config.num_hidden_layers,
        kept,
        params_before: config.parameter_count(),
        params_after: student.parameter_count(),
        dtypes,
        files,
    })
}

/// The source's config.json with `num_hidden_layers` and per-layer lists cut to the kept
/// layers; every other key is kept, in its order, so transformers reads it as before.
fn write_config(src: &Path, kept: &[usize], dst: &Path) -> Result<()> {
    let mut json: Value = read_json(src)?;
    let object = json
        .as_object_mut()
        .ok_or_else(|| ModelError::invalid(src, "config.json is not a JSON object"))?;
    for key in PER_LAYER_KEYS {
        if let Some(list) = object.get_mut(key) {
            *list = kept_entries(list, kept)
                .map_err(|msg| ModelError::invalid(src, format!("`{key}`: {msg}")))?;
        }
    }
    object.insert("num_hidden_layers".into(), kept.len().into());
    let mut text = serde_json::to_string_pretty(&json).expect("a JSON value serializes");
    text.push('\n');
    std::fs::write(dst, text).map_err(io(dst))
}

fn kept_entries(list: &Value, kept: &[usize]) -> std::result::Result<Value, String> {
    let Some(entries) = list.as_array() else {
        return Err("expected a list with one entry per layer".into());
    };
    kept.iter()
        .map(|&l| {
            entries
                .get(l)
                .cloned()
                .ok_or_else(|| format!("has {} entries, layer {l} has none", entries.len()))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// `model.layers.{i}.rest` -> `model.layers.{j}.rest` where `kept[j] == i`, None for a dropped
/// layer; names outside the layers (embeddings, final norm, head) are kept as they are.
fn student_name(name: &str, renumber: &HashMap<usize, usize>) -> Option<String> {
    let Some(rest) = name.strip_prefix(LAYER_PREFIX) else {
        return Some(name.to_string());
    };
    let (index, tail) = rest.split_once('.')?;
    let new = renumber.get(&index.parse::<usize>().ok()?)?;
    Some(format!("{LAYER_PREFIX}{new}.{tail}"))
}

/// Copies the selected tensors' stored bytes into one safetensors file.
fn write_weights(checkpoint: &Checkpoint, kept: &[usize], dst: &Path) -> Result<BTreeMap<String, usize>> {
    let renumber: HashMap<usize, usize> = kept.iter().enumerate().map(|(new, &old)| (old, new)).collect();
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    let mut dtypes = BTreeMap::new();
    for name in checkpoint.tensors().keys() {
        if let Some(new_name) = student_name(name, &renumber) {
            let view = checkpoint.view(name)?;
            *dtypes.entry(format!("{:?}", view.dtype())).or_insert(0) += 1;
            views.push((new_name, view));
        }
    }
    // transformers refuses safetensors files whose metadata names no known format.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), dst).map_err(|e| InitStudentError::Write {
        path: dst.to_path_buf(),
        msg: e.to_string(),
    })?;
    Ok(dtypes)
}

fn copy_side_files(source: &Path, dst_dir: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    for name in COPIED_FILES {
        let src = source.join(name);
        if src.exists() {
            let dst = dst_dir.join(name);
            std::fs::copy(&src, &dst).map_err(io(&dst))?;
            copied.push(name.to_string());
        }
    }
    Ok(copied)
}

/// Refuses a non-empty directory or an existing file at `out` unless `force`.
fn check_destination(out: &Path, force: bool) -> Result<()> {
    let occupied = match std::fs::read_dir(out) {
        Ok(mut entries) => entries.next().is_some(),
        Err(_) => out.exists(),
    };
    if occupied && !force {
        return Err(InitStudentError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    Ok(())
}

/// Runs `build` in a fresh directory beside `out`, then moves it to `out`; on failure the
/// temporary directory is removed and `out` is untouched.
fn write_dir<T>(out: &Path, build: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(".distill-init-student-")
        .tempdir_in(parent)
        .map_err(io(parent))?;
    let value = build(tmp.path())?;
    if out.is_dir() {
        std::fs::remove_dir_all(out).map_err(io(out))?;
    } else if out.exists() {
        std::fs::remove_file(out).map_err(io(out))?;
    }
    let tmp = tmp.keep();
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Int, Tensor, TensorData};

    use super::*;
    use crate::CausalLm;
    use crate::test_util::{fixtures, read_reference};

    fn list(layers: &[usize]) -> LayerSelection {
        LayerSelection::List(layers.to_vec())
    }

    #[test]
    fn selections_resolve_or_say_what_is_wrong() {
        let every = |step, keep_last| LayerSelection::Every { step, keep_last };
        assert_eq!(every(2, false).resolve(5).unwrap(), vec![0, 2, 4]);
        assert_eq!(every(2, false).resolve(6).unwrap(), vec![0, 2, 4]);
        assert_eq!(every(2, true).resolve(6).unwrap(), vec![0, 2, 4, 5]);
        assert_eq!(every(3, true).resolve(7).unwrap(), vec![0, 3, 6]);
        assert_eq!(list(&[1, 4]).resolve(5).unwrap(), vec![1, 4]);
        let err = |s: LayerSelection| s.resolve(3).unwrap_err().to_string();
        assert!(err(every(0, false)).contains("at least 1"));
        assert!(err(list(&[])).contains("empty"));
        assert!(err(list(&[0, 3])).contains("layer 3 is out of range; the source has 3 layers (0-2)"));
        assert!(err(list(&[0, 0])).contains("0 then 0 is repeated"));
        assert!(err(list(&[2, 1])).contains("2 then 1 is not increasing"));
    }

    #[test]
    fn layer_names_are_renumbered_and_dropped_layers_skipped() {
        let renumber = HashMap::from([(0, 0), (2, 1)]);
        let name = |n: &str| student_name(n, &renumber);
        assert_eq!(
            name("model.layers.2.mlp.up_proj.weight").as_deref(),
            Some("model.layers.1.mlp.up_proj.weight")
        );
        assert_eq!(name("model.layers.1.mlp.up_proj.weight"), None);
        // layer 20 must not match layer 2 by prefix
        assert_eq!(name("model.layers.20.mlp.up_proj.weight"), None);
        assert_eq!(name("model.norm.weight").as_deref(), Some("model.norm.weight"));
        assert_eq!(name("lm_head.weight").as_deref(), Some("lm_head.weight"));
    }

    /// Every student tensor is the source tensor it came from: same dtype, shape and bytes.
    fn assert_tensors_copied(source: &Path, student: &Path, kept: &[usize]) {
        let src = Checkpoint::open(source).unwrap();
        let out = Checkpoint::open(student).unwrap();
        let renumber: HashMap<usize, usize> = kept.iter().enumerate().map(|(n, &o)| (o, n)).collect();
        let mut expected = 0;
        for name in src.tensors().keys() {
            let Some(new_name) = student_name(name, &renumber) else {
                continue;
            };
            let (a, b) = (src.view(name).unwrap(), out.view(&new_name).unwrap());
            assert_eq!(
                (a.dtype(), a.shape()),
                (b.dtype(), b.shape()),
                "{name} -> {new_name}"
            );
            assert!(a.data() == b.data(), "{name} -> {new_name}: bytes differ");
            expected += 1;
        }
        assert_eq!(out.tensors().len(), expected, "student holds extra tensors");
    }

    #[test]
    fn output_tensors_are_exactly_the_selected_source_tensors() {
        for (model, kept) in [("tiny-llama", vec![0, 2]), ("tiny-qwen2", vec![1])] {
            let source = fixtures().join(model);
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("student");
            let summary = init_student(&source, &out, &list(&kept), false).unwrap();
            assert_eq!(summary.kept, kept);
            assert!(summary.params_after < summary.params_before);
            assert_tensors_copied(&source, &out, &kept);
            let config = DecoderConfig::from_dir(&out).unwrap();
            assert_eq!(config.num_hidden_layers, kept.len());
            for f in COPIED_FILES {
                assert_eq!(source.join(f).exists(), out.join(f).exists(), "{model}: {f}");
            }
        }
    }

    #[test]
    fn config_keeps_every_key_and_cuts_per_layer_lists() {
        let tmp = tempfile::tempdir().unwrap();
        let types = serde_json::json!(["full_attention", "sliding_attention"]);
        let (source, src_json) = edited_copy("tiny-qwen2", "layer_types", types, tmp.path());
        let out = tmp.path().join("student");
        init_student(&source, &out, &list(&[1]), false).unwrap();
        let got: Value = read_json(&out.join(CONFIG_FILE)).unwrap();
        let got_keys: Vec<&String> = got.as_object().unwrap().keys().collect();
        let src_keys: Vec<&String> = src_json.as_object().unwrap().keys().collect();
        assert_eq!(got_keys, src_keys, "keys or their order changed");
        assert_eq!(got["num_hidden_layers"], 1);
        assert_eq!(got["layer_types"], serde_json::json!(["sliding_attention"]));
        for (key, value) in src_json.as_object().unwrap() {
            if !["num_hidden_layers", "layer_types"].contains(&key.as_str()) {
                assert_eq!(&got[key], value, "{key}");
            }
        }
    }

    /// A copy of a fixture model whose config.json gets `key` set to `value`.
    fn edited_copy(model: &str, key: &str, value: Value, tmp: &Path) -> (PathBuf, Value) {
        let dir = tmp.join(format!("{model}-edited"));
        std::fs::create_dir(&dir).unwrap();
        for entry in std::fs::read_dir(fixtures().join(model)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        let mut json: Value = read_json(&dir.join(CONFIG_FILE)).unwrap();
        json.as_object_mut().unwrap().insert(key.into(), value);
        std::fs::write(dir.join(CONFIG_FILE), serde_json::to_vec(&json).unwrap()).unwrap();
        (dir, json)
    }

    #[test]
    fn existing_output_needs_force_and_failures_leave_it_untouched() {
        let source = fixtures().join("tiny-qwen2");
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("student");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("old"), "x").unwrap();
        let err = init_student(&source, &out, &list(&[0]), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("student") && err.contains("pass --force"), "{err}");
        init_student(&source, &out, &list(&[0]), true).unwrap();
        assert!(!out.join("old").exists() && out.join(SINGLE_FILE).exists());

        // A per-layer list shorter than the layers fails mid-write, after the temp dir exists.
        let (broken, _) = edited_copy(
            "tiny-qwen2",
            "layer_types",
            serde_json::json!(["full_attention"]),
            tmp.path(),
        );
        let err = init_student(&broken, &out, &list(&[1]), true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains("`layer_types`: has 1 entries"),
            "{err}"
        );
        assert_eq!(DecoderConfig::from_dir(&out).unwrap().num_hidden_layers, 1);
        let names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(".distill")),
            "temp dir left: {names:?}"
        );
    }

    /// transformers' own truncated model (make_init_student.py deletes blocks from
    /// `model.model.layers`) and ours must compute the same logits.
    #[test]
    fn student_logits_match_transformers_truncated_model() {
        type B = burn::backend::Flex;
        let device = Default::default();
        let refs = read_reference("init-student");
        let kept: Vec<usize> = refs["kept_layers"].data.iter().map(|&l| l as usize).collect();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("student");
        init_student(&fixtures().join("tiny-llama"), &out, &list(&kept), false).unwrap();
        let model = CausalLm::<B>::load(&out, &device).unwrap();
        let mut seq = 0;
        while let Some(input) = refs.get(&format!("seq{seq}.input_ids")) {
            let tokens: Vec<i64> = input.data.iter().map(|&x| x as i64).collect();
            let ids =
                Tensor::<B, 2, Int>::from_data(TensorData::new(tokens.clone(), [1, tokens.len()]), &device);
            let ours: Vec<f32> = model
                .forward(ids)
                .into_data()
                .convert::<f32>()
                .into_vec()
                .unwrap();
            let theirs = &refs[&format!("seq{seq}.logits")].data;
            assert_eq!(ours.len(), theirs.len());
            let diff = ours
                .iter()
                .zip(theirs)
                .map(|(a, b)| (f64::from(*a) - b).abs())
                .fold(0.0, f64::max);
            let scale = theirs.iter().map(|b| b.abs()).fold(0.0, f64::max);
            eprintln!("init-student seq{seq}: max |diff| {diff:.2e} (logit scale {scale:.2})");
            assert!(scale > 0.05, "seq{seq}: reference logits are degenerate");
            assert!(
                diff <= 1e-4 * scale,
                "seq{seq}: max |diff| {diff:e} over 1e-4 x scale"
            );
            seq += 1;
        }
        assert!(seq >= 2, "reference holds too few sequences");
    }
}
