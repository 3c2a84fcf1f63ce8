//! Fixtures shared by this crate's tests: tiny HF models made by tests/fixtures/make_fixtures.py.

use std::collections::HashMap;

use safetensors::{Dtype, SafeTensors};

pub use distill_core::testing::fixtures;

/// A reference tensor from reference.safetensors, as f64 whatever its storage.
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

pub fn read_reference(model: &str) -> HashMap<String, RefTensor> {
    let bytes = std::fs::read(fixtures().join(model).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap())))
                    .collect(),
                Dtype::I64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("unexpected dtype {other:?} in reference"),
            };
            (
                name,
                RefTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            )
        })
        .collect()
}
