//! Hugging Face dataset refs, `hf:org/name[@revision][:selector]`, resolved to local files in
//! the standard HF cache through hf-hub.
//!
//! The selector picks files of the dataset repo: an exact path (`main/train-00000-of-00001.parquet`)
//! or `[dir/]split` (default `train`): files named `split`, `split.jsonl`, `split-00000-of-00002.parquet`, …
//! under `dir`. Only `.jsonl`, `.json` and `.parquet` files are considered.
//!
//! hf-hub does not read the HF_* variables itself; `distill_hf::hub::HubSettings::from_env`
//! does, and its client ([`distill_hf::hub::api`]) is the one model downloads use too.

use std::path::{Path, PathBuf};

use distill_hf::hub::{HubSettings, api};
use hf_hub::{Repo, RepoType};

use crate::DataError;

const EXTENSIONS: [&str; 3] = [".jsonl", ".json", ".parquet"];

/// A parsed `org/name[@revision][:selector]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRef {
    pub repo: String,
    pub revision: String,
    pub selector: String,
}

impl DatasetRef {
    pub fn parse(text: &str) -> Result<Self, DataError> {
        let err = |msg: &str| DataError::Hub {
            source_ref: format!("hf:{text}"),
            msg: msg.to_string(),
        };
        let (head, selector) = match text.split_once(':') {
            Some((h, s)) => (h, s.trim_matches('/')),
            None => (text, "train"),
        };
        let (repo, revision) = head.split_once('@').unwrap_or((head, "main"));
        let ok = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        match repo.split_once('/') {
            Some((org, name)) if ok(org) && ok(name) => {}
            _ => return Err(err("expected hf:org/name[@revision][:[dir/]split or file]")),
        }
        if revision.is_empty() || selector.is_empty() || selector.contains("..") {
            return Err(err("expected hf:org/name[@revision][:[dir/]split or file]"));
        }
        Ok(DatasetRef {
            repo: repo.to_string(),
            revision: revision.to_string(),
            selector: selector.to_string(),
        })
    }

    /// The files of `listing` (repo-relative paths) the selector picks, sorted.
    pub fn select(&self, listing: &[String]) -> Result<Vec<String>, DataError> {
        let supported = |f: &str| EXTENSIONS.iter().any(|e| f.ends_with(e));
        if listing.iter().any(|f| f == &self.selector) {
            return Ok(vec![self.selector.clone()]);
        }
        let (dir, split) = match self.selector.rsplit_once('/') {
            Some((d, s)) => (d, s),
            None => ("", self.selector.as_str()),
        };
        let mut picked: Vec<String> = listing
            .iter()
            .filter(|f| supported(f))
            .filter(|f| {
                let (parent, base) = f.rsplit_once('/').unwrap_or(("", f));
                let dir_ok = dir.is_empty() || parent == dir || parent.ends_with(&format!("/{dir}"));
                let rest = base.strip_prefix(split);
                dir_ok && rest.is_some_and(|r| r.starts_with(['-', '.', '_']))
            })
            .cloned()
            .collect();
        picked.sort();
        let mut parents: Vec<&str> = picked
            .iter()
            .map(|f| f.rsplit_once('/').map_or("", |(p, _)| p))
            .collect();
        parents.dedup();
        let where_ = format!("hf:{}@{}:{}", self.repo, self.revision, self.selector);
        if picked.is_empty() {
            return Err(DataError::Hub {
                source_ref: where_,
                msg: format!(
                    "no .jsonl/.json/.parquet file matches; the repo has: {}",
                    preview(listing)
                ),
            });
        }
        if parents.len() > 1 {
            return Err(DataError::Hub {
                source_ref: where_,
                msg: format!(
                    "files of split `{split}` in several directories ({}); name one, e.g. hf:{}:{}/{split}",
                    parents.join(", "),
                    self.repo,
                    parents[0]
                ),
            });
        }
        Ok(picked)
    }
}

fn preview(listing: &[String]) -> String {
    let mut s: Vec<&str> = listing.iter().map(String::as_str).take(12).collect();
    if listing.len() > 12 {
        s.push("…");
    }
    if s.is_empty() {
        "no files".into()
    } else {
        s.join(", ")
    }
}

/// Resolves `org/name[@revision][:selector]` (without the `hf:`) to local files, downloading
/// what the cache lacks unless offline.
pub fn dataset_files(text: &str, access: &HubSettings) -> Result<Vec<PathBuf>, DataError> {
    let r = DatasetRef::parse(text)?;
    let source_ref = format!("hf:{text}");
    let repo = Repo::with_revision(r.repo.clone(), RepoType::Dataset, r.revision.clone());
    if access.offline {
        let snapshot = cached_snapshot(&access.cache_dir, &repo).ok_or_else(|| DataError::Hub {
            source_ref: source_ref.clone(),
            msg: format!(
                "HF_HUB_OFFLINE is set and the cache has no snapshot of it; looked in {}",
                access.cache_dir.join(repo.folder_name()).display()
            ),
        })?;
        let mut listing = Vec::new();
        walk(&snapshot, &snapshot, &mut listing).map_err(DataError::io(&snapshot))?;
        let picked = r.select(&listing)?;
        return Ok(picked.iter().map(|f| snapshot.join(f)).collect());
    }
    let hub_err = |msg: String| DataError::Hub {
        source_ref: source_ref.clone(),
        msg,
    };
    let api = api(access, false).map_err(hub_err)?;
    let api_repo = api.repo(repo);
    let info = api_repo
        .info()
        .map_err(|e| hub_err(format!("cannot list the dataset's files: {e}")))?;
    let listing: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let picked = r.select(&listing)?;
    picked
        .iter()
        .map(|f| {
            api_repo
                .get(f)
                .map_err(|e| hub_err(format!("cannot fetch {f}: {e}")))
        })
        .collect()
}

/// `<cache>/datasets--org--name/snapshots/<commit>` for the revision (a ref name or a commit).
fn cached_snapshot(cache_dir: &Path, repo: &Repo) -> Option<PathBuf> {
    let base = cache_dir.join(repo.folder_name());
    let revision = repo.revision();
    let commit = std::fs::read_to_string(base.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let dir = base.join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing() -> Vec<String> {
        [
            "README.md",
            "main/train-00000-of-00001.parquet",
            "main/test-00000-of-00001.parquet",
            "socratic/train-00000-of-00001.parquet",
            "socratic/test-00000-of-00001.parquet",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn refs_parse_and_select_files() {
        let r = DatasetRef::parse("openai/gsm8k@abc:main/train").unwrap();
        assert_eq!((r.repo.as_str(), r.revision.as_str()), ("openai/gsm8k", "abc"));
        assert_eq!(
            r.select(&listing()).unwrap(),
            ["main/train-00000-of-00001.parquet"]
        );
        let r = DatasetRef::parse("openai/gsm8k:socratic/test-00000-of-00001.parquet").unwrap();
        assert_eq!(
            r.select(&listing()).unwrap(),
            ["socratic/test-00000-of-00001.parquet"]
        );
        let err = DatasetRef::parse("openai/gsm8k")
            .unwrap()
            .select(&listing())
            .unwrap_err();
        assert!(err.to_string().contains("hf:openai/gsm8k:main/train"), "{err}");
        let err = DatasetRef::parse("openai/gsm8k:validation")
            .unwrap()
            .select(&listing())
            .unwrap_err();
        assert!(
            err.to_string().contains("no .jsonl/.json/.parquet file matches"),
            "{err}"
        );
        assert!(DatasetRef::parse("gsm8k").is_err());
        assert!(DatasetRef::parse("a/b:../x").is_err());
    }

    #[test]
    fn offline_reads_the_cache_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("datasets--org--set");
        std::fs::create_dir_all(base.join("refs")).unwrap();
        std::fs::write(base.join("refs/main"), "c0ffee\n").unwrap();
        let snap = base.join("snapshots/c0ffee/data");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("train.jsonl"), "{}\n").unwrap();
        std::fs::write(snap.join("test.jsonl"), "{}\n").unwrap();
        let access = HubSettings {
            cache_dir: tmp.path().to_path_buf(),
            offline: true,
            ..Default::default()
        };
        let files = dataset_files("org/set", &access).unwrap();
        assert_eq!(files, [snap.join("train.jsonl")]);
        let err = dataset_files("org/other", &access).unwrap_err().to_string();
        assert!(
            err.contains("HF_HUB_OFFLINE") && err.contains("datasets--org--other"),
            "{err}"
        );
    }
}
