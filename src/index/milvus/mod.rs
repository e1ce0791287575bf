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
//! | `text` | VARCHAR, standard analyser | product title (twice) and description, kept captions, given texts, file-name words |
//! | `sparse` | SPARSE_FLOAT_VECTOR | BM25 of `text`, computed by Milvus (a BM25 function) |
//! | `vector` | FLOAT_VECTOR, HNSW, COSINE | the ITC embedding |
//!
//! The collection has dynamic fields enabled, so that products join rows without a new schema.
//! A row of an image of a product has three dynamic keys:
//!
//! | key | holds |
//! |---|---|
//! | `product` | the product's id |
//! | `attrs` | its attributes, a JSON object by name (strings, numbers, booleans) |
//! | `attr_days` | for each attribute whose value is a calendar day, the day as `YYYYMMDD` |
//!
//! Attribute filters test `attrs["name"]` (`attr_days["name"]` for date ranges); rows without
//! these keys (images without a product, rows written before products were stored) fail every
//! attribute filter and are otherwise read as before.
//!
//! Moderation adds four more keys to every row, copies of the record's `pdq` and `flags`:
//!
//! | key | holds |
//! |---|---|
//! | `flag_lists` | the names of the lists the image has an active (not cleared) flag of |
//! | `pending_lists` | the names of the lists it has a pending (undecided) flag of |
//! | `pdq`, `pdq_quality` | its PDQ hash (64 hex digits) and quality, or null |
//!
//! A flag filter is `json_contains(flag_lists, "NAME")` (`pending_lists` for pending flags only),
//! or `flag_lists[0] >= ""` for any list; [`Store::pdq_hashes`] reads `pdq` and `pdq_quality`
//! alone. Rows written before moderation have none of these keys: they pass no flag filter,
//! which is right, since they have no flags.
//!
//! The [`CollectionInfo`] (with the attribute [`Schema`]) lives in the collection's property
//! `blipsearch.collection`; removed content hashes live in a second collection,
//! `<name>__excluded`; match lists in a third, `<name>__lists`: a row per list (`key` its name,
//! `entry` -1, `data` its [`ListInfo`] as JSON) and a row per entry (`key` `NAME/ID`, `list`,
//! `entry` its id, `data` the [`ListEntry`] as JSON). A list's count of entries is counted when
//! asked, so that processes writing one list at once never disagree on it. A collection made
//! before match lists gets its `__lists` collection at its next open.
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
//! query syntax (quotes and operators are words). A product's title is written into `text`
//! twice, so that a word of the title counts twice for BM25 (saturating, as BM25 does): the
//! nearest this field comes to the embedded store's title boost, and enough for a title to
//! outrank a description that has the same word once.
//!
//! The store is synchronous like the trait; each call runs on a small Tokio runtime of its own,
//! so it may be called from any thread, inside another runtime or not. A Milvus that cannot be
//! reached is [`IndexError::Unavailable`]; the next call tries again.
//!
//! `address` parses [`MilvusAddress`]; `expr` builds expressions; `remote` holds the connection,
//! the schemas and the requests; this file maps the [`Store`] trait onto them.

mod address;
mod expr;
mod remote;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use milvus::v2::prelude::*;
use serde_json::{json, Value};

use super::attributes::{merge_schema, Product, Schema};
use super::error::{IndexError, Result};
use super::filter::{exif_day, Filter};
use super::id::ImageId;
use super::moderation::{check_entry, check_list_name, ListEntry, ListInfo};
use super::pdq::{Pdq, PdqHash};
use super::record::{now_unix, CollectionInfo, ImageRecord};
use super::simd::dot;
use super::store::{Store, StoreStats};
use super::text::{check_query, filename_words};
use super::topk::TopK;
use super::vectors::check_vector;
pub use address::MilvusAddress;
use expr::{
    filter_expr, literal, ATTRS_KEY, DAYS_KEY, FLAG_LISTS_KEY, PDQ_KEY, PDQ_QUALITY_KEY,
    PENDING_LISTS_KEY, PRODUCT_KEY,
};
use remote::{Remote, Row, MAX_PATH, MAX_VARCHAR, PAGE};

/// Most results one search returns (Milvus' top-k limit).
pub const MAX_TOP_K: usize = 16_384;
/// `ef` when the caller gives none.
const DEFAULT_EF: usize = 64;
/// Most passing rows a short filtered vector search scans exactly.
const EXACT_SCAN_MAX: usize = 10_000;
/// Least time between two flushes that [`Store::commit`] asks for.
const FLUSH_EVERY: Duration = Duration::from_secs(10);
/// How many windows of the content hash are tried as an id.
const ID_ATTEMPTS: usize = 4;
/// Most product ids one query names, to keep its expression short.
const NAMES_PER_QUERY: usize = 256;

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
        remote.create_lists()?;
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
        remote.create_lists()?;
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
        for name in [
            remote.images.clone(),
            remote.excluded.clone(),
            remote.lists.clone(),
        ] {
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
        // The images collection last: its property marks a complete collection.
        for (from, to) in [
            (new.excluded.clone(), old.excluded.clone()),
            (new.lists.clone(), old.lists.clone()),
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
                 {MAX_VARCHAR} (shorten its given texts or its product's description)",
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
        // The product's texts first, so that a cut for length takes captions, not them; the
        // title twice, to weigh like the embedded store's title boost (see the module docs).
        let product = record.product.as_ref();
        let title = product.and_then(|p| p.title.as_deref());
        let description = product.and_then(|p| p.description.as_deref());
        let mut text = [title, title, description]
            .into_iter()
            .flatten()
            .chain(record.kept_captions())
            .chain(record.given_texts.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join("\n");
        text.push('\n');
        text.push_str(&filename_words(&record.path));
        truncate_at_char(&mut text, MAX_VARCHAR as usize);
        let day = record.exif_date.as_deref().and_then(exif_day);
        let mut row = json!({
            "id": record.id.0 as i64,
            "path": record.path,
            "hash": record.content_hash,
            "width": record.width as i64,
            "height": record.height as i64,
            "day": day.map(i64::from),
            "record": stored,
            "text": text,
            "vector": record.itc,
        });
        // Written as null without a product: an upsert without a key would keep the key of the
        // row it replaces (an image that left its product would still be found under it).
        let (id, attrs, days) = match product {
            Some(p) => {
                let days: serde_json::Map<String, Value> = p
                    .attributes
                    .iter()
                    .filter_map(|(name, v)| v.as_day().map(|d| (name.clone(), json!(d))))
                    .collect();
                (
                    json!(p.id),
                    serde_json::to_value(&p.attributes)?,
                    Value::Object(days),
                )
            }
            None => (Value::Null, Value::Null, Value::Null),
        };
        row[PRODUCT_KEY] = id;
        row[ATTRS_KEY] = attrs;
        row[DAYS_KEY] = days;
        // Always written, for the same reason: an update that clears a flag must clear its key.
        let mut active: Vec<&str> = Vec::new();
        let mut pending: Vec<&str> = Vec::new();
        for f in &record.flags {
            if f.active() && !active.contains(&f.list.as_str()) {
                active.push(&f.list);
            }
            if f.pending() && !pending.contains(&f.list.as_str()) {
                pending.push(&f.list);
            }
        }
        row[FLAG_LISTS_KEY] = json!(active);
        row[PENDING_LISTS_KEY] = json!(pending);
        row[PDQ_KEY] = json!(record.pdq.map(|p| p.hash.to_hex()));
        row[PDQ_QUALITY_KEY] = json!(record.pdq.map(|p| p.quality));
        Ok(row)
    }

    /// The stored header of list `name` (its `entries` not counted), if there is one.
    fn list_header(&self, name: &str) -> Result<Option<ListInfo>> {
        let rows = self.remote.query(
            &self.remote.lists,
            format!("key == {} and entry < 0", literal(name)),
            &["data"],
            None,
        )?;
        rows.first().map(|r| self.list_data(r)).transpose()
    }

    /// List `name` with its entries counted, or [`IndexError::NoList`].
    fn list_info(&self, name: &str) -> Result<ListInfo> {
        let mut info = self
            .list_header(name)?
            .ok_or_else(|| IndexError::NoList(name.to_string()))?;
        info.entries = self.count_entries(name)?;
        Ok(info)
    }

    fn count_entries(&self, list: &str) -> Result<u64> {
        self.remote.count(
            &self.remote.lists,
            format!("list == {} and entry >= 0", literal(list)),
        )
    }

    /// The JSON in the `data` field of a row of the lists collection.
    fn list_data<T: serde::de::DeserializeOwned>(&self, row: &Row) -> Result<T> {
        let text = row
            .get("data")
            .and_then(Value::as_str)
            .ok_or_else(|| self.corrupt("a list row without its data"))?;
        Ok(serde_json::from_str(text)?)
    }

    /// The row of the lists collection for `key`, `list`, `entry` holding `data`.
    fn list_row(key: String, list: &str, entry: i64, data: String) -> Result<Value> {
        if data.len() > MAX_VARCHAR as usize {
            return Err(IndexError::InvalidParams(format!(
                "{key}: {} bytes of JSON, over the Milvus store's limit of {MAX_VARCHAR}",
                data.len()
            )));
        }
        Ok(json!({"key": key, "list": list, "entry": entry, "data": data, "v": [0.0f32, 0.0]}))
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
    /// A query with the filter's expression, page by page of ids.
    fn matching(&self, filter: &Filter, limit: usize) -> Result<Vec<ImageId>> {
        filter.check()?;
        let expr = filter_expr(filter).unwrap_or_else(|| "id >= 0".into());
        self.remote
            .query_first(&self.remote.images, expr, &["id"], limit)?
            .iter()
            .map(row_id)
            .collect()
    }

    /// The rows' `pdq` and `pdq_quality` keys, without their records. Every row is read, those
    /// without a hash skipped here: a filter on the key would have Milvus parse every row's
    /// dynamic keys once per page (three times slower on Milvus Lite at 20k images).
    fn pdq_hashes(&self) -> Result<Vec<(ImageId, Pdq)>> {
        let rows = self.remote.query_all(
            &self.remote.images,
            "id >= 0".into(),
            &["id", PDQ_KEY, PDQ_QUALITY_KEY],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let hash = match r.get(PDQ_KEY) {
                None | Some(Value::Null) => continue,
                Some(v) => v.as_str().and_then(PdqHash::from_hex),
            };
            let quality = r
                .get(PDQ_QUALITY_KEY)
                .and_then(Value::as_u64)
                .and_then(|q| u8::try_from(q).ok());
            match (hash, quality) {
                (Some(hash), Some(quality)) => out.push((row_id(r)?, Pdq { hash, quality })),
                _ => return Err(self.corrupt("a row with a bad pdq or pdq_quality key")),
            }
        }
        Ok(out)
    }

    /// A header row. Entries left by a list of the same name whose deletion did not finish
    /// (or that another process added while it was deleted) are removed first, so that the new
    /// list is empty. Two processes creating one name at once may both succeed.
    fn create_list(&mut self, name: &str) -> Result<ListInfo> {
        check_list_name(name)?;
        if self.list_header(name)?.is_some() {
            return Err(IndexError::ListExists(name.to_string()));
        }
        self.remote
            .delete(&self.remote.lists, format!("list == {}", literal(name)))?;
        let info = ListInfo {
            name: name.to_string(),
            entries: 0,
            created_unix: now_unix(),
        };
        let row = Self::list_row(name.to_string(), name, -1, serde_json::to_string(&info)?)?;
        self.remote.upsert(&self.remote.lists, vec![row])?;
        Ok(info)
    }

    /// The header first (the list is gone for every reader from then), then the entries.
    fn delete_list(&mut self, name: &str) -> Result<Option<ListInfo>> {
        let info = match self.list_info(name) {
            Ok(info) => info,
            Err(IndexError::NoList(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        self.remote
            .delete(&self.remote.lists, format!("key in [{}]", literal(name)))?;
        self.remote
            .delete(&self.remote.lists, format!("list == {}", literal(name)))?;
        Ok(Some(info))
    }

    fn lists(&self) -> Result<Vec<ListInfo>> {
        let mut out = Vec::new();
        for row in self
            .remote
            .query_all(&self.remote.lists, "entry < 0".into(), &["data"])?
        {
            let mut info: ListInfo = self.list_data(&row)?;
            info.entries = self.count_entries(&info.name)?;
            out.push(info);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Checked, then written a page of rows at a time (a failure midway leaves the pages
    /// before it written).
    fn add_entries(&mut self, entries: &[ListEntry]) -> Result<()> {
        for e in entries {
            check_entry(e, self.info.embedding_dim)?;
        }
        let names: BTreeSet<&str> = entries.iter().map(|e| e.list.as_str()).collect();
        let names: Vec<&str> = names.into_iter().collect();
        for chunk in names.chunks(NAMES_PER_QUERY) {
            let list: Vec<String> = chunk.iter().map(|n| literal(n)).collect();
            let found: BTreeSet<String> = self
                .remote
                .query(
                    &self.remote.lists,
                    format!("key in [{}] and entry < 0", list.join(",")),
                    &["key"],
                    None,
                )?
                .iter()
                .map(|r| row_str(r, "key"))
                .collect::<Result<_>>()?;
            if let Some(missing) = chunk.iter().find(|n| !found.contains(**n)) {
                return Err(IndexError::NoList(missing.to_string()));
            }
        }
        // One row per key, the last entry given for it (Milvus takes one upsert per key).
        let mut rows: BTreeMap<String, Value> = BTreeMap::new();
        for e in entries {
            let key = format!("{}/{}", e.list, e.id);
            let row = Self::list_row(key.clone(), &e.list, e.id as i64, serde_json::to_string(e)?)?;
            rows.insert(key, row);
        }
        let rows: Vec<Value> = rows.into_values().collect();
        for page in rows.chunks(PAGE) {
            self.remote.upsert(&self.remote.lists, page.to_vec())?;
        }
        Ok(())
    }

    fn remove_entry(&mut self, list: &str, id: u64) -> Result<Option<ListEntry>> {
        if self.list_header(list)?.is_none() {
            return Err(IndexError::NoList(list.to_string()));
        }
        let key = literal(&format!("{list}/{id}"));
        let rows =
            self.remote
                .query(&self.remote.lists, format!("key == {key}"), &["data"], None)?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let entry: ListEntry = self.list_data(row)?;
        self.remote
            .delete(&self.remote.lists, format!("key in [{key}]"))?;
        Ok(Some(entry))
    }

    /// Entries of lists that exist (one whose deletion did not finish leaves its entries
    /// behind, unlisted).
    fn entries(&self, list: Option<&str>) -> Result<Vec<ListEntry>> {
        let (filter, lists) = match list {
            Some(name) => {
                if self.list_header(name)?.is_none() {
                    return Err(IndexError::NoList(name.to_string()));
                }
                (
                    format!("list == {} and entry >= 0", literal(name)),
                    BTreeSet::from([name.to_string()]),
                )
            }
            None => (
                "entry >= 0".to_string(),
                self.remote
                    .query_all(&self.remote.lists, "entry < 0".into(), &["list"])?
                    .iter()
                    .map(|r| row_str(r, "list"))
                    .collect::<Result<_>>()?,
            ),
        };
        let mut out: Vec<ListEntry> = Vec::new();
        for row in self
            .remote
            .query_all(&self.remote.lists, filter, &["list", "data"])?
        {
            if lists.contains(&row_str(&row, "list")?) {
                out.push(self.list_data(&row)?);
            }
        }
        out.sort_by(|a, b| a.list.cmp(&b.list).then(a.id.cmp(&b.id)));
        Ok(out)
    }

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

    fn extend_schema(&mut self, attributes: &Schema) -> Result<()> {
        // Another process may have added attributes since this one read the info.
        let mut info = self
            .remote
            .read_info()?
            .unwrap_or_else(|| self.info.clone());
        merge_schema(&mut info.attributes, attributes)?;
        if info != self.info {
            self.remote.write_info(&info)?;
            self.info = info;
        }
        Ok(())
    }

    /// One query by ids per thousand of them, reading each product from its row's record.
    fn products_of(&self, ids: &[ImageId]) -> Result<Vec<Option<Product>>> {
        /// The part of a stored record this reads.
        #[derive(serde::Deserialize)]
        struct OfRecord {
            #[serde(default)]
            product: Option<Product>,
        }
        let mut found: HashMap<u64, Option<Product>> = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(PAGE) {
            let list = chunk
                .iter()
                .map(|id| id.0.to_string())
                .collect::<Vec<_>>()
                .join(",");
            for row in self.query_rows(format!("id in [{list}]"), &["id", "record"], None)? {
                let text = row
                    .get("record")
                    .and_then(Value::as_str)
                    .ok_or_else(|| self.corrupt("a row without its record"))?;
                let of: OfRecord = serde_json::from_str(text)?;
                found.insert(row_id(&row)?.0, of.product);
            }
        }
        Ok(ids
            .iter()
            .map(|id| found.get(&id.0).cloned().flatten())
            .collect())
    }

    /// A query on the rows' `product` key (every row that has one when `products` is `None`),
    /// page by page.
    fn product_images(
        &self,
        products: Option<&[String]>,
    ) -> Result<BTreeMap<String, Vec<ImageId>>> {
        let filters: Vec<String> = match products {
            // Every string is `>=` the empty one; a row without the key compares with nothing.
            None => vec![format!("{PRODUCT_KEY} >= \"\"")],
            Some(names) => names
                .chunks(NAMES_PER_QUERY)
                .map(|chunk| {
                    let list: Vec<String> = chunk.iter().map(|n| literal(n)).collect();
                    format!("{PRODUCT_KEY} in [{}]", list.join(","))
                })
                .collect(),
        };
        let mut out: BTreeMap<String, Vec<ImageId>> = BTreeMap::new();
        for filter in filters {
            for row in self
                .remote
                .query_all(&self.remote.images, filter, &["id", PRODUCT_KEY])?
            {
                out.entry(row_str(&row, PRODUCT_KEY)?)
                    .or_default()
                    .push(row_id(&row)?);
            }
        }
        for ids in out.values_mut() {
            ids.sort_unstable();
            ids.dedup();
        }
        Ok(out)
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
        let hits = self.search(
            "vector",
            SearchVectors::Float(vec![query.to_vec()]),
            k,
            filter,
            HashMap::from([("ef".to_string(), ef.to_string())]),
        )?;
        match filter_expr(filter) {
            // A filtered graph search can come back short when few rows pass (Milvus Lite's
            // does at 1%): then the passing rows, when few, are scanned exactly, so that `k`
            // results come back whenever `k` pass.
            Some(expr) if hits.len() < k => {
                let rows = self.query_rows(expr, &["id", "vector"], Some(EXACT_SCAN_MAX + 1))?;
                if rows.len() <= hits.len() || rows.len() > EXACT_SCAN_MAX {
                    return Ok(hits);
                }
                let mut top = TopK::new(k);
                for row in &rows {
                    let v: Vec<f32> = serde_json::from_value(
                        row.get("vector")
                            .cloned()
                            .ok_or_else(|| self.corrupt("a row without its vector"))?,
                    )?;
                    top.offer(dot(query, &v), row_id(row)?.0);
                }
                Ok(top
                    .into_sorted()
                    .into_iter()
                    .map(|(id, s)| (ImageId(id), s))
                    .collect())
            }
            _ => Ok(hits),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
