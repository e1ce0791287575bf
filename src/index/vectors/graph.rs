//! The `hnsw_rs` graph behind a [`super::VectorIndex`]: built with the L2 distance on unit
//! vectors (see the module docs of [`super`]), owned together with the loader a dumped graph
//! borrows from.

use std::mem::ManuallyDrop;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::ptr::NonNull;

use hnsw_rs::hnsw::{Hnsw, IterPoint};
use hnsw_rs::hnswio::HnswIo;
use hnsw_rs::prelude::DistL2;

use super::params::HnswParams;
use crate::index::error::{IndexError, Result};

/// The graph's distance (see the module docs).
pub(super) type Dist = DistL2;

/// Cosine similarity of two unit vectors from their L2 distance.
pub(super) fn cosine_from_l2(d: f32) -> f32 {
    1.0 - 0.5 * d * d
}

/// Layers of the graph (`hnsw_rs`'s maximum, 16).
const MAX_LAYERS: usize = 16;

/// Owns an `Hnsw` and, for a graph loaded from a dump, the `HnswIo` loader it borrows from.
///
/// `HnswIo::load_hnsw(&'a mut self) -> Hnsw<'b, ..>` with `'a: 'b`: the graph may hold slices of
/// the loader's memory map, so the loader must outlive it. We never enable the mmap, but the
/// types do not know that; this struct keeps the loader on the heap, behind a raw pointer that
/// nothing else uses, and drops the graph first.
pub(super) struct Graph {
    pub(super) hnsw: ManuallyDrop<Hnsw<'static, f32, Dist>>,
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
    pub(super) fn new(params: &HnswParams, capacity: usize) -> Self {
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
    pub(super) fn load(dir: &Path, basename: &str) -> Result<Self> {
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

/// Sorted, de-duplicated data ids of a graph.
pub(super) fn graph_ids(hnsw: &Hnsw<'static, f32, Dist>) -> Vec<u64> {
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
