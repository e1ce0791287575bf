//! Approximate nearest-neighbour search over ITC vectors: an HNSW graph (`hnsw_rs`) keyed by
//! [`ImageId`], with tombstones for deletes, filtered search with an exact fallback, and a
//! checksummed on-disk dump.
//!
//! # Who does what
//! `hnsw_rs` builds the graph and saves and loads it. Searches do not use its search: they walk
//! a compact copy of the graph ([`super::flat`]: one contiguous arena of vectors, CSR neighbour
//! lists, an epoch-stamped visited array, a SIMD dot product), about 5x faster per query on the
//! same graph at 100k random vectors (benches/README.md). The copy is a snapshot, kept current
//! like this:
//! - load, [`VectorIndex::rebuild`] and [`VectorIndex::compact`] make a new copy;
//! - [`VectorIndex::remove`] marks the tombstone in the copy too;
//! - inserted points go into the graph and into a side list of vectors that every search scans
//!   exactly and merges, so they are found at once and with their exact score; when the side
//!   list reaches a sixteenth of the copy (at least 1024, at most 4096 points), the insert that
//!   got it there remakes the copy from the graph (linear in the graph's size; amortised over at
//!   least 1024 inserts, each of which costs a graph search at `ef_construction` anyway).
//!
//! Searching the snapshot rather than the live graph loses nothing: the snapshot is a complete
//! HNSW graph of the points it holds, and the others are scanned exactly.
//!
//! # Distance
//! Vectors are L2-normalised on the way in (queries too). Our search scores by dot product,
//! which on unit vectors is the cosine. The graph is built with `DistL2`: on unit vectors
//! `‖a−b‖² = 2 − 2·cos(a, b)`, so it ranks as the cosine does (its own search, kept for
//! comparison, recovers the cosine as `1 − d²/2`). Why not the alternatives for the build:
//! - `DistDot` (1 − a·b) panics: its scalar path asserts `1 − a·b ≥ 0`, which fails for a vector
//!   against itself whenever the `f32` sum rounds above 1 (37% of random unit vectors in 256-d):
//!   a search by an indexed image would abort;
//! - `DistCosine` renormalises both vectors on every evaluation in `f64`, work we do once here,
//!   and has no SIMD path. `DistL2` has an AVX2/SSE path (`anndists` feature `simdeez_f`, enabled
//!   in Cargo.toml: builds and searches ~3x faster) and never asserts on unit data.
//!
//! # Parameters
//! `m = 32, ef_construction = 200, ef_search = 400`. Uniformly random 256-d unit vectors are the
//! worst case for a graph index (no cluster structure; real ITC embeddings are far easier), and
//! there recall@10 at 20k vectors (200 random queries, release build) is 0.40 / 0.73 / 0.90 at
//! `ef` 64 / 200 / 400 with `m = 16`, and 0.62 / 0.91 / 0.99 with `m = 32`. Raising `m` costs
//! ~1.5x build time, which is noise next to running BLIP on each image; `ef = 400` costs a few
//! milliseconds per query, noise next to ITM reranking. The debug-build tests assert ≥ 0.98.
//!
//! # Deletes, filters and search strategies
//! `hnsw_rs` cannot delete. A removed id becomes a tombstone: it stays in the graph (it still
//! routes searches) and is filtered out of every result. [`VectorIndex::compact`] rebuilds the
//! graph without tombstones; [`VectorIndex::needs_compaction`] says when their share passes
//! [`HnswParams::compact_fraction`].
//!
//! A search estimates how many live ids can answer it (all live ids, or those passing the filter,
//! estimated from a stride sample of 1024 ids), then:
//! - at most [`HnswParams::exact_threshold`] (10k): **exact scan**. A SIMD brute force over 20k
//!   vectors takes ~3 ms, less than a graph walk at `ef = 400` (~5 ms), and never misses;
//! - at most `128 · ef` such ids: **exact scan** too. Past that `ef` the walk
//!   costs more than streaming every row (1M random vectors: scan 75 ms, walk ~20 µs per unit of
//!   `ef`; recall 0.98 needs `ef` 16384 there), so a large `ef` buys the exact answer faster;
//! - no filter, no tombstones: **plain** graph search;
//! - share `s` of the graph passing with `4k / s ≤ 4·ef`: **post-filter**, an unfiltered graph
//!   search for `max(ef, 4k / s)` candidates, filtered afterwards. This covers tombstones (s ≥ 0.8
//!   once compaction runs) and mild filters;
//! - otherwise: **filter inside the walk**: every point routes, only passing points enter the
//!   results, and the walk goes on until it holds `ef` of them. (`hnsw_rs`'s `search_filter`,
//!   which this replaced, never stopped its layer-0 walk early with a filter: 2.5x (30%
//!   tombstones) to 6x (5% filter) longer than post-filtering at the same recall.)
//!
//! Whatever the strategy, a graph search that returns fewer than `k` hits (the filter cut the
//! graph into pieces, tombstones clustered near the query) is redone as an exact scan, so a search
//! returns `k` results whenever `k` live ids pass the filter.
//!
//! Measured with `hnsw_rs`'s search at 20k random vectors, release build, 2 loaded cores, per
//! query: plain 0.99 recall in ~5-7 ms; 5% filter: post-filter (`ef` 800) 0.9975 in 10 ms,
//! `search_filter` 1.0 in 65 ms, exact 0.3 ms; 30% tombstones: post-filter 0.9885 in 5 ms,
//! `search_filter` 1.0 in 13 ms. (Not remeasured per strategy since the flat copy.)
//!
//! Note for debug builds: `Hnsw<f32, DistL2>` is generic, so its code is compiled in this crate
//! at opt-level 0 even though `hnsw_rs` itself is built with opt-level 3; only the distance
//! kernels (non-generic, in `anndists`) run optimised. Expect ~3x slower graph builds in tests.
//! The flat search is this crate's code too, so it also runs unoptimised in debug tests.

//! # Persistence
//! [`VectorIndex::save`] dumps the graph with `hnsw_rs`'s `file_dump` to `g<generation>.hnsw.graph`
//! and `.hnsw.data`, fsyncs both, then atomically writes `manifest.json` with the generation, the
//! tombstones and the length and CRC32 of each dump file. [`VectorIndex::open`] loads the dump
//! only if the manifest parses and both files match it: `hnsw_rs`'s loader panics or calls
//! `process::exit` on corrupt input, so it must only see files it wrote. Anything else (missing,
//! corrupt, other dimension) opens an empty index with no generation, and the collection rebuilds
//! it from sled.

use std::collections::HashSet;
use std::io::Read;
use std::mem::ManuallyDrop;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use hnsw_rs::api::AnnT;
use hnsw_rs::hnsw::{Hnsw, IterPoint, Neighbour};
use hnsw_rs::hnswio::HnswIo;
use hnsw_rs::prelude::{DistL2, Distance};
use serde::{Deserialize, Serialize};

use super::error::{IndexError, Result};
use super::flat::{FlatGraph, Rows};
use super::fsutil;
use super::id::ImageId;
use super::topk::TopK;

/// The graph's distance (see the module docs).
type Dist = DistL2;

/// Cosine similarity of two unit vectors from their L2 distance.
fn cosine_from_l2(d: f32) -> f32 {
    1.0 - 0.5 * d * d
}

/// `hnsw_rs`'s hard limit: it calls `process::exit` above 256, and stores the value as a `u8`
/// (256 wraps to 0), so 255 is the real maximum.
const MAX_M: usize = 255;
/// Layers of the graph (`hnsw_rs`'s maximum, 16).
const MAX_LAYERS: usize = 16;
/// Manifest format version.
const MANIFEST_FORMAT: u32 = 1;
const MANIFEST: &str = "manifest.json";

/// HNSW construction and search parameters.
///
/// The defaults reach recall@10 ≥ 0.98 against exact search on 20k uniformly random 256-d unit
/// vectors (the hardest case: real embeddings cluster), also with 30% of the ids tombstoned and
/// with a filter passing 5% of them; see the tests.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HnswParams {
    /// Links per node and layer (`max_nb_connection`; layer 0 keeps `2·m`). 2..=255.
    pub m: usize,
    /// Candidate list size while inserting. Larger builds slower and better graphs.
    pub ef_construction: usize,
    /// Default candidate list size while searching (per query overridable); at least `k` is used.
    pub ef_search: usize,
    /// A search whose candidates (live ids passing the filter, estimated) number at most this
    /// scans them exactly instead of walking the graph: at that size a brute-force scan is as
    /// fast as a graph walk at `ef_search` and never misses.
    pub exact_threshold: usize,
    /// Share of tombstones in the graph above which [`VectorIndex::needs_compaction`] says yes.
    pub compact_fraction: f32,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams {
            m: 32,
            ef_construction: 200,
            ef_search: 400,
            exact_threshold: 10_000,
            compact_fraction: 0.2,
        }
    }
}

impl HnswParams {
    /// Checks the ranges; `hnsw_rs` would exit the process on some bad values instead of failing.
    pub fn validate(&self) -> Result<()> {
        if !(2..=MAX_M).contains(&self.m) {
            return Err(IndexError::InvalidParams(format!(
                "hnsw m = {} (must be 2..={MAX_M})",
                self.m
            )));
        }
        if self.ef_construction == 0 || self.ef_search == 0 {
            return Err(IndexError::InvalidParams(
                "hnsw ef_construction and ef_search must be at least 1".into(),
            ));
        }
        if !(self.compact_fraction > 0.0 && self.compact_fraction <= 1.0) {
            return Err(IndexError::InvalidParams(format!(
                "compact_fraction = {} (must be in (0, 1])",
                self.compact_fraction
            )));
        }
        Ok(())
    }
}

/// Owns an `Hnsw` and, for a graph loaded from a dump, the `HnswIo` loader it borrows from.
///
/// `HnswIo::load_hnsw(&'a mut self) -> Hnsw<'b, ..>` with `'a: 'b`: the graph may hold slices of
/// the loader's memory map, so the loader must outlive it. We never enable the mmap, but the
/// types do not know that; this struct keeps the loader on the heap, behind a raw pointer that
/// nothing else uses, and drops the graph first.
struct Graph {
    hnsw: ManuallyDrop<Hnsw<'static, f32, Dist>>,
    loader: Option<NonNull<HnswIo>>,
}

// SAFETY: `Hnsw<f32, _>` is Send + Sync (checked below); the loader is only touched again in
// `Drop`, after the graph is gone, and `HnswIo` is Send (checked below).
unsafe impl Send for Graph {}
unsafe impl Sync for Graph {}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    const fn send<T: Send>() {}
    send_sync::<Hnsw<'static, f32, Dist>>();
    send::<HnswIo>();
};

impl Graph {
    fn new(params: &HnswParams, capacity: usize) -> Self {
        Graph {
            hnsw: ManuallyDrop::new(Hnsw::new(
                params.m,
                capacity.max(1024),
                MAX_LAYERS,
                params.ef_construction,
                Dist::default(),
            )),
            loader: None,
        }
    }

    /// Loads `dir/basename.hnsw.{graph,data}`. Panics inside `hnsw_rs` become errors (its
    /// `process::exit` paths cannot be caught: callers verify the files first).
    fn load(dir: &Path, basename: &str) -> Result<Self> {
        let loader = Box::into_raw(Box::new(HnswIo::new(dir, basename)));
        // SAFETY: `loader` is a fresh, unaliased heap allocation. The `&'static mut` made here is
        // the only reference ever taken to it; it is freed below on failure, or by `Graph::drop`
        // after the graph borrowing it has been dropped.
        let res = panic::catch_unwind(AssertUnwindSafe(|| unsafe {
            (*loader).load_hnsw::<f32, Dist>()
        }));
        match res {
            Ok(Ok(hnsw)) => Ok(Graph {
                hnsw: ManuallyDrop::new(hnsw),
                loader: NonNull::new(loader),
            }),
            Ok(Err(e)) => {
                // SAFETY: no graph borrows the loader; this is its only owner.
                drop(unsafe { Box::from_raw(loader) });
                Err(IndexError::Hnsw(format!("cannot load dump: {e}")))
            }
            Err(_) => {
                // SAFETY: as above; the partial graph was dropped while unwinding.
                drop(unsafe { Box::from_raw(loader) });
                Err(IndexError::Hnsw(
                    "hnsw_rs panicked while loading dump".into(),
                ))
            }
        }
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: `hnsw` is dropped exactly once, here, before the loader it may borrow from.
        unsafe { ManuallyDrop::drop(&mut self.hnsw) };
        if let Some(loader) = self.loader.take() {
            // SAFETY: created by `Box::into_raw` in `Graph::load`, freed only here.
            drop(unsafe { Box::from_raw(loader.as_ptr()) });
        }
    }
}

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

/// How a search walks the index (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Strategy {
    /// Pick from the filter's estimated selectivity.
    Auto,
    /// Unfiltered graph search (no filter, no tombstones).
    Plain,
    /// Brute force over the allowed points.
    Exact,
    /// Unfiltered graph search over-fetching by 1 / share, then filtering.
    PostFilter(f64),
    /// The filter applied inside the graph walk (`hnsw_rs::search_filter` when searching with
    /// `hnsw_rs`).
    GraphFilter,
}

/// Post-filtering fetches `k * POST_FILTER_SLACK / share` candidates...
const POST_FILTER_SLACK: f64 = 4.0;
/// ...but at most `POST_FILTER_MAX_EF * ef`; filters that would need more walk the graph with
/// the filter instead.
const POST_FILTER_MAX_EF: usize = 4;

/// An unfiltered search at `ef` scans exactly when the live points number at most
/// `SCAN_ROWS_PER_EF * ef`: a graph walk scores some tens of points per unit of `ef`, each a
/// cache miss, while the scan streams the rows in order; past this ratio the scan is about as
/// fast and never misses (break-even measured near `n / 130` at 1M points and `n / 80` at 100k:
/// benches/README.md, "1M vectors in one run").
const SCAN_ROWS_PER_EF: usize = 128;

/// The HNSW index of a collection's ITC vectors (directory `vectors/`).
pub struct VectorIndex {
    dir: PathBuf,
    dim: usize,
    params: HnswParams,
    graph: Graph,
    /// Every id in the graph, tombstoned or not, sorted.
    ids: Vec<u64>,
    tombstones: HashSet<u64>,
    /// Generation of the dump this state was loaded from or last saved as; `None` for a fresh
    /// or unusable dump.
    generation: Option<u64>,
    /// The compact copy of the graph that searches walk (see the module docs)...
    flat: FlatGraph,
    /// ...and the points inserted since it was made (unit vectors, ids), scanned exactly.
    pending: Rows,
    pending_ids: Vec<u64>,
    /// Search with `hnsw_rs` itself instead of the flat copy (benchmarks and tests compare).
    hnsw_rs_search: bool,
}

impl VectorIndex {
    /// Opens the index in `dir` (created if missing) for vectors of `dim` dimensions.
    ///
    /// Loads the last saved dump if it is intact; otherwise starts empty with
    /// [`VectorIndex::generation`] `None`, and the caller rebuilds it from its source of truth.
    pub fn open(dir: &Path, dim: usize, params: HnswParams) -> Result<Self> {
        params.validate()?;
        if dim == 0 {
            return Err(IndexError::InvalidParams("vector dimension 0".into()));
        }
        fs_err::create_dir_all(dir)?;
        let mut index = VectorIndex {
            dir: dir.to_path_buf(),
            dim,
            params,
            graph: Graph::new(&params, 0),
            ids: Vec::new(),
            tombstones: HashSet::new(),
            generation: None,
            flat: FlatGraph::empty(dim),
            pending: Rows::new(dim),
            pending_ids: Vec::new(),
            hnsw_rs_search: false,
        };
        match index.try_load() {
            Ok(true) => {}
            Ok(false) => tracing::debug!(dir = %dir.display(), "no vector index dump"),
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "vector index dump unusable; starting empty"
            ),
        }
        Ok(index)
    }

    fn try_load(&mut self) -> Result<bool> {
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

    /// Remakes the flat copy from the graph, which then holds every point.
    fn sync_flat(&mut self) {
        let tombstones = &self.tombstones;
        match FlatGraph::from_hnsw(&self.graph.hnsw, self.dim, |id| tombstones.contains(&id)) {
            Some(flat) => {
                self.flat = flat;
                self.pending = Rows::new(self.dim);
                self.pending_ids.clear();
            }
            None => {
                // Cannot happen with hnsw_rs 0.3; if it ever does, search with hnsw_rs (whose
                // graph holds every point: the side list is not needed).
                tracing::error!("hnsw_rs graph layout not understood; searching with hnsw_rs");
                self.hnsw_rs_search = true;
                self.pending = Rows::new(self.dim);
                self.pending_ids.clear();
            }
        }
    }

    /// Remakes the flat copy once the points inserted since the last one are too many to scan
    /// exactly on every search: more than a sixteenth of the copy, at least 1024 and at most
    /// 4096 (a few hundred microseconds of scanning per search at 256 dimensions).
    fn sync_flat_if_stale(&mut self) {
        let limit = (self.flat.len() / 16).clamp(1024, 4096);
        if self.pending_ids.len() >= limit {
            self.sync_flat();
        }
    }

    /// Benchmarks only: search with `hnsw_rs`'s own code (`true`) instead of the flat copy.
    #[doc(hidden)]
    pub fn set_hnsw_rs_search(&mut self, on: bool) {
        self.hnsw_rs_search = on;
    }

    /// Generation of the dump this state came from or was last saved as; `None` when nothing
    /// usable was on disk.
    pub fn generation(&self) -> Option<u64> {
        self.generation
    }

    /// The vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The parameters new graphs are built with.
    pub fn params(&self) -> &HnswParams {
        &self.params
    }

    /// Number of live (not tombstoned) vectors.
    pub fn len(&self) -> usize {
        self.ids.len() - self.tombstones.len()
    }

    /// Whether there are no live vectors.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of tombstones still in the graph.
    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }

    /// Whether `id` is in the graph (live or tombstoned).
    pub fn contains(&self, id: ImageId) -> bool {
        self.ids.binary_search(&id.0).is_ok()
    }

    /// Whether `id` is in the graph and not tombstoned.
    pub fn is_live(&self, id: ImageId) -> bool {
        self.contains(id) && !self.tombstones.contains(&id.0)
    }

    /// Checks length and values and returns the unit vector.
    fn normalized(&self, v: &[f32]) -> Result<Vec<f32>> {
        let norm = check_vector(v, self.dim)?;
        Ok(v.iter().map(|x| (f64::from(*x) / norm) as f32).collect())
    }

    /// Checks that `vector` could be inserted (length, finite, not zero) without inserting it.
    pub fn check(&self, vector: &[f32]) -> Result<()> {
        self.normalized(vector).map(|_| ())
    }

    fn data_id(id: ImageId) -> Result<usize> {
        usize::try_from(id.0)
            .map_err(|_| IndexError::InvalidParams(format!("id {id} does not fit usize")))
    }

    fn insert_id(&mut self, id: u64) {
        match self.ids.last() {
            Some(&last) if last >= id => {
                if let Err(pos) = self.ids.binary_search(&id) {
                    self.ids.insert(pos, id);
                }
            }
            _ => self.ids.push(id),
        }
    }

    /// Adds a vector. Ids are never reused: an id already in the graph (even tombstoned) is
    /// refused with [`IndexError::DuplicateId`]; changing an image's vector takes a rebuild.
    pub fn insert(&mut self, id: ImageId, vector: &[f32]) -> Result<()> {
        let v = self.normalized(vector)?;
        let data_id = Self::data_id(id)?;
        if self.contains(id) {
            return Err(IndexError::DuplicateId(id));
        }
        self.graph.hnsw.insert_slice((&v, data_id));
        self.insert_id(id.0);
        self.pending.push(&v);
        self.pending_ids.push(id.0);
        self.sync_flat_if_stale();
        Ok(())
    }

    /// Adds many vectors using all cores (`hnsw_rs::parallel_insert`). All are checked first;
    /// on error nothing is inserted.
    pub fn insert_batch(&mut self, items: &[(ImageId, Vec<f32>)]) -> Result<()> {
        let mut seen = HashSet::with_capacity(items.len());
        let mut prepared = Vec::with_capacity(items.len());
        for (id, v) in items {
            if self.contains(*id) || !seen.insert(id.0) {
                return Err(IndexError::DuplicateId(*id));
            }
            prepared.push((self.normalized(v)?, Self::data_id(*id)?));
        }
        let refs: Vec<(&Vec<f32>, usize)> = prepared.iter().map(|(v, id)| (v, *id)).collect();
        self.graph.hnsw.parallel_insert(&refs);
        for ((id, _), (v, _)) in items.iter().zip(&prepared) {
            self.insert_id(id.0);
            self.pending.push(v);
            self.pending_ids.push(id.0);
        }
        self.sync_flat_if_stale();
        Ok(())
    }

    /// Tombstones `id`; returns whether it was live.
    pub fn remove(&mut self, id: ImageId) -> bool {
        let removed = self.contains(id) && self.tombstones.insert(id.0);
        if removed {
            self.flat.mark_dead(id.0);
        }
        removed
    }

    /// Whether tombstones make up at least [`HnswParams::compact_fraction`] of the graph.
    pub fn needs_compaction(&self) -> bool {
        !self.tombstones.is_empty()
            && self.tombstones.len() as f32 >= self.params.compact_fraction * self.ids.len() as f32
    }

    /// Rebuilds the graph from its own live vectors, dropping the tombstones.
    pub fn compact(&mut self) -> Result<()> {
        let mut live = Vec::with_capacity(self.len());
        self.for_each_point(|id, v| {
            if !self.tombstones.contains(&id) {
                live.push((ImageId(id), v.to_vec()));
            }
        });
        tracing::info!(
            live = live.len(),
            tombstones = self.tombstones.len(),
            "compacting vector index"
        );
        let n = live.len();
        self.rebuild(live, n)
    }

    /// Replaces the graph with a new one holding exactly `items` (no tombstones), built with
    /// the current parameters; `capacity` is a hint of how many vectors will be inserted in all
    /// (more can follow with [`VectorIndex::insert_batch`]). Used for compaction and for
    /// recovery from sled.
    pub fn rebuild(&mut self, items: Vec<(ImageId, Vec<f32>)>, capacity: usize) -> Result<()> {
        let mut fresh = VectorIndex {
            dir: self.dir.clone(),
            dim: self.dim,
            params: self.params,
            graph: Graph::new(&self.params, capacity.max(items.len())),
            ids: Vec::with_capacity(capacity.max(items.len())),
            tombstones: HashSet::new(),
            generation: None,
            flat: FlatGraph::empty(self.dim),
            pending: Rows::new(self.dim),
            pending_ids: Vec::new(),
            hnsw_rs_search: false,
        };
        fresh.insert_batch(&items)?;
        self.graph = fresh.graph;
        self.ids = fresh.ids;
        self.tombstones.clear();
        self.flat = fresh.flat;
        self.pending = fresh.pending;
        self.pending_ids = fresh.pending_ids;
        if !self.pending_ids.is_empty() {
            self.sync_flat();
        }
        Ok(())
    }

    /// Calls `f` with every point in the graph as (data id, unit vector), tombstones included.
    fn for_each_point(&self, mut f: impl FnMut(u64, &[f32])) {
        let indexation = self.graph.hnsw.get_point_indexation();
        // `IterPoint` unwraps the entry point: never iterate an empty graph.
        if indexation.get_nb_point() == 0 {
            return;
        }
        for p in IterPoint::new(indexation) {
            f(p.get_origin_id() as u64, p.get_v());
        }
    }

    /// The `k` nearest live vectors to `query` by cosine similarity, best first, as
    /// `(id, cosine)`.
    ///
    /// `ef` overrides [`HnswParams::ef_search`] (at least `k` is used). `filter` restricts the
    /// results to ids for which it returns true; whenever at least `k` live ids pass it, `k`
    /// results come back (see the module docs).
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: Option<usize>,
        filter: Option<&dyn Fn(ImageId) -> bool>,
    ) -> Result<Vec<(ImageId, f32)>> {
        self.search_with(query, k, ef, filter, Strategy::Auto)
    }

    /// The exact top-`k` by brute force over every live point passing `filter`: what
    /// [`VectorIndex::search`] converges to as `ef` grows, and what it answers itself when the
    /// scan is the cheaper of the two (see [`VectorIndex::scans_exactly`]).
    pub fn search_exact(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&dyn Fn(ImageId) -> bool>,
    ) -> Result<Vec<(ImageId, f32)>> {
        self.search_with(query, k, None, filter, Strategy::Exact)
    }

    /// Whether an unfiltered [`VectorIndex::search`] for `k` at `ef` (default
    /// [`HnswParams::ef_search`]) is answered by an exact scan rather than a graph walk: when the
    /// live points number at most [`HnswParams::exact_threshold`] or `128 · ef` (past that
    /// `ef`, walking the graph costs more than scanning every point).
    pub fn scans_exactly(&self, k: usize, ef: Option<usize>) -> bool {
        let ef = ef.unwrap_or(self.params.ef_search).max(k);
        self.len() <= self.exact_limit(ef)
    }

    /// Candidate counts up to which a search at `ef` scans exactly. Not when searching with
    /// `hnsw_rs` (that mode exists to measure `hnsw_rs`'s own walk), beyond the fixed threshold.
    fn exact_limit(&self, ef: usize) -> usize {
        if self.hnsw_rs_search {
            self.params.exact_threshold
        } else {
            self.params
                .exact_threshold
                .max(ef.saturating_mul(SCAN_ROWS_PER_EF))
        }
    }

    fn search_with(
        &self,
        query: &[f32],
        k: usize,
        ef: Option<usize>,
        filter: Option<&dyn Fn(ImageId) -> bool>,
        strategy: Strategy,
    ) -> Result<Vec<(ImageId, f32)>> {
        let q = self.normalized(query)?;
        let live = self.len();
        if k == 0 || live == 0 {
            return Ok(Vec::new());
        }
        let ef = ef.unwrap_or(self.params.ef_search).max(k);
        let tombstones = &self.tombstones;
        let allowed = |id: u64| !tombstones.contains(&id) && filter.is_none_or(|f| f(ImageId(id)));
        let strategy = match strategy {
            Strategy::Auto => self.choose_strategy(k, ef, filter.is_some(), &allowed),
            other => other,
        };
        if !self.hnsw_rs_search {
            return Ok(self.search_flat(&q, k, ef, filter, strategy, &allowed));
        }
        let neighbours: Vec<Neighbour> = match strategy {
            Strategy::Exact => return Ok(self.exact(&q, k, &allowed)),
            Strategy::Plain | Strategy::Auto => self.graph.hnsw.search(&q, k, ef),
            Strategy::PostFilter(share) => {
                // Over-fetch so that about `k * slack` of the candidates pass.
                let want = ((k as f64 * POST_FILTER_SLACK / share.max(1e-9)).ceil() as usize)
                    .clamp(ef, POST_FILTER_MAX_EF * ef);
                self.graph.hnsw.search(&q, want, want)
            }
            Strategy::GraphFilter => {
                let hnsw_filter = |id: &usize| allowed(*id as u64);
                // Ask for all `ef` candidates: hnsw_rs filters its top min(k, ef) *after*
                // cutting, so asking for `k` can return fewer than `k` allowed hits.
                self.graph
                    .hnsw
                    .search_filter(&q, ef, ef, Some(&hnsw_filter))
            }
        };
        let mut hits: Vec<(ImageId, f32)> = neighbours
            .iter()
            .filter(|n| allowed(n.d_id as u64))
            .take(k)
            .map(|n| (ImageId(n.d_id as u64), cosine_from_l2(n.distance)))
            .collect();
        if hits.len() < k.min(live) {
            // The graph walk came up short (selective filter, tombstones clustered near the
            // query, tiny graph): the exact answer is never short.
            let exact = self.exact(&q, k, &allowed);
            if exact.len() > hits.len() {
                hits = exact;
            }
        }
        Ok(hits)
    }

    /// What [`Strategy::Auto`] does for a search for `k` at `ef` over the live ids passing
    /// `allowed` (`filtered`: whether a filter takes part in `allowed`), from their estimated
    /// number (see the module docs).
    fn choose_strategy(
        &self,
        k: usize,
        ef: usize,
        filtered: bool,
        allowed: &dyn Fn(u64) -> bool,
    ) -> Strategy {
        let passing = if filtered {
            self.estimate_allowed(allowed)
        } else {
            self.len()
        };
        let share = passing as f64 / self.ids.len() as f64;
        if passing <= self.exact_limit(ef) {
            Strategy::Exact
        } else if !filtered && self.tombstones.is_empty() {
            Strategy::Plain
        } else if (k as f64 * POST_FILTER_SLACK / share) <= (POST_FILTER_MAX_EF * ef) as f64 {
            Strategy::PostFilter(share)
        } else {
            Strategy::GraphFilter
        }
    }

    /// [`VectorIndex::search_with`] on the flat copy, for a unit query and a chosen strategy.
    fn search_flat(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&dyn Fn(ImageId) -> bool>,
        strategy: Strategy,
        allowed: &dyn Fn(u64) -> bool,
    ) -> Vec<(ImageId, f32)> {
        let flat = &self.flat;
        let q = flat.query(q);
        let found = match strategy {
            Strategy::Exact => return self.exact_flat(&q, k, filter, allowed),
            Strategy::Plain | Strategy::Auto => flat.search(&q, ef, None),
            Strategy::PostFilter(share) => {
                // Over-fetch so that about `k * slack` of the candidates pass.
                let want = ((k as f64 * POST_FILTER_SLACK / share.max(1e-9)).ceil() as usize)
                    .clamp(ef, POST_FILTER_MAX_EF * ef);
                flat.search(&q, want, None)
            }
            Strategy::GraphFilter => {
                let inside =
                    |d: u32| !flat.is_dead(d) && filter.is_none_or(|f| f(ImageId(flat.id(d))));
                flat.search(&q, ef, Some(&inside))
            }
        };
        let mut top = TopK::new(k);
        for (id, score) in found
            .into_iter()
            .map(|(d, score)| (flat.id(d), score))
            .filter(|(id, _)| allowed(*id))
            .take(k)
        {
            top.offer(score, id);
        }
        // Points inserted since the copy was made: exactly.
        self.pending
            .scan(&q, &|i| allowed(self.pending_ids[i]), &mut top, |i| {
                self.pending_ids[i]
            });
        let mut hits: Vec<(ImageId, f32)> = top
            .into_sorted()
            .into_iter()
            .map(|(id, s)| (ImageId(id), s))
            .collect();
        if hits.len() < k.min(self.len()) {
            // The graph walk came up short (selective filter, tombstones clustered near the
            // query, tiny graph): the exact answer is never short.
            let exact = self.exact_flat(&q, k, filter, allowed);
            if exact.len() > hits.len() {
                hits = exact;
            }
        }
        hits
    }

    /// Exact top-`k` over the allowed points, by brute force over the flat copy and the points
    /// inserted since.
    fn exact_flat(
        &self,
        q: &Rows,
        k: usize,
        filter: Option<&dyn Fn(ImageId) -> bool>,
        allowed: &dyn Fn(u64) -> bool,
    ) -> Vec<(ImageId, f32)> {
        let flat = &self.flat;
        let mut top = TopK::new(k);
        flat.scan(
            q,
            &|d| !flat.is_dead(d) && filter.is_none_or(|f| f(ImageId(flat.id(d)))),
            &mut top,
        );
        self.pending
            .scan(q, &|i| allowed(self.pending_ids[i]), &mut top, |i| {
                self.pending_ids[i]
            });
        top.into_sorted()
            .into_iter()
            .map(|(id, s)| (ImageId(id), s))
            .collect()
    }

    /// Estimated number of live ids passing `allowed`, from a stride sample of up to 1024 ids.
    fn estimate_allowed(&self, allowed: &dyn Fn(u64) -> bool) -> usize {
        let n = self.ids.len();
        let step = n.div_ceil(1024).max(1);
        let (mut sampled, mut passed) = (0usize, 0usize);
        for &id in self.ids.iter().step_by(step) {
            sampled += 1;
            if allowed(id) {
                passed += 1;
            }
        }
        if sampled == 0 {
            return 0;
        }
        (passed as f64 / sampled as f64 * n as f64).ceil() as usize
    }

    /// Exact top-`k` over the allowed points of the graph, by brute force.
    fn exact(&self, q: &[f32], k: usize, allowed: &dyn Fn(u64) -> bool) -> Vec<(ImageId, f32)> {
        let dist = Dist::default();
        let mut top = TopK::new(k);
        self.for_each_point(|id, v| {
            if allowed(id) {
                top.offer(cosine_from_l2(dist.eval(q, v)), id);
            }
        });
        top.into_sorted()
            .into_iter()
            .map(|(id, s)| (ImageId(id), s))
            .collect()
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

/// Sorted, de-duplicated data ids of a graph.
fn graph_ids(hnsw: &Hnsw<'static, f32, Dist>) -> Vec<u64> {
    let indexation = hnsw.get_point_indexation();
    if indexation.get_nb_point() == 0 {
        return Vec::new();
    }
    let mut ids: Vec<u64> = IterPoint::new(indexation)
        .map(|p| p.get_origin_id() as u64)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Checks that `v` can be stored in a collection of `dim`-dimensional vectors (its length,
/// finite components, not zero) and returns its norm.
pub(crate) fn check_vector(v: &[f32], dim: usize) -> Result<f64> {
    if v.len() != dim {
        return Err(IndexError::DimensionMismatch {
            expected: dim,
            got: v.len(),
        });
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(IndexError::InvalidVector(
            "NaN or infinite component".into(),
        ));
    }
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm < 1e-12 {
        return Err(IndexError::InvalidVector("zero vector".into()));
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::testutil::Rng;
    use std::time::Instant;

    const DIM: usize = 256;

    fn data(n: usize, seed: u64) -> Vec<(ImageId, Vec<f32>)> {
        let mut rng = Rng::new(seed);
        (0..n as u64)
            .map(|i| (ImageId(i), rng.unit_vector(DIM)))
            .collect()
    }

    /// Exact top-k ids among `items` passing `allow`.
    fn brute_force(
        items: &[(ImageId, Vec<f32>)],
        q: &[f32],
        k: usize,
        allow: &dyn Fn(ImageId) -> bool,
    ) -> Vec<ImageId> {
        let mut scored: Vec<(f32, ImageId)> = items
            .iter()
            .filter(|(id, _)| allow(*id))
            .map(|(id, v)| (DistL2.eval(q, v), *id))
            .collect();
        scored.sort_by(|a, b| a.0.total_cmp(&b.0));
        scored.into_iter().take(k).map(|(_, id)| id).collect()
    }

    /// Exact top-k per query among `items` passing `allow`.
    fn truths(
        items: &[(ImageId, Vec<f32>)],
        queries: &[Vec<f32>],
        k: usize,
        allow: &dyn Fn(ImageId) -> bool,
    ) -> Vec<Vec<ImageId>> {
        queries
            .iter()
            .map(|q| brute_force(items, q, k, allow))
            .collect()
    }

    /// Mean recall@k of `index` against the exact answers `truth` (one per query).
    fn recall(
        index: &VectorIndex,
        queries: &[Vec<f32>],
        truth: &[Vec<ImageId>],
        ef: Option<usize>,
        filter: Option<&dyn Fn(ImageId) -> bool>,
        strategy: Strategy,
    ) -> f64 {
        let mut found = 0usize;
        let mut total = 0usize;
        for (q, truth) in queries.iter().zip(truth) {
            let got = index
                .search_with(q, truth.len(), ef, filter, strategy)
                .unwrap();
            assert_eq!(got.len(), truth.len(), "short result");
            for (id, _) in &got {
                assert!(filter.is_none_or(|f| f(*id)), "{id} violates the filter");
                assert!(index.is_live(*id), "{id} is tombstoned");
            }
            found += got.iter().filter(|(id, _)| truth.contains(id)).count();
            total += truth.len();
        }
        found as f64 / total as f64
    }

    /// Recall@10 of the default parameters against brute force on `n` random 256-d unit vectors
    /// (seeded), with 200 random queries: plain, with a 5% allow-list (each strategy), and with
    /// 30% of the ids tombstoned. All must reach 0.98. The in-walk filter visits far more of the
    /// graph than the other paths, so it is measured on the first 25 queries only.
    fn check_recall(n: usize) {
        let items = data(n, 42);
        let mut rng = Rng::new(7);
        let queries: Vec<Vec<f32>> = (0..200).map(|_| rng.unit_vector(DIM)).collect();
        let dir = tempfile::tempdir().unwrap();
        let mut index = VectorIndex::open(dir.path(), DIM, HnswParams::default()).unwrap();

        let t = Instant::now();
        index.insert_batch(&items).unwrap();
        let build = t.elapsed();
        index.save(1).unwrap();
        let per_point = index.bytes_on_disk().unwrap() as f64 / n as f64;
        let mut failures = Vec::new();
        let mut report =
            format!("n={n}: build {build:.1?}, dump {per_point:.0} B/vector; recall@10");
        let mut run = |name: &str,
                       index: &VectorIndex,
                       nq: usize,
                       truth: &[Vec<ImageId>],
                       filter: Option<&dyn Fn(ImageId) -> bool>,
                       strategy: Strategy| {
            let t = Instant::now();
            let r = recall(index, &queries[..nq], &truth[..nq], None, filter, strategy);
            let per_query = t.elapsed() / nq as u32;
            report += &format!("; {name} {r:.4} ({per_query:.2?}/query)");
            if r < 0.98 {
                failures.push(format!("{name}: recall {r}"));
            }
        };
        // Each graph strategy is forced so that the graph itself is measured. `Auto` at the
        // default `ef` scans exactly at this size (at most `SCAN_ROWS_PER_EF · ef` candidates):
        // its rows check that choice and the exact answer.
        let auto_picks = |index: &VectorIndex, filter: Option<&dyn Fn(ImageId) -> bool>| {
            let ef = index.params.ef_search;
            let allowed = |id: u64| {
                !index.tombstones.contains(&id) && filter.is_none_or(|f| f(ImageId(id)))
            };
            index.choose_strategy(10, ef, filter.is_some(), &allowed)
        };
        let all = truths(&items, &queries, 10, &|_| true);
        run("plain graph", &index, 200, &all, None, Strategy::Plain);
        assert_eq!(auto_picks(&index, None), Strategy::Exact);
        run("plain auto (exact scan)", &index, 200, &all, None, Strategy::Auto);

        let allow_set: HashSet<ImageId> = items
            .iter()
            .map(|(id, _)| *id)
            .filter(|_| rng.uniform() < 0.05)
            .collect();
        let allow_fn = |id: ImageId| allow_set.contains(&id);
        let five = truths(&items, &queries, 10, &allow_fn);
        let allow: Option<&dyn Fn(ImageId) -> bool> = Some(&allow_fn);
        // n/20 allowed, below exact_threshold: auto scans exactly.
        assert_eq!(auto_picks(&index, allow), Strategy::Exact);
        run("5% auto (exact scan)", &index, 200, &five, allow, Strategy::Auto);
        let post = Strategy::PostFilter(0.05);
        run("5% post-filter", &index, 200, &five, allow, post);
        let graph = Strategy::GraphFilter;
        run("5% in-walk filter", &index, 25, &five, allow, graph);

        let mut removed = HashSet::new();
        for (id, _) in &items {
            if rng.uniform() < 0.3 {
                assert!(index.remove(*id));
                removed.insert(*id);
            }
        }
        assert!(index.needs_compaction());
        let live = truths(&items, &queries, 10, &|id| !removed.contains(&id));
        let share = index.len() as f64 / n as f64;
        let post = Strategy::PostFilter(share);
        run("30% tombstoned post-filter", &index, 200, &live, None, post);
        assert_eq!(auto_picks(&index, None), Strategy::Exact);
        run(
            "30% tombstoned auto (exact scan)",
            &index,
            200,
            &live,
            None,
            Strategy::Auto,
        );
        run(
            "30% tombstoned in-walk filter",
            &index,
            25,
            &live,
            None,
            graph,
        );
        eprintln!("{report}");
        assert!(failures.is_empty(), "{failures:?}");
    }

    /// The acceptance bar for the defaults: recall@10 >= 0.98 on 20k seeded random unit vectors,
    /// plain, with 30% tombstoned and with a 5% filter. About two minutes in a debug build on 2
    /// cores (the graph code is generic, so it is compiled in this crate at opt-level 0), so it
    /// runs only when asked for (`--ignored`); CI runs it as a step of its own.
    #[test]
    #[ignore = "slow: builds a 20k-vector graph (about two minutes in a debug build)"]
    fn recall_at_10_on_20k_random_vectors() {
        check_recall(20_000);
    }

    /// Parameter sweep used to pick the defaults: graph walks (forced; `Auto` would scan exactly
    /// from `ef` 157 up at this size). Run with `--ignored --nocapture`.
    #[test]
    #[ignore = "slow: a manual parameter sweep, many 20k-vector graphs"]
    fn sweep_parameters() {
        let n = 20_000;
        let items = data(n, 42);
        let mut rng = Rng::new(7);
        let queries: Vec<Vec<f32>> = (0..200).map(|_| rng.unit_vector(DIM)).collect();
        let truth = truths(&items, &queries, 10, &|_| true);
        for (m, efc) in [(16, 200), (24, 200), (32, 100), (32, 200)] {
            let dir = tempfile::tempdir().unwrap();
            let params = HnswParams {
                m,
                ef_construction: efc,
                ..HnswParams::default()
            };
            let mut index = VectorIndex::open(dir.path(), DIM, params).unwrap();
            let t = Instant::now();
            index.insert_batch(&items).unwrap();
            let build = t.elapsed();
            for ef in [64, 128, 200, 300, 400, 600, 800] {
                let t = Instant::now();
                let r = recall(&index, &queries, &truth, Some(ef), None, Strategy::Plain);
                eprintln!(
                    "m={m} ef_c={efc} build {build:.2?} ef={ef} recall@10 {r:.4} ({:.2?}/200q)",
                    t.elapsed()
                );
            }
        }
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use crate::index::testutil::Rng;

    const DIM: usize = 16;

    fn small(n: usize) -> Vec<(ImageId, Vec<f32>)> {
        let mut rng = Rng::new(3);
        (0..n as u64)
            .map(|i| (ImageId(i * 3 + 1), rng.unit_vector(DIM)))
            .collect()
    }

    fn open(dir: &Path) -> VectorIndex {
        VectorIndex::open(dir, DIM, HnswParams::default()).unwrap()
    }

    #[test]
    fn large_ef_is_answered_by_the_exact_scan() {
        let dir = tempfile::tempdir().unwrap();
        let params = HnswParams {
            exact_threshold: 0,
            ..HnswParams::default()
        };
        let mut index = VectorIndex::open(dir.path(), DIM, params).unwrap();
        let items = small(300);
        index.insert_batch(&items).unwrap();
        // 300 live points: 128 * 2 = 256 < 300 walks the graph, 128 * 3 = 384 scans.
        assert!(!index.scans_exactly(1, Some(2)));
        assert!(index.scans_exactly(1, Some(3)));
        assert!(index.scans_exactly(3, Some(1)), "ef is at least k");
        let q = &items[7].1;
        let mut brute: Vec<(ImageId, f32)> = items
            .iter()
            .map(|(id, v)| (*id, v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>()))
            .collect();
        brute.sort_by(|a, b| b.1.total_cmp(&a.1));
        let exact = index.search_exact(q, 10, None).unwrap();
        let ids = |hits: &[(ImageId, f32)]| hits.iter().map(|h| h.0).collect::<Vec<_>>();
        assert_eq!(ids(&exact), ids(&brute[..10]));
        for ((_, a), (_, b)) in exact.iter().zip(&brute) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // A search at an ef past the ratio returns the exact answer.
        assert_eq!(
            ids(&index.search(q, 10, Some(3), None).unwrap()),
            ids(&exact)
        );
    }

    #[test]
    fn params_are_validated_instead_of_exiting() {
        for m in [0, 1, 256, 300, 100_000] {
            let p = HnswParams {
                m,
                ..HnswParams::default()
            };
            assert!(
                matches!(p.validate(), Err(IndexError::InvalidParams(_))),
                "m={m}"
            );
        }
        let p = HnswParams {
            compact_fraction: 0.0,
            ..HnswParams::default()
        };
        assert!(p.validate().is_err());
        let dir = tempfile::tempdir().unwrap();
        assert!(VectorIndex::open(dir.path(), 0, HnswParams::default()).is_err());
        HnswParams::default().validate().unwrap();
    }

    #[test]
    fn bad_vectors_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = open(dir.path());
        assert!(matches!(
            index.insert(ImageId(1), &[1.0; 3]),
            Err(IndexError::DimensionMismatch {
                expected: 16,
                got: 3
            })
        ));
        let mut v = vec![0.5; DIM];
        v[3] = f32::NAN;
        assert!(matches!(
            index.insert(ImageId(1), &v),
            Err(IndexError::InvalidVector(_))
        ));
        assert!(matches!(
            index.insert(ImageId(1), &[0.0; DIM]),
            Err(IndexError::InvalidVector(_))
        ));
        assert!(index.search(&[f32::INFINITY; DIM], 3, None, None).is_err());
        index.insert(ImageId(1), &[1.0; DIM]).unwrap();
        assert!(matches!(
            index.insert(ImageId(1), &[2.0; DIM]),
            Err(IndexError::DuplicateId(ImageId(1)))
        ));
        index.remove(ImageId(1));
        assert!(matches!(
            index.insert(ImageId(1), &[2.0; DIM]),
            Err(IndexError::DuplicateId(ImageId(1)))
        ));
    }

    #[test]
    fn self_match_scores_cosine_one_and_unnormalised_input_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = open(dir.path());
        let items = small(50);
        index.insert_batch(&items).unwrap();
        for (id, v) in items.iter().take(10) {
            // Scaled copies of stored vectors: same direction, cosine 1.
            let q: Vec<f32> = v.iter().map(|x| x * 7.5).collect();
            let hits = index.search(&q, 1, None, None).unwrap();
            assert_eq!(hits[0].0, *id);
            assert!((hits[0].1 - 1.0).abs() < 1e-5, "{}", hits[0].1);
        }
        // Scores are cosines, best first.
        let hits = index.search(&items[0].1, 50, None, None).unwrap();
        assert_eq!(hits.len(), 50);
        for w in hits.windows(2) {
            assert!(w[0].1 >= w[1].1);
        }
        let dot: f32 = items[0].1.iter().zip(&items[9].1).map(|(a, b)| a * b).sum();
        let got = hits.iter().find(|(id, _)| *id == items[9].0).unwrap().1;
        assert!((got - dot).abs() < 1e-5, "{got} vs {dot}");
    }

    #[test]
    fn empty_small_and_over_asked_searches() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = open(dir.path());
        let q = vec![1.0; DIM];
        assert!(index.search(&q, 10, None, None).unwrap().is_empty());
        index.save(1).unwrap(); // empty graph: manifest only
        let items = small(5);
        index.insert_batch(&items).unwrap();
        assert_eq!(index.search(&q, 0, None, None).unwrap(), vec![]);
        assert_eq!(index.search(&q, 100, None, None).unwrap().len(), 5);
        index.remove(items[0].0);
        let hits = index.search(&q, 100, None, None).unwrap();
        assert_eq!(hits.len(), 4);
        assert!(hits.iter().all(|(id, _)| *id != items[0].0));
        // A filter nothing passes; a filter passing exactly two ids (graph path forced).
        let none = |_: ImageId| false;
        assert!(index.search(&q, 3, None, Some(&none)).unwrap().is_empty());
        index.params.exact_threshold = 0;
        let two = |id: ImageId| id == items[1].0 || id == items[4].0;
        let hits = index.search(&q, 3, None, Some(&two)).unwrap();
        let mut got: Vec<ImageId> = hits.iter().map(|h| h.0).collect();
        got.sort();
        assert_eq!(got, vec![items[1].0, items[4].0]);
    }

    #[test]
    fn save_reopen_gives_the_same_answers() {
        let dir = tempfile::tempdir().unwrap();
        let items = small(300);
        let q = Rng::new(9).unit_vector(DIM);
        let before = {
            let mut index = open(dir.path());
            assert_eq!(index.generation(), None);
            index.insert_batch(&items).unwrap();
            index.remove(items[7].0);
            index.save(3).unwrap();
            index.search(&q, 20, None, None).unwrap()
        };
        let mut index = open(dir.path());
        assert_eq!(index.generation(), Some(3));
        assert_eq!(index.len(), 299);
        assert_eq!(index.tombstones(), 1);
        assert!(!index.is_live(items[7].0) && index.contains(items[7].0));
        assert_eq!(index.search(&q, 20, None, None).unwrap(), before);

        // A loaded graph accepts inserts and saves again (hnsw_rs will not overwrite a loaded
        // dump in place; the old files are replaced by the new generation's).
        index.insert(ImageId(10_000), &q).unwrap();
        index.save(4).unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"g4.hnsw.graph".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n.starts_with("g3")), "{names:?}");
        drop(index);
        let index = open(dir.path());
        assert_eq!(index.generation(), Some(4));
        assert_eq!(
            index.search(&q, 1, None, None).unwrap()[0].0,
            ImageId(10_000)
        );
    }

    #[test]
    fn damaged_dumps_open_empty_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut index = open(dir.path());
            index.insert_batch(&small(100)).unwrap();
            index.save(1).unwrap();
        }
        let data = dir.path().join("g1.hnsw.data");
        let graph = dir.path().join("g1.hnsw.graph");
        let manifest = dir.path().join(MANIFEST);
        let good_data = std::fs::read(&data).unwrap();
        let good_manifest = std::fs::read(&manifest).unwrap();

        // Truncated data file: hnsw_rs would `process::exit`; the checksum stops it first.
        std::fs::write(&data, &good_data[..good_data.len() / 2]).unwrap();
        let index = open(dir.path());
        assert_eq!((index.generation(), index.len()), (None, 0));
        drop(index);
        // Same length, flipped byte.
        let mut flipped = good_data.clone();
        flipped[40] ^= 1;
        std::fs::write(&data, &flipped).unwrap();
        assert_eq!(open(dir.path()).generation(), None);
        std::fs::write(&data, &good_data).unwrap();
        assert_eq!(open(dir.path()).generation(), Some(1));
        // Missing graph file, garbage manifest, missing manifest.
        let good_graph = std::fs::read(&graph).unwrap();
        std::fs::remove_file(&graph).unwrap();
        assert_eq!(open(dir.path()).generation(), None);
        std::fs::write(&graph, &good_graph).unwrap();
        std::fs::write(&manifest, b"{\"format\": 1").unwrap();
        assert_eq!(open(dir.path()).generation(), None);
        std::fs::remove_file(&manifest).unwrap();
        assert_eq!(open(dir.path()).generation(), None);
        std::fs::write(&manifest, &good_manifest).unwrap();
        assert_eq!(open(dir.path()).len(), 100);
        // Another dimension.
        assert_eq!(
            VectorIndex::open(dir.path(), DIM + 1, HnswParams::default())
                .unwrap()
                .generation(),
            None
        );
    }

    /// Exact top-`k` (id, cosine) among `items` passing `allow`, ties by id.
    fn exact_top(
        items: &[(ImageId, Vec<f32>)],
        q: &[f32],
        k: usize,
        allow: &dyn Fn(ImageId) -> bool,
    ) -> Vec<(ImageId, f32)> {
        let mut scored: Vec<(ImageId, f32)> = items
            .iter()
            .filter(|(id, _)| allow(*id))
            .map(|(id, v)| (*id, v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>()))
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored.truncate(k);
        scored
    }

    /// Same ids (as sets: near-equal scores may swap) and scores within `tol` (matched by id).
    fn assert_same_hits(got: &[(ImageId, f32)], want: &[(ImageId, f32)], tol: f32) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        let mut g: Vec<ImageId> = got.iter().map(|h| h.0).collect();
        let mut w: Vec<ImageId> = want.iter().map(|h| h.0).collect();
        g.sort();
        w.sort();
        if g != w {
            // Only a tie at the cut may differ.
            let last = want.last().map_or(0.0, |h| h.1);
            for (id, s) in got.iter().filter(|h| !w.contains(&h.0)) {
                assert!((s - last).abs() <= tol, "{id} ({s}) not in {want:?}");
            }
        }
        for (id, s) in got {
            if let Some((_, ws)) = want.iter().find(|h| h.0 == *id) {
                assert!((s - ws).abs() <= tol, "{id}: {s} vs {ws}");
            }
        }
        for w in got.windows(2) {
            assert!(w[0].1 >= w[1].1, "not best first: {got:?}");
        }
    }

    /// A flat copy is made (not left to the staleness rule) and used.
    fn synced(index: &mut VectorIndex) {
        index.sync_flat();
        assert!(!index.hnsw_rs_search);
        assert!(index.pending_ids.is_empty());
        assert_eq!(index.flat.len(), index.ids.len());
    }

    #[test]
    fn flat_search_at_full_ef_is_exact_with_and_without_filters() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = open(dir.path());
        let items = small(600);
        index.insert_batch(&items).unwrap();
        synced(&mut index);
        let mut rng = Rng::new(21);
        let odd = |id: ImageId| id.0 % 2 == 1 && !id.0.is_multiple_of(7);
        for _ in 0..20 {
            let q = rng.unit_vector(DIM);
            let all = exact_top(&items, &q, 10, &|_| true);
            for strategy in [Strategy::Plain, Strategy::Exact] {
                let got = index
                    .search_with(&q, 10, Some(600), None, strategy)
                    .unwrap();
                assert_same_hits(&got, &all, 1e-5);
            }
            let want = exact_top(&items, &q, 10, &odd);
            for strategy in [
                Strategy::GraphFilter,
                Strategy::PostFilter(0.4),
                Strategy::Exact,
            ] {
                let got = index
                    .search_with(&q, 10, Some(600), Some(&odd), strategy)
                    .unwrap();
                assert_same_hits(&got, &want, 1e-5);
            }
        }
    }

    #[test]
    fn flat_search_agrees_with_hnsw_rs_search() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = open(dir.path());
        let items = small(3000);
        // One by one: with parallel inserts hnsw_rs's entry point is not always the first point
        // on the top level, and the two searches would start from different points.
        for (id, v) in &items {
            index.insert(*id, v).unwrap();
        }
        synced(&mut index);
        let mut rng = Rng::new(23);
        let (mut same, mut total) = (0usize, 0usize);
        for _ in 0..50 {
            let q = rng.unit_vector(DIM);
            let flat = index
                .search_with(&q, 10, Some(32), None, Strategy::Plain)
                .unwrap();
            index.hnsw_rs_search = true;
            let theirs = index
                .search_with(&q, 10, Some(32), None, Strategy::Plain)
                .unwrap();
            index.hnsw_rs_search = false;
            assert_eq!(flat.len(), 10);
            for (id, s) in &flat {
                total += 1;
                if let Some((_, t)) = theirs.iter().find(|h| h.0 == *id) {
                    same += 1;
                    // Theirs is 1 - d²/2 from an L2 distance; ours a dot product.
                    assert!((s - t).abs() < 1e-5, "{id}: {s} vs {t}");
                }
            }
        }
        // The walks differ only in the upper-layer descent (ours repeats the greedy step until
        // no neighbour is closer, hnsw_rs takes one step per layer).
        assert!(same as f64 / total as f64 >= 0.97, "{same}/{total}");
    }

    #[test]
    fn flat_search_follows_removes_inserts_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let mut items = small(1500);
        let later = items.split_off(1200);
        let mut index = open(dir.path());
        index.insert_batch(&items).unwrap();
        synced(&mut index);
        // Tombstones in the copy, and points inserted after it (scanned exactly).
        let removed: HashSet<ImageId> = items.iter().step_by(3).map(|(id, _)| *id).collect();
        for id in &removed {
            assert!(index.remove(*id));
        }
        for (id, v) in &later[..100] {
            index.insert(*id, v).unwrap();
        }
        index.insert_batch(&later[100..]).unwrap();
        assert_eq!(index.pending_ids.len(), 300, "below the staleness limit");
        let everything: Vec<(ImageId, Vec<f32>)> = items.iter().chain(&later).cloned().collect();
        let live = |id: ImageId| !removed.contains(&id);
        let even = |id: ImageId| id.0.is_multiple_of(2);
        let mut rng = Rng::new(29);
        let queries: Vec<Vec<f32>> = (0..10).map(|_| rng.unit_vector(DIM)).collect();
        let check = |index: &VectorIndex| {
            for q in &queries {
                let want = exact_top(&everything, q, 10, &live);
                for strategy in [
                    Strategy::PostFilter(0.7),
                    Strategy::GraphFilter,
                    Strategy::Exact,
                ] {
                    let got = index
                        .search_with(q, 10, Some(1500), None, strategy)
                        .unwrap();
                    assert_same_hits(&got, &want, 1e-5);
                }
                let want = exact_top(&everything, q, 10, &|id| live(id) && even(id));
                for strategy in [Strategy::PostFilter(0.3), Strategy::GraphFilter] {
                    let got = index
                        .search_with(q, 10, Some(1500), Some(&even), strategy)
                        .unwrap();
                    assert_same_hits(&got, &want, 1e-5);
                }
            }
        };
        check(&index);
        let before: Vec<_> = queries
            .iter()
            .map(|q| index.search(q, 10, None, None).unwrap())
            .collect();
        index.save(1).unwrap();
        drop(index);
        let mut index = open(dir.path());
        // Reloaded: one flat copy of everything, tombstones marked.
        assert!(index.pending_ids.is_empty());
        assert_eq!(index.flat.len(), 1500);
        check(&index);
        for (q, b) in queries.iter().zip(&before) {
            assert_eq!(&index.search(q, 10, None, None).unwrap(), b);
        }
        // Compaction remakes the copy without the tombstones.
        index.compact().unwrap();
        assert_eq!(index.flat.len(), 1500 - removed.len());
        check(&index);
    }

    #[test]
    fn enough_inserts_remake_the_flat_copy() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = open(dir.path());
        let items = small(2100);
        index.insert_batch(&items[..1000]).unwrap();
        assert_eq!((index.flat.len(), index.pending_ids.len()), (0, 1000));
        index.insert_batch(&items[1000..1100]).unwrap();
        assert_eq!((index.flat.len(), index.pending_ids.len()), (1100, 0));
        for (id, v) in &items[1100..] {
            index.insert(*id, v).unwrap();
        }
        assert_eq!(index.flat.len() + index.pending_ids.len(), 2100);
        assert_eq!(index.pending_ids.len(), 1000);
    }

    #[test]
    fn compaction_drops_tombstones_and_keeps_answers() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = open(dir.path());
        let items = small(200);
        index.insert_batch(&items).unwrap();
        for (id, _) in items.iter().take(39) {
            index.remove(*id);
        }
        assert!(!index.needs_compaction()); // 39/200 < 20%
        index.remove(items[39].0);
        assert!(index.needs_compaction()); // 40/200
        let q = Rng::new(11).unit_vector(DIM);
        let before = index.search(&q, 10, Some(200), None).unwrap();
        index.compact().unwrap();
        assert_eq!((index.len(), index.tombstones()), (160, 0));
        assert!(!index.contains(items[0].0));
        assert_eq!(index.search(&q, 10, Some(200), None).unwrap(), before);
    }
}
