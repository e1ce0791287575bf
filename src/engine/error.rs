//! Errors of the engine layer.

use std::path::PathBuf;

use crate::index::IndexError;
use crate::model::ModelError;

/// What can go wrong while ingesting or searching.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A model failed to load or run.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The collection failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Bad options or arguments.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The inference queue is full: try again shortly.
    #[error("busy: {0}")]
    Busy(String),
    /// The models did not answer in time.
    #[error("timed out: {0}")]
    TimedOut(String),
    /// A bug or a broken invariant (a poisoned lock, a worker gone).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result alias of the engine layer.
pub type Result<T> = std::result::Result<T, EngineError>;
