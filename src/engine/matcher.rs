//! The match lists as one structure an image is checked against ([`Matcher`]): every entry's PDQ
//! hashes in a multi-index ([`PdqIndex`]), every reference vector in one flat matrix, and the
//! rule that turns a distance and a cosine into a match ([`judge`]). The engine keeps one,
//! built from the store's entries, and drops it when a list changes ([`MatcherCache`]).
//!
//! PDQ hashes of quality below [`MIN_PDQ_QUALITY`] come from flat or featureless pictures and
//! sit close to many unrelated ones: such an image is not looked up by PDQ, and a reference
//! image's low-quality hashes are not indexed (the ITC rule still applies to both). Hashes from
//! a hash file carry no quality and are trusted as given.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::{EngineError, Result};
use crate::index::{
    dot, now_unix, AuditEvent, Flag, ImageId, ListEntry, ListInfo, MatchRule, MatchRules, Pdq,
    PdqHash, PdqIndex, Store, MIN_PDQ_QUALITY,
};

/// How long a shared store's matcher is trusted without reading the entries again when the
/// lists look the same (another process may have replaced an entry without changing a count).
const SHARED_MAX_AGE: Duration = Duration::from_secs(60);

/// Rules given for one pass over the collection (`blipsearch matches --pdq-distance ...`),
/// standing in for each list's own where set.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Overrides {
    /// Largest PDQ Hamming distance that matches, for every list.
    pub pdq_distance: Option<u32>,
    /// Smallest ITC cosine that matches, for every list.
    pub min_cosine: Option<f32>,
}

impl Overrides {
    /// `rules` with these overrides applied.
    pub fn apply(&self, rules: MatchRules) -> MatchRules {
        MatchRules {
            pdq_distance: self.pdq_distance.unwrap_or(rules.pdq_distance),
            min_cosine: self.min_cosine.unwrap_or(rules.min_cosine),
        }
    }
}

/// An image's match with one entry of a [`Matcher`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Hit {
    /// The entry, by its position in [`Matcher::entries`].
    pub entry: usize,
    /// Which rule fired.
    pub rule: MatchRule,
    /// Hamming distance to the nearest of the entry's hashes, when both have one.
    pub pdq_distance: Option<u32>,
    /// ITC cosine with the entry, when it has a vector.
    pub cosine: Option<f32>,
}

impl Hit {
    /// The flag this hit puts on an image, found now.
    pub fn flag(&self, entry: &ListEntry) -> Flag {
        Flag {
            list: entry.list.clone(),
            entry: entry.id,
            rule: self.rule,
            pdq_distance: self.pdq_distance,
            cosine: self.cosine,
            flagged_unix: now_unix(),
            decision: None,
        }
    }
}

/// Whether an image's PDQ hash is good enough to look up.
pub(crate) fn usable(pdq: Option<&Pdq>) -> Option<&PdqHash> {
    pdq.filter(|p| p.quality >= MIN_PDQ_QUALITY)
        .map(|p| &p.hash)
}

/// The hashes of `entry` the PDQ rule uses: none when it was computed here with too low a
/// quality.
pub(crate) fn entry_hashes(entry: &ListEntry) -> &[PdqHash] {
    match entry.quality {
        Some(q) if q < MIN_PDQ_QUALITY => &[],
        _ => &entry.pdq,
    }
}

/// Whether an image with `pdq` and ITC vector `itc` matches `entry` under `t`, and by which
/// rule: PDQ when the nearest of the entry's hashes is within the distance (both hashes good
/// enough), ITC when the cosine reaches the threshold, `Both` when both do. The distance and
/// cosine are given whenever they can be computed, whichever rule fired.
pub(crate) fn judge(
    entry: &ListEntry,
    pdq: Option<&Pdq>,
    itc: &[f32],
    t: &MatchRules,
) -> Option<Hit> {
    let pdq_distance = pdq.and_then(|p| entry.pdq.iter().map(|h| h.distance(&p.hash)).min());
    let pdq_fires = usable(pdq).is_some_and(|h| {
        entry_hashes(entry)
            .iter()
            .any(|e| e.distance(h) <= t.pdq_distance)
    });
    let cosine = entry
        .itc
        .as_deref()
        .filter(|v| v.len() == itc.len() && !v.is_empty())
        .map(|v| dot(v, itc));
    let itc_fires = cosine.is_some_and(|c| c >= t.min_cosine);
    let rule = match (pdq_fires, itc_fires) {
        (true, true) => MatchRule::Both,
        (true, false) => MatchRule::Pdq,
        (false, true) => MatchRule::Itc,
        (false, false) => return None,
    };
    Some(Hit {
        entry: usize::MAX,
        rule,
        pdq_distance,
        cosine,
    })
}

/// A set of list entries, indexed for checking images against them.
pub(crate) struct Matcher {
    entries: Vec<ListEntry>,
    by_key: HashMap<(String, u64), usize>,
    /// Every usable hash of every entry, and the entry each belongs to.
    pdq: Option<PdqIndex>,
    pdq_owner: Vec<usize>,
    /// Reference vectors, one row each, and the entry each belongs to.
    vectors: Vec<f32>,
    vector_owner: Vec<usize>,
    dim: usize,
    /// The rules of each entry's list.
    rules: Vec<MatchRules>,
    /// The widest PDQ distance of any list.
    widest: u32,
    /// The lists as they were when it was built.
    lists: Vec<ListInfo>,
    built: Instant,
}

impl Matcher {
    /// Indexes `entries`; `lists` is what the store said the lists were (their rules apply to
    /// their entries; an entry of a list not among them gets the default rules).
    pub fn new(entries: Vec<ListEntry>, lists: Vec<ListInfo>) -> Self {
        let by_name: HashMap<&str, MatchRules> =
            lists.iter().map(|l| (l.name.as_str(), l.rules)).collect();
        let rules: Vec<MatchRules> = entries
            .iter()
            .map(|e| by_name.get(e.list.as_str()).copied().unwrap_or_default())
            .collect();
        let widest = rules.iter().map(|r| r.pdq_distance).max().unwrap_or(0);
        let mut hashes = Vec::new();
        let mut pdq_owner = Vec::new();
        let mut vectors = Vec::new();
        let mut vector_owner = Vec::new();
        let mut by_key = HashMap::with_capacity(entries.len());
        let dim = entries
            .iter()
            .find_map(|e| e.itc.as_ref().map(Vec::len))
            .unwrap_or(0);
        for (i, e) in entries.iter().enumerate() {
            by_key.insert((e.list.clone(), e.id), i);
            for h in entry_hashes(e) {
                hashes.push(*h);
                pdq_owner.push(i);
            }
            if let Some(v) = e.itc.as_ref().filter(|v| v.len() == dim && dim > 0) {
                vectors.extend_from_slice(v);
                vector_owner.push(i);
            }
        }
        Self {
            entries,
            by_key,
            pdq: (!hashes.is_empty()).then(|| PdqIndex::new(hashes)),
            pdq_owner,
            vectors,
            vector_owner,
            dim,
            rules,
            widest,
            lists,
            built: Instant::now(),
        }
    }

    /// The entries, in the order hits name them.
    pub fn entries(&self) -> &[ListEntry] {
        &self.entries
    }

    /// The entries it was built from.
    pub fn into_entries(self) -> Vec<ListEntry> {
        self.entries
    }

    /// Whether there is nothing to match.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry `id` of `list`.
    pub fn entry(&self, list: &str, id: u64) -> Option<&ListEntry> {
        self.by_key
            .get(&(list.to_string(), id))
            .map(|&i| &self.entries[i])
    }

    /// The rules of entry `e` (by position), with `over` applied.
    pub fn rules(&self, e: usize, over: &Overrides) -> MatchRules {
        over.apply(self.rules[e])
    }

    /// The widest PDQ distance any entry matches at, with `over` applied.
    pub fn widest(&self, over: &Overrides) -> u32 {
        over.pdq_distance.unwrap_or(self.widest)
    }

    /// The entries (positions) with a hash within `max_distance` of `hash`, each once.
    pub fn pdq_candidates(&self, hash: &PdqHash, max_distance: u32) -> Vec<usize> {
        let Some(index) = &self.pdq else {
            return Vec::new();
        };
        let mut out: Vec<usize> = index
            .within(hash, max_distance)
            .into_iter()
            .map(|(pos, _)| self.pdq_owner[pos])
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// For each of `hashes`, the entries (positions) with a hash within `max_distance` of it:
    /// every pair at once, as a join over the multi-index ([`PdqIndex::pairs_within`]), which
    /// is what a pass over a whole collection needs.
    pub fn pdq_pairs(&self, hashes: &[PdqHash], max_distance: u32) -> Vec<(usize, usize)> {
        let Some(index) = &self.pdq else {
            return Vec::new();
        };
        let mut out: Vec<(usize, usize)> = index
            .pairs_within(hashes, max_distance)
            .into_iter()
            .map(|(q, pos, _)| (q, self.pdq_owner[pos]))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The entries (positions) that have a reference vector.
    pub fn with_vectors(&self) -> impl Iterator<Item = usize> + '_ {
        self.vector_owner.iter().copied()
    }

    /// Every entry an image with `pdq` and ITC vector `itc` matches under the rules of the
    /// entry's list, by position: a lookup of its PDQ hash in the multi-index and a dot product
    /// with every reference vector.
    pub fn check(&self, pdq: Option<&Pdq>, itc: &[f32]) -> Vec<Hit> {
        if self.is_empty() {
            return Vec::new();
        }
        let none = Overrides::default();
        let mut candidates = match usable(pdq) {
            Some(h) => self.pdq_candidates(h, self.widest),
            None => Vec::new(),
        };
        if itc.len() == self.dim && self.dim > 0 {
            for (row, &owner) in self.vectors.chunks_exact(self.dim).zip(&self.vector_owner) {
                if dot(row, itc) >= self.rules[owner].min_cosine {
                    candidates.push(owner);
                }
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        candidates
            .into_iter()
            .filter_map(|i| {
                judge(&self.entries[i], pdq, itc, &self.rules(i, &none))
                    .map(|h| Hit { entry: i, ..h })
            })
            .collect()
    }
}

/// Whether `flags` has one of `list`'s entry `entry`, in any state.
pub(crate) fn has_flag(flags: &[Flag], list: &str, entry: u64) -> bool {
    flags.iter().any(|f| f.list == list && f.entry == entry)
}

/// The flags an image with `pdq` and ITC vector `itc` gets from `matcher` under each list's
/// thresholds, leaving out the entries `existing` already names (a cleared flag is never
/// raised again for the same entry).
pub(crate) fn new_flags(
    matcher: &Matcher,
    existing: &[Flag],
    pdq: Option<&Pdq>,
    itc: &[f32],
) -> Vec<Flag> {
    matcher
        .check(pdq, itc)
        .into_iter()
        .map(|h| h.flag(&matcher.entries()[h.entry]))
        .filter(|f| !has_flag(existing, &f.list, f.entry))
        .collect()
}

/// The audit event of a new flag on image `id` at `path` (`entry`: the entry it names, for
/// its label and source).
pub(crate) fn match_event(
    id: ImageId,
    path: &str,
    flag: &Flag,
    entry: Option<&ListEntry>,
) -> AuditEvent {
    let mut d = serde_json::Map::new();
    d.insert("id".into(), id.0.into());
    d.insert("path".into(), path.into());
    d.insert("list".into(), flag.list.clone().into());
    d.insert("entry".into(), flag.entry.into());
    if let Some(label) = entry.and_then(|e| e.label.clone()) {
        d.insert("label".into(), label.into());
    }
    d.insert(
        "rule".into(),
        serde_json::to_value(flag.rule).unwrap_or_default(),
    );
    d.insert("pdq_distance".into(), flag.pdq_distance.into());
    d.insert("cosine".into(), flag.cosine.into());
    AuditEvent::new("match", d)
}

/// The engine's matcher over every list, built when first needed and dropped when a list
/// changes.
#[derive(Default)]
pub(crate) struct MatcherCache {
    slot: Mutex<Option<Arc<Matcher>>>,
}

impl MatcherCache {
    fn slot(&self) -> Result<std::sync::MutexGuard<'_, Option<Arc<Matcher>>>> {
        self.slot
            .lock()
            .map_err(|_| EngineError::Internal("the matcher's lock is poisoned".into()))
    }

    /// The matcher, built from `store` when there is none.
    pub fn get(&self, store: &dyn Store) -> Result<Arc<Matcher>> {
        let mut slot = self.slot()?;
        if let Some(m) = &*slot {
            return Ok(m.clone());
        }
        let lists = store.lists()?;
        let entries = if lists.iter().any(|l| l.entries > 0) {
            store.entries(None)?
        } else {
            Vec::new()
        };
        let m = Arc::new(Matcher::new(entries, lists));
        *slot = Some(m.clone());
        Ok(m)
    }

    /// Forgets the matcher (a list changed).
    pub fn invalidate(&self) -> Result<()> {
        *self.slot()? = None;
        Ok(())
    }

    /// For a store other processes write: forgets the matcher when the lists changed since it
    /// was built, or when it is older than a minute.
    pub fn refresh(&self, store: &dyn Store) -> Result<()> {
        if !store.shared() {
            return Ok(());
        }
        let current = self.slot()?.clone();
        if let Some(m) = current {
            if m.built.elapsed() < SHARED_MAX_AGE && m.lists == store.lists()? {
                return Ok(());
            }
            self.invalidate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    fn entry(
        list: &str,
        id: u64,
        pdq: Vec<PdqHash>,
        quality: Option<u8>,
        itc: Option<Vec<f32>>,
    ) -> ListEntry {
        ListEntry {
            list: list.into(),
            id,
            label: None,
            source: None,
            pdq,
            quality,
            itc,
            added_unix: 0,
        }
    }

    /// A hash with the first `bits` bits of `base` flipped.
    fn flipped(base: &PdqHash, bits: usize) -> PdqHash {
        let mut h = *base;
        for b in 0..bits {
            h.0[b / 8] ^= 1 << (b % 8);
        }
        h
    }

    fn pdq(hash: PdqHash, quality: u8) -> Pdq {
        Pdq { hash, quality }
    }

    #[test]
    fn judge_names_the_rule_and_reports_both_measures() {
        let base = PdqHash([0x5a; 32]);
        let t = MatchRules::default();
        let e = entry(
            "bank",
            1,
            vec![flipped(&base, 40), base],
            Some(90),
            Some(unit(&[1.0, 0.0])),
        );
        let near = unit(&[1.0, 0.1]);
        let far = unit(&[0.0, 1.0]);

        let h = judge(&e, Some(&pdq(flipped(&base, 3), 80)), &far, &t).unwrap();
        assert_eq!(
            (h.rule, h.pdq_distance),
            (MatchRule::Pdq, Some(3)),
            "nearest variant"
        );
        assert!(h.cosine.unwrap().abs() < 1e-6);

        let h = judge(&e, Some(&pdq(flipped(&base, 3), 80)), &near, &t).unwrap();
        assert_eq!(h.rule, MatchRule::Both);

        let h = judge(&e, Some(&pdq(flipped(&base, 100), 80)), &near, &t).unwrap();
        assert_eq!((h.rule, h.pdq_distance), (MatchRule::Itc, Some(60)));

        let h = judge(&e, None, &near, &t).unwrap();
        assert_eq!((h.rule, h.pdq_distance), (MatchRule::Itc, None));

        let single = entry("bank", 4, vec![base], Some(90), None);
        assert!(
            judge(&single, Some(&pdq(flipped(&base, 32), 80)), &far, &t).is_none(),
            "32 > 31"
        );
        assert!(
            judge(&single, Some(&pdq(flipped(&base, 31), 80)), &far, &t).is_some(),
            "31 <= 31"
        );

        // Low quality on either side turns the PDQ rule off; the distance is still told.
        let h = judge(&e, Some(&pdq(base, 49)), &far, &t);
        assert!(h.is_none());
        let weak = entry("bank", 2, vec![base], Some(10), None);
        assert!(judge(&weak, Some(&pdq(base, 99)), &far, &t).is_none());
        // A hash from a hash file has no quality and is trusted.
        let listed = entry("bank", 3, vec![base], None, None);
        let h = judge(&listed, Some(&pdq(base, 99)), &far, &t).unwrap();
        assert_eq!(
            (h.rule, h.pdq_distance, h.cosine),
            (MatchRule::Pdq, Some(0), None)
        );
    }

    #[test]
    fn vectors_of_another_size_never_match() {
        let e = entry("bank", 1, Vec::new(), None, Some(vec![1.0, 0.0, 0.0]));
        assert!(judge(&e, None, &[1.0, 0.0], &MatchRules::default()).is_none());
    }

    #[test]
    fn each_list_matches_by_its_own_rules() {
        let base = PdqHash([0x5a; 32]);
        let v = unit(&[1.0, 0.0]);
        let near = unit(&[1.0, 0.3]); // cosine about 0.958
        let list = |name: &str, pdq_distance, min_cosine| ListInfo {
            name: name.into(),
            rules: MatchRules {
                pdq_distance,
                min_cosine,
            },
            entries: 1,
            created_unix: 0,
        };
        let m = Matcher::new(
            vec![
                entry("loose", 1, vec![base], Some(90), Some(v.clone())),
                entry("strict", 2, vec![base], Some(90), Some(v.clone())),
                entry("hashes", 3, vec![base], None, None),
            ],
            vec![
                list("loose", 31, 0.9),
                list("strict", 4, 0.99),
                list("hashes", 31, 2.0),
            ],
        );
        let lists = |hits: Vec<Hit>| -> Vec<(u64, MatchRule)> {
            hits.iter()
                .map(|h| (m.entries()[h.entry].id, h.rule))
                .collect()
        };
        // 10 bits off and a cosine of 0.958: the strict list wants both closer.
        let hits = m.check(Some(&pdq(flipped(&base, 10), 90)), &near);
        assert_eq!(lists(hits), [(1, MatchRule::Both), (3, MatchRule::Pdq)]);
        // 3 bits off: within every list's distance; only the loose list's cosine is reached.
        let hits = m.check(Some(&pdq(flipped(&base, 3), 90)), &near);
        assert_eq!(
            lists(hits),
            [
                (1, MatchRule::Both),
                (2, MatchRule::Pdq),
                (3, MatchRule::Pdq)
            ]
        );
        // No hash: only the ITC rule, and the hash-only list has none.
        assert_eq!(
            lists(m.check(None, &v)),
            [(1, MatchRule::Itc), (2, MatchRule::Itc)]
        );
        // A pass with overrides applies them to every list.
        let over = Overrides {
            pdq_distance: Some(0),
            min_cosine: None,
        };
        assert_eq!(m.rules(1, &over).pdq_distance, 0);
        assert_eq!(m.rules(1, &over).min_cosine, 0.99);
        assert_eq!(m.widest(&Overrides::default()), 31);
        let pairs = m.pdq_pairs(&[flipped(&base, 10), PdqHash([0xa5; 32])], 31);
        assert_eq!(pairs, [(0, 0), (0, 1), (0, 2)]);
    }

    #[test]
    fn an_empty_matcher_matches_nothing_and_builds_no_index() {
        let m = Matcher::new(Vec::new(), Vec::new());
        assert!(m.is_empty());
        assert!(m.check(Some(&pdq(PdqHash([1; 32]), 90)), &[1.0]).is_empty());
        // Entries without usable hashes need no PDQ index either.
        let m = Matcher::new(
            vec![entry(
                "a",
                1,
                vec![PdqHash([1; 32])],
                Some(3),
                Some(unit(&[1.0, 1.0])),
            )],
            Vec::new(),
        );
        let hits = m.check(Some(&pdq(PdqHash([1; 32]), 90)), &unit(&[1.0, 1.0]));
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].rule, MatchRule::Itc);
        assert_eq!(m.entry("a", 1).map(|e| e.id), Some(1));
        assert!(m.entry("b", 1).is_none());
    }
}
