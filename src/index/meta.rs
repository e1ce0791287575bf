//! The metadata store (sled): the collection's source of truth.
//!
//! Everything needed to rebuild the derived indexes lives here: ids, paths, content hashes,
//! captions, given texts and the ITC vectors (the types are in [`super::record`]). The HNSW
//! graph and the tantivy index are caches of it (see [`super::Collection`] for the commit
//! protocol).
//!
//! Trees (keys are big-endian `u64` ids so iteration follows id order):
//!
//! | tree | key | value |
//! |---|---|---|
//! | `images` | id | [`ImageRecord`] as JSON (ITC vector as base64 of little-endian `f32`) |
//! | `by_path` | canonical path (UTF-8) | id |
//! | `by_hash` | content hash (hex) | id |
//! | `meta` | `collection`, `count` | [`CollectionInfo`] as JSON; number of images |
//! | `commits` | `state` | [`CommitState`] as JSON |
//! | `pending` | id | empty: ids touched since the last commit (the recovery journal) |
//! | `excluded` | content hash | `{"path", "unix"}`: content removed on purpose |
//! | `lists` | `h` + list name | [`ListInfo`] as JSON, with its number of entries |
//! | `lists` | `e` + list name + `0x00` + entry id | [`ListEntry`] as JSON |
//!
//! Every mutation updates all affected trees, the count and the journal in one sled transaction.
//! A match list changes in atomic batches of the `lists` tree, each with the list's count as it
//! leaves it (so the count always matches the entries stored), flushed before the call returns. The `0x00` after a name sorts a list's entries
//! before those of any longer name that starts with it, so entries iterate by list, then id.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use sled::Transactional;

use super::error::{IndexError, Result};
use super::id::ImageId;
use super::moderation::{ListEntry, ListInfo};
use super::record::{now_unix, CollectionInfo, CommitState, ImageRecord};

const KEY_INFO: &[u8] = b"collection";
const KEY_COUNT: &[u8] = b"count";
const KEY_STATE: &[u8] = b"state";
const KEY_NEXT_ID: &[u8] = b"next_id";
/// Most list entries written or removed in one batch (a bank of a million hashes is written in
/// parts, each atomic with its list's count, rather than held whole in one batch).
const ENTRY_BATCH: usize = 10_000;

/// The sled database of a collection (directory `meta/`).
pub struct MetaStore {
    dir: PathBuf,
    db: sled::Db,
    images: sled::Tree,
    by_path: sled::Tree,
    by_hash: sled::Tree,
    meta: sled::Tree,
    commits: sled::Tree,
    pending: sled::Tree,
    excluded: sled::Tree,
    lists: sled::Tree,
}

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<IndexError>>;

fn abort<T>(e: IndexError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn tx_err(e: TransactionError<IndexError>) -> IndexError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => e.into(),
    }
}

/// How long [`MetaStore::open`] waits for sled's own lock to be released.
const SLED_LOCK_WAIT: Duration = Duration::from_secs(5);

/// Whether `e` is sled failing to take its file lock (`flock` answering `EWOULDBLOCK`). sled 0.34
/// reports it as an `Other` error whose message quotes the lock error ("could not acquire lock
/// on ...: Os { .. kind: WouldBlock .. }"), not with the `WouldBlock` kind.
fn is_lock_contention(e: &sled::Error) -> bool {
    let sled::Error::Io(io) = e else {
        return false;
    };
    match io.kind() {
        std::io::ErrorKind::WouldBlock => true,
        std::io::ErrorKind::Other => {
            let m = io.to_string();
            m.starts_with("could not acquire lock on") && m.contains("WouldBlock")
        }
        _ => false,
    }
}

/// Calls `open` until it stops failing on sled's file lock or `wait` has passed, sleeping 5 ms,
/// then 10, 20, ... up to 200 ms between tries. Any other error is returned at once.
fn open_waiting_for_lock<T>(
    mut open: impl FnMut() -> sled::Result<T>,
    wait: Duration,
) -> sled::Result<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match open() {
            Err(e) if is_lock_contention(&e) && start.elapsed() < wait => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

fn read_count(meta: &TransactionalTree) -> std::result::Result<u64, UnabortableTransactionError> {
    Ok(meta
        .get(KEY_COUNT)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

impl MetaStore {
    /// Opens (or creates) the database in `dir`.
    ///
    /// sled locks its files: a second open of the same directory fails until the first handle is
    /// dropped. sled 0.34 releases that lock from its flusher thread, which it does not join when
    /// the last handle drops, so a reopen right after a drop can see the lock still held by a
    /// handle that is already gone (spacejam/sled#1289). `open_waiting_for_lock` bridges that
    /// gap; a collection held by another live process is refused earlier, by the collection's own
    /// lock file ([`IndexError::Locked`]).
    pub fn open(dir: &Path) -> Result<Self> {
        fs_err::create_dir_all(dir)?;
        let config = sled::Config::new().path(dir);
        let db = open_waiting_for_lock(|| config.open(), SLED_LOCK_WAIT)?;
        let store = MetaStore {
            dir: dir.to_path_buf(),
            images: db.open_tree("images")?,
            by_path: db.open_tree("by_path")?,
            by_hash: db.open_tree("by_hash")?,
            meta: db.open_tree("meta")?,
            commits: db.open_tree("commits")?,
            pending: db.open_tree("pending")?,
            excluded: db.open_tree("excluded")?,
            lists: db.open_tree("lists")?,
            db,
        };
        if store.meta.get(KEY_NEXT_ID)?.is_none() {
            // A new collection starts at 0. One whose ids came from sled's own counter (which
            // persists a block of a million ahead, so each process jumped by up to that) goes
            // on from that counter's next value: above every id it ever gave, once more.
            let floor = store.db.generate_id()?;
            store.reserve_ids(ImageId(floor))?;
            store.db.flush()?;
        }
        Ok(store)
    }

    /// The id the next [`MetaStore::allocate_id`] returns.
    pub fn next_id(&self) -> Result<ImageId> {
        Ok(ImageId(
            self.meta
                .get(KEY_NEXT_ID)?
                .map_or(Ok(0), |v| ImageId::from_key(&v).map(|i| i.0))?,
        ))
    }

    /// Makes every id below `floor` unavailable to [`MetaStore::allocate_id`] (for records
    /// added with their own ids, as `reindex` keeps them).
    pub fn reserve_ids(&self, floor: ImageId) -> Result<()> {
        self.meta.fetch_and_update(KEY_NEXT_ID, |old| {
            let cur = old
                .and_then(|v| ImageId::from_key(v).ok())
                .map_or(0, |i| i.0);
            Some(ImageId(cur.max(floor.0)).to_key().to_vec())
        })?;
        Ok(())
    }

    /// The stored collection info, if the collection has been initialised.
    pub fn info(&self) -> Result<Option<CollectionInfo>> {
        match self.meta.get(KEY_INFO)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Stores `info` if the collection has none yet, otherwise checks that it is compatible
    /// ([`CollectionInfo::check_compatible`]). Returns the info in force.
    pub fn init_info(&self, info: &CollectionInfo) -> Result<CollectionInfo> {
        let bytes = serde_json::to_vec(info)?;
        match self
            .meta
            .compare_and_swap(KEY_INFO, None as Option<&[u8]>, Some(bytes))?
        {
            Ok(()) => {
                self.db.flush()?;
                Ok(info.clone())
            }
            Err(_) => {
                let stored = self.info()?.ok_or_else(|| IndexError::Corrupt {
                    path: self.dir.clone(),
                    reason: "collection info vanished during init".into(),
                })?;
                stored.check_compatible(info, &self.dir)?;
                Ok(stored)
            }
        }
    }

    /// Replaces the stored info (after [`CollectionInfo::check_compatible`]: where the models
    /// are now, their fingerprint).
    pub fn set_info(&self, info: &CollectionInfo) -> Result<()> {
        self.meta.insert(KEY_INFO, serde_json::to_vec(info)?)?;
        self.db.flush()?;
        Ok(())
    }

    /// Checks `requested` against the stored info; a collection without info is compatible with
    /// anything. The error names the differing field and suggests `blipsearch reindex`.
    pub fn check_compatible(&self, requested: &CollectionInfo) -> Result<()> {
        match self.info()? {
            Some(stored) => stored.check_compatible(requested, &self.dir),
            None => Ok(()),
        }
    }

    /// Allocates a fresh id: the next of a counter kept in the `meta` tree, so ids are
    /// consecutive across processes and never reused. The counter's step is written before the
    /// record that uses it, and sled recovers a prefix of its writes, so a record that survives
    /// a crash has an id below the recovered counter.
    pub fn allocate_id(&self) -> Result<ImageId> {
        let old = self.meta.fetch_and_update(KEY_NEXT_ID, |old| {
            let cur = old
                .and_then(|v| ImageId::from_key(v).ok())
                .map_or(0, |i| i.0);
            Some(ImageId(cur + 1).to_key().to_vec())
        })?;
        Ok(old
            .and_then(|v| ImageId::from_key(&v).ok())
            .unwrap_or(ImageId(0)))
    }

    /// The trees that adding or removing an image changes, for one transaction: the record,
    /// its path and hash entries, the count and the journal.
    fn record_trees(
        &self,
    ) -> (
        &sled::Tree,
        &sled::Tree,
        &sled::Tree,
        &sled::Tree,
        &sled::Tree,
    ) {
        (
            &self.images,
            &self.by_path,
            &self.by_hash,
            &self.meta,
            &self.pending,
        )
    }

    /// Inserts a new record (its id from [`MetaStore::allocate_id`]).
    ///
    /// Fails with [`IndexError::AlreadyExists`] when the id, the path or the content hash is
    /// already stored. Records the id in the recovery journal.
    pub fn insert(&self, record: &ImageRecord) -> Result<()> {
        let value = serde_json::to_vec(record)?;
        let key = record.id.to_key();
        self.record_trees()
            .transaction(|(images, by_path, by_hash, meta, pending)| {
                if images.get(key)?.is_some() {
                    return abort(IndexError::AlreadyExists {
                        kind: "id",
                        key: record.id.to_string(),
                        existing: record.id,
                    });
                }
                ensure_free(by_path, "path", &record.path)?;
                ensure_free(by_hash, "content hash", &record.content_hash)?;
                images.insert(&key, value.as_slice())?;
                by_path.insert(record.path.as_bytes(), &key)?;
                by_hash.insert(record.content_hash.as_bytes(), &key)?;
                let count = read_count(meta)?;
                meta.insert(KEY_COUNT, &(count + 1).to_be_bytes())?;
                pending.insert(&key, &[])?;
                Ok(())
            })
            .map_err(tx_err)
    }

    /// Replaces the record with the same id; returns the old one.
    ///
    /// Path and hash indexes follow a changed path or hash ([`IndexError::AlreadyExists`] if the
    /// new one belongs to another image). Fails with [`IndexError::NotFound`] for unknown ids.
    pub fn update(&self, record: &ImageRecord) -> Result<ImageRecord> {
        let mut olds = self.update_all(std::slice::from_ref(record))?;
        olds.pop().ok_or(IndexError::NotFound(record.id))
    }

    /// [`MetaStore::update`] of each of `records`, all in one transaction (one log write
    /// instead of one per record); returns the old records, in order. Nothing is written when
    /// one fails.
    pub fn update_all(&self, records: &[ImageRecord]) -> Result<Vec<ImageRecord>> {
        let values = records
            .iter()
            .map(serde_json::to_vec)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        (&self.images, &self.by_path, &self.by_hash, &self.pending)
            .transaction(|(images, by_path, by_hash, pending)| {
                let mut olds = Vec::with_capacity(records.len());
                for (record, value) in records.iter().zip(&values) {
                    let key = record.id.to_key();
                    let old = match images.get(key)? {
                        Some(v) => record_or_abort(&v)?,
                        None => return abort(IndexError::NotFound(record.id)),
                    };
                    if old.path != record.path {
                        ensure_free(by_path, "path", &record.path)?;
                        by_path.remove(old.path.as_bytes())?;
                        by_path.insert(record.path.as_bytes(), &key)?;
                    }
                    if old.content_hash != record.content_hash {
                        ensure_free(by_hash, "content hash", &record.content_hash)?;
                        by_hash.remove(old.content_hash.as_bytes())?;
                        by_hash.insert(record.content_hash.as_bytes(), &key)?;
                    }
                    images.insert(&key, value.as_slice())?;
                    pending.insert(&key, &[])?;
                    olds.push(old);
                }
                Ok(olds)
            })
            .map_err(tx_err)
    }

    /// Removes a record and its path and hash entries; returns it, or `None` if the id is
    /// unknown. Records the id in the recovery journal.
    pub fn remove(&self, id: ImageId) -> Result<Option<ImageRecord>> {
        let key = id.to_key();
        self.record_trees()
            .transaction(|(images, by_path, by_hash, meta, pending)| {
                let Some(v) = images.remove(&key)? else {
                    return Ok(None);
                };
                let old = record_or_abort(&v)?;
                if by_path.get(old.path.as_bytes())?.as_deref() == Some(&key[..]) {
                    by_path.remove(old.path.as_bytes())?;
                }
                if by_hash.get(old.content_hash.as_bytes())?.as_deref() == Some(&key[..]) {
                    by_hash.remove(old.content_hash.as_bytes())?;
                }
                let count = read_count(meta)?;
                meta.insert(KEY_COUNT, &count.saturating_sub(1).to_be_bytes())?;
                pending.insert(&key, &[])?;
                Ok(Some(old))
            })
            .map_err(tx_err)
    }

    /// The record of `id`, if stored.
    pub fn get(&self, id: ImageId) -> Result<Option<ImageRecord>> {
        match self.images.get(id.to_key())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// The id stored for a canonical path.
    pub fn by_path(&self, path: &str) -> Result<Option<ImageId>> {
        self.by_path
            .get(path.as_bytes())?
            .map(|v| ImageId::from_key(&v))
            .transpose()
            .map_err(IndexError::from)
    }

    /// The id stored for a content hash.
    pub fn by_hash(&self, hash: &str) -> Result<Option<ImageId>> {
        self.by_hash
            .get(hash.as_bytes())?
            .map(|v| ImageId::from_key(&v))
            .transpose()
            .map_err(IndexError::from)
    }

    /// All records in id order.
    pub fn iter(&self) -> impl Iterator<Item = Result<ImageRecord>> + '_ {
        self.images.iter().map(|kv| {
            let (_, v) = kv?;
            Ok(serde_json::from_slice(&v)?)
        })
    }

    /// All ids in id order.
    pub fn ids(&self) -> impl Iterator<Item = Result<ImageId>> + '_ {
        self.images
            .iter()
            .keys()
            .map(|k| Ok(ImageId::from_key(&k?)?))
    }

    /// Number of stored images (kept in the `meta` tree, O(1)).
    pub fn count(&self) -> Result<u64> {
        Ok(self
            .meta
            .get(KEY_COUNT)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Adds `id` to the recovery journal without touching the record: used before writing an
    /// image's side files so that a crash between the files and the record is cleaned up.
    pub fn mark_pending(&self, id: ImageId) -> Result<()> {
        self.pending.insert(id.to_key(), &[])?;
        Ok(())
    }

    /// Ids touched since the last commit.
    pub fn pending(&self) -> Result<Vec<ImageId>> {
        self.pending
            .iter()
            .keys()
            .map(|k| Ok(ImageId::from_key(&k?)?))
            .collect()
    }

    /// The last recorded commit.
    pub fn commit_state(&self) -> Result<CommitState> {
        match self.commits.get(KEY_STATE)? {
            Some(v) => Ok(serde_json::from_slice(&v)?),
            None => Ok(CommitState::default()),
        }
    }

    /// Records that the derived indexes now hold `generation`, clears the journal entries in
    /// `cleared` and flushes sled to disk. Returns the new state.
    pub fn record_commit(&self, generation: u64, cleared: &[ImageId]) -> Result<CommitState> {
        let state = CommitState {
            generation,
            images: self.count()?,
            committed_unix: now_unix(),
        };
        let value = serde_json::to_vec(&state)?;
        (&self.commits, &self.pending)
            .transaction(|(commits, pending)| {
                commits.insert(KEY_STATE, value.as_slice())?;
                for id in cleared {
                    pending.remove(&id.to_key())?;
                }
                Ok(())
            })
            .map_err(tx_err)?;
        self.db.flush()?;
        Ok(state)
    }

    /// Flushes sled's buffers to disk.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// Remembers that the image with content `hash` (at `path`) was removed on purpose, so that
    /// scans of its folder leave it out. Durable on return.
    pub fn exclude(&self, hash: &str, path: &str) -> Result<()> {
        let value = serde_json::to_vec(&serde_json::json!({ "path": path, "unix": now_unix() }))?;
        self.excluded.insert(hash.as_bytes(), value)?;
        self.excluded.flush()?;
        Ok(())
    }

    /// Whether content `hash` was removed on purpose (see [`MetaStore::exclude`]).
    pub fn is_excluded(&self, hash: &str) -> Result<bool> {
        Ok(self.excluded.contains_key(hash.as_bytes())?)
    }

    /// Every exclusion as (content hash, last path).
    pub fn exclusions(&self) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for kv in self.excluded.iter() {
            let (k, v) = kv?;
            let v: serde_json::Value = serde_json::from_slice(&v)?;
            out.push((
                String::from_utf8_lossy(&k).into_owned(),
                v["path"].as_str().unwrap_or_default().to_string(),
            ));
        }
        Ok(out)
    }

    /// Forgets the exclusion of content `hash`; returns whether there was one.
    pub fn include(&self, hash: &str) -> Result<bool> {
        let was = self.excluded.remove(hash.as_bytes())?.is_some();
        if was {
            self.excluded.flush()?;
        }
        Ok(was)
    }

    /// The match list `name`, if there is one.
    pub fn list(&self, name: &str) -> Result<Option<ListInfo>> {
        match self.lists.get(list_key(name))? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Every match list, by name.
    pub fn lists(&self) -> Result<Vec<ListInfo>> {
        self.lists
            .scan_prefix(b"h")
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    /// Creates the empty list `name` ([`IndexError::ListExists`] if there is one). Durable on
    /// return.
    pub fn create_list(&self, name: &str) -> Result<ListInfo> {
        let info = ListInfo {
            name: name.to_string(),
            entries: 0,
            created_unix: now_unix(),
        };
        let created = self.lists.compare_and_swap(
            list_key(name),
            None as Option<&[u8]>,
            Some(serde_json::to_vec(&info)?),
        )?;
        if created.is_err() {
            return Err(IndexError::ListExists(name.to_string()));
        }
        self.lists.flush()?;
        Ok(info)
    }

    /// Removes the list `name` and its entries; returns it, or `None` if there was none. The
    /// entries go [`ENTRY_BATCH`] at a time, each batch with the list's new count, and the list
    /// last: a crash midway leaves the list with the entries not yet removed. Durable on return.
    pub fn delete_list(&self, name: &str) -> Result<Option<ListInfo>> {
        let Some(mut info) = self.list(name)? else {
            return Ok(None);
        };
        let entries = info.entries;
        let mut keys = self.lists.scan_prefix(entries_prefix(name)).keys();
        loop {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for key in keys.by_ref().take(ENTRY_BATCH) {
                batch.remove(key?);
                n += 1;
            }
            if n == 0 {
                break;
            }
            info.entries = info.entries.saturating_sub(n);
            batch.insert(list_key(name), serde_json::to_vec(&info)?);
            self.lists.apply_batch(batch)?;
        }
        self.lists.remove(list_key(name))?;
        self.lists.flush()?;
        info.entries = entries;
        Ok(Some(info))
    }

    /// Stores `entries` (an entry with a stored entry's list and id replaces it) and the new
    /// counts of their lists, [`ENTRY_BATCH`] entries to a batch, each with the counts it
    /// makes: a crash midway leaves the lists with the batches before it. Every list must exist
    /// ([`IndexError::NoList`] otherwise, writing nothing). Durable on return.
    pub fn put_entries(&self, entries: &[ListEntry]) -> Result<()> {
        let mut infos: std::collections::BTreeMap<&str, ListInfo> = Default::default();
        for e in entries {
            if !infos.contains_key(e.list.as_str()) {
                let info = self
                    .list(&e.list)?
                    .ok_or_else(|| IndexError::NoList(e.list.clone()))?;
                infos.insert(&e.list, info);
            }
        }
        for chunk in entries.chunks(ENTRY_BATCH) {
            let mut batch = sled::Batch::default();
            let mut written = std::collections::HashSet::new();
            for e in chunk {
                let key = entry_key(&e.list, e.id);
                if !written.contains(&key) && !self.lists.contains_key(&key)? {
                    if let Some(info) = infos.get_mut(e.list.as_str()) {
                        info.entries += 1;
                    }
                }
                batch.insert(key.clone(), serde_json::to_vec(e)?);
                written.insert(key);
            }
            for info in infos.values() {
                batch.insert(list_key(&info.name), serde_json::to_vec(info)?);
            }
            self.lists.apply_batch(batch)?;
        }
        self.lists.flush()?;
        Ok(())
    }

    /// Removes entry `id` of list `name` ([`IndexError::NoList`] if there is no such list);
    /// returns it, or `None` if there was none. Durable on return.
    pub fn remove_entry(&self, name: &str, id: u64) -> Result<Option<ListEntry>> {
        let mut info = self
            .list(name)?
            .ok_or_else(|| IndexError::NoList(name.to_string()))?;
        let key = entry_key(name, id);
        let Some(v) = self.lists.get(&key)? else {
            return Ok(None);
        };
        let entry: ListEntry = serde_json::from_slice(&v)?;
        info.entries = info.entries.saturating_sub(1);
        let mut batch = sled::Batch::default();
        batch.remove(key);
        batch.insert(list_key(name), serde_json::to_vec(&info)?);
        self.lists.apply_batch(batch)?;
        self.lists.flush()?;
        Ok(Some(entry))
    }

    /// The entries of list `name` by id ([`IndexError::NoList`] if there is no such list), or of
    /// every list by list then id.
    pub fn entries(&self, name: Option<&str>) -> Result<Vec<ListEntry>> {
        let prefix = match name {
            Some(name) => {
                if self.list(name)?.is_none() {
                    return Err(IndexError::NoList(name.to_string()));
                }
                entries_prefix(name)
            }
            None => b"e".to_vec(),
        };
        self.lists
            .scan_prefix(prefix)
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }
}

/// The key of list `name`'s header in the `lists` tree.
fn list_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(b'h');
    key.extend_from_slice(name.as_bytes());
    key
}

/// The prefix of every entry key of list `name` in the `lists` tree.
fn entries_prefix(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + name.len() + 8);
    key.push(b'e');
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key
}

/// The key of entry `id` of list `name` in the `lists` tree.
fn entry_key(name: &str, id: u64) -> Vec<u8> {
    let mut key = entries_prefix(name);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// Aborts with [`IndexError::AlreadyExists`] when `tree` (`by_path` or `by_hash`, named by
/// `kind`) already maps `key` to an image.
fn ensure_free(tree: &TransactionalTree, kind: &'static str, key: &str) -> TxResult<()> {
    match tree.get(key.as_bytes())? {
        Some(existing) => abort(IndexError::AlreadyExists {
            kind,
            key: key.to_string(),
            existing: id_or_abort(&existing)?,
        }),
        None => Ok(()),
    }
}

/// A stored record, or the transaction aborted with the JSON error.
fn record_or_abort(v: &[u8]) -> TxResult<ImageRecord> {
    serde_json::from_slice(v).map_err(|e| ConflictableTransactionError::Abort(e.into()))
}

fn id_or_abort(v: &[u8]) -> TxResult<ImageId> {
    ImageId::from_key(v).map_err(|e| ConflictableTransactionError::Abort(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::record::{content_hash, Caption, CaptionSource};

    pub(crate) fn record(id: ImageId, n: u64) -> ImageRecord {
        ImageRecord {
            id,
            path: format!("/photos/img_{n}.jpg"),
            content_hash: content_hash(format!("bytes {n}").as_bytes()),
            size_bytes: 1000 + n,
            width: 640,
            height: 480,
            mtime_unix: 1_700_000_000,
            exif_date: Some("2023:01:02 03:04:05".into()),
            itc: vec![0.1, -0.25, 1.0e-7, f32::MIN_POSITIVE],
            captions: vec![
                Caption {
                    text: "a dog on a beach".into(),
                    source: CaptionSource::Beam,
                    p_match: Some(0.9),
                    kept: true,
                },
                Caption {
                    text: "a cat".into(),
                    source: CaptionSource::Sample,
                    p_match: Some(0.1),
                    kept: false,
                },
            ],
            given_texts: vec!["holiday".into()],
            added_unix: 1_700_000_001,
            product: None,
            pdq: None,
            flags: Vec::new(),
        }
    }

    fn info() -> CollectionInfo {
        CollectionInfo::new("Salesforce/blip-itm-base-coco", None, 256, 577, 768)
    }

    #[test]
    fn record_json_round_trip_is_exact() {
        let r = record(ImageId(7), 7);
        let json = serde_json::to_string(&r).unwrap();
        let back: ImageRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(r, back);
        assert!(json.contains("\"source\":\"beam\""), "{json}");
    }

    /// A bank written and removed in several batches keeps its count exact, an id repeated
    /// across batches counting once; names that extend one another keep their entries apart.
    #[test]
    fn list_entries_in_many_batches_keep_their_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path()).unwrap();
        store.create_list("bank").unwrap();
        store.create_list("bank-2").unwrap();
        let n = 2 * ENTRY_BATCH + 500;
        let entry = |list: &str, i: usize| ListEntry {
            list: list.into(),
            // Ids repeat every 7,000 entries: across batches and within them.
            id: (i % 7000) as u64,
            label: None,
            source: None,
            pdq: vec![crate::index::pdq::PdqHash([i as u8; 32])],
            quality: None,
            itc: None,
            added_unix: i as i64,
        };
        let entries: Vec<ListEntry> = (0..n).map(|i| entry("bank", i)).collect();
        store.put_entries(&entries).unwrap();
        store.put_entries(&[entry("bank-2", 3)]).unwrap();
        assert!(matches!(
            store.put_entries(&[entry("bank", 1), entry("bank-3", 1)]),
            Err(IndexError::NoList(_))
        ));
        let counts: Vec<(String, u64)> = store
            .lists()
            .unwrap()
            .into_iter()
            .map(|l| (l.name, l.entries))
            .collect();
        assert_eq!(counts, [("bank".into(), 7000), ("bank-2".into(), 1)]);
        let stored = store.entries(Some("bank")).unwrap();
        assert_eq!(stored.len(), 7000);
        // The last entry given for an id is the one kept.
        assert_eq!(stored[0], entry("bank", n - n % 7000));
        assert_eq!(store.entries(None).unwrap().len(), 7001);
        assert_eq!(store.delete_list("bank").unwrap().unwrap().entries, 7000);
        assert_eq!(store.entries(None).unwrap(), [entry("bank-2", 3)]);
        assert!(store.list("bank").unwrap().is_none());
    }

    #[test]
    fn insert_get_lookup_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path()).unwrap();
        let id = store.allocate_id().unwrap();
        let r = record(id, 1);
        store.insert(&r).unwrap();
        assert_eq!(store.get(id).unwrap().as_ref(), Some(&r));
        assert_eq!(store.by_path(&r.path).unwrap(), Some(id));
        assert_eq!(store.by_hash(&r.content_hash).unwrap(), Some(id));
        assert_eq!(store.count().unwrap(), 1);
        assert_eq!(store.pending().unwrap(), vec![id]);

        // Same path, same hash, same id: all refused, nothing changes.
        let id2 = store.allocate_id().unwrap();
        assert!(id2 > id);
        let mut dup = record(id2, 2);
        dup.path = r.path.clone();
        assert!(matches!(
            store.insert(&dup),
            Err(IndexError::AlreadyExists { kind: "path", existing, .. }) if existing == id
        ));
        let mut dup = record(id2, 2);
        dup.content_hash = r.content_hash.clone();
        assert!(matches!(
            store.insert(&dup),
            Err(IndexError::AlreadyExists {
                kind: "content hash",
                ..
            })
        ));
        assert!(matches!(
            store.insert(&record(id, 3)),
            Err(IndexError::AlreadyExists { kind: "id", .. })
        ));
        assert_eq!(store.count().unwrap(), 1);
        assert!(store.get(id2).unwrap().is_none());

        let removed = store.remove(id).unwrap().unwrap();
        assert_eq!(removed, r);
        assert!(store.get(id).unwrap().is_none());
        assert!(store.by_path(&r.path).unwrap().is_none());
        assert!(store.by_hash(&r.content_hash).unwrap().is_none());
        assert_eq!(store.count().unwrap(), 0);
        assert!(store.remove(id).unwrap().is_none());
    }

    #[test]
    fn update_moves_path_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path()).unwrap();
        let a = record(store.allocate_id().unwrap(), 1);
        let b = record(store.allocate_id().unwrap(), 2);
        store.insert(&a).unwrap();
        store.insert(&b).unwrap();

        let mut a2 = a.clone();
        a2.path = "/photos/moved.jpg".into();
        a2.captions[1].kept = true;
        assert_eq!(store.update(&a2).unwrap(), a);
        assert_eq!(store.by_path("/photos/moved.jpg").unwrap(), Some(a.id));
        assert!(store.by_path(&a.path).unwrap().is_none());
        assert_eq!(store.get(a.id).unwrap().unwrap().kept_captions().count(), 2);

        let mut clash = a2.clone();
        clash.content_hash = b.content_hash.clone();
        assert!(matches!(
            store.update(&clash),
            Err(IndexError::AlreadyExists { existing, .. }) if existing == b.id
        ));
        assert_eq!(store.get(a.id).unwrap().unwrap(), a2);
        assert!(matches!(
            store.update(&record(ImageId(999), 9)),
            Err(IndexError::NotFound(ImageId(999)))
        ));
        assert_eq!(store.count().unwrap(), 2);
    }

    /// A lock error as sled 0.34 returns it while another handle holds its lock (config.rs).
    fn would_block() -> sled::Error {
        sled::Error::Io(std::io::Error::other(format!(
            "could not acquire lock on {:?}: {:?}",
            "/tmp/x/db",
            std::io::Error::from_raw_os_error(11)
        )))
    }

    #[test]
    fn a_held_sled_lock_is_recognised_as_contention() {
        let dir = tempfile::tempdir().unwrap();
        let held = sled::Config::new().path(dir.path()).open().unwrap();
        let second = sled::Config::new().path(dir.path()).open();
        let Err(err) = second else {
            panic!("a second handle opened while the lock is held");
        };
        assert!(is_lock_contention(&err), "{err:?}");
        assert!(is_lock_contention(&would_block()));
        let other = sled::Error::Io(std::io::Error::other("disk on fire"));
        assert!(!is_lock_contention(&other));
        drop(held);
    }

    #[test]
    fn open_waits_out_a_lingering_lock_and_nothing_else() {
        let wait = Duration::from_secs(5);
        // Held for three tries, then released: the fourth try's handle comes back.
        let mut tries = 0;
        let got = open_waiting_for_lock(
            || {
                tries += 1;
                if tries <= 3 {
                    Err(would_block())
                } else {
                    Ok(tries)
                }
            },
            wait,
        );
        assert_eq!(got.unwrap(), 4);

        // Any other error is returned on the first try.
        let mut tries = 0;
        let got: sled::Result<()> = open_waiting_for_lock(
            || {
                tries += 1;
                Err(sled::Error::Unsupported("nope".into()))
            },
            wait,
        );
        assert!(matches!(got, Err(sled::Error::Unsupported(_))));
        assert_eq!(tries, 1);

        // A lock that stays held is reported once the wait is over.
        let start = Instant::now();
        let got: sled::Result<()> =
            open_waiting_for_lock(|| Err(would_block()), Duration::from_millis(50));
        assert!(got.as_ref().is_err_and(is_lock_contention), "{got:?}");
        assert!(start.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn immediate_reopens_do_not_trip_on_the_flusher() {
        // The race of spacejam/sled#1289: each drop is followed at once by a reopen.
        let dir = tempfile::tempdir().unwrap();
        for i in 0..20u64 {
            let store = MetaStore::open(dir.path()).unwrap();
            assert_eq!(store.count().unwrap(), i);
            store
                .insert(&record(store.allocate_id().unwrap(), i))
                .unwrap();
        }
    }

    #[test]
    fn survives_reopen_and_ids_stay_monotonic() {
        let dir = tempfile::tempdir().unwrap();
        let (first, r) = {
            let store = MetaStore::open(dir.path()).unwrap();
            store.init_info(&info()).unwrap();
            let r = record(store.allocate_id().unwrap(), 1);
            store.insert(&r).unwrap();
            store.record_commit(1, &[r.id]).unwrap();
            (r.id, r)
        };
        let store = MetaStore::open(dir.path()).unwrap();
        assert_eq!(store.get(first).unwrap(), Some(r));
        assert_eq!(first, ImageId(0), "a new collection starts at 0");
        assert_eq!(
            store.allocate_id().unwrap(),
            ImageId(1),
            "ids are consecutive across processes"
        );
        assert_eq!(store.commit_state().unwrap().generation, 1);
        assert_eq!(store.commit_state().unwrap().images, 1);
        assert!(store.pending().unwrap().is_empty());
        assert_eq!(store.iter().count(), 1);
        assert_eq!(
            store.ids().collect::<Result<Vec<_>>>().unwrap(),
            vec![first]
        );
    }

    #[test]
    fn incompatible_info_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path()).unwrap();
        store.init_info(&info()).unwrap();
        // Same info again: fine; another caption model: fine.
        store.init_info(&info()).unwrap();
        let mut other = info();
        other.caption_model = Some("Salesforce/blip-image-captioning-base".into());
        store.check_compatible(&other).unwrap();

        let mut other = info();
        other.embedding_dim = 512;
        let e = store.init_info(&other).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(
            e,
            IndexError::Incompatible {
                field: "embedding_dim",
                ..
            }
        ));
        assert!(msg.contains("blipsearch reindex"), "{msg}");
        assert!(msg.contains("256") && msg.contains("512"), "{msg}");

        let mut other = info();
        other.retrieval_model = "Salesforce/blip-itm-large-coco".into();
        assert!(matches!(
            store.check_compatible(&other),
            Err(IndexError::Incompatible {
                field: "retrieval_model",
                ..
            })
        ));
        assert_eq!(
            store.info().unwrap(),
            Some(info()).map(|mut i| {
                i.created_unix = store.info().unwrap().unwrap().created_unix;
                i
            })
        );
    }

    #[test]
    fn content_hash_is_sha256_hex() {
        assert_eq!(
            content_hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
