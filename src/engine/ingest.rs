//! Ingestion: walk folders, skip what is already indexed, decode, embed in batches with the
//! retrieval model, caption with CapFilt, and commit to the collection in batches so that a crash
//! loses at most the batch in flight.

use std::collections::{HashMap, HashSet};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use candle_core::IndexOp;
use image::DynamicImage;
use serde::Serialize;

use super::collection::{Engine, NewImage};
use super::error::{EngineError, Result};
use super::matcher::{match_event, new_flags};
use super::models::{CapFiltJob, Encoders};
use crate::index::{
    content_hash, now_unix, AuditEvent, Caption, CaptionSource, FeatureMatrix, Flag, ImageId,
    ImageRecord, Pdq, PdqHash, Product, THUMB_MAX_SIDE,
};
use crate::model::capfilt::{CandidateSource, CapFiltCandidate, CapFiltParams};
use crate::model::pdq::pdq_hash;
use crate::model::preprocess::{decode_admitted, DecodeBudget, DecodeLimits, DecodePermit};
use crate::model::ModelError;
use crate::progress::{Event, Progress};

/// File extensions ingested (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

/// Largest sidecar text file read, in bytes.
const MAX_SIDECAR_BYTES: u64 = 16 * 1024;

/// How to ingest.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Images per forward pass.
    pub batch_size: usize,
    /// Commit after this many new or changed images (and at the end).
    pub commit_every: usize,
    /// Decoding limits (pixel count).
    pub limits: DecodeLimits,
    /// `sync` of a folder that no longer exists removes its images (else it is an error that
    /// says how).
    pub drop_vanished: bool,
    /// CapFilt settings; `None` skips captions (vector-only ingest).
    pub capfilt: Option<CapFiltParams>,
    /// Memory for decoded images, shared with whatever else decodes in the process.
    pub budget: Arc<DecodeBudget>,
    /// How long a file may wait for its share of `budget` (`None`: as long as it takes);
    /// past it the run stops with [`EngineError::Busy`].
    pub budget_wait: Option<Duration>,
    /// Who the run's audit events name (matches found, flagged images removed): `cli`, or the
    /// key id of the request.
    pub actor: String,
}

/// Size of the decode budget when none is given: room for one 100-megapixel 16-bit RGBA image
/// with its conversions, or dozens of camera photos.
pub const DEFAULT_DECODE_BUDGET: u64 = 2 << 30;

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            batch_size: 8,
            commit_every: 64,
            limits: DecodeLimits::default(),
            drop_vanished: false,
            capfilt: Some(CapFiltParams::default()),
            budget: DecodeBudget::new(DEFAULT_DECODE_BUDGET),
            budget_wait: None,
            actor: "cli".into(),
        }
    }
}

/// A file that could not be ingested.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// The file.
    pub path: String,
    /// Why.
    pub reason: String,
}

/// What an ingest run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestSummary {
    /// New images indexed.
    pub added: usize,
    /// Indexed images whose file changed and were embedded again.
    pub updated: usize,
    /// Indexed images whose file did not change.
    pub unchanged: usize,
    /// Files whose content is already indexed under another path.
    pub duplicates: usize,
    /// Files found in a folder whose content was removed from the collection on purpose.
    pub excluded: usize,
    /// Indexed images found under a new path (their old file gone): they keep their id, and
    /// their record takes the new path.
    pub moved: usize,
    /// Hidden files and folders passed over.
    pub hidden: usize,
    /// Files of types we do not read.
    pub unsupported: usize,
    /// Records removed because their file is gone (`sync`).
    pub removed: usize,
    /// Files that could not be ingested, with the reason.
    pub failed: Vec<Failure>,
    /// Images in the collection after the run.
    pub total: u64,
}

struct Prepared {
    path: String,
    hash: String,
    size: u64,
    mtime: i64,
    width: u32,
    height: u32,
    /// Taken by the forward pass.
    image: DynamicImage,
    /// At most [`THUMB_MAX_SIDE`] a side: what the thumbnail is made of.
    thumb: DynamicImage,
    /// The decode budget held by `image` (and the copy CapFilt reads).
    _permit: DecodePermit,
    given: Vec<String>,
    /// The catalogue product the image belongs to: its title and description are judged with
    /// the given texts, and stored as captions of their own sources.
    product: Option<Product>,
    exif_date: Option<String>,
    replaces: Option<ImageId>,
    /// The PDQ hash of the decoded image (before any resizing for the model).
    pdq: Option<Pdq>,
}

/// Why a file was not prepared.
enum NotPrepared {
    /// It cannot be ingested: the reason goes in the summary.
    Failed(String),
    /// The decode budget had no room within the wait.
    Busy(String),
}

impl From<String> for NotPrepared {
    fn from(reason: String) -> Self {
        Self::Failed(reason)
    }
}

/// Runs ingestion into one collection with loaded models. The store is locked only for each
/// read or write, never across a forward pass, so searches run during ingestion.
pub(crate) struct Ingestor<'a, M: Encoders + ?Sized> {
    engine: &'a Engine,
    models: &'a M,
    observer: &'a dyn Progress,
    options: IngestOptions,
    extra_given: HashMap<String, Vec<String>>,
    products: HashMap<String, Product>,
    keep_ids: HashMap<String, ImageId>,
    flags: HashMap<String, Vec<Flag>>,
    /// Files given by name (not found in a folder), canonical.
    named: HashSet<PathBuf>,
}

impl<'a, M: Encoders + ?Sized> Ingestor<'a, M> {
    /// An ingestor; `models` must be able to caption when `options.capfilt` is set.
    pub fn new(
        engine: &'a Engine,
        models: &'a M,
        options: IngestOptions,
        observer: &'a dyn Progress,
    ) -> Result<Self> {
        if options.batch_size == 0 || options.commit_every == 0 {
            return Err(EngineError::InvalidInput(
                "batch size and commit interval must be at least 1".into(),
            ));
        }
        if options.capfilt.is_some() && !models.can_caption() {
            return Err(EngineError::InvalidInput(
                "captions requested but no caption model loaded".into(),
            ));
        }
        Ok(Self {
            engine,
            models,
            observer,
            options,
            extra_given: HashMap::new(),
            products: HashMap::new(),
            keep_ids: HashMap::new(),
            flags: HashMap::new(),
            named: HashSet::new(),
        })
    }

    /// Texts to attach to images by canonical path, besides sidecar files and EXIF descriptions
    /// (used by `reindex` to carry texts that were uploaded with the images).
    pub fn with_given_texts(mut self, texts: HashMap<String, Vec<String>>) -> Self {
        self.extra_given = texts;
        self
    }

    /// Products to attach to images by canonical path (a catalogue import, a product upload):
    /// an embedded image's record carries its product, and the product's title and description
    /// are judged by CapFilt with the given texts but always kept (see [`product_captions`]).
    /// Images found unchanged are not touched: the import updates their records itself. A
    /// changed file without a product here keeps the one its record had.
    pub fn with_products(mut self, products: HashMap<String, Product>) -> Self {
        self.products = products;
        self
    }

    /// Ids to give images by canonical path (used by `reindex`, so that a rebuilt collection
    /// keeps every id); the store must have them reserved.
    pub fn with_ids(mut self, ids: HashMap<String, ImageId>) -> Self {
        self.keep_ids = ids;
        self
    }

    /// Flags (with their decisions) that images keep, by canonical path (used by `reindex`):
    /// a match found again is not flagged twice, and a cleared one not again.
    pub fn with_flags(mut self, flags: HashMap<String, Vec<Flag>>) -> Self {
        self.flags = flags;
        self
    }

    /// Adds files and folders (recursively). Unchanged files are skipped, changed ones embedded
    /// again; bad files are reported in the summary and skipped.
    pub fn add(&mut self, paths: &[PathBuf]) -> Result<IngestSummary> {
        let mut summary = IngestSummary::default();
        // Another process sharing the store may have changed the lists.
        self.engine.refresh_matcher()?;
        let files = walk(paths, &mut summary)?;
        self.named = paths
            .iter()
            .filter(|p| p.is_file())
            .filter_map(|p| std::fs::canonicalize(p).ok())
            .collect();
        let observer = self.observer;
        observer.event(Event::Started {
            what: "files",
            total: files.len() as u64,
            done: 0,
        });
        for f in &summary.failed {
            observer.event(Event::Failed {
                item: &f.path,
                reason: &f.reason,
            });
        }
        let done = |files: u64| {
            if files > 0 {
                observer.event(Event::Done { n: files });
            }
        };
        let mut batch: Vec<Prepared> = Vec::with_capacity(self.options.batch_size);
        let mut batch_hashes = HashSet::new();
        let mut since_commit = 0usize;
        for file in files {
            if observer.stop_requested() {
                break;
            }
            observer.event(Event::Working {
                item: &file.display().to_string(),
            });
            let mut prepared = self.prepare(&file, &mut summary, &batch_hashes, !batch.is_empty());
            if matches!(prepared, Err(NotPrepared::Busy(_))) && !batch.is_empty() {
                // The budget is held by this batch (among others): embed it, then wait.
                let n = batch.len() as u64;
                since_commit += self.flush(&mut batch, &mut summary)?;
                batch_hashes.clear();
                done(n);
                prepared = self.prepare(&file, &mut summary, &batch_hashes, false);
            }
            // A file counts as done when it is skipped or failed, or when its batch is written.
            match prepared {
                Ok(Some(p)) => {
                    batch_hashes.insert(p.hash.clone());
                    batch.push(p);
                }
                Ok(None) => done(1),
                Err(NotPrepared::Busy(reason)) => {
                    self.flush(&mut batch, &mut summary)?;
                    self.commit()?;
                    observer.event(Event::Finished);
                    return Err(EngineError::Busy(reason));
                }
                Err(NotPrepared::Failed(reason)) => {
                    let path = file.display().to_string();
                    observer.event(Event::Failed {
                        item: &path,
                        reason: &reason,
                    });
                    summary.failed.push(Failure { path, reason });
                    done(1);
                }
            }
            if batch.len() >= self.options.batch_size {
                let n = batch.len() as u64;
                since_commit += self.flush(&mut batch, &mut summary)?;
                batch_hashes.clear();
                done(n);
                if since_commit >= self.options.commit_every {
                    self.commit()?;
                    since_commit = 0;
                }
            }
        }
        let pending = batch.len() as u64;
        self.flush(&mut batch, &mut summary)?;
        done(pending);
        self.commit()?;
        observer.event(Event::Finished);
        summary.total = self.engine.len()?;
        Ok(summary)
    }

    /// [`Self::add`], then removes indexed images under `paths` whose files are gone.
    pub fn sync(&mut self, paths: &[PathBuf]) -> Result<IngestSummary> {
        let mut roots = Vec::new();
        let mut present = Vec::new();
        let mut gone = Vec::new();
        for p in paths {
            match canonical(p) {
                Ok(c) => {
                    roots.push(c.display().to_string());
                    present.push(p.clone());
                }
                Err(e) if !p.exists() => gone.extend(self.vanished(p, e)?),
                Err(e) => return Err(e),
            }
        }
        {
            let store = self.engine.read()?;
            for root in &roots {
                for (id, path) in store.under(root)? {
                    // A string prefix: keep only paths inside the root folder.
                    if Path::new(&path).starts_with(root) && !Path::new(&path).exists() {
                        gone.push(id);
                    }
                }
            }
        }
        gone.sort_unstable();
        gone.dedup();
        self.engine
            .delete_records(&gone, &self.options.actor, "its file is gone")?;
        let mut summary = self.add(&present)?;
        summary.removed = gone.len();
        Ok(summary)
    }

    /// The images under `root`, a folder given to `sync` that no longer exists: when there are
    /// some, an error that says what to do, unless the options say to drop them.
    fn vanished(&self, root: &Path, not_found: EngineError) -> Result<Vec<ImageId>> {
        let Ok(abs) = std::path::absolute(root) else {
            return Err(not_found);
        };
        let abs = abs.display().to_string();
        let store = self.engine.read()?;
        let mut ids: Vec<ImageId> = store
            .under(&format!("{abs}{}", std::path::MAIN_SEPARATOR))?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        ids.extend(store.by_path(&abs)?);
        if ids.is_empty() {
            return Err(not_found);
        }
        if !self.options.drop_vanished {
            return Err(EngineError::NotFound(format!(
                "{} is gone, and {} images of the collection were in it. If it moved, add or \
                 sync its new place: files that moved keep their ids. To drop its images, sync \
                 it again with --drop-vanished.",
                root.display(),
                ids.len()
            )));
        }
        Ok(ids)
    }

    fn commit(&mut self) -> Result<()> {
        self.engine.commit()?;
        let images = self.engine.len()?;
        self.observer.event(Event::Note {
            line: &format!("committed: {images} images in the collection"),
        });
        tracing::debug!(images, "committed");
        Ok(())
    }

    /// Reads and checks one file. `Ok(None)`: skipped (counted in `summary`); `Err`: failed,
    /// or no room in the decode budget (at once when `holding`: this run holds a batch).
    fn prepare(
        &mut self,
        file: &Path,
        summary: &mut IngestSummary,
        batch_hashes: &HashSet<String>,
        holding: bool,
    ) -> std::result::Result<Option<Prepared>, NotPrepared> {
        let path = canonical(file).map_err(|e| e.to_string())?;
        let path_str = path.display().to_string();
        let meta = std::fs::metadata(&path).map_err(|e| format!("cannot stat: {e}"))?;
        let (size, mtime) = size_and_mtime(&meta);
        let existing = (|| {
            let store = self.engine.read()?;
            Ok::<_, EngineError>(match store.by_path(&path_str)? {
                Some(id) => store.get(id)?,
                None => None,
            })
        })()
        .map_err(|e| e.to_string())?;
        if let Some(r) = &existing {
            if unchanged_by_stat(r, size, mtime) {
                summary.unchanged += 1;
                return Ok(None);
            }
        }
        let bytes = std::fs::read(&path).map_err(|e| format!("cannot read: {e}"))?;
        let hash = content_hash(&bytes);
        if let Some(r) = &existing {
            if r.content_hash == hash {
                // Touched but not changed: remember the new mtime so the next run is fast.
                let mut r = r.clone();
                r.mtime_unix = mtime;
                self.engine.update(&r).map_err(|e| e.to_string())?;
                summary.unchanged += 1;
                return Ok(None);
            }
        }
        let excluded = self
            .engine
            .read()
            .and_then(|store| Ok(store.is_excluded(&hash)?))
            .map_err(|e| e.to_string())?;
        if excluded {
            if !self.named.contains(&path) {
                summary.excluded += 1;
                return Ok(None);
            }
            // Added by name: the user wants it back.
            self.engine
                .write()
                .and_then(|mut store| Ok(store.include(&hash)?))
                .map_err(|e| e.to_string())?;
        }
        let same_content = self
            .engine
            .read()
            .and_then(|store| Ok(store.by_hash(&hash)?))
            .map_err(|e| e.to_string())?;
        if let Some(other) = same_content.filter(|id| Some(*id) != existing.as_ref().map(|r| r.id))
        {
            // The same bytes are indexed under another path. When that file is gone and this
            // path is new, the file moved: the image keeps its id and takes this path.
            if existing.is_none() && self.moved_here(other, &path_str, size, mtime)? {
                summary.moved += 1;
            } else {
                summary.duplicates += 1;
            }
            return Ok(None);
        }
        if batch_hashes.contains(&hash) {
            summary.duplicates += 1;
            return Ok(None);
        }
        // CapFilt reads a second copy of the image beside the retrieval model's.
        let copies = if self.options.capfilt.is_some() { 2 } else { 1 };
        let wait = if holding {
            Some(Duration::ZERO)
        } else {
            self.options.budget_wait
        };
        let admitted = decode_admitted(
            &bytes,
            &path,
            self.options.limits,
            &self.options.budget,
            wait,
            copies,
        )
        .map_err(|e| match e {
            ModelError::Busy(m) => NotPrepared::Busy(m),
            other => NotPrepared::Failed(other.image_reason().unwrap_or_else(|| other.to_string())),
        })?;
        let image = admitted.image;
        let (width, height) = (image.width(), image.height());
        let pdq = pdq_hash(&image).map(|(hash, quality)| Pdq {
            hash: PdqHash(hash),
            quality,
        });
        let thumb = if width.max(height) > THUMB_MAX_SIDE {
            image.thumbnail(THUMB_MAX_SIDE, THUMB_MAX_SIDE)
        } else {
            image.clone()
        };
        let (exif_date, description) = exif_fields(&bytes);
        let mut given: Vec<String> = sidecar_text(&path).into_iter().collect();
        given.extend(description);
        for t in self.extra_given.get(&path_str).into_iter().flatten() {
            if !given.contains(t) {
                given.push(t.clone());
            }
        }
        // A changed file stays in its product unless a product is attached to it now.
        let product = self
            .products
            .get(&path_str)
            .cloned()
            .or_else(|| existing.as_ref().and_then(|r| r.product.clone()));
        Ok(Some(Prepared {
            path: path_str,
            hash,
            size,
            mtime,
            width,
            height,
            image,
            thumb,
            _permit: admitted.permit,
            given,
            product,
            exif_date,
            replaces: existing.map(|r| r.id),
            pdq,
        }))
    }

    /// Gives image `id` the path `path` when its own file is gone; returns whether it did.
    fn moved_here(
        &self,
        id: ImageId,
        path: &str,
        size: u64,
        mtime: i64,
    ) -> std::result::Result<bool, NotPrepared> {
        let Some(mut record) = self.engine.get(id).map_err(|e| e.to_string())? else {
            return Ok(false);
        };
        if Path::new(&record.path).exists() {
            return Ok(false);
        }
        tracing::info!(id = id.0, from = %record.path, to = path, "moved");
        record.path = path.to_string();
        record.size_bytes = size;
        record.mtime_unix = mtime;
        self.engine.update(&record).map_err(|e| e.to_string())?;
        Ok(true)
    }

    /// Embeds, captions and adds a batch; returns how many images it wrote.
    fn flush(&mut self, batch: &mut Vec<Prepared>, summary: &mut IngestSummary) -> Result<usize> {
        if batch.is_empty() {
            return Ok(0);
        }
        // The images leave the batch (their permits stay until it is written).
        let images: Vec<DynamicImage> = batch
            .iter_mut()
            .map(|p| std::mem::replace(&mut p.image, DynamicImage::new_rgb8(0, 0)))
            .collect();
        let (emb, captions): (_, Vec<Vec<Caption>>) = match &self.options.capfilt {
            Some(params) => {
                let emb = self.models.encode_images(images.clone())?;
                // The product's texts are judged after the image's own given texts.
                let given: Vec<Vec<String>> = batch
                    .iter()
                    .map(|p| {
                        let mut g = p.given.clone();
                        g.extend(product_texts(p.product.as_ref()).map(|(_, t)| t.to_string()));
                        g
                    })
                    .collect();
                let candidates = self.models.capfilt(CapFiltJob {
                    images,
                    tokens: Some(emb.tokens.clone()),
                    given,
                    params: params.clone(),
                })?;
                let captions = batch
                    .iter()
                    .zip(candidates)
                    .map(|(p, cands)| split_candidates(p.given.len(), p.product.as_ref(), cands))
                    .collect::<Result<_>>()?;
                (emb, captions)
            }
            None => (
                self.models.encode_images(images)?,
                batch
                    .iter()
                    .map(|p| product_captions(p.product.as_ref()))
                    .collect(),
            ),
        };
        let itc = emb.itc;
        let (_, t, d) = emb.tokens.dims3().map_err(crate::model::ModelError::from)?;
        let n = batch.len();
        let mut features = Vec::with_capacity(n);
        for i in 0..n {
            let tokens: Vec<f32> = emb
                .tokens
                .i(i)
                .and_then(|x| x.flatten_all())
                .and_then(|x| x.to_vec1())
                .map_err(crate::model::ModelError::from)?;
            features.push(FeatureMatrix {
                rows: t,
                cols: d,
                data: tokens,
            });
        }
        let prepared: Vec<Prepared> = std::mem::take(batch);
        // Checked against every list before the records are written, so that a flagged image
        // is never stored without its flags.
        let matcher = self.engine.matcher()?;
        let mut found: Vec<Vec<Flag>> = Vec::with_capacity(n);
        let mut images = Vec::with_capacity(n);
        for (i, ((p, caps), f)) in prepared.iter().zip(captions).zip(&features).enumerate() {
            let keep = self.keep_ids.get(&p.path).copied();
            let mut flags = self.flags.get(&p.path).cloned().unwrap_or_default();
            let new = new_flags(&matcher, &flags, p.pdq.as_ref(), &itc[i]);
            flags.extend(new.iter().cloned());
            found.push(new);
            images.push(NewImage {
                record: ImageRecord {
                    id: keep.unwrap_or(ImageId(0)),
                    path: p.path.clone(),
                    content_hash: p.hash.clone(),
                    size_bytes: p.size,
                    width: p.width,
                    height: p.height,
                    mtime_unix: p.mtime,
                    exif_date: p.exif_date.clone(),
                    itc: itc[i].clone(),
                    captions: caps,
                    given_texts: p.given.clone(),
                    added_unix: now_unix(),
                    product: p.product.clone(),
                    pdq: p.pdq,
                    flags,
                },
                keep_id: keep,
                replaces: p.replaces,
                features: Some(f),
                thumbnail: Some(&p.thumb),
            });
        }
        // One write for the batch: a remote store makes one round trip, not one per image.
        let ids = self.engine.put_images(images, &self.options.actor)?;
        let events: Vec<AuditEvent> = prepared
            .iter()
            .zip(&ids)
            .zip(&found)
            .flat_map(|((p, &id), flags)| {
                let matcher = &matcher;
                flags
                    .iter()
                    .map(move |f| match_event(id, &p.path, f, matcher.entry(&f.list, f.entry)))
            })
            .collect();
        self.engine.audit_events(&self.options.actor, events)?;
        for p in &prepared {
            if p.replaces.is_some() {
                summary.updated += 1;
            } else {
                summary.added += 1;
            }
        }
        Ok(n)
    }
}

/// A CapFilt candidate as the collection stores it.
pub fn caption_of(c: CapFiltCandidate) -> Caption {
    Caption {
        text: c.text,
        source: match c.source {
            CandidateSource::Given => CaptionSource::Given,
            CandidateSource::Beam => CaptionSource::Beam,
            CandidateSource::Sample => CaptionSource::Sample,
        },
        p_match: Some(c.p_match),
        kept: c.kept,
    }
}

/// The title and description of `product` that have words, with the caption source each is
/// stored under.
pub fn product_texts(product: Option<&Product>) -> impl Iterator<Item = (CaptionSource, &str)> {
    product
        .into_iter()
        .flat_map(|p| {
            [
                (CaptionSource::Title, p.title.as_deref()),
                (CaptionSource::Description, p.description.as_deref()),
            ]
        })
        .filter_map(|(source, text)| Some((source, text?.trim())))
        .filter(|(_, t)| !t.is_empty())
}

/// The product's texts as captions without a verdict (no CapFilt): trusted, so kept, with no
/// p(match).
pub fn product_captions(product: Option<&Product>) -> Vec<Caption> {
    product_texts(product)
        .map(|(source, text)| Caption {
            text: text.to_string(),
            source,
            p_match: None,
            kept: true,
        })
        .collect()
}

/// CapFilt's candidates for one image, judged with `given` of the image's own texts followed
/// by its product's texts (in [`product_texts`] order), as stored captions: the product's texts
/// keep their sources and their p(match), and are kept whatever ITM says (a merchant's title is
/// trusted text).
fn split_candidates(
    given: usize,
    product: Option<&Product>,
    candidates: Vec<CapFiltCandidate>,
) -> Result<Vec<Caption>> {
    let texts: Vec<(CaptionSource, &str)> = product_texts(product).collect();
    // CapFilt lists the given texts first, one candidate each, in order.
    let misplaced = candidates.len() < given + texts.len()
        || texts.iter().enumerate().any(|(i, (_, t))| {
            let c = &candidates[given + i];
            c.source != CandidateSource::Given || c.text != *t
        });
    if misplaced {
        return Err(EngineError::Internal(
            "CapFilt did not return the product's texts where they were given".into(),
        ));
    }
    Ok(candidates
        .into_iter()
        .enumerate()
        .map(
            |(i, c)| match i.checked_sub(given).and_then(|j| texts.get(j)) {
                Some(&(source, _)) => Caption {
                    p_match: c.itm_logits.map(|_| c.p_match),
                    text: c.text,
                    source,
                    kept: true,
                },
                None => caption_of(c),
            },
        )
        .collect())
}

/// Whether a file whose record is `r` is unchanged by its size and mtime alone, without hashing.
/// mtimes have one-second resolution here: a file written in the second it was indexed (or
/// later) may have changed without its size or mtime showing it, so only older files are
/// trusted without hashing (git's "racy clean" rule).
pub(crate) fn unchanged_by_stat(r: &ImageRecord, size: u64, mtime: i64) -> bool {
    r.size_bytes == size && r.mtime_unix == mtime && mtime < r.added_unix
}

/// Size and mtime (seconds since the epoch) of a file's metadata.
pub(crate) fn size_and_mtime(meta: &std::fs::Metadata) -> (u64, i64) {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64);
    (meta.len(), mtime)
}

fn canonical(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).map_err(|e| EngineError::Io {
        path: p.to_path_buf(),
        source: e,
    })
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.') && n.len() > 1 && n != "..")
}

fn is_supported(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The image files under `paths` (files given directly are taken as they are), sorted, hidden
/// entries and unsupported types counted and skipped. Symlinks are followed; loops are detected
/// and skipped.
pub fn walk(paths: &[PathBuf], summary: &mut IngestSummary) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    for root in paths {
        if !root.exists() {
            return Err(EngineError::Io {
                path: root.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            });
        }
        let mut it = walkdir::WalkDir::new(root).follow_links(true).into_iter();
        while let Some(entry) = it.next() {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let path = e
                        .path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    let reason = if e.loop_ancestor().is_some() {
                        "symlink loop".to_string()
                    } else {
                        e.to_string()
                    };
                    summary.failed.push(Failure { path, reason });
                    continue;
                }
            };
            if entry.depth() > 0 && is_hidden(entry.path()) {
                summary.hidden += 1;
                if entry.file_type().is_dir() {
                    it.skip_current_dir();
                }
                continue;
            }
            if !entry.file_type().is_file() {
                continue;
            }
            let p = entry.path();
            if !is_supported(p) {
                if p.extension().is_some_and(|e| e == "txt") {
                    continue; // sidecar captions, read with their image
                }
                summary.unsupported += 1;
                continue;
            }
            let key = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            if seen.insert(key) {
                files.push(p.to_path_buf());
            }
        }
    }
    files.sort();
    Ok(files)
}

/// `photo.jpg.txt` or `photo.txt` beside the image: a given text.
fn sidecar_text(image: &Path) -> Option<String> {
    let mut candidates = vec![PathBuf::from(format!("{}.txt", image.display()))];
    candidates.push(image.with_extension("txt"));
    for c in candidates {
        let ok = std::fs::metadata(&c).is_ok_and(|m| m.is_file() && m.len() <= MAX_SIDECAR_BYTES);
        if ok {
            if let Ok(text) = std::fs::read_to_string(&c) {
                let text = text.trim();
                if !text.is_empty() {
                    return Some(text.to_string());
                }
            }
        }
    }
    None
}

/// (EXIF DateTimeOriginal, EXIF ImageDescription), when present.
fn exif_fields(bytes: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(exif) = exif::Reader::new().read_from_container(&mut Cursor::new(bytes)) else {
        return (None, None);
    };
    let date = exif
        .get_field(exif::Tag::DateTimeOriginal, exif::In::PRIMARY)
        .map(|f| f.display_value().to_string());
    let description = exif
        .get_field(exif::Tag::ImageDescription, exif::In::PRIMARY)
        .and_then(|f| match &f.value {
            exif::Value::Ascii(parts) => parts
                .first()
                .map(|b| String::from_utf8_lossy(b).trim().to_string()),
            _ => None,
        })
        .filter(|s| !s.is_empty());
    (date, description)
}

impl Engine {
    /// Adds files and folders (recursively): new files are embedded, changed ones embedded again,
    /// unchanged ones skipped, bad ones reported in the summary. With `sync`, images under `paths`
    /// whose files are gone are removed first.
    pub fn ingest<M: Encoders + ?Sized>(
        &self,
        models: &M,
        options: IngestOptions,
        paths: &[PathBuf],
        sync: bool,
        observer: &dyn Progress,
    ) -> Result<IngestSummary> {
        let mut ingestor = Ingestor::new(self, models, options, observer)?;
        if sync {
            ingestor.sync(paths)
        } else {
            ingestor.add(paths)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_skips_hidden_and_unsupported_and_survives_loops() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("a/.hidden")).unwrap();
        std::fs::write(d.join("a/x.JPG"), b"x").unwrap();
        std::fs::write(d.join("a/y.png"), b"y").unwrap();
        std::fs::write(d.join("a/.z.png"), b"z").unwrap();
        std::fs::write(d.join("a/.hidden/w.png"), b"w").unwrap();
        std::fs::write(d.join("a/notes.pdf"), b"p").unwrap();
        std::fs::write(d.join("a/y.png.txt"), b"caption").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(d.join("a"), d.join("a/loop")).unwrap();
        let mut s = IngestSummary::default();
        let files = walk(&[d.to_path_buf()], &mut s).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["x.JPG", "y.png"]);
        assert_eq!(s.unsupported, 1);
        assert_eq!(s.hidden, 2);
        #[cfg(unix)]
        assert!(
            s.failed.iter().any(|f| f.reason.contains("loop")),
            "{:?}",
            s.failed
        );
        assert_eq!(sidecar_text(&d.join("a/y.png")).as_deref(), Some("caption"));
    }
}
