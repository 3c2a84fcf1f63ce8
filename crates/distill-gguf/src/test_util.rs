//! Fixtures for this crate's tests, made by tests/fixtures/gguf/make_gguf_fixtures.py.

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::SafeTensors;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Every tensor of a fixture safetensors file as raw little-endian bytes.
pub fn raw_tensors(name: &str) -> HashMap<String, Vec<u8>> {
    let bytes = std::fs::read(fixtures().join("gguf").join(name)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect()
}

pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}
