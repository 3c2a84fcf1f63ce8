//! Safetensors checkpoints: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped, headers validated before any tensor is read.
//!
//! The files are untrusted. The safetensors crate refuses a header over 100 MB (the 8-byte
//! length prefix is checked before anything is read), offsets that leave the file or do not
//! tile it, and shapes whose byte size overflows; shards must be plain file names in the
//! model directory, and regular files.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::error::{ModelError, Result, read_json};
use crate::limits::{MAX_CONFIG_BYTES, check_file};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A shard name as HF writes them (`model-00001-of-00004.safetensors`): no directories, so an
/// index cannot point the loader at files outside the model.
fn is_plain_file_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    )
}

/// Buffers some exporters save that hold nothing the model needs.
fn is_ignorable(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

/// A tensor's bytes converted to the element type the caller asked for, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub file: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

/// All safetensors files of a checkpoint, mapped, with a name -> file index.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    index: BTreeMap<String, TensorMeta>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Lists the weight files of `dir` without opening them.
    pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
        let index = dir.join(INDEX_FILE);
        if index.exists() {
            check_file(&index, MAX_CONFIG_BYTES)?;
            let shards: ShardIndex = read_json(&index)?;
            let names: BTreeSet<&String> = shards.weight_map.values().collect();
            if names.is_empty() {
                return Err(ModelError::invalid(&index, "weight_map is empty"));
            }
            if let Some(bad) = names.iter().find(|n| !is_plain_file_name(n)) {
                return Err(ModelError::invalid(
                    &index,
                    format!(
                        "weight_map names shard {bad:?}, which is not a file name in the model directory"
                    ),
                ));
            }
            return Ok(names.into_iter().map(|n| dir.join(n)).collect());
        }
        let single = dir.join(SINGLE_FILE);
        if single.exists() {
            return Ok(vec![single]);
        }
        Err(ModelError::invalid(
            dir,
            format!("no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are read)"),
        ))
    }

    pub fn open(dir: &Path) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for path in Self::weight_files(dir)? {
            if std::fs::metadata(&path).is_ok_and(|m| !m.is_file()) {
                return Err(ModelError::invalid(&path, "not a regular file"));
            }
            let file = File::open(&path).map_err(|error| ModelError::Io {
                path: path.clone(),
                error,
            })?;
            // SAFETY: the map is read-only and lives as long as `self`; a checkpoint being
            // rewritten underneath us is outside what any loader can defend against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|error| ModelError::Io {
                path: path.clone(),
                error,
            })?;
            let tensors = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Safetensors {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            for (name, view) in tensors.tensors() {
                let meta = TensorMeta {
                    file: files.len(),
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                };
                index.insert(name, meta);
            }
            files.push((path, mmap));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    pub fn tensors(&self) -> &BTreeMap<String, TensorMeta> {
        &self.index
    }

    /// Count of stored tensors per dtype, e.g. {"BF16": 290}.
    pub fn dtype_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for meta in self.index.values() {
            *counts.entry(format!("{:?}", meta.dtype)).or_insert(0) += 1;
        }
        counts
    }

    /// Checks names and shapes against what the config implies, without reading tensor data.
    pub fn check(&self, expected: &[(String, Vec<usize>)], arch: &'static str) -> Result<()> {
        let mut wanted: HashMap<&str, &[usize]> = HashMap::new();
        for (name, shape) in expected {
            let meta = self.index.get(name).ok_or_else(|| ModelError::MissingTensor {
                dir: self.dir.clone(),
                arch,
                name: name.clone(),
                shape: shape.clone(),
            })?;
            if &meta.shape != shape {
                return Err(ModelError::TensorShape {
                    path: self.files[meta.file].0.clone(),
                    name: name.clone(),
                    got: meta.shape.clone(),
                    want: shape.clone(),
                });
            }
            wanted.insert(name, shape);
        }
        let unexpected: Vec<&String> = self
            .index
            .keys()
            .filter(|n| !wanted.contains_key(n.as_str()) && !is_ignorable(n))
            .collect();
        if let Some(first) = unexpected.first() {
            return Err(ModelError::UnexpectedTensors {
                dir: self.dir.clone(),
                arch,
                count: unexpected.len(),
                first: (*first).clone(),
            });
        }
        Ok(())
    }

    /// One tensor as stored: dtype, shape and the mapped bytes, for copying without conversion.
    pub fn view(&self, name: &str) -> Result<TensorView<'_>> {
        let meta = self.index.get(name).ok_or_else(|| ModelError::MissingTensor {
            dir: self.dir.clone(),
            arch: "this model",
            name: name.to_string(),
            shape: vec![],
        })?;
        let (path, mmap) = &self.files[meta.file];
        let bad = |e: safetensors::SafeTensorError| ModelError::Safetensors {
            path: path.clone(),
            msg: e.to_string(),
        };
        let tensors = SafeTensors::deserialize(mmap).map_err(bad)?;
        tensors.tensor(name).map_err(bad)
    }

    /// Reads one tensor as f32 (from f32, f16 or bf16 storage).
    pub fn read_f32(&self, name: &str) -> Result<HostTensor> {
        let view = self.view(name)?;
        let bad = |msg: String| ModelError::Safetensors {
            path: self.files[self.index[name].file].0.clone(),
            msg,
        };
        let bytes = view.data();
        let data = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(bad(format!(
                    "tensor `{name}` has dtype {other:?}; only F32, F16 and BF16 weights are supported"
                )));
            }
        };
        Ok(HostTensor {
            shape: view.shape().to_vec(),
            data,
        })
    }
}

impl HostTensor {
    /// [rows, cols] -> [cols, rows]; HF stores linear weights [out, in], burn computes x @ W[in, out].
    pub fn transposed(self) -> HostTensor {
        let [rows, cols] = self.shape[..] else {
            panic!("transposed() on a tensor of rank {}", self.shape.len());
        };
        let mut out = vec![0.0; self.data.len()];
        for r in 0..rows {
            for c in 0..cols {
                out[c * rows + r] = self.data[r * cols + c];
            }
        }
        HostTensor {
            shape: vec![cols, rows],
            data: out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DecoderConfig;
    use crate::test_util::scratch_copy;

    fn check(dir: &Path) -> Result<()> {
        let config = DecoderConfig::from_dir(dir)?;
        Checkpoint::open(dir)?.check(&config.expected_tensors(), config.architecture.hf_name())
    }

    #[test]
    fn fixtures_pass_the_header_check() {
        let fx = crate::test_util::fixtures();
        check(&fx.join("tiny-qwen2")).unwrap();
        let llama = Checkpoint::open(&fx.join("tiny-llama")).unwrap();
        assert!(llama.files().count() > 1, "tiny-llama must exercise sharding");
        check(&fx.join("tiny-llama")).unwrap();
    }

    #[test]
    fn truncated_file_is_an_error_naming_it() {
        let tmp = scratch_copy("tiny-qwen2");
        let path = tmp.path().join(SINGLE_FILE);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let msg = Checkpoint::open(tmp.path()).err().unwrap().to_string();
        assert!(
            msg.contains("model.safetensors") && msg.contains("not a valid safetensors"),
            "{msg}"
        );
        std::fs::write(&path, b"garbage").unwrap();
        assert!(Checkpoint::open(tmp.path()).is_err());
    }

    /// Rewrites tiny-qwen2's weights with `edit` applied to the tensor map.
    fn rewrite(tmp: &Path, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
        let path = tmp.join(SINGLE_FILE);
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
            .collect();
        edit(&mut tensors);
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &path).unwrap();
    }

    #[test]
    fn missing_unexpected_and_misshapen_tensors_are_named() {
        let tmp = scratch_copy("tiny-qwen2");
        rewrite(tmp.path(), |t| {
            t.retain(|(n, ..)| n != "model.layers.1.mlp.up_proj.weight")
        });
        let msg = check(tmp.path()).unwrap_err().to_string();
        assert!(
            msg.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"),
            "{msg}"
        );

        let tmp = scratch_copy("tiny-qwen2");
        rewrite(tmp.path(), |t| {
            t.push(("model.extra.weight".into(), Dtype::F32, vec![1], vec![0; 4]))
        });
        let msg = check(tmp.path()).unwrap_err().to_string();
        assert!(
            msg.contains("unexpected") && msg.contains("model.extra.weight"),
            "{msg}"
        );

        let tmp = scratch_copy("tiny-qwen2");
        rewrite(tmp.path(), |t| {
            let norm = t.iter_mut().find(|(n, ..)| n == "model.norm.weight").unwrap();
            norm.2 = vec![32];
            norm.3.truncate(32 * 4);
        });
        let msg = check(tmp.path()).unwrap_err().to_string();
        assert!(
            msg.contains("`model.norm.weight` has shape [32]") && msg.contains("[64]"),
            "{msg}"
        );
    }

    #[test]
    fn f16_and_bf16_storage_read_as_the_same_f32() {
        let name = "model.layers.0.self_attn.q_proj.weight";
        let original = Checkpoint::open(&crate::test_util::fixtures().join("tiny-qwen2"))
            .unwrap()
            .read_f32(name)
            .unwrap();
        for (dtype, tol) in [(Dtype::F16, 1e-3), (Dtype::BF16, 1e-2)] {
            let tmp = scratch_copy("tiny-qwen2");
            rewrite(tmp.path(), |t| {
                for (_, d, _, bytes) in t.iter_mut() {
                    let values = bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()));
                    *bytes = match dtype {
                        Dtype::F16 => values
                            .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                            .collect(),
                        _ => values
                            .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                            .collect(),
                    };
                    *d = dtype;
                }
            });
            let read = Checkpoint::open(tmp.path()).unwrap().read_f32(name).unwrap();
            assert_eq!(read.shape, original.shape);
            for (a, b) in read.data.iter().zip(&original.data) {
                assert!((a - b).abs() <= tol * b.abs().max(1e-2), "{dtype:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn transpose_moves_rows_to_columns() {
        let t = HostTensor {
            shape: vec![2, 3],
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        let t = t.transposed();
        assert_eq!(t.shape, vec![3, 2]);
        assert_eq!(t.data, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }

    /// A safetensors file by hand: the 8-byte header length, the header, the data.
    fn write_raw(path: &Path, header_len: u64, header: &str, data: &[u8]) {
        let mut bytes = header_len.to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn hostile_headers_are_refused_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(SINGLE_FILE);
        let tensor = |shape: &str, end: u64| {
            format!(r#"{{"w":{{"dtype":"F32","shape":{shape},"data_offsets":[0,{end}]}}}}"#)
        };
        let small = tensor("[2]", 8);
        for (len, header, want) in [
            // A length prefix asking for 4 EiB of header is refused before anything is read.
            (1u64 << 62, small.clone(), "header too large"),
            (100_000_001, small.clone(), "header too large"),
            // Offsets past the 8 data bytes.
            (0, tensor("[2]", 1 << 40), "invalid shape, data type, or offset"),
            // 2^40 x 2^40 elements: the byte size overflows.
            (
                0,
                tensor("[1099511627776,1099511627776]", 8),
                "overflow computing buffer size",
            ),
        ] {
            let len = if len == 0 { header.len() as u64 } else { len };
            write_raw(&path, len, &header, &[0; 8]);
            let msg = Checkpoint::open(tmp.path()).err().unwrap().to_string();
            assert!(
                msg.contains("model.safetensors: not a valid safetensors file") && msg.contains(want),
                "{header}: {msg}"
            );
        }
    }

    #[test]
    fn an_index_cannot_name_files_outside_the_model() {
        let tmp = tempfile::tempdir().unwrap();
        for shard in ["../../etc/passwd", "/etc/passwd", "sub/model.safetensors"] {
            let index = format!(r#"{{"weight_map": {{"w": "{shard}"}}}}"#);
            std::fs::write(tmp.path().join(INDEX_FILE), index).unwrap();
            let msg = Checkpoint::weight_files(tmp.path()).unwrap_err().to_string();
            assert!(
                msg.contains(INDEX_FILE) && msg.contains("not a file name in the model directory"),
                "{msg}"
            );
        }
    }
}
