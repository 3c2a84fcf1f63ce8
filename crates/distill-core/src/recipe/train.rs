//! `[student] [train] [loss] [lora]`: the model being distilled and how.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Checks, Interval, Recipe};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StudentSection {
    /// HF model directory or `org/name[@revision]`.
    pub model: String,
}

impl Default for StudentSection {
    fn default() -> Self {
        StudentSection {
            model: "Qwen/Qwen2.5-1.5B-Instruct".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Root of checkpoints/<name>/ and runs/<name>/.
    pub out: PathBuf,
    pub seed: u64,
    /// Optimizer steps; None: derived from `epochs`.
    pub max_steps: Option<usize>,
    pub epochs: f64,
    /// Tokens per packed sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch, and micro-batches accumulated per optimizer step.
    pub micro_batch: usize,
    pub grad_accum: usize,
    /// Pack several samples per sequence (attention and positions never cross samples).
    pub packing: bool,
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    /// Recompute each transformer block in backward instead of keeping its activations.
    pub recompute: bool,
    /// With `recompute`, a block's MLP runs over at most this many tokens of the micro-batch at
    /// a time, forward and backward (0: all at once). Its [tokens, intermediate] activations
    /// are a block's largest at long sequence lengths; below this many tokens nothing changes.
    pub mlp_chunk_tokens: usize,
    /// With `recompute`, keep the block inputs in host memory between the forward and the
    /// backward instead of on the device, copied beside the compute.
    pub offload_block_inputs: bool,
    /// Keep AdamW's moments in host memory between updates, each group's brought back for its
    /// update, one group ahead (ZeRO-Offload's memory, with the update still on the device):
    /// the device holds about two groups' moments instead of 8 bytes a trainable parameter.
    pub offload_optimizer: bool,
    /// With `recompute`, keep the input of every this-many-th block (1: every block's); the
    /// backward recomputes the others from it, without a graph. Fewer kept inputs for one
    /// more forward pass over all but one block of every this many.
    pub block_inputs_every: usize,
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    /// Every this many steps, also write the student as an HF model to `exports/step-N/`
    /// under the run's checkpoints (kept, unlike checkpoints), for eval or serve mid-run;
    /// 0: only `final/`.
    pub export_every: usize,
    pub log_every: usize,
    /// Abort after this many consecutive non-finite steps.
    pub max_bad_steps: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            out: PathBuf::from("checkpoints"),
            seed: 42,
            max_steps: None,
            epochs: 1.0,
            seq_len: 4096,
            micro_batch: 1,
            grad_accum: 8,
            packing: true,
            lr: 1e-4,
            min_lr_ratio: 0.1,
            warmup_steps: 20,
            schedule: Schedule::Cosine,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            recompute: true,
            mlp_chunk_tokens: 8192,
            offload_block_inputs: false,
            offload_optimizer: false,
            block_inputs_every: 1,
            checkpoint_every: 200,
            keep_checkpoints: 2,
            export_every: 0,
            log_every: 1,
            max_bad_steps: 5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlKind {
    /// KL(teacher || student): mass-covering, the classic Hinton loss.
    Forward,
    /// KL(student || teacher): mode-seeking (MiniLLM).
    Reverse,
    /// Generalized JSD with `beta` (GKD); beta 0.5 is the symmetric JSD.
    Jsd,
}

/// What to do with the probability mass outside the teacher's top-k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingMass {
    /// Renormalise the teacher's top-k to sum to 1 and compare on those ids only.
    Renormalize,
    /// Put the leftover mass in one extra "other" bucket on both sides.
    OtherBucket,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossSection {
    /// total = kd_ratio * KL + (1 - kd_ratio) * CE.
    pub kd_ratio: f64,
    pub kind: KlKind,
    pub beta: f64,
    pub temperature: f64,
    pub missing_mass: MissingMass,
    /// Tokens per loss chunk: the [chunk x vocab] logits are all that is ever materialised.
    pub chunk_tokens: usize,
}

impl Default for LossSection {
    fn default() -> Self {
        LossSection {
            kd_ratio: 0.5,
            kind: KlKind::Forward,
            beta: 0.5,
            temperature: 1.0,
            missing_mass: MissingMass::OtherBucket,
            chunk_tokens: 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub enabled: bool,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// HF module names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.
    pub targets: Vec<String>,
    /// How the frozen base's linear layers are held: `none` (the model's dtype) or `nf4`
    /// (QLoRA: 4-bit NormalFloat, about a quarter of the memory of bf16).
    pub quantize: BaseQuant,
}

/// Storage of a LoRA run's frozen base weights ([`LoraSection::quantize`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BaseQuant {
    #[default]
    None,
    Nf4,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            enabled: true,
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: LORA_TARGETS.map(String::from).to_vec(),
            quantize: BaseQuant::None,
        }
    }
}

/// The linear layers LoRA may adapt (HF module names); all of them by default.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Ranges as torch's AdamW, TRL and torchtune take them: counts at least 1, lr and eps
/// finite and > 0, betas in [0, 1), shares in [0, 1], dropout in [0, 1).
pub(super) fn validate(r: &Recipe, c: &mut Checks) {
    let t = &r.train;
    c.unset_or_at_least_1("train.max_steps", t.max_steps.map(|n| n as u64));
    c.positive("train.epochs", t.epochs);
    for (key, n) in [
        ("train.seq_len", t.seq_len),
        ("train.micro_batch", t.micro_batch),
        ("train.grad_accum", t.grad_accum),
        ("train.block_inputs_every", t.block_inputs_every),
    ] {
        c.at_least_1(key, n as u64);
    }
    c.positive("train.lr", t.lr);
    c.within("train.min_lr_ratio", t.min_lr_ratio, Interval::UNIT);
    c.non_negative("train.weight_decay", t.weight_decay);
    c.within("train.beta1", t.beta1, Interval::ClosedOpen(0.0, 1.0));
    c.within("train.beta2", t.beta2, Interval::ClosedOpen(0.0, 1.0));
    c.positive("train.eps", t.eps);
    c.non_negative("train.max_grad_norm", t.max_grad_norm);
    for (key, n) in [
        ("train.checkpoint_every", t.checkpoint_every),
        ("train.keep_checkpoints", t.keep_checkpoints),
        ("train.log_every", t.log_every),
        ("train.max_bad_steps", t.max_bad_steps),
    ] {
        c.at_least_1(key, n as u64);
    }

    // Knobs of what recompute keeps: without it each block's whole graph stays, and they
    // would silently do nothing.
    if !t.recompute {
        for (key, on) in [
            ("train.offload_block_inputs", t.offload_block_inputs),
            ("train.block_inputs_every", t.block_inputs_every > 1),
        ] {
            if on {
                c.fail(key, "works with train.recompute = true, which is off".into());
            }
        }
    }

    // One weight, kd_ratio, and its complement: they can never both be zero.
    let l = &r.loss;
    c.within("loss.kd_ratio", l.kd_ratio, Interval::UNIT);
    c.within("loss.beta", l.beta, Interval::UNIT);
    c.positive("loss.temperature", l.temperature);
    c.at_least_1("loss.chunk_tokens", l.chunk_tokens as u64);

    let lora = &r.lora;
    c.at_least_1("lora.r", lora.r as u64);
    c.positive("lora.alpha", lora.alpha);
    c.within("lora.dropout", lora.dropout, Interval::ClosedOpen(0.0, 1.0));
    if let Some(bad) = lora.targets.iter().find(|t| !LORA_TARGETS.contains(&t.as_str())) {
        c.fail(
            "lora.targets",
            format!(
                "`{bad}` is not a linear layer; choose from {}",
                LORA_TARGETS.join(", ")
            ),
        );
    }
    if lora.enabled && lora.targets.is_empty() {
        c.fail(
            "lora.targets",
            format!(
                "is empty, so nothing would train; choose from {}, or set lora.enabled = false",
                LORA_TARGETS.join(", ")
            ),
        );
    }
    if !lora.enabled && lora.quantize != BaseQuant::None {
        c.fail(
            "lora.quantize",
            "quantizes the frozen base of a LoRA run; set lora.enabled = true, or remove it for full fine-tuning"
                .into(),
        );
    }
}
