//! Saving and loading a [`VectorIndex`]: the checksummed `hnsw_rs` dump and its manifest (see
//! "Persistence" in the module docs of [`super`]).

use std::io::Read;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use hnsw_rs::api::AnnT;
use serde::{Deserialize, Serialize};

use super::graph::{graph_ids, Graph};
use super::params::HnswParams;
use super::VectorIndex;
use crate::index::error::{IndexError, Result};
use crate::index::fsutil;

/// Manifest format version.
const MANIFEST_FORMAT: u32 = 1;
pub(super) const MANIFEST: &str = "manifest.json";

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    generation: u64,
    dim: usize,
    params: HnswParams,
    /// Points in the graph, tombstones included.
    points: usize,
    /// `None` for an empty graph (`hnsw_rs` cannot dump one).
    dump: Option<DumpFiles>,
    tombstones: Vec<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct DumpFiles {
    basename: String,
    graph: FileCheck,
    data: FileCheck,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct FileCheck {
    len: u64,
    crc32: u32,
}

impl FileCheck {
    fn of(path: &Path) -> Result<Self> {
        let mut f = fs_err::File::open(path)?;
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            len += n as u64;
        }
        Ok(FileCheck {
            len,
            crc32: hasher.finalize(),
        })
    }
}

impl VectorIndex {
    pub(super) fn try_load(&mut self) -> Result<bool> {
        let manifest_path = self.dir.join(MANIFEST);
        let bytes = match std::fs::read(&manifest_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(fsutil::fs_err_io(e, "read", &manifest_path)),
        };
        let corrupt = |reason: String| IndexError::Corrupt {
            path: manifest_path.clone(),
            reason,
        };
        let manifest: Manifest = serde_json::from_slice(&bytes)?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(corrupt(format!("manifest format {}", manifest.format)));
        }
        if manifest.dim != self.dim {
            return Err(corrupt(format!(
                "dump has {} dimensions, expected {}",
                manifest.dim, self.dim
            )));
        }
        let graph = match &manifest.dump {
            None if manifest.points == 0 => Graph::new(&self.params, 0),
            None => return Err(corrupt("points but no dump files".into())),
            Some(dump) => {
                for (ext, check) in [("graph", &dump.graph), ("data", &dump.data)] {
                    let path = self.dir.join(format!("{}.hnsw.{ext}", dump.basename));
                    let found = FileCheck::of(&path)?;
                    if &found != check {
                        return Err(IndexError::Corrupt {
                            path,
                            reason: format!("expected {check:?}, found {found:?}"),
                        });
                    }
                }
                Graph::load(&self.dir, &dump.basename)?
            }
        };
        let ids = graph_ids(&graph.hnsw);
        if ids.len() != manifest.points || graph.hnsw.get_nb_point() != manifest.points {
            return Err(corrupt(format!(
                "manifest lists {} points, dump holds {} ({} distinct ids)",
                manifest.points,
                graph.hnsw.get_nb_point(),
                ids.len()
            )));
        }
        if !ids.is_empty() {
            let dim = graph.hnsw.get_point_indexation().get_data_dimension();
            if dim != self.dim {
                return Err(corrupt(format!("dump vectors have {dim} dimensions")));
            }
        }
        self.graph = graph;
        // A tombstone must name a point of the graph (`len` subtracts them).
        self.tombstones = manifest
            .tombstones
            .into_iter()
            .filter(|id| ids.binary_search(id).is_ok())
            .collect();
        self.ids = ids;
        self.generation = Some(manifest.generation);
        self.sync_flat();
        Ok(true)
    }

    /// Writes the graph and tombstones as `generation` (see the module docs) and removes older
    /// dumps. On return the state is durable.
    pub fn save(&mut self, generation: u64) -> Result<()> {
        let basename = format!("g{generation}");
        let points = self.graph.hnsw.get_nb_point();
        let dump = if points == 0 {
            None
        } else {
            // A loaded graph never overwrites (hnsw_rs then picks a random name): clear the way.
            for ext in ["graph", "data"] {
                fsutil::remove_if_exists(&self.dir.join(format!("{basename}.hnsw.{ext}")))?;
            }
            let hnsw = &self.graph.hnsw;
            let dir = &self.dir;
            let written = panic::catch_unwind(AssertUnwindSafe(|| hnsw.file_dump(dir, &basename)))
                .map_err(|_| IndexError::Hnsw("hnsw_rs panicked while dumping".into()))?
                .map_err(|e| IndexError::Hnsw(format!("dump failed: {e}")))?;
            let mut checks = Vec::with_capacity(2);
            for ext in ["graph", "data"] {
                let path = self.dir.join(format!("{written}.hnsw.{ext}"));
                fs_err::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)?
                    .sync_all()?;
                checks.push(FileCheck::of(&path)?);
            }
            let data = checks.pop().unwrap_or(FileCheck { len: 0, crc32: 0 });
            let graph = checks.pop().unwrap_or(FileCheck { len: 0, crc32: 0 });
            Some(DumpFiles {
                basename: written,
                graph,
                data,
            })
        };
        let mut tombstones: Vec<u64> = self.tombstones.iter().copied().collect();
        tombstones.sort_unstable();
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            generation,
            dim: self.dim,
            params: self.params,
            points,
            dump,
            tombstones,
        };
        fsutil::write_atomic(
            &self.dir.join(MANIFEST),
            &serde_json::to_vec_pretty(&manifest)?,
        )?;
        // Old dumps are garbage once the manifest points elsewhere.
        let keep = manifest.dump.as_ref().map(|d| d.basename.as_str());
        for entry in fs_err::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let base = name
                .strip_suffix(".hnsw.graph")
                .or_else(|| name.strip_suffix(".hnsw.data"));
            if let Some(base) = base {
                if Some(base) != keep {
                    fsutil::remove_if_exists(&entry.path())?;
                }
            }
        }
        self.generation = Some(generation);
        Ok(())
    }

    /// Bytes of the dump, manifest and any leftovers on disk.
    pub fn bytes_on_disk(&self) -> Result<u64> {
        fsutil::dir_size(&self.dir)
    }
}
