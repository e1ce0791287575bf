//! [`MilvusStore`]: the [`Store`] over a Milvus collection, for collections shared by many
//! processes and past one machine (`--store milvus://HOST:PORT/COLLECTION`).
//!
//! One Milvus collection holds the images, one row each:
//!
//! | field | type | holds |
//! |---|---|---|
//! | `id` | INT64, primary key | the image id (see below) |
//! | `path`, `hash` | VARCHAR | canonical path; hex SHA-256 of the file |
//! | `width`, `height` | INT64 | pixels, for filters |
//! | `day` | INT64, nullable | EXIF day as `YYYYMMDD`, for date filters |
//! | `record` | VARCHAR | the [`ImageRecord`] as JSON, without its vector |
//! | `text` | VARCHAR, standard analyser | kept captions, given texts and file-name words |
//! | `sparse` | SPARSE_FLOAT_VECTOR | BM25 of `text`, computed by Milvus (a BM25 function) |
//! | `vector` | FLOAT_VECTOR, HNSW, COSINE | the ITC embedding |
//!
//! The collection has dynamic fields enabled, so that attributes can join rows without a new
//! schema. The [`CollectionInfo`] lives in the collection's property `blipsearch.collection`;
//! removed content hashes live in a second collection, `<name>__excluded`.
//!
//! **Ids** derive from the content hash (53 bits of it, so that JavaScript clients read them
//! exactly): every process computes the same id for the same bytes, with no coordinator, and the
//! same bytes added twice anywhere are one row (writes are upserts). On the rare collision with
//! other content, the next 53 bits of the hash are tried. An id names one content for the life of
//! the collection; unlike the embedded store, content removed and added again gets its old id back.
//!
//! **Consistency and durability**: reads are `Strong`, so a write through one process is seen by
//! the next read through any other; Milvus makes a write durable before it answers.
//! [`Store::commit`] asks Milvus to seal new rows (flush) at most every ten seconds, so that its
//! indexes cover them rather than a scan.
//!
//! **Text search differs from the embedded store's** in what Milvus offers: one BM25 field (no
//! per-field boosts), the `standard` analyser (no stemming: "dogs" does not match "dog"), and no
//! query syntax (quotes and operators are words).
//!
//! The store is synchronous like the trait; each call runs on a small Tokio runtime of its own,
//! so it may be called from any thread, inside another runtime or not. A Milvus that cannot be
//! reached is [`IndexError::Unavailable`]; the next call tries again.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use milvus::v2::prelude::*;
use serde_json::{json, Value};

use super::error::{IndexError, Result};
use super::filter::{day_number, exif_day, prefix_end, Filter};
use super::id::ImageId;
use super::record::{CollectionInfo, ImageRecord};
use super::store::{Store, StoreStats};
use super::text::{check_query, filename_words};
use super::vectors::check_vector;

/// The collection property holding the [`CollectionInfo`] as JSON.
const INFO_PROPERTY: &str = "blipsearch.collection";
/// Longest path stored.
const MAX_PATH: u32 = 4096;
/// Longest `record` and `text`, in bytes (Milvus' VARCHAR limit).
const MAX_VARCHAR: u32 = 65_535;
/// Most results one search returns (Milvus' top-k limit).
pub const MAX_TOP_K: usize = 16_384;
/// Rows fetched per query when reading many.
const PAGE: usize = 1000;
/// `ef` when the caller gives none.
const DEFAULT_EF: usize = 64;
/// Least time between two flushes that [`Store::commit`] asks for.
const FLUSH_EVERY: Duration = Duration::from_secs(10);
/// How many windows of the content hash are tried as an id.
const ID_ATTEMPTS: usize = 4;

/// Where a Milvus collection is: `milvus://HOST:PORT/COLLECTION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MilvusAddress {
    /// Host name or address of Milvus' gRPC endpoint.
    pub host: String,
    /// Its port (Milvus' default is 19530).
    pub port: u16,
    /// The collection name: letters, digits and `_`, not starting with a digit.
    pub collection: String,
}

impl FromStr for MilvusAddress {
    type Err = IndexError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            IndexError::InvalidParams(format!(
                "{s:?} is not a Milvus store address ({why}); write milvus://HOST:PORT/COLLECTION"
            ))
        };
        let rest = s
            .strip_prefix("milvus://")
            .ok_or_else(|| bad("it must start with milvus://"))?;
        let (authority, collection) = rest
            .split_once('/')
            .ok_or_else(|| bad("no collection name"))?;
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))?,
            ),
            None => (authority, 19530),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let valid = !collection.is_empty()
            && collection.len() <= 200
            && collection
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !collection.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(bad(
                "a collection name is letters, digits and _, not starting with a digit",
            ));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            collection: collection.to_string(),
        })
    }
}

impl fmt::Display for MilvusAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "milvus://{}:{}/{}",
            self.host, self.port, self.collection
        )
    }
}

/// A Milvus collection as a [`Store`] (see the module documentation).
pub struct MilvusStore {
    remote: Remote,
    info: CollectionInfo,
    /// When this handle last asked Milvus to seal its rows.
    flushed: Option<std::time::Instant>,
}

impl MilvusStore {
    /// Opens the collection at `address`, creating it for `info` when it does not exist; an
    /// existing one must be compatible with `info` ([`IndexError::Incompatible`] otherwise).
    pub fn open(address: &MilvusAddress, info: &CollectionInfo) -> Result<Self> {
        let remote = Remote::connect(address)?;
        let stored = match remote.read_info()? {
            Some(stored) => stored,
            None => {
                remote.create(info)?;
                // Another process may have created it first: its info wins.
                remote.read_info()?.ok_or_else(|| {
                    IndexError::Milvus(format!("{address}: the collection vanished after creation"))
                })?
            }
        };
        stored.check_compatible(info, &address.as_path())?;
        remote.load()?;
        Ok(Self {
            remote,
            info: stored,
            flushed: None,
        })
    }

    /// Opens the existing collection at `address` ([`IndexError::NoCollection`] when there is
    /// none).
    pub fn open_existing(address: &MilvusAddress) -> Result<Self> {
        let remote = Remote::connect(address)?;
        let info = remote
            .read_info()?
            .ok_or_else(|| IndexError::NoCollection(address.as_path()))?;
        remote.load()?;
        Ok(Self {
            remote,
            info,
            flushed: None,
        })
    }

    /// Whether a collection exists at `address`.
    pub fn exists(address: &MilvusAddress) -> Result<bool> {
        Ok(Remote::connect(address)?.read_info()?.is_some())
    }

    /// Deletes the collection at `address` and everything in it (tests and benchmarks).
    pub fn drop_collection(address: &MilvusAddress) -> Result<()> {
        let remote = Remote::connect(address)?;
        for name in [remote.images.clone(), remote.excluded.clone()] {
            remote.call("drop a collection", move |c| {
                let name = name.clone();
                async move {
                    c.drop_collection(
                        DropCollectionRequest::builder()
                            .collection_name(name)
                            .build()?,
                    )
                    .await
                }
            })?;
        }
        Ok(())
    }

    /// Makes the collection at `with` the one at `target`: drops `target`'s collections and
    /// renames `with`'s to their names (a reindex's swap). Processes that have `target` open
    /// see the new collection from their next request.
    pub fn replace(target: &MilvusAddress, with: &MilvusAddress) -> Result<()> {
        let old = Remote::connect(target)?;
        let new = Remote::connect(with)?;
        for (from, to) in [
            (new.excluded.clone(), old.excluded.clone()),
            (new.images.clone(), old.images.clone()),
        ] {
            old.call("replace the collection", move |c| {
                let (from, to) = (from.clone(), to.clone());
                async move {
                    c.drop_collection(
                        DropCollectionRequest::builder()
                            .collection_name(to.clone())
                            .build()?,
                    )
                    .await?;
                    c.rename_collection(
                        RenameCollectionRequest::builder()
                            .collection_name(from)
                            .new_collection_name(to)
                            .build()?,
                    )
                    .await
                }
            })?;
        }
        // A renamed collection is released: load it under its new name.
        old.load()
    }

    /// The address of the collection.
    pub fn address(&self) -> &MilvusAddress {
        &self.remote.address
    }

    fn query_rows(
        &self,
        filter: String,
        fields: &[&str],
        limit: Option<usize>,
    ) -> Result<Vec<Row>> {
        self.remote
            .query(&self.remote.images, filter, fields, limit)
    }

    /// The record in `row` (which holds `record` and `vector`).
    fn record_of(&self, row: &Row) -> Result<ImageRecord> {
        let text = row
            .get("record")
            .and_then(Value::as_str)
            .ok_or_else(|| self.corrupt("a row without its record"))?;
        let mut stored: Value = serde_json::from_str(text)?;
        let vector = row
            .get("vector")
            .cloned()
            .ok_or_else(|| self.corrupt("a row without its vector"))?;
        // The record is stored without its vector, which comes from its own field.
        stored["itc"] = Value::String(String::new());
        let mut record: ImageRecord = serde_json::from_value(stored)?;
        record.itc = serde_json::from_value(vector)?;
        Ok(record)
    }

    fn corrupt(&self, reason: &str) -> IndexError {
        IndexError::Corrupt {
            path: self.remote.address.as_path(),
            reason: reason.to_string(),
        }
    }

    /// The row written for `record`.
    fn row_of(&self, record: &ImageRecord) -> Result<Value> {
        let mut stored = serde_json::to_value(record)?;
        if let Some(o) = stored.as_object_mut() {
            o.remove("itc");
        }
        let stored = serde_json::to_string(&stored)?;
        if stored.len() > MAX_VARCHAR as usize {
            return Err(IndexError::InvalidParams(format!(
                "the record of {} is {} bytes of JSON, over the Milvus store's limit of \
                 {MAX_VARCHAR} (shorten its given texts)",
                record.path,
                stored.len()
            )));
        }
        if record.path.len() > MAX_PATH as usize {
            return Err(IndexError::InvalidParams(format!(
                "the path {} is over {MAX_PATH} bytes",
                record.path
            )));
        }
        let mut text = record
            .kept_captions()
            .chain(record.given_texts.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join("\n");
        text.push('\n');
        text.push_str(&filename_words(&record.path));
        truncate_at_char(&mut text, MAX_VARCHAR as usize);
        let day = record.exif_date.as_deref().and_then(exif_day);
        Ok(json!({
            "id": record.id.0 as i64,
            "path": record.path,
            "hash": record.content_hash,
            "width": record.width as i64,
            "height": record.height as i64,
            "day": day.map(i64::from),
            "record": stored,
            "text": text,
            "vector": record.itc,
        }))
    }

    fn check_vector(&self, v: &[f32]) -> Result<()> {
        check_vector(v, self.info.embedding_dim).map(|_| ())
    }

    /// Who holds any of `records`' ids, paths or hashes now, as `(id, path, hash)` rows.
    fn holders(&self, records: &[ImageRecord]) -> Result<Vec<(ImageId, String, String)>> {
        let list = |f: &dyn Fn(&ImageRecord) -> String| {
            records.iter().map(f).collect::<Vec<_>>().join(",")
        };
        let rows = self.query_rows(
            format!(
                "id in [{}] or path in [{}] or hash in [{}]",
                list(&|r| r.id.0.to_string()),
                list(&|r| literal(&r.path)),
                list(&|r| literal(&r.content_hash)),
            ),
            &["id", "path", "hash"],
            None,
        )?;
        rows.iter()
            .map(|r| Ok((row_id(r)?, row_str(r, "path")?, row_str(r, "hash")?)))
            .collect()
    }

    fn search(
        &self,
        field: &'static str,
        vectors: SearchVectors,
        k: usize,
        filter: &Filter,
        params: HashMap<String, String>,
    ) -> Result<Vec<(ImageId, f32)>> {
        filter.check()?;
        if k == 0 {
            return Ok(Vec::new());
        }
        let expr = filter_expr(filter);
        let name = self.remote.images.clone();
        let k = k.min(MAX_TOP_K);
        let hits = self.remote.call("search", move |c| {
            let mut b = SearchRequest::builder()
                .collection_name(name.clone())
                .vector_field(field)
                .vectors(vectors.clone())
                .output_fields(["id"])
                .limit(k as i64)
                .extra_params(params.clone())
                .consistency_level(ConsistencyLevel::Strong);
            if let Some(e) = &expr {
                b = b.filter(e.clone());
            }
            async move {
                let response = c.search(b.build()?).await?;
                let mut hits = Vec::new();
                for result in response.results().iter() {
                    let Ids::Int64(ids) = result.get_ids() else {
                        continue;
                    };
                    hits.extend(ids.iter().copied().zip(result.get_scores().iter().copied()));
                }
                Ok(hits)
            }
        })?;
        Ok(hits
            .into_iter()
            .map(|(id, score)| (ImageId(id as u64), score))
            .collect())
    }
}

impl Store for MilvusStore {
    fn info(&self) -> &CollectionInfo {
        &self.info
    }

    fn adopt_models(&mut self, requested: &CollectionInfo) -> Result<()> {
        let info = self
            .info
            .adopting(requested, &self.remote.address.as_path())?;
        if info != self.info {
            self.remote.write_info(&info)?;
            self.info = info;
        }
        Ok(())
    }

    fn allocate_id(&mut self, content_hash: &str) -> Result<ImageId> {
        Ok(self.allocate_ids(&[content_hash])?[0])
    }

    fn allocate_ids(&mut self, content_hashes: &[&str]) -> Result<Vec<ImageId>> {
        // Every candidate id of every hash, and who holds them now, in one query.
        let mut candidates = Vec::with_capacity(content_hashes.len() * ID_ATTEMPTS);
        for h in content_hashes {
            for attempt in 0..ID_ATTEMPTS {
                candidates.push(content_id(h, attempt)?.0.to_string());
            }
        }
        let held: HashMap<u64, String> = self
            .query_rows(
                format!("id in [{}]", candidates.join(",")),
                &["id", "hash"],
                None,
            )?
            .iter()
            .map(|r| Ok((row_id(r)?.0, row_str(r, "hash")?)))
            .collect::<Result<_>>()?;
        content_hashes
            .iter()
            .map(|h| {
                (0..ID_ATTEMPTS)
                    .map(|a| content_id(h, a))
                    .find(|id| {
                        id.as_ref()
                            .is_ok_and(|id| held.get(&id.0).is_none_or(|owner| owner == h))
                    })
                    .unwrap_or_else(|| {
                        Err(IndexError::Milvus(format!(
                            "content {h} collides with other content on every id it may have"
                        )))
                    })
            })
            .collect()
    }

    fn next_id(&self) -> Result<Option<ImageId>> {
        Ok(None)
    }

    fn reserve_ids(&mut self, _floor: ImageId) -> Result<()> {
        Ok(())
    }

    fn insert(&mut self, record: ImageRecord) -> Result<()> {
        self.insert_all(vec![record])
    }

    fn insert_all(&mut self, records: Vec<ImageRecord>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        // Everything is checked, against the store and within the batch, before anything is
        // written.
        for (i, record) in records.iter().enumerate() {
            self.check_vector(&record.itc)?;
            let allocated = (0..ID_ATTEMPTS)
                .any(|a| content_id(&record.content_hash, a).is_ok_and(|id| id == record.id));
            if !allocated {
                return Err(IndexError::InvalidParams(format!(
                    "id {} was not allocated for content {}",
                    record.id, record.content_hash
                )));
            }
            if let Some(earlier) = records[..i].iter().find(|r| {
                r.id == record.id || r.path == record.path || r.content_hash == record.content_hash
            }) {
                let (kind, key) = match earlier.path == record.path {
                    true => ("path", record.path.clone()),
                    false => ("content hash", record.content_hash.clone()),
                };
                return Err(IndexError::AlreadyExists {
                    kind,
                    key,
                    existing: earlier.id,
                });
            }
        }
        let holders = self.holders(&records)?;
        for record in &records {
            if let Some((id, path, _)) = holders.iter().find(|h| h.1 == record.path) {
                return Err(IndexError::AlreadyExists {
                    kind: "path",
                    key: path.clone(),
                    existing: *id,
                });
            }
            if let Some((id, _, hash)) = holders.iter().find(|h| h.2 == record.content_hash) {
                return Err(IndexError::AlreadyExists {
                    kind: "content hash",
                    key: hash.clone(),
                    existing: *id,
                });
            }
            if let Some((id, _, _)) = holders.iter().find(|h| h.0 == record.id) {
                return Err(IndexError::DuplicateId(*id));
            }
        }
        let rows = records
            .iter()
            .map(|r| self.row_of(r))
            .collect::<Result<Vec<_>>>()?;
        self.remote.upsert(&self.remote.images, rows)
    }

    fn update(&mut self, record: &ImageRecord) -> Result<()> {
        let old = self
            .get(record.id)?
            .ok_or(IndexError::NotFound(record.id))?;
        if old.itc != record.itc {
            return Err(IndexError::InvalidParams(format!(
                "the ITC vector of image {} cannot change; remove and re-add it",
                record.id
            )));
        }
        if old.content_hash != record.content_hash {
            return Err(IndexError::InvalidParams(format!(
                "the content of image {} cannot change; remove and re-add it",
                record.id
            )));
        }
        if old.path != record.path {
            if let Some(other) = self.by_path(&record.path)? {
                return Err(IndexError::AlreadyExists {
                    kind: "path",
                    key: record.path.clone(),
                    existing: other,
                });
            }
        }
        let row = self.row_of(record)?;
        self.remote.upsert(&self.remote.images, vec![row])
    }

    fn delete(&mut self, id: ImageId) -> Result<Option<ImageRecord>> {
        let Some(record) = self.get(id)? else {
            return Ok(None);
        };
        self.remote
            .delete(&self.remote.images, format!("id in [{}]", id.0))?;
        Ok(Some(record))
    }

    fn commit(&mut self) -> Result<()> {
        // Milvus made every write durable and visible (to `Strong` reads) when it answered.
        // Sealing (flush) is what lets Milvus index new rows rather than scan them, and it is
        // rate-limited by Milvus: ask for it at most every FLUSH_EVERY.
        if self.flushed.is_some_and(|t| t.elapsed() < FLUSH_EVERY) {
            return Ok(());
        }
        let name = self.remote.images.clone();
        self.remote.call("seal new rows", move |c| {
            let name = name.clone();
            async move {
                c.flush(FlushRequest::builder().collection_names([name]).build()?)
                    .await
                    .map(|_| ())
            }
        })?;
        self.flushed = Some(std::time::Instant::now());
        Ok(())
    }

    fn vector_search(
        &self,
        query: &[f32],
        k: usize,
        ef: Option<usize>,
        filter: &Filter,
    ) -> Result<Vec<(ImageId, f32)>> {
        self.check_vector(query)?;
        let k = k.min(MAX_TOP_K);
        let ef = ef.unwrap_or(DEFAULT_EF).max(k);
        self.search(
            "vector",
            SearchVectors::Float(vec![query.to_vec()]),
            k,
            filter,
            HashMap::from([("ef".to_string(), ef.to_string())]),
        )
    }

    fn text_search(&self, query: &str, k: usize, filter: &Filter) -> Result<Vec<(ImageId, f32)>> {
        check_query(query)?;
        filter.check()?;
        if !query.chars().any(char::is_alphanumeric) {
            return Ok(Vec::new());
        }
        let hits = self.search(
            "sparse",
            SearchVectors::EmbeddedText(vec![query.to_string()]),
            k,
            filter,
            HashMap::from([("drop_ratio_search".to_string(), "0.0".to_string())]),
        )?;
        // Milvus Lite reports BM25 as a negated distance, Milvus as a score: either way the
        // magnitude is the score, best first.
        Ok(hits.into_iter().map(|(id, s)| (id, s.abs())).collect())
    }

    fn get(&self, id: ImageId) -> Result<Option<ImageRecord>> {
        let rows = self.query_rows(format!("id in [{}]", id.0), &["record", "vector"], None)?;
        rows.first().map(|r| self.record_of(r)).transpose()
    }

    fn by_path(&self, path: &str) -> Result<Option<ImageId>> {
        let rows = self.query_rows(format!("path == {}", literal(path)), &["id"], None)?;
        rows.first().map(row_id).transpose()
    }

    fn by_hash(&self, hash: &str) -> Result<Option<ImageId>> {
        let rows = self.query_rows(format!("hash == {}", literal(hash)), &["id"], None)?;
        rows.first().map(row_id).transpose()
    }

    fn contains(&self, id: ImageId) -> Result<bool> {
        Ok(!self
            .query_rows(format!("id in [{}]", id.0), &["id"], None)?
            .is_empty())
    }

    fn under(&self, prefix: &str) -> Result<Vec<(ImageId, String)>> {
        let filter = Filter {
            path_prefix: Some(prefix.to_string()),
            ..Filter::default()
        };
        let expr = filter_expr(&filter).unwrap_or_else(|| "id >= 0".into());
        let mut out = Vec::new();
        for r in self
            .remote
            .query_all(&self.remote.images, expr, &["id", "path"])?
        {
            out.push((row_id(&r)?, row_str(&r, "path")?));
        }
        out.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(out)
    }

    fn exclude(&mut self, hash: &str, path: &str) -> Result<()> {
        let row = json!({"hash": hash, "path": path, "v": [0.0f32, 0.0]});
        self.remote.upsert(&self.remote.excluded, vec![row])
    }

    fn is_excluded(&self, hash: &str) -> Result<bool> {
        let rows = self.remote.query(
            &self.remote.excluded,
            format!("hash == {}", literal(hash)),
            &["hash"],
            None,
        )?;
        Ok(!rows.is_empty())
    }

    fn include(&mut self, hash: &str) -> Result<bool> {
        if !self.is_excluded(hash)? {
            return Ok(false);
        }
        self.remote.delete(
            &self.remote.excluded,
            format!("hash in [{}]", literal(hash)),
        )?;
        Ok(true)
    }

    fn exclusions(&self) -> Result<Vec<(String, String)>> {
        let rows = self.remote.query_all(
            &self.remote.excluded,
            "hash != \"\"".into(),
            &["hash", "path"],
        )?;
        let mut out = rows
            .iter()
            .map(|r| Ok((row_str(r, "hash")?, row_str(r, "path")?)))
            .collect::<Result<Vec<_>>>()?;
        out.sort();
        Ok(out)
    }

    fn for_each(&self, f: &mut dyn FnMut(ImageRecord) -> Result<()>) -> Result<()> {
        let mut ids = self
            .remote
            .query_all(&self.remote.images, "id >= 0".into(), &["id"])?
            .iter()
            .map(row_id)
            .collect::<Result<Vec<_>>>()?;
        ids.sort();
        ids.dedup();
        for chunk in ids.chunks(PAGE) {
            let list = chunk
                .iter()
                .map(|id| id.0.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let mut rows =
                self.query_rows(format!("id in [{list}]"), &["id", "record", "vector"], None)?;
            rows.sort_by_key(|r| row_id(r).map(|i| i.0).unwrap_or(u64::MAX));
            for r in &rows {
                f(self.record_of(r)?)?;
            }
        }
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        let rows = self.query_rows(String::new(), &["count(*)"], None)?;
        rows.first()
            .and_then(|r| r.get("count(*)"))
            .and_then(Value::as_u64)
            .ok_or_else(|| self.corrupt("count(*) gave no number"))
    }

    fn stats(&self) -> Result<StoreStats> {
        let n = self.len()?;
        Ok(StoreStats {
            images: n,
            vectors: n as usize,
            tombstones: 0,
            text_docs: n,
            pending: 0,
            generation: 0,
            bytes: Default::default(),
        })
    }

    fn shared(&self) -> bool {
        true
    }
}

/// One row of a query, as JSON.
type Row = serde_json::Map<String, Value>;

fn row_id(r: &Row) -> Result<ImageId> {
    r.get("id")
        .and_then(Value::as_i64)
        .map(|i| ImageId(i as u64))
        .ok_or_else(|| IndexError::Milvus("a row without an id".into()))
}

fn row_str(r: &Row, field: &str) -> Result<String> {
    r.get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| IndexError::Milvus(format!("a row without {field}")))
}

/// The id of content `hash` at `attempt`: 53 bits of the hash, from the `attempt`-th window of
/// 14 hex digits (below 2^53, so JSON readers that hold numbers as doubles read it exactly).
fn content_id(hash: &str, attempt: usize) -> Result<ImageId> {
    let window = hash
        .get(attempt * 14..attempt * 14 + 14)
        .and_then(|w| u64::from_str_radix(w, 16).ok())
        .ok_or_else(|| {
            IndexError::InvalidParams(format!("{hash:?} is not a hex SHA-256 content hash"))
        })?;
    Ok(ImageId(window >> 3))
}

/// `s` as a Milvus expression string literal (which knows the escapes `\" \' \\ \n \r \t`).
fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The Milvus boolean expression meaning `filter` (see [`Filter::accepts`]); `None` when it
/// accepts everything. A path prefix is a range of strings (`>=` the prefix, `<` its
/// [`prefix_end`]), which needs no LIKE escaping and matches exactly.
fn filter_expr(filter: &Filter) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(p) = &filter.path_prefix {
        parts.push(format!("path >= {}", literal(p)));
        if let Some(end) = prefix_end(p) {
            parts.push(format!("path < {}", literal(&end)));
        }
    }
    if filter.date_from.is_some() || filter.date_to.is_some() {
        let from = filter
            .date_from
            .as_deref()
            .and_then(day_number)
            .unwrap_or(0);
        let to = filter
            .date_to
            .as_deref()
            .and_then(day_number)
            .unwrap_or(99_999_999);
        parts.push(format!("day >= {from} and day <= {to}"));
    }
    if let Some(w) = filter.min_width {
        parts.push(format!("width >= {w}"));
    }
    if let Some(h) = filter.min_height {
        parts.push(format!("height >= {h}"));
    }
    (!parts.is_empty()).then(|| parts.join(" and "))
}

/// `s` cut to at most `max` bytes at a character boundary.
fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

impl MilvusAddress {
    /// The address as a path, for errors that name where a collection is.
    fn as_path(&self) -> std::path::PathBuf {
        Path::new(&self.to_string()).to_path_buf()
    }
}

/// The connection: a client and the runtime its calls run on.
struct Remote {
    runtime: tokio::runtime::Runtime,
    client: ClientV2,
    address: MilvusAddress,
    images: String,
    excluded: String,
}

impl Remote {
    fn connect(address: &MilvusAddress) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("milvus")
            .enable_all()
            .build()?;
        let config = ConnectConfig::new()
            .uri(format!("http://{}:{}", address.host, address.port))
            .connect_timeout(Duration::from_secs(5))
            .rpc_timeout(Duration::from_secs(60))
            // A few quick retries for a Milvus that refuses connections (it is down: answer
            // that at once), and no cut below the RPC timeout for one that is slow to answer
            // (a big query or a flush under load is not an outage).
            .retry(
                RetryConfig::new()
                    .max_attempts(4)
                    .max_retry_timeout(Duration::from_secs(60)),
            );
        let client = wait(&runtime, async move { ClientV2::new(&config).await })?
            .map_err(|e| unavailable(address, "connect", &e))?;
        Ok(Self {
            runtime,
            client,
            address: address.clone(),
            images: address.collection.clone(),
            excluded: format!("{}__excluded", address.collection),
        })
    }

    /// Runs the request `f` makes; a collection that is not loaded (after a Milvus restart) is
    /// loaded and the request tried once more.
    fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(ClientV2) -> Fut,
        Fut: Future<Output = milvus::v2::error::Result<T>> + Send + 'static,
    {
        let mut loaded = false;
        loop {
            match wait(&self.runtime, f(self.client.clone()))? {
                Ok(v) => return Ok(v),
                Err(e) if !loaded && not_loaded(&e) => {
                    loaded = true;
                    self.load()?;
                }
                Err(e) => return Err(classify(&self.address, what, e)),
            }
        }
    }

    fn load(&self) -> Result<()> {
        for name in [self.images.clone(), self.excluded.clone()] {
            let run = wait(&self.runtime, {
                let c = self.client.clone();
                async move {
                    c.load_collection(
                        LoadCollectionRequest::builder()
                            .collection_name(name)
                            .build()?,
                    )
                    .await
                }
            })?;
            run.map_err(|e| classify(&self.address, "load the collection", e))?;
        }
        Ok(())
    }

    fn read_info(&self) -> Result<Option<CollectionInfo>> {
        let name = self.images.clone();
        let exists = self.call("look for the collection", move |c| {
            let name = name.clone();
            async move {
                c.has_collection(
                    HasCollectionRequest::builder()
                        .collection_name(name)
                        .build()?,
                )
                .await
                .map(|r| r.exists())
            }
        })?;
        if !exists {
            return Ok(None);
        }
        let name = self.images.clone();
        let properties = self.call("describe the collection", move |c| {
            let name = name.clone();
            async move {
                let d = c
                    .describe_collection(
                        DescribeCollectionRequest::builder()
                            .collection_name(name)
                            .build()?,
                    )
                    .await?;
                Ok(d.description().get_properties().clone())
            }
        })?;
        let json = properties.get(INFO_PROPERTY).ok_or_else(|| {
            IndexError::InvalidParams(format!(
                "the Milvus collection {} exists but was not made by blipsearch (it has no \
                 {INFO_PROPERTY} property); name another collection",
                self.address
            ))
        })?;
        Ok(Some(serde_json::from_str(json)?))
    }

    fn write_info(&self, info: &CollectionInfo) -> Result<()> {
        let name = self.images.clone();
        let json = serde_json::to_string(info)?;
        self.call("record the models", move |c| {
            let (name, json) = (name.clone(), json.clone());
            async move {
                c.alter_collection_properties(
                    AlterCollectionPropertiesRequest::builder()
                        .collection_name(name)
                        .properties(HashMap::from([(INFO_PROPERTY.to_string(), json)]))
                        .build()?,
                )
                .await
            }
        })
    }

    /// Creates the two collections and their indexes, then records `info`.
    fn create(&self, info: &CollectionInfo) -> Result<()> {
        let dim = info.embedding_dim as u32;
        // Dynamic fields: attributes that later versions add to rows need no new schema.
        let images = CollectionSchema::new()
            .enable_dynamic_field(true)
            .add_field(int64("id").primary_key(true).auto_id(false))
            .add_field(varchar("path", MAX_PATH))
            .add_field(varchar("hash", 64))
            .add_field(int64("width"))
            .add_field(int64("height"))
            .add_field(int64("day").nullable(true))
            .add_field(varchar("record", MAX_VARCHAR))
            .add_field(
                varchar("text", MAX_VARCHAR)
                    .enable_analyzer(true)
                    .analyzer_params(json!({"type": "standard"})),
            )
            .add_field(
                FieldSchema::new()
                    .name("sparse")
                    .data_type(DataType::SparseFloatVector),
            )
            .add_field(
                FieldSchema::new()
                    .name("vector")
                    .data_type(DataType::FloatVector)
                    .dimension(dim),
            )
            .add_function(
                Function::new()
                    .name("text_bm25")
                    .function_type(FunctionType::Bm25)
                    .input_fields(["text"])
                    .output_fields(["sparse"]),
            );
        let indexes = vec![
            IndexParam::new()
                .field_name("vector")
                .index_type(IndexType::Hnsw)
                .metric_type(MetricType::Cosine)
                .extra_params(HashMap::from([
                    ("M".to_string(), "16".to_string()),
                    ("efConstruction".to_string(), "200".to_string()),
                ])),
            IndexParam::new()
                .field_name("sparse")
                .index_type(IndexType::SparseInvertedIndex)
                .metric_type(MetricType::Bm25),
        ];
        let excluded = CollectionSchema::new()
            .add_field(varchar("hash", 64).primary_key(true).auto_id(false))
            .add_field(varchar("path", MAX_PATH))
            // Milvus wants a vector in every collection.
            .add_field(
                FieldSchema::new()
                    .name("v")
                    .data_type(DataType::FloatVector)
                    .dimension(2),
            );
        let excluded_index = vec![IndexParam::new()
            .field_name("v")
            .index_type(IndexType::Flat)
            .metric_type(MetricType::L2)];
        // The excluded collection first: the images collection's property marks a complete
        // collection.
        for (name, schema, index) in [
            (self.excluded.clone(), excluded, excluded_index),
            (self.images.clone(), images, indexes),
        ] {
            self.call("create the collection", move |c| {
                let (name, schema, index) = (name.clone(), schema.clone(), index.clone());
                async move {
                    let exists = c
                        .has_collection(
                            HasCollectionRequest::builder()
                                .collection_name(name.clone())
                                .build()?,
                        )
                        .await?
                        .exists();
                    if exists {
                        return Ok(());
                    }
                    c.create_collection(
                        CreateCollectionRequest::builder()
                            .collection_name(name.clone())
                            .schema(schema)
                            .build()?,
                    )
                    .await?;
                    // Not waiting for the build (the wait needs an RPC Milvus Lite lacks):
                    // loading the collection waits for its indexes.
                    c.create_index(
                        CreateIndexRequest::builder()
                            .collection_name(name)
                            .index_params(index)
                            .sync(false)
                            .build()?,
                    )
                    .await
                }
            })?;
        }
        self.write_info(info)
    }

    /// Writes `rows` into `collection`, replacing rows with the same primary key.
    fn upsert(&self, collection: &str, rows: Vec<Value>) -> Result<()> {
        let name = collection.to_string();
        self.call("write", move |c| {
            let (name, rows) = (name.clone(), rows.clone());
            async move {
                let insert = InsertRequest::builder()
                    .collection_name(name)
                    .rows(rows)
                    .build()?;
                c.upsert(UpsertRequest::builder().insert(insert).build()?)
                    .await
                    .map(|_| ())
            }
        })
    }

    /// Deletes the rows of `collection` that `filter` selects.
    fn delete(&self, collection: &str, filter: String) -> Result<()> {
        let name = collection.to_string();
        self.call("remove", move |c| {
            let (name, filter) = (name.clone(), filter.clone());
            async move {
                c.delete(
                    DeleteRequest::builder()
                        .collection_name(name)
                        .filter(filter)
                        .build()?,
                )
                .await
                .map(|_| ())
            }
        })
    }

    fn query(
        &self,
        collection: &str,
        filter: String,
        fields: &[&str],
        limit: Option<usize>,
    ) -> Result<Vec<Row>> {
        let name = collection.to_string();
        let fields: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
        self.call("read", move |c| {
            let mut b = QueryRequest::builder()
                .collection_name(name.clone())
                .filter(filter.clone())
                .output_fields(fields.clone())
                .consistency_level(ConsistencyLevel::Strong);
            if let Some(l) = limit {
                b = b.limit(l as i64);
            }
            async move { c.query(b.build()?).await?.results().get_output_rows() }
        })
    }

    /// Every row passing `filter`, page by page of ids (Milvus caps one query's rows).
    fn query_all(&self, collection: &str, filter: String, fields: &[&str]) -> Result<Vec<Row>> {
        let key = if collection == self.images {
            "id"
        } else {
            "hash"
        };
        let mut fields: Vec<&str> = fields.to_vec();
        if !fields.contains(&key) {
            fields.push(key);
        }
        let mut out: Vec<Row> = Vec::new();
        let mut after: Option<Value> = None;
        loop {
            let page_filter = match (&after, key) {
                (None, _) => filter.clone(),
                (Some(v), "id") => format!("({filter}) and id > {v}"),
                (Some(v), _) => format!(
                    "({filter}) and hash > {}",
                    literal(v.as_str().unwrap_or_default())
                ),
            };
            // Rows come in key order only by chance: sort the page, and ask for the rest by key.
            let mut page = self.query(collection, page_filter, &fields, Some(PAGE))?;
            let n = page.len();
            page.sort_by(|a, b| compare_key(a, b, key));
            after = page.last().and_then(|r| r.get(key)).cloned();
            out.extend(page);
            if n < PAGE {
                return Ok(out);
            }
        }
    }
}

fn compare_key(a: &Row, b: &Row, key: &str) -> std::cmp::Ordering {
    match (a.get(key), b.get(key)) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x.as_i64().cmp(&y.as_i64()),
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        _ => std::cmp::Ordering::Equal,
    }
}

fn int64(name: &str) -> FieldSchema {
    FieldSchema::new().name(name).data_type(DataType::Int64)
}

fn varchar(name: &str, max: u32) -> FieldSchema {
    FieldSchema::new()
        .name(name)
        .data_type(DataType::VarChar)
        .max_length(max)
}

/// Runs `fut` on `runtime` and waits for it from this thread, whatever runtime this thread is
/// in.
fn wait<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .map_err(|_| IndexError::Milvus("the Milvus client stopped".into()))
}

/// Whether `e` says the collection must be loaded first (as after a Milvus restart).
fn not_loaded(e: &milvus::v2::error::Error) -> bool {
    let text = e.to_string();
    text.contains("call load()") || text.contains("not loaded") || text.contains("released")
}

/// The store error for a failed request: [`IndexError::Unavailable`] when Milvus could not be
/// reached or did not answer, [`IndexError::Milvus`] when it refused.
fn classify(address: &MilvusAddress, what: &str, e: milvus::v2::error::Error) -> IndexError {
    use milvus::v2::error::Error as E;
    match &e {
        E::RetryExhausted { source, .. } if is_transport(source) => unavailable(address, what, &e),
        e if is_transport(e) => unavailable(address, what, e),
        _ => IndexError::Milvus(format!("{address}: cannot {what}: {e}")),
    }
}

fn is_transport(e: &milvus::v2::error::Error) -> bool {
    use milvus::v2::error::Error as E;
    match e {
        E::Grpc(status) => matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Aborted
        ),
        E::Timeout(_) | E::Cancelled(_) => true,
        E::RetryExhausted { source, .. } => is_transport(source),
        E::Unexpected(m) => m.contains("connect"),
        _ => false,
    }
}

fn unavailable(address: &MilvusAddress, what: &str, e: &dyn fmt::Display) -> IndexError {
    IndexError::Unavailable(format!(
        "cannot {what}: Milvus at {address} does not answer ({e})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print() {
        let a: MilvusAddress = "milvus://127.0.0.1:19531/photos_2".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 19531));
        assert_eq!(a.collection, "photos_2");
        assert_eq!(a.to_string(), "milvus://127.0.0.1:19531/photos_2");
        let d: MilvusAddress = "milvus://db/photos".parse().unwrap();
        assert_eq!(d.port, 19530);
        for bad in [
            "http://h:1/c",
            "milvus://h:1",
            "milvus://h:x/c",
            "milvus://:1/c",
            "milvus://h:1/2c",
            "milvus://h:1/a-b",
            "milvus://h:1/",
        ] {
            assert!(bad.parse::<MilvusAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn literals_escape_what_the_parser_knows() {
        assert_eq!(literal("a\"b\\c\nd\te"), "\"a\\\"b\\\\c\\nd\\te\"");
        assert_eq!(literal("/photos/été 50%_x"), "\"/photos/été 50%_x\"");
    }

    #[test]
    fn ids_come_from_the_hash_and_stay_below_2_pow_53() {
        let h = super::super::record::content_hash(b"bytes");
        let ids: Vec<u64> = (0..ID_ATTEMPTS)
            .map(|a| content_id(&h, a).unwrap().0)
            .collect();
        assert!(ids.iter().all(|&i| i < 1 << 53));
        assert_eq!(ids[0], u64::from_str_radix(&h[..14], 16).unwrap() >> 3);
        assert_ne!(ids[0], ids[1]);
        assert!(content_id("not hex", 0).is_err());
    }

    #[test]
    fn filters_become_expressions() {
        assert_eq!(filter_expr(&Filter::default()), None);
        let f = Filter {
            path_prefix: Some("/a/\"b".into()),
            date_from: Some("2020-01-01".into()),
            date_to: None,
            min_width: Some(10),
            min_height: None,
        };
        assert_eq!(
            filter_expr(&f).unwrap(),
            "path >= \"/a/\\\"b\" and path < \"/a/\\\"c\" and day >= 20200101 and day <= 99999999 \
             and width >= 10"
        );
    }
}
