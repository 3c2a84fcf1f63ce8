//! Model references: a local directory, or `org/name[@revision]` on the Hugging Face Hub,
//! fetched into the standard HF cache. hf-hub does not read the HF_* variables itself, so
//! this module does: HF_HOME, HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE and HF_ENDPOINT.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;

use crate::error::{ModelError, Result, read_json};
use crate::tokenizer::{TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};
use crate::weights::{INDEX_FILE, SINGLE_FILE};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    Local(PathBuf),
    Hub { repo: String, revision: String },
}

impl ModelRef {
    /// An existing path is local; otherwise the text must be a valid `org/name[@revision]`.
    pub fn parse(text: &str) -> Result<Self> {
        let path = Path::new(text);
        if path.exists() {
            return Ok(ModelRef::Local(path.to_path_buf()));
        }
        let (repo, revision) = match text.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (text, "main"),
        };
        let looks_local = text.starts_with('.') || text.starts_with('/') || text.starts_with('~');
        if looks_local || !valid_repo_id(repo) || !valid_revision(revision) {
            return Err(ModelError::Hub {
                reference: text.to_string(),
                msg: "no such directory, and not a Hub id of the form org/name[@revision]".into(),
            });
        }
        Ok(ModelRef::Hub {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// Hub rules: two parts of [A-Za-z0-9._-], no leading/trailing '-' or '.', no "--" or "..",
/// at most 96 characters.
fn valid_repo_id(id: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
    };
    match id.split_once('/') {
        Some((org, name)) => {
            id.len() <= 96 && part_ok(org) && part_ok(name) && !id.contains("--") && !id.contains("..")
        }
        None => false,
    }
}

fn valid_revision(rev: &str) -> bool {
    !rev.is_empty()
        && !rev.contains("..")
        && rev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
}

/// Where the HF cache is, and how to reach the Hub, from the environment: the one settings
/// type for models and datasets alike.
#[derive(Debug, Clone, Default)]
pub struct HubSettings {
    pub cache_dir: PathBuf,
    /// Sent as a header only; never part of an error message.
    pub token: Option<String>,
    pub offline: bool,
    pub endpoint: Option<String>,
}

impl HubSettings {
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The variables, as huggingface_hub reads them.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let base = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(var("HOME").unwrap_or_default()).join(".cache"));
            base.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN")
            .filter(|t| !t.is_empty())
            .or_else(|| std::fs::read_to_string(hf_home.join("token")).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        HubSettings {
            cache_dir,
            token,
            offline,
            endpoint: var("HF_ENDPOINT").filter(|e| !e.is_empty()),
        }
    }
}

/// Files a model directory needs, and those read when present.
const REQUIRED: [&str; 2] = ["config.json", TOKENIZER_FILE];
const OPTIONAL: [&str; 3] = [TOKENIZER_CONFIG_FILE, TEMPLATE_FILE, "generation_config.json"];

/// Resolves a model reference to a local directory holding config, tokenizer and weights,
/// downloading what the cache lacks unless offline.
pub fn resolve(text: &str, settings: &HubSettings) -> Result<PathBuf> {
    match ModelRef::parse(text)? {
        ModelRef::Local(dir) => Ok(dir),
        ModelRef::Hub { repo, revision } => fetch(text, &repo, &revision, settings),
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The Hub client for `settings` (cache, token, endpoint), the one both model and dataset
/// downloads use; `progress` draws hf-hub's download bars.
pub fn api(settings: &HubSettings, progress: bool) -> std::result::Result<hf_hub::api::sync::Api, String> {
    let mut builder = ApiBuilder::new()
        .with_cache_dir(settings.cache_dir.clone())
        .with_token(settings.token.clone())
        .with_progress(progress);
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    builder
        .build()
        .map_err(|e| format!("cannot start the Hub client: {e}"))
}

/// Fetches one file of the repo to a local path, or says why not.
type FileGetter<'a> = dyn Fn(&str) -> std::result::Result<PathBuf, String> + 'a;

fn fetch(text: &str, repo_id: &str, revision: &str, settings: &HubSettings) -> Result<PathBuf> {
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let cache = Cache::new(settings.cache_dir.clone()).repo(repo.clone());
    let snapshot_hint = settings.cache_dir.join(repo.folder_name()).join("snapshots");
    let hub_err = |msg: String| ModelError::Hub {
        reference: text.to_string(),
        msg,
    };

    let getter: Box<FileGetter<'_>> = if settings.offline {
        Box::new(|file: &str| cache.get(file).ok_or_else(|| "not in cache".to_string()))
    } else {
        let api = api(settings, true).map_err(hub_err)?;
        let api_repo = api.repo(repo.clone());
        // The error text never includes the token: hf-hub sends it as a header only.
        Box::new(move |file: &str| api_repo.get(file).map_err(|e| e.to_string()))
    };

    let mut missing = Vec::new();
    let mut dir = None;
    for file in REQUIRED {
        match getter(file) {
            Ok(path) => dir = path.parent().map(Path::to_path_buf),
            Err(e) => missing.push(format!("{file} ({e})")),
        }
    }
    // Weights: the shard index when the repo has one, else the single file.
    match getter(INDEX_FILE) {
        Ok(index_path) => {
            let index: ShardIndex = read_json(&index_path)?;
            let shards: std::collections::BTreeSet<String> = index.weight_map.into_values().collect();
            for shard in shards {
                if let Err(e) = getter(&shard) {
                    missing.push(format!("{shard} ({e})"));
                }
            }
        }
        Err(_) => {
            if let Err(e) = getter(SINGLE_FILE) {
                missing.push(format!("{SINGLE_FILE} or {INDEX_FILE} ({e})"));
            }
        }
    }
    if !missing.is_empty() {
        let mode = if settings.offline {
            "HF_HUB_OFFLINE is set and the cache lacks"
        } else {
            "could not fetch"
        };
        return Err(hub_err(format!(
            "{mode}: {}; looked in {}",
            missing.join(", "),
            snapshot_hint.display()
        )));
    }
    for file in OPTIONAL {
        let _ = getter(file);
    }
    dir.ok_or_else(|| hub_err("resolved no files".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(cache: &Path, offline: bool) -> HubSettings {
        HubSettings {
            cache_dir: cache.to_path_buf(),
            token: None,
            offline,
            endpoint: None,
        }
    }

    #[test]
    fn parses_references() {
        assert_eq!(
            ModelRef::parse("Qwen/Qwen2.5-7B-Instruct").unwrap(),
            ModelRef::Hub {
                repo: "Qwen/Qwen2.5-7B-Instruct".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            ModelRef::parse("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B@v1.0").unwrap(),
            ModelRef::Hub {
                repo: "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B".into(),
                revision: "v1.0".into()
            }
        );
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().to_str().unwrap();
        assert_eq!(
            ModelRef::parse(local).unwrap(),
            ModelRef::Local(dir.path().to_path_buf())
        );
        for bad in [
            "no-slash",
            "a/b/c",
            "org/na me",
            "-org/name",
            "org/name@",
            "./missing/dir",
            "a--b/c",
            "org/..x",
        ] {
            let err = ModelRef::parse(bad).unwrap_err().to_string();
            assert!(
                err.contains(bad) && err.contains("org/name[@revision]"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn environment_is_read_like_huggingface_hub() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let s = HubSettings::from_vars(vars(&[("HOME", "/home/u")]));
        assert_eq!(s.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert!(!s.offline && s.token.is_none());
        let s = HubSettings::from_vars(vars(&[
            ("HF_HOME", "/data/hf"),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_TOKEN", "hf_x"),
        ]));
        assert_eq!(s.cache_dir, PathBuf::from("/data/hf/hub"));
        assert!(s.offline);
        assert_eq!(s.token.as_deref(), Some("hf_x"));
        let s = HubSettings::from_vars(vars(&[("HF_HOME", "/data/hf"), ("HF_HUB_CACHE", "/fast/cache")]));
        assert_eq!(s.cache_dir, PathBuf::from("/fast/cache"));
    }

    #[test]
    fn offline_and_uncached_lists_missing_files_and_where_it_looked() {
        let cache = tempfile::tempdir().unwrap();
        let err = resolve("Qwen/Qwen2.5-0.5B", &settings(cache.path(), true))
            .unwrap_err()
            .to_string();
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
        assert!(
            err.contains("config.json")
                && err.contains("tokenizer.json")
                && err.contains("model.safetensors"),
            "{err}"
        );
        assert!(err.contains("models--Qwen--Qwen2.5-0.5B"), "{err}");
    }

    #[test]
    fn offline_resolves_a_cached_snapshot() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--tiny");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snapshot = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        let src = crate::test_util::fixtures().join("tiny-qwen2");
        for f in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors",
        ] {
            std::fs::copy(src.join(f), snapshot.join(f)).unwrap();
        }
        let dir = resolve("org/tiny", &settings(cache.path(), true)).unwrap();
        assert_eq!(dir, snapshot);
        crate::DecoderConfig::from_dir(&dir).unwrap();
    }
}
