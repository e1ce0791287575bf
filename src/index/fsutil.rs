//! Small file-system helpers shared by the stores: crash-safe writes and size accounting.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::Result;

/// Writes `bytes` to `path` so that a crash leaves either the old file or the complete new one:
/// write a temporary file in the same directory, fsync it, rename it over `path`, fsync the
/// directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f = fs_err::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    if let Err(e) = fs_err::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    sync_dir(parent(path))
}

/// The temporary name used by [`write_atomic`]: `<name>.tmp` beside the target.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// fsyncs a directory so that renames and creations in it are durable (no-op where directories
/// cannot be opened, e.g. Windows).
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    fs_err::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Removes a file, treating "already gone" as success.
pub(crate) fn remove_if_exists(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(fs_err_io(e, "remove", path)),
    }
}

/// Total size of the regular files under `dir`, recursively (0 if it does not exist).
pub(crate) fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(fs_err_io(e, "read directory", dir)),
    };
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += dir_size(&entry.path())?;
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}

/// An `io::Error` whose message names the operation and the path, as `fs-err` does.
pub(crate) fn fs_err_io(e: std::io::Error, op: &str, path: &Path) -> crate::index::IndexError {
    std::io::Error::new(e.kind(), format!("failed to {op} {}: {e}", path.display())).into()
}
