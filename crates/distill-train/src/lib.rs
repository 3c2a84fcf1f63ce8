//! Distillation training: the KL + CE loss, LoRA, AdamW, checkpoints and the trainer loop.

pub mod checkpoint;
pub mod export;
pub mod lora;
pub mod loss;
pub mod metrics;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod on_policy;
pub mod optim;
pub mod parallel;
pub mod params;
pub mod soft;
pub mod tensorboard;
pub mod trainer;
