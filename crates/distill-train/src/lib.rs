//! Distillation training: the KL + CE loss, LoRA, AdamW, checkpoints and the trainer loop.

pub mod checkpoint;
pub mod export;
pub mod lora;
pub mod loss;
pub mod metrics;
pub mod on_policy;
pub mod optim;
pub mod params;
pub mod soft;
pub mod tensorboard;
pub mod trainer;

/// tests/fixtures, or $DISTILL_FIXTURES when the test binary runs away from the source tree
/// (as on the GPU machine).
#[cfg(test)]
fn test_fixtures() -> std::path::PathBuf {
    std::env::var_os("DISTILL_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
}
