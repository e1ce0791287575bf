//! Errors of the index (storage) layer.

use std::path::PathBuf;

use super::id::{BadIdKey, ImageId};

/// Everything that can go wrong while storing or querying a collection.
///
/// User-facing mistakes (a locked or incompatible collection, a duplicate path, a bad query vector)
/// have their own variants so that the layers above can map them to exit codes or HTTP statuses;
/// the storage engines' own failures are wrapped as they come.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// A file-system operation failed. Errors from `fs-err` name the path in their message.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The metadata database (sled) failed.
    #[error("metadata store: {0}")]
    Sled(#[from] sled::Error),
    /// The text index (tantivy) failed.
    #[error("text index: {0}")]
    Tantivy(#[from] tantivy::TantivyError),
    /// A stored record or manifest could not be (de)serialised.
    #[error("bad JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A thumbnail could not be encoded or decoded.
    #[error("image: {0}")]
    Image(#[from] image::ImageError),
    /// The HNSW graph could not be built, dumped or loaded.
    #[error("vector index: {0}")]
    Hnsw(String),
    /// Another process (or another handle in this process) has the collection open.
    #[error("collection {path} is locked by {holder}; close that process first")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// Who holds it, as written in the lock file (pid and host), or `unknown`.
        holder: String,
    },
    /// The collection was built with other models or shapes than the ones asked for now.
    #[error(
        "collection in {path} was built with {field} = {stored}, but {requested} was requested; \
         use the original model or rebuild the collection with `blipsearch reindex`"
    )]
    Incompatible {
        /// The collection directory.
        path: PathBuf,
        /// The `CollectionInfo` field that differs.
        field: &'static str,
        /// The stored value.
        stored: String,
        /// The requested value.
        requested: String,
    },
    /// Parameters (HNSW, collection info) are out of range.
    #[error("invalid parameter: {0}")]
    InvalidParams(String),
    /// A vector has the wrong length.
    #[error("vector has {got} dimensions, the collection expects {expected}")]
    DimensionMismatch {
        /// The collection's embedding dimension.
        expected: usize,
        /// The length of the vector given.
        got: usize,
    },
    /// A text query is past the parser's bounds (length, nesting, number of words).
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// A filter that cannot mean anything (a date that is not a calendar day).
    #[error("invalid filter: {0}")]
    InvalidFilter(String),
    /// A vector is all zeros or holds NaN or infinity.
    #[error("invalid vector: {0}")]
    InvalidVector(String),
    /// No image has this id.
    #[error("no image with id {0}")]
    NotFound(ImageId),
    /// A list name or list rules that cannot be used.
    #[error("{0}")]
    InvalidList(String),
    /// No match list has this name.
    #[error("no match list {0:?}")]
    NoList(String),
    /// A match list with this name exists already.
    #[error("a match list {0:?} exists already")]
    ListExists(String),
    /// An image with the same path or content hash is already stored.
    #[error("an image with {kind} {key:?} is already stored as id {existing}")]
    AlreadyExists {
        /// `path` or `content hash`.
        kind: &'static str,
        /// The path or hash.
        key: String,
        /// The id that has it.
        existing: ImageId,
    },
    /// An id is already present in the vector index (ids are never reused).
    #[error("id {0} is already in the vector index")]
    DuplicateId(ImageId),
    /// The store cannot be reached (a shared store's server is down or does not answer); the
    /// same request may succeed later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A shared store's server refused a request.
    #[error("Milvus: {0}")]
    Milvus(String),
    /// The directory holds no collection (nothing was ever added there).
    #[error("no collection in {0}; create one by adding images")]
    NoCollection(PathBuf),
    /// A stored file is truncated or corrupt.
    #[error("corrupt file {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<BadIdKey> for IndexError {
    fn from(e: BadIdKey) -> Self {
        IndexError::Corrupt {
            path: PathBuf::from("<sled>"),
            reason: e.to_string(),
        }
    }
}

/// Result of the index layer.
pub type Result<T, E = IndexError> = std::result::Result<T, E>;
