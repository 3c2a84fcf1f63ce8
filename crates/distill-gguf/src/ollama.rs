//! Ollama's model store: `ollama:NAME[:TAG]` -> the GGUF blob holding the weights.
//!
//! Layout (Ollama's server/modelpath.go): `$OLLAMA_MODELS` or `~/.ollama/models`, with
//! `manifests/HOST/NAMESPACE/NAME/TAG` (JSON, an OCI manifest) whose layer of media type
//! `application/vnd.ollama.image.model` names `blobs/sha256-<hex>`. Short names default to
//! host `registry.ollama.ai`, namespace `library` and tag `latest`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{GgufError, Result};

pub const PREFIX: &str = "ollama:";
pub const MODEL_MEDIA_TYPE: &str = "application/vnd.ollama.image.model";
const DEFAULT_HOST: &str = "registry.ollama.ai";
const DEFAULT_NAMESPACE: &str = "library";
const DEFAULT_TAG: &str = "latest";

/// A fully qualified Ollama model name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OllamaName {
    pub host: String,
    pub namespace: String,
    pub model: String,
    pub tag: String,
}

impl OllamaName {
    /// `name`, `name:tag`, `ns/name:tag` or `host/ns/name:tag`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |msg: &str| GgufError::Ollama {
            name: text.to_string(),
            msg: msg.to_string(),
        };
        let (path, tag) = match text.rsplit_once(':') {
            // A colon inside the host part (host:port/...) is not a tag separator.
            Some((p, t)) if !t.contains('/') => (p, t),
            _ => (text, DEFAULT_TAG),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (host, namespace, model) = match parts[..] {
            [m] => (DEFAULT_HOST, DEFAULT_NAMESPACE, m),
            [ns, m] => (DEFAULT_HOST, ns, m),
            [h, ns, m] => (h, ns, m),
            _ => {
                return Err(bad(
                    "expected NAME[:TAG], NAMESPACE/NAME[:TAG] or HOST/NAMESPACE/NAME[:TAG]",
                ));
            }
        };
        let part_ok = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "._-:".contains(c))
        };
        if ![host, namespace, model, tag].iter().all(|p| part_ok(p)) {
            return Err(bad("name parts may hold only letters, digits, '.', '_' and '-'"));
        }
        Ok(OllamaName {
            host: host.into(),
            namespace: namespace.into(),
            model: model.into(),
            tag: tag.into(),
        })
    }

    fn manifest(&self, root: &Path) -> PathBuf {
        root.join("manifests")
            .join(&self.host)
            .join(&self.namespace)
            .join(&self.model)
            .join(&self.tag)
    }
}

/// `$OLLAMA_MODELS`, else `~/.ollama/models`.
pub fn models_dir() -> Option<PathBuf> {
    std::env::var_os("OLLAMA_MODELS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ollama/models")))
}

#[derive(Deserialize)]
struct Manifest {
    layers: Vec<Layer>,
}

#[derive(Deserialize)]
struct Layer {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
}

/// The GGUF blob of `name` (without the `ollama:` prefix) in the store at `root`.
pub fn resolve(name: &str, root: &Path) -> Result<PathBuf> {
    let parsed = OllamaName::parse(name)?;
    let err = |msg: String| GgufError::Ollama {
        name: name.to_string(),
        msg,
    };
    let manifest_path = parsed.manifest(root);
    let text = std::fs::read(&manifest_path).map_err(|e| {
        err(format!(
            "no manifest at {} ({e}); is it pulled (`ollama pull {name}`) and is OLLAMA_MODELS right?",
            manifest_path.display()
        ))
    })?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| {
        err(format!(
            "{}: not an Ollama manifest: {e}",
            manifest_path.display()
        ))
    })?;
    let layer = manifest
        .layers
        .iter()
        .find(|l| l.media_type == MODEL_MEDIA_TYPE)
        .ok_or_else(|| {
            err(format!(
                "{}: no layer of type {MODEL_MEDIA_TYPE}",
                manifest_path.display()
            ))
        })?;
    let hex = layer
        .digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| {
            err(format!(
                "{}: digest `{}` is not sha256:<64 hex>",
                manifest_path.display(),
                layer.digest
            ))
        })?;
    let blob = root.join("blobs").join(format!("sha256-{hex}"));
    if !blob.is_file() {
        return Err(err(format!(
            "blob {} named by {} is missing; run `ollama pull {name}` again",
            blob.display(),
            manifest_path.display()
        )));
    }
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store as Ollama writes it, with one model under the given manifest path.
    fn fake_store(manifest_rel: &str, media_type: &str) -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let hex = "ab".repeat(32);
        let blob = root.path().join("blobs").join(format!("sha256-{hex}"));
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, b"GGUF").unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": format!("sha256:{}", "cd".repeat(32)), "size": 1},
            "layers": [
                {"mediaType": "application/vnd.ollama.image.template", "digest": format!("sha256:{}", "ef".repeat(32)), "size": 1},
                {"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": 4}
            ]
        });
        let path = root.path().join("manifests").join(manifest_rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, manifest.to_string()).unwrap();
        (root, blob)
    }

    #[test]
    fn short_and_long_names_resolve_to_the_model_blob() {
        let (root, blob) = fake_store("registry.ollama.ai/library/deepseek-r1/1.5b", MODEL_MEDIA_TYPE);
        assert_eq!(resolve("deepseek-r1:1.5b", root.path()).unwrap(), blob);
        assert_eq!(resolve("library/deepseek-r1:1.5b", root.path()).unwrap(), blob);
        assert_eq!(
            resolve("registry.ollama.ai/library/deepseek-r1:1.5b", root.path()).unwrap(),
            blob
        );
        let (root, blob) = fake_store("registry.ollama.ai/library/smollm2/latest", MODEL_MEDIA_TYPE);
        assert_eq!(resolve("smollm2", root.path()).unwrap(), blob);
        let (root, blob) = fake_store("hf.co/bartowski/Qwen2.5-0.5B-GGUF/Q4_K_M", MODEL_MEDIA_TYPE);
        assert_eq!(
            resolve("hf.co/bartowski/Qwen2.5-0.5B-GGUF:Q4_K_M", root.path()).unwrap(),
            blob
        );
    }

    #[test]
    fn missing_models_layers_and_blobs_say_what_to_do() {
        let (root, blob) = fake_store("registry.ollama.ai/library/qwen2.5/latest", MODEL_MEDIA_TYPE);
        let err = resolve("qwen2.5:7b", root.path()).unwrap_err().to_string();
        assert!(
            err.contains("ollama pull qwen2.5:7b") && err.contains("manifests"),
            "{err}"
        );
        std::fs::remove_file(&blob).unwrap();
        let err = resolve("qwen2.5", root.path()).unwrap_err().to_string();
        assert!(err.contains("is missing"), "{err}");
        let (root, _) = fake_store(
            "registry.ollama.ai/library/x/latest",
            "application/vnd.ollama.image.adapter",
        );
        let err = resolve("x", root.path()).unwrap_err().to_string();
        assert!(
            err.contains("no layer of type application/vnd.ollama.image.model"),
            "{err}"
        );
        let err = resolve("../../etc/passwd", root.path()).unwrap_err().to_string();
        assert!(err.contains("ollama model"), "{err}");
    }
}
