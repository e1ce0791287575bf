//! The engine: what blipsearch does with models and a collection. Ingestion (walk, dedupe,
//! decode, batch, CapFilt, commit) lives in [`ingest`]. The CLI and the server both call into
//! here; the engine depends on `model` and `index`, never the other way round.

pub mod error;
pub mod ingest;

pub use error::{EngineError, Result};
pub use ingest::{IngestOptions, IngestSummary, Ingestor};
