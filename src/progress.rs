//! Progress of long work as events: the layer doing the work (engine, train, eval) reports,
//! the caller renders. The CLI draws a bar on a terminal and prints a line every few seconds
//! without one; the server keeps [`Counters`] for `/api/status`. Nothing below the CLI draws.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// One thing that happened, in order: `Started`, then any of `Working`, `Done`, `Failed` and
/// `Note`, then `Finished`. A run may report several phases, each from `Started` to `Finished`.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A phase begins: `total` units of `what` (files, images, steps), `done` of them already.
    Started {
        /// The unit, plural ("files", "steps").
        what: &'a str,
        /// Units in the phase.
        total: u64,
        /// Units done before this run (a resumed run).
        done: u64,
    },
    /// What is being worked on now (a file name, the last loss).
    Working {
        /// Short text.
        item: &'a str,
    },
    /// `n` more units are done.
    Done {
        /// How many.
        n: u64,
    },
    /// One unit failed (it also counts as done once reported so).
    Failed {
        /// The unit (a file).
        item: &'a str,
        /// Why.
        reason: &'a str,
    },
    /// A line worth keeping in the output (a commit, an epoch's loss).
    Note {
        /// The line.
        line: &'a str,
    },
    /// The phase is over.
    Finished,
}

/// Receives events, and may ask the work to stop (it then ends cleanly, keeping what it has).
pub trait Progress: Send + Sync {
    /// One event.
    fn event(&self, event: Event<'_>);
    /// Whether the work should stop at the next safe point.
    fn stop_requested(&self) -> bool {
        false
    }
}

/// Ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn event(&self, _: Event<'_>) {}
}

/// Live counters of a run, readable from other threads, and the way to stop it.
#[derive(Debug, Default)]
pub struct Counters {
    /// Units in the phase.
    pub total: AtomicU64,
    /// Units done.
    pub done: AtomicU64,
    /// Units that failed.
    pub failed: AtomicU64,
    /// What is being worked on.
    pub current: Mutex<Option<String>>,
    cancel: AtomicBool,
}

impl Counters {
    /// Asks the run to stop.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn set_current(&self, item: Option<String>) {
        if let Ok(mut c) = self.current.lock() {
            *c = item;
        }
    }
}

impl Progress for Counters {
    fn event(&self, event: Event<'_>) {
        match event {
            Event::Started { total, done, .. } => {
                self.total.store(total, Ordering::SeqCst);
                self.done.store(done, Ordering::SeqCst);
                self.failed.store(0, Ordering::SeqCst);
            }
            Event::Working { item } => self.set_current(Some(item.to_string())),
            Event::Done { n } => {
                self.done.fetch_add(n, Ordering::SeqCst);
            }
            Event::Failed { .. } => {
                self.failed.fetch_add(1, Ordering::SeqCst);
            }
            Event::Note { .. } => {}
            Event::Finished => self.set_current(None),
        }
    }

    fn stop_requested(&self) -> bool {
        self.is_cancelled()
    }
}
