//! The engine: what blipsearch does with models and a collection. Ingestion (walk, dedupe,
//! decode, batch, CapFilt, commit) lives in [`ingest`], retrieval (ANN + BM25, fusion, ITM
//! rerank) in [`search`]. The CLI and the server both call into
//! here; the engine depends on `model` and `index`, never the other way round.

pub mod duplicates;
pub mod error;
pub mod ingest;
pub mod search;

pub use error::{EngineError, Result};
pub use ingest::{IngestOptions, IngestSummary, Ingestor};
