//! Export: a Hugging Face model directory (config, safetensors in HF layout and the
//! student's dtype, tokenizer files) that transformers, `distill eval` and Ollama's importer
//! load; for LoRA runs also a PEFT adapter (adapter_config.json + adapter_model.safetensors).

use std::path::{Path, PathBuf};

use distill_core::recipe::LoraSection;
use distill_core::tensorfile::{self, FileDtype};
use distill_hf::weights::{Checkpoint, HostTensor};
use distill_models::{CausalLm, Kernels};
use rayon::prelude::*;

use crate::checkpoint::{CheckpointError, HostTensors, write_safetensors};
use crate::lora::peft_name;
use crate::params::{param_infos, read_params};

/// Files copied verbatim from the student directory when present.
const COPIED: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |error| CheckpointError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// burn keeps linear weights [in, out]; HF stores [out, in]. Embeddings are [V, C] in both.
fn transposed_in_hf(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name != "model.embed_tokens.weight"
}

fn transposed(shape: Vec<usize>, data: Vec<f32>) -> (Vec<usize>, Vec<f32>) {
    let t = HostTensor { shape, data }.transposed();
    (t.shape, t.data)
}

/// Writes `model` (adapters already merged) as an HF directory at `out`, replacing it
/// atomically. Reads one parameter from the device at a time.
pub fn export_hf<B: Kernels>(
    model: &CausalLm<B>,
    student_dir: &Path,
    out: &Path,
) -> Result<PathBuf, CheckpointError> {
    let infos = param_infos(model);
    let entries: Vec<(String, Vec<usize>)> = infos
        .iter()
        .map(|p| {
            let mut shape = p.shape.clone();
            if transposed_in_hf(&p.name, &shape) {
                shape.reverse();
            }
            (p.name.clone(), shape)
        })
        .collect();
    write_hf_dir(&entries, &model.config, student_dir, out, |i| {
        let name = &infos[i].name;
        let (shape, data) = read_params(model, |p| &p.name == name)
            .remove(name)
            .expect("a parameter of the model");
        Ok(if transposed_in_hf(name, &shape) {
            transposed(shape, data).1
        } else {
            data
        })
    })
}

/// Writes the merged weights of a QLoRA run as an HF directory at `out`: the base read again
/// from `student_dir` at full precision (not its NF4 rounding, which is all the device held),
/// plus scale · A B for each adapter of `model`, one tensor at a time.
pub fn export_merged_base<B: Kernels>(
    model: &CausalLm<B>,
    scale: f64,
    student_dir: &Path,
    out: &Path,
) -> Result<PathBuf, CheckpointError> {
    let adapters: HostTensors = read_adapters(model).collect();
    let base = Checkpoint::open(student_dir)?;
    let entries = model.config.expected_tensors(); // HF names and layout
    write_hf_dir(&entries, &model.config, student_dir, out, |i| {
        let name = &entries[i].0;
        let mut w = base.read_f32(name)?;
        let prefix = name.strip_suffix(".weight").unwrap_or(name);
        let factor = |f: &str| adapters.get(&format!("{prefix}.lora.lora_{f}"));
        if let (Some(a), Some(b)) = (factor("a"), factor("b")) {
            add_delta(&mut w.data, w.shape[1], a, b, scale as f32);
        }
        Ok(w.data)
    })
}

/// w [out, in] (HF layout) += scale · (A B)ᵀ with A [in, r] and B [r, out] (burn layout),
/// a row of w per task.
fn add_delta(w: &mut [f32], d_in: usize, a: &(Vec<usize>, Vec<f32>), b: &(Vec<usize>, Vec<f32>), scale: f32) {
    let (r, d_out) = (b.0[0], b.0[1]);
    assert_eq!(
        (a.0[0], a.0[1]),
        (d_in, r),
        "LoRA A for a [{d_out}, {d_in}] weight"
    );
    let bt: Vec<f32> = (0..d_out * r).map(|k| b.1[(k % r) * d_out + k / r]).collect(); // [out, r]
    w.par_chunks_mut(d_in)
        .zip(bt.par_chunks(r))
        .for_each(|(row, b_o)| {
            for (w_oi, a_i) in row.iter_mut().zip(a.1.chunks(r)) {
                let dot: f32 = a_i.iter().zip(b_o).map(|(x, y)| x * y).sum();
                *w_oi += scale * dot;
            }
        });
}

/// `entries` (HF names and layout; `tensor(i)` makes entry i's values) in the student's
/// dtype, with its config and tokenizer files, as an HF directory at `out`, replacing it
/// atomically. A failed tensor leaves `out` as it was.
fn write_hf_dir(
    entries: &[(String, Vec<usize>)],
    config: &distill_models::DecoderConfig,
    student_dir: &Path,
    out: &Path,
    tensor: impl FnMut(usize) -> Result<Vec<f32>, CheckpointError>,
) -> Result<PathBuf, CheckpointError> {
    let tmp = staging_dir(out, ".tmp-export-")?;
    let dtype = FileDtype::from_torch(config.torch_dtype.as_deref());
    let path = tmp.path().join(distill_hf::weights::SINGLE_FILE);
    let write_error = |error| CheckpointError::Io {
        path: path.clone(),
        error,
    };
    tensorfile::write_safetensors(&path, entries, dtype, tensor, write_error)?;
    for name in COPIED {
        let src = student_dir.join(name);
        if src.exists() {
            let dst = tmp.path().join(name);
            std::fs::copy(&src, &dst).map_err(io(&dst))?;
        }
    }
    replace_dir(tmp, out)
}

/// PEFT adapter: lora_A [r, in], lora_B [out, r] under `base_model.model.<name>`.
pub fn export_peft<B: Kernels>(
    model: &CausalLm<B>,
    lora: &LoraSection,
    base_model: &str,
    out: &Path,
) -> Result<PathBuf, CheckpointError> {
    let tmp = staging_dir(out, ".tmp-adapter-")?;
    let tensors: HostTensors = read_adapters(model)
        .filter_map(|(name, (shape, data))| {
            let peft = peft_name(&name)?;
            // A is [in, r] here, [r, in] in PEFT; B is [r, out] here, [out, r] in PEFT.
            Some((peft, transposed(shape, data)))
        })
        .collect();
    write_safetensors(
        &tmp.path().join("adapter_model.safetensors"),
        &tensors,
        FileDtype::F32,
    )?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "use_rslora": false,
    });
    let path = tmp.path().join("adapter_config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json")).map_err(io(&path))?;
    replace_dir(tmp, out)
}

/// The LoRA factors of `model` by our parameter names (`...q_proj.lora.lora_a`), on the host.
fn read_adapters<B: Kernels>(model: &CausalLm<B>) -> impl Iterator<Item = (String, (Vec<usize>, Vec<f32>))> {
    read_params(model, |p| p.name.contains(".lora.lora_")).into_iter()
}

/// A temporary directory beside `out` (same filesystem), for [`replace_dir`] to rename.
fn staging_dir(out: &Path, prefix: &str) -> Result<tempfile::TempDir, CheckpointError> {
    let parent = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .map_err(io(parent))
}

fn replace_dir(tmp: tempfile::TempDir, out: &Path) -> Result<PathBuf, CheckpointError> {
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(io(out))?;
    }
    let path = tmp.keep();
    std::fs::rename(&path, out).map_err(io(out))?;
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{Int, Tensor, TensorData};

    use super::*;

    /// Export then reload through the loader that matches transformers: same logits.
    #[test]
    fn exported_directory_reloads_to_the_same_logits() {
        let fixture = distill_core::testing::fixtures().join("tiny-llama");
        let device = Default::default();
        let model = CausalLm::<Flex>::load(&fixture, &device).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dir = export_hf(&model, &fixture, &out.path().join("final")).unwrap();
        let reloaded = CausalLm::<Flex>::load(&dir, &device).unwrap();
        let ids = Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![3i64, 99, 4, 250], [1, 4]), &device);
        let a: Vec<f32> = model.forward(ids.clone()).into_data().to_vec().unwrap();
        let b: Vec<f32> = reloaded.forward(ids).into_data().to_vec().unwrap();
        // tiny-llama is bf16 on disk, and exports as bf16: bit-identical weights.
        assert_eq!(a, b);
        assert!(dir.join("tokenizer.json").exists() && dir.join("chat_template.jinja").exists());
    }
}
