//! Facets and grouping over a result set: what a shopper sees beside the hits (value counts of
//! product attributes among the relevant results) and one hit per product.
//!
//! Facets count the relevant set, not the collection: the candidates a search retrieved (after
//! the ITM cut-off when one is asked for), or their groups when results are grouped.

use serde::Serialize;

use super::error::{EngineError, Result};
use crate::index::{AttrType, Schema};

/// Most facets one search may ask for.
pub const MAX_FACETS: usize = 16;
/// Most ranges one number facet may ask for.
pub const MAX_FACET_RANGES: usize = 32;
/// Buckets of an automatic number facet.
pub const AUTO_BUCKETS: usize = 5;
/// Most values listed per keyword facet (the most frequent first).
pub const MAX_FACET_VALUES: usize = 50;

/// How results are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// One hit per product (its best image); images without a product are groups of one.
    Product,
}

impl std::str::FromStr for GroupBy {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "product" => Ok(Self::Product),
            other => Err(EngineError::InvalidInput(format!(
                "cannot group by {other:?}: the one grouping is product"
            ))),
        }
    }
}

/// A number range `[min, max)` of a facet; an unset end is open. The last bucket of an
/// automatic facet includes its `max`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NumRange {
    /// Smallest number counted.
    pub min: Option<f64>,
    /// Numbers counted are below this.
    pub max: Option<f64>,
}

/// One facet asked for: an attribute, and for a number the ranges to count (none: automatic
/// buckets over the values found).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FacetRequest {
    /// The attribute.
    pub name: String,
    /// Its type in the collection.
    pub kind: AttrType,
    /// Ranges to count, for a number.
    pub ranges: Vec<NumRange>,
}

impl FacetRequest {
    /// Parses a comma-separated list: `brand,color,price` or, with ranges for a number,
    /// `price:..50|50..100|100..` (each range from its lower end, inclusive, to its upper end,
    /// exclusive). Every name must be an attribute of `schema`.
    ///
    /// ```
    /// use blipsearch::engine::facets::{FacetRequest, NumRange};
    /// use blipsearch::index::{AttrType, Schema};
    ///
    /// let schema = Schema::from([
    ///     ("brand".to_string(), AttrType::Keyword),
    ///     ("price".to_string(), AttrType::Number),
    /// ]);
    /// let f = FacetRequest::parse_list("brand,price:..50|50..", &schema).unwrap();
    /// assert_eq!(f[0].name, "brand");
    /// assert_eq!(f[1].ranges[1], NumRange { min: Some(50.0), max: None });
    /// assert!(FacetRequest::parse_list("size", &schema).is_err());
    /// ```
    pub fn parse_list(list: &str, schema: &Schema) -> Result<Vec<FacetRequest>> {
        let mut out: Vec<FacetRequest> = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bad = |why: String| EngineError::InvalidInput(format!("facet {item:?}: {why}"));
            let (name, ranges) = match item.split_once(':') {
                Some((n, r)) => (n.trim(), Some(r)),
                None => (item, None),
            };
            let Some(&kind) = schema.get(name) else {
                let known: Vec<&str> = schema.keys().map(String::as_str).collect();
                return Err(bad(if known.is_empty() {
                    "this collection has no product attributes".into()
                } else {
                    format!(
                        "no such attribute; this collection has {}",
                        known.join(", ")
                    )
                }));
            };
            if out.iter().any(|f| f.name == name) {
                return Err(bad("asked for twice".into()));
            }
            let mut req = FacetRequest {
                name: name.to_string(),
                kind,
                ranges: Vec::new(),
            };
            if let Some(ranges) = ranges {
                if kind != AttrType::Number {
                    return Err(bad(format!("{name} is a {kind}: ranges are for numbers")));
                }
                for r in ranges.split('|') {
                    let num = |t: &str| -> Result<Option<f64>> {
                        let t = t.trim();
                        if t.is_empty() {
                            return Ok(None);
                        }
                        match t.parse::<f64>() {
                            Ok(n) if n.is_finite() => Ok(Some(n)),
                            _ => Err(bad(format!("{t:?} is not a number"))),
                        }
                    };
                    let (a, b) = r
                        .split_once("..")
                        .ok_or_else(|| bad(format!("range {r:?}: write it as from..to")))?;
                    let range = NumRange {
                        min: num(a)?,
                        max: num(b)?,
                    };
                    if let (Some(a), Some(b)) = (range.min, range.max) {
                        if a >= b {
                            return Err(bad(format!("empty range {r:?}")));
                        }
                    }
                    req.ranges.push(range);
                }
                if req.ranges.len() > MAX_FACET_RANGES {
                    return Err(bad(format!("at most {MAX_FACET_RANGES} ranges")));
                }
            }
            out.push(req);
        }
        if out.len() > MAX_FACETS {
            return Err(EngineError::InvalidInput(format!(
                "at most {MAX_FACETS} facets per search"
            )));
        }
        Ok(out)
    }
}

/// The counts of one facet over the relevant set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FacetCounts {
    /// The attribute.
    pub name: String,
    /// Its type.
    pub kind: AttrType,
    /// Values (keywords, `true`/`false`, days) or ranges with their counts: keywords most
    /// frequent first (ties by value), ranges in the order asked or ascending.
    pub values: Vec<FacetValue>,
    /// Results of the set that have no value for the attribute.
    pub missing: usize,
}

/// One value or range of a facet and how many results have it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FacetValue {
    /// The value as a filter would write it (`acme`, `true`, `2024-03-01`, `10..80`).
    pub value: String,
    /// Results (or groups) with this value.
    pub count: usize,
    /// A range's lower end, for numbers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// A range's upper end (exclusive, but for the last automatic bucket), for numbers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// The group a grouped hit stands for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HitGroup {
    /// The product (`None`: an image without one, a group of its own).
    pub product: Option<String>,
    /// Images of the product in the collection.
    pub size: usize,
    /// The other images of the product among the results, best first.
    pub matching: Vec<u64>,
}
