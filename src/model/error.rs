//! Errors of the model layer.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a BLIP model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An image file could not be decoded or is unusable.
    #[error("cannot use image {path}: {reason}")]
    Image {
        /// The file (or `<memory>` for in-memory input).
        path: PathBuf,
        /// Why the image was refused.
        reason: String,
    },
    /// `config.json` is missing, malformed or describes something we cannot run.
    #[error("bad model config {path}: {reason}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint's architecture is not one blipsearch runs.
    #[error("unsupported architecture {found:?} in {path}: expected {expected}")]
    UnsupportedArchitecture {
        /// The config file.
        path: PathBuf,
        /// What the config names.
        found: String,
        /// What we accept.
        expected: String,
    },
    /// Model files are missing from a local directory or could not be downloaded.
    #[error("model files missing for {model}: {missing}. {hint}")]
    MissingFiles {
        /// A model id or directory.
        model: String,
        /// The files that could not be found.
        missing: String,
        /// How to fix it.
        hint: String,
    },
    /// The checkpoint lacks a tensor the architecture needs.
    #[error("checkpoint {path} is missing tensor `{tensor}`")]
    MissingTensor {
        /// The weights file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
    },
    /// The checkpoint has a tensor of the wrong shape.
    #[error("checkpoint {path}: tensor `{tensor}` has shape {found}, expected {expected}")]
    TensorShape {
        /// The weights file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Its shape in the file.
        found: String,
        /// The shape the config implies.
        expected: String,
    },
    /// The tokenizer files are missing or broken.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Invalid input from the caller (empty text, bad option...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An image has more pixels than the decode limit allows (refused from its header).
    #[error(
        "cannot use image {path}: {width}x{height} is {:.1} megapixels, over the limit of {:.1}",
        *width as f64 * *height as f64 / 1e6,
        *max_pixels as f64 / 1e6
    )]
    TooManyPixels {
        /// The image.
        path: PathBuf,
        /// Its width.
        width: u32,
        /// Its height.
        height: u32,
        /// The limit.
        max_pixels: u64,
    },
    /// One image needs more memory to decode than the whole decode budget.
    #[error(
        "cannot use image {path}: decoding it needs {needed_mib} MiB, over the decode memory \
         budget of {capacity_mib} MiB"
    )]
    OverBudget {
        /// The image.
        path: PathBuf,
        /// What decoding it needs, in MiB (rounded up).
        needed_mib: u64,
        /// The whole budget, in MiB.
        capacity_mib: u64,
    },
    /// The decode budget is taken by other images for longer than the caller would wait.
    #[error("busy: {0}")]
    Busy(String),
    /// The requested device is not available.
    #[error("device: {0}")]
    Device(String),
    /// A tensor operation failed (a bug or an out-of-memory condition).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias of the model layer.
pub type Result<T> = std::result::Result<T, ModelError>;
