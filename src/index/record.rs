//! What a collection stores about each image ([`ImageRecord`], its [`Caption`]s) and about
//! itself ([`CollectionInfo`], [`CommitState`]): the types every store reads and writes, with
//! their JSON form.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::attributes::{Product, Schema};
use super::error::{IndexError, Result};
use super::id::ImageId;
use super::moderation::Flag;
use super::pdq::Pdq;

/// Where a caption came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptionSource {
    /// Supplied by the user (sidecar file, API).
    Given,
    /// BLIP captioner, beam search.
    Beam,
    /// BLIP captioner, nucleus sampling (CapFilt).
    Sample,
    /// Derived from the file name.
    FileName,
    /// The title of the image's product (trusted: never dropped by the filter).
    Title,
    /// The description of the image's product (trusted: never dropped by the filter).
    Description,
}

impl CaptionSource {
    /// Whether text of this source is a product's, indexed in its own fields rather than as a
    /// caption.
    pub fn is_product_text(self) -> bool {
        matches!(self, Self::Title | Self::Description)
    }
}

/// A caption of an image and the CapFilt verdict on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Caption {
    /// The caption text.
    pub text: String,
    /// Where it came from.
    pub source: CaptionSource,
    /// ITM p(match) of the caption against its image, when computed.
    #[serde(default)]
    pub p_match: Option<f32>,
    /// Whether the filter kept it; only kept captions are indexed for text search.
    pub kept: bool,
}

/// Everything stored about one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The image's id.
    pub id: ImageId,
    /// Absolute, canonical path of the image file.
    pub path: String,
    /// Hex SHA-256 of the file's bytes (see [`content_hash`]).
    pub content_hash: String,
    /// File size.
    pub size_bytes: u64,
    /// Width in pixels (after EXIF orientation).
    pub width: u32,
    /// Height in pixels (after EXIF orientation).
    pub height: u32,
    /// File modification time, seconds since the Unix epoch.
    pub mtime_unix: i64,
    /// EXIF `DateTimeOriginal`, as written in the file.
    #[serde(default)]
    pub exif_date: Option<String>,
    /// The normalised ITC image embedding (stored as base64 of little-endian `f32`).
    #[serde(with = "f32_base64")]
    pub itc: Vec<f32>,
    /// Captions, kept or not.
    #[serde(default)]
    pub captions: Vec<Caption>,
    /// Texts supplied with the image (sidecar, API), indexed as the `given` field.
    #[serde(default)]
    pub given_texts: Vec<String>,
    /// When the image was added, seconds since the Unix epoch.
    pub added_unix: i64,
    /// The catalogue product the image belongs to, with its title, description and attributes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<Product>,
    /// The image's PDQ hash (`None` for an image too small to hash, or stored before hashes
    /// were taken: `reindex --only pdq` fills it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pdq: Option<Pdq>,
    /// Its matches with match-list entries, with their review decisions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<Flag>,
}

impl ImageRecord {
    /// The captions that passed the filter, i.e. those indexed for text search as captions
    /// (a product's title and description have fields of their own).
    pub fn kept_captions(&self) -> impl Iterator<Item = &str> {
        self.captions
            .iter()
            .filter(|c| c.kept && !c.source.is_product_text())
            .map(|c| c.text.as_str())
    }
}

/// What a collection was built with. Stored once, at creation; every later open must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionInfo {
    /// Retrieval checkpoint (model id or canonical directory) that made the ITC vectors and ViT
    /// features: where to find it.
    pub retrieval_model: String,
    /// The retrieval checkpoint's identity by content (`sha256:...` of its config and weights),
    /// when known: what the models of a later command are matched by. Collections made before
    /// it was recorded match by `retrieval_model` and record it at their next open with models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrieval_fingerprint: Option<String>,
    /// Captioning checkpoint, if captions were generated.
    #[serde(default)]
    pub caption_model: Option<String>,
    /// ITC embedding dimension (256 for BLIP).
    pub embedding_dim: usize,
    /// ViT output tokens stored per image (577 for ViT-B/16 at 384).
    pub vit_tokens: usize,
    /// ViT hidden size (768 base, 1024 large).
    pub vit_hidden: usize,
    /// On-disk format version ([`CollectionInfo::FORMAT_VERSION`] when created).
    pub format_version: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: i64,
    /// The type of every product attribute seen so far (see
    /// [`super::attributes::merge_schema`]).
    #[serde(default, skip_serializing_if = "Schema::is_empty")]
    pub attributes: Schema,
}

impl CollectionInfo {
    /// The on-disk format this code writes.
    pub const FORMAT_VERSION: u32 = 1;

    /// Info for a new collection, with the current format version and time.
    pub fn new(
        retrieval_model: impl Into<String>,
        caption_model: Option<String>,
        embedding_dim: usize,
        vit_tokens: usize,
        vit_hidden: usize,
    ) -> Self {
        CollectionInfo {
            retrieval_model: retrieval_model.into(),
            retrieval_fingerprint: None,
            caption_model,
            embedding_dim,
            vit_tokens,
            vit_hidden,
            format_version: Self::FORMAT_VERSION,
            created_unix: now_unix(),
            attributes: Schema::new(),
        }
    }

    /// This info once models described by `requested` are adopted: checked with
    /// [`CollectionInfo::check_compatible`], then the retrieval model's place and fingerprint
    /// (and a caption model, if none was recorded) taken from `requested`.
    pub fn adopting(&self, requested: &CollectionInfo, dir: &Path) -> Result<CollectionInfo> {
        self.check_compatible(requested, dir)?;
        let mut info = self.clone();
        info.retrieval_model = requested.retrieval_model.clone();
        if requested.retrieval_fingerprint.is_some() {
            info.retrieval_fingerprint = requested.retrieval_fingerprint.clone();
        }
        if requested.caption_model.is_some() && info.caption_model.is_none() {
            info.caption_model = requested.caption_model.clone();
        }
        Ok(info)
    }

    /// Checks that a collection built with `self` can be used with `requested`.
    ///
    /// Retrieval model, dimensions and format must match: ITC vectors and ViT features of
    /// different models live in different spaces. A different caption model is allowed (captions
    /// are plain text) and only logged.
    pub fn check_compatible(&self, requested: &CollectionInfo, dir: &Path) -> Result<()> {
        let err = |field, stored: String, requested: String| IndexError::Incompatible {
            path: dir.to_path_buf(),
            field,
            stored,
            requested,
        };
        if self.format_version != requested.format_version {
            return Err(err(
                "format_version",
                self.format_version.to_string(),
                requested.format_version.to_string(),
            ));
        }
        let same_model = match (
            &self.retrieval_fingerprint,
            &requested.retrieval_fingerprint,
        ) {
            // By content: a copy elsewhere is the same model, other weights under an old name
            // are not.
            (Some(stored), Some(asked)) => stored == asked,
            _ => self.retrieval_model == requested.retrieval_model,
        };
        if !same_model {
            let show = |i: &CollectionInfo| match &i.retrieval_fingerprint {
                Some(f) => format!("{} ({f})", i.retrieval_model),
                None => i.retrieval_model.clone(),
            };
            return Err(err("retrieval_model", show(self), show(requested)));
        }
        for (field, a, b) in [
            ("embedding_dim", self.embedding_dim, requested.embedding_dim),
            ("vit_tokens", self.vit_tokens, requested.vit_tokens),
            ("vit_hidden", self.vit_hidden, requested.vit_hidden),
        ] {
            if a != b {
                return Err(err(field, a.to_string(), b.to_string()));
            }
        }
        if requested.caption_model.is_some() && self.caption_model != requested.caption_model {
            tracing::warn!(
                stored = ?self.caption_model,
                requested = ?requested.caption_model,
                "caption model differs from the one the collection was built with; \
                 old and new captions will be mixed"
            );
        }
        Ok(())
    }
}

/// The last commit recorded in sled (see [`super::Store::commit`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitState {
    /// Sequence number of the last committed batch; derived indexes carry the same number when
    /// they are in step with sled. 0 before the first commit.
    pub generation: u64,
    /// Number of images at that commit.
    pub images: u64,
    /// When it was committed, seconds since the Unix epoch.
    pub committed_unix: i64,
}

/// Hex SHA-256 of a file's bytes: the [`ImageRecord::content_hash`] used for de-duplication.
pub fn content_hash(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Serde for `Vec<f32>` as base64 of little-endian bytes: 1368 characters for 256 dimensions
/// instead of about 2600 as a JSON array, and exact.
mod f32_base64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(v.len() * 4);
        for x in v {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        let bytes = STANDARD.decode(s.as_bytes()).map_err(D::Error::custom)?;
        if bytes.len() % 4 != 0 {
            return Err(D::Error::custom(format!(
                "f32 vector of {} bytes",
                bytes.len()
            )));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}
