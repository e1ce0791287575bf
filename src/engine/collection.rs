//! [`Engine`]: one open collection and everything blipsearch does with it. It owns the record
//! store (behind the [`Store`] trait), the blob store and the uploads, and is the only place that
//! writes to them: ingest, upload, remove, reindex and search are its methods, so the CLI and the
//! server call the same operations and only parse and render.
//!
//! Write order, which makes a crash harmless: an image's blobs are written before its record and
//! removed after it; blobs that no record owns are swept when the collection is opened (embedded
//! store only: with a shared store another process may be about to own them).
//!
//! Where records live is a [`Location`]: the embedded store in the collection directory, or a
//! Milvus collection that any number of processes share ([`StoreLocation::Milvus`]); the
//! directory then holds only blobs and uploads, which every process sharing the collection must
//! see (a shared file system), and takes no lock.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use image::DynamicImage;
use serde::Serialize;

use super::error::{EngineError, Result};
use super::facets::FacetRequest;
use super::matcher::{Matcher, MatcherCache};
use super::models::Encoders;
use super::search::{SearchParams, SearchResults, Searcher};
use super::upload_folder::{uploads_dir, UploadFolder};
use crate::index::{
    AttrFilter, AuditEntry, AuditEvent, AuditLog, BlobStore, Collection, CollectionInfo,
    FeatureMatrix, HnswParams, ImageId, ImageRecord, IndexError, MilvusAddress, MilvusStore, Store,
    StoreStats, AUDIT_FILE,
};

/// Counts and disk usage of a collection: its store and its blobs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CollectionStats {
    /// The record store.
    #[serde(flatten)]
    pub store: StoreStats,
    /// Bytes of rerank features.
    pub features_bytes: u64,
    /// Bytes of thumbnails.
    pub thumbs_bytes: u64,
}

impl CollectionStats {
    /// Bytes on disk, all parts together.
    pub fn total_bytes(&self) -> u64 {
        self.store.bytes.values().sum::<u64>() + self.features_bytes + self.thumbs_bytes
    }
}

/// An image for [`Engine::put_images`]: its record (the id is set there), the id it keeps (a
/// reindex) and the image it replaces (a changed file), and its blobs.
pub(crate) struct NewImage<'a> {
    pub record: ImageRecord,
    pub keep_id: Option<ImageId>,
    pub replaces: Option<ImageId>,
    pub features: Option<&'a FeatureMatrix>,
    pub thumbnail: Option<&'a DynamicImage>,
}

/// What a target of [`Engine::remove_all`] names: an id or a file path. Parsed as the command
/// line gives it: a number is an id, anything else a path.
///
/// ```
/// use blipsearch::engine::{ImageId, Target};
///
/// assert_eq!("42".parse::<Target>(), Ok(Target::Id(ImageId(42))));
/// assert_eq!("42.jpg".parse::<Target>(), Ok(Target::Path("42.jpg".into())));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An image id.
    Id(ImageId),
    /// A file path (canonicalised before lookup).
    Path(PathBuf),
}

impl std::str::FromStr for Target {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s.parse::<u64>() {
            Ok(n) => Self::Id(ImageId(n)),
            Err(_) => Self::Path(PathBuf::from(s)),
        })
    }
}

/// Which store holds a collection's records, as `--store` and `BLIPSEARCH_STORE` give it.
///
/// ```
/// use blipsearch::engine::StoreLocation;
///
/// assert_eq!("embedded".parse::<StoreLocation>().unwrap(), StoreLocation::Embedded);
/// let milvus: StoreLocation = "milvus://milvus-host:19530/photos".parse().unwrap();
/// assert!(matches!(milvus, StoreLocation::Milvus(_)));
/// assert!("sqlite://x".parse::<StoreLocation>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreLocation {
    /// The embedded store (sled, hnsw_rs, tantivy) in the collection directory, locked by one
    /// process at a time.
    #[default]
    Embedded,
    /// A Milvus collection, shared by any number of processes.
    Milvus(MilvusAddress),
}

impl std::str::FromStr for StoreLocation {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "" | "embedded" => Ok(Self::Embedded),
            s if s.starts_with("milvus://") => Ok(Self::Milvus(s.parse()?)),
            s => Err(EngineError::InvalidInput(format!(
                "unknown store {s:?}: use `embedded` or milvus://HOST:PORT/COLLECTION"
            ))),
        }
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedded => f.write_str("embedded"),
            Self::Milvus(a) => a.fmt(f),
        }
    }
}

/// Where a collection is: its directory (blobs, uploads, and the embedded store's files) and
/// the store that holds its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The collection directory.
    pub dir: PathBuf,
    /// The record store.
    pub store: StoreLocation,
}

impl Location {
    /// The embedded store in `dir`.
    pub fn embedded(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            store: StoreLocation::Embedded,
        }
    }
}

impl From<&Path> for Location {
    fn from(dir: &Path) -> Self {
        Self::embedded(dir)
    }
}

impl From<&PathBuf> for Location {
    fn from(dir: &PathBuf) -> Self {
        Self::embedded(dir)
    }
}

/// The file in a collection directory naming the server that has it open (its URL, then its
/// pid), so that a command refused by the lock can say where to go instead.
const SERVING: &str = "SERVING";

/// An open collection: record store, blob store and uploads, in one directory.
///
/// Share it between threads in an `Arc`: its methods take `&self`, searches run side by side,
/// and a write holds the store's lock only for the write itself, never across a forward pass
/// (so a search is answered while an ingest embeds). See the [module docs](super) for an
/// example.
pub struct Engine {
    dir: PathBuf,
    store: RwLock<Box<dyn Store>>,
    blobs: BlobStore,
    uploads: UploadFolder,
    /// The moderation audit log (`audit.jsonl` in the collection directory).
    audit: AuditLog,
    /// Every match list, indexed for checking images.
    matcher: MatcherCache,
}

impl Engine {
    /// Opens the collection at `at` (a directory, or a [`Location`]), creating it for the
    /// models described by `info`; an existing collection must have been built with them (else
    /// an error that suggests `blipsearch reindex`).
    pub fn open(at: impl Into<Location>, info: &CollectionInfo) -> Result<Self> {
        let at = at.into();
        let store: Box<dyn Store> = match &at.store {
            StoreLocation::Embedded => {
                Box::new(Collection::open(&at.dir, info, HnswParams::default())?)
            }
            StoreLocation::Milvus(a) => Box::new(MilvusStore::open(a, info)?),
        };
        Self::over(&at.dir, store)
    }

    /// Opens the existing collection at `at` with whatever models it was built with
    /// ([`Engine::info`] says which).
    pub fn open_existing(at: impl Into<Location>) -> Result<Self> {
        let at = at.into();
        let store: Box<dyn Store> = match &at.store {
            StoreLocation::Embedded => {
                Box::new(Collection::open_existing(&at.dir, HnswParams::default())?)
            }
            StoreLocation::Milvus(a) => Box::new(MilvusStore::open_existing(a)?),
        };
        Self::over(&at.dir, store)
    }

    /// Whether there is a collection at `at`.
    pub fn exists(at: impl Into<Location>) -> Result<bool> {
        let at = at.into();
        match &at.store {
            StoreLocation::Embedded => Ok(Collection::exists(&at.dir)),
            StoreLocation::Milvus(a) => Ok(MilvusStore::exists(a)?),
        }
    }

    /// Records that this process serves the collection at `url` (see [`Engine::serving_url`]).
    pub fn announce_serving(&self, url: &str) -> Result<()> {
        let path = self.dir.join(SERVING);
        std::fs::write(&path, format!("{url}\n{}\n", std::process::id()))
            .map_err(|source| EngineError::Io { path, source })
    }

    /// Takes back [`Engine::announce_serving`].
    pub fn withdraw_serving(&self) {
        let _ = std::fs::remove_file(self.dir.join(SERVING));
    }

    /// The URL of the server that announced it serves the collection in `dir`, if one did. Only
    /// meaningful while the collection is locked ([`super::ErrorKind::Locked`]): a server that died
    /// leaves the file, but not the lock.
    pub fn serving_url(dir: &Path) -> Option<String> {
        let text = std::fs::read_to_string(dir.join(SERVING)).ok()?;
        text.lines()
            .next()
            .map(str::to_string)
            .filter(|u| !u.is_empty())
    }

    /// The engine over `store`, with blobs and uploads in `dir`.
    pub fn over(dir: &Path, store: Box<dyn Store>) -> Result<Self> {
        let blobs = BlobStore::open(dir)?;
        if !store.shared() {
            let swept = blobs.sweep(|id| store.contains(id).unwrap_or(true))?;
            if swept > 0 {
                tracing::info!(swept, "removed feature and thumbnail files no image owns");
            }
        }
        let uploads = UploadFolder::open(&uploads_dir(dir))?;
        let audit = AuditLog::open(&dir.join(AUDIT_FILE))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            store: RwLock::new(store),
            blobs,
            uploads,
            audit,
            matcher: MatcherCache::default(),
        })
    }

    /// This engine, writing its audit events to the log of the collection in `dir` instead of
    /// its own (a collection being rebuilt beside the one it will replace).
    pub(crate) fn auditing_to(mut self, dir: &Path) -> Result<Self> {
        self.audit = AuditLog::open(&dir.join(AUDIT_FILE))?;
        Ok(self)
    }

    /// Appends `events` of `actor` to the audit log, durably.
    pub(crate) fn audit_events(
        &self,
        actor: &str,
        events: Vec<AuditEvent>,
    ) -> Result<Vec<AuditEntry>> {
        Ok(self.audit.append_all(actor, events)?)
    }

    /// The audit log.
    pub(crate) fn audit_log(&self) -> &AuditLog {
        &self.audit
    }

    /// The matcher over every list (built from the store when a list changed since the last).
    pub(crate) fn matcher(&self) -> Result<Arc<Matcher>> {
        let store = self.read()?;
        self.matcher.get(&**store)
    }

    /// Drops the matcher: a list changed.
    pub(crate) fn lists_changed(&self) -> Result<()> {
        self.matcher.invalidate()
    }

    /// With a store other processes write, drops the matcher if their changes may have made it
    /// stale (run at the start of work that checks images).
    pub(crate) fn refresh_matcher(&self) -> Result<()> {
        let store = self.read()?;
        self.matcher.refresh(&**store)
    }

    /// The collection directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the collection was built with.
    pub fn info(&self) -> Result<CollectionInfo> {
        Ok(self.read()?.info().clone())
    }

    /// Parses filter strings (`brand:acme`, `price:..80`, see [`AttrFilter::parse`]) with the
    /// collection's attribute types.
    pub fn parse_filters(&self, filters: &[String]) -> Result<Vec<AttrFilter>> {
        let schema = self.info()?.attributes;
        filters
            .iter()
            .map(|f| Ok(AttrFilter::parse(f, &schema)?))
            .collect()
    }

    /// Parses a facet list (`brand,price:..50|50..`, see [`FacetRequest::parse_list`]) with the
    /// collection's attribute types.
    pub fn parse_facets(&self, list: &str) -> Result<Vec<FacetRequest>> {
        FacetRequest::parse_list(list, &self.info()?.attributes)
    }

    pub(crate) fn read(&self) -> Result<RwLockReadGuard<'_, Box<dyn Store>>> {
        self.store
            .read()
            .map_err(|_| EngineError::Internal("the collection lock is poisoned".into()))
    }

    pub(crate) fn write(&self) -> Result<RwLockWriteGuard<'_, Box<dyn Store>>> {
        self.store
            .write()
            .map_err(|_| EngineError::Internal("the collection lock is poisoned".into()))
    }

    pub(crate) fn uploads(&self) -> &UploadFolder {
        &self.uploads
    }

    /// Where uploaded files are kept (canonical).
    pub fn uploads_dir(&self) -> &Path {
        self.uploads.dir()
    }

    /// Checks that models described by `requested` fit the collection (the same retrieval
    /// weights, by content when both sides know it) and records where they are now.
    pub fn adopt_models(&self, requested: &CollectionInfo) -> Result<()> {
        Ok(self.write()?.adopt_models(requested)?)
    }

    /// The record of `id`.
    pub fn get(&self, id: ImageId) -> Result<Option<ImageRecord>> {
        Ok(self.read()?.get(id)?)
    }

    /// The id stored for a canonical path.
    pub fn by_path(&self, path: &str) -> Result<Option<ImageId>> {
        Ok(self.read()?.by_path(path)?)
    }

    /// Calls `f` with every record, in id order (under a read lock: keep it short).
    pub fn for_each(&self, f: &mut dyn FnMut(ImageRecord) -> Result<()>) -> Result<()> {
        // The store's callback speaks its own error type: carry ours past it.
        let mut failed = None;
        let scanned = self.read()?.for_each(&mut |r| {
            f(r).map_err(|e| {
                failed = Some(e);
                IndexError::InvalidParams("stopped by the caller".into())
            })
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(scanned?),
        }
    }

    /// The stored ViT features of `id`, which ITM reranks with.
    pub fn features(&self, id: ImageId) -> Result<FeatureMatrix> {
        match self.blobs.features(id) {
            Err(IndexError::NotFound(_)) => Err(EngineError::NotFound(format!(
                "image {id} has no stored features"
            ))),
            other => Ok(other?),
        }
    }

    /// The JPEG thumbnail of `id`: [`EngineError::NotFound`] when there is no such image or it
    /// has no thumbnail.
    pub fn thumbnail(&self, id: ImageId) -> Result<Vec<u8>> {
        if !self.read()?.contains(id)? {
            return Err(EngineError::NotFound(format!("no image with id {id}")));
        }
        match self.blobs.thumbnail(id) {
            Err(IndexError::NotFound(_)) => Err(EngineError::NotFound(format!(
                "image {id} has no thumbnail"
            ))),
            other => Ok(other?),
        }
    }

    /// Number of images.
    pub fn len(&self) -> Result<u64> {
        Ok(self.read()?.len()?)
    }

    /// Whether the collection has no images.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Counts and bytes on disk (walks the blob directories).
    pub fn stats(&self) -> Result<CollectionStats> {
        let store = self.read()?.stats()?;
        let (features_bytes, thumbs_bytes) = self.blobs.bytes_on_disk()?;
        Ok(CollectionStats {
            store,
            features_bytes,
            thumbs_bytes,
        })
    }

    /// Makes everything written so far durable and searchable.
    pub fn commit(&self) -> Result<()> {
        Ok(self.write()?.commit()?)
    }

    /// Stores new images: their blobs, then their records in one write (each under its
    /// `keep_id` when given, which must be reserved; else a fresh id), removing the images they
    /// replace (a flagged one is audited as deleted by `actor`). Returns their ids. When the
    /// write fails, no record of the batch is left without its blobs, and blobs of records not
    /// written go.
    pub(crate) fn put_images(
        &self,
        images: Vec<NewImage<'_>>,
        actor: &str,
    ) -> Result<Vec<ImageId>> {
        let info = self.info()?;
        for f in images.iter().filter_map(|i| i.features) {
            if (f.rows, f.cols) != (info.vit_tokens, info.vit_hidden) {
                return Err(EngineError::Internal(format!(
                    "features are {}x{}, the collection stores {}x{}",
                    f.rows, f.cols, info.vit_tokens, info.vit_hidden
                )));
            }
        }
        let fresh: Vec<&str> = images
            .iter()
            .filter(|i| i.keep_id.is_none())
            .map(|i| i.record.content_hash.as_str())
            .collect();
        let mut allocated = self.write()?.allocate_ids(&fresh)?.into_iter();
        let mut records = Vec::with_capacity(images.len());
        let mut replaced = Vec::new();
        for image in &images {
            let mut record = image.record.clone();
            record.id = match image.keep_id {
                Some(id) => id,
                None => allocated.next().ok_or_else(|| {
                    EngineError::Internal("the store allocated too few ids".into())
                })?,
            };
            records.push(record);
            replaced.extend(image.replaces);
        }
        let ids: Vec<ImageId> = records.iter().map(|r| r.id).collect();
        let written = images
            .iter()
            .zip(&ids)
            .try_for_each(|(image, &id)| self.blobs.put(id, image.features, image.thumbnail));
        let mut gone = Vec::new();
        let stored = written.map_err(EngineError::from).and_then(|()| {
            let mut store = self.write()?;
            for &old in &replaced {
                gone.extend(store.delete(old)?);
            }
            store.insert_all(records)?;
            Ok::<_, EngineError>(())
        });
        let audited = self.audit_deleted(&gone, actor, "its file changed");
        if let Err(e) = stored {
            let store = self.read()?;
            for &id in &ids {
                if !store.contains(id).unwrap_or(true) {
                    let _ = self.blobs.remove(id);
                }
            }
            return Err(e);
        }
        audited?;
        for old in replaced {
            self.blobs.remove(old)?;
        }
        Ok(ids)
    }

    /// Leaves content `hash` out of folder scans (see [`Engine::remove`]).
    pub(crate) fn exclude(&self, hash: &str, path: &str) -> Result<()> {
        Ok(self.write()?.exclude(hash, path)?)
    }

    /// Replaces the record of an existing image (texts, mtime); not its vector.
    pub(crate) fn update(&self, record: &ImageRecord) -> Result<()> {
        Ok(self.write()?.update(record)?)
    }

    /// Removes images without touching uploads' serialisation (the caller holds what it
    /// needs); returns the records removed. Not committed. The removal of a flagged image is
    /// audited, by `actor`, with `reason`.
    pub(crate) fn delete_records(
        &self,
        ids: &[ImageId],
        actor: &str,
        reason: &str,
    ) -> Result<Vec<ImageRecord>> {
        let mut removed = Vec::with_capacity(ids.len());
        let deleted = (|| {
            let mut store = self.write()?;
            for &id in ids {
                if let Some(r) = store.delete(id)? {
                    removed.push(r);
                }
            }
            Ok::<_, EngineError>(())
        })();
        // What was removed is audited even when a later removal failed.
        self.audit_deleted(&removed, actor, reason)?;
        deleted?;
        for r in &removed {
            self.blobs.remove(r.id)?;
        }
        Ok(removed)
    }

    /// Audits the removal of the flagged ones of `records`.
    fn audit_deleted(&self, records: &[ImageRecord], actor: &str, reason: &str) -> Result<()> {
        let events: Vec<AuditEvent> = records
            .iter()
            .filter(|r| !r.flags.is_empty())
            .map(|r| {
                let mut d = serde_json::Map::new();
                d.insert("id".into(), r.id.0.into());
                d.insert("path".into(), r.path.clone().into());
                d.insert("content_hash".into(), r.content_hash.clone().into());
                d.insert("reason".into(), reason.into());
                d.insert(
                    "flags".into(),
                    serde_json::to_value(&r.flags).unwrap_or_default(),
                );
                AuditEvent::new("delete", d)
            })
            .collect();
        self.audit_events(actor, events)?;
        Ok(())
    }

    /// Removes every target (ids or file paths), or none: an unknown target is an
    /// [`EngineError::NotFound`] naming every unknown one, and nothing is removed. Uploaded files
    /// of removed images go too; the removal of a flagged image is audited as `actor`'s.
    /// Returns how many were removed.
    pub fn remove_all(&self, targets: &[Target], actor: &str) -> Result<usize> {
        let mut ids = Vec::new();
        let mut unknown = Vec::new();
        {
            let store = self.read()?;
            for t in targets {
                let id = match t {
                    Target::Id(id) => Some(*id).filter(|id| store.contains(*id).unwrap_or(false)),
                    Target::Path(p) => {
                        let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
                        store.by_path(&p.display().to_string())?
                    }
                };
                match id {
                    Some(id) if !ids.contains(&id) => ids.push(id),
                    Some(_) => {}
                    None => unknown.push(match t {
                        Target::Id(id) => id.to_string(),
                        Target::Path(p) => p.display().to_string(),
                    }),
                }
            }
        }
        if !unknown.is_empty() {
            return Err(EngineError::NotFound(format!(
                "no such image in {}: {}; nothing was removed",
                self.dir.display(),
                unknown.join(", ")
            )));
        }
        let mut removed = 0;
        for id in ids {
            removed += self.remove(id, actor)? as usize;
        }
        Ok(removed)
    }

    /// Whether other processes may write the collection at the same time (a shared store).
    pub fn shared(&self) -> Result<bool> {
        Ok(self.read()?.shared())
    }

    /// Searches by a text query.
    pub fn search_text<M: Encoders + ?Sized>(
        &self,
        models: &M,
        query: &str,
        params: &SearchParams,
    ) -> Result<SearchResults> {
        Searcher::new(&self.store, &self.blobs, models).search_text(query, params)
    }

    /// Searches by an image (vectors only: ITM needs a text).
    pub fn search_image<M: Encoders + ?Sized>(
        &self,
        models: &M,
        image: &DynamicImage,
        params: &SearchParams,
    ) -> Result<SearchResults> {
        Searcher::new(&self.store, &self.blobs, models).search_image(image, params)
    }

    /// Searches by an indexed image ([`EngineError::NotFound`] when there is none).
    pub fn search_similar<M: Encoders + ?Sized>(
        &self,
        models: &M,
        id: ImageId,
        params: &SearchParams,
    ) -> Result<SearchResults> {
        Searcher::new(&self.store, &self.blobs, models).search_similar(id, params)
    }

    /// Near-duplicate groups (see [`super::duplicates`]).
    pub fn duplicates(&self, threshold: f32) -> Result<Vec<super::duplicates::DuplicateGroup>> {
        super::duplicates::near_duplicates(&**self.read()?, threshold)
    }
}

/// `index` -> `index.<suffix>` in the same parent folder.
pub(super) fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "index".into());
    dir.with_file_name(format!("{name}.{suffix}"))
}
