//! Evaluation: a synthetic captioned world to train and test tiny models on, caption metrics
//! (BLEU-4, CIDEr-D), evaluation datasets (JSON lines, BLIP/Karpathy annotation files), retrieval and
//! caption evaluation as in the BLIP paper, and dataset bootstrapping with CapFilt.
//! Depends on `model`, and on `train` for the dataset file reader ([`crate::train::dataset_file`]);
//! nothing below depends on it.

pub mod bootstrap;
pub mod dataset;
pub mod error;
pub mod evaluate;
pub mod metrics;
pub mod synth;

pub use error::{EvalError, Result};
