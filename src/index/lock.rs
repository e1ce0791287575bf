//! The lock that gives one [`super::Collection`] handle at a time a collection directory.

use std::fs::TryLockError;
use std::io::{Read, Seek, Write};
use std::path::Path;

use super::error::{IndexError, Result};
use super::fsutil;

/// An exclusive lock on a collection directory, held for the life of the [`super::Collection`].
///
/// An OS advisory lock (`flock` on Unix, `LockFileEx` on Windows) on `LOCK`; it disappears
/// with the process, so a crash never leaves a stale lock. The file names the holder.
pub(crate) struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    pub(crate) fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join("LOCK");
        let mut file = fs_err::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?
            .into_parts()
            .0;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(IndexError::Locked {
                    path,
                    holder: if holder.is_empty() {
                        "unknown".into()
                    } else {
                        holder.into()
                    },
                });
            }
            Err(TryLockError::Error(e)) => return Err(fsutil::fs_err_io(e, "lock", &path)),
        }
        let me = format!("pid {} on {}\n", std::process::id(), hostname());
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(me.as_bytes())?;
        file.sync_all()?;
        Ok(DirLock { _file: file })
    }
}

fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown host".into())
}
