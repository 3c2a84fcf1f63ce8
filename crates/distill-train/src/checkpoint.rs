//! Checkpoints: `<root>/step-N/` holding the trainable weights, AdamW moments, the training
//! state and the resolved recipe. Written into a temp dir, fsynced, renamed: a crash leaves
//! the previous checkpoint as it was. The newest `keep` are kept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use distill_core::recipe::OnPolicyTeacher;
use distill_core::tensorfile::{self, FileDtype};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 1;
pub const WEIGHTS: &str = "trainable.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const STATE: &str = "state.json";
pub const RECIPE: &str = "recipe.toml";

/// Recipe keys (`section.key`; `section.*` for a whole section) that may differ between the
/// recipe a checkpoint was saved with and the one resuming it. Everything else that training
/// reads must be as it was, or the resumed run would not continue the one it resumes.
pub const RESUME_MAY_CHANGE: &[&str] = &[
    // Where the run lives: the checkpoint was found there, whatever the names say.
    "name",
    "train.out",
    // How long it runs (the learning-rate schedule follows the new total).
    "train.max_steps",
    "train.epochs",
    // How often it logs and saves, and when it gives up.
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.export_every",
    "train.log_every",
    "train.max_bad_steps",
    // Sequences decoded together, and their cache: each sample depends on its prompt and
    // seed alone.
    "on_policy.gen_batch",
    "on_policy.kv_cache_gib",
    // Memory knobs: the same values up to float rounding (tested for recompute).
    "train.recompute",
    "train.mlp_chunk_tokens",
    "train.offload_block_inputs",
    "train.offload_optimizer",
    "train.block_inputs_every",
    "loss.chunk_tokens",
    // Settings training does not read (on-policy steps read a few: `may_change_on_resume`):
    // the teacher's API, gen-data's requests, soft-label capture, eval. (The dataset on disk is what trains; gen-data guards its own changes.)
    "teacher.model",
    "teacher.base_url",
    "teacher.api_key_env",
    "teacher.endpoints",
    "teacher.price_prompt_per_m",
    "teacher.price_completion_per_m",
    "teacher.price_cached_prompt_per_m",
    "data.prompts",
    "data.prompt_field",
    "data.reference_field",
    "data.id_field",
    "data.max_prompts",
    "gen.n",
    "gen.temperature",
    "gen.top_p",
    "gen.max_tokens",
    "gen.stop",
    "gen.seed",
    "gen.prompt_suffix",
    "gen.system_prompt",
    "gen.concurrency",
    "gen.request_timeout_s",
    "gen.max_retries",
    "gen.retry_base_delay_s",
    "gen.retry_max_delay_s",
    "gen.stream",
    "gen.max_cost",
    "gen.max_tokens_total",
    "soft_labels.*",
    "eval.*",
];

/// Whether `key` may change when resuming a run of `recipe`: in [`RESUME_MAY_CHANGE`] and not
/// read by its on-policy steps (a served grader's model; a prompts file's field and count).
fn may_change_on_resume(key: &str, recipe: &distill_core::Recipe) -> bool {
    let o = &recipe.on_policy;
    let on_policy_reads: &[&str] = match (o.enabled(), o.teacher, o.prompts.is_some()) {
        (false, _, _) => &[],
        (true, OnPolicyTeacher::Server, true) => &["teacher.model", "data.prompt_field", "data.max_prompts"],
        (true, OnPolicyTeacher::Server, false) => &["teacher.model"],
        (true, OnPolicyTeacher::Local, true) => &["data.prompt_field", "data.max_prompts"],
        (true, OnPolicyTeacher::Local, false) => &[],
    };
    !on_policy_reads.contains(&key)
        && RESUME_MAY_CHANGE
            .iter()
            .any(|allowed| match allowed.strip_suffix('*') {
                Some(section) => key.starts_with(section),
                None => key == *allowed,
            })
}

/// Refuses to resume checkpoint `dir` with a recipe that differs from the one it was saved
/// with in any key outside [`RESUME_MAY_CHANGE`], naming each such key.
pub fn check_same_recipe(dir: &Path, recipe: &distill_core::Recipe) -> Result<(), CheckpointError> {
    let path = dir.join(RECIPE);
    let saved = std::fs::read_to_string(&path).map_err(io(&path))?;
    let changes = recipe
        .changes_since(&saved)
        .map_err(|e| CheckpointError::Invalid {
            path: path.clone(),
            msg: e.message().trim().to_string(),
        })?;
    let refused: Vec<String> = changes
        .iter()
        .filter(|c| !may_change_on_resume(&c.key, recipe))
        .map(|c| c.to_string())
        .collect();
    if refused.is_empty() {
        return Ok(());
    }
    Err(CheckpointError::Invalid {
        path,
        msg: format!(
            "--resume with a changed recipe: {}; HINT: set {} back to resume (docs/training.md lists what may change), \
             or start a fresh run with --set name=<new name> or --set train.out=<another dir>",
            refused.join("; "),
            if refused.len() == 1 { "it" } else { "them" }
        ),
    })
}

/// Host tensors by name: (shape, f32 data).
pub type HostTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    pub adam_t: u64,
    pub tokens_seen: u64,
    pub skipped_steps: usize,
    pub recipe_hash: String,
    pub tokenizer_sha256: String,
    /// Wall-clock seconds of the completed steps, summed over the calls that ran them (steps
    /// an interruption lost, and time outside steps, are not counted). Absent in checkpoints
    /// written before it was recorded: 0 there.
    #[serde(default)]
    pub train_seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Shows the OS error in its message, so it is no `source()`: the CLI prints each cause
    /// of the chain after the message, and would print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    /// Reading the student's own weights again (a QLoRA export merges into them).
    #[error(transparent)]
    Model(#[from] distill_models::ModelError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |error| CheckpointError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Writes step `state.step` under `root` atomically, with `extra` files beside the state,
/// and prunes old ones.
pub fn save(
    root: &Path,
    state: &TrainState,
    weights: &HostTensors,
    moments: &HostTensors,
    recipe_toml: &str,
    extra: &[(&str, &[u8])],
    keep: usize,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-step-")
        .tempdir_in(root)
        .map_err(io(root))?;
    write_tensors(&tmp.path().join(WEIGHTS), weights)?;
    write_tensors(&tmp.path().join(OPTIMIZER), moments)?;
    let state_json = serde_json::to_vec_pretty(state).expect("state serializes");
    let files = [(STATE, state_json.as_slice()), (RECIPE, recipe_toml.as_bytes())];
    for &(name, bytes) in files.iter().chain(extra) {
        let path = tmp.path().join(name);
        std::fs::write(&path, bytes).map_err(io(&path))?;
        sync_file(&path)?;
    }
    distill_core::fsutil::sync_dir(tmp.path()).map_err(io(tmp.path()))?;
    let dest = root.join(format!("step-{}", state.step));
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
    }
    let tmp_path = tmp.keep();
    std::fs::rename(&tmp_path, &dest).map_err(io(&dest))?;
    distill_core::fsutil::sync_dir(root).map_err(io(root))?;
    prune(root, keep)?;
    Ok(dest)
}

fn sync_file(path: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

fn write_tensors(path: &Path, tensors: &HostTensors) -> Result<(), CheckpointError> {
    write_safetensors(path, tensors, FileDtype::F32)
}

/// Writes f32 host tensors as `dtype`, encoding one tensor at a time.
pub fn write_safetensors(
    path: &Path,
    tensors: &HostTensors,
    dtype: FileDtype,
) -> Result<(), CheckpointError> {
    let entries: Vec<(String, Vec<usize>)> =
        tensors.iter().map(|(n, (s, _))| (n.clone(), s.clone())).collect();
    let values: Vec<&Vec<f32>> = tensors.values().map(|(_, d)| d).collect();
    let io = |error| CheckpointError::Io {
        path: path.to_path_buf(),
        error,
    };
    tensorfile::write_safetensors(path, &entries, dtype, |i| Ok(values[i].clone()), io)
}

pub fn read_tensors(path: &Path) -> Result<HostTensors, CheckpointError> {
    read_tensors_where(path, |_| true)
}

/// The tensors of `path` whose names `want` accepts. The file is mapped, not read, so only
/// those tensors are brought into memory (a data-parallel worker resuming takes only its own
/// share of the moments).
pub fn read_tensors_where(path: &Path, want: impl Fn(&str) -> bool) -> Result<HostTensors, CheckpointError> {
    let file = std::fs::File::open(path).map_err(io(path))?;
    // SAFETY: the map is read-only and dropped before this returns; a checkpoint is written
    // to a temporary directory and renamed into place, never changed where it lies.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(io(path))?;
    let bad = |msg: String| CheckpointError::Invalid {
        path: path.to_path_buf(),
        msg,
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors().into_iter().filter(|(name, _)| want(name)) {
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!(
                "tensor `{name}` is {:?}, checkpoints hold F32",
                view.dtype()
            )));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(name, (view.shape().to_vec(), data));
    }
    Ok(out)
}

/// Completed checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .filter(|(_, p)| p.join(STATE).exists())
        .collect();
    out.sort();
    out
}

fn prune(root: &Path, keep: usize) -> Result<(), CheckpointError> {
    let all = list(root);
    for (_, path) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(path).map_err(io(path))?;
    }
    Ok(())
}

pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainState,
    pub weights: HostTensors,
    pub moments: HostTensors,
}

pub fn load(dir: &Path) -> Result<Loaded, CheckpointError> {
    load_where(dir, |_| true)
}

/// [`load`] with only the moments of the parameters `want_moments` accepts (by parameter
/// name; the others' are left on disk).
pub fn load_where(dir: &Path, want_moments: impl Fn(&str) -> bool) -> Result<Loaded, CheckpointError> {
    let state_path = dir.join(STATE);
    let bytes = std::fs::read(&state_path).map_err(io(&state_path))?;
    let state: TrainState = serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Invalid {
        path: state_path.clone(),
        msg: e.to_string(),
    })?;
    if state.format_version != FORMAT_VERSION {
        return Err(CheckpointError::Invalid {
            path: state_path,
            msg: format!(
                "checkpoint format {} but this distill reads {FORMAT_VERSION}; HINT: resume with the distill version that wrote it",
                state.format_version
            ),
        });
    }
    Ok(Loaded {
        dir: dir.to_path_buf(),
        state,
        weights: read_tensors(&dir.join(WEIGHTS))?,
        moments: read_tensors_where(&dir.join(OPTIMIZER), |name| {
            let param = name
                .strip_prefix("exp_avg.")
                .or_else(|| name.strip_prefix("exp_avg_sq."))
                .unwrap_or(name);
            want_moments(param)
        })?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> TrainState {
        TrainState {
            format_version: FORMAT_VERSION,
            step,
            total_steps: 10,
            adam_t: step as u64,
            tokens_seen: 0,
            skipped_steps: 0,
            recipe_hash: "h".into(),
            tokenizer_sha256: "t".into(),
            train_seconds: 0.0,
        }
    }

    /// Keys training never reads may change on resume, unless the run's on-policy steps read
    /// them: a served grader's model, a prompts file's field and count.
    #[test]
    fn keys_on_policy_steps_read_may_not_change_on_resume() {
        let recipe = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            distill_core::Recipe::parse("name = \"t\"\n", Path::new("t.toml"), &sets).unwrap()
        };
        let off = recipe(&[]);
        let served = recipe(&[
            "on_policy.share=1.0",
            "on_policy.teacher=\"server\"",
            "teacher.base_url=\"http://127.0.0.1:8000/v1\"",
            "on_policy.prompts=\"p.jsonl\"",
        ]);
        let local = recipe(&["on_policy.share=1.0", "teacher.local_model=\"t\""]);
        for key in ["teacher.model", "data.prompt_field", "data.max_prompts"] {
            assert!(may_change_on_resume(key, &off), "{key}");
            assert!(!may_change_on_resume(key, &served), "{key}");
            assert!(may_change_on_resume(key, &local), "{key}");
        }
        for key in ["teacher.base_url", "gen.concurrency", "on_policy.gen_batch"] {
            assert!(may_change_on_resume(key, &served), "{key}");
        }
    }

    #[test]
    fn saves_atomically_round_trips_and_keeps_the_newest() {
        let root = tempfile::tempdir().unwrap();
        let mut w = HostTensors::new();
        w.insert("a.lora_a".into(), (vec![2, 2], vec![1.0, -2.0, 3.5, 0.25]));
        for step in [1, 2, 3] {
            save(root.path(), &state(step), &w, &w, "name = \"x\"\n", &[], 2).unwrap();
        }
        let steps: Vec<usize> = list(root.path()).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![2, 3]);
        let loaded = load(&root.path().join("step-3")).unwrap();
        assert_eq!(loaded.state, state(3));
        assert_eq!(loaded.weights, w);
        // No temp dirs left behind.
        let names: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| n.starts_with("step-")), "{names:?}");
    }

    /// A data-parallel worker reads only the moments of the parameters it keeps: both
    /// moments of each, nothing of the others, all weights.
    #[test]
    fn load_where_takes_only_the_wanted_parameters_moments() {
        let root = tempfile::tempdir().unwrap();
        let mut w = HostTensors::new();
        let mut m = HostTensors::new();
        for name in ["a.weight", "b.weight", "ab.weight"] {
            w.insert(name.into(), (vec![2], vec![1.0, 2.0]));
            m.insert(format!("exp_avg.{name}"), (vec![2], vec![0.5, 0.25]));
            m.insert(format!("exp_avg_sq.{name}"), (vec![2], vec![0.125, 4.0]));
        }
        let dir = save(root.path(), &state(1), &w, &m, "name = \"x\"\n", &[], 1).unwrap();
        let mine = load_where(&dir, |p| p == "b.weight").unwrap();
        assert_eq!(mine.weights, w);
        let names: Vec<&str> = mine.moments.keys().map(String::as_str).collect();
        assert_eq!(names, ["exp_avg.b.weight", "exp_avg_sq.b.weight"]);
        assert_eq!(mine.moments["exp_avg_sq.b.weight"], m["exp_avg_sq.b.weight"]);
        assert_eq!(load(&dir).unwrap().moments, m);
    }

    #[test]
    fn a_half_written_checkpoint_is_not_listed() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("step-7")).unwrap(); // no state.json: torn
        std::fs::create_dir_all(root.path().join(".tmp-step-abc")).unwrap();
        assert!(list(root.path()).is_empty());
    }

    #[test]
    fn a_newer_format_is_refused_with_a_hint() {
        let root = tempfile::tempdir().unwrap();
        let mut s = state(1);
        s.format_version = 99;
        let dir = save(
            root.path(),
            &s,
            &HostTensors::new(),
            &HostTensors::new(),
            "",
            &[],
            1,
        )
        .unwrap();
        let err = load(&dir).err().unwrap().to_string();
        assert!(err.contains("state.json") && err.contains("HINT"), "{err}");
    }
}
