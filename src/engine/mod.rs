//! The engine: what blipsearch does with models and a collection. Ingestion (walk, dedupe,
//! decode, batch, CapFilt, commit) lives in [`ingest`], images uploaded into the collection in
//! [`uploads`], retrieval (ANN + BM25, fusion, ITM rerank) in [`search`]. Both reach BLIP through the [`models::Encoders`] trait, which the CLI
//! implements in-process and the server with its inference queue. The CLI and the server both
//! call into here; the engine depends on `model` and `index`, never the other way round.

pub mod duplicates;
pub mod error;
pub mod ingest;
pub mod models;
pub mod search;
pub mod uploads;

pub use error::{EngineError, Result};
pub use ingest::{IngestOptions, IngestProgress, IngestSummary, Ingestor};
pub use models::{EncodedImages, EncodedText, Encoders, LocalModels};
pub use uploads::{NewUpload, Uploaded, Uploads};
