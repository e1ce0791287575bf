//! The engine: what blipsearch does with models and a collection, and the only layer that
//! orchestrates them. [`Engine`] is one open collection: ingest ([`ingest`]), uploads
//! ([`uploads`]), removal, reindex and search ([`search`]: ANN + BM25, fusion, ITM rerank) are
//! its operations, which the CLI and the server both call. Models are reached through the
//! [`models::Encoders`] trait (in-process for the CLI, the inference queue in the server); records
//! through the `index` layer's `Store` trait, blobs through its `BlobStore`. Long work reports
//! progress events (`crate::progress`); callers render them.
//!
//! The engine depends on `model` and `index`, never the other way round; the edges (CLI,
//! server) depend on the engine alone, which re-exports the vocabulary they need.

pub mod collection;
pub mod duplicates;
pub mod error;
pub mod ingest;
pub mod models;
pub mod search;
pub mod uploads;

pub use crate::progress::{Counters, Event, Progress, Silent};
pub use collection::{CollectionStats, Engine, Location, StoreLocation, Target};
pub use error::{EngineError, ErrorKind, Result};
pub use ingest::{IngestOptions, IngestSummary};
pub use models::{CapFiltJob, EncodedImages, EncodedText, Encoders, LocalModels};
pub use uploads::{NewUpload, Uploaded};

pub use crate::index::{
    Caption, CaptionSource, CollectionInfo, FeatureMatrix, Filter, ImageId, ImageRecord,
    DEFAULT_DIR,
};
