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
//!
//! # Example
//!
//! Index a folder with models run in-process, as `blipsearch add` does, then search it:
//!
//! ```no_run
//! use std::path::PathBuf;
//!
//! use blipsearch::engine::models::{select_device, ModelSource};
//! use blipsearch::engine::search::SearchParams;
//! use blipsearch::engine::{Engine, Filter, IngestOptions, LocalModels, Silent};
//!
//! # fn main() -> blipsearch::engine::Result<()> {
//! let device = select_device("auto")?;
//! let models = LocalModels::load(
//!     &ModelSource::Hub("Salesforce/blip-itm-base-coco".into()),
//!     Some(&ModelSource::Hub("Salesforce/blip-image-captioning-base".into())),
//!     &device,
//! )?;
//! // Creates the collection for these models, or opens the one built with them.
//! let engine = Engine::open(std::path::Path::new("index"), &models.collection_info())?;
//! let summary = engine.ingest(
//!     &models,
//!     IngestOptions::default(),
//!     &[PathBuf::from("photos")],
//!     false, // `add`; `true` is `sync`, which also drops images whose files are gone
//!     &Silent,
//! )?;
//! println!("{} added, {} in the collection", summary.added, summary.total);
//!
//! let params = SearchParams {
//!     filter: Filter {
//!         date_from: Some("2023-06-01".into()),
//!         ..Filter::default()
//!     },
//!     ..SearchParams::default()
//! };
//! for hit in engine.search_text(&models, "a dog on the beach", &params)?.hits {
//!     println!("{:.3} {} (reranked: {})", hit.score, hit.path, hit.reranked);
//! }
//! # Ok(())
//! # }
//! ```

pub mod catalogue;
pub mod collection;
pub mod duplicates;
pub mod error;
pub mod facets;
pub mod import;
pub mod ingest;
mod matcher;
pub mod models;
pub mod moderation;
mod reindex;
pub mod search;
mod upload_folder;
pub mod uploads;

pub use crate::progress::{Counters, Event, Progress, Silent};
pub use catalogue::{Catalogue, CatalogueProduct, Malformed};
pub use collection::{CollectionStats, Engine, Location, StoreLocation, Target};
pub use error::{EngineError, ErrorKind, Result};
pub use import::ImportSummary;
pub use ingest::{IngestOptions, IngestSummary};
pub use models::{CapFiltJob, EncodedImages, EncodedText, Encoders, LocalModels};
pub use moderation::{
    EntriesAdded, Match, MatchParams, PdqBackfill, ReferenceDecode, ReferenceImage, ReviewItem,
    ReviewPage, Skipped,
};
pub use uploads::{NewUpload, ProductUploaded, Uploaded};

pub use crate::index::{
    check_list_name, AttrFilter, AttrTest, AttrType, AttrValue, AuditEntry, Caption, CaptionSource,
    CollectionInfo, Decision, FeatureMatrix, Filter, Flag, FlagFilter, ImageId, ImageRecord,
    ListEntry, ListInfo, MatchRule, MatchRules, Pdq, PdqHash, Product, Schema, Verdict,
    DEFAULT_DIR, DEFAULT_MIN_COSINE, DEFAULT_PDQ_DISTANCE,
};
