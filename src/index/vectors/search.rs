//! Searching a [`VectorIndex`]: choosing between the exact scan and the graph walks, and running
//! them on the flat copy (or on `hnsw_rs` itself, to compare). See "Deletes, filters and search
//! strategies" in the module docs of [`super`].

use hnsw_rs::hnsw::Neighbour;
use hnsw_rs::prelude::Distance;

use super::graph::{cosine_from_l2, Dist};
use super::VectorIndex;
use crate::index::error::Result;
use crate::index::flat::Rows;
use crate::index::id::ImageId;
use crate::index::topk::TopK;

/// How a search walks the index (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Strategy {
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
/// fast and never misses (break-even measured near `n / 130` at 1M points and `n / 80` at 100k
/// with `examples/hnsw_compare.rs`).
const SCAN_ROWS_PER_EF: usize = 128;

/// Candidates a post-filtered search fetches when a share `share` of the points passes: enough
/// that about `k * POST_FILTER_SLACK` of them pass, within `ef..=POST_FILTER_MAX_EF * ef`.
fn post_filter_fetch(k: usize, ef: usize, share: f64) -> usize {
    ((k as f64 * POST_FILTER_SLACK / share.max(1e-9)).ceil() as usize)
        .clamp(ef, POST_FILTER_MAX_EF * ef)
}

impl VectorIndex {
    /// The `k` nearest live vectors to `query` by cosine similarity, best first, as
    /// `(id, cosine)`.
    ///
    /// `ef` overrides [`HnswParams::ef_search`] (at least `k` is used). `filter` restricts the
    /// results to ids for which it returns true; whenever at least `k` live ids pass it, `k`
    /// results come back (see the module docs).
    ///
    /// [`HnswParams::ef_search`]: super::HnswParams::ef_search
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
    ///
    /// [`HnswParams::ef_search`]: super::HnswParams::ef_search
    /// [`HnswParams::exact_threshold`]: super::HnswParams::exact_threshold
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

    pub(super) fn search_with(
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
                let want = post_filter_fetch(k, ef, share);
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
    pub(super) fn choose_strategy(
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
                let want = post_filter_fetch(k, ef, share);
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
}
