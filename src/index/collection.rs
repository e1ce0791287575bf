//! [`Collection`], the embedded [`Store`]: sled, the HNSW graph, tantivy and the filter columns
//! of one collection directory, kept consistent through commits and crashes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::attributes::{merge_schema, Product, Schema};
use super::error::{IndexError, Result};
use super::filter::{Columns, Filter, IdSet};
use super::id::ImageId;
use super::lock::DirLock;
use super::meta::MetaStore;
use super::moderation::{check_entry, check_list_name, ListEntry, ListInfo};
use super::pdq::Pdq;
use super::record::{CollectionInfo, CommitState, ImageRecord};
use super::store::{Store, StoreStats};
use super::text::TextIndex;
use super::vectors::{HnswParams, VectorIndex};

/// Batch size when rebuilding the vector index from sled.
const REBUILD_CHUNK: usize = 10_000;

/// What [`Collection::open`] found and did to bring the derived indexes in step with sled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Journal entries (changes after the last commit) replayed into the derived indexes.
    pub replayed: usize,
    /// The vector index was rebuilt from sled (dump missing, corrupt or of another generation).
    pub rebuilt_vectors: bool,
    /// The text index was rebuilt from sled.
    pub rebuilt_text: bool,
}

/// The embedded [`Store`]: sled, the HNSW graph, tantivy and in-memory filter columns under one
/// directory, one writer at a time.
///
/// # Consistency
/// sled is the source of truth; the HNSW graph and the tantivy index are derived from it and
/// carry the generation of the commit they reflect. Every mutation is written to sled first (in
/// one transaction with a journal entry for its id), then applied to the derived indexes in
/// memory. [`Store::commit`] makes the derived indexes durable first (tantivy commit, HNSW
/// dump) tagged with the next generation, and only then records that generation in sled and
/// clears the journal. On open, each derived index whose generation equals sled's replays the
/// journal; one that is missing, unreadable or of another generation is rebuilt from sled. So a
/// crash at any point loses at most uncommitted work that sled never made durable, and never
/// leaves the indexes disagreeing with sled. The filter columns are built from sled at open.
///
/// Visibility: removals are hidden from both searches at once; additions and caption updates
/// reach vector search at once and text search at the next commit.
pub struct Collection {
    dir: PathBuf,
    info: CollectionInfo,
    meta: MetaStore,
    vectors: VectorIndex,
    text: TextIndex,
    columns: Columns,
    /// The last filter's ids: the two searches of one query, and the pages of one result list,
    /// ask for the same filter. Cleared by every write.
    last_selection: std::sync::Mutex<Option<(Filter, Arc<IdSet>)>>,
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
    /// [`Store::info`] to load them). [`IndexError::NoCollection`] if `dir` has none.
    pub fn open_existing(dir: &Path, params: HnswParams) -> Result<Self> {
        if !Self::exists(dir) {
            return Err(IndexError::NoCollection(dir.to_path_buf()));
        }
        Self::open_inner(dir, None, params)
    }

    /// Whether `dir` holds a collection.
    pub fn exists(dir: &Path) -> bool {
        dir.join("meta").is_dir()
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
        let mut collection = Collection {
            dir: dir.to_path_buf(),
            info,
            meta,
            vectors,
            text,
            columns: Columns::default(),
            last_selection: std::sync::Mutex::new(None),
            recovery: Recovery::default(),
            removed_since_commit: Default::default(),
            _lock: lock,
        };
        collection.recovery = collection.recover()?;
        for record in collection.meta.iter() {
            collection.columns.upsert(&record?);
        }
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
                }
            }
        }
        recovery.replayed = pending.len();
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

    /// What opening this collection had to repair.
    pub fn last_recovery(&self) -> Recovery {
        self.recovery
    }

    /// The collection directory.
    pub fn dir(&self) -> &Path {
        &self.dir
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

    /// The ids passing `filter`, or `None` when it filters nothing.
    fn selection(&self, filter: &Filter) -> Result<Option<Arc<IdSet>>> {
        if filter.is_empty() {
            return Ok(None);
        }
        filter.check()?;
        let mut last = self
            .last_selection
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((f, set)) = last.as_ref() {
            if f == filter {
                return Ok(Some(set.clone()));
            }
        }
        let set = Arc::new(self.columns.select(filter));
        *last = Some((filter.clone(), set.clone()));
        Ok(Some(set))
    }

    /// Forgets the cached selection: the columns changed.
    fn columns_changed(&mut self) {
        *self
            .last_selection
            .get_mut()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Store for Collection {
    /// From the filter columns: the passing ids' bit set, read in order.
    fn matching(&self, filter: &Filter, limit: usize) -> Result<Vec<ImageId>> {
        Ok(match self.selection(filter)? {
            None => {
                let mut ids = self.columns.ids();
                ids.truncate(limit);
                ids
            }
            Some(set) => set.iter().take(limit).map(ImageId).collect(),
        })
    }

    /// From the filter columns, without reading a record.
    fn pdq_hashes(&self) -> Result<Vec<(ImageId, Pdq)>> {
        Ok(self.columns.pdq_hashes())
    }

    fn create_list(&mut self, name: &str) -> Result<ListInfo> {
        check_list_name(name)?;
        self.meta.create_list(name)
    }

    fn delete_list(&mut self, name: &str) -> Result<Option<ListInfo>> {
        self.meta.delete_list(name)
    }

    fn lists(&self) -> Result<Vec<ListInfo>> {
        self.meta.lists()
    }

    fn add_entries(&mut self, entries: &[ListEntry]) -> Result<()> {
        for e in entries {
            check_entry(e, self.info.embedding_dim)?;
        }
        self.meta.put_entries(entries)
    }

    fn remove_entry(&mut self, list: &str, id: u64) -> Result<Option<ListEntry>> {
        self.meta.remove_entry(list, id)
    }

    fn entries(&self, list: Option<&str>) -> Result<Vec<ListEntry>> {
        self.meta.entries(list)
    }

    fn info(&self) -> &CollectionInfo {
        &self.info
    }

    fn adopt_models(&mut self, requested: &CollectionInfo) -> Result<()> {
        let info = self.info.adopting(requested, &self.dir)?;
        if info != self.info {
            self.meta.set_info(&info)?;
            self.info = info;
        }
        Ok(())
    }

    fn extend_schema(&mut self, attributes: &Schema) -> Result<()> {
        let mut info = self.info.clone();
        merge_schema(&mut info.attributes, attributes)?;
        if info != self.info {
            self.meta.set_info(&info)?;
            self.info = info;
        }
        Ok(())
    }

    fn products_of(&self, ids: &[ImageId]) -> Result<Vec<Option<Product>>> {
        Ok(ids
            .iter()
            .map(|&id| self.columns.product(id).map(|p| Product::clone(p)))
            .collect())
    }

    fn product_images(
        &self,
        products: Option<&[String]>,
    ) -> Result<BTreeMap<String, Vec<ImageId>>> {
        Ok(self.columns.product_images(products))
    }

    fn allocate_id(&mut self, _content_hash: &str) -> Result<ImageId> {
        self.meta.allocate_id()
    }

    fn next_id(&self) -> Result<Option<ImageId>> {
        self.meta.next_id().map(Some)
    }

    fn reserve_ids(&mut self, floor: ImageId) -> Result<()> {
        self.meta.reserve_ids(floor)
    }

    fn insert(&mut self, record: ImageRecord) -> Result<()> {
        self.vectors.check(&record.itc)?;
        let next = self.meta.next_id()?;
        if record.id >= next {
            return Err(IndexError::InvalidParams(format!(
                "id {} was never allocated (next id {next})",
                record.id
            )));
        }
        if self.columns.contains(record.id) {
            return Err(IndexError::DuplicateId(record.id));
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
        self.meta.insert(&record)?;
        self.vectors.insert(record.id, &record.itc)?;
        self.text.upsert(&record)?;
        self.columns.upsert(&record);
        self.columns_changed();
        Ok(())
    }

    fn update(&mut self, record: &ImageRecord) -> Result<()> {
        self.update_all(std::slice::from_ref(record))
    }

    fn update_all(&mut self, records: &[ImageRecord]) -> Result<()> {
        for record in records {
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
        }
        // One sled transaction: a log write per batch, not per record.
        self.meta.update_all(records)?;
        for record in records {
            self.columns.upsert(record);
            self.text.upsert(record)?;
        }
        self.columns_changed();
        Ok(())
    }

    fn delete(&mut self, id: ImageId) -> Result<Option<ImageRecord>> {
        let Some(record) = self.meta.remove(id)? else {
            return Ok(None);
        };
        // Durable before the caller removes the image's blobs, or a crash could resurrect a
        // record whose features are gone.
        self.meta.flush()?;
        self.vectors.remove(id);
        self.text.delete(id);
        self.columns.remove(id);
        self.columns_changed();
        self.removed_since_commit.insert(id);
        Ok(Some(record))
    }

    /// Derived indexes first (tantivy commit, HNSW dump, both tagged with the next generation;
    /// the graph is compacted first when tombstones pass [`HnswParams::compact_fraction`]), then
    /// the generation is recorded in sled and the journal cleared. A no-op when nothing changed.
    fn commit(&mut self) -> Result<()> {
        let state = self.meta.commit_state()?;
        let pending = self.meta.pending()?;
        if !pending.is_empty() {
            self.commit_generation(state.generation + 1, &pending)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        // sled holds the truth and the journal of changed ids: the derived indexes catch up
        // from it at the next commit, or when the collection is opened again.
        self.meta.flush()
    }

    fn vector_search(
        &self,
        query: &[f32],
        k: usize,
        ef: Option<usize>,
        filter: &Filter,
    ) -> Result<Vec<(ImageId, f32)>> {
        match self.selection(filter)? {
            None => self.vectors.search(query, k, ef, None),
            Some(set) => {
                let allowed = |id: ImageId| set.contains(id.0);
                self.vectors.search(query, k, ef, Some(&allowed))
            }
        }
    }

    fn text_search(&self, query: &str, k: usize, filter: &Filter) -> Result<Vec<(ImageId, f32)>> {
        let set = self.selection(filter)?;
        let removed = &self.removed_since_commit;
        if set.is_none() && removed.is_empty() {
            return self.text.search(query, k);
        }
        let removed: Arc<std::collections::HashSet<u64>> =
            Arc::new(removed.iter().map(|id| id.0).collect());
        let allowed =
            move |id: u64| !removed.contains(&id) && set.as_ref().is_none_or(|s| s.contains(id));
        self.text.search_where(query, k, Some(Arc::new(allowed)))
    }

    fn get(&self, id: ImageId) -> Result<Option<ImageRecord>> {
        self.meta.get(id)
    }

    fn by_path(&self, path: &str) -> Result<Option<ImageId>> {
        self.meta.by_path(path)
    }

    fn by_hash(&self, hash: &str) -> Result<Option<ImageId>> {
        self.meta.by_hash(hash)
    }

    fn contains(&self, id: ImageId) -> Result<bool> {
        Ok(self.columns.contains(id))
    }

    fn under(&self, prefix: &str) -> Result<Vec<(ImageId, String)>> {
        Ok(self.columns.under(prefix))
    }

    fn exclude(&mut self, hash: &str, path: &str) -> Result<()> {
        self.meta.exclude(hash, path)
    }

    fn is_excluded(&self, hash: &str) -> Result<bool> {
        self.meta.is_excluded(hash)
    }

    fn include(&mut self, hash: &str) -> Result<bool> {
        self.meta.include(hash)
    }

    fn exclusions(&self) -> Result<Vec<(String, String)>> {
        self.meta.exclusions()
    }

    fn for_each(&self, f: &mut dyn FnMut(ImageRecord) -> Result<()>) -> Result<()> {
        for record in self.meta.iter() {
            f(record?)?;
        }
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        self.meta.count()
    }

    fn stats(&self) -> Result<StoreStats> {
        let state = self.meta.commit_state()?;
        Ok(StoreStats {
            images: self.meta.count()?,
            vectors: self.vectors.len(),
            tombstones: self.vectors.tombstones(),
            text_docs: self.text.num_docs(),
            pending: self.meta.pending()?.len(),
            generation: state.generation,
            bytes: [
                ("meta", self.meta.size_on_disk()?),
                ("vectors", self.vectors.bytes_on_disk()?),
                ("text", self.text.bytes_on_disk()?),
            ]
            .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::testutil::Rng;
    use crate::index::*;
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
            product: None,
            pdq: None,
            flags: Vec::new(),
        }
    }

    fn open(dir: &Path) -> Collection {
        Collection::open(dir, &info(), HnswParams::default()).unwrap()
    }

    /// Inserts `record` under a fresh id.
    fn add(c: &mut Collection, mut record: ImageRecord) -> Result<ImageId> {
        record.id = c.allocate_id(&record.content_hash)?;
        let id = record.id;
        c.insert(record)?;
        Ok(id)
    }

    fn all() -> Filter {
        Filter::default()
    }

    fn removed(c: &mut Collection, id: ImageId) -> bool {
        c.delete(id).unwrap().is_some()
    }

    /// sled, HNSW and tantivy agree on the number of images.
    fn assert_consistent(c: &Collection) {
        let s = c.stats().unwrap();
        assert_eq!(s.images as usize, s.vectors, "{s:?}");
        assert_eq!(s.images, s.text_docs, "{s:?}");
        let mut n = 0;
        c.for_each(&mut |_| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(s.images as usize, n);
    }

    type Snapshot = (Vec<Vec<(ImageId, f32)>>, Vec<Vec<(ImageId, f32)>>);

    fn snapshot(c: &Collection, queries: &[Vec<f32>]) -> Snapshot {
        let vec_hits = queries
            .iter()
            .map(|q| c.vector_search(q, 10, None, &all()).unwrap())
            .collect();
        let text_hits = WORDS
            .iter()
            .map(|w| c.text_search(w, 10, &all()).unwrap())
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
                ids.push(add(&mut c, record(n, &mut rng)).unwrap());
            }
            c.commit().unwrap();
            assert_eq!(c.stats().unwrap().generation, 1);
            c.commit().unwrap();
            assert_eq!(c.stats().unwrap().generation, 1, "empty commit is a no-op");
            assert_consistent(&c);
            let s = snapshot(&c, &queries);
            assert!(s.0.iter().all(|h| h.len() == 10) && s.1.iter().all(|h| h.len() == 10));
            s
        };

        // Reopen: identical answers, nothing to recover.
        let mut c = open(&dir);
        assert_eq!(c.last_recovery(), Recovery::default());
        assert_eq!(snapshot(&c, &queries), before);
        let rec = c.get(ids[3]).unwrap().unwrap();
        assert_eq!(rec.id, ids[3]);
        assert_eq!(c.by_path(&rec.path).unwrap(), Some(ids[3]));
        assert_eq!(c.by_hash(&rec.content_hash).unwrap(), Some(ids[3]));

        // Delete 20: they never come back.
        let deleted: Vec<ImageId> = ids.iter().copied().step_by(10).collect();
        for id in &deleted {
            assert!(removed(&mut c, *id));
            assert!(!removed(&mut c, *id));
        }
        let gone = |c: &Collection| {
            for id in &deleted {
                assert!(c.get(*id).unwrap().is_none());
                assert!(!c.contains(*id).unwrap());
            }
            for q in &queries {
                let hits = c.vector_search(q, 200, None, &all()).unwrap();
                assert_eq!(hits.len(), 180);
                assert!(hits.iter().all(|h| !deleted.contains(&h.0)));
            }
            for w in WORDS {
                let hits = c.text_search(w, 200, &all()).unwrap();
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
            let added = add(&mut c, record(1000, &mut rng)).unwrap();
            let gone = ids[1];
            assert!(removed(&mut c, gone));
            (added, gone)
        };
        let c = open(&dir);
        assert_eq!(c.last_recovery().replayed, 2);
        assert_consistent(&c);
        assert_eq!(c.text_search("number1000", 5, &all()).unwrap()[0].0, added);
        let rec = c.get(added).unwrap().unwrap();
        assert_eq!(
            c.vector_search(&rec.itc, 1, None, &all()).unwrap()[0].0,
            added
        );
        assert!(c.get(removed).unwrap().is_none());
        assert!(c
            .vector_search(&rec.itc, 300, None, &all())
            .unwrap()
            .iter()
            .all(|h| h.0 != removed));
        drop(c);

        let c = open(&dir);
        assert_consistent(&c);
        let s = c.stats().unwrap();
        // ids[1]'s tombstone stays until compaction (20% of the graph).
        assert_eq!((s.images, s.pending, s.tombstones), (180, 0, 1));
        assert!(s.bytes.iter().all(|(_, b)| *b > 0), "{:?}", s.bytes);
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
        let id = add(&mut c, first.clone()).unwrap();

        let mut dup_path = record(2, &mut rng);
        dup_path.path = first.path.clone();
        let mut dup_hash = record(3, &mut rng);
        dup_hash.content_hash = first.content_hash.clone();
        let mut bad_vec = record(4, &mut rng);
        bad_vec.itc = vec![0.0; DIM];
        let mut short_vec = record(5, &mut rng);
        short_vec.itc.pop();
        assert!(matches!(
            add(&mut c, dup_path),
            Err(IndexError::AlreadyExists { existing, .. }) if existing == id
        ));
        assert!(matches!(
            add(&mut c, dup_hash),
            Err(IndexError::AlreadyExists {
                kind: "content hash",
                ..
            })
        ));
        assert!(add(&mut c, bad_vec).is_err());
        assert!(add(&mut c, short_vec).is_err());
        // An id never allocated, and one taken.
        let mut unallocated = record(6, &mut rng);
        unallocated.id = ImageId(1_000_000);
        assert!(matches!(
            c.insert(unallocated),
            Err(IndexError::InvalidParams(_))
        ));
        let mut taken = record(7, &mut rng);
        taken.id = id;
        assert!(matches!(c.insert(taken), Err(IndexError::DuplicateId(_))));
        c.commit().unwrap();
        assert_eq!(c.len().unwrap(), 1);
        assert_consistent(&c);
    }

    #[test]
    fn update_reindexes_text_but_not_vectors() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = open(tmp.path());
        let mut rng = Rng::new(6);
        let id = add(&mut c, record(1, &mut rng)).unwrap();
        c.commit().unwrap();
        let mut rec = c.get(id).unwrap().unwrap();
        rec.given_texts.push("grandma's birthday".into());
        rec.captions[0].kept = false;
        c.update(&rec).unwrap();
        c.commit().unwrap();
        assert_eq!(c.text_search("birthday", 5, &all()).unwrap()[0].0, id);
        assert!(c.text_search("number1", 5, &all()).unwrap().is_empty());
        rec.itc[0] += 0.5;
        assert!(matches!(c.update(&rec), Err(IndexError::InvalidParams(_))));
        assert_consistent(&c);
    }

    /// A collection whose `text/` was made before the product fields (same generation as sled,
    /// same count) has it rebuilt at open, so product titles become searchable.
    #[test]
    fn a_text_index_without_product_fields_is_rebuilt_from_sled() {
        let tmp = tempfile::tempdir().unwrap();
        let mut rng = Rng::new(9);
        let (id, generation) = {
            let mut c = open(tmp.path());
            let mut r = record(1, &mut rng);
            r.product = Some(Product {
                id: "SKU-1".into(),
                title: Some("Waterproof trail shoe".into()),
                ..Product::default()
            });
            let id = add(&mut c, r).unwrap();
            c.commit().unwrap();
            (id, c.stats().unwrap().generation)
        };
        let text = tmp.path().join("text");
        std::fs::remove_dir_all(&text).unwrap();
        std::fs::create_dir(&text).unwrap();
        text::write_index_without_product_fields(&text, generation, &[(id.0, "a cat")]);
        let c = open(tmp.path());
        assert!(c.last_recovery().rebuilt_text && !c.last_recovery().rebuilt_vectors);
        assert_eq!(c.text_search("waterproof", 5, &all()).unwrap()[0].0, id);
        assert_consistent(&c);
    }

    #[test]
    fn update_all_rewrites_a_batch_or_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = open(tmp.path());
        let mut rng = Rng::new(7);
        let ids: Vec<ImageId> = (0..3)
            .map(|n| add(&mut c, record(n, &mut rng)).unwrap())
            .collect();
        c.commit().unwrap();
        let mut recs: Vec<ImageRecord> =
            ids.iter().map(|&id| c.get(id).unwrap().unwrap()).collect();
        for r in &mut recs {
            r.given_texts.push(format!("batch{}", r.id));
        }
        c.update_all(&recs).unwrap();
        c.commit().unwrap();
        for r in &recs {
            assert_eq!(c.get(r.id).unwrap().as_ref(), Some(r));
            let word = format!("batch{}", r.id);
            assert_eq!(c.text_search(&word, 5, &all()).unwrap()[0].0, r.id);
        }
        // A changed vector anywhere in the batch: nothing is written.
        let mut bad = recs.clone();
        bad[0].given_texts.push("unwritten".into());
        bad[2].itc[0] += 0.5;
        assert!(matches!(
            c.update_all(&bad),
            Err(IndexError::InvalidParams(_))
        ));
        assert_eq!(c.get(recs[0].id).unwrap().as_ref(), Some(&recs[0]));
        assert_consistent(&c);
    }

    #[test]
    fn filters_apply_to_both_searches_through_the_store_trait() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = open(tmp.path());
        let mut rng = Rng::new(8);
        for n in 0..100 {
            add(&mut c, record(n, &mut rng)).unwrap();
        }
        c.commit().unwrap();
        let store: &dyn Store = &c;
        // Paths are /photos/<word>_<n>.jpg: one word in eight.
        let filter = Filter {
            path_prefix: Some("/photos/dog_".into()),
            ..Default::default()
        };
        let hits = store
            .vector_search(&rng.unit_vector(DIM), 5, None, &filter)
            .unwrap();
        assert_eq!(hits.len(), 5);
        let text = store.text_search("near", 50, &filter).unwrap();
        assert!(!text.is_empty());
        for (id, _) in hits.iter().chain(&text) {
            assert!(store
                .get(*id)
                .unwrap()
                .unwrap()
                .path
                .starts_with("/photos/dog_"));
        }
        let bad = Filter {
            date_from: Some("2023-02-29".into()),
            ..Default::default()
        };
        assert!(matches!(
            store.vector_search(&rng.unit_vector(DIM), 5, None, &bad),
            Err(IndexError::InvalidFilter(_))
        ));
        let mut passing = 0;
        store
            .for_each(&mut |r| {
                passing += filter.accepts(&r) as usize;
                Ok(())
            })
            .unwrap();
        // n / 8 % 8 == 0 for n in 0..100: 0..8 and 64..72.
        assert_eq!(passing, 16);
        assert_eq!(store.under("/photos/dog_").unwrap().len(), passing);
    }

    #[test]
    fn collection_can_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Collection>();
    }

    /// Bytes per image of each part for a realistic image (256-d ITC, ViT-B features, a
    /// 1024x768 photo-like thumbnail source, two captions); printed for the README.
    #[test]
    fn bytes_per_image() {
        let tmp = tempfile::tempdir().unwrap();
        let info = CollectionInfo::new("Salesforce/blip-itm-base-coco", None, 256, 577, 768);
        let mut c = Collection::open(tmp.path(), &info, HnswParams::default()).unwrap();
        let blobs = BlobStore::open(tmp.path()).unwrap();
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
            let thumb = image::DynamicImage::ImageRgb8(RgbImage::from_fn(1024, 768, |x, y| {
                image::Rgb([(x / 4 + i as u32) as u8, (y / 3) as u8, ((x + y) / 8) as u8])
            }));
            let id = add(&mut c, r).unwrap();
            blobs.put(id, Some(&f), Some(&thumb)).unwrap();
        }
        c.commit().unwrap();
        let b = c.stats().unwrap().bytes;
        let (features, thumbs) = blobs.bytes_on_disk().unwrap();
        let record_json = serde_json::to_vec(&c.get(ImageId(0)).unwrap().unwrap())
            .unwrap()
            .len();
        let parts: Vec<String> = b.iter().map(|(k, v)| format!("{k} {}", v / n)).collect();
        eprintln!(
            "bytes per image over {n}: record JSON {record_json}, {} (sled: small-collection \
             overhead), features {}, thumbs {}",
            parts.join(", "),
            features / n,
            thumbs / n
        );
        assert_eq!(features, n * FeatureStore::bytes_per_image(577, 768));
    }
}
