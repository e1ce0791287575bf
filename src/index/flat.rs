//! A compact, read-only copy of an `hnsw_rs` graph, searched by our own code.
//!
//! `hnsw_rs` keeps every point in its own reference-counted allocation, with its neighbour lists
//! behind a lock, and calls a distance dispatched at run time: each hop of a search is several
//! cache misses and atomic reference-count updates. [`FlatGraph`] copies the graph, through
//! `hnsw_rs`'s public API, into
//! - one contiguous arena of the unit vectors, each row padded to a multiple of 16 floats and
//!   aligned to 64 bytes (the padding is zeros, so dot products are unchanged);
//! - one CSR neighbour table per layer (`u32` internal ids);
//!
//! and searches it with a reusable visited array stamped with a search epoch (no hashing, no
//! clearing), prefetches of the next vectors, and the SIMD dot product of [`super::simd`]. The
//! score is the dot product of unit vectors, i.e. the cosine.
//!
//! Arrays of 4 MiB and more (the vectors and layer-0 links from a few thousand points; the
//! visited marks, 2 bytes a point, from 2M) are advised for transparent huge pages: a search
//! touches random rows of them, and with 4 KiB pages each jump is a TLB miss as well.
//!
//! Internal ids order the points by level, then by their slot in `hnsw_rs`'s per-level table:
//! `dense = offset[level] + slot`. The points present in layer `l` (level ≥ `l`) are then the
//! suffix `dense ≥ offset[l]`, so each upper layer's table is indexed by `dense − offset[l]`.
//!
//! The copy is a snapshot: [`super::VectorIndex`] rebuilds it after bulk changes and keeps the
//! points inserted since in a small exactly-scanned side list (see its module docs).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;

use hnsw_rs::hnsw::{Hnsw, IterPoint};
use hnsw_rs::prelude::Distance;

use super::simd::{self, DotFn, LANES};
use super::topk::{Scored, TopK};

#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Block([f32; LANES]);

/// Hints the CPU to fetch `lines` cache lines from `p`.
#[inline(always)]
fn prefetch(p: *const f32, lines: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for l in 0..lines {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(l * LANES) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, lines);
}

/// Arrays smaller than this are left to the allocator as they come.
const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// Asks the kernel to back the `len` elements at `ptr` with transparent huge pages (2 MiB)
/// where it can. A search jumps between random rows and link lists of arrays of hundreds of
/// MiB (1 GiB of vectors at 1M points); with 4 KiB pages nearly every jump is a TLB miss as well
/// as a cache miss. Advice only: the kernel may ignore it (THP off, or `never`), and pages
/// already touched are only merged later, by `khugepaged`, so call it before writing.
fn advise_huge_pages<T>(ptr: *const T, len: usize) {
    let bytes = len * std::mem::size_of::<T>();
    if bytes < HUGE_PAGE_MIN_BYTES {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const PAGE: usize = 4096;
        let start = (ptr as usize).next_multiple_of(PAGE);
        let end = (ptr as usize + bytes) & !(PAGE - 1);
        if end > start {
            // SAFETY: `[start, end)` lies inside one live allocation of ours; MADV_HUGEPAGE
            // changes how it is backed, never its contents. A failure (e.g. EINVAL where THP
            // is compiled out) leaves the pages as they were, which is correct, only slower.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
}

/// `v` moved into a fresh allocation advised for huge pages (see [`advise_huge_pages`]), if it
/// is large enough to matter; for arrays whose final size is known only once they are built.
fn on_huge_pages<T: Copy>(v: Vec<T>) -> Vec<T> {
    if v.len() * std::mem::size_of::<T>() < HUGE_PAGE_MIN_BYTES {
        return v;
    }
    let mut fresh = Vec::with_capacity(v.len());
    advise_huge_pages(fresh.as_ptr(), v.len());
    fresh.extend_from_slice(&v);
    fresh
}

/// Vectors of one dimension, each padded to whole [`Block`]s, in one allocation.
pub(super) struct Rows {
    dim: usize,
    per_row: usize,
    blocks: Vec<Block>,
    dot: DotFn,
}

impl Rows {
    pub(super) fn new(dim: usize) -> Self {
        Rows {
            dim,
            per_row: dim.div_ceil(LANES),
            blocks: Vec::new(),
            dot: simd::kernel(),
        }
    }

    fn with_capacity(dim: usize, rows: usize) -> Self {
        let mut r = Rows::new(dim);
        r.blocks.reserve_exact(rows * r.per_row);
        // Before the rows are written, so that the first touch already maps huge pages.
        advise_huge_pages(r.blocks.as_ptr(), r.blocks.capacity());
        r
    }

    /// Appends `v` (`dim` floats).
    pub(super) fn push(&mut self, v: &[f32]) {
        debug_assert_eq!(v.len(), self.dim);
        let start = self.blocks.len();
        self.blocks
            .resize(start + self.per_row, Block([0.0; LANES]));
        for (b, chunk) in self.blocks[start..].iter_mut().zip(v.chunks(LANES)) {
            b.0[..chunk.len()].copy_from_slice(chunk);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.blocks.len() / self.per_row.max(1)
    }

    fn ptr(&self, i: usize) -> *const f32 {
        debug_assert!(i < self.len());
        self.blocks[i * self.per_row..].as_ptr() as *const f32
    }

    /// Row `i` without its padding.
    #[cfg(test)]
    fn row(&self, i: usize) -> &[f32] {
        let blocks = &self.blocks[i * self.per_row..(i + 1) * self.per_row];
        // SAFETY: `Block` is `repr(C)` over `[f32; 16]` with no padding (64 bytes, align 64), so
        // `per_row` blocks are `per_row * 16 ≥ dim` initialised floats.
        unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const f32, self.dim) }
    }

    /// Dot product of row `i` with `q` (a one-row [`Rows`] of the same dimension).
    #[inline(always)]
    fn dot_with(&self, q: &Rows, i: usize) -> f32 {
        debug_assert_eq!(q.per_row, self.per_row);
        // SAFETY: both rows hold `per_row * 16` floats; the kernel suits this CPU (`simd::kernel`).
        unsafe { (self.dot)(q.ptr(0), self.ptr(i), self.per_row * LANES) }
    }

    /// Scores every row `i` with `allowed(i)` against `q` and keeps the best `k` in `top`.
    pub(super) fn scan(
        &self,
        q: &Rows,
        allowed: &dyn Fn(usize) -> bool,
        top: &mut TopK,
        tag: impl Fn(usize) -> u64,
    ) {
        for i in 0..self.len() {
            if allowed(i) {
                top.offer(self.dot_with(q, i), tag(i));
            }
        }
    }
}

/// An exact top-`k` scan over bare vectors, without a graph: the code [`super::VectorIndex`]'s
/// exact strategy runs (padded, aligned rows, the SIMD dot product, [`TopK`]), so that a
/// benchmark can measure it at sizes whose graph would take hours to build
/// (`examples/hnsw_compare.rs --scan-only`). Not part of the supported API.
#[doc(hidden)]
pub struct ExactScan {
    rows: Rows,
}

impl ExactScan {
    /// `vectors`: row-major, `dim` floats per row, already unit length (scores are dot products).
    pub fn new(dim: usize, vectors: &[f32]) -> Self {
        assert!(
            dim > 0 && vectors.len().is_multiple_of(dim),
            "rows of {dim} floats"
        );
        let mut rows = Rows::with_capacity(dim, vectors.len() / dim);
        vectors.chunks_exact(dim).for_each(|v| rows.push(v));
        ExactScan { rows }
    }

    /// The `k` rows with the largest dot product with `query` (`dim` floats), best first, as
    /// `(row, score)`; ties go to the smaller row.
    pub fn top_k(&self, query: &[f32], k: usize) -> Vec<(u64, f32)> {
        let mut q = Rows::with_capacity(self.rows.dim, 1);
        q.push(query);
        let mut top = TopK::new(k);
        self.rows.scan(&q, &|_| true, &mut top, |i| i as u64);
        top.into_sorted()
    }
}

/// One layer's neighbour lists, for the internal ids `first..`.
struct Layer {
    first: u32,
    offsets: Vec<u32>,
    links: Vec<u32>,
}

impl Layer {
    #[inline(always)]
    fn links(&self, dense: u32) -> &[u32] {
        let i = (dense - self.first) as usize;
        &self.links[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
}

/// Per-search working memory, pooled and reused.
struct Scratch {
    /// `visited[d] == epoch` iff `d` was seen in the current search.
    visited: Vec<u16>,
    epoch: u16,
    candidates: BinaryHeap<Scored<u32>>,
    results: BinaryHeap<Reverse<Scored<u32>>>,
    fresh: Vec<u32>,
}

impl Scratch {
    fn new(n: usize) -> Self {
        let visited = vec![0; n];
        advise_huge_pages(visited.as_ptr(), visited.len());
        Scratch {
            visited,
            epoch: 0,
            candidates: BinaryHeap::new(),
            results: BinaryHeap::new(),
            fresh: Vec::new(),
        }
    }

    /// Starts a search: a new epoch marks everything unvisited.
    fn next_epoch(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.visited.fill(0);
            self.epoch = 1;
        }
        self.candidates.clear();
        self.results.clear();
    }
}

/// The compact copy of a graph (see the module docs).
pub(super) struct FlatGraph {
    rows: Rows,
    /// Data id (the caller's id) of each internal id.
    ids: Vec<u64>,
    /// `(data id, internal id)`, sorted by data id.
    by_id: Vec<(u64, u32)>,
    /// Tombstones, by internal id.
    dead: Vec<bool>,
    /// `layers[l]` for `l` in `0..=top level`.
    layers: Vec<Layer>,
    entry: u32,
    scratch: Mutex<Vec<Scratch>>,
}

impl FlatGraph {
    /// An empty graph for vectors of `dim` dimensions.
    pub(super) fn empty(dim: usize) -> Self {
        FlatGraph {
            rows: Rows::new(dim),
            ids: Vec::new(),
            by_id: Vec::new(),
            dead: Vec::new(),
            layers: Vec::new(),
            entry: 0,
            scratch: Mutex::new(Vec::new()),
        }
    }

    /// Copies `hnsw` (whose vectors have `dim` dimensions); `is_dead` says which data ids are
    /// tombstones. `None` if the graph is not laid out as this module expects (then the caller
    /// must not use a flat copy).
    pub(super) fn from_hnsw<D: Distance<f32> + Send + Sync>(
        hnsw: &Hnsw<'_, f32, D>,
        dim: usize,
        is_dead: impl Fn(u64) -> bool,
    ) -> Option<Self> {
        let indexation = hnsw.get_point_indexation();
        let n = indexation.get_nb_point();
        if n == 0 {
            return Some(Self::empty(dim));
        }
        if n > u32::MAX as usize {
            return None;
        }
        let top = indexation.get_max_level_observed() as usize;
        let mut offset = Vec::with_capacity(top + 2);
        offset.push(0usize);
        for l in 0..=top {
            offset.push(offset[l] + indexation.get_layer_nb_point(l));
        }
        if offset[top + 1] != n || offset[top] == n {
            return None;
        }
        let mut rows = Rows::with_capacity(dim, n);
        let mut ids = Vec::with_capacity(n);
        let mut layers: Vec<Layer> = (0..=top)
            .map(|l| Layer {
                first: offset[l] as u32,
                offsets: {
                    let mut o = Vec::with_capacity(n - offset[l] + 1);
                    o.push(0);
                    o
                },
                links: Vec::new(),
            })
            .collect();
        for (dense, point) in IterPoint::new(indexation).enumerate() {
            let pid = point.get_point_id();
            let level = pid.0 as usize;
            if level > top || pid.1 < 0 || offset[level] + pid.1 as usize != dense {
                return None;
            }
            let v = point.get_v();
            if v.len() != dim {
                return None;
            }
            rows.push(v);
            ids.push(point.get_origin_id() as u64);
            let neighbourhood = point.get_neighborhood_id();
            for (l, layer) in layers.iter_mut().enumerate().take(level + 1) {
                for nb in neighbourhood.get(l).into_iter().flatten() {
                    let (nl, slot) = (nb.p_id.0 as usize, nb.p_id.1);
                    if nl > top || slot < 0 || slot as usize >= offset[nl + 1] - offset[nl] {
                        return None;
                    }
                    // A link to a point absent from this layer cannot be walked; hnsw_rs never
                    // makes one, but skip it rather than trust that.
                    if nl >= l {
                        layer.links.push((offset[nl] + slot as usize) as u32);
                    }
                }
                layer.offsets.push(layer.links.len() as u32);
            }
        }
        if ids.len() != n {
            return None;
        }
        for layer in &mut layers {
            layer.links = on_huge_pages(std::mem::take(&mut layer.links));
        }
        let mut by_id: Vec<(u64, u32)> = ids
            .iter()
            .enumerate()
            .map(|(d, &id)| (id, d as u32))
            .collect();
        by_id.sort_unstable();
        let dead = ids.iter().map(|&id| is_dead(id)).collect();
        Some(FlatGraph {
            rows,
            ids,
            by_id,
            dead,
            layers,
            // `hnsw_rs`'s entry point is the first point created on the top level.
            entry: offset[top] as u32,
            scratch: Mutex::new(Vec::new()),
        })
    }

    /// Points in the copy, tombstones included.
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Marks data id `id` as a tombstone, if it is in the copy.
    pub(super) fn mark_dead(&mut self, id: u64) {
        if let Ok(i) = self.by_id.binary_search_by_key(&id, |e| e.0) {
            self.dead[self.by_id[i].1 as usize] = true;
        }
    }

    /// Data id of internal id `d`.
    #[inline]
    pub(super) fn id(&self, d: u32) -> u64 {
        self.ids[d as usize]
    }

    /// Whether internal id `d` is a tombstone.
    #[inline]
    pub(super) fn is_dead(&self, d: u32) -> bool {
        self.dead[d as usize]
    }

    /// A query in the layout of the rows (padded, aligned).
    pub(super) fn query(&self, q: &[f32]) -> Rows {
        let mut r = Rows::with_capacity(self.rows.dim, 1);
        r.push(q);
        r
    }

    /// Exact top-`k` over the internal ids passing `allowed`, into `top` (tagged by data id).
    pub(super) fn scan(&self, q: &Rows, allowed: &dyn Fn(u32) -> bool, top: &mut TopK) {
        self.rows
            .scan(q, &|i| allowed(i as u32), top, |i| self.ids[i]);
    }

    /// Graph search: up to `ef` internal ids near `q`, best first, as `(internal id, cosine)`.
    ///
    /// Without `allowed` this is HNSW's search (greedy descent of the upper layers, then a
    /// best-first walk of layer 0 keeping the `ef` best). With `allowed`, every point still
    /// routes the walk but only allowed ones enter the results, and the walk does not stop
    /// before it holds `ef` of them (or runs out of graph).
    pub(super) fn search(
        &self,
        q: &Rows,
        ef: usize,
        allowed: Option<&dyn Fn(u32) -> bool>,
    ) -> Vec<(u32, f32)> {
        if self.ids.is_empty() || ef == 0 {
            return Vec::new();
        }
        let mut s = self
            .scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_else(|| Scratch::new(self.ids.len()));
        let out = self.walk(q, ef, allowed, &mut s);
        self.scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(s);
        out
    }

    fn walk(
        &self,
        q: &Rows,
        ef: usize,
        allowed: Option<&dyn Fn(u32) -> bool>,
        s: &mut Scratch,
    ) -> Vec<(u32, f32)> {
        let rows = &self.rows;
        let lines = rows.per_row;
        let score = |d: u32| rows.dot_with(q, d as usize);

        // Upper layers: greedy descent to the closest point found.
        let mut cur = self.entry;
        let mut cur_score = score(cur);
        for layer in self.layers[1..].iter().rev() {
            loop {
                let mut moved = false;
                for &nb in layer.links(cur) {
                    let sc = score(nb);
                    if sc > cur_score {
                        cur_score = sc;
                        cur = nb;
                        moved = true;
                    }
                }
                if !moved {
                    break;
                }
            }
        }

        // Layer 0: best-first walk.
        s.next_epoch();
        let epoch = s.epoch;
        let layer0 = &self.layers[0];
        s.visited[cur as usize] = epoch;
        let start = Scored {
            score: cur_score,
            id: cur,
        };
        s.candidates.push(start);
        if allowed.is_none_or(|f| f(cur)) {
            s.results.push(Reverse(start));
        }
        while let Some(c) = s.candidates.pop() {
            let bound = s.results.peek().map_or(f32::NEG_INFINITY, |r| r.0.score);
            if c.score < bound && (s.results.len() >= ef || allowed.is_none()) {
                break;
            }
            // Mark the unvisited neighbours first, prefetching their vectors, then score them.
            s.fresh.clear();
            for &nb in layer0.links(c.id) {
                let v = &mut s.visited[nb as usize];
                if *v != epoch {
                    *v = epoch;
                    s.fresh.push(nb);
                    prefetch(rows.ptr(nb as usize), 1);
                }
            }
            for j in 0..s.fresh.len() {
                if let Some(&next) = s.fresh.get(j + 1) {
                    prefetch(rows.ptr(next as usize), lines);
                }
                let nb = s.fresh[j];
                let sc = score(nb);
                let bound = s.results.peek().map_or(f32::NEG_INFINITY, |r| r.0.score);
                if s.results.len() < ef || sc > bound {
                    let e = Scored { score: sc, id: nb };
                    s.candidates.push(e);
                    if allowed.is_none_or(|f| f(nb)) {
                        s.results.push(Reverse(e));
                        if s.results.len() > ef {
                            s.results.pop();
                        }
                    }
                }
            }
        }
        let mut out: Vec<(u32, f32)> = s.results.drain().map(|r| (r.0.id, r.0.score)).collect();
        out.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::testutil::Rng;

    #[test]
    fn rows_keep_vectors_of_any_dimension_and_score_them_by_dot() {
        let mut rng = Rng::new(5);
        for dim in [1, 7, 16, 17, 64, 100, 256, 768] {
            let (a, b) = (rng.unit_vector(dim), rng.unit_vector(dim));
            let (mut ra, mut rb) = (Rows::new(dim), Rows::new(dim));
            ra.push(&a);
            rb.push(&b);
            assert_eq!(ra.row(0), &a[..]);
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let got = ra.dot_with(&rb, 0);
            assert!(
                (got as f64 - want).abs() < 1e-5,
                "dim {dim}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn huge_page_advice_keeps_contents() {
        // Large enough to take the advised paths (above HUGE_PAGE_MIN_BYTES).
        let links: Vec<u32> = (0..(3 << 20))
            .map(|i: u32| i.wrapping_mul(2_654_435_761))
            .collect();
        assert_eq!(on_huge_pages(links.clone()), links);
        let mut rng = Rng::new(9);
        let vectors: Vec<Vec<f32>> = (0..5000).map(|_| rng.unit_vector(256)).collect();
        let mut rows = Rows::with_capacity(256, vectors.len());
        assert!(rows.blocks.capacity() * 64 >= HUGE_PAGE_MIN_BYTES);
        vectors.iter().for_each(|v| rows.push(v));
        assert!(vectors
            .iter()
            .enumerate()
            .all(|(i, v)| rows.row(i) == &v[..]));
    }
}
