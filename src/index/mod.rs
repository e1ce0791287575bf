//! Collection storage: everything blipsearch keeps about a collection of images. This layer
//! takes vectors, texts and ids; it never runs a model.
//!
//! - [`Store`] is what the engine programs against: records with their ITC vector, texts and
//!   filterable fields, vector and BM25 search with a [`Filter`], lookups, commit. [`Collection`]
//!   (`collection.rs`) is the embedded implementation, in one directory (default
//!   [`DEFAULT_DIR`], `./index`), locked by one process at a time (`lock.rs`):
//!
//!   | part | module | directory | role |
//!   |---|---|---|---|
//!   | metadata | [`meta`] (sled) | `meta/` | **source of truth**: [`record`]s, ids, paths, hashes, captions, ITC vectors |
//!   | vectors | [`vectors`] (hnsw_rs) | `vectors/` | ANN over ITC vectors; derived |
//!   | text | [`text`] (tantivy) | `text/` | BM25 over captions, given texts, product titles and descriptions, file names; derived |
//!   | columns | [`filter`] | memory | filterable fields and product attributes, rebuilt at open; derived |
//!
//! - [`BlobStore`] ([`blobs`]) holds what is too big for records, by image id: rerank features
//!   (`features/`) and thumbnails (`thumbs/`). The engine writes blobs before a record and
//!   removes them after it.
//!
//! `index/README.md` documents the layout and recovery for operators.

mod attr_columns;
pub mod attributes;
pub mod audit;
pub mod blobs;
mod collection;
pub mod error;
pub mod features;
pub mod filter;
mod flat;
mod fsutil;
pub mod id;
mod lock;
pub mod meta;
pub mod milvus;
pub mod moderation;
pub mod pdq;
pub mod record;
mod simd;
pub mod store;
pub mod text;
pub mod thumbs;
mod topk;
pub mod vectors;

#[cfg(test)]
pub(crate) mod testutil;

pub use attributes::{merge_schema, AttrFilter, AttrTest, AttrType, AttrValue, Product, Schema};
pub use audit::{AuditEntry, AuditEvent, AuditLog, AUDIT_FILE};
pub use blobs::BlobStore;
pub use collection::{Collection, Recovery};
pub use error::{IndexError, Result};
pub use features::{FeatureMatrix, FeatureStore};
pub use filter::{day_number, Columns, Filter, IdSet};
#[doc(hidden)]
pub use flat::ExactScan;
pub use id::{BadIdKey, ImageId};
pub use meta::MetaStore;
pub use milvus::{MilvusAddress, MilvusStore};
pub use moderation::{
    check_entry, check_list_name, entry_id, Decision, Flag, FlagFilter, ListEntry, ListInfo,
    MatchRule, Verdict, MAX_ENTRY_HASHES,
};
pub use pdq::{Pdq, PdqHash, PdqIndex, DEFAULT_PDQ_DISTANCE, MIN_PDQ_QUALITY};
pub use record::{
    content_hash, now_unix, Caption, CaptionSource, CollectionInfo, CommitState, ImageRecord,
};
pub use simd::dot;
pub use store::{Store, StoreStats};
pub use text::{filename_words, TextBoosts, TextIndex};
pub use thumbs::{ThumbnailStore, THUMB_MAX_SIDE};
pub use vectors::{HnswParams, VectorIndex};

/// The default collection directory, relative to the working directory.
pub const DEFAULT_DIR: &str = "index";
