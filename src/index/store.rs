//! [`Store`]: what the engine needs from a record store, whatever holds it. The embedded
//! [`super::Collection`] (sled + hnsw_rs + tantivy in one directory) implements it, and so does
//! [`super::MilvusStore`] (a Milvus collection that many processes share). Blobs (rerank
//! features, thumbnails) are not part of it: they live in a [`super::BlobStore`] beside any
//! store.
//!
//! `tests/store.rs` runs one suite against every implementation.

use std::collections::BTreeMap;

use serde::Serialize;

use super::attributes::{Product, Schema};
use super::error::Result;
use super::filter::Filter;
use super::id::ImageId;
use super::moderation::{ListEntry, ListInfo};
use super::pdq::Pdq;
use super::record::{CollectionInfo, ImageRecord};

/// Records with their ITC vector, texts and filterable fields; vector and BM25 top-k with a
/// filter; lookups by id, path and content hash; commit; counts.
///
/// Ids are allocated by the store ([`Store::allocate_id`]) and an id never names two contents.
/// The embedded store counts, and never gives an id twice; a shared store derives the id from
/// the content hash, so that processes agree without a coordinator (the same content gets the
/// same id). Writes are visible to searches at once (text search: after [`Store::commit`]) and
/// durable after [`Store::commit`]; [`Store::delete`] is durable on return.
///
/// # Example
/// One image written and found again through the trait alone, here in the embedded
/// [`super::Collection`] (4-dimensional vectors to keep it short; BLIP's are 256):
///
/// ```
/// use blipsearch::index::{
///     content_hash, Caption, CaptionSource, Collection, CollectionInfo, Filter, HnswParams,
///     ImageRecord, Store,
/// };
///
/// # fn main() -> blipsearch::index::Result<()> {
/// let dir = tempfile::tempdir()?;
/// let info = CollectionInfo::new("Salesforce/blip-itm-base-coco", None, 4, 1, 1);
/// let collection = Collection::open(dir.path(), &info, HnswParams::default())?;
/// let mut store: Box<dyn Store> = Box::new(collection);
///
/// let bytes = b"the image file's bytes";
/// let hash = content_hash(bytes);
/// let id = store.allocate_id(&hash)?;
/// store.insert(ImageRecord {
///     id,
///     path: "/photos/red-car.jpg".into(),
///     content_hash: hash,
///     size_bytes: bytes.len() as u64,
///     width: 640,
///     height: 480,
///     mtime_unix: 0,
///     exif_date: None,
///     itc: vec![0.0, 1.0, 0.0, 0.0],
///     captions: vec![Caption {
///         text: "a red car parked on a street".into(),
///         source: CaptionSource::Given,
///         p_match: None,
///         kept: true,
///     }],
///     given_texts: Vec::new(),
///     added_unix: 0,
///     product: None,
///     pdq: None,
///     flags: Vec::new(),
/// })?;
/// store.commit()?;
///
/// let everything = Filter::default();
/// let by_vector = store.vector_search(&[0.0, 1.0, 0.0, 0.0], 5, None, &everything)?;
/// assert_eq!(by_vector[0].0, id);
/// assert!((by_vector[0].1 - 1.0).abs() < 1e-6, "cosine of a vector with itself");
/// assert_eq!(store.text_search("red car", 5, &everything)?[0].0, id);
/// assert_eq!(store.by_path("/photos/red-car.jpg")?, Some(id));
/// # Ok(())
/// # }
/// ```
pub trait Store: Send + Sync {
    /// What the collection was built with.
    fn info(&self) -> &CollectionInfo;
    /// Checks that models described by `requested` can serve this collection
    /// ([`super::IndexError::Incompatible`] otherwise), then records where they are and their
    /// fingerprint, so that a copy of the same weights elsewhere is found next time.
    fn adopt_models(&mut self, requested: &CollectionInfo) -> Result<()>;
    /// Records the types of product attributes: new names are added, a known name must keep
    /// its type ([`super::IndexError::InvalidParams`] otherwise, changing nothing). Durable on
    /// return; [`Store::info`] shows them.
    fn extend_schema(&mut self, attributes: &Schema) -> Result<()>;
    /// An id for new content `content_hash`, never given to other content.
    fn allocate_id(&mut self, content_hash: &str) -> Result<ImageId>;
    /// [`Store::allocate_id`] for each of `content_hashes`, in order (one round trip where the
    /// store is remote).
    fn allocate_ids(&mut self, content_hashes: &[&str]) -> Result<Vec<ImageId>> {
        content_hashes.iter().map(|h| self.allocate_id(h)).collect()
    }
    /// The id the next [`Store::allocate_id`] gives, for a store that counts; `None` for a store
    /// whose ids derive from content.
    fn next_id(&self) -> Result<Option<ImageId>>;
    /// Keeps every id below `floor` from being allocated, so that records can be inserted under
    /// ids they had elsewhere (a rebuilt collection keeps every id). Nothing to do for a store
    /// whose ids derive from content.
    fn reserve_ids(&mut self, floor: ImageId) -> Result<()>;
    /// Stores a new record under `record.id`, which must be allocated or reserved and free.
    /// Fails with [`super::IndexError::AlreadyExists`] for a known path or content hash, before
    /// writing anything.
    fn insert(&mut self, record: ImageRecord) -> Result<()>;
    /// [`Store::insert`] for each of `records`, in order (one round trip where the store is
    /// remote). On an error, the records before the failing one may be stored.
    fn insert_all(&mut self, records: Vec<ImageRecord>) -> Result<()> {
        records.into_iter().try_for_each(|r| self.insert(r))
    }
    /// Replaces the record of an existing image (texts, path, dates); its ITC vector cannot
    /// change.
    fn update(&mut self, record: &ImageRecord) -> Result<()>;
    /// [`Store::update`] of each of `records`, in one write where the store can (the embedded
    /// store: one transaction). On an error, the records before the failing one may be
    /// updated.
    fn update_all(&mut self, records: &[ImageRecord]) -> Result<()> {
        records.iter().try_for_each(|r| self.update(r))
    }
    /// Removes an image, durably; returns its record if it existed. Its id never comes back.
    fn delete(&mut self, id: ImageId) -> Result<Option<ImageRecord>>;
    /// Makes every write so far durable and visible to every search.
    fn commit(&mut self) -> Result<()>;
    /// Makes every write so far durable, without the work of a commit where the store can
    /// (the embedded store writes its records to disk and leaves its derived indexes to the
    /// next commit, or to the recovery at the next open). Text search may not see updated
    /// texts until the next [`Store::commit`].
    fn flush(&mut self) -> Result<()> {
        self.commit()
    }
    /// The `k` nearest images to a unit ITC vector as `(id, cosine)`, best first, among those
    /// passing `filter` (`k` results whenever `k` pass). `ef` is a recall/speed hint.
    fn vector_search(
        &self,
        query: &[f32],
        k: usize,
        ef: Option<usize>,
        filter: &Filter,
    ) -> Result<Vec<(ImageId, f32)>>;
    /// The `k` best images for a user text query (BM25 over kept captions, given texts, the
    /// title and description of the image's product, a title weighing more than a description,
    /// and file names) as `(id, score)`, best first, among those passing `filter`. A query past
    /// the parser's bounds is [`super::IndexError::InvalidQuery`].
    fn text_search(&self, query: &str, k: usize, filter: &Filter) -> Result<Vec<(ImageId, f32)>>;
    /// The record of `id`.
    fn get(&self, id: ImageId) -> Result<Option<ImageRecord>>;
    /// The product of each of `ids`, in order (`None`: no product, or no such image): what
    /// facets and grouping read for a result set.
    fn products_of(&self, ids: &[ImageId]) -> Result<Vec<Option<Product>>> {
        ids.iter()
            .map(|&id| Ok(self.get(id)?.and_then(|r| r.product)))
            .collect()
    }
    /// The ids of the images of each of `products` (of every product when `None`), in id
    /// order; a product without images is left out.
    fn product_images(
        &self,
        products: Option<&[String]>,
    ) -> Result<BTreeMap<String, Vec<ImageId>>> {
        let mut out: BTreeMap<String, Vec<ImageId>> = BTreeMap::new();
        self.for_each(&mut |r| {
            if let Some(p) = r.product {
                if products.is_none_or(|want| want.contains(&p.id)) {
                    out.entry(p.id).or_default().push(r.id);
                }
            }
            Ok(())
        })?;
        Ok(out)
    }
    /// The id stored for a canonical path.
    fn by_path(&self, path: &str) -> Result<Option<ImageId>>;
    /// The id stored for a content hash.
    fn by_hash(&self, hash: &str) -> Result<Option<ImageId>>;
    /// Whether `id` is stored.
    fn contains(&self, id: ImageId) -> Result<bool>;
    /// Ids and paths of the images whose path starts with `prefix`, in path order.
    fn under(&self, prefix: &str) -> Result<Vec<(ImageId, String)>>;
    /// Remembers that the content `hash` (last at `path`) was removed on purpose, so that folder
    /// scans leave it out. Durable on return.
    fn exclude(&mut self, hash: &str, path: &str) -> Result<()>;
    /// Whether content `hash` was removed on purpose.
    fn is_excluded(&self, hash: &str) -> Result<bool>;
    /// Forgets the exclusion of content `hash`; returns whether there was one.
    fn include(&mut self, hash: &str) -> Result<bool>;
    /// Every exclusion as (content hash, last path).
    fn exclusions(&self) -> Result<Vec<(String, String)>>;
    /// Calls `f` with every record, in id order.
    fn for_each(&self, f: &mut dyn FnMut(ImageRecord) -> Result<()>) -> Result<()>;
    /// Number of images.
    fn len(&self) -> Result<u64>;
    /// Whether there are none.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
    /// The ids of the images passing `filter`, in id order: the first `limit` of them. A filter
    /// that [`Filter::check`] refuses is [`super::IndexError::InvalidFilter`].
    fn matching(&self, filter: &Filter, limit: usize) -> Result<Vec<ImageId>>;
    /// The PDQ hash of every image that has one, in id order.
    fn pdq_hashes(&self) -> Result<Vec<(ImageId, Pdq)>> {
        let mut out = Vec::new();
        self.for_each(&mut |r| {
            if let Some(p) = r.pdq {
                out.push((r.id, p));
            }
            Ok(())
        })?;
        Ok(out)
    }
    /// Creates an empty match list ([`super::IndexError::ListExists`] if there is one of that
    /// name). The name must pass [`super::check_list_name`]. Durable on return.
    fn create_list(&mut self, name: &str) -> Result<ListInfo>;
    /// Removes a match list and all its entries; returns it, or `None` if there was none.
    /// Durable on return.
    fn delete_list(&mut self, name: &str) -> Result<Option<ListInfo>>;
    /// Every match list, by name.
    fn lists(&self) -> Result<Vec<ListInfo>>;
    /// Stores `entries` in their lists ([`ListEntry::list`], which must exist:
    /// [`super::IndexError::NoList`] otherwise, writing nothing); an entry with the id of a stored
    /// one replaces it (within `entries` too: the last one stays). An entry that
    /// [`super::check_entry`] refuses is refused with its error, writing nothing. Durable on
    /// return.
    fn add_entries(&mut self, entries: &[ListEntry]) -> Result<()>;
    /// Removes entry `id` of `list`; returns it, or `None` if there was none
    /// ([`super::IndexError::NoList`] if there is no such list). Durable on return.
    fn remove_entry(&mut self, list: &str, id: u64) -> Result<Option<ListEntry>>;
    /// The entries of `list` (of every list when `None`), by list then id
    /// ([`super::IndexError::NoList`] if there is no such list).
    fn entries(&self, list: Option<&str>) -> Result<Vec<ListEntry>>;
    /// Counts and bytes on disk.
    fn stats(&self) -> Result<StoreStats>;
    /// Whether other processes may write this store at the same time: then nothing local (blob
    /// files, uploads) may be swept as unowned, since another process may be about to own it.
    fn shared(&self) -> bool {
        false
    }
}

/// Counts and disk usage of a store.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoreStats {
    /// Images (the truth).
    pub images: u64,
    /// Live vectors in the vector index.
    pub vectors: usize,
    /// Removed vectors still in the graph (until the next compaction).
    pub tombstones: usize,
    /// Committed documents in the text index.
    pub text_docs: u64,
    /// Ids changed since the last commit.
    pub pending: usize,
    /// Last committed generation.
    pub generation: u64,
    /// Bytes on disk per part, by name.
    pub bytes: BTreeMap<&'static str, u64>,
}
