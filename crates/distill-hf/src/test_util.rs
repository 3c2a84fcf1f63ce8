//! Fixtures shared by this crate's tests: tiny HF models made by tests/fixtures/make_fixtures.py.

pub use distill_core::testing::fixtures;

/// Copies a fixture model into a temp dir that a test may break.
pub fn scratch_copy(model: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(model)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}
