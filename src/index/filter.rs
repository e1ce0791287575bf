//! Filters as values: which images a search may return, said once and translated by each store.
//! The embedded store evaluates a [`Filter`] on its in-memory [`Columns`] into a bit set over ids
//! before a search starts, so a filtered search touches no record on disk; a remote store turns
//! the same value into its own query language.
//!
//! [`Filter::accepts`] is the reference meaning on a whole record: every store must agree with it
//! (the store test suite checks that).

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::attr_columns::AttrColumns;
use super::attributes::{AttrFilter, Product};
use super::error::{IndexError, Result};
use super::id::ImageId;
use super::moderation::{check_list_name, Flag, FlagFilter};
use super::pdq::Pdq;
use super::record::ImageRecord;

/// Restrictions on which images a search may return; every set field must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    /// Only images whose path starts with this (a string prefix: `/photos/a` also matches
    /// `/photos/ab/x.jpg`; end it with `/` for one folder).
    pub path_prefix: Option<String>,
    /// Only images taken (EXIF date) on or after this day, `YYYY-MM-DD`.
    pub date_from: Option<String>,
    /// Only images taken (EXIF date) on or before this day, `YYYY-MM-DD`.
    pub date_to: Option<String>,
    /// Minimum width in pixels.
    pub min_width: Option<u32>,
    /// Minimum height in pixels.
    pub min_height: Option<u32>,
    /// Product attribute filters, all of which must hold (an image without a product fails
    /// any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<AttrFilter>,
    /// Only flagged images (see [`FlagFilter`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flagged: Option<FlagFilter>,
}

impl Filter {
    /// Whether nothing is filtered.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Refuses a filter that cannot mean anything: dates that are not calendar days, attribute
    /// filters that [`AttrFilter::check`] refuses, a flag filter naming a list by a name no list
    /// can have ([`check_list_name`]).
    pub fn check(&self) -> Result<()> {
        for a in &self.attributes {
            a.check()?;
        }
        if let Some(list) = self.flagged.as_ref().and_then(|f| f.list.as_deref()) {
            check_list_name(list).map_err(|e| match e {
                IndexError::InvalidName(m) => IndexError::InvalidFilter(m),
                e => e,
            })?;
        }
        for d in [&self.date_from, &self.date_to].into_iter().flatten() {
            if day_number(d).is_none() {
                return Err(IndexError::InvalidFilter(format!(
                    "date {d:?} is not a calendar date YYYY-MM-DD"
                )));
            }
        }
        Ok(())
    }

    /// Whether `r` passes: the meaning every store implements. An image without an EXIF date
    /// fails any date filter.
    pub fn accepts(&self, r: &ImageRecord) -> bool {
        let row = Row::of(r);
        self.path_prefix
            .as_deref()
            .is_none_or(|p| r.path.starts_with(p))
            && self.accepts_row(&row, self.day_range())
            && self.accepts_product(r.product.as_ref())
            && self.flagged.as_ref().is_none_or(|f| f.accepts(&r.flags))
    }

    /// Whether an image of `product` (or of none) passes the attribute filters.
    pub fn accepts_product(&self, product: Option<&Product>) -> bool {
        self.attributes.iter().all(|a| a.accepts(product))
    }

    /// `(from, to)` as day numbers (`YYYYMMDD`); an unset end is open.
    fn day_range(&self) -> (u32, u32) {
        let from = self.date_from.as_deref().and_then(day_number).unwrap_or(0);
        let to = self
            .date_to
            .as_deref()
            .and_then(day_number)
            .unwrap_or(u32::MAX);
        (from, to)
    }

    fn accepts_row(&self, row: &Row, (from, to): (u32, u32)) -> bool {
        if self.min_width.is_some_and(|w| row.width < w)
            || self.min_height.is_some_and(|h| row.height < h)
        {
            return false;
        }
        if self.date_from.is_some() || self.date_to.is_some() {
            return row.day.is_some_and(|d| (from..=to).contains(&d));
        }
        true
    }
}

/// `YYYY-MM-DD` as the number `YYYYMMDD` when it names a day that exists (no 2023-02-29).
pub fn day_number(d: &str) -> Option<u32> {
    let b = d.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| {
        b[r.clone()]
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| d[r].parse::<u32>().ok())
            .flatten()
    };
    let (y, m, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        _ => return None,
    };
    (1..=days)
        .contains(&day)
        .then_some(y * 10_000 + m * 100 + day)
}

/// The day of an EXIF date (`YYYY:MM:DD HH:MM:SS`) as `YYYYMMDD`; `None` when it does not parse.
pub(crate) fn exif_day(exif: &str) -> Option<u32> {
    let head = exif.get(..10)?;
    day_number(&head.replace(':', "-"))
}

/// The filterable fields of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Row {
    width: u32,
    height: u32,
    day: Option<u32>,
}

impl Row {
    fn of(r: &ImageRecord) -> Self {
        Self {
            width: r.width,
            height: r.height,
            day: r.exif_date.as_deref().and_then(exif_day),
        }
    }
}

/// The filterable fields of every image, in memory, column by column: what the embedded store
/// evaluates a [`Filter`] on. Paths are also kept sorted, so a path prefix is a range, not a scan.
/// Product attributes have a column each (`attr_columns.rs`), so an attribute filter reads
/// no product. The flags of the images that have one that counts are kept by id (few images are
/// flagged: a flag filter visits only them), and the PDQ hash of every image in a column.
#[derive(Debug, Default)]
pub struct Columns {
    ids: Vec<u64>,
    rows: Vec<Row>,
    row_paths: Vec<Arc<str>>,
    /// The product of each row, if any; images of one product share it while they agree.
    row_products: Vec<Option<Arc<Product>>>,
    /// The product attributes of each row, column by column.
    attrs: AttrColumns,
    /// The rows of each product's images.
    products: HashMap<Arc<str>, Vec<u64>>,
    /// Row of each id.
    slot: HashMap<u64, usize>,
    /// Row of each path, in path order.
    paths: BTreeMap<Arc<str>, usize>,
    /// The PDQ hash of each row, if any.
    row_pdq: Vec<Option<Pdq>>,
    /// The flags of each image with an active one ([`Flag::active`]), by id.
    flags: HashMap<u64, Box<[Flag]>>,
}

impl Columns {
    /// Adds or replaces the fields of `r`.
    pub fn upsert(&mut self, r: &ImageRecord) {
        self.remove(r.id);
        let path: Arc<str> = Arc::from(r.path.as_str());
        let row = self.ids.len();
        self.slot.insert(r.id.0, row);
        self.ids.push(r.id.0);
        self.rows.push(Row::of(r));
        self.row_paths.push(path.clone());
        self.paths.insert(path, row);
        self.attrs.push(r.product.as_ref());
        let product = r.product.as_ref().map(|p| self.shared_product(p));
        if let Some(p) = &product {
            self.products
                .entry(Arc::from(p.id.as_str()))
                .or_default()
                .push(r.id.0);
        }
        self.row_products.push(product);
        self.row_pdq.push(r.pdq);
        if r.flags.iter().any(Flag::active) {
            self.flags
                .insert(r.id.0, r.flags.clone().into_boxed_slice());
        }
    }

    /// `p`, sharing the copy another image of the product holds when it is the same.
    fn shared_product(&self, p: &Product) -> Arc<Product> {
        let held = self
            .products
            .get(p.id.as_str())
            .and_then(|ids| ids.first())
            .and_then(|id| self.slot.get(id))
            .and_then(|&row| self.row_products[row].as_ref());
        match held {
            Some(held) if **held == *p => held.clone(),
            _ => Arc::new(p.clone()),
        }
    }

    /// Drops the fields of `id`; returns whether it was there.
    pub fn remove(&mut self, id: ImageId) -> bool {
        let Some(i) = self.slot.remove(&id.0) else {
            return false;
        };
        self.ids.swap_remove(i);
        self.rows.swap_remove(i);
        self.attrs.swap_remove(i);
        self.row_pdq.swap_remove(i);
        self.flags.remove(&id.0);
        let path = self.row_paths.swap_remove(i);
        if self.paths.get(&path) == Some(&i) {
            self.paths.remove(&path);
        }
        if let Some(p) = self.row_products.swap_remove(i) {
            if let Some(ids) = self.products.get_mut(p.id.as_str()) {
                ids.retain(|x| *x != id.0);
                if ids.is_empty() {
                    self.products.remove(p.id.as_str());
                }
            }
        }
        // The last row moved into `i`.
        if let Some(&moved) = self.ids.get(i) {
            self.slot.insert(moved, i);
            if let Some(row) = self.paths.get_mut(&self.row_paths[i]) {
                *row = i;
            }
        }
        true
    }

    /// Whether `id` has fields here.
    pub fn contains(&self, id: ImageId) -> bool {
        self.slot.contains_key(&id.0)
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The ids and paths of images whose path starts with `prefix`, in path order.
    pub fn under(&self, prefix: &str) -> Vec<(ImageId, String)> {
        self.prefixed(prefix)
            .map(|(p, &row)| (ImageId(self.ids[row]), p.to_string()))
            .collect()
    }

    /// The paths starting with `prefix`, as one range of the sorted map: from `prefix` to the
    /// first string past every extension of it, so that no key is read but the bounds.
    fn prefixed<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a Arc<str>, &'a usize)> {
        let end = prefix_end(prefix);
        let upper = match &end {
            Some(e) => Bound::Excluded(e.as_str()),
            None => Bound::Unbounded,
        };
        self.paths.range::<str, _>((Bound::Included(prefix), upper))
    }

    /// The product of `id`, if it has one.
    pub fn product(&self, id: ImageId) -> Option<&Arc<Product>> {
        self.slot
            .get(&id.0)
            .and_then(|&row| self.row_products[row].as_ref())
    }

    /// The ids of the images of each product (every product when `products` is `None`), in id
    /// order; a product without images is left out.
    pub fn product_images(&self, products: Option<&[String]>) -> BTreeMap<String, Vec<ImageId>> {
        let of = |ids: &Vec<u64>| {
            let mut v: Vec<ImageId> = ids.iter().map(|&i| ImageId(i)).collect();
            v.sort_unstable();
            v
        };
        match products {
            Some(names) => names
                .iter()
                .filter_map(|n| {
                    self.products
                        .get(n.as_str())
                        .map(|ids| (n.clone(), of(ids)))
                })
                .collect(),
            None => self
                .products
                .iter()
                .map(|(n, ids)| (n.to_string(), of(ids)))
                .collect(),
        }
    }

    /// Every id, in id order.
    pub fn ids(&self) -> Vec<ImageId> {
        let mut ids: Vec<ImageId> = self.ids.iter().map(|&i| ImageId(i)).collect();
        ids.sort_unstable();
        ids
    }

    /// The PDQ hash of every image that has one, in id order.
    pub fn pdq_hashes(&self) -> Vec<(ImageId, Pdq)> {
        let mut out: Vec<(ImageId, Pdq)> = self
            .ids
            .iter()
            .zip(&self.row_pdq)
            .filter_map(|(&id, p)| p.map(|p| (ImageId(id), p)))
            .collect();
        out.sort_unstable_by_key(|(id, _)| *id);
        out
    }

    /// The ids passing `filter`, as a bit set.
    pub fn select(&self, filter: &Filter) -> IdSet {
        let range = filter.day_range();
        let Some(attrs) = self.attrs.compile(&filter.attributes) else {
            // An attribute no image has: nothing passes.
            return IdSet::default();
        };
        let row_tests = filter.min_width.is_some()
            || filter.min_height.is_some()
            || filter.date_from.is_some()
            || filter.date_to.is_some();
        let passes = |row: usize| {
            (!row_tests || filter.accepts_row(&self.rows[row], range))
                && attrs.iter().all(|a| a.accepts(row))
        };
        let ids: Vec<u64> = match (&filter.flagged, filter.path_prefix.as_deref()) {
            // Only flagged images can pass: visit them alone.
            (Some(flagged), prefix) => self
                .flags
                .iter()
                .filter(|(_, flags)| flagged.accepts(flags))
                .filter_map(|(id, _)| self.slot.get(id).copied())
                .filter(|&row| prefix.is_none_or(|p| self.row_paths[row].starts_with(p)))
                .filter(|&row| passes(row))
                .map(|row| self.ids[row])
                .collect(),
            (None, Some(prefix)) => self
                .prefixed(prefix)
                .filter(|(_, &row)| passes(row))
                .map(|(_, &row)| self.ids[row])
                .collect(),
            (None, None) => (0..self.ids.len())
                .filter(|&row| passes(row))
                .map(|row| self.ids[row])
                .collect(),
        };
        IdSet::from_ids(&ids)
    }
}

/// The least string greater than every string that starts with `prefix` (strings order by code
/// point): `prefix` with its last character that has a successor replaced by it and the rest cut;
/// `None` when there is none (every character is `char::MAX`, or `prefix` is empty).
pub(crate) fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// A set of ids as bits over `[base, base + 64 * words)`: the answer to a filter, tested once
/// per point a search visits.
#[derive(Debug, Clone, Default)]
pub struct IdSet {
    base: u64,
    bits: Vec<u64>,
    len: usize,
}

impl IdSet {
    fn from_ids(ids: &[u64]) -> Self {
        let (Some(&min), Some(&max)) = (ids.iter().min(), ids.iter().max()) else {
            return Self::default();
        };
        let base = min & !63;
        let mut bits = vec![0u64; ((max - base) / 64 + 1) as usize];
        for &id in ids {
            let off = id - base;
            bits[(off / 64) as usize] |= 1 << (off % 64);
        }
        Self {
            base,
            bits,
            len: ids.len(),
        }
    }

    /// Whether `id` is in the set.
    #[inline]
    pub fn contains(&self, id: u64) -> bool {
        let Some(off) = id.checked_sub(self.base) else {
            return false;
        };
        self.bits
            .get((off / 64) as usize)
            .is_some_and(|w| w & (1 << (off % 64)) != 0)
    }

    /// The ids in the set, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(move |(w, &word)| {
            let base = self.base + 64 * w as u64;
            let mut word = word;
            std::iter::from_fn(move || {
                (word != 0).then(|| {
                    let bit = word.trailing_zeros();
                    word &= word - 1;
                    base + u64::from(bit)
                })
            })
        })
    }

    /// Number of ids in the set.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::attributes::{AttrTest, AttrValue};
    use proptest::prelude::*;

    fn record(id: u64, path: &str, w: u32, h: u32, exif: Option<&str>) -> ImageRecord {
        ImageRecord {
            id: ImageId(id),
            path: path.into(),
            content_hash: String::new(),
            size_bytes: 0,
            width: w,
            height: h,
            mtime_unix: 0,
            exif_date: exif.map(str::to_string),
            itc: vec![],
            captions: vec![],
            given_texts: vec![],
            added_unix: 0,
            product: None,
            pdq: None,
            flags: Vec::new(),
        }
    }

    #[test]
    fn a_flag_filter_names_a_list_by_a_possible_name() {
        let f = |list: Option<&str>| Filter {
            flagged: Some(FlagFilter {
                list: list.map(str::to_string),
                pending_only: false,
            }),
            ..Default::default()
        };
        f(None).check().unwrap();
        f(Some("bank-2")).check().unwrap();
        for bad in ["", "Bank", "a\" or id > 0 or \"", &"x".repeat(65)] {
            assert!(
                matches!(f(Some(bad)).check(), Err(IndexError::InvalidFilter(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn dates_must_exist_and_are_read_from_exif() {
        let f = Filter {
            date_from: Some("2020-01-01".into()),
            date_to: Some("2020-12-31".into()),
            ..Default::default()
        };
        f.check().unwrap();
        let mut r = record(1, "/p/a.jpg", 10, 10, Some("2020:06:01 10:00:00"));
        assert!(f.accepts(&r));
        r.exif_date = Some("2021:01:01 00:00:00".into());
        assert!(!f.accepts(&r));
        r.exif_date = None;
        assert!(!f.accepts(&r));
        for bad in [
            "June",
            "2024-02-30",
            "2023-02-29",
            "2024-04-31",
            "2024-13-01",
            "2024-00-10",
            "2024-1-01",
            "２０２４-01-01",
        ] {
            let f = Filter {
                date_from: Some(bad.into()),
                ..Default::default()
            };
            assert!(
                matches!(f.check(), Err(IndexError::InvalidFilter(_))),
                "{bad}"
            );
        }
        for good in ["2024-02-29", "2000-02-29", "2023-12-31", "0001-01-01"] {
            let f = Filter {
                date_to: Some(good.into()),
                ..Default::default()
            };
            f.check().unwrap();
        }
    }

    #[test]
    fn prefix_end_bounds_exactly_the_extensions() {
        assert_eq!(prefix_end("/a/").as_deref(), Some("/a0"));
        assert_eq!(prefix_end("ab").as_deref(), Some("ac"));
        assert_eq!(prefix_end("\u{d7ff}").as_deref(), Some("\u{e000}"));
        assert_eq!(prefix_end("a\u{10ffff}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{10ffff}"), None);
        assert_eq!(prefix_end(""), None);
        let end = prefix_end("/photos/é").unwrap();
        for inside in ["/photos/é", "/photos/éz", "/photos/é\u{10ffff}x"] {
            assert!(inside < end.as_str(), "{inside}");
        }
        assert!("/photos/ê" >= end.as_str());
    }

    const FOLDERS: [&str; 4] = ["/a/", "/a/b/", "/ab/", "/c/"];

    const ATTRS: [&str; 4] = ["brand", "price", "in_stock", "released"];

    /// Values of every type under every name, as a collection could hold them (a schema keeps
    /// one type per name; the columns must not rely on it).
    fn attr_value() -> impl Strategy<Value = AttrValue> {
        prop_oneof![
            prop_oneof![
                Just("acme"),
                Just("acme/x"),
                Just("zeta"),
                Just(""),
                Just("2024-03-01"),
                Just("2024-02-30"),
                Just("2025-01-01"),
            ]
            .prop_map(|s| AttrValue::Text(s.to_string())),
            prop_oneof![Just(0.0), Just(-0.0), Just(10.0), Just(59.9), Just(80.0)]
                .prop_map(AttrValue::Number),
            any::<bool>().prop_map(AttrValue::Bool),
        ]
    }

    fn product() -> impl Strategy<Value = Option<Product>> {
        proptest::option::of((
            0u8..4,
            proptest::collection::btree_map(
                (0usize..ATTRS.len()).prop_map(|i| ATTRS[i].to_string()),
                attr_value(),
                0..4,
            ),
        ))
        .prop_map(|p| {
            p.map(|(n, attributes)| Product {
                id: format!("P{n}"),
                attributes,
                ..Product::default()
            })
        })
    }

    const LISTS: [&str; 3] = ["bank", "bank-2", "other"];

    /// Flags on up to three lists, pending, confirmed or cleared.
    fn flags() -> impl Strategy<Value = Vec<Flag>> {
        use crate::index::moderation::{Decision, MatchRule, Verdict};
        proptest::collection::vec((0usize..LISTS.len(), 0u8..3), 0..3).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (list, decision))| Flag {
                    list: LISTS[list].to_string(),
                    entry: i as u64,
                    rule: MatchRule::Pdq,
                    pdq_distance: Some(4),
                    cosine: None,
                    flagged_unix: 0,
                    decision: [None, Some(Verdict::Confirmed), Some(Verdict::Cleared)]
                        [decision as usize]
                        .map(|verdict| Decision {
                            verdict,
                            note: String::new(),
                            actor: "cli".into(),
                            unix: 0,
                        }),
                })
                .collect()
        })
    }

    fn pdq() -> impl Strategy<Value = Option<Pdq>> {
        proptest::option::of((any::<u8>(), 0u8..=100)).prop_map(|p| {
            p.map(|(b, quality)| Pdq {
                hash: crate::index::pdq::PdqHash([b; 32]),
                quality,
            })
        })
    }

    fn records() -> impl Strategy<Value = Vec<ImageRecord>> {
        proptest::collection::vec(
            (
                0usize..4,
                1u32..40,
                1u32..40,
                proptest::option::of((2019u32..2022, 1u32..13, 1u32..29)),
                product(),
                flags(),
                pdq(),
            ),
            0..60,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (f, w, h, d, p, flags, pdq))| {
                    let exif = d.map(|(y, m, d)| format!("{y}:{m:02}:{d:02} 12:00:00"));
                    // Sparse, unordered ids, as after deletes and reindexing.
                    let id = (i as u64 * 7919) % 1009 + 3;
                    let mut r =
                        record(id, &format!("{}{i}.jpg", FOLDERS[f]), w, h, exif.as_deref());
                    r.product = p;
                    r.flags = flags;
                    r.pdq = pdq;
                    r
                })
                .collect()
        })
    }

    fn flag_filter() -> impl Strategy<Value = Option<FlagFilter>> {
        proptest::option::of((
            proptest::option::of(prop_oneof![
                Just("bank"),
                Just("bank-2"),
                Just("other"),
                Just("none")
            ]),
            any::<bool>(),
        ))
        .prop_map(|f| {
            f.map(|(list, pending_only)| FlagFilter {
                list: list.map(str::to_string),
                pending_only,
            })
        })
    }

    fn attr_test() -> impl Strategy<Value = AttrTest> {
        let num =
            || proptest::option::of(prop_oneof![Just(0.0), Just(10.0), Just(59.9), Just(70.0)]);
        let day = || {
            proptest::option::of(prop_oneof![Just("2024-01-01"), Just("2024-03-01")])
                .prop_map(|d| d.map(str::to_string))
        };
        prop_oneof![
            attr_value().prop_map(AttrTest::Equals),
            prop_oneof![Just(""), Just("acme"), Just("acme/"), Just("2024-")]
                .prop_map(|p| AttrTest::Prefix(p.to_string())),
            (num(), num()).prop_map(|(min, max)| AttrTest::Range { min, max }),
            (day(), day()).prop_map(|(from, to)| AttrTest::Days { from, to }),
        ]
    }

    fn attr_filters() -> impl Strategy<Value = Vec<AttrFilter>> {
        proptest::collection::vec(
            (
                prop_oneof![(0usize..ATTRS.len()).prop_map(|i| ATTRS[i]), Just("nope")],
                proptest::collection::vec(attr_test(), 1..3),
            )
                .prop_map(|(name, any_of)| AttrFilter {
                    name: name.to_string(),
                    any_of,
                }),
            0..3,
        )
    }

    fn filters() -> impl Strategy<Value = Filter> {
        (
            proptest::option::of(prop_oneof![
                Just("/a".to_string()),
                Just("/a/".to_string()),
                Just("/a/b/".to_string()),
                Just("/".to_string()),
                Just("/zz".to_string()),
            ]),
            proptest::option::of(Just("2020-01-01".to_string())),
            proptest::option::of(Just("2020-12-31".to_string())),
            proptest::option::of(1u32..40),
            proptest::option::of(1u32..40),
            attr_filters(),
            flag_filter(),
        )
            .prop_map(|(p, from, to, w, h, attributes, flagged)| Filter {
                path_prefix: p,
                date_from: from,
                date_to: to,
                min_width: w,
                min_height: h,
                attributes,
                flagged,
            })
    }

    /// What an attribute filter costs over 100k images in 1000 products (six attributes each),
    /// against evaluating `Filter::accepts_product` row by row; both must agree. Run in release
    /// (`cargo test --release --lib -- --ignored attribute_filters_over_100k`), where the
    /// column scan must take well under 2 ms.
    #[test]
    #[ignore]
    fn attribute_filters_over_100k_rows_are_cheap() {
        use crate::index::attributes::Schema;
        use crate::index::AttrType;
        use std::time::Instant;
        let brands = [
            "acme", "zeta", "orbit", "nova", "kite", "lumen", "peak", "rush",
        ];
        let mut c = Columns::default();
        let mut products = Vec::new();
        for n in 0..100_000u64 {
            let p = n / 100;
            let mut r = record(n, &format!("/shop/{p}/{n}.jpg"), 100, 100, None);
            r.product = Some(Product {
                id: format!("SKU-{p}"),
                title: Some(format!("product {p}")),
                description: None,
                attributes: [
                    ("brand", AttrValue::Text(brands[(p % 8) as usize].into())),
                    (
                        "color",
                        AttrValue::Text(["red", "blue", "green"][(p % 3) as usize].into()),
                    ),
                    ("category", AttrValue::Text(format!("shoes/{}", p % 7))),
                    ("price", AttrValue::Number((p % 200) as f64 + 0.5)),
                    ("in_stock", AttrValue::Bool(p % 2 == 0)),
                    (
                        "released",
                        AttrValue::Text(format!("2024-{:02}-01", p % 12 + 1)),
                    ),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            });
            products.push(r.product.clone().map(Arc::new));
            c.upsert(&r);
        }
        let schema: Schema = [
            ("brand", AttrType::Keyword),
            ("color", AttrType::Keyword),
            ("category", AttrType::Keyword),
            ("price", AttrType::Number),
            ("in_stock", AttrType::Bool),
            ("released", AttrType::Date),
        ]
        .into_iter()
        .map(|(k, t)| (k.to_string(), t))
        .collect();
        for (filters, selectivity) in [
            (&["brand:acme"][..], 0.125),
            (&["price:10..11"][..], 0.005),
            (&["color:red|blue", "in_stock:true"][..], 1.0 / 3.0),
            (
                &["category:shoes/3*", "released:2024-03-01..2024-06-30"][..],
                4.0 / 84.0,
            ),
        ] {
            let f = Filter {
                attributes: filters
                    .iter()
                    .map(|s| AttrFilter::parse(s, &schema).unwrap())
                    .collect(),
                ..Filter::default()
            };
            let best = |run: &dyn Fn() -> usize| {
                (0..5)
                    .map(|_| {
                        let t = Instant::now();
                        let n = run();
                        (t.elapsed(), n)
                    })
                    .min()
                    .unwrap()
            };
            let (columns, n) = best(&|| c.select(&f).len());
            let (rows, m) = best(&|| {
                products
                    .iter()
                    .filter(|p| f.accepts_product(p.as_deref()))
                    .count()
            });
            assert_eq!(n, m, "{filters:?}");
            assert!(
                (n as f64 / 1e5 - selectivity).abs() < 0.01,
                "{filters:?}: {n}"
            );
            eprintln!("{filters:?}: {n} pass; columns {columns:?}, product by product {rows:?}");
            if !cfg!(debug_assertions) {
                assert!(columns.as_secs_f64() < 2e-3, "{filters:?}: {columns:?}");
            }
        }
    }

    proptest! {
        /// The columns answer exactly what the reference meaning says, after removals and
        /// updates too.
        #[test]
        fn columns_select_what_accepts_accepts(
            rs in records(),
            f in filters(),
            drop in 0usize..10,
            changes in proptest::collection::vec((product(), flags(), pdq()), 0..6),
        ) {
            let mut c = Columns::default();
            for r in &rs {
                c.upsert(r);
            }
            let mut live: Vec<ImageRecord> = rs.clone();
            for r in rs.iter().step_by(drop.max(1)).take(drop) {
                prop_assert!(c.remove(r.id));
                live.retain(|x| x.id != r.id);
            }
            // Updates change products (and attributes), flags and hashes of some live images.
            for (r, (p, flags, pdq)) in live.iter_mut().rev().zip(changes) {
                r.product = p;
                r.flags = flags;
                r.pdq = pdq;
                c.upsert(r);
            }
            prop_assert_eq!(c.len(), live.len());
            let set = c.select(&f);
            let mut want = Vec::new();
            for r in &live {
                prop_assert_eq!(set.contains(r.id.0), f.accepts(r), "{:?}", r);
                if f.accepts(r) {
                    want.push(r.id.0);
                }
            }
            want.sort_unstable();
            prop_assert_eq!(set.len(), want.len());
            prop_assert_eq!(set.iter().collect::<Vec<u64>>(), want);
            let mut ids: Vec<ImageId> = live.iter().map(|r| r.id).collect();
            ids.sort_unstable();
            prop_assert_eq!(c.ids(), ids);
            let mut hashes: Vec<(ImageId, Pdq)> =
                live.iter().filter_map(|r| r.pdq.map(|p| (r.id, p))).collect();
            hashes.sort_unstable_by_key(|h| h.0);
            prop_assert_eq!(c.pdq_hashes(), hashes);
            // Products read back as written, and each product lists exactly its images.
            let mut images: BTreeMap<String, Vec<ImageId>> = BTreeMap::new();
            for r in &live {
                prop_assert_eq!(c.product(r.id).map(|p| &**p), r.product.as_ref());
                if let Some(p) = &r.product {
                    images.entry(p.id.clone()).or_default().push(r.id);
                }
            }
            images.values_mut().for_each(|v| v.sort_unstable());
            prop_assert_eq!(&c.product_images(None), &images);
            let some = ["P1".to_string(), "P3".to_string(), "none".to_string()];
            let want: BTreeMap<_, _> = images
                .into_iter()
                .filter(|(k, _)| some.contains(k))
                .collect();
            prop_assert_eq!(c.product_images(Some(&some)), want);
            for r in &rs {
                if !live.iter().any(|x| x.id == r.id) {
                    prop_assert!(!set.contains(r.id.0));
                }
            }
        }
    }
}
