//! [`Engine::reindex`]: every image of a collection embedded again from its original file into a
//! new collection beside it, swapped in only once complete. Match lists, flags with their
//! decisions, and the audit log carry over.

use std::path::{Path, PathBuf};

use super::collection::{sibling, Engine, Location, StoreLocation};
use super::error::{EngineError, Result};
use super::ingest::{Failure, IngestOptions, IngestSummary, Ingestor};
use super::models::Encoders;
use super::upload_folder::uploads_dir;
use crate::index::{BlobStore, CollectionInfo, MilvusAddress, MilvusStore, AUDIT_FILE};
use crate::progress::{Event, Progress};

impl Engine {
    /// Embeds every image of the collection at `at` again, from its original file, with
    /// `models`, into a new collection beside it, which replaces the old one only once complete
    /// (an interrupted reindex leaves the old collection as it was). Every image keeps its id
    /// given texts and product; uploaded files stay with the collection. Files that are gone are left
    /// out, with a warning event each. With Milvus, the new collection is `<name>_reindex`
    /// until it replaces the old one (other processes serving it see the new one from then).
    ///
    /// Match lists and their entries carry over, and every image keeps its flags and their
    /// decisions; the images are checked against the lists again as they are embedded (new
    /// matches are flagged and audited). When the retrieval model changes, the reference
    /// vectors of list entries were made by the old one and cannot be compared with the new
    /// vectors: they are dropped (the entries keep their PDQ hashes), with a note saying so.
    /// The audit log stays the collection's.
    pub fn reindex<M: Encoders + ?Sized>(
        at: impl Into<Location>,
        models: &M,
        info: &CollectionInfo,
        options: IngestOptions,
        observer: &dyn Progress,
    ) -> Result<IngestSummary> {
        let at = at.into();
        let dir = at.dir.as_path();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| EngineError::Io { path, source }
        };
        let mut paths = Vec::new();
        let mut given = std::collections::HashMap::new();
        let mut ids = std::collections::HashMap::new();
        let mut products = std::collections::HashMap::new();
        let mut flags = std::collections::HashMap::new();
        let (next_id, exclusions, attributes, lists, mut entries, old_info) = {
            let old = Engine::open_existing(at.clone())?;
            old.for_each(&mut |r| {
                paths.push(PathBuf::from(&r.path));
                given.insert(r.path.clone(), r.given_texts);
                if let Some(p) = r.product {
                    products.insert(r.path.clone(), p);
                }
                if !r.flags.is_empty() {
                    flags.insert(r.path.clone(), r.flags);
                }
                ids.insert(r.path, r.id);
                Ok(())
            })?;
            let store = old.read()?;
            let lists = store.lists()?;
            let entries = match lists.iter().any(|l| l.entries > 0) {
                true => store.entries(None)?,
                false => Vec::new(),
            };
            (
                store.next_id()?,
                store.exclusions()?,
                store.info().attributes.clone(),
                lists,
                entries,
                store.info().clone(),
            )
        };
        if !same_vectors(&old_info, info) {
            let dropped = entries.iter_mut().filter_map(|e| e.itc.take()).count();
            if dropped > 0 {
                let line = format!(
                    "the retrieval model changed: the ITC vectors of {dropped} reference images \
                     in match lists were made by the old one and are dropped (their PDQ hashes \
                     stay); add the reference images again to match by ITC"
                );
                tracing::warn!("{line}");
                observer.event(Event::Note { line: &line });
            }
        }
        let (present, missing): (Vec<PathBuf>, Vec<PathBuf>) =
            paths.into_iter().partition(|p| p.exists());
        let staging = Location {
            dir: sibling(dir, "reindex"),
            store: match &at.store {
                StoreLocation::Embedded => StoreLocation::Embedded,
                StoreLocation::Milvus(a) => StoreLocation::Milvus(MilvusAddress {
                    collection: format!("{}_reindex", a.collection),
                    ..a.clone()
                }),
            },
        };
        if staging.dir.exists() {
            std::fs::remove_dir_all(&staging.dir).map_err(io(&staging.dir))?;
        }
        if let StoreLocation::Milvus(a) = &staging.store {
            MilvusStore::drop_collection(a)?;
        }
        let mut summary = {
            // Its audit events (matches found as it embeds) go to the collection's log.
            let fresh = Engine::open(staging.clone(), info)?.auditing_to(dir)?;
            // Every image keeps its id, and ids never given are never given later either;
            // what was removed on purpose stays out of folder scans.
            {
                let mut store = fresh.write()?;
                if let Some(next_id) = next_id {
                    store.reserve_ids(next_id)?;
                }
                for (hash, path) in &exclusions {
                    store.exclude(hash, path)?;
                }
                // Products keep their attributes' types.
                store.extend_schema(&attributes)?;
                for l in &lists {
                    store.create_list(&l.name)?;
                }
                for chunk in entries.chunks(10_000) {
                    store.add_entries(chunk)?;
                }
            }
            Ingestor::new(&fresh, models, options, observer)?
                .with_given_texts(given)
                .with_products(products)
                .with_ids(ids)
                .with_flags(flags)
                .add(&present)?
        };
        for p in missing {
            summary.failed.push(Failure {
                path: p.display().to_string(),
                reason: "the file is gone; it is not in the new collection".into(),
            });
        }
        match (&at.store, &staging.store) {
            (StoreLocation::Milvus(target), StoreLocation::Milvus(new)) => {
                // The records move by renaming in Milvus; the blobs by renaming their folders
                // (uploads stay where the records point).
                MilvusStore::replace(target, new)?;
                let old = sibling(dir, "old");
                std::fs::create_dir_all(&old).map_err(io(&old))?;
                for part in BlobStore::PARTS {
                    let (live, fresh, gone) =
                        (dir.join(part), staging.dir.join(part), old.join(part));
                    if live.exists() {
                        std::fs::rename(&live, &gone).map_err(io(&live))?;
                    }
                    std::fs::rename(&fresh, &live).map_err(io(&fresh))?;
                }
                std::fs::remove_dir_all(&old).map_err(io(&old))?;
                std::fs::remove_dir_all(&staging.dir).map_err(io(&staging.dir))?;
            }
            _ => swap_directories(dir, &staging.dir)?,
        }
        Ok(summary)
    }
}

/// Whether ITC vectors made for a collection of `old` compare with those of `new`: the same
/// retrieval weights (by fingerprint when both know it, else by name) and dimension.
fn same_vectors(old: &CollectionInfo, new: &CollectionInfo) -> bool {
    old.embedding_dim == new.embedding_dim
        && match (&old.retrieval_fingerprint, &new.retrieval_fingerprint) {
            (Some(a), Some(b)) => a == b,
            _ => old.retrieval_model == new.retrieval_model,
        }
}

/// Replaces the embedded collection in `dir` by the one in `staging`. Uploaded files live inside
/// the collection: they move with it (the records point to `<index>/uploads/...`, which is where
/// they are again after the swap); so does the audit log.
fn swap_directories(dir: &Path, staging: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EngineError::Io { path, source }
    };
    // The log is linked into the new directory, not moved: at every moment of the swap one of
    // the two directories that survive a crash has it.
    let audit = dir.join(AUDIT_FILE);
    if audit.exists() {
        let target = staging.join(AUDIT_FILE);
        if std::fs::hard_link(&audit, &target).is_err() {
            std::fs::copy(&audit, &target).map_err(io(&audit))?;
        }
    }
    let uploads = uploads_dir(dir);
    if uploads.exists() {
        let target = uploads_dir(staging);
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(io(&target))?;
        }
        std::fs::rename(&uploads, &target).map_err(io(&uploads))?;
    }
    let old = sibling(dir, "old");
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    if let Err(e) = std::fs::rename(dir, &old) {
        // Put the uploads back: the old collection stays as it was.
        let _ = std::fs::rename(uploads_dir(staging), &uploads);
        return Err(io(dir)(e));
    }
    std::fs::rename(staging, dir).map_err(io(staging))?;
    std::fs::remove_dir_all(&old).map_err(io(&old))?;
    Ok(())
}
