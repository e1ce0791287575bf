//! Images uploaded into a collection (rather than found in a folder): kept as files in one
//! directory, named by content and by the name the client gave, and indexed at once.
//!
//! Concurrency rules: uploads of the same bytes are serialised (the second answers the first's
//! id), every file is created with `create_new`, and an upload only ever deletes the file it
//! created itself; so no request can remove a file that an indexed image (or another request)
//! owns. Files that no record points to (left by a crash between writing and indexing) are
//! removed by [`super::Engine::remove_orphan_uploads`] at start.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::catalogue::{Catalogue, CatalogueProduct};
use super::collection::Engine;
use super::error::{EngineError, Result};
use super::import::ImportSummary;
use super::ingest::{IngestOptions, Ingestor};
use super::models::Encoders;
pub use super::upload_folder::uploads_dir;
use super::upload_folder::UploadFolder;
use crate::index::{content_hash, ImageId, ImageRecord, Product, Schema};
use crate::progress::Silent;

/// What an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uploaded {
    /// The image's id.
    pub id: ImageId,
    /// Whether the same bytes were already indexed (nothing was added).
    pub duplicate: bool,
}

/// How old an unowned upload must be before [`super::Engine::remove_orphan_uploads`] removes it
/// when the store is shared (another process may be indexing a younger one right now).
pub const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// What a product upload did.
#[derive(Debug, Clone)]
pub struct ProductUploaded {
    /// The product's images now, in the order they were sent.
    pub ids: Vec<ImageId>,
    /// Whether the product had no image in the collection before.
    pub created: bool,
    /// What the import of the product did.
    pub summary: ImportSummary,
}

/// One uploaded image as the client sent it.
#[derive(Debug, Clone, Copy)]
pub struct NewUpload<'a> {
    /// The file's bytes, already checked to be an image of type `ext`.
    pub bytes: &'a [u8],
    /// A safe stem of the client's file name, when it gave one.
    pub stem: Option<&'a str>,
    /// The file extension of its format.
    pub ext: &'a str,
}

impl UploadFolder {
    /// Stores and indexes an upload with its given `texts`. The same bytes already in the
    /// collection (or being uploaded by another request) answer that image's id as a
    /// duplicate. A file that fails to index is removed; the error says why.
    pub(crate) fn add<M: Encoders + ?Sized>(
        engine: &Engine,
        models: &M,
        options: IngestOptions,
        upload: NewUpload<'_>,
        texts: Vec<String>,
    ) -> Result<Uploaded> {
        let NewUpload { bytes, stem, ext } = upload;
        let this = engine.uploads();
        let hash = content_hash(bytes);
        let _claim = this.claim(&hash)?;
        let read = || engine.read();
        if let Some(id) = read()?.by_hash(&hash)? {
            return Ok(Uploaded {
                id,
                duplicate: true,
            });
        }
        let mut file = this.create(&hash, stem, ext, bytes)?;
        let canonical = std::fs::canonicalize(&file.path).map_err(|e| EngineError::Io {
            path: file.path.clone(),
            source: e,
        })?;
        let key = canonical.display().to_string();
        let given = HashMap::from([(key.clone(), texts)]);
        let summary = Ingestor::new(engine, models, options, &Silent)?
            .with_given_texts(given)
            .add(std::slice::from_ref(&canonical))?;
        if let Some(f) = summary.failed.first() {
            return Err(EngineError::Model(crate::model::ModelError::Image {
                path: PathBuf::from(stem.unwrap_or("the upload")),
                reason: f.reason.clone(),
            }));
        }
        let c = read()?;
        if let Some(id) = c.by_path(&key)? {
            file.keep = true;
            return Ok(Uploaded {
                id,
                duplicate: false,
            });
        }
        // Indexed meanwhile under another path (a watched folder): that image is the answer,
        // and our copy goes.
        match c.by_hash(&hash)? {
            Some(id) => Ok(Uploaded {
                id,
                duplicate: true,
            }),
            None => Err(EngineError::Internal(
                "the uploaded image was not indexed".into(),
            )),
        }
    }

    /// Removes image `id`; its file too when it is an upload (files in the user's folders are
    /// never deleted). Serialised with uploads of the same bytes. `false`: no such image.
    pub(crate) fn remove_image(engine: &Engine, id: ImageId, actor: &str) -> Result<bool> {
        let this = engine.uploads();
        let Some(rec) = engine.get(id)? else {
            return Ok(false);
        };
        let _claim = this.claim(&rec.content_hash)?;
        let path = Path::new(&rec.path);
        if !this.owns(path) {
            // A file in the user's folders stays, so a scan would find it again: remember.
            engine.exclude(&rec.content_hash, &rec.path)?;
        }
        if engine.delete_records(&[id], actor, "removed")?.is_empty() {
            return Ok(false);
        }
        engine.commit()?;
        if this.owns(path) {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), %e, "cannot remove an uploaded file");
            }
        }
        Ok(true)
    }

    /// Stores `images` as uploads (the same bytes already indexed: that image) and makes them
    /// the images of `product`, with its texts and attributes (`schema`: the collection's
    /// types with those `product` introduces); images the product had before and no longer
    /// has leave the collection, and their files too when they were uploads.
    pub(crate) fn add_product<M: Encoders + ?Sized>(
        engine: &Engine,
        models: &M,
        options: IngestOptions,
        product: Product,
        schema: Schema,
        images: &[NewUpload<'_>],
    ) -> Result<ProductUploaded> {
        if images.is_empty() {
            return Err(EngineError::InvalidInput(
                "a product needs at least one image".into(),
            ));
        }
        let this = engine.uploads();
        let hashes: Vec<String> = images.iter().map(|u| content_hash(u.bytes)).collect();
        // Claimed in one order, so that two requests never wait for each other.
        let mut order: Vec<&String> = hashes.iter().collect();
        order.sort();
        order.dedup();
        let held: HashSet<String> = order.iter().map(|h| h.to_string()).collect();
        let _claims = order
            .iter()
            .map(|h| this.claim(h))
            .collect::<Result<Vec<_>>>()?;
        let mut created = Vec::new();
        let mut paths: Vec<PathBuf> = Vec::new();
        let mut sent: HashSet<&str> = HashSet::new();
        for (u, hash) in images.iter().zip(&hashes) {
            if !sent.insert(hash) {
                continue; // the same bytes twice in one request
            }
            let known = match engine.read()?.by_hash(hash)? {
                Some(id) => engine.get(id)?.map(|r| PathBuf::from(r.path)),
                None => None,
            };
            let path = match known {
                Some(p) => p,
                None => {
                    let file = this.create(hash, u.stem, u.ext, u.bytes)?;
                    let canonical =
                        std::fs::canonicalize(&file.path).map_err(|e| EngineError::Io {
                            path: file.path.clone(),
                            source: e,
                        })?;
                    created.push(file);
                    canonical
                }
            };
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
        let id = product.id.clone();
        let created_product = engine
            .read()?
            .product_images(Some(std::slice::from_ref(&id)))?
            .is_empty();
        let catalogue = Catalogue {
            products: vec![CatalogueProduct {
                line: 1,
                product,
                images: paths.clone(),
            }],
            malformed: Vec::new(),
            attributes: schema,
        };
        let summary = engine.import_holding(models, options, &catalogue, false, &Silent, &held)?;
        if let Some(f) = summary.failed.first() {
            return Err(EngineError::Model(crate::model::ModelError::Image {
                path: PathBuf::from(
                    Path::new(&f.path)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                ),
                reason: f.reason.clone(),
            }));
        }
        let mut ids = Vec::with_capacity(paths.len());
        {
            let store = engine.read()?;
            for p in &paths {
                if let Some(id) = store.by_path(&p.display().to_string())? {
                    ids.push(id);
                }
            }
        }
        for file in &mut created {
            let canonical = std::fs::canonicalize(&file.path).ok();
            file.keep = canonical.is_some_and(|c| paths.contains(&c));
        }
        Ok(ProductUploaded {
            ids,
            created: created_product,
            summary,
        })
    }

    /// Removes the images `ids` that exist, in one commit, as [`Self::remove_image`] removes
    /// one (uploaded files are deleted, other files' content left out of folder scans); the
    /// caller holds the upload claims of `held`. The removal of a flagged image is audited as
    /// `actor`'s, with `reason`. Returns how many were removed.
    pub(crate) fn remove_images(
        engine: &Engine,
        ids: &[ImageId],
        held: &HashSet<String>,
        actor: &str,
        reason: &str,
    ) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let this = engine.uploads();
        let mut records: Vec<ImageRecord> = Vec::with_capacity(ids.len());
        for &id in ids {
            records.extend(engine.get(id)?);
        }
        let mut order: Vec<&str> = records
            .iter()
            .map(|r| r.content_hash.as_str())
            .filter(|h| !held.contains(*h))
            .collect();
        order.sort_unstable();
        order.dedup();
        let _claims = order
            .iter()
            .map(|h| this.claim(h))
            .collect::<Result<Vec<_>>>()?;
        for r in &records {
            if !this.owns(Path::new(&r.path)) {
                engine.exclude(&r.content_hash, &r.path)?;
            }
        }
        let ids: Vec<ImageId> = records.iter().map(|r| r.id).collect();
        let removed = engine.delete_records(&ids, actor, reason)?;
        engine.commit()?;
        for r in &removed {
            let path = Path::new(&r.path);
            if this.owns(path) {
                if let Err(e) = std::fs::remove_file(path) {
                    tracing::warn!(path = %path.display(), %e, "cannot remove an uploaded file");
                }
            }
        }
        Ok(removed.len())
    }

    /// Deletes the files in the upload directory, last modified at least `min_age` ago, that no
    /// image points to (left by a crash between writing a file and indexing it); returns how
    /// many. Run it while no upload of this process is in flight (at start).
    pub(crate) fn remove_orphans(engine: &Engine, min_age: std::time::Duration) -> Result<usize> {
        let this = engine.uploads();
        let entries = match std::fs::read_dir(this.dir()) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(EngineError::Io {
                    path: this.dir().to_path_buf(),
                    source: e,
                })
            }
        };
        let mut removed = 0;
        for entry in entries {
            let path = entry
                .map_err(|e| EngineError::Io {
                    path: this.dir().to_path_buf(),
                    source: e,
                })?
                .path();
            if !path.is_file() {
                continue;
            }
            let age = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if !min_age.is_zero() && age.is_none_or(|a| a < min_age) {
                continue;
            }
            let Ok(canonical) = std::fs::canonicalize(&path) else {
                continue;
            };
            if engine.by_path(&canonical.display().to_string())?.is_none() {
                match std::fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::warn!(path = %path.display(), %e, "cannot remove"),
                }
            }
        }
        Ok(removed)
    }
}

impl Engine {
    /// Stores and indexes an uploaded image with its given `texts` (see [`super::uploads`]).
    pub fn upload<M: Encoders + ?Sized>(
        &self,
        models: &M,
        options: IngestOptions,
        upload: NewUpload<'_>,
        texts: Vec<String>,
    ) -> Result<Uploaded> {
        UploadFolder::add(self, models, options, upload, texts)
    }

    /// Deletes uploaded files no image points to (left by a crash between writing and
    /// indexing); returns how many. Run it while no upload is in flight (at start). With a
    /// shared store, other processes may be uploading now: only files older than
    /// [`ORPHAN_AGE`] go.
    pub fn remove_orphan_uploads(&self) -> Result<usize> {
        let min_age = match self.read()?.shared() {
            true => ORPHAN_AGE,
            false => std::time::Duration::ZERO,
        };
        UploadFolder::remove_orphans(self, min_age)
    }

    /// Stores uploaded `images` (the same bytes already indexed: that image) and makes them the
    /// images of `product`, with its texts and attributes: its images before that are not sent
    /// again leave the collection, uploaded files with them. `product`'s attributes must conform to the
    /// collection's types, with `schema` giving those of new attributes (see
    /// [`super::catalogue::read_product`]).
    pub fn upload_product<M: Encoders + ?Sized>(
        &self,
        models: &M,
        options: IngestOptions,
        product: Product,
        schema: Schema,
        images: &[NewUpload<'_>],
    ) -> Result<ProductUploaded> {
        UploadFolder::add_product(self, models, options, product, schema, images)
    }

    /// Removes every image of `product` (uploaded files with them; other files are never
    /// deleted, their content is left out of folder scans); committed on return. The removal
    /// of a flagged image is audited as `actor`'s. Returns how many; [`EngineError::NotFound`]
    /// when the collection has no such product.
    pub fn remove_product(&self, product: &str, actor: &str) -> Result<usize> {
        let ids = self
            .read()?
            .product_images(Some(&[product.to_string()]))?
            .remove(product)
            .unwrap_or_default();
        if ids.is_empty() {
            return Err(EngineError::NotFound(format!("no product {product:?}")));
        }
        UploadFolder::remove_images(
            self,
            &ids,
            &HashSet::new(),
            actor,
            "its product was removed",
        )
    }

    /// Removes image `id` and its blobs, and its file when it was uploaded; committed on return.
    /// Files in the user's folders are never deleted: their content is remembered as removed
    /// instead, so that scans of the folder (`sync`, a server's watched folders) leave it out
    /// until the file is added by name. Serialised with uploads of the same bytes. The removal
    /// of a flagged image is audited as `actor`'s. `false`: no such image.
    pub fn remove(&self, id: ImageId, actor: &str) -> Result<bool> {
        UploadFolder::remove_image(self, id, actor)
    }
}
