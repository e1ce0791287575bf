//! [`HnswParams`]: how the graph is built and searched, and the ranges `hnsw_rs` accepts.

use serde::{Deserialize, Serialize};

use crate::index::error::{IndexError, Result};

/// `hnsw_rs`'s hard limit: it calls `process::exit` above 256, and stores the value as a `u8`
/// (256 wraps to 0), so 255 is the real maximum.
const MAX_M: usize = 255;

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
    /// Share of tombstones in the graph above which [`super::VectorIndex::needs_compaction`] says yes.
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
