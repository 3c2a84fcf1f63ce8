//! Fixtures shared by this crate's tests: tiny HF models made by tests/fixtures/make_fixtures.py.

use std::path::PathBuf;

/// tests/fixtures, or $DISTILL_FIXTURES when the test binary runs away from the source tree
/// (as on the GPU machine).
pub fn fixtures() -> PathBuf {
    std::env::var_os("DISTILL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
}

/// Copies a fixture model into a temp dir that a test may break.
pub fn scratch_copy(model: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(model)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}
