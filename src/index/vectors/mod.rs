//! Approximate nearest-neighbour search over ITC vectors: an HNSW graph (`hnsw_rs`) keyed by
//! [`ImageId`], with tombstones for deletes, filtered search with an exact fallback, and a
//! checksummed on-disk dump.
//!
//! # Who does what
//! `hnsw_rs` builds the graph and saves and loads it. Searches do not use its search: they walk
//! a compact copy of the graph (`index/flat.rs`: one contiguous arena of vectors, CSR neighbour
//! lists, an epoch-stamped visited array, a SIMD dot product), about 5x faster per query on the
//! same graph (1M random vectors, ef 64: benches/README.md, "The vector index against
//! hnswlib"). The copy is a snapshot, kept current
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
//!   results, and the walk goes on until it holds `ef` of them. (`hnsw_rs`'s `search_filter`
//!   never stops its layer-0 walk early with a filter: 2.5x (30% tombstones) to 6x (5% filter)
//!   longer than post-filtering at the same recall.)
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
//!
//! # Persistence
//! [`VectorIndex::save`] dumps the graph with `hnsw_rs`'s `file_dump` to `g<generation>.hnsw.graph`
//! and `.hnsw.data`, fsyncs both, then atomically writes `manifest.json` with the generation, the
//! tombstones and the length and CRC32 of each dump file. [`VectorIndex::open`] loads the dump
//! only if the manifest parses and both files match it: `hnsw_rs`'s loader panics or calls
//! `process::exit` on corrupt input, so it must only see files it wrote. Anything else (missing,
//! corrupt, other dimension) opens an empty index with no generation, and the collection rebuilds
//! it from sled.
//!
//! # Files
//! `params` holds [`HnswParams`]; `graph` owns the `hnsw_rs` graph; `search` picks a strategy
//! and runs it; `persist` dumps and loads. This file holds [`VectorIndex`] and its writes.

mod graph;
mod params;
mod persist;
mod search;

#[cfg(test)]
mod recall_tests;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use hnsw_rs::hnsw::IterPoint;

use super::error::{IndexError, Result};
use super::flat::{FlatGraph, Rows};
use super::id::ImageId;
use graph::Graph;
pub use params::HnswParams;

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
