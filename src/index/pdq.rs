//! PDQ hashes as the store keeps them ([`PdqHash`], [`Pdq`]), their Hamming distance, and the
//! multi-index that finds every hash within a distance of a query without a linear scan.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of a PDQ hash in bytes (256 bits).
pub const PDQ_BYTES: usize = 32;

/// The distance at or below which two PDQ hashes are taken as the same picture, as industry
/// hash-sharing programmes use it.
pub const DEFAULT_PDQ_DISTANCE: u32 = 31;

/// Hashes of lower quality than this (of 100) come from flat or featureless images and match
/// unrelated pictures; the PDQ rule ignores them.
pub const MIN_PDQ_QUALITY: u8 = 50;

/// A 256-bit PDQ hash, written as 64 hex digits (the reference's byte order: the first two
/// digits are the hash's most significant byte).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PdqHash(pub [u8; PDQ_BYTES]);

impl PdqHash {
    /// Parses 64 hex digits (either case).
    pub fn from_hex(hex: &str) -> Option<Self> {
        let hex = hex.trim();
        if hex.len() != 2 * PDQ_BYTES || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; PDQ_BYTES];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }

    /// The 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The number of bits that differ.
    pub fn distance(&self, other: &PdqHash) -> u32 {
        self.0
            .iter()
            .zip(other.0.iter())
            .map(|(a, b)| (a ^ b).count_ones())
            .sum()
    }
}

impl fmt::Debug for PdqHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PdqHash({})", self.to_hex())
    }
}

impl fmt::Display for PdqHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for PdqHash {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for PdqHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PdqHash::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not 64 hex digits")))
    }
}

/// The PDQ hash of an image and its quality (0 to 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pdq {
    /// The hash.
    pub hash: PdqHash,
    /// The reference's quality metric: below [`MIN_PDQ_QUALITY`] the hash is unreliable.
    pub quality: u8,
}

/// Every hash within a Hamming distance of a query, found by multi-index hashing: the 256 bits
/// are cut into 16 chunks of 16 bits, each chunk indexes the hashes by its value, and a query
/// within distance `d` of a stored hash agrees with it to within `d / 16` bits on at least one
/// chunk (pigeonhole), so only the buckets of those chunk values are verified.
pub struct PdqIndex {
    hashes: Vec<PdqHash>,
}

impl PdqIndex {
    /// Indexes `hashes`; a hit names its position in this vector.
    pub fn new(hashes: Vec<PdqHash>) -> Self {
        let _ = &hashes;
        todo!("multi-index hashing")
    }

    /// Hashes indexed.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Every indexed hash within `max_distance` of `query`, as (position, distance), by
    /// position.
    pub fn within(&self, query: &PdqHash, max_distance: u32) -> Vec<(usize, u32)> {
        let _ = (query, max_distance);
        todo!("multi-index hashing")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_distance() {
        let a = PdqHash::from_hex(&"f0".repeat(32)).unwrap();
        let b = PdqHash::from_hex(&"F1".repeat(32)).unwrap();
        assert_eq!(a.to_hex(), "f0".repeat(32));
        assert_eq!(a.distance(&b), 32);
        assert_eq!(a.distance(&a), 0);
        assert!(PdqHash::from_hex("abc").is_none());
        assert!(PdqHash::from_hex(&"zz".repeat(32)).is_none());
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<PdqHash>(&json).unwrap(), a);
    }
}
