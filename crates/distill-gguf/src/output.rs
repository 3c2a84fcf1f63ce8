//! Outputs that appear whole or not at all: each is built beside its destination under a
//! temporary name and renamed into place, so a failed conversion leaves nothing behind.

use std::path::{Path, PathBuf};

use crate::error::{GgufError, Result};

fn parent_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Refuses to replace a non-empty directory or an existing file unless `force`.
fn check_destination(out: &Path, force: bool) -> Result<()> {
    let occupied = match std::fs::read_dir(out) {
        Ok(mut entries) => entries.next().is_some(),
        Err(_) => out.exists(),
    };
    if occupied && !force {
        return Err(GgufError::invalid(
            out,
            "already exists and is not empty; pass --force to replace it",
        ));
    }
    Ok(())
}

/// Runs `build` on a fresh directory beside `out`, then moves it to `out`.
pub fn write_dir<T>(out: &Path, force: bool, build: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    check_destination(out, force)?;
    let parent = parent_of(out);
    std::fs::create_dir_all(&parent).map_err(|e| GgufError::io(&parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".distill-tmp-")
        .tempdir_in(&parent)
        .map_err(|e| GgufError::io(&parent, e))?;
    let value = build(tmp.path())?;
    if out.is_dir() {
        std::fs::remove_dir_all(out).map_err(|e| GgufError::io(out, e))?;
    } else if out.exists() {
        std::fs::remove_file(out).map_err(|e| GgufError::io(out, e))?;
    }
    let tmp = tmp.keep();
    std::fs::rename(&tmp, out).map_err(|e| GgufError::io(out, e))?;
    Ok(value)
}

/// Runs `build` on a fresh file path beside `out`, then moves it to `out`.
pub fn write_file<T>(out: &Path, force: bool, build: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if out.is_dir() {
        return Err(GgufError::invalid(
            out,
            "is a directory; name the .gguf file to write",
        ));
    }
    check_destination(out, force)?;
    let parent = parent_of(out);
    std::fs::create_dir_all(&parent).map_err(|e| GgufError::io(&parent, e))?;
    let tmp = distill_core::fsutil::temp_file_in(&parent, ".distill-tmp-")
        .map_err(|e| GgufError::io(&parent, e))?;
    let value = build(tmp.path())?;
    tmp.persist(out).map_err(|e| GgufError::io(out, e.error))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_leave_nothing_and_existing_outputs_need_force() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("model");
        let err = write_dir(&out, false, |_| -> Result<()> {
            Err(GgufError::invalid("x", "boom"))
        });
        assert!(err.is_err());
        assert_eq!(
            std::fs::read_dir(root.path()).unwrap().count(),
            0,
            "temp dir left behind"
        );

        write_dir(&out, false, |d| {
            std::fs::write(d.join("a"), "1").map_err(|e| GgufError::io(d, e))
        })
        .unwrap();
        let err = write_dir(&out, false, |_| Ok(())).unwrap_err().to_string();
        assert!(err.contains("pass --force"), "{err}");
        write_dir(&out, true, |d| {
            std::fs::write(d.join("b"), "2").map_err(|e| GgufError::io(d, e))
        })
        .unwrap();
        assert!(out.join("b").exists() && !out.join("a").exists());

        let file = root.path().join("m.gguf");
        write_file(&file, false, |p| {
            std::fs::write(p, "x").map_err(|e| GgufError::io(p, e))
        })
        .unwrap();
        assert!(write_file(&file, false, |_| Ok(())).is_err());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 2);
        #[cfg(unix)]
        {
            // Readable as a plain write's file is (tempfile alone would make it 0600).
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            let plain = root.path().join("plain");
            std::fs::write(&plain, "x").unwrap();
            assert_eq!(mode(&file), mode(&plain));
        }
    }
}
