//! The upload folder of a collection: where uploaded files are created (never overwriting one)
//! and the content hashes being uploaded right now, so that uploads of the same bytes are
//! serialised. What an upload does with the collection is in [`super::uploads`].

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use super::error::{EngineError, Result};

/// Where uploads go inside a collection directory.
pub fn uploads_dir(index: &Path) -> PathBuf {
    index.join("uploads")
}

/// The upload directory of a collection and the hashes being uploaded now.
#[derive(Debug)]
pub struct UploadFolder {
    dir: PathBuf,
    in_flight: Mutex<HashSet<String>>,
    finished: Condvar,
}

/// A claim on one content hash; released (and waiters woken) when dropped.
pub(super) struct Claim<'a> {
    uploads: &'a UploadFolder,
    hash: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.uploads.in_flight.lock() {
            set.remove(&self.hash);
        }
        self.uploads.finished.notify_all();
    }
}

/// A file this upload created; deleted when dropped unless kept.
pub(super) struct Created {
    pub(super) path: PathBuf,
    pub(super) keep: bool,
}

impl Drop for Created {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), %e, "cannot remove a failed upload");
            }
        }
    }
}

/// Most files tried for one name before giving up (`name.ext`, `name-2.ext`, ...).
const MAX_NAME_TRIES: usize = 100;

impl UploadFolder {
    /// The uploads kept in `dir`, created if needed.
    pub fn open(dir: &Path) -> Result<Self> {
        let io = |source| EngineError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        Ok(Self {
            // Canonical, as the collection's paths are.
            dir: std::fs::canonicalize(dir).map_err(io)?,
            in_flight: Mutex::new(HashSet::new()),
            finished: Condvar::new(),
        })
    }

    /// The directory (canonical).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `path` (canonical) is an uploaded file, which the collection may delete.
    pub fn owns(&self, path: &Path) -> bool {
        path.starts_with(&self.dir)
    }

    pub(super) fn claim(&self, hash: &str) -> Result<Claim<'_>> {
        let poisoned = || EngineError::Internal("the upload lock is poisoned".into());
        let mut set = self.in_flight.lock().map_err(|_| poisoned())?;
        while set.contains(hash) {
            set = self.finished.wait(set).map_err(|_| poisoned())?;
        }
        set.insert(hash.to_string());
        Ok(Claim {
            uploads: self,
            hash: hash.to_string(),
        })
    }

    /// Creates a new file for the upload: `<hash12>-<stem>.<ext>` (or `<hash32>.<ext>` without
    /// a stem), with `-2`, `-3`, ... before the extension when the name is taken.
    pub(super) fn create(
        &self,
        hash: &str,
        stem: Option<&str>,
        ext: &str,
        bytes: &[u8],
    ) -> Result<Created> {
        let io = |path: &Path, source: std::io::Error| EngineError::Io {
            path: path.to_path_buf(),
            source,
        };
        let base = match stem {
            Some(stem) => format!("{}-{stem}", &hash[..12]),
            None => hash[..32].to_string(),
        };
        for n in 1..=MAX_NAME_TRIES {
            let name = if n == 1 {
                format!("{base}.{ext}")
            } else {
                format!("{base}-{n}.{ext}")
            };
            let path = self.dir.join(name);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    // From here the file is ours: a failure below removes it.
                    let created = Created { path, keep: false };
                    f.write_all(bytes)
                        .and_then(|()| f.sync_all())
                        .map_err(|e| io(&created.path, e))?;
                    return Ok(created);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(&path, e)),
            }
        }
        Err(EngineError::Internal(format!(
            "no free file name for {base}.{ext} in {}",
            self.dir.display()
        )))
    }
}
