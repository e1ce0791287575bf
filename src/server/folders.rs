//! Keeps the watched folders in the collection: a background thread runs the engine's `sync`
//! (new and changed files indexed, deleted ones removed) at start and then every interval,
//! sending its forward passes through the inference queue behind interactive requests.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::infer::InferClient;
use super::state::{IngestState, IngestStatus};
use crate::engine::{Engine, IngestOptions};

/// Starts the folder sync thread. It stops (committing what it has) when `status.progress` is
/// cancelled.
pub fn spawn(
    folders: Vec<PathBuf>,
    interval: Duration,
    engine: Arc<Engine>,
    models: InferClient,
    options: IngestOptions,
    status: Arc<IngestStatus>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("folder-sync".into())
        .spawn(move || {
            let progress = status.progress.clone();
            while !progress.is_cancelled() {
                set(&status.state, IngestState::Indexing);
                let started = Instant::now();
                let result = engine.ingest(&models, options.clone(), &folders, true, &*progress);
                set(&status.last_run_unix, Some(unix_now()));
                match result {
                    Ok(summary) => {
                        if summary.added + summary.updated + summary.removed > 0
                            || !summary.failed.is_empty()
                        {
                            tracing::info!(
                                added = summary.added,
                                updated = summary.updated,
                                removed = summary.removed,
                                failed = summary.failed.len(),
                                total = summary.total,
                                secs = started.elapsed().as_secs_f64(),
                                "folders synced"
                            );
                        }
                        for f in &summary.failed {
                            tracing::warn!(path = %f.path, reason = %f.reason, "skipped");
                        }
                        set(&status.last_error, None);
                        set(&status.last_summary, Some(summary));
                        set(&status.state, IngestState::Idle);
                    }
                    Err(e) => {
                        tracing::error!(%e, "folder sync failed");
                        set(&status.last_error, Some(e.to_string()));
                        set(&status.state, IngestState::Error);
                    }
                }
                // Wait for the next scan, waking often enough to stop promptly.
                let until = Instant::now() + interval;
                while Instant::now() < until && !progress.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            set(&status.state, IngestState::Idle);
        })
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn set<T>(m: &std::sync::Mutex<T>, v: T) {
    if let Ok(mut g) = m.lock() {
        *g = v;
    }
}
