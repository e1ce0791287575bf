//! Moderation: match lists of reference images and PDQ hashes, matching the collection against
//! them (PDQ by multi-index hashing over the eight dihedral variants, and ITC cosine), flags on
//! matched images, the review queue, and the audit log of all of it.

use serde::Serialize;

use super::collection::Engine;
use super::error::Result;
use super::models::Encoders;
use crate::index::{
    AuditEntry, Flag, ImageId, ImageRecord, ListEntry, ListInfo, MatchRule, Verdict,
    DEFAULT_PDQ_DISTANCE,
};
use crate::progress::Progress;

/// The ITC cosine at or above which an image matches a reference image by default.
pub const DEFAULT_MIN_COSINE: f32 = 0.92;

/// What [`Engine::matches`] looks for.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchParams {
    /// Only this list's entries (every list when `None`).
    pub list: Option<String>,
    /// Largest PDQ Hamming distance that matches.
    pub pdq_distance: u32,
    /// Smallest ITC cosine that matches.
    pub min_cosine: f32,
}

impl Default for MatchParams {
    fn default() -> Self {
        Self {
            list: None,
            pdq_distance: DEFAULT_PDQ_DISTANCE,
            min_cosine: DEFAULT_MIN_COSINE,
        }
    }
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

impl Engine {
    /// Creates an empty match list.
    pub fn create_list(&self, name: &str, actor: &str) -> Result<ListInfo> {
        let _ = (name, actor);
        todo!()
    }

    /// Deletes a list, its entries, and the flags it put on images.
    pub fn delete_list(&self, name: &str, actor: &str) -> Result<ListInfo> {
        let _ = (name, actor);
        todo!()
    }

    /// Every list.
    pub fn lists(&self) -> Result<Vec<ListInfo>> {
        todo!()
    }

    /// The entries of a list.
    pub fn list_entries(&self, name: &str) -> Result<Vec<ListEntry>> {
        let _ = name;
        todo!()
    }

    /// Adds reference images to a list: each is decoded, PDQ-hashed with its dihedral variants
    /// and embedded; the images themselves are not kept. The collection is then checked against
    /// the new entries and matches are flagged.
    pub fn add_list_images<M: Encoders + ?Sized>(
        &self,
        models: &M,
        name: &str,
        images: Vec<ReferenceImage>,
        label: Option<&str>,
        actor: &str,
        progress: &dyn Progress,
    ) -> Result<EntriesAdded> {
        let _ = (models, name, images, label, actor, progress);
        todo!()
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
        let _ = (name, text, source, actor);
        todo!()
    }

    /// Removes one entry of a list.
    pub fn remove_list_entry(&self, name: &str, entry: u64, actor: &str) -> Result<ListEntry> {
        let _ = (name, entry, actor);
        todo!()
    }

    /// Every collection image that matches an entry, by image id then list and entry.
    pub fn matches(&self, params: &MatchParams) -> Result<Vec<Match>> {
        let _ = params;
        todo!()
    }

    /// Images with flags waiting for review (of `list`, or of any).
    pub fn review_queue(
        &self,
        list: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> Result<ReviewPage> {
        let _ = (list, offset, limit);
        todo!()
    }

    /// Records a decision on every pending flag of image `id`.
    pub fn decide(
        &self,
        id: ImageId,
        verdict: Verdict,
        note: &str,
        actor: &str,
    ) -> Result<ImageRecord> {
        let _ = (id, verdict, note, actor);
        todo!()
    }

    /// Up to `limit` audit events after `after` (a `seq`), oldest first.
    pub fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let _ = (after, limit);
        todo!()
    }
}
