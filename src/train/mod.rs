//! Training BLIP with candle's autograd: the retrieval model with ITC + ITM and the captioner
//! with LM, as in the original BLIP code (Li et al. 2022, <https://arxiv.org/abs/2201.12086>;
//! `salesforce/BLIP` `models/blip_retrieval.py`, `models/blip.py`, `models/med.py`).
//!
//! - [`params`]: the trainable parameters (a candle `VarMap` under HF tensor names), loaded from a
//!   checkpoint or initialised from a config, and written back as an HF checkpoint;
//! - [`nets`]: the networks (retrieval, its momentum encoders, captioner) over a `VarBuilder`;
//! - [`objectives`]: the three losses over the parameters, with the momentum encoders and
//!   feature queues of ITC;
//! - [`optim`]: AdamW (decoupled weight decay, as `torch.optim.AdamW`) and the warm-up + cosine
//!   learning-rate schedule;
//! - [`dataset_file`]: the reader of caption dataset files (JSON lines, BLIP annotations,
//!   Karpathy split files), shared with evaluation;
//! - [`data`]: training pairs with their images preprocessed;
//! - [`trainer`]: the loop (batches, progress, checkpoints, resume).

pub mod data;
pub mod dataset_file;
pub mod nets;
pub mod objectives;
pub mod optim;
pub mod params;
pub mod trainer;

use std::path::PathBuf;

use crate::model::ModelError;

/// Everything that can go wrong while training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A dataset file is malformed.
    #[error("{path}:{line}: {reason}")]
    Data {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line number (0 when the whole file is one JSON document).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint or training state cannot be used.
    #[error("{path}: {reason}")]
    Checkpoint {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Invalid options or inputs.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// From the model layer (config, tokenizer, images).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<dataset_file::DatasetFileError> for TrainError {
    fn from(e: dataset_file::DatasetFileError) -> Self {
        TrainError::Data {
            path: e.path,
            line: e.line.unwrap_or(0),
            reason: e.message,
        }
    }
}

/// Result alias of the training layer.
pub type Result<T> = std::result::Result<T, TrainError>;

pub use objectives::{CaptionBatch, Negatives, RetrievalBatch, RetrievalLosses, RetrievalState};
pub use optim::{AdamW, AdamWParams, LrSchedule};
pub use params::ParamStore;
pub use trainer::{Objective, TrainConfig, Trainer};
