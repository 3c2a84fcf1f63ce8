//! Writes that a crash cannot leave half-done: temp file in the same directory, fsync, rename.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes` atomically: readers see the old file or the new one, never a mix.
/// The file gets the permissions `std::fs::write` would give it (0666 less the umask).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = temp_file_in(dir, ".tmp-")?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// A temporary file in `dir` to be renamed over an output. tempfile makes its files 0600,
/// being made for secrets; an output renamed from one would be unreadable to anyone else,
/// unlike every other file a run writes. This one is 0666 less the umask, as a new file is.
pub fn temp_file_in(dir: &Path, prefix: &str) -> std::io::Result<tempfile::NamedTempFile> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder.tempfile_in(dir)
}

/// fsync a directory so a rename inside it survives power loss.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn atomic_writes_get_the_permissions_of_a_plain_write() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let plain = dir.path().join("plain.json");
        std::fs::write(&plain, b"{}").unwrap();
        let atomic = dir.path().join("sub/atomic.json");
        write_atomic(&atomic, b"{}").unwrap();
        // Not tempfile's 0600 (under the usual umask 022, 0644 like the plain file).
        assert_eq!(mode(&atomic), mode(&plain));
        // Replacing keeps doing so, and leaves no temporary file behind.
        write_atomic(&atomic, b"[]").unwrap();
        assert_eq!(std::fs::read(&atomic).unwrap(), b"[]");
        assert_eq!(mode(&atomic), mode(&plain));
        assert_eq!(std::fs::read_dir(atomic.parent().unwrap()).unwrap().count(), 1);
    }
}
