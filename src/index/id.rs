//! [`ImageId`], the identifier every store and index of a collection keys its images by, and its
//! byte form as a sled key.
//!
//! This module depends on nothing else in `index`: the layer's error type refers to ids, so ids
//! must not refer back to it. A malformed key is its own small error, [`BadIdKey`], which
//! [`super::IndexError`] converts from.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifier of an image in a collection: allocated from a monotonic sled counter, never reused.
///
/// The same number is the HNSW data id and the tantivy `id` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ImageId(pub u64);

impl ImageId {
    /// The sled key: big-endian so that key order is id order.
    pub fn to_key(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// Parses a sled key written by [`ImageId::to_key`].
    pub fn from_key(key: &[u8]) -> Result<Self, BadIdKey> {
        let bytes: [u8; 8] = key.try_into().map_err(|_| BadIdKey { len: key.len() })?;
        Ok(ImageId(u64::from_be_bytes(bytes)))
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A sled key that is not the 8 bytes of an [`ImageId`]: the database is corrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("id key of {len} bytes")]
pub struct BadIdKey {
    /// The key's length.
    pub len: usize,
}
