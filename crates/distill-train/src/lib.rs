//! Distillation training: the KL + CE loss, LoRA, AdamW, checkpoints and the trainer loop.

pub mod loss;
pub mod metrics;
pub mod tensorboard;
