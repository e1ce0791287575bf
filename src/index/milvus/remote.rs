//! The connection to Milvus behind a [`super::MilvusStore`]: a client on a runtime of its own,
//! the collections' schemas, and the few requests the store makes (query, upsert, delete,
//! properties), with Milvus' errors sorted into "unavailable" and "refused".

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use milvus::v2::prelude::*;
use serde_json::{json, Value};

use super::address::MilvusAddress;
use super::expr::literal;
use crate::index::error::{IndexError, Result};
use crate::index::moderation::MAX_LIST_NAME;
use crate::index::record::CollectionInfo;

/// The collection property holding the [`CollectionInfo`] as JSON.
const INFO_PROPERTY: &str = "blipsearch.collection";
/// Longest path stored.
pub(super) const MAX_PATH: u32 = 4096;
/// Longest `record` and `text`, in bytes (Milvus' VARCHAR limit).
pub(super) const MAX_VARCHAR: u32 = 65_535;
/// Rows fetched per query when reading many.
pub(super) const PAGE: usize = 1000;
/// Longest key of a match-list row: a list name, `/`, an entry id in decimal.
const MAX_LIST_KEY: u32 = MAX_LIST_NAME as u32 + 1 + 20;

/// One row of a query, as JSON.
pub(super) type Row = serde_json::Map<String, Value>;

/// The connection: a client and the runtime its calls run on.
pub(super) struct Remote {
    runtime: tokio::runtime::Runtime,
    client: ClientV2,
    pub(super) address: MilvusAddress,
    pub(super) images: String,
    pub(super) excluded: String,
    pub(super) lists: String,
}

impl Remote {
    pub(super) fn connect(address: &MilvusAddress) -> Result<Self> {
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
            lists: format!("{}__lists", address.collection),
        })
    }

    /// Runs the request `f` makes; a collection that is not loaded (after a Milvus restart) is
    /// loaded and the request tried once more.
    pub(super) fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
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

    pub(super) fn load(&self) -> Result<()> {
        for name in [
            self.images.clone(),
            self.excluded.clone(),
            self.lists.clone(),
        ] {
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

    pub(super) fn read_info(&self) -> Result<Option<CollectionInfo>> {
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

    pub(super) fn write_info(&self, info: &CollectionInfo) -> Result<()> {
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
    pub(super) fn create(&self, info: &CollectionInfo) -> Result<()> {
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
            .add_field(dummy_vector());
        // The images collection last: its property marks a complete collection.
        self.create_one(&self.excluded, excluded, vec![dummy_vector_index()])?;
        self.create_lists()?;
        self.create_one(&self.images, images, indexes)?;
        self.write_info(info)
    }

    /// Creates the match-list collection (one row per list, `entry` -1, and one per entry) if
    /// it does not exist: a collection made before match lists has none until its next open.
    pub(super) fn create_lists(&self) -> Result<()> {
        let lists = CollectionSchema::new()
            .add_field(
                varchar("key", MAX_LIST_KEY)
                    .primary_key(true)
                    .auto_id(false),
            )
            .add_field(varchar("list", MAX_LIST_NAME as u32))
            .add_field(int64("entry"))
            .add_field(varchar("data", MAX_VARCHAR))
            .add_field(dummy_vector());
        self.create_one(&self.lists, lists, vec![dummy_vector_index()])
    }

    /// Creates collection `name` with `schema` and `index` unless it exists (also when another
    /// process creates it at the same time).
    fn create_one(
        &self,
        name: &str,
        schema: CollectionSchema,
        index: Vec<IndexParam>,
    ) -> Result<()> {
        let name = name.to_string();
        let exists = |c: ClientV2, name: String| async move {
            c.has_collection(
                HasCollectionRequest::builder()
                    .collection_name(name)
                    .build()?,
            )
            .await
            .map(|r| r.exists())
        };
        if self.call("look for a collection", |c| exists(c, name.clone()))? {
            return Ok(());
        }
        let target = name.clone();
        let made = self.call("create the collection", move |c| {
            let (name, schema, index) = (target.clone(), schema.clone(), index.clone());
            async move {
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
        });
        match made {
            Err(e) if self.call("look for a collection", |c| exists(c, name.clone()))? => {
                tracing::debug!(collection = %name, error = %e, "created meanwhile by another process");
                Ok(())
            }
            other => other,
        }
    }

    /// Writes `rows` into `collection`, replacing rows with the same primary key.
    pub(super) fn upsert(&self, collection: &str, rows: Vec<Value>) -> Result<()> {
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
    pub(super) fn delete(&self, collection: &str, filter: String) -> Result<()> {
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

    pub(super) fn query(
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

    /// Every row passing `filter`, page by page of ids.
    pub(super) fn query_all(
        &self,
        collection: &str,
        filter: String,
        fields: &[&str],
    ) -> Result<Vec<Row>> {
        self.query_first(collection, filter, fields, usize::MAX)
    }

    /// The first `max` rows passing `filter` in primary-key order, page by page (Milvus caps
    /// one query's rows). Each page is asked for as an iterator's: only then does Milvus answer
    /// the rows of lowest key (a plain query with a limit answers any rows that pass, and
    /// paging on from the last key of those would skip rows).
    pub(super) fn query_first(
        &self,
        collection: &str,
        filter: String,
        fields: &[&str],
        max: usize,
    ) -> Result<Vec<Row>> {
        let key = self.primary_key(collection);
        let mut fields: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
        if !fields.iter().any(|f| f == key) {
            fields.push(key.to_string());
        }
        let mut out: Vec<Row> = Vec::new();
        let mut after: Option<Value> = None;
        while out.len() < max {
            let page_filter = match &after {
                None => filter.clone(),
                Some(Value::String(s)) => format!("({filter}) and {key} > {}", literal(s)),
                Some(v) => format!("({filter}) and {key} > {v}"),
            };
            let want = PAGE.min(max - out.len());
            let (name, fields) = (collection.to_string(), fields.clone());
            let mut page = self.call("read", move |c| {
                let request = QueryRequest::builder()
                    .collection_name(name.clone())
                    .filter(page_filter.clone())
                    .output_fields(fields.clone())
                    .limit(want as i64)
                    .extra_params(HashMap::from([("iterator".into(), "true".into())]))
                    .consistency_level(ConsistencyLevel::Strong);
                async move { c.query(request.build()?).await?.results().get_output_rows() }
            })?;
            let n = page.len();
            page.sort_by(|a, b| compare_key(a, b, key));
            let last = page.last().and_then(|r| r.get(key)).cloned();
            out.extend(page);
            if n < want {
                break;
            }
            after = last;
        }
        Ok(out)
    }

    /// The number of rows of `collection` passing `filter`.
    pub(super) fn count(&self, collection: &str, filter: String) -> Result<u64> {
        let rows = self.query(collection, filter, &["count(*)"], None)?;
        rows.first()
            .and_then(|r| r.get("count(*)"))
            .and_then(Value::as_u64)
            .ok_or_else(|| IndexError::Milvus(format!("{}: count(*) gave no number", self.address)))
    }

    /// The primary key field of one of the three collections.
    fn primary_key(&self, collection: &str) -> &'static str {
        if collection == self.images {
            "id"
        } else if collection == self.lists {
            "key"
        } else {
            "hash"
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

/// The vector field of a collection that needs none (Milvus wants one in every collection).
fn dummy_vector() -> FieldSchema {
    FieldSchema::new()
        .name("v")
        .data_type(DataType::FloatVector)
        .dimension(2)
}

fn dummy_vector_index() -> IndexParam {
    IndexParam::new()
        .field_name("v")
        .index_type(IndexType::Flat)
        .metric_type(MetricType::L2)
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
