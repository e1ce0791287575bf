//! Errors of the engine layer, and the kind of each for callers that answer people (an exit
//! status, an HTTP status).

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
    /// No such image.
    #[error("{0}")]
    NotFound(String),
    /// The request does not fit the state of what it names (a decision on an image with nothing
    /// waiting for review).
    #[error("{0}")]
    Conflict(String),
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

/// What kind of failure an [`EngineError`] is, for the caller's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request or its arguments are wrong (a bad query, filter or parameter).
    InvalidInput,
    /// The image asked for does not exist.
    NotFound,
    /// What the request would create exists already (a match list of that name).
    Conflict,
    /// An image is too big to decode (pixels, or more than the whole decode budget).
    TooLarge,
    /// An image does not decode.
    InvalidImage,
    /// Overloaded: try again shortly.
    Busy,
    /// The models did not answer in time.
    TimedOut,
    /// Another process has the collection open.
    Locked,
    /// The store cannot be reached now (a shared store's server is down): try again later.
    Unavailable,
    /// Anything else: a fault of ours or of the machine.
    Internal,
}

impl EngineError {
    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidInput(_)
            | Self::Model(ModelError::InvalidInput(_))
            | Self::Index(
                IndexError::InvalidQuery(_)
                | IndexError::InvalidFilter(_)
                | IndexError::InvalidList(_),
            ) => ErrorKind::InvalidInput,
            Self::NotFound(_) | Self::Index(IndexError::NotFound(_) | IndexError::NoList(_)) => {
                ErrorKind::NotFound
            }
            Self::Conflict(_) | Self::Index(IndexError::ListExists(_)) => ErrorKind::Conflict,
            Self::Model(ModelError::TooManyPixels { .. } | ModelError::OverBudget { .. }) => {
                ErrorKind::TooLarge
            }
            Self::Model(ModelError::Image { .. }) => ErrorKind::InvalidImage,
            Self::Busy(_) | Self::Model(ModelError::Busy(_)) => ErrorKind::Busy,
            Self::TimedOut(_) => ErrorKind::TimedOut,
            Self::Index(IndexError::Locked { .. }) => ErrorKind::Locked,
            Self::Index(IndexError::Unavailable(_)) => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }

    /// The message for the person who asked: the reason alone for image failures (the path is
    /// the caller's own), the error otherwise.
    pub fn user_message(&self) -> String {
        match self {
            Self::InvalidInput(m)
            | Self::NotFound(m)
            | Self::Conflict(m)
            | Self::Busy(m)
            | Self::TimedOut(m) => m.clone(),
            Self::Model(ModelError::InvalidInput(m) | ModelError::Busy(m)) => m.clone(),
            Self::Index(
                IndexError::InvalidQuery(m)
                | IndexError::InvalidFilter(m)
                | IndexError::InvalidList(m),
            ) => m.clone(),
            Self::Index(IndexError::NotFound(id)) => format!("no image with id {id}"),
            Self::Model(e) => e.image_reason().unwrap_or_else(|| e.to_string()),
            other => other.to_string(),
        }
    }
}

/// Result alias of the engine layer.
pub type Result<T> = std::result::Result<T, EngineError>;

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(ModelError::from(e))
    }
}
