//! On-disk collection storage: everything blipsearch keeps about a collection of images, in one
//! directory (default [`DEFAULT_DIR`], `./index`). This layer takes vectors, texts and ids; it
//! never runs a model.
//!
//! | store | module | directory | role |
//! |---|---|---|---|
//! | metadata | [`meta`] (sled) | `meta/` | **source of truth**: records, ids, paths, hashes, captions, ITC vectors |
//! | vectors | [`vectors`] (hnsw_rs) | `vectors/` | ANN over ITC vectors; derived |
//! | text | [`text`] (tantivy) | `text/` | BM25 over captions, given texts, file names; derived |
//! | features | [`features`] | `features/` | ViT outputs for ITM reranking |
//! | thumbnails | [`thumbs`] | `thumbs/` | JPEG previews |
//!
//! [`Collection`] ties them together behind an exclusive lock file (`LOCK`) and implements the
//! commit protocol (see [`Collection::commit`]); the [`Store`] trait is what the engine should
//! program against so that another backend (e.g. Milvus for collections beyond one machine) is
//! an addition, not a rewrite. `index/README.md` documents the layout and recovery for operators.

pub mod error;
pub mod features;
mod flat;
mod fsutil;
pub mod meta;
pub mod text;
pub mod thumbs;
pub mod vectors;

#[cfg(test)]
pub(crate) mod testutil;

use std::fs::TryLockError;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use image::DynamicImage;
use serde::Serialize;

pub use error::{IndexError, Result};
pub use features::{FeatureMatrix, FeatureStore};
#[doc(hidden)]
pub use flat::ExactScan;
pub use meta::{
    content_hash, Caption, CaptionSource, CollectionInfo, CommitState, ImageId, ImageRecord,
    MetaStore,
};
pub use text::{filename_words, TextBoosts, TextIndex};
pub use thumbs::ThumbnailStore;
pub use vectors::{HnswParams, VectorIndex};

/// The default collection directory, relative to the working directory.
pub const DEFAULT_DIR: &str = "index";

/// Batch size when rebuilding the vector index from sled.
const REBUILD_CHUNK: usize = 10_000;

/// What the engine needs from a collection backend: add, delete, commit, vector search with a
/// filter, text search, get. [`Collection`] is the embedded implementation; a distributed one
/// (Milvus: vectors + BM25 + filters, sharded and replicated) would implement the same trait.
pub trait Store {
    /// Adds an image; its id is allocated by the store (`record.id` is ignored) and returned.
    fn add(
        &mut self,
        record: ImageRecord,
        features: Option<&FeatureMatrix>,
        thumbnail: Option<&DynamicImage>,
    ) -> Result<ImageId>;
    /// Deletes an image; returns whether it existed.
    fn delete(&mut self, id: ImageId) -> Result<bool>;
    /// Makes everything added or deleted so far durable and visible to all searches.
    fn commit(&mut self) -> Result<()>;
    /// The `k` nearest images to an ITC query vector as `(id, cosine)`, best first, restricted
    /// to ids passing `filter`. `ef` is a recall/speed hint that backends may ignore.
    fn vector_search(
        &self,
        query: &[f32],
        k: usize,
        ef: Option<usize>,
        filter: Option<&dyn Fn(ImageId) -> bool>,
    ) -> Result<Vec<(ImageId, f32)>>;
    /// The `k` best images for a user text query as `(id, BM25 score)`, best first.
    fn text_search(&self, query: &str, k: usize) -> Result<Vec<(ImageId, f32)>>;
    /// The record of an image.
    fn get(&self, id: ImageId) -> Result<Option<ImageRecord>>;
    /// The stored ViT features of an image, for ITM reranking.
    fn features(&self, id: ImageId) -> Result<FeatureMatrix>;
}

/// Counts and disk usage of a collection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CollectionStats {
    /// Images in sled (the truth).
    pub images: u64,
    /// Live vectors in the HNSW graph.
    pub vectors: usize,
    /// Tombstones still in the graph (removed until the next compaction).
    pub tombstones: usize,
    /// Committed documents in the text index.
    pub text_docs: u64,
    /// Ids changed since the last commit.
    pub pending: usize,
    /// Last committed generation.
    pub generation: u64,
    /// Bytes on disk per store.
    pub bytes: StoreBytes,
}

/// Bytes on disk per store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StoreBytes {
    /// sled (`meta/`).
    pub meta: u64,
    /// HNSW dump and manifest (`vectors/`).
    pub vectors: u64,
    /// tantivy (`text/`).
    pub text: u64,
    /// ViT features (`features/`).
    pub features: u64,
    /// Thumbnails (`thumbs/`).
    pub thumbs: u64,
}

impl StoreBytes {
    /// Sum over the stores.
    pub fn total(&self) -> u64 {
        self.meta + self.vectors + self.text + self.features + self.thumbs
    }
}

/// What [`Collection::open`] found and did to bring the derived indexes in step with sled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Journal entries (changes after the last commit) replayed into the derived indexes.
    pub replayed: usize,
    /// The vector index was rebuilt from sled (dump missing, corrupt or of another generation).
    pub rebuilt_vectors: bool,
    /// The text index was rebuilt from sled.
    pub rebuilt_text: bool,
    /// Feature or thumbnail files removed because no record owns them.
    pub orphans_removed: usize,
}

/// An exclusive lock on a collection directory, held for the life of the [`Collection`].
///
/// An OS advisory lock (`flock` on Unix, `LockFileEx` on Windows) on `LOCK`; it disappears
/// with the process, so a crash never leaves a stale lock. The file names the holder.
struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join("LOCK");
        let mut file = fs_err::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?
            .into_parts()
            .0;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(IndexError::Locked {
                    path,
                    holder: if holder.is_empty() {
                        "unknown".into()
                    } else {
                        holder.into()
                    },
                });
            }
            Err(TryLockError::Error(e)) => return Err(fsutil::fs_err_io(e, "lock", &path)),
        }
        let me = format!("pid {} on {}\n", std::process::id(), hostname());
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(me.as_bytes())?;
        file.sync_all()?;
        Ok(DirLock { _file: file })
    }
}

fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown host".into())
}

/// A collection: the five stores under one directory, one writer at a time.
///
/// # Consistency
/// sled is the source of truth; the HNSW graph and the tantivy index are derived from it and
/// carry the generation of the commit they reflect. Every mutation is written to sled first (in
/// one transaction with a journal entry for its id), then applied to the derived indexes in
/// memory. [`Collection::commit`] makes the derived indexes durable first (tantivy commit, HNSW
/// dump) tagged with the next generation, and only then records that generation in sled and
/// clears the journal. On open, each derived index whose generation equals sled's replays the
/// journal; one that is missing, unreadable or of another generation is rebuilt from sled. So a
/// crash at any point loses at most uncommitted work that sled never made durable, and never
/// leaves the indexes disagreeing with sled.
///
/// Visibility: removals are hidden from both searches at once; additions and caption updates
/// reach vector search at once and text search at the next `commit`.
pub struct Collection {
    dir: PathBuf,
    info: CollectionInfo,
    meta: MetaStore,
    vectors: VectorIndex,
    text: TextIndex,
    features: FeatureStore,
    thumbs: ThumbnailStore,
    recovery: Recovery,
    /// Removed since the last commit: hidden from text search before tantivy sees the delete.
    removed_since_commit: std::collections::HashSet<ImageId>,
    // Last: released after every store has closed its files.
    _lock: DirLock,
}

impl Collection {
    /// Opens the collection in `dir`, creating it with `info` if it does not exist. An existing
    /// collection must be compatible with `info` ([`IndexError::Incompatible`] otherwise, which
    /// suggests `blipsearch reindex`). Fails with [`IndexError::Locked`] while another handle
    /// has it open. Recovers from an earlier crash (see [`Collection::last_recovery`]).
    pub fn open(dir: &Path, info: &CollectionInfo, params: HnswParams) -> Result<Self> {
        Self::open_inner(dir, Some(info), params)
    }

    /// Opens an existing collection with whatever models it was built with (read its
    /// [`Collection::info`] to load them). [`IndexError::NoCollection`] if `dir` has none.
    pub fn open_existing(dir: &Path, params: HnswParams) -> Result<Self> {
        if !dir.join("meta").is_dir() {
            return Err(IndexError::NoCollection(dir.to_path_buf()));
        }
        Self::open_inner(dir, None, params)
    }

    fn open_inner(dir: &Path, info: Option<&CollectionInfo>, params: HnswParams) -> Result<Self> {
        params.validate()?;
        if let Some(info) = info {
            if info.embedding_dim == 0 || info.vit_tokens == 0 || info.vit_hidden == 0 {
                return Err(IndexError::InvalidParams(format!(
                    "collection info with a zero dimension: {info:?}"
                )));
            }
        }
        fs_err::create_dir_all(dir)?;
        let lock = DirLock::acquire(dir)?;
        let meta = MetaStore::open(&dir.join("meta"))?;
        let info = match info {
            Some(info) => meta.init_info(info)?,
            None => meta
                .info()?
                .ok_or_else(|| IndexError::NoCollection(dir.to_path_buf()))?,
        };
        let vectors = VectorIndex::open(&dir.join("vectors"), info.embedding_dim, params)?;
        let text = TextIndex::open(&dir.join("text"))?;
        let features = FeatureStore::open(&dir.join("features"))?;
        let thumbs = ThumbnailStore::open(&dir.join("thumbs"))?;
        let mut collection = Collection {
            dir: dir.to_path_buf(),
            info,
            meta,
            vectors,
            text,
            features,
            thumbs,
            recovery: Recovery::default(),
            removed_since_commit: Default::default(),
            _lock: lock,
        };
        collection.recovery = collection.recover()?;
        Ok(collection)
    }

    /// Brings the derived indexes in step with sled (see the type docs).
    fn recover(&mut self) -> Result<Recovery> {
        let state = self.meta.commit_state()?;
        let pending = self.meta.pending()?;
        let mut recovery = Recovery::default();
        let text_in_step = self.text.generation()?.unwrap_or(0) == state.generation;
        let vectors_in_step = self.vectors.generation().unwrap_or(0) == state.generation;

        if !text_in_step {
            tracing::warn!(
                sled = state.generation,
                text = ?self.text.generation()?,
                "text index out of step with sled; rebuilding"
            );
            self.rebuild_text()?;
            recovery.rebuilt_text = true;
        }
        if !vectors_in_step {
            tracing::warn!(
                sled = state.generation,
                vectors = ?self.vectors.generation(),
                "vector index out of step with sled; rebuilding"
            );
            self.rebuild_vectors()?;
            recovery.rebuilt_vectors = true;
        }
        for &id in &pending {
            match self.meta.get(id)? {
                Some(record) => {
                    if text_in_step {
                        self.text.upsert(&record)?;
                    }
                    if vectors_in_step && !self.vectors.contains(id) {
                        self.vectors.insert(id, &record.itc)?;
                    }
                }
                None => {
                    if text_in_step {
                        self.text.delete(id);
                    }
                    if vectors_in_step {
                        self.vectors.remove(id);
                    }
                    recovery.orphans_removed +=
                        self.features.remove(id)? as usize + self.thumbs.remove(id)? as usize;
                }
            }
        }
        recovery.replayed = pending.len();
        if recovery.rebuilt_text || recovery.rebuilt_vectors {
            recovery.orphans_removed += self.sweep_orphans()?;
        }
        if recovery != Recovery::default() {
            tracing::info!(?recovery, "recovered collection");
            self.commit_generation(state.generation + 1, &pending)?;
        }
        // Cheap cross-check: a derived index with another count than sled is rebuilt.
        let images = self.meta.count()?;
        let mismatch_text = self.text.num_docs() != images;
        let mismatch_vectors = self.vectors.len() as u64 != images;
        if mismatch_text || mismatch_vectors {
            tracing::warn!(
                images,
                text = self.text.num_docs(),
                vectors = self.vectors.len(),
                "derived index counts differ from sled; rebuilding"
            );
            if mismatch_text {
                self.rebuild_text()?;
                recovery.rebuilt_text = true;
            }
            if mismatch_vectors {
                self.rebuild_vectors()?;
                recovery.rebuilt_vectors = true;
            }
            let state = self.meta.commit_state()?;
            self.commit_generation(state.generation + 1, &[])?;
        }
        Ok(recovery)
    }

    fn rebuild_text(&mut self) -> Result<()> {
        self.text.clear()?;
        for record in self.meta.iter() {
            self.text.upsert(&record?)?;
        }
        Ok(())
    }

    fn rebuild_vectors(&mut self) -> Result<()> {
        let total = self.meta.count()? as usize;
        self.vectors.rebuild(Vec::new(), total)?;
        let mut chunk = Vec::with_capacity(REBUILD_CHUNK.min(total));
        for record in self.meta.iter() {
            let record = record?;
            chunk.push((record.id, record.itc));
            if chunk.len() == REBUILD_CHUNK {
                self.vectors.insert_batch(&chunk)?;
                chunk.clear();
            }
        }
        self.vectors.insert_batch(&chunk)?;
        Ok(())
    }

    /// Removes feature and thumbnail files that no record owns.
    fn sweep_orphans(&self) -> Result<usize> {
        let mut removed = 0;
        for id in self.features.ids()? {
            if self.meta.get(id)?.is_none() {
                removed += self.features.remove(id)? as usize;
            }
        }
        for id in self.thumbs.ids()? {
            if self.meta.get(id)?.is_none() {
                removed += self.thumbs.remove(id)? as usize;
            }
        }
        Ok(removed)
    }

    /// What opening this collection had to repair.
    pub fn last_recovery(&self) -> Recovery {
        self.recovery
    }

    /// The collection directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the collection was built with.
    pub fn info(&self) -> &CollectionInfo {
        &self.info
    }

    /// Adds an image: its record (`record.id` is ignored: a fresh id is allocated and
    /// returned), optionally its ViT features (`vit_tokens x vit_hidden`) and a thumbnail
    /// source image. Fails with [`IndexError::AlreadyExists`] for a known path or content
    /// hash, before writing anything.
    pub fn add(
        &mut self,
        record: ImageRecord,
        features: Option<&FeatureMatrix>,
        thumbnail: Option<&DynamicImage>,
    ) -> Result<ImageId> {
        self.add_as(None, record, features, thumbnail)
    }

    /// [`Collection::add`] under the id `record.id`, which must be free and below
    /// [`Collection::next_id`] (reserve it first with [`Collection::reserve_ids`]): how an
    /// image keeps its id when a collection is rebuilt.
    pub fn add_keeping_id(
        &mut self,
        record: ImageRecord,
        features: Option<&FeatureMatrix>,
        thumbnail: Option<&DynamicImage>,
    ) -> Result<ImageId> {
        if record.id >= self.meta.next_id()? {
            return Err(IndexError::InvalidParams(format!(
                "id {} is not reserved (next id {})",
                record.id,
                self.meta.next_id()?
            )));
        }
        self.add_as(Some(record.id), record, features, thumbnail)
    }

    /// The id the next added image gets.
    pub fn next_id(&self) -> Result<ImageId> {
        self.meta.next_id()
    }

    /// Keeps every id below `floor` from being allocated (see [`Collection::add_keeping_id`]).
    pub fn reserve_ids(&mut self, floor: ImageId) -> Result<()> {
        self.meta.reserve_ids(floor)
    }

    fn add_as(
        &mut self,
        id: Option<ImageId>,
        mut record: ImageRecord,
        features: Option<&FeatureMatrix>,
        thumbnail: Option<&DynamicImage>,
    ) -> Result<ImageId> {
        self.vectors.check(&record.itc)?;
        if let Some(f) = features {
            if (f.rows, f.cols) != (self.info.vit_tokens, self.info.vit_hidden) {
                return Err(IndexError::InvalidParams(format!(
                    "features are {}x{}, the collection stores {}x{}",
                    f.rows, f.cols, self.info.vit_tokens, self.info.vit_hidden
                )));
            }
        }
        if let Some(existing) = self.meta.by_path(&record.path)? {
            return Err(IndexError::AlreadyExists {
                kind: "path",
                key: record.path,
                existing,
            });
        }
        if let Some(existing) = self.meta.by_hash(&record.content_hash)? {
            return Err(IndexError::AlreadyExists {
                kind: "content hash",
                key: record.content_hash,
                existing,
            });
        }
        let id = match id {
            Some(id) => id,
            None => self.meta.allocate_id()?,
        };
        record.id = id;
        // Durable intent first: a crash after the side files but before the record leaves a
        // journal entry without a record, and recovery deletes the files.
        self.meta.mark_pending(id)?;
        self.meta.flush()?;
        let written = (|| {
            if let Some(f) = features {
                self.features.put(id, f.rows, f.cols, &f.data)?;
            }
            if let Some(img) = thumbnail {
                self.thumbs.put(id, img)?;
            }
            self.meta.insert(&record)
        })();
        if let Err(e) = written {
            let _ = self.features.remove(id);
            let _ = self.thumbs.remove(id);
            return Err(e);
        }
        self.vectors.insert(id, &record.itc)?;
        self.text.upsert(&record)?;
        Ok(id)
    }

    /// Replaces the record of an existing image (captions, given texts, path, dates...). The ITC
    /// vector cannot change: an image embedded by another model belongs in another collection.
    pub fn update(&mut self, record: &ImageRecord) -> Result<()> {
        let old = self
            .meta
            .get(record.id)?
            .ok_or(IndexError::NotFound(record.id))?;
        if old.itc != record.itc {
            return Err(IndexError::InvalidParams(format!(
                "the ITC vector of image {} cannot change; remove and re-add it",
                record.id
            )));
        }
        self.meta.update(record)?;
        self.text.upsert(record)
    }

    /// Removes an image and its files; returns whether it existed. Its id never comes back.
    pub fn remove(&mut self, id: ImageId) -> Result<bool> {
        if self.meta.remove(id)?.is_none() {
            return Ok(false);
        }
        // The removal must be durable before the files go, or a crash could resurrect a record
        // whose features are gone.
        self.meta.flush()?;
        self.vectors.remove(id);
        self.text.delete(id);
        self.removed_since_commit.insert(id);
        self.features.remove(id)?;
        self.thumbs.remove(id)?;
        Ok(true)
    }

    /// Commits: derived indexes first (tantivy commit, HNSW dump, both tagged with the next
    /// generation; the graph is compacted first when tombstones pass
    /// [`HnswParams::compact_fraction`]), then the generation is recorded in sled and the journal
    /// cleared. A no-op when nothing changed. Returns the state in force.
    pub fn commit(&mut self) -> Result<CommitState> {
        let state = self.meta.commit_state()?;
        let pending = self.meta.pending()?;
        if pending.is_empty() {
            return Ok(state);
        }
        self.commit_generation(state.generation + 1, &pending)
    }

    fn commit_generation(&mut self, generation: u64, journal: &[ImageId]) -> Result<CommitState> {
        if self.vectors.needs_compaction() {
            self.vectors.compact()?;
        }
        self.text.commit(generation)?;
        self.removed_since_commit.clear();
        self.vectors.save(generation)?;
        self.meta.record_commit(generation, journal)
    }

    /// The `k` nearest images to the ITC vector `query` as `(id, cosine)`, best first. `ef`
    /// overrides [`HnswParams::ef_search`]; `filter` keeps only ids for which it returns true
    /// (`k` results whenever `k` ids pass it). Removed images never appear.
    pub fn search_vectors(
        &self,
        query: &[f32],
        k: usize,
        ef: Option<usize>,
        filter: Option<&dyn Fn(ImageId) -> bool>,
    ) -> Result<Vec<(ImageId, f32)>> {
        self.vectors.search(query, k, ef, filter)
    }

    /// The `k` best images for the user query `query` (BM25 over kept captions, given texts and
    /// file names) as `(id, score)`, best first. Any input is accepted.
    pub fn search_text(&self, query: &str, k: usize) -> Result<Vec<(ImageId, f32)>> {
        if self.removed_since_commit.is_empty() {
            return self.text.search(query, k);
        }
        let mut hits = self
            .text
            .search(query, k + self.removed_since_commit.len())?;
        hits.retain(|(id, _)| !self.removed_since_commit.contains(id));
        hits.truncate(k);
        Ok(hits)
    }

    /// The record of `id`.
    pub fn get(&self, id: ImageId) -> Result<Option<ImageRecord>> {
        self.meta.get(id)
    }

    /// The id stored for a canonical path.
    pub fn by_path(&self, path: &str) -> Result<Option<ImageId>> {
        self.meta.by_path(path)
    }

    /// The id stored for a content hash ([`content_hash`]).
    pub fn by_hash(&self, hash: &str) -> Result<Option<ImageId>> {
        self.meta.by_hash(hash)
    }

    /// All records, in id order.
    pub fn iter(&self) -> impl Iterator<Item = Result<ImageRecord>> + '_ {
        self.meta.iter()
    }

    /// Number of images.
    pub fn len(&self) -> Result<u64> {
        self.meta.count()
    }

    /// Whether the collection has no images.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The stored ViT features of `id` ([`IndexError::NotFound`] if none were stored).
    pub fn features(&self, id: ImageId) -> Result<FeatureMatrix> {
        self.features.get(id)
    }

    /// The JPEG thumbnail of `id` ([`IndexError::NotFound`] if none was stored).
    pub fn thumbnail(&self, id: ImageId) -> Result<Vec<u8>> {
        self.thumbs.get(id)
    }

    /// Counts and bytes on disk per store (walks the feature and thumbnail directories).
    pub fn stats(&self) -> Result<CollectionStats> {
        let state = self.meta.commit_state()?;
        Ok(CollectionStats {
            images: self.meta.count()?,
            vectors: self.vectors.len(),
            tombstones: self.vectors.tombstones(),
            text_docs: self.text.num_docs(),
            pending: self.meta.pending()?.len(),
            generation: state.generation,
            bytes: StoreBytes {
                meta: self.meta.size_on_disk()?,
                vectors: self.vectors.bytes_on_disk()?,
                text: self.text.bytes_on_disk()?,
                features: self.features.bytes_on_disk()?,
                thumbs: self.thumbs.bytes_on_disk()?,
            },
        })
    }
}

impl Store for Collection {
    fn add(
        &mut self,
        record: ImageRecord,
        features: Option<&FeatureMatrix>,
        thumbnail: Option<&DynamicImage>,
    ) -> Result<ImageId> {
        Collection::add(self, record, features, thumbnail)
    }

    fn delete(&mut self, id: ImageId) -> Result<bool> {
        self.remove(id)
    }

    fn commit(&mut self) -> Result<()> {
        Collection::commit(self).map(|_| ())
    }

    fn vector_search(
        &self,
        query: &[f32],
        k: usize,
        ef: Option<usize>,
        filter: Option<&dyn Fn(ImageId) -> bool>,
    ) -> Result<Vec<(ImageId, f32)>> {
        self.search_vectors(query, k, ef, filter)
    }

    fn text_search(&self, query: &str, k: usize) -> Result<Vec<(ImageId, f32)>> {
        self.search_text(query, k)
    }

    fn get(&self, id: ImageId) -> Result<Option<ImageRecord>> {
        Collection::get(self, id)
    }

    fn features(&self, id: ImageId) -> Result<FeatureMatrix> {
        Collection::features(self, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::testutil::Rng;
    use image::RgbImage;

    const DIM: usize = 32;
    const WORDS: [&str; 8] = [
        "dog", "cat", "beach", "mountain", "car", "tree", "boat", "city",
    ];

    fn info() -> CollectionInfo {
        CollectionInfo::new("test/blip-itm-tiny", None, DIM, 5, 8)
    }

    fn record(n: u64, rng: &mut Rng) -> ImageRecord {
        let a = WORDS[(n % 8) as usize];
        let b = WORDS[(n / 8 % 8) as usize];
        ImageRecord {
            id: ImageId(u64::MAX), // ignored by add
            path: format!("/photos/{b}_{n}.jpg"),
            content_hash: content_hash(&n.to_le_bytes()),
            size_bytes: 1000 + n,
            width: 64,
            height: 48,
            mtime_unix: 1_700_000_000,
            exif_date: None,
            itc: rng.unit_vector(DIM),
            captions: vec![Caption {
                text: format!("a {a} near a {b} number{n}"),
                source: CaptionSource::Beam,
                p_match: Some(0.8),
                kept: true,
            }],
            given_texts: vec![],
            added_unix: 1_700_000_000,
        }
    }

    fn features(n: u64) -> FeatureMatrix {
        FeatureMatrix {
            rows: 5,
            cols: 8,
            data: (0..40).map(|i| (i as f32 + n as f32) * 0.25).collect(),
        }
    }

    fn open(dir: &Path) -> Collection {
        Collection::open(dir, &info(), HnswParams::default()).unwrap()
    }

    /// sled, HNSW and tantivy agree on the number of images.
    fn assert_consistent(c: &Collection) {
        let s = c.stats().unwrap();
        assert_eq!(s.images as usize, s.vectors, "{s:?}");
        assert_eq!(s.images, s.text_docs, "{s:?}");
        assert_eq!(s.images as usize, c.iter().count());
    }

    type Snapshot = (Vec<Vec<(ImageId, f32)>>, Vec<Vec<(ImageId, f32)>>);

    fn snapshot(c: &Collection, queries: &[Vec<f32>]) -> Snapshot {
        let vec_hits = queries
            .iter()
            .map(|q| c.search_vectors(q, 10, None, None).unwrap())
            .collect();
        let text_hits = WORDS
            .iter()
            .map(|w| c.search_text(w, 10).unwrap())
            .collect();
        (vec_hits, text_hits)
    }

    fn ids_of(s: &Snapshot) -> Vec<Vec<ImageId>> {
        s.0.iter()
            .chain(s.1.iter())
            .map(|hits| hits.iter().map(|h| h.0).collect())
            .collect()
    }

    #[test]
    fn lifecycle_reopen_delete_and_crash_recovery() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("index");
        let mut rng = Rng::new(1);
        let queries: Vec<Vec<f32>> = (0..10).map(|_| rng.unit_vector(DIM)).collect();

        // Create, add 200, commit.
        let mut ids = Vec::new();
        let before = {
            let mut c = open(&dir);
            assert_eq!(c.last_recovery(), Recovery::default());
            for n in 0..200 {
                let f = (n % 5 == 0).then(|| features(n));
                let thumb = (n % 25 == 0).then(|| DynamicImage::ImageRgb8(RgbImage::new(600, 300)));
                ids.push(
                    c.add(record(n, &mut rng), f.as_ref(), thumb.as_ref())
                        .unwrap(),
                );
            }
            assert_eq!(c.commit().unwrap().generation, 1);
            assert_eq!(c.commit().unwrap().generation, 1, "empty commit is a no-op");
            assert_consistent(&c);
            let s = snapshot(&c, &queries);
            assert!(s.0.iter().all(|h| h.len() == 10) && s.1.iter().all(|h| h.len() == 10));
            s
        };

        // Reopen: identical answers, nothing to recover.
        let mut c = open(&dir);
        assert_eq!(c.last_recovery(), Recovery::default());
        assert_eq!(snapshot(&c, &queries), before);
        assert_eq!(c.features(ids[10]).unwrap(), features(10));
        assert!(c.thumbnail(ids[50]).unwrap().starts_with(&[0xFF, 0xD8]));
        let rec = c.get(ids[3]).unwrap().unwrap();
        assert_eq!(rec.id, ids[3]);
        assert_eq!(c.by_path(&rec.path).unwrap(), Some(ids[3]));
        assert_eq!(c.by_hash(&rec.content_hash).unwrap(), Some(ids[3]));

        // Delete 20 (including ones with features and thumbnails): they never come back.
        let deleted: Vec<ImageId> = ids.iter().copied().step_by(10).collect();
        for id in &deleted {
            assert!(c.remove(*id).unwrap());
            assert!(!c.remove(*id).unwrap());
        }
        let gone = |c: &Collection| {
            for id in &deleted {
                assert!(c.get(*id).unwrap().is_none());
                assert!(matches!(c.features(*id), Err(IndexError::NotFound(_))));
                assert!(matches!(c.thumbnail(*id), Err(IndexError::NotFound(_))));
            }
            for q in &queries {
                let hits = c.search_vectors(q, 200, None, None).unwrap();
                assert_eq!(hits.len(), 180);
                assert!(hits.iter().all(|h| !deleted.contains(&h.0)));
            }
            for w in WORDS {
                let hits = c.search_text(w, 200).unwrap();
                assert!(hits.iter().all(|h| !deleted.contains(&h.0)), "{w}");
            }
        };
        gone(&c); // before the commit too
        c.commit().unwrap();
        gone(&c);
        assert_consistent(&c);
        let after_delete = snapshot(&c, &queries);
        drop(c);
        let c = open(&dir);
        gone(&c);
        assert_eq!(snapshot(&c, &queries), after_delete);
        let generation = c.stats().unwrap().generation;
        drop(c);

        // Crash 1: the HNSW dump is lost. Reopen rebuilds it from sled.
        for entry in std::fs::read_dir(dir.join("vectors")).unwrap() {
            let p = entry.unwrap().path();
            if p.to_string_lossy().contains(".hnsw.") {
                std::fs::remove_file(p).unwrap();
            }
        }
        let c = open(&dir);
        assert!(c.last_recovery().rebuilt_vectors && !c.last_recovery().rebuilt_text);
        assert_consistent(&c);
        gone(&c);
        // 180 vectors are below exact_threshold: searches are exact, so the same ids.
        assert_eq!(ids_of(&snapshot(&c, &queries)), ids_of(&after_delete));
        let generation2 = c.stats().unwrap().generation;
        assert!(generation2 > generation);
        drop(c);

        // Crash 2: the dump is intact but of an older generation (crash between the dump and
        // the sled commit record).
        let manifest_path = dir.join("vectors").join("manifest.json");
        let manifest = std::fs::read_to_string(&manifest_path).unwrap();
        let stale = manifest.replace(
            &format!("\"generation\": {generation2}"),
            &format!("\"generation\": {}", generation2 - 1),
        );
        assert_ne!(stale, manifest);
        std::fs::write(&manifest_path, stale).unwrap();
        let c = open(&dir);
        assert!(c.last_recovery().rebuilt_vectors);
        assert_consistent(&c);
        drop(c);

        // Crash 3: the text index is ahead of sled.
        {
            let mut text = TextIndex::open(&dir.join("text")).unwrap();
            text.commit(999).unwrap();
        }
        let c = open(&dir);
        assert!(c.last_recovery().rebuilt_text && !c.last_recovery().rebuilt_vectors);
        assert_consistent(&c);
        assert_eq!(ids_of(&snapshot(&c, &queries)), ids_of(&after_delete));
        drop(c);

        // Crash 4: uncommitted adds and removes (process dies without commit): the journal
        // replays them on open.
        let (added, removed) = {
            let mut c = open(&dir);
            let added = c.add(record(1000, &mut rng), None, None).unwrap();
            let removed = ids[1];
            assert!(c.remove(removed).unwrap());
            (added, removed)
        };
        let c = open(&dir);
        assert_eq!(c.last_recovery().replayed, 2);
        assert_consistent(&c);
        assert_eq!(c.search_text("number1000", 5).unwrap()[0].0, added);
        let rec = c.get(added).unwrap().unwrap();
        assert_eq!(
            c.search_vectors(&rec.itc, 1, None, None).unwrap()[0].0,
            added
        );
        assert!(c.get(removed).unwrap().is_none());
        assert!(c
            .search_vectors(&rec.itc, 300, None, None)
            .unwrap()
            .iter()
            .all(|h| h.0 != removed));
        drop(c);

        // Crash 5: between an image's side files and its record (add's intent was journaled).
        let orphan = {
            let meta = MetaStore::open(&dir.join("meta")).unwrap();
            let id = meta.allocate_id().unwrap();
            meta.mark_pending(id).unwrap();
            meta.flush().unwrap();
            let f = FeatureStore::open(&dir.join("features")).unwrap();
            f.put(id, 5, 8, &features(0).data).unwrap();
            id
        };
        let c = open(&dir);
        assert_eq!(c.last_recovery().orphans_removed, 1);
        assert!(!FeatureStore::open(&dir.join("features"))
            .unwrap()
            .contains(orphan));
        assert_consistent(&c);
        let s = c.stats().unwrap();
        // ids[1]'s tombstone stays until compaction (20% of the graph).
        assert_eq!((s.images, s.pending, s.tombstones), (180, 0, 1));
        assert!(s.bytes.meta > 0 && s.bytes.vectors > 0 && s.bytes.text > 0);
        // Files of deleted images are gone; the survivors' remain (every 5th has features,
        // every 25th a thumbnail, every 10th was deleted).
        let on_disk = |sub: &str, ext: &str| features::ids_in(&dir.join(sub), ext).unwrap().len();
        assert_eq!(
            (on_disk("features", ".f16"), on_disk("thumbs", ".jpg")),
            (20, 4)
        );
        assert_eq!(s.bytes.features, 20 * FeatureStore::bytes_per_image(5, 8));
    }

    #[test]
    fn second_open_is_refused_with_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let first = open(tmp.path());
        match Collection::open(tmp.path(), &info(), HnswParams::default()) {
            Err(IndexError::Locked { holder, .. }) => {
                assert!(
                    holder.contains(&format!("pid {}", std::process::id())),
                    "{holder}"
                );
                let msg = IndexError::Locked {
                    path: tmp.path().join("LOCK"),
                    holder,
                }
                .to_string();
                assert!(msg.contains("locked by pid"), "{msg}");
            }
            Err(e) => panic!("expected Locked, got {e}"),
            Ok(_) => panic!("expected Locked, got a second handle"),
        }
        drop(first);
        open(tmp.path());
    }

    #[test]
    fn incompatible_or_missing_collections_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            Collection::open_existing(tmp.path(), HnswParams::default()),
            Err(IndexError::NoCollection(_))
        ));
        drop(open(tmp.path()));
        let mut other = info();
        other.retrieval_model = "Salesforce/blip-itm-large-coco".into();
        other.vit_hidden = 1024;
        let err = Collection::open(tmp.path(), &other, HnswParams::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains("blipsearch reindex"), "{err}");
        let c = Collection::open_existing(tmp.path(), HnswParams::default()).unwrap();
        assert_eq!(c.info().retrieval_model, info().retrieval_model);
    }

    #[test]
    fn add_refuses_bad_input_without_side_effects() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = open(tmp.path());
        let mut rng = Rng::new(5);
        let first = record(1, &mut rng);
        let id = c.add(first.clone(), Some(&features(1)), None).unwrap();

        let mut dup_path = record(2, &mut rng);
        dup_path.path = first.path.clone();
        let mut dup_hash = record(3, &mut rng);
        dup_hash.content_hash = first.content_hash.clone();
        let mut bad_vec = record(4, &mut rng);
        bad_vec.itc = vec![0.0; DIM];
        let mut short_vec = record(5, &mut rng);
        short_vec.itc.pop();
        let bad_features = FeatureMatrix {
            rows: 4,
            cols: 8,
            data: vec![0.0; 32],
        };
        assert!(matches!(
            c.add(dup_path, None, None),
            Err(IndexError::AlreadyExists { existing, .. }) if existing == id
        ));
        assert!(matches!(
            c.add(dup_hash, None, None),
            Err(IndexError::AlreadyExists {
                kind: "content hash",
                ..
            })
        ));
        assert!(c.add(bad_vec, None, None).is_err());
        assert!(c.add(short_vec, None, None).is_err());
        assert!(c
            .add(record(6, &mut rng), Some(&bad_features), None)
            .is_err());
        c.commit().unwrap();
        assert_eq!(c.len().unwrap(), 1);
        assert_consistent(&c);
        assert_eq!(
            FeatureStore::open(&tmp.path().join("features"))
                .unwrap()
                .ids()
                .unwrap(),
            vec![id]
        );
    }

    #[test]
    fn update_reindexes_text_but_not_vectors() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = open(tmp.path());
        let mut rng = Rng::new(6);
        let id = c.add(record(1, &mut rng), None, None).unwrap();
        c.commit().unwrap();
        let mut rec = c.get(id).unwrap().unwrap();
        rec.given_texts.push("grandma's birthday".into());
        rec.captions[0].kept = false;
        c.update(&rec).unwrap();
        c.commit().unwrap();
        assert_eq!(c.search_text("birthday", 5).unwrap()[0].0, id);
        assert!(c.search_text("number1", 5).unwrap().is_empty());
        rec.itc[0] += 0.5;
        assert!(matches!(c.update(&rec), Err(IndexError::InvalidParams(_))));
        assert_consistent(&c);
    }

    #[test]
    fn filtered_vector_search_through_the_store_trait() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = open(tmp.path());
        let mut rng = Rng::new(8);
        let mut ids = Vec::new();
        for n in 0..100 {
            ids.push(Store::add(&mut c, record(n, &mut rng), None, None).unwrap());
        }
        Store::commit(&mut c).unwrap();
        let store: &dyn Store = &c;
        let allowed: Vec<ImageId> = ids.iter().copied().step_by(7).collect();
        let filter = |id: ImageId| allowed.contains(&id);
        let hits = store
            .vector_search(&rng.unit_vector(DIM), 5, None, Some(&filter))
            .unwrap();
        assert_eq!(hits.len(), 5);
        assert!(hits.iter().all(|h| allowed.contains(&h.0)));
        assert_eq!(store.text_search("dog", 3).unwrap().len(), 3);
        assert!(store.get(ids[0]).unwrap().is_some());
    }

    #[test]
    fn collection_can_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Collection>();
    }

    /// Bytes per image of each store for a realistic image (256-d ITC, ViT-B features, a
    /// 1024x768 photo-like thumbnail source, two captions); printed for the README.
    #[test]
    fn bytes_per_image() {
        let tmp = tempfile::tempdir().unwrap();
        let info = CollectionInfo::new("Salesforce/blip-itm-base-coco", None, 256, 577, 768);
        let mut c = Collection::open(tmp.path(), &info, HnswParams::default()).unwrap();
        let mut rng = Rng::new(2);
        let n = 50u64;
        for i in 0..n {
            let mut r = record(i, &mut rng);
            r.itc = rng.unit_vector(256);
            r.captions.push(Caption {
                text: "a photograph of something else entirely".into(),
                source: CaptionSource::Sample,
                p_match: Some(0.3),
                kept: false,
            });
            let f = FeatureMatrix {
                rows: 577,
                cols: 768,
                data: (0..577 * 768).map(|_| rng.normal() as f32).collect(),
            };
            // Smooth, photo-like content (JPEG size depends on it).
            let thumb = DynamicImage::ImageRgb8(RgbImage::from_fn(1024, 768, |x, y| {
                image::Rgb([(x / 4 + i as u32) as u8, (y / 3) as u8, ((x + y) / 8) as u8])
            }));
            c.add(r, Some(&f), Some(&thumb)).unwrap();
        }
        c.commit().unwrap();
        let b = c.stats().unwrap().bytes;
        let record_json = serde_json::to_vec(&c.get(ImageId(0)).unwrap().unwrap())
            .unwrap()
            .len();
        eprintln!(
            "bytes per image over {n}: record JSON {record_json}, sled {} (small-collection \
             overhead), vectors {}, text {}, features {}, thumbs {}",
            b.meta / n,
            b.vectors / n,
            b.text / n,
            b.features / n,
            b.thumbs / n
        );
        assert_eq!(b.features, n * FeatureStore::bytes_per_image(577, 768));
    }
}
