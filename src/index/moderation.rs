//! What moderation stores: match lists ([`ListInfo`], [`ListEntry`]), the flags a match puts on
//! an image ([`Flag`]) and the reviewer's [`Decision`] on them, and the [`FlagFilter`] that
//! selects flagged images.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{IndexError, Result};
use super::pdq::{PdqHash, DEFAULT_PDQ_DISTANCE};
use super::vectors::check_vector;

/// Longest list name.
pub const MAX_LIST_NAME: usize = 64;

/// Most PDQ hashes of one entry: the plain hash and its seven other dihedral variants.
pub const MAX_ENTRY_HASHES: usize = 8;

/// Longest label or source of an entry, in bytes.
pub const MAX_ENTRY_TEXT: usize = 1024;

/// Which rule of a list entry matched an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchRule {
    /// The PDQ hashes are within the distance (one of the entry's dihedral variants).
    Pdq,
    /// The ITC cosine is at or above the threshold.
    Itc,
    /// Both.
    Both,
}

/// A reviewer's verdict on a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The image is what the entry stands for.
    Confirmed,
    /// A false match: the image is not flagged again for this entry.
    Cleared,
}

/// A decision on a flag: who, when, why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Confirmed or cleared.
    pub verdict: Verdict,
    /// The reviewer's note.
    #[serde(default)]
    pub note: String,
    /// Who decided: a key id, or `cli`.
    pub actor: String,
    /// When, seconds since the Unix epoch.
    pub unix: i64,
}

/// An image's match with one list entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flag {
    /// The list.
    pub list: String,
    /// The entry of the list ([`ListEntry::id`]).
    pub entry: u64,
    /// Which rule matched.
    pub rule: MatchRule,
    /// Hamming distance to the nearest of the entry's PDQ hashes, when both have one.
    #[serde(default)]
    pub pdq_distance: Option<u32>,
    /// ITC cosine with the entry, when the entry has a vector.
    #[serde(default)]
    pub cosine: Option<f32>,
    /// When the match was found, seconds since the Unix epoch.
    pub flagged_unix: i64,
    /// The review decision, once there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
}

impl Flag {
    /// Whether the flag counts: not cleared by a reviewer.
    pub fn active(&self) -> bool {
        !matches!(
            self.decision,
            Some(Decision {
                verdict: Verdict::Cleared,
                ..
            })
        )
    }

    /// Whether the flag waits for review.
    pub fn pending(&self) -> bool {
        self.decision.is_none()
    }
}

/// The ITC cosine at or above which an image matches a reference image by default: for BLIP
/// base, where near-copies (crops, re-encodes, overlays) sit above it and different photographs
/// of one kind of scene below. Other models place their vectors differently: set it per list.
pub const DEFAULT_MIN_COSINE: f32 = 0.92;

/// When an image matches an entry of a list: each list has its own, since a bank of shared
/// hashes and a list of reference photos for a given model want different cut-offs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MatchRules {
    /// Largest PDQ Hamming distance that matches (0 to 256).
    #[serde(default = "default_pdq_distance")]
    pub pdq_distance: u32,
    /// Smallest ITC cosine that matches (-1 to 2; above 1 turns the ITC rule off).
    #[serde(default = "default_min_cosine")]
    pub min_cosine: f32,
}

fn default_pdq_distance() -> u32 {
    DEFAULT_PDQ_DISTANCE
}

fn default_min_cosine() -> f32 {
    DEFAULT_MIN_COSINE
}

impl Default for MatchRules {
    fn default() -> Self {
        Self {
            pdq_distance: DEFAULT_PDQ_DISTANCE,
            min_cosine: DEFAULT_MIN_COSINE,
        }
    }
}

impl MatchRules {
    /// Refuses a distance over 256 bits, and a cosine that is not a number from -1 to 2.
    pub fn check(&self) -> Result<()> {
        if self.pdq_distance > 256 {
            return Err(IndexError::InvalidList(format!(
                "a PDQ distance is 0 to 256 bits, not {}",
                self.pdq_distance
            )));
        }
        if !(-1.0..=2.0).contains(&self.min_cosine) {
            return Err(IndexError::InvalidList(format!(
                "a minimum cosine is a number from -1 to 2 (above 1: the ITC rule is off), not {}",
                self.min_cosine
            )));
        }
        Ok(())
    }
}

/// A match list, its rules and its size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListInfo {
    /// The list's name ([`check_list_name`]).
    pub name: String,
    /// When its entries match an image.
    #[serde(flatten)]
    pub rules: MatchRules,
    /// Entries in it.
    pub entries: u64,
    /// When it was created, seconds since the Unix epoch.
    pub created_unix: i64,
}

/// One reference of a match list: the PDQ hashes and ITC vector of a reference image (the
/// image itself is not kept), or a PDQ hash alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListEntry {
    /// The list it belongs to.
    pub list: String,
    /// Its id within the list: [`entry_id`] of its plain hash (or vector), so that adding the
    /// same reference twice keeps one entry.
    pub id: u64,
    /// A label given with it (a CSV's label column, `--label`).
    #[serde(default)]
    pub label: Option<String>,
    /// Where it came from: the reference image's file name, or the hash file's.
    #[serde(default)]
    pub source: Option<String>,
    /// Its PDQ hashes: the plain hash first, then, for a reference image, the seven other
    /// dihedral variants (rotations by 90, 180, 270 degrees, and the four mirrors).
    #[serde(default)]
    pub pdq: Vec<PdqHash>,
    /// PDQ quality of the plain hash, when computed here (a hash file gives none).
    #[serde(default)]
    pub quality: Option<u8>,
    /// The reference image's normalised ITC vector (`None` for a hash-only entry).
    #[serde(default)]
    pub itc: Option<Vec<f32>>,
    /// When it was added, seconds since the Unix epoch.
    pub added_unix: i64,
}

/// Which flagged images a search or listing wants.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FlagFilter {
    /// Only flags of this list (any list when `None`).
    #[serde(default)]
    pub list: Option<String>,
    /// Only flags waiting for review (otherwise pending or confirmed: not cleared).
    #[serde(default)]
    pub pending_only: bool,
}

impl FlagFilter {
    /// Whether an image with `flags` passes.
    pub fn accepts(&self, flags: &[Flag]) -> bool {
        flags.iter().any(|f| {
            f.active()
                && (!self.pending_only || f.pending())
                && self.list.as_deref().is_none_or(|l| l == f.list)
        })
    }
}

/// Refuses a list name that is not 1 to 64 of `a-z 0-9 _ -`, starting with a letter or digit.
pub fn check_list_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_LIST_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(IndexError::InvalidList(format!(
            "list name {name:?}: use 1 to {MAX_LIST_NAME} of a-z, 0-9, _ and -, starting with a \
             letter or digit"
        )))
    }
}

/// Refuses an entry that a store cannot keep as it is: a bad list name
/// ([`IndexError::InvalidList`]), and as [`IndexError::InvalidParams`] an id past 53 bits, no
/// hash and no vector, more than [`MAX_ENTRY_HASHES`] hashes, an ITC vector that is not a
/// `dim`-dimensional finite non-zero vector, a label or source over [`MAX_ENTRY_TEXT`] bytes.
pub fn check_entry(entry: &ListEntry, dim: usize) -> Result<()> {
    check_list_name(&entry.list)?;
    let bad = |why: String| {
        Err(IndexError::InvalidParams(format!(
            "entry {} of list {:?}: {why}",
            entry.id, entry.list
        )))
    };
    if entry.id >= 1 << 53 {
        return bad("the id is over 53 bits".into());
    }
    if entry.pdq.is_empty() && entry.itc.is_none() {
        return bad("it has neither a PDQ hash nor an ITC vector".into());
    }
    if entry.pdq.len() > MAX_ENTRY_HASHES {
        return bad(format!(
            "{} PDQ hashes, at most {MAX_ENTRY_HASHES}",
            entry.pdq.len()
        ));
    }
    if let Some(v) = &entry.itc {
        if let Err(e) = check_vector(v, dim) {
            return bad(format!("its ITC vector: {e}"));
        }
    }
    for (what, text) in [("label", &entry.label), ("source", &entry.source)] {
        if text.as_ref().is_some_and(|t| t.len() > MAX_ENTRY_TEXT) {
            return bad(format!("its {what} is over {MAX_ENTRY_TEXT} bytes"));
        }
    }
    Ok(())
}

/// The id of an entry of `list` whose plain PDQ hash is `pdq` (or, without one, whose ITC vector
/// is `itc`): 53 bits of a SHA-256, so that it is exact in JSON numbers.
pub fn entry_id(list: &str, pdq: Option<&PdqHash>, itc: Option<&[f32]>) -> u64 {
    let mut h = Sha256::new();
    h.update(list.as_bytes());
    h.update([0u8]);
    if let Some(p) = pdq {
        h.update(p.0);
    } else if let Some(v) = itc {
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) >> 11
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_names() {
        for ok in ["csam-bank", "a", "x_1", "9lives"] {
            check_list_name(ok).unwrap();
        }
        for bad in ["", "-a", "A", "a b", "a/b", &"x".repeat(65)] {
            assert!(check_list_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flag_filter_counts_active_flags() {
        let flag = |list: &str, decision: Option<Verdict>| Flag {
            list: list.into(),
            entry: 1,
            rule: MatchRule::Pdq,
            pdq_distance: Some(3),
            cosine: None,
            flagged_unix: 0,
            decision: decision.map(|verdict| Decision {
                verdict,
                note: String::new(),
                actor: "cli".into(),
                unix: 0,
            }),
        };
        let any = FlagFilter::default();
        let pending = FlagFilter {
            list: None,
            pending_only: true,
        };
        let bank = FlagFilter {
            list: Some("bank".into()),
            pending_only: false,
        };
        assert!(!any.accepts(&[]));
        assert!(any.accepts(&[flag("bank", None)]));
        assert!(any.accepts(&[flag("bank", Some(Verdict::Confirmed))]));
        assert!(!any.accepts(&[flag("bank", Some(Verdict::Cleared))]));
        assert!(!pending.accepts(&[flag("bank", Some(Verdict::Confirmed))]));
        assert!(pending.accepts(&[flag("bank", None)]));
        assert!(!bank.accepts(&[flag("other", None)]));
        assert!(bank.accepts(&[flag("other", None), flag("bank", None)]));
    }

    #[test]
    fn entry_ids_fit_53_bits_and_depend_on_list_and_hash() {
        let h = PdqHash([7; 32]);
        let a = entry_id("a", Some(&h), None);
        assert!(a < 1 << 53);
        assert_eq!(a, entry_id("a", Some(&h), None));
        assert_ne!(a, entry_id("b", Some(&h), None));
        assert_ne!(a, entry_id("a", None, Some(&[1.0, 0.0])));
    }
}
