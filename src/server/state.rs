//! What every handler shares: the collection, the inference queue, the folder ingest's status,
//! settings and metrics.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::infer::{InferClient, InferenceQueue};
use super::metrics::Metrics;
use crate::engine::models::{CapFiltParams, DecodeBudget, DecodeLimits};
use crate::engine::{Counters, Engine, IngestSummary};

/// Settings the handlers need.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Required for writes (and reads when `protect_reads`), when set.
    pub api_key: Option<String>,
    /// Whether reads need the key too.
    pub protect_reads: bool,
    /// Largest accepted upload, in bytes.
    pub max_upload_bytes: usize,
    /// Longest time a request body may take to arrive (then 408).
    pub body_timeout: std::time::Duration,
    /// Largest accepted image, in pixels.
    pub limits: DecodeLimits,
    /// Memory for decoded images, shared by every request and the folder ingest.
    pub budget: Arc<DecodeBudget>,
    /// How long a request waits for room in `budget` before it is refused (429).
    pub decode_wait: std::time::Duration,
    /// CapFilt settings for uploads (and folder ingestion); `None`: no captions.
    pub capfilt: Option<CapFiltParams>,
    /// Watched folders.
    pub folders: Vec<PathBuf>,
    /// Model names, for `/api/status`.
    pub retrieval_model: String,
    /// The caption model's name, when captions are on.
    pub caption_model: Option<String>,
    /// The device the models run on.
    pub device: String,
}

/// The folder ingest's state, for `/api/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IngestState {
    /// Waiting for the next scan.
    Idle,
    /// Walking and indexing.
    Indexing,
    /// The last run failed (see `last_error`).
    Error,
}

/// Folder ingest status shared between the ingest thread and the handlers.
#[derive(Debug)]
pub struct IngestStatus {
    /// Live counters of the run (also the way to stop it).
    pub progress: Arc<Counters>,
    /// What the thread is doing.
    pub state: Mutex<IngestState>,
    /// The last run's failure, if it failed.
    pub last_error: Mutex<Option<String>>,
    /// When the last run ended.
    pub last_run_unix: Mutex<Option<i64>>,
    /// What the last run did.
    pub last_summary: Mutex<Option<IngestSummary>>,
}

impl Default for IngestStatus {
    fn default() -> Self {
        Self {
            progress: Arc::new(Counters::default()),
            state: Mutex::new(IngestState::Idle),
            last_error: Mutex::new(None),
            last_run_unix: Mutex::new(None),
            last_summary: Mutex::new(None),
        }
    }
}

/// Shared state of the app.
pub struct AppState {
    /// The collection and every operation on it.
    pub engine: Arc<Engine>,
    /// The inference queue.
    pub queue: InferenceQueue,
    /// Client of the queue for request handlers.
    pub client: InferClient,
    /// Folder ingest status.
    pub ingest: Arc<IngestStatus>,
    /// Settings.
    pub settings: ApiSettings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl AppState {
    /// Brings the gauges up to date before `/metrics` is rendered.
    pub fn refresh_gauges(&self) {
        if let Ok(n) = self.engine.len() {
            self.metrics.images.set(n as i64);
        }
        let p = &self.ingest.progress;
        self.metrics
            .ingest_done
            .set(p.done.load(Ordering::SeqCst) as i64);
        self.metrics
            .ingest_total
            .set(p.total.load(Ordering::SeqCst) as i64);
        self.metrics.queue_depth.set(self.queue.waiting() as i64);
    }
}
