//! PDQ hashes as the store keeps them ([`PdqHash`], [`Pdq`]), their Hamming distance, and the
//! multi-index that finds every hash within a distance of a query without a linear scan.

use std::fmt;
use std::sync::OnceLock;

use rayon::prelude::*;

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

/// Chunks a hash is cut into for [`PdqIndex`].
const CHUNKS: usize = 16;
/// Distinct values of a 16-bit chunk.
const CHUNK_VALUES: usize = 1 << 16;

/// Every hash within a Hamming distance of a query, found by multi-index hashing (Norouzi,
/// Punjani and Fleet, "Fast search in Hamming space with multi-index hashing", CVPR 2012): the
/// 256 bits are cut into 16 chunks of 16 bits, and a hash within distance `d` of the query
/// agrees with it to within `d / 16` bits on at least one chunk (pigeonhole). So a query looks
/// up, in each chunk's table, its own chunk value and every value within `d / 16` bits of it
/// (17 values at the usual distance 31), and verifies the hashes found there with the full
/// distance. A hash is reported from the first chunk where it is that near, so once.
///
/// Cost: a query at distance 31 makes 272 lookups and verifies the hashes in those buckets,
/// about `272 n / 65536` for `n` random hashes (some 4,000 at a million): far fewer than a scan,
/// but in proportion to it, and each fetched from anywhere in memory. To match many queries,
/// [`PdqIndex::pairs_within`] makes the same lookups as a join, several times faster.
///
/// Memory: the hashes and, per chunk, their positions grouped by chunk value with the start of
/// each group (compressed sparse rows): 96 bytes per hash (the hash and 16 `u32` positions)
/// plus a fixed 4 MiB of group starts, about 100 MB for a million hashes. At most 2^32 - 1
/// hashes.
///
/// An index of fewer than [`PdqIndex::SCANNED_BELOW`] hashes has no tables, and a query whose
/// lookups would touch more table slots than there are hashes (a distance of 64 or more on all
/// but the largest indexes) scans the hashes instead; the answer is the same.
pub struct PdqIndex {
    /// The hashes as four big-endian words each (chunk `c` is bits `48 - 16 (c % 4)` up of
    /// word `c / 4`, that is bytes `2c` and `2c + 1` of the hash).
    words: Vec<[u64; 4]>,
    /// For chunk `c` and value `v`, the positions of the hashes whose chunk `c` is `v` are
    /// `positions[c][starts[c][v]..starts[c][v + 1]]`, in increasing order.
    starts: Vec<u32>,
    positions: Vec<u32>,
}

impl PdqIndex {
    /// Indexes with fewer hashes are scanned: a scan of this many costs about what the 272
    /// lookups of a query at distance 31 do, and the tables' fixed 4 MiB is not worth it.
    pub const SCANNED_BELOW: usize = 1024;

    /// Indexes `hashes`; a hit names its position in this vector. Panics with more than
    /// 2^32 - 1 hashes (128 GiB of them).
    pub fn new(hashes: Vec<PdqHash>) -> Self {
        let n = hashes.len();
        assert!(
            u32::try_from(n).is_ok_and(|n| n < u32::MAX),
            "a PDQ index holds at most 2^32 - 1 hashes, not {n}"
        );
        let words: Vec<[u64; 4]> = hashes.iter().map(to_words).collect();
        drop(hashes);
        if n < Self::SCANNED_BELOW {
            return Self {
                words,
                starts: Vec::new(),
                positions: Vec::new(),
            };
        }
        let mut starts = vec![0u32; CHUNKS * (CHUNK_VALUES + 1)];
        let mut positions = vec![0u32; CHUNKS * n];
        // A counting sort per chunk, the chunks side by side.
        starts
            .par_chunks_mut(CHUNK_VALUES + 1)
            .zip(positions.par_chunks_mut(n))
            .enumerate()
            .for_each(|(c, (starts, positions))| {
                let (s, p) = group_by_chunk(&words, c);
                starts.copy_from_slice(&s);
                positions.copy_from_slice(&p);
            });
        Self {
            words,
            starts,
            positions,
        }
    }

    /// Hashes indexed.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Bytes the index takes in memory (its hashes and tables).
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of_val(self.words.as_slice())
            + std::mem::size_of_val(self.starts.as_slice())
            + std::mem::size_of_val(self.positions.as_slice())
    }

    /// The hash at `position`.
    pub fn get(&self, position: usize) -> Option<PdqHash> {
        self.words.get(position).map(from_words)
    }

    /// Every indexed hash within `max_distance` of `query`, as (position, distance), by
    /// position.
    pub fn within(&self, query: &PdqHash, max_distance: u32) -> Vec<(usize, u32)> {
        let lookups = masks_within(lookup_radius(max_distance)).len() * CHUNKS;
        if self.starts.is_empty() || lookups >= self.words.len() {
            self.scan(query, max_distance)
        } else {
            self.probe(query, max_distance)
        }
    }

    /// [`PdqIndex::within`] by comparing with every hash.
    fn scan(&self, query: &PdqHash, max_distance: u32) -> Vec<(usize, u32)> {
        let q = to_words(query);
        self.words
            .iter()
            .enumerate()
            .filter_map(|(p, w)| {
                let dist = words_distance(w, &q);
                (dist <= max_distance).then_some((p, dist))
            })
            .collect()
    }

    /// [`PdqIndex::within`] through the chunk tables.
    fn probe(&self, query: &PdqHash, max_distance: u32) -> Vec<(usize, u32)> {
        let q = to_words(query);
        let radius = lookup_radius(max_distance);
        let flips = masks_within(radius);
        let n = self.words.len();
        let mut out = Vec::new();
        for c in 0..CHUNKS {
            let starts = &self.starts[c * (CHUNK_VALUES + 1)..][..CHUNK_VALUES + 1];
            let positions = &self.positions[c * n..][..n];
            let qc = chunk(&q, c);
            for &flip in flips {
                let v = usize::from(qc ^ flip);
                for &p in &positions[starts[v] as usize..starts[v + 1] as usize] {
                    let w = &self.words[p as usize];
                    let dist = words_distance(w, &q);
                    // Reported from the first chunk within the radius only: once.
                    if dist <= max_distance
                        && (0..c).all(|e| chunk_distance(w, &q, e) > radius as u32)
                    {
                        out.push((p as usize, dist));
                    }
                }
            }
        }
        out.sort_unstable_by_key(|&(p, _)| p);
        out
    }

    /// Every (query, position, distance) with the indexed hash at `position` within
    /// `max_distance` of `queries[query]`, by query and then position: [`PdqIndex::within`]
    /// for many queries at once, as matching a whole collection against a bank needs.
    ///
    /// The same lookups, made chunk by chunk as a join: the queries are grouped by the chunk's
    /// value and the indexed hashes copied into the chunk's order, so each table bucket is
    /// checked against the queries of every value near its own while both sit in cache, rather
    /// than one query fetching hashes from all over memory. On a million hashes and more it is
    /// several times faster than `within` per query. Runs on rayon's threads; takes, beside
    /// the index, 32 bytes per indexed hash and 36 per query while it runs.
    pub fn pairs_within(&self, queries: &[PdqHash], max_distance: u32) -> Vec<(usize, usize, u32)> {
        let radius = lookup_radius(max_distance);
        let flips = masks_within(radius);
        if self.starts.is_empty() || flips.len() * CHUNKS >= self.words.len() {
            return queries
                .par_iter()
                .enumerate()
                .flat_map_iter(|(i, q)| {
                    self.scan(q, max_distance)
                        .into_iter()
                        .map(move |(p, dist)| (i, p, dist))
                })
                .collect();
        }
        self.join(queries, max_distance)
    }

    /// [`PdqIndex::pairs_within`] through the chunk tables.
    fn join(&self, queries: &[PdqHash], max_distance: u32) -> Vec<(usize, usize, u32)> {
        let radius = lookup_radius(max_distance);
        let flips = masks_within(radius);
        assert!(
            u32::try_from(queries.len()).is_ok(),
            "at most 2^32 queries at once, not {}",
            queries.len()
        );
        let n = self.words.len();
        let query_words: Vec<[u64; 4]> = queries.iter().map(to_words).collect();
        let mut out = Vec::new();
        for c in 0..CHUNKS {
            let starts = &self.starts[c * (CHUNK_VALUES + 1)..][..CHUNK_VALUES + 1];
            let positions = &self.positions[c * n..][..n];
            let sorted: Vec<[u64; 4]> = positions
                .par_iter()
                .map(|&p| self.words[p as usize])
                .collect();
            let (query_starts, query_order) = group_by_chunk(&query_words, c);
            let query_sorted: Vec<[u64; 4]> = query_order
                .iter()
                .map(|&i| query_words[i as usize])
                .collect();
            // Walk the values of the side with fewer hashes; look up the other side's.
            let queries_outer = queries.len() <= n;
            let index_bucket = |v: usize| starts[v] as usize..starts[v + 1] as usize;
            let query_bucket = |v: usize| query_starts[v] as usize..query_starts[v + 1] as usize;
            let found: Vec<(usize, usize, u32)> = (0..CHUNK_VALUES)
                .into_par_iter()
                .with_min_len(64)
                .flat_map_iter(|v| {
                    let mut local = Vec::new();
                    let outer = if queries_outer {
                        query_bucket(v)
                    } else {
                        index_bucket(v)
                    };
                    if outer.is_empty() {
                        return local;
                    }
                    for &flip in flips {
                        let u = v ^ usize::from(flip);
                        let (qs, ks) = if queries_outer {
                            (outer.clone(), index_bucket(u))
                        } else {
                            (query_bucket(u), outer.clone())
                        };
                        for j in qs {
                            let q = &query_sorted[j];
                            for k in ks.clone() {
                                let w = &sorted[k];
                                let dist = words_distance(w, q);
                                if dist <= max_distance
                                    && (0..c).all(|e| chunk_distance(w, q, e) > radius as u32)
                                {
                                    local.push((
                                        query_order[j] as usize,
                                        positions[k] as usize,
                                        dist,
                                    ));
                                }
                            }
                        }
                    }
                    local
                })
                .collect();
            out.extend(found);
        }
        out.par_sort_unstable();
        out
    }
}

/// `words` grouped by the value of chunk `c`: (the start of each value's group, the indexes in
/// group order), a counting sort.
fn group_by_chunk(words: &[[u64; 4]], c: usize) -> (Vec<u32>, Vec<u32>) {
    let mut starts = vec![0u32; CHUNK_VALUES + 1];
    for w in words {
        starts[usize::from(chunk(w, c)) + 1] += 1;
    }
    for v in 0..CHUNK_VALUES {
        starts[v + 1] += starts[v];
    }
    let mut next = starts[..CHUNK_VALUES].to_vec();
    let mut order = vec![0u32; words.len()];
    for (i, w) in words.iter().enumerate() {
        let slot = &mut next[usize::from(chunk(w, c))];
        order[*slot as usize] = i as u32;
        *slot += 1;
    }
    (starts, order)
}

/// Bits in which one chunk at least of a hash within `max_distance` agrees with the query's.
fn lookup_radius(max_distance: u32) -> usize {
    (max_distance / CHUNKS as u32).min(16) as usize
}

fn to_words(h: &PdqHash) -> [u64; 4] {
    std::array::from_fn(|i| u64::from_be_bytes(h.0[8 * i..8 * i + 8].try_into().unwrap()))
}

fn from_words(w: &[u64; 4]) -> PdqHash {
    let mut out = [0u8; PDQ_BYTES];
    for (i, word) in w.iter().enumerate() {
        out[8 * i..8 * i + 8].copy_from_slice(&word.to_be_bytes());
    }
    PdqHash(out)
}

/// Chunk `c` (0 to 15): bytes `2c` and `2c + 1` of the hash.
fn chunk(w: &[u64; 4], c: usize) -> u16 {
    (w[c / 4] >> (48 - 16 * (c % 4))) as u16
}

fn chunk_distance(a: &[u64; 4], b: &[u64; 4], c: usize) -> u32 {
    (chunk(a, c) ^ chunk(b, c)).count_ones()
}

fn words_distance(a: &[u64; 4], b: &[u64; 4]) -> u32 {
    (a[0] ^ b[0]).count_ones()
        + (a[1] ^ b[1]).count_ones()
        + (a[2] ^ b[2]).count_ones()
        + (a[3] ^ b[3]).count_ones()
}

/// Every 16-bit value with at most `radius` bits set, fewest bits first.
fn masks_within(radius: usize) -> &'static [u16] {
    static BY_WEIGHT: OnceLock<(Vec<u16>, [usize; 17])> = OnceLock::new();
    let (masks, ends) = BY_WEIGHT.get_or_init(|| {
        let mut masks: Vec<u16> = (0..=u16::MAX).collect();
        masks.sort_by_key(|m| m.count_ones());
        let ends = std::array::from_fn(|k| masks.partition_point(|m| m.count_ones() as usize <= k));
        (masks, ends)
    });
    &masks[..ends[radius.min(16)]]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

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

    fn random_hash(rng: &mut StdRng) -> PdqHash {
        PdqHash(rng.random())
    }

    /// `h` with `k` bits flipped: at random, or spread evenly over the chunks (bit `i` in chunk
    /// `i % 16`), the worst case for the pigeonhole: no chunk nearer than the average.
    fn flipped(h: &PdqHash, k: u32, spread: bool, rng: &mut StdRng) -> PdqHash {
        let mut out = *h;
        let mut bits: Vec<usize> = if spread {
            let mut per_chunk: Vec<Vec<usize>> = (0..16)
                .map(|c| {
                    let mut b: Vec<usize> = (16 * c..16 * c + 16).collect();
                    for i in (1..b.len()).rev() {
                        b.swap(i, rng.random_range(0..=i));
                    }
                    b
                })
                .collect();
            (0..k as usize)
                .map(|i| per_chunk[i % 16].pop().unwrap())
                .collect()
        } else {
            (0..256).collect()
        };
        if !spread {
            for i in (1..bits.len()).rev() {
                bits.swap(i, rng.random_range(0..=i));
            }
            bits.truncate(k as usize);
        }
        for b in bits {
            out.0[b / 8] ^= 1 << (b % 8);
        }
        out
    }

    fn linear(hashes: &[PdqHash], q: &PdqHash, d: u32) -> Vec<(usize, u32)> {
        hashes
            .iter()
            .enumerate()
            .map(|(p, h)| (p, h.distance(q)))
            .filter(|&(_, dist)| dist <= d)
            .collect()
    }

    /// Random hashes with near copies of `query` planted among them, at the distances given.
    fn planted(
        seed: u64,
        n: usize,
        query: &PdqHash,
        distances: &[u32],
        spread: bool,
    ) -> Vec<PdqHash> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut hashes: Vec<PdqHash> = (0..n).map(|_| random_hash(&mut rng)).collect();
        for &k in distances {
            let at = rng.random_range(0..=hashes.len());
            hashes.insert(at, flipped(query, k, spread, &mut rng));
        }
        hashes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn agrees_with_a_linear_scan(
            seed in any::<u64>(),
            max_distance in 0u32..=64,
            distances in proptest::collection::vec(0u32..=72, 0..24),
            spread in any::<bool>(),
        ) {
            let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
            let query = random_hash(&mut rng);
            let hashes = planted(seed, 1500, &query, &distances, spread);
            let index = PdqIndex::new(hashes.clone());
            let expected = linear(&hashes, &query, max_distance);
            prop_assert_eq!(index.probe(&query, max_distance), expected.clone());
            prop_assert_eq!(index.scan(&query, max_distance), expected.clone());
            prop_assert_eq!(index.within(&query, max_distance), expected);
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn pairs_within_agrees_with_within(
            seed in any::<u64>(),
            max_distance in 0u32..=64,
            distances in proptest::collection::vec(0u32..=72, 0..24),
            spread in any::<bool>(),
        ) {
            let mut rng = StdRng::seed_from_u64(seed ^ 0x9a1);
            let anchors: Vec<PdqHash> = (0..3).map(|_| random_hash(&mut rng)).collect();
            let hashes = planted(seed, 1500, &anchors[0], &distances, spread);
            // Queries: the anchors, near copies of the anchors and of indexed hashes, random ones.
            let mut queries = anchors.clone();
            for k in 0..40u32 {
                let base = if k % 2 == 0 { anchors[(k % 3) as usize] } else { hashes[rng.random_range(0..hashes.len())] };
                queries.push(flipped(&base, rng.random_range(0..=72), spread, &mut rng));
                queries.push(random_hash(&mut rng));
            }
            let index = PdqIndex::new(hashes);
            let expected: Vec<(usize, usize, u32)> = queries
                .iter()
                .enumerate()
                .flat_map(|(i, q)| index.probe(q, max_distance).into_iter().map(move |(p, d)| (i, p, d)))
                .collect();
            prop_assert_eq!(index.join(&queries, max_distance), expected.clone());
            prop_assert_eq!(index.pairs_within(&queries, max_distance), expected);
        }
    }

    #[test]
    fn every_distance_up_to_64_finds_exactly_the_planted_copies() {
        // Copies of the query at every distance 0..=72, spread evenly over the chunks (each
        // found only through its one nearest chunk), some of them twice, among random hashes.
        let mut rng = StdRng::seed_from_u64(11);
        let query = random_hash(&mut rng);
        let distances: Vec<u32> = (0..=72).chain([0, 15, 16, 31, 32, 64]).collect();
        for spread in [true, false] {
            let hashes = planted(12, 5000, &query, &distances, spread);
            let index = PdqIndex::new(hashes.clone());
            for d in 0..=64 {
                let got = index.probe(&query, d);
                assert_eq!(got, linear(&hashes, &query, d), "distance {d}");
                let planted = distances.iter().filter(|&&k| k <= d).count();
                assert_eq!(got.len(), planted, "distance {d}, spread {spread}");
            }
        }
    }

    #[test]
    fn clustered_hashes_are_reported_once() {
        // Many hashes near a few centres: full buckets, and each hash near the query on
        // several chunks at once.
        let mut rng = StdRng::seed_from_u64(5);
        let centres: Vec<PdqHash> = (0..4).map(|_| random_hash(&mut rng)).collect();
        let hashes: Vec<PdqHash> = (0..4000)
            .map(|i| flipped(&centres[i % 4], rng.random_range(0..40), false, &mut rng))
            .collect();
        let index = PdqIndex::new(hashes.clone());
        for q in &centres {
            for d in [0, 8, 16, 31, 47, 63] {
                assert_eq!(index.within(q, d), linear(&hashes, q, d), "distance {d}");
            }
        }
    }

    #[test]
    fn small_and_empty_indexes_scan() {
        let mut rng = StdRng::seed_from_u64(2);
        let hashes: Vec<PdqHash> = (0..10).map(|_| random_hash(&mut rng)).collect();
        let index = PdqIndex::new(hashes.clone());
        assert!(index.starts.is_empty());
        assert_eq!(index.len(), 10);
        assert_eq!(index.get(3), Some(hashes[3]));
        assert_eq!(index.within(&hashes[3], 0), vec![(3, 0)]);
        assert_eq!(index.within(&hashes[3], 256).len(), 10);
        assert_eq!(index.within(&hashes[3], u32::MAX).len(), 10);
        let pairs = index.pairs_within(&[hashes[1], hashes[3]], 0);
        assert_eq!(pairs, vec![(0, 1, 0), (1, 3, 0)]);
        let empty = PdqIndex::new(Vec::new());
        assert!(empty.is_empty());
        assert!(empty.within(&hashes[0], 31).is_empty());
    }

    #[test]
    fn chunks_are_the_hash_bytes_in_pairs() {
        let mut bytes = [0u8; PDQ_BYTES];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = i as u8;
        }
        let w = to_words(&PdqHash(bytes));
        for c in 0..CHUNKS {
            assert_eq!(
                chunk(&w, c),
                u16::from_be_bytes([bytes[2 * c], bytes[2 * c + 1]])
            );
        }
        assert_eq!(from_words(&w), PdqHash(bytes));
        fn is_send_sync<T: Send + Sync>() {}
        is_send_sync::<PdqIndex>();
    }
}
