//! Errors of the evaluation layer (synthetic world, datasets, metrics, eval runs).

use std::path::PathBuf;

use crate::model::ModelError;
use crate::train::dataset_file::DatasetFileError;

/// What can go wrong while generating, reading or evaluating a dataset.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A model failed to load or run.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A file or folder could not be read or written (fs-err: the message names the path).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// An image could not be encoded or written.
    #[error("cannot write image {path}: {source}")]
    ImageWrite {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: image::ImageError,
    },
    /// A dataset file is malformed.
    #[error(transparent)]
    Dataset(#[from] DatasetFileError),
    /// Bad options or arguments.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

/// Result alias of the evaluation layer.
pub type Result<T> = std::result::Result<T, EvalError>;

/// Refuses a batch size of zero.
pub(crate) fn check_batch_size(batch_size: usize) -> Result<()> {
    if batch_size == 0 {
        return Err(EvalError::InvalidInput(
            "batch size must be at least 1".into(),
        ));
    }
    Ok(())
}
