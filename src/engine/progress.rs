//! Progress of long work as events: the engine reports, its callers render. The CLI draws a bar
//! (or prints a line every few seconds without a terminal); the server keeps counters for
//! `/api/status` ([`IngestProgress`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// What an ingest run reports, in order: `Started`, then per file `Reading` and eventually
/// `Done` (maybe after `Failed`), `Committed` after each commit, `Finished` at the end.
#[derive(Debug, Clone, Copy)]
pub enum IngestEvent<'a> {
    /// The walk found `total` files to look at.
    Started {
        /// Files found.
        total: u64,
    },
    /// This file is being read.
    Reading {
        /// The file.
        path: &'a Path,
    },
    /// `files` more files are dealt with (indexed, skipped or failed).
    Done {
        /// How many.
        files: u64,
    },
    /// A file could not be ingested.
    Failed {
        /// The file.
        path: &'a str,
        /// Why.
        reason: &'a str,
    },
    /// Everything so far is durable and searchable.
    Committed {
        /// Images in the collection now.
        images: u64,
    },
    /// The run is over.
    Finished,
}

/// Receives the events of an ingest run, and may ask it to stop (it commits what it has and
/// returns).
pub trait IngestObserver: Send + Sync {
    /// One event.
    fn event(&self, event: IngestEvent<'_>);
    /// Whether the run should stop after the batch in flight.
    fn stop_requested(&self) -> bool {
        false
    }
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl IngestObserver for Silent {
    fn event(&self, _: IngestEvent<'_>) {}
}

/// Live counters of an ingest run, readable from other threads (the server's status), and the
/// way to stop it.
#[derive(Debug, Default)]
pub struct IngestProgress {
    /// Files found by the walk.
    pub total: AtomicU64,
    /// Files dealt with (indexed, skipped or failed).
    pub done: AtomicU64,
    /// Files that failed.
    pub failed: AtomicU64,
    /// The file being read.
    pub current: Mutex<Option<String>>,
    cancel: AtomicBool,
}

impl IngestProgress {
    /// Asks the run to stop after the batch in flight.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn set_current(&self, path: Option<String>) {
        if let Ok(mut c) = self.current.lock() {
            *c = path;
        }
    }
}

impl IngestObserver for IngestProgress {
    fn event(&self, event: IngestEvent<'_>) {
        match event {
            IngestEvent::Started { total } => {
                self.total.store(total, Ordering::SeqCst);
                self.done.store(0, Ordering::SeqCst);
                self.failed.store(0, Ordering::SeqCst);
            }
            IngestEvent::Reading { path } => self.set_current(Some(path.display().to_string())),
            IngestEvent::Done { files } => {
                self.done.fetch_add(files, Ordering::SeqCst);
            }
            IngestEvent::Failed { .. } => {
                self.failed.fetch_add(1, Ordering::SeqCst);
            }
            IngestEvent::Committed { .. } => {}
            IngestEvent::Finished => self.set_current(None),
        }
    }

    fn stop_requested(&self) -> bool {
        self.is_cancelled()
    }
}
