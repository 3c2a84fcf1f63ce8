//! Distillation training: the KL + CE loss, LoRA, AdamW, checkpoints and the trainer loop.

pub mod data;
pub mod lora;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod tensorboard;
