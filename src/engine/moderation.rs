//! Moderation: match lists of reference images and PDQ hashes, matching the collection against
//! them (PDQ by multi-index hashing over the eight dihedral variants, and ITC cosine), flags on
//! matched images, the review queue, and the audit log of all of it.
//!
//! - A **reference image** added to a list is decoded as ingest decodes, hashed with PDQ in its
//!   eight dihedral transforms (so that mirrored and rotated copies match) and embedded with the
//!   retrieval model; the entry keeps the hashes and the ITC vector, never the image. A **hash
//!   file** gives entries with one PDQ hash each, which match by PDQ alone.
//! - An image **matches** an entry when the PDQ Hamming distance to the nearest of the entry's
//!   hashes is at most the list's distance (by default [`crate::index::DEFAULT_PDQ_DISTANCE`]: 31 of 256
//!   bits, the figure hash-sharing programmes use), or when the ITC cosine with the entry's
//!   vector is at least the list's minimum (by default [`crate::index::DEFAULT_MIN_COSINE`], set for BLIP
//!   base; each list has its own [`MatchRules`], since the cosine of a near-copy depends on the
//!   model and a bank of shared hashes may want no ITC rule at all). Hashes of quality below [`crate::index::MIN_PDQ_QUALITY`] (flat,
//!   featureless pictures) are left out of the PDQ rule on both sides.
//! - New and changed images are checked at ingest, before their records are written; adding
//!   entries checks the whole collection against the new entries. A match puts a [`Flag`] on the
//!   image, once per entry: a flag a reviewer cleared is never raised again for that entry.
//! - Every change is appended to the audit log (`audit.jsonl` in the collection directory)
//!   after the records are written, and fsynced before the call returns.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use image::DynamicImage;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::collection::Engine;
use super::error::{EngineError, Result};
use super::ingest::{walk, IngestSummary, DEFAULT_DECODE_BUDGET};
use super::matcher::{has_flag, judge, match_event, usable, Matcher, Overrides};
use super::models::Encoders;
use crate::index::{
    check_list_name, entry_id, now_unix, AuditEntry, AuditEvent, Decision, Filter, Flag,
    FlagFilter, ImageId, ImageRecord, ListEntry, ListInfo, MatchRule, MatchRules, PdqHash, Verdict,
};
use crate::model::pdq::pdq_dihedral;
use crate::model::preprocess::{decode_admitted, DecodeBudget, DecodeLimits, DecodePermit};
use crate::model::ModelError;
use crate::progress::{Event, Progress};

/// Longest entry label, in characters.
pub const MAX_LABEL: usize = 256;
/// Longest reviewer's note, in characters.
pub const MAX_NOTE: usize = 4000;
/// Most matches [`Engine::matches`] answers: past it, the thresholds match far too much.
pub const MAX_MATCHES: usize = 100_000;
/// Most audit events one [`Engine::audit`] call reads.
pub const MAX_AUDIT_PAGE: usize = 100_000;
/// Most images the ITC rule looks at per entry in a pass over the collection (a shared store
/// answers at most 16,384 nearest neighbours): an entry that matches more by ITC is reported
/// with its nearest this many, and a warning.
const MAX_ITC_PER_ENTRY: usize = 16_384;
/// Records read or rewritten under one lock.
const CHUNK: usize = 256;
/// Reference images per forward pass.
const REFERENCE_BATCH: usize = 8;
/// Entry ids named in one `entries_add` audit event.
const IDS_PER_EVENT: usize = 1000;
/// Entries written to the store at once.
const ENTRY_WRITE: usize = 10_000;

/// What [`Engine::matches`] looks for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MatchParams {
    /// Only this list's entries (every list when `None`).
    pub list: Option<String>,
    /// Largest PDQ Hamming distance that matches, for every list (each list's own when `None`).
    pub pdq_distance: Option<u32>,
    /// Smallest ITC cosine that matches, for every list (each list's own when `None`).
    pub min_cosine: Option<f32>,
}

/// A collection image that matches a list entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Match {
    /// The image.
    pub id: ImageId,
    /// Its path.
    pub path: String,
    /// The list.
    pub list: String,
    /// The entry.
    pub entry: u64,
    /// The entry's label.
    pub label: Option<String>,
    /// Which rule fired.
    pub rule: MatchRule,
    /// PDQ Hamming distance to the nearest dihedral variant of the entry.
    pub pdq_distance: Option<u32>,
    /// ITC cosine with the entry.
    pub cosine: Option<f32>,
}

/// A reference image for a list: its file name and bytes (kept only while it is hashed and
/// embedded).
#[derive(Debug, Clone)]
pub struct ReferenceImage {
    /// The file name (stored as the entry's source).
    pub name: String,
    /// The encoded image.
    pub bytes: Vec<u8>,
}

/// How reference images are admitted for decoding: the pixel limits, the memory budget they
/// share with every other decode of the process, and how long one waits for room in it.
#[derive(Debug, Clone)]
pub struct ReferenceDecode {
    /// Pixel limits.
    pub limits: DecodeLimits,
    /// The decode memory budget.
    pub budget: Arc<DecodeBudget>,
    /// How long a decode waits for room before the image is skipped as busy (`None`: as long
    /// as it takes).
    pub wait: Option<Duration>,
}

impl Default for ReferenceDecode {
    /// A budget of the command's own, waited for without end.
    fn default() -> Self {
        Self {
            limits: DecodeLimits::default(),
            budget: DecodeBudget::new(DEFAULT_DECODE_BUDGET),
            wait: None,
        }
    }
}

/// An input of [`Engine::add_list_images`] or [`Engine::add_list_hashes`] that was not added.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Skipped {
    /// The file name, or `line N` of a hash file.
    pub source: String,
    /// Why.
    pub reason: String,
}

/// What adding entries to a list did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntriesAdded {
    /// The list.
    pub list: String,
    /// The entries stored (an entry already there is replaced).
    pub added: Vec<ListEntry>,
    /// Inputs left out, with the reason.
    pub skipped: Vec<Skipped>,
    /// Collection images newly flagged by the new entries.
    pub flagged: usize,
}

/// An image waiting for review: its record, its pending flags and the entries they name.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewItem {
    /// The image.
    pub record: ImageRecord,
    /// Its flags waiting for a decision.
    pub flags: Vec<Flag>,
    /// The list entries of those flags (still in their lists).
    pub entries: Vec<ListEntry>,
}

/// A page of the review queue.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewPage {
    /// Images waiting for review, all pages.
    pub total: usize,
    /// This page, oldest flag first.
    pub items: Vec<ReviewItem>,
}

/// What [`Engine::backfill_pdq`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PdqBackfill {
    /// Images hashed now.
    pub hashed: usize,
    /// Images that had a hash already.
    pub had_hash: usize,
    /// Images under 5 pixels on a side, which PDQ cannot hash.
    pub too_small: usize,
    /// Images whose file is gone, unreadable, or changed since it was indexed, with the reason.
    pub failed: Vec<super::ingest::Failure>,
    /// Images newly flagged by the lists.
    pub flagged: usize,
    /// Images in the collection.
    pub total: u64,
}

/// A reference image being turned into an entry: hashed when decoded, embedded with its batch.
struct Reference {
    source: String,
    /// Its eight dihedral PDQ hashes and their quality (`None`: too small to hash).
    pdq: Option<([[u8; 32]; 8], u8)>,
    /// Taken by the forward pass.
    image: DynamicImage,
    _permit: DecodePermit,
}

/// Reads the `i`-th reference: its name and bytes, or its name and why it cannot be read.
type LoadReference<'a> =
    dyn FnMut(usize) -> std::result::Result<(String, Vec<u8>), (String, String)> + 'a;

impl Engine {
    /// Creates an empty match list whose entries match under `rules`.
    pub fn create_list(&self, name: &str, rules: MatchRules, actor: &str) -> Result<ListInfo> {
        check_actor(actor)?;
        check_name(name)?;
        let info = self.write()?.create_list(name, rules)?;
        self.lists_changed()?;
        self.audit_events(
            actor,
            vec![event(
                "list_create",
                json!({
                    "list": name,
                    "pdq_distance": rules.pdq_distance,
                    "min_cosine": rules.min_cosine,
                }),
            )],
        )?;
        Ok(info)
    }

    /// Deletes a list, its entries, and the flags it put on images (each image's removal of
    /// flags audited as `unflag`, then the list's as `list_delete`).
    pub fn delete_list(&self, name: &str, actor: &str) -> Result<ListInfo> {
        check_actor(actor)?;
        self.existing_list(name)?;
        // Flags first: a run cut short leaves the list, and running it again finishes the job.
        let mut flagged = Vec::new();
        self.for_each(&mut |r| {
            if r.flags.iter().any(|f| f.list == name) {
                flagged.push(r.id);
            }
            Ok(())
        })?;
        let mut unflagged = self.unflag(&flagged, name, actor)?;
        let info = self
            .write()?
            .delete_list(name)?
            .ok_or_else(|| no_list(name))?;
        self.lists_changed()?;
        // An image flagged by the list while the flags were being removed.
        let late = self.read()?.matching(
            &Filter {
                flagged: Some(FlagFilter {
                    list: Some(name.to_string()),
                    pending_only: false,
                }),
                ..Filter::default()
            },
            usize::MAX,
        )?;
        unflagged += self.unflag(&late, name, actor)?;
        self.audit_events(
            actor,
            vec![event(
                "list_delete",
                json!({ "list": name, "entries": info.entries, "unflagged": unflagged }),
            )],
        )?;
        Ok(info)
    }

    /// Every list.
    pub fn lists(&self) -> Result<Vec<ListInfo>> {
        Ok(self.read()?.lists()?)
    }

    /// The entries of a list.
    pub fn list_entries(&self, name: &str) -> Result<Vec<ListEntry>> {
        self.existing_list(name)?;
        Ok(self.read()?.entries(Some(name))?)
    }

    /// Adds reference images to a list: each is decoded, PDQ-hashed with its dihedral variants
    /// and embedded; the images themselves are not kept. The collection is then checked against
    /// the new entries and matches are flagged. Decodes are admitted by `decode`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_list_images<M: Encoders + ?Sized>(
        &self,
        models: &M,
        name: &str,
        images: Vec<ReferenceImage>,
        label: Option<&str>,
        actor: &str,
        decode: &ReferenceDecode,
        progress: &dyn Progress,
    ) -> Result<EntriesAdded> {
        let mut images: Vec<Option<ReferenceImage>> = images.into_iter().map(Some).collect();
        let n = images.len();
        self.add_references(models, name, n, label, actor, decode, progress, &mut |i| {
            let r = images[i]
                .take()
                .ok_or_else(|| (String::new(), "read twice".into()))?;
            Ok((r.name, r.bytes))
        })
    }

    /// [`Engine::add_list_images`] of image files and of the image files in folders
    /// (recursively, as ingest walks them), read one at a time. A file that cannot be read or
    /// decoded is skipped with its reason.
    pub fn add_list_files<M: Encoders + ?Sized>(
        &self,
        models: &M,
        name: &str,
        paths: &[PathBuf],
        label: Option<&str>,
        actor: &str,
        progress: &dyn Progress,
    ) -> Result<EntriesAdded> {
        self.existing_list(name)?;
        let mut walked = IngestSummary::default();
        let files = walk(paths, &mut walked)?;
        if files.is_empty() && walked.failed.is_empty() {
            return Err(EngineError::InvalidInput(format!(
                "no image files in {}",
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let mut added = self.add_references(
            models,
            name,
            files.len(),
            label,
            actor,
            &ReferenceDecode::default(),
            progress,
            &mut |i| {
                let path = &files[i];
                let source = path.display().to_string();
                match std::fs::read(path) {
                    Ok(bytes) => Ok((source, bytes)),
                    Err(e) => Err((source, format!("cannot read: {e}"))),
                }
            },
        )?;
        added
            .skipped
            .extend(walked.failed.into_iter().map(|f| Skipped {
                source: f.path,
                reason: f.reason,
            }));
        Ok(added)
    }

    /// Reads `n` reference images through `load` (their source and bytes, or their source and
    /// why not), makes entries of them, stores them, and checks the collection against them.
    #[allow(clippy::too_many_arguments)]
    fn add_references<M: Encoders + ?Sized>(
        &self,
        models: &M,
        name: &str,
        n: usize,
        label: Option<&str>,
        actor: &str,
        admission: &ReferenceDecode,
        progress: &dyn Progress,
        load: &mut LoadReference<'_>,
    ) -> Result<EntriesAdded> {
        check_actor(actor)?;
        let label = check_label(label)?;
        self.existing_list(name)?;
        let (budget, limits) = (&admission.budget, admission.limits);
        let mut entries: Vec<ListEntry> = Vec::new();
        let mut skipped = Vec::new();
        let mut batch: Vec<Reference> = Vec::with_capacity(REFERENCE_BATCH);
        // Embeds the batch into entries, and reports its images done.
        let flush = |batch: &mut Vec<Reference>, entries: &mut Vec<ListEntry>| -> Result<()> {
            if batch.is_empty() {
                return Ok(());
            }
            let mut refs = std::mem::take(batch);
            // The images leave the batch (their permits stay until it is embedded).
            let images: Vec<DynamicImage> = refs
                .iter_mut()
                .map(|r| std::mem::replace(&mut r.image, DynamicImage::new_rgb8(0, 0)))
                .collect();
            let encoded = models.encode_images(images)?;
            if encoded.itc.len() != refs.len() {
                return Err(EngineError::Internal(
                    "the model gave a vector count other than the image count".into(),
                ));
            }
            let n = refs.len() as u64;
            for (r, itc) in refs.iter().zip(encoded.itc) {
                entries.push(reference_entry(name, r, itc, label.clone()));
            }
            progress.event(Event::Done { n });
            Ok(())
        };
        let fail = |skipped: &mut Vec<Skipped>, source: String, reason: String| {
            progress.event(Event::Failed {
                item: &source,
                reason: &reason,
            });
            progress.event(Event::Done { n: 1 });
            skipped.push(Skipped { source, reason });
        };
        progress.event(Event::Started {
            what: "images",
            total: n as u64,
            done: 0,
        });
        for i in 0..n {
            if progress.stop_requested() {
                break;
            }
            let (source, bytes) = match load(i) {
                Ok(x) => x,
                Err((source, reason)) => {
                    fail(&mut skipped, source, reason);
                    continue;
                }
            };
            progress.event(Event::Working { item: &source });
            let at = Path::new(&source);
            let decode = |wait| decode_admitted(&bytes, at, limits, budget, wait, 1);
            // With a batch in hand, do not wait: the batch may be what holds the budget.
            let mut admitted = match batch.is_empty() {
                true => decode(admission.wait),
                false => decode(Some(Duration::ZERO)),
            };
            if matches!(admitted, Err(ModelError::Busy(_))) && !batch.is_empty() {
                // Embed the batch to free its share, then decode again.
                flush(&mut batch, &mut entries)?;
                admitted = decode(admission.wait);
            }
            match admitted {
                Ok(a) => batch.push(Reference {
                    source,
                    pdq: pdq_dihedral(&a.image),
                    image: a.image,
                    _permit: a.permit,
                }),
                // No room in the budget even after waiting: the request is refused whole (429
                // over HTTP), nothing stored, rather than an entry silently left out.
                Err(ModelError::Busy(m)) => return Err(EngineError::Busy(m)),
                Err(e) => {
                    let reason = e.image_reason().unwrap_or_else(|| e.to_string());
                    fail(&mut skipped, source, reason);
                }
            }
            if batch.len() >= REFERENCE_BATCH {
                flush(&mut batch, &mut entries)?;
            }
        }
        flush(&mut batch, &mut entries)?;
        progress.event(Event::Finished);
        let entries = dedupe(entries, &mut skipped);
        self.store_entries(name, entries, skipped, actor, None, progress)
    }

    /// Adds hash-only entries from a hash file's text: hex PDQ hashes, one per line, with an
    /// optional label column after a comma. A bad line is skipped with its reason.
    pub fn add_list_hashes(
        &self,
        name: &str,
        text: &str,
        source: Option<&str>,
        actor: &str,
    ) -> Result<EntriesAdded> {
        check_actor(actor)?;
        self.existing_list(name)?;
        let (mut entries, mut skipped) = parse_hashes(name, text, source);
        // A hash a reference image of the list already has (its plain hash: the same entry id)
        // would replace that entry and lose its other seven hashes and its vector.
        let images: BTreeMap<u64, Option<String>> = self
            .read()?
            .entries(Some(name))?
            .into_iter()
            .filter(|e| e.itc.is_some())
            .map(|e| (e.id, e.source))
            .collect();
        entries.retain(|e| match images.get(&e.id) {
            None => true,
            Some(image) => {
                skipped.push(Skipped {
                    source: e.label.clone().unwrap_or_else(|| e.pdq[0].to_hex()),
                    reason: format!(
                        "the list has this hash already, from the reference image {}",
                        image.as_deref().unwrap_or("(unnamed)")
                    ),
                });
                false
            }
        });
        self.store_entries(
            name,
            entries,
            skipped,
            actor,
            source,
            &crate::progress::Silent,
        )
    }

    /// Stores `entries` in list `name`, audits them, and flags the collection's images that
    /// match them.
    fn store_entries(
        &self,
        name: &str,
        entries: Vec<ListEntry>,
        skipped: Vec<Skipped>,
        actor: &str,
        source: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<EntriesAdded> {
        for chunk in entries.chunks(ENTRY_WRITE) {
            self.write()?.add_entries(chunk)?;
        }
        self.lists_changed()?;
        let events: Vec<AuditEvent> = entries
            .chunks(IDS_PER_EVENT)
            .map(|chunk| {
                let ids: Vec<u64> = chunk.iter().map(|e| e.id).collect();
                let mut d = json!({ "list": name, "count": ids.len(), "entries": ids });
                if let Some(s) = source {
                    d["source"] = s.into();
                }
                event("entries_add", d)
            })
            .collect();
        self.audit_events(actor, events)?;
        progress.event(Event::Note {
            line: &format!(
                "{} entries stored in {name}; checking the collection against them",
                entries.len()
            ),
        });
        let matcher = Matcher::new(entries, Vec::new());
        let flagged = self.flag_collection(&matcher, actor)?;
        if flagged > 0 {
            progress.event(Event::Note {
                line: &format!("{flagged} images flagged"),
            });
        }
        Ok(EntriesAdded {
            list: name.to_string(),
            added: matcher.into_entries(),
            skipped,
            flagged,
        })
    }

    /// Removes one entry of a list.
    pub fn remove_list_entry(&self, name: &str, entry: u64, actor: &str) -> Result<ListEntry> {
        check_actor(actor)?;
        self.existing_list(name)?;
        let removed = self
            .write()?
            .remove_entry(name, entry)?
            .ok_or_else(|| EngineError::NotFound(format!("list {name:?} has no entry {entry}")))?;
        self.lists_changed()?;
        let mut d = json!({ "list": name, "entry": entry });
        if let Some(l) = &removed.label {
            d["label"] = l.clone().into();
        }
        if let Some(s) = &removed.source {
            d["source"] = s.clone().into();
        }
        self.audit_events(actor, vec![event("entry_remove", d)])?;
        Ok(removed)
    }

    /// Every collection image that matches an entry, by image id then list and entry.
    pub fn matches(&self, params: &MatchParams) -> Result<Vec<Match>> {
        let over = check_params(params)?;
        self.refresh_matcher()?;
        let matcher = match &params.list {
            Some(name) => {
                let info = self.existing_list(name)?;
                Arc::new(Matcher::new(self.read()?.entries(Some(name))?, vec![info]))
            }
            None => self.matcher()?,
        };
        let candidates = self.candidates(&matcher, &over)?;
        let ids: Vec<ImageId> = candidates.keys().copied().collect();
        let mut out = Vec::new();
        for chunk in ids.chunks(CHUNK) {
            let store = self.read()?;
            for id in chunk {
                let Some(r) = store.get(*id)? else {
                    continue; // removed meanwhile
                };
                for &e in &candidates[id] {
                    let entry = &matcher.entries()[e];
                    let t = matcher.rules(e, &over);
                    if let Some(h) = judge(entry, r.pdq.as_ref(), &r.itc, &t) {
                        out.push(Match {
                            id: r.id,
                            path: r.path.clone(),
                            list: entry.list.clone(),
                            entry: entry.id,
                            label: entry.label.clone(),
                            rule: h.rule,
                            pdq_distance: h.pdq_distance,
                            cosine: h.cosine,
                        });
                    }
                }
                if out.len() > MAX_MATCHES {
                    return Err(EngineError::InvalidInput(format!(
                        "more than {MAX_MATCHES} matches: pick a list, or lower the PDQ distance \
                         or raise the minimum cosine"
                    )));
                }
            }
        }
        out.sort_by(|a, b| (a.id, &a.list, a.entry).cmp(&(b.id, &b.list, b.entry)));
        Ok(out)
    }

    /// Images with flags waiting for review (of `list`, or of any).
    pub fn review_queue(
        &self,
        list: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> Result<ReviewPage> {
        if let Some(name) = list {
            self.existing_list(name)?;
        }
        let waiting = |f: &Flag| f.pending() && list.is_none_or(|l| l == f.list);
        let ids = self.read()?.matching(
            &Filter {
                flagged: Some(FlagFilter {
                    list: list.map(str::to_string),
                    pending_only: true,
                }),
                ..Filter::default()
            },
            usize::MAX,
        )?;
        // Oldest waiting flag first.
        let mut keyed: Vec<(i64, ImageId)> = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let store = self.read()?;
            for &id in chunk {
                if let Some(r) = store.get(id)? {
                    if let Some(t) = r
                        .flags
                        .iter()
                        .filter(|f| waiting(f))
                        .map(|f| f.flagged_unix)
                        .min()
                    {
                        keyed.push((t, id));
                    }
                }
            }
        }
        keyed.sort_unstable();
        self.refresh_matcher()?;
        let matcher = self.matcher()?;
        let mut items = Vec::new();
        for &(_, id) in keyed.iter().skip(offset).take(limit) {
            let Some(record) = self.get(id)? else {
                continue;
            };
            let flags: Vec<Flag> = record
                .flags
                .iter()
                .filter(|f| f.pending())
                .cloned()
                .collect();
            let mut entries: Vec<ListEntry> = Vec::new();
            for f in &flags {
                if let Some(e) = matcher.entry(&f.list, f.entry) {
                    if !entries.iter().any(|x| x.list == e.list && x.id == e.id) {
                        entries.push(e.clone());
                    }
                }
            }
            items.push(ReviewItem {
                record,
                flags,
                entries,
            });
        }
        Ok(ReviewPage {
            total: keyed.len(),
            items,
        })
    }

    /// Records a decision on every pending flag of image `id`.
    pub fn decide(
        &self,
        id: ImageId,
        verdict: Verdict,
        note: &str,
        actor: &str,
    ) -> Result<ImageRecord> {
        check_actor(actor)?;
        let note = note.trim();
        if note.chars().count() > MAX_NOTE {
            return Err(EngineError::InvalidInput(format!(
                "the note is longer than {MAX_NOTE} characters"
            )));
        }
        let (record, decided) = {
            let mut store = self.write()?;
            let mut record = store
                .get(id)?
                .ok_or_else(|| EngineError::NotFound(format!("no image with id {id}")))?;
            let decision = Decision {
                verdict,
                note: note.to_string(),
                actor: actor.to_string(),
                unix: now_unix(),
            };
            let mut decided = Vec::new();
            for f in record.flags.iter_mut().filter(|f| f.pending()) {
                f.decision = Some(decision.clone());
                decided.push(json!({ "list": f.list, "entry": f.entry }));
            }
            if decided.is_empty() {
                return Err(EngineError::Conflict(format!(
                    "image {id} has no flag waiting for review"
                )));
            }
            store.update(&record)?;
            store.flush()?;
            (record, decided)
        };
        self.audit_events(
            actor,
            vec![event(
                "decision",
                json!({
                    "id": id.0,
                    "path": record.path,
                    "verdict": verdict,
                    "note": note,
                    "flags": decided,
                }),
            )],
        )?;
        Ok(record)
    }

    /// Up to `limit` audit events after `after` (a `seq`), oldest first.
    pub fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        Ok(self.audit_log().read(after, limit.min(MAX_AUDIT_PAGE))?)
    }

    /// Computes the PDQ hash of every image that has none (collections made before hashes
    /// were taken), from its file, and checks those images against the lists. A file that is
    /// gone, unreadable, or changed since it was indexed is reported and left as it is.
    pub fn backfill_pdq(
        &self,
        limits: DecodeLimits,
        actor: &str,
        progress: &dyn Progress,
    ) -> Result<PdqBackfill> {
        check_actor(actor)?;
        self.refresh_matcher()?;
        let mut summary = PdqBackfill::default();
        let mut todo: Vec<(ImageId, String, String)> = Vec::new();
        self.for_each(&mut |r| {
            match r.pdq {
                Some(_) => summary.had_hash += 1,
                None => todo.push((r.id, r.path, r.content_hash)),
            }
            Ok(())
        })?;
        progress.event(Event::Started {
            what: "images",
            total: todo.len() as u64,
            done: 0,
        });
        for chunk in todo.chunks(CHUNK / 4) {
            if progress.stop_requested() {
                break;
            }
            let mut hashed = Vec::with_capacity(chunk.len());
            for (id, path, hash) in chunk {
                progress.event(Event::Working { item: path });
                match hash_file(Path::new(path), hash, limits) {
                    Ok(Some(p)) => hashed.push((*id, hash.clone(), p)),
                    Ok(None) => summary.too_small += 1,
                    Err(reason) => {
                        progress.event(Event::Failed {
                            item: path,
                            reason: &reason,
                        });
                        summary.failed.push(super::ingest::Failure {
                            path: path.clone(),
                            reason,
                        });
                    }
                }
            }
            let matcher = self.matcher()?;
            let mut events = Vec::new();
            {
                let mut store = self.write()?;
                let mut changed = Vec::with_capacity(hashed.len());
                for (id, hash, pdq) in hashed {
                    let Some(mut r) = store.get(id)? else {
                        continue;
                    };
                    if r.pdq.is_some() || r.content_hash != hash {
                        continue; // hashed or replaced meanwhile
                    }
                    r.pdq = Some(pdq);
                    let new = super::matcher::new_flags(&matcher, &r.flags, r.pdq.as_ref(), &r.itc);
                    if !new.is_empty() {
                        summary.flagged += 1;
                    }
                    for f in &new {
                        events.push(match_event(
                            r.id,
                            &r.path,
                            f,
                            matcher.entry(&f.list, f.entry),
                        ));
                    }
                    r.flags.extend(new);
                    summary.hashed += 1;
                    changed.push(r);
                }
                store.update_all(&changed)?;
                store.flush()?;
            }
            self.audit_events(actor, events)?;
            progress.event(Event::Done {
                n: chunk.len() as u64,
            });
        }
        progress.event(Event::Finished);
        self.commit()?;
        summary.total = self.len()?;
        Ok(summary)
    }

    /// [`super::error::EngineError::NotFound`] unless list `name` exists.
    fn existing_list(&self, name: &str) -> Result<ListInfo> {
        check_name(name)?;
        self.read()?
            .lists()?
            .into_iter()
            .find(|l| l.name == name)
            .ok_or_else(|| no_list(name))
    }

    /// The candidates of a pass over the collection: for each image, the entries of `matcher`
    /// it may match under their lists' rules with `over` applied (its PDQ hash looked up in the multi-index; the nearest images to
    /// each reference vector, by the store's vector search, as far as the cosine reaches the
    /// threshold). [`judge`] decides on each pair.
    fn candidates(
        &self,
        matcher: &Matcher,
        over: &Overrides,
    ) -> Result<BTreeMap<ImageId, BTreeSet<usize>>> {
        let mut out: BTreeMap<ImageId, BTreeSet<usize>> = BTreeMap::new();
        if matcher.is_empty() {
            return Ok(out);
        }
        let (ids, hashes): (Vec<ImageId>, Vec<PdqHash>) = self
            .read()?
            .pdq_hashes()?
            .iter()
            .filter_map(|(id, pdq)| usable(Some(pdq)).map(|h| (*id, *h)))
            .unzip();
        for (q, e) in matcher.pdq_pairs(&hashes, matcher.widest(over)) {
            out.entry(ids[q]).or_default().insert(e);
        }
        drop(hashes);
        let everything = Filter::default();
        for e in matcher.with_vectors() {
            let Some(v) = matcher.entries()[e].itc.as_deref() else {
                continue;
            };
            let min_cosine = matcher.rules(e, over).min_cosine;
            if min_cosine > 1.0 {
                continue; // the list's ITC rule is off
            }
            let mut k = 64;
            loop {
                let hits = self.read()?.vector_search(v, k, None, &everything)?;
                let full = hits.len() >= k;
                let reaches = hits.last().is_some_and(|&(_, c)| c >= min_cosine);
                for (id, c) in hits {
                    if c >= min_cosine {
                        out.entry(id).or_default().insert(e);
                    }
                }
                if !full || !reaches {
                    break;
                }
                if k >= MAX_ITC_PER_ENTRY {
                    let entry = &matcher.entries()[e];
                    tracing::warn!(
                        list = %entry.list,
                        entry = entry.id,
                        "more than {MAX_ITC_PER_ENTRY} images reach the minimum cosine with this entry; only the nearest are checked"
                    );
                    break;
                }
                k = (k * 4).min(MAX_ITC_PER_ENTRY);
            }
        }
        Ok(out)
    }

    /// Checks the collection against the entries of `matcher` (each under its list's rules) and flags
    /// what matches and is not flagged for that entry yet; returns how many images got a new
    /// flag.
    fn flag_collection(&self, matcher: &Matcher, actor: &str) -> Result<usize> {
        let none = Overrides::default();
        let candidates = self.candidates(matcher, &none)?;
        let ids: Vec<ImageId> = candidates.keys().copied().collect();
        self.edit_records(&ids, actor, &mut |r| {
            let mut events = Vec::new();
            for &e in &candidates[&r.id] {
                let entry = &matcher.entries()[e];
                if has_flag(&r.flags, &entry.list, entry.id) {
                    continue;
                }
                let t = matcher.rules(e, &none);
                if let Some(h) = judge(entry, r.pdq.as_ref(), &r.itc, &t) {
                    let f = h.flag(entry);
                    events.push(match_event(r.id, &r.path, &f, Some(entry)));
                    r.flags.push(f);
                }
            }
            events
        })
    }

    /// Removes the flags of list `name` from images `ids`, auditing each image's; returns how
    /// many images lost flags.
    fn unflag(&self, ids: &[ImageId], name: &str, actor: &str) -> Result<usize> {
        self.edit_records(ids, actor, &mut |r| {
            let (gone, kept): (Vec<Flag>, Vec<Flag>) = std::mem::take(&mut r.flags)
                .into_iter()
                .partition(|f| f.list == name);
            r.flags = kept;
            if gone.is_empty() {
                return Vec::new();
            }
            vec![event(
                "unflag",
                json!({
                    "id": r.id.0,
                    "path": r.path,
                    "list": name,
                    "reason": "its list was deleted",
                    "flags": gone,
                }),
            )]
        })
    }

    /// Applies `edit` to the records of `ids` still stored, [`CHUNK`] at a time under one write
    /// lock: a record for which `edit` gives audit events has changed and is written back, and
    /// the events are audited once the chunk is durable. Returns how many records changed.
    fn edit_records(
        &self,
        ids: &[ImageId],
        actor: &str,
        edit: &mut dyn FnMut(&mut ImageRecord) -> Vec<AuditEvent>,
    ) -> Result<usize> {
        let mut count = 0;
        for chunk in ids.chunks(CHUNK) {
            let mut events = Vec::new();
            {
                let mut store = self.write()?;
                let mut changed = Vec::new();
                for id in chunk {
                    let Some(mut r) = store.get(*id)? else {
                        continue; // removed meanwhile
                    };
                    let mine = edit(&mut r);
                    if !mine.is_empty() {
                        events.extend(mine);
                        changed.push(r);
                    }
                }
                count += changed.len();
                store.update_all(&changed)?;
                store.flush()?;
            }
            self.audit_events(actor, events)?;
        }
        Ok(count)
    }
}

/// An entry of list `list` for reference image `r` with ITC vector `itc`.
fn reference_entry(list: &str, r: &Reference, itc: Vec<f32>, label: Option<String>) -> ListEntry {
    let (pdq, quality) = match r.pdq {
        Some((hashes, quality)) => (hashes.iter().map(|h| PdqHash(*h)).collect(), Some(quality)),
        None => (Vec::new(), None),
    };
    let plain: Option<&PdqHash> = pdq.first();
    ListEntry {
        list: list.to_string(),
        id: entry_id(list, plain, Some(&itc)),
        label,
        source: Some(
            Path::new(&r.source)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| r.source.clone()),
        ),
        pdq,
        quality,
        itc: Some(itc),
        added_unix: now_unix(),
    }
}

/// `entries` with one entry per id (the first), the others in `skipped`.
fn dedupe(entries: Vec<ListEntry>, skipped: &mut Vec<Skipped>) -> Vec<ListEntry> {
    let mut seen: HashMap<u64, String> = HashMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let source = e.source.clone().unwrap_or_default();
        match seen.get(&e.id) {
            Some(first) => skipped.push(Skipped {
                source,
                reason: format!("the same picture as {first} (the same PDQ hash)"),
            }),
            None => {
                seen.insert(e.id, source);
                out.push(e);
            }
        }
    }
    out
}

/// Parses a hash file: one hex PDQ hash per line, optionally a comma and a label; blank lines
/// are skipped, and so is a first line that is a header (its first field is not made of hex
/// digits). Gives the entries (the first of a hash given twice) and the lines skipped, as
/// `line N`.
pub(crate) fn parse_hashes(
    list: &str,
    text: &str,
    source: Option<&str>,
) -> (Vec<ListEntry>, Vec<Skipped>) {
    let mut entries: Vec<ListEntry> = Vec::new();
    let mut skipped = Vec::new();
    let mut first_line: HashMap<u64, usize> = HashMap::new();
    let mut seen_content = false;
    let now = now_unix();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        let line = line.trim().trim_start_matches('\u{feff}');
        if line.is_empty() {
            continue;
        }
        let (hex, label) = match line.split_once(',') {
            Some((h, l)) => (unquote(h), Some(unquote(l))),
            None => (unquote(line), None),
        };
        let header = !seen_content && !hex.chars().all(|c| c.is_ascii_hexdigit());
        seen_content = true;
        if header {
            continue;
        }
        let bad = |reason: String| Skipped {
            source: format!("line {number}"),
            reason,
        };
        let Some(hash) = PdqHash::from_hex(hex) else {
            skipped.push(bad(format!(
                "{:?} is not a PDQ hash (64 hex digits)",
                hex.chars().take(80).collect::<String>()
            )));
            continue;
        };
        let label = label.filter(|l| !l.is_empty());
        if let Some(l) = label {
            if l.chars().count() > MAX_LABEL || l.chars().any(char::is_control) {
                skipped.push(bad(format!(
                    "the label is longer than {MAX_LABEL} characters or holds control characters"
                )));
                continue;
            }
        }
        let id = entry_id(list, Some(&hash), None);
        if let Some(first) = first_line.get(&id) {
            skipped.push(bad(format!("the same hash as line {first}")));
            continue;
        }
        first_line.insert(id, number);
        entries.push(ListEntry {
            list: list.to_string(),
            id,
            label: label.map(str::to_string),
            source: source.map(str::to_string),
            pdq: vec![hash],
            quality: None,
            itc: None,
            added_unix: now,
        });
    }
    (entries, skipped)
}

/// `s` trimmed, without the double quotes of a quoted CSV field.
fn unquote(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .map(str::trim)
        .unwrap_or(s)
}

/// The PDQ hash of the file at `path` if its content is still `content_hash`; `Ok(None)` for an
/// image too small to hash.
fn hash_file(
    path: &Path,
    content_hash: &str,
    limits: DecodeLimits,
) -> std::result::Result<Option<crate::index::Pdq>, String> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "the file is gone".to_string(),
        _ => format!("cannot read: {e}"),
    })?;
    if crate::index::content_hash(&bytes) != content_hash {
        return Err("the file changed since it was indexed: add or sync it again".into());
    }
    let image = crate::model::preprocess::decode_image(&bytes, path, limits)
        .map_err(|e| e.image_reason().unwrap_or_else(|| e.to_string()))?;
    Ok(
        crate::model::pdq::pdq_hash(&image).map(|(hash, quality)| crate::index::Pdq {
            hash: PdqHash(hash),
            quality,
        }),
    )
}

/// An audit event from a JSON object.
fn event(action: &str, details: Value) -> AuditEvent {
    let details = match details {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    AuditEvent::new(action, details)
}

fn no_list(name: &str) -> EngineError {
    EngineError::NotFound(format!("no match list {name:?}"))
}

fn check_name(name: &str) -> Result<()> {
    Ok(check_list_name(name)?)
}

/// Refuses an actor that is empty or not one line.
fn check_actor(actor: &str) -> Result<()> {
    if actor.trim().is_empty() || actor.chars().any(char::is_control) || actor.len() > 200 {
        return Err(EngineError::InvalidInput(format!(
            "actor {actor:?}: one line of up to 200 bytes"
        )));
    }
    Ok(())
}

/// A label trimmed (`None` when empty), refused when too long or not one line.
fn check_label(label: Option<&str>) -> Result<Option<String>> {
    let Some(raw) = label else {
        return Ok(None);
    };
    // Control characters anywhere, even in the white space trimmed off, are refused.
    let l = raw.trim();
    if l.chars().count() > MAX_LABEL || raw.chars().any(char::is_control) {
        return Err(EngineError::InvalidInput(format!(
            "a label is one line of at most {MAX_LABEL} characters"
        )));
    }
    Ok(Some(l.to_string()).filter(|l| !l.is_empty()))
}

/// The overrides of `params`, checked.
fn check_params(params: &MatchParams) -> Result<Overrides> {
    let over = Overrides {
        pdq_distance: params.pdq_distance,
        min_cosine: params.min_cosine,
    };
    over.apply(MatchRules::default())
        .check()
        .map_err(|e| EngineError::InvalidInput(e.to_string()))?;
    Ok(over)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_files_skip_headers_and_blanks_and_name_bad_lines() {
        let a = "ab".repeat(32);
        let b = "CD".repeat(32);
        let text = format!(
            "\u{feff}hash,label\n\n{a},bank A\n  {b}  \nnot-a-hash\n{a},again\n\"{}\",\"quoted\"\n{},{}\n",
            "ef".repeat(32),
            "01".repeat(32),
            "x".repeat(300)
        );
        let (entries, skipped) = parse_hashes("bank", &text, Some("bank.csv"));
        let got: Vec<(String, Option<&str>)> = entries
            .iter()
            .map(|e| (e.pdq[0].to_hex(), e.label.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                (a.clone(), Some("bank A")),
                (b.to_lowercase(), None),
                ("ef".repeat(32), Some("quoted")),
            ]
        );
        for e in &entries {
            assert_eq!(e.list, "bank");
            assert_eq!(e.id, entry_id("bank", Some(&e.pdq[0]), None));
            assert_eq!((e.quality, e.itc.is_none()), (None, true));
            assert_eq!(e.source.as_deref(), Some("bank.csv"));
        }
        let lines: Vec<&str> = skipped.iter().map(|s| s.source.as_str()).collect();
        assert_eq!(lines, ["line 5", "line 6", "line 8"]);
        assert!(skipped[0].reason.contains("not a PDQ hash"), "{skipped:?}");
        assert!(skipped[1].reason.contains("line 3"), "{skipped:?}");
        assert!(skipped[2].reason.contains("label"), "{skipped:?}");
    }

    #[test]
    fn only_a_first_line_can_be_a_header() {
        let a = "ab".repeat(32);
        let (entries, skipped) = parse_hashes("l", &format!("{a}\nhash\n"), None);
        assert_eq!(entries.len(), 1);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].source, "line 2");
        // A first line of hex digits that is not a hash is a bad line, not a header.
        let (entries, skipped) = parse_hashes("l", &format!("abcd\n{a}\n"), None);
        assert_eq!((entries.len(), skipped[0].source.as_str()), (1, "line 1"));
    }

    #[test]
    fn the_same_picture_twice_is_one_entry() {
        let entry = |source: &str, id: u64| ListEntry {
            list: "l".into(),
            id,
            label: None,
            source: Some(source.into()),
            pdq: Vec::new(),
            quality: None,
            itc: None,
            added_unix: 0,
        };
        let mut skipped = Vec::new();
        let kept = dedupe(
            vec![entry("a.jpg", 1), entry("b.jpg", 2), entry("a-copy.png", 1)],
            &mut skipped,
        );
        assert_eq!(kept.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].source, "a-copy.png");
        assert!(skipped[0].reason.contains("a.jpg"));
    }

    #[test]
    fn bad_parameters_actors_and_labels_are_refused() {
        let ok = MatchParams::default();
        assert!(check_params(&ok).is_ok());
        for bad in [
            MatchParams {
                pdq_distance: Some(257),
                ..ok.clone()
            },
            MatchParams {
                min_cosine: Some(f32::NAN),
                ..ok.clone()
            },
            MatchParams {
                min_cosine: Some(-1.5),
                ..ok.clone()
            },
        ] {
            let e = check_params(&bad).unwrap_err();
            assert_eq!(e.kind(), super::super::ErrorKind::InvalidInput, "{bad:?}");
        }
        assert!(check_actor("cli").is_ok());
        for bad in ["", "  ", "a\nb", &"x".repeat(201)] {
            assert!(check_actor(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_label(Some("  ")).unwrap(), None);
        assert_eq!(check_label(Some(" gun ")).unwrap().as_deref(), Some("gun"));
        assert!(check_label(Some("a\nb")).is_err());
        assert!(check_label(Some(&"x".repeat(MAX_LABEL + 1))).is_err());
    }
}
