//! [`Engine::import`]: a product catalogue ([`super::catalogue`]) upserted into the collection,
//! product by product.
//!
//! - A listed image that is new, or whose file changed (by content hash), is embedded through
//!   the ingest pipeline with its product attached (CapFilt judges the product's title and
//!   description with the image's given texts, and keeps them whatever it says).
//! - A listed image whose file did not change (same path, same content; the size and mtime
//!   tell without hashing, as for `add`) is not embedded again: only its record is rewritten,
//!   and only when its product changed. With CapFilt on, a title or description that changed
//!   is scored again by ITM against the image's stored ViT features (a text that did not
//!   change keeps its score); without CapFilt it is stored without a p(match).
//! - Images a product no longer lists leave the collection (their files are never deleted,
//!   except uploaded ones; their content is left out of folder scans, as `remove` does). A
//!   listed file that cannot be read is reported and keeps the image it had.
//! - With `sync`, products the catalogue does not name leave the collection too; a product
//!   named on a malformed line is kept as it is, and a malformed line whose product cannot be
//!   read, or a catalogue without a single product, stops `sync` from removing anything (the
//!   summary says so).
//! - New attribute types are recorded in the collection's schema before anything is written.
//!
//! Record updates are written in batches under one lock each and committed once, so an import
//! that changes only texts and attributes costs no model call, no hashing of unchanged files
//! and one commit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::Serialize;

use super::catalogue::{Catalogue, Malformed};
use super::collection::Engine;
use super::error::{EngineError, Result};
use super::ingest::{
    product_texts, size_and_mtime, unchanged_by_stat, Failure, IngestOptions, Ingestor,
    IMAGE_EXTENSIONS,
};
use super::models::Encoders;
use super::upload_folder::UploadFolder;
use crate::index::{content_hash, Caption, ImageId, ImageRecord, IndexError, Product, Schema};
use crate::model::tokenizer::pre_caption;
use crate::progress::{Event, Progress};

/// Records rewritten in one write (one lock, one transaction; searches run between batches).
const UPDATE_BATCH: usize = 256;
/// Images scored against one text in one ITM call.
const ITM_BATCH: usize = 16;

/// What an import did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportSummary {
    /// Products that had no image in the collection before, and have some now.
    pub products_added: usize,
    /// Products whose texts, attributes or images changed.
    pub products_updated: usize,
    /// Products found exactly as the catalogue describes them.
    pub products_unchanged: usize,
    /// Products removed (`sync`: absent from the catalogue).
    pub products_removed: usize,
    /// Products of the catalogue none of whose images could be indexed.
    pub products_failed: usize,
    /// Images embedded (new, or their file changed).
    pub images_embedded: usize,
    /// Images whose file did not change and whose record took the product's new texts or
    /// attributes (no embedding).
    pub images_updated: usize,
    /// Images found as they were.
    pub images_unchanged: usize,
    /// Images removed from the collection (no longer listed, or of removed products).
    pub images_removed: usize,
    /// Listed images that could not be indexed, with the reason.
    pub failed: Vec<Failure>,
    /// Catalogue lines skipped, with their line numbers and the reason.
    pub malformed: Vec<Malformed>,
    /// Why `sync` removed nothing, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_skipped: Option<String>,
    /// The collection's attribute types after the import.
    pub attributes: Schema,
    /// Images in the collection after the import.
    pub total: u64,
}

/// What one listed image needs.
enum Listed {
    /// Not in the collection, or its file changed (the image it replaces, if any).
    Embed(Option<ImageId>),
    /// Its file did not change: its record, and whether its mtime must be written.
    Unchanged(Box<ImageRecord>, bool),
}

impl Engine {
    /// Reads the catalogue at `path` (see [`Catalogue::read`]) with the collection's attribute
    /// types and imports it (see [`Engine::import`]).
    pub fn import_file<M: Encoders + ?Sized>(
        &self,
        models: &M,
        options: IngestOptions,
        path: &Path,
        images_root: Option<&Path>,
        sync: bool,
        observer: &dyn Progress,
    ) -> Result<ImportSummary> {
        let catalogue = Catalogue::read(path, images_root, &self.info()?.attributes)?;
        self.import(models, options, &catalogue, sync, observer)
    }

    /// Upserts the products of `catalogue` (see the [module docs](self)); with `sync`, removes
    /// the products it does not name.
    pub fn import<M: Encoders + ?Sized>(
        &self,
        models: &M,
        options: IngestOptions,
        catalogue: &Catalogue,
        sync: bool,
        observer: &dyn Progress,
    ) -> Result<ImportSummary> {
        self.import_holding(models, options, catalogue, sync, observer, &HashSet::new())
    }

    /// [`Engine::import`] by a caller that holds the upload claims of `held` (content hashes).
    pub(crate) fn import_holding<M: Encoders + ?Sized>(
        &self,
        models: &M,
        options: IngestOptions,
        catalogue: &Catalogue,
        sync: bool,
        observer: &dyn Progress,
        held: &HashSet<String>,
    ) -> Result<ImportSummary> {
        let mut summary = ImportSummary {
            malformed: catalogue.malformed.clone(),
            ..ImportSummary::default()
        };
        let capfilt = options.capfilt.is_some();
        let started = std::time::Instant::now();
        // The types first: no record may carry a value of a type the collection does not know.
        self.write()?
            .extend_schema(&catalogue.attributes)
            .map_err(|e| match e {
                IndexError::InvalidParams(m) => EngineError::InvalidInput(m),
                other => other.into(),
            })?;
        let names: Vec<String> = catalogue
            .products
            .iter()
            .map(|p| p.product.id.clone())
            .collect();
        let everything = sync || names.len() > 64;
        let before = self
            .read()?
            .product_images((!everything).then_some(names.as_slice()))?;

        // What each listed image needs; no model runs here.
        observer.event(Event::Started {
            what: "products",
            total: catalogue.products.len() as u64,
            done: 0,
        });
        for m in &catalogue.malformed {
            observer.event(Event::Failed {
                item: &format!("line {}", m.line),
                reason: &m.reason,
            });
        }
        let mut listed_ids: HashSet<ImageId> = HashSet::new();
        let mut updates: Vec<ImageRecord> = Vec::new();
        // To embed, with the image each replaces.
        let mut embed: Vec<(PathBuf, Option<ImageId>)> = Vec::new();
        let mut attach: HashMap<String, Product> = HashMap::new();
        let mut touched: HashSet<String> = HashSet::new();
        for cp in &catalogue.products {
            observer.event(Event::Working {
                item: &cp.product.id,
            });
            for path in &cp.images {
                let key = path.display().to_string();
                match self.classify(path) {
                    Err(reason) => {
                        observer.event(Event::Failed {
                            item: &key,
                            reason: &reason,
                        });
                        // Still listed: an image it had stays as it was (a file that cannot be
                        // read now, an unmounted disk, is no reason to drop it).
                        listed_ids.extend(self.by_path(&key)?);
                        summary.failed.push(Failure { path: key, reason });
                    }
                    Ok(Listed::Embed(replaces)) => {
                        listed_ids.extend(replaces);
                        touched.insert(cp.product.id.clone());
                        embed.push((path.clone(), replaces));
                        attach.insert(key, cp.product.clone());
                    }
                    Ok(Listed::Unchanged(record, mtime_changed)) => {
                        let mut record = *record;
                        listed_ids.insert(record.id);
                        if give_product(&mut record, &cp.product) {
                            touched.insert(cp.product.id.clone());
                            summary.images_updated += 1;
                            updates.push(record);
                        } else {
                            summary.images_unchanged += 1;
                            if mtime_changed {
                                updates.push(record);
                            }
                        }
                    }
                }
            }
            observer.event(Event::Done { n: 1 });
        }
        observer.event(Event::Finished);
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "import: images classified"
        );
        if capfilt {
            self.score_product_texts(models, &mut updates)?;
        }
        let n = updates.len();
        self.update_all(updates)?;
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            records = n,
            "import: records rewritten"
        );

        // Images no longer listed, and products no longer in the catalogue (`sync`).
        let mut remove: Vec<ImageId> = Vec::new();
        for cp in &catalogue.products {
            let dropped = before
                .get(&cp.product.id)
                .into_iter()
                .flatten()
                .filter(|id| !listed_ids.contains(id));
            for &id in dropped {
                touched.insert(cp.product.id.clone());
                remove.push(id);
            }
        }
        if sync {
            if catalogue.products.is_empty() {
                summary.sync_skipped = Some(
                    "the catalogue names no product, and sync would remove every product: \
                     nothing was removed"
                        .into(),
                );
            } else if catalogue.has_unreadable_lines() {
                summary.sync_skipped = Some(
                    "a malformed line does not say which product it is about, so no product \
                     was removed: fix the line and import again"
                        .into(),
                );
            } else {
                let named: HashSet<&str> = names
                    .iter()
                    .map(String::as_str)
                    .chain(
                        catalogue
                            .malformed
                            .iter()
                            .filter_map(|m| m.product.as_deref()),
                    )
                    .collect();
                for (product, ids) in &before {
                    if !named.contains(product.as_str()) {
                        summary.products_removed += 1;
                        remove.extend(ids.iter().filter(|id| !listed_ids.contains(id)));
                    }
                }
            }
        }
        remove.sort_unstable();
        remove.dedup();
        summary.images_removed = UploadFolder::remove_images(
            self,
            &remove,
            held,
            &options.actor,
            "the catalogue no longer lists it",
        )?;
        self.commit()?;
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "import: committed"
        );

        // New and changed images, embedded with their products.
        if !embed.is_empty() {
            let files: Vec<PathBuf> = embed.iter().map(|(p, _)| p.clone()).collect();
            let ingest = Ingestor::new(self, models, options, observer)?
                .with_products(attach.clone())
                .add(&files)?;
            summary.images_embedded = ingest.added + ingest.updated;
            summary.failed.extend(ingest.failed);
            // An image found under a new path (its file moved) kept its record: it takes its
            // product here. One whose content is indexed under another path is a duplicate.
            let failed: HashSet<String> = summary.failed.iter().map(|f| f.path.clone()).collect();
            let mut moved = Vec::new();
            for (path, replaces) in &embed {
                let key = path.display().to_string();
                let Some(product) = attach.get(&key) else {
                    continue;
                };
                match self.by_path(&key)? {
                    // Still the old image: the new content was not embedded.
                    Some(id) if Some(id) == *replaces && !failed.contains(&key) => {
                        let reason = self.why_not_indexed(path);
                        summary.failed.push(Failure { path: key, reason });
                    }
                    Some(id) => {
                        if let Some(mut record) = self.get(id)? {
                            if give_product(&mut record, product) {
                                summary.images_updated += 1;
                                moved.push(record);
                            }
                        }
                    }
                    None if failed.contains(&key) => {}
                    None => {
                        let reason = self.why_not_indexed(path);
                        summary.failed.push(Failure { path: key, reason });
                    }
                }
            }
            if capfilt {
                self.score_product_texts(models, &mut moved)?;
            }
            self.update_all(moved)?;
            self.commit()?;
        }

        let after = self
            .read()?
            .product_images((!everything).then_some(names.as_slice()))?;
        for name in &names {
            match (before.contains_key(name), after.contains_key(name)) {
                (_, false) => summary.products_failed += 1,
                (false, true) => summary.products_added += 1,
                (true, true) if touched.contains(name) => summary.products_updated += 1,
                (true, true) => summary.products_unchanged += 1,
            }
        }
        summary.attributes = self.info()?.attributes;
        summary.total = self.len()?;
        Ok(summary)
    }

    /// Whether the file at `path` is new or changed (to embed) or unchanged (its record), by
    /// ingest's rule: size and mtime when they are trustworthy, else the content hash.
    fn classify(&self, path: &Path) -> std::result::Result<Listed, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
        if !meta.is_file() {
            return Err("not a file".into());
        }
        let (size, mtime) = size_and_mtime(&meta);
        let key = path.display().to_string();
        let existing = (|| {
            let store = self.read()?;
            Ok::<_, EngineError>(match store.by_path(&key)? {
                Some(id) => store.get(id)?,
                None => None,
            })
        })()
        .map_err(|e| e.to_string())?;
        let Some(mut record) = existing else {
            return Ok(Listed::Embed(None));
        };
        if unchanged_by_stat(&record, size, mtime) {
            return Ok(Listed::Unchanged(Box::new(record), false));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
        if content_hash(&bytes) != record.content_hash {
            return Ok(Listed::Embed(Some(record.id)));
        }
        // Touched but not changed: the new mtime is written, so the next run does not hash.
        let touched = record.mtime_unix != mtime;
        record.mtime_unix = mtime;
        Ok(Listed::Unchanged(Box::new(record), touched))
    }

    /// Why a listed file that the ingest did not fail has no record: a type not read, or its
    /// content indexed under another path.
    fn why_not_indexed(&self, path: &Path) -> String {
        let supported = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        if !supported {
            return format!(
                "not an image file blipsearch reads ({})",
                IMAGE_EXTENSIONS.join(", ")
            );
        }
        let other = std::fs::read(path)
            .ok()
            .and_then(|b| self.read().ok()?.by_hash(&content_hash(&b)).ok()?)
            .and_then(|id| self.get(id).ok()?);
        match other {
            Some(r) => format!(
                "the same content is indexed as {} (image {}): an image is stored once",
                r.path, r.id
            ),
            None => "not indexed (left out of folder scans, or removed meanwhile)".into(),
        }
    }

    /// Writes `records` (existing images, same vectors) in batches, one write lock each.
    fn update_all(&self, records: Vec<ImageRecord>) -> Result<()> {
        for chunk in records.chunks(UPDATE_BATCH) {
            self.write()?.update_all(chunk)?;
        }
        Ok(())
    }

    /// Scores with ITM, against each image's stored ViT features, the product texts of
    /// `records` that have no p(match) yet.
    fn score_product_texts<M: Encoders + ?Sized>(
        &self,
        models: &M,
        records: &mut [ImageRecord],
    ) -> Result<()> {
        // text -> (record, caption) pairs waiting for its score.
        let mut waiting: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
        for (i, r) in records.iter().enumerate() {
            for (j, c) in r.captions.iter().enumerate() {
                if c.source.is_product_text()
                    && c.p_match.is_none()
                    && !pre_caption(&c.text).trim().is_empty()
                {
                    waiting.entry(c.text.clone()).or_default().push((i, j));
                }
            }
        }
        for (text, pairs) in waiting {
            for chunk in pairs.chunks(ITM_BATCH) {
                let mut data = Vec::new();
                let mut shape = (0, 0);
                let mut scored = Vec::with_capacity(chunk.len());
                for &(i, j) in chunk {
                    match self.features(records[i].id) {
                        Ok(f) => {
                            shape = (f.rows, f.cols);
                            data.extend(f.data);
                            scored.push((i, j));
                        }
                        Err(e) => tracing::warn!(id = records[i].id.0, %e, "no features to score"),
                    }
                }
                if scored.is_empty() {
                    continue;
                }
                let tokens = Tensor::from_vec(
                    data,
                    (scored.len(), shape.0, shape.1),
                    &candle_core::Device::Cpu,
                )?;
                let scores = models.itm(text.clone(), tokens)?;
                for ((i, j), s) in scored.into_iter().zip(scores) {
                    records[i].captions[j].p_match = Some(s.prob);
                }
            }
        }
        Ok(())
    }
}

/// Gives `record` the product `product` and its texts as captions (other captions stay; a
/// product text already there keeps its score); returns whether anything changed.
fn give_product(record: &mut ImageRecord, product: &Product) -> bool {
    let mut captions: Vec<Caption> = record
        .captions
        .iter()
        .filter(|c| !c.source.is_product_text())
        .cloned()
        .collect();
    for (source, text) in product_texts(Some(product)) {
        let kept = record
            .captions
            .iter()
            .find(|c| c.source == source && c.text == text)
            .cloned();
        captions.push(kept.unwrap_or(Caption {
            text: text.to_string(),
            source,
            p_match: None,
            kept: true,
        }));
    }
    let changed = record.product.as_ref() != Some(product) || record.captions != captions;
    record.product = Some(product.clone());
    record.captions = captions;
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{AttrValue, CaptionSource};

    fn record(captions: Vec<Caption>, product: Option<Product>) -> ImageRecord {
        ImageRecord {
            id: ImageId(1),
            path: "/x.png".into(),
            content_hash: "h".into(),
            size_bytes: 1,
            width: 1,
            height: 1,
            mtime_unix: 0,
            exif_date: None,
            itc: vec![1.0],
            captions,
            given_texts: Vec::new(),
            added_unix: 0,
            product,
            pdq: None,
            flags: Vec::new(),
        }
    }

    #[test]
    fn a_product_replaces_only_product_texts_and_keeps_known_scores() {
        let beam = Caption {
            text: "a shoe".into(),
            source: CaptionSource::Beam,
            p_match: Some(0.9),
            kept: true,
        };
        let old_title = Caption {
            text: "Red shoe".into(),
            source: CaptionSource::Title,
            p_match: Some(0.7),
            kept: true,
        };
        let mut p = Product {
            id: "SKU".into(),
            title: Some("Red shoe".into()),
            description: None,
            attributes: [("price".to_string(), AttrValue::Number(10.0))].into(),
        };
        let mut r = record(vec![beam.clone(), old_title.clone()], Some(p.clone()));
        assert!(!give_product(&mut r, &p), "nothing changed");
        p.attributes.insert("price".into(), AttrValue::Number(12.0));
        assert!(give_product(&mut r, &p), "an attribute changed");
        assert_eq!(
            r.captions,
            [beam.clone(), old_title],
            "the title keeps its score"
        );
        p.title = Some("Crimson shoe".into());
        p.description = Some("Light".into());
        assert!(give_product(&mut r, &p));
        assert_eq!(r.captions[0], beam);
        assert_eq!(
            (r.captions[1].text.as_str(), r.captions[1].p_match),
            ("Crimson shoe", None)
        );
        assert_eq!(r.captions[2].source, CaptionSource::Description);
        assert!(r.captions.iter().all(|c| c.kept));
    }
}
