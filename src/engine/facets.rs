//! Facets and grouping over a result set: what a shopper sees beside the hits (value counts of
//! product attributes among the relevant results) and one hit per product.
//!
//! Facets count the relevant set, not the collection: the candidates a search retrieved (after
//! the ITM cut-off when one is asked for), or their groups when results are grouped.
//!
//! Keyword, bool and date facets list their values with counts, most frequent first (ties by
//! value), at most [`MAX_FACET_VALUES`]. A number facet counts the ranges asked, or
//! [`AUTO_BUCKETS`] automatic buckets at most over the smallest to the largest value of the set:
//! the bucket width is the smallest step of the form 1, 2 or 5 x 10^k that covers the values in
//! that many buckets, and buckets start at a multiple of it (`0..20`, `20..40`, ...); the last
//! bucket includes its upper end. `missing` counts results without the attribute.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Serialize;

use super::error::{EngineError, Result};
use crate::index::attributes::number_text;
use crate::index::{AttrType, AttrValue, Product, Schema};

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

/// Counts `requests` over a relevant set: one entry per result (or per group), its product if it
/// has one. Every request gets one [`FacetCounts`], in the order asked.
///
/// ```
/// use blipsearch::engine::facets::{count_facets, FacetRequest};
/// use blipsearch::index::{AttrType, AttrValue, Product, Schema};
///
/// let schema = Schema::from([("brand".to_string(), AttrType::Keyword)]);
/// let product = |brand: &str| Product {
///     id: brand.into(),
///     attributes: [("brand".to_string(), AttrValue::Text(brand.into()))].into(),
///     ..Product::default()
/// };
/// let (a, b) = (product("acme"), product("zenith"));
/// let set = [Some(&a), Some(&b), Some(&a), None];
/// let counts = count_facets(&FacetRequest::parse_list("brand", &schema).unwrap(), &set);
/// let values: Vec<(&str, usize)> =
///     counts[0].values.iter().map(|v| (v.value.as_str(), v.count)).collect();
/// assert_eq!(values, [("acme", 2), ("zenith", 1)]);
/// assert_eq!(counts[0].missing, 1);
/// ```
pub fn count_facets(requests: &[FacetRequest], set: &[Option<&Product>]) -> Vec<FacetCounts> {
    requests.iter().map(|r| count_one(r, set)).collect()
}

fn count_one(req: &FacetRequest, set: &[Option<&Product>]) -> FacetCounts {
    let values = set
        .iter()
        .map(|p| p.and_then(|p| p.attributes.get(&req.name)));
    let mut missing = 0;
    let values = match req.kind {
        AttrType::Number => {
            let mut nums = Vec::with_capacity(set.len());
            for v in values {
                match v.and_then(AttrValue::as_number).filter(|n| n.is_finite()) {
                    Some(n) => nums.push(n),
                    None => missing += 1,
                }
            }
            if req.ranges.is_empty() {
                auto_buckets(&nums)
            } else {
                req.ranges
                    .iter()
                    .map(|r| FacetValue {
                        value: range_text(r.min, r.max),
                        count: nums
                            .iter()
                            .filter(|&&n| {
                                r.min.is_none_or(|m| n >= m) && r.max.is_none_or(|m| n < m)
                            })
                            .count(),
                        min: r.min,
                        max: r.max,
                    })
                    .collect()
            }
        }
        AttrType::Keyword | AttrType::Bool | AttrType::Date => {
            let mut counts: HashMap<Cow<'_, str>, usize> = HashMap::new();
            for v in values {
                let text = match v {
                    Some(AttrValue::Text(s)) => Cow::Borrowed(s.as_str()),
                    Some(AttrValue::Bool(b)) => Cow::Borrowed(if *b { "true" } else { "false" }),
                    Some(AttrValue::Number(n)) => Cow::Owned(number_text(*n)),
                    None => {
                        missing += 1;
                        continue;
                    }
                };
                *counts.entry(text).or_default() += 1;
            }
            let mut values: Vec<FacetValue> = counts
                .into_iter()
                .map(|(value, count)| FacetValue {
                    value: value.into_owned(),
                    count,
                    min: None,
                    max: None,
                })
                .collect();
            values.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.value.cmp(&b.value)));
            values.truncate(MAX_FACET_VALUES);
            values
        }
    };
    FacetCounts {
        name: req.name.clone(),
        kind: req.kind,
        values,
        missing,
    }
}

/// A range as a filter writes it: `10..80`, `..50`, `50..`.
fn range_text(min: Option<f64>, max: Option<f64>) -> String {
    let end = |x: Option<f64>| x.map(number_text).unwrap_or_default();
    format!("{}..{}", end(min), end(max))
}

/// A step of the form `mantissa x 10^exp` (mantissa 1, 2 or 5), so that multiples of it are
/// computed without the rounding error of repeated additions: `3 x 0.1` is `3 / 10`.
#[derive(Debug, Clone, Copy)]
struct Step {
    mantissa: i64,
    exp: i32,
}

impl Step {
    /// The smallest 1, 2 or 5 x 10^k at least `x` (> 0).
    fn at_least(x: f64) -> Step {
        let mut exp = x.log10().floor() as i32;
        loop {
            for mantissa in [1, 2, 5] {
                let s = Step { mantissa, exp };
                if s.value() >= x {
                    return s;
                }
            }
            exp += 1;
        }
    }

    /// The next larger step.
    fn next(self) -> Step {
        match self.mantissa {
            1 => Step {
                mantissa: 2,
                ..self
            },
            2 => Step {
                mantissa: 5,
                ..self
            },
            _ => Step {
                mantissa: 1,
                exp: self.exp + 1,
            },
        }
    }

    fn value(self) -> f64 {
        self.times(1)
    }

    /// `i` steps, rounded once.
    fn times(self, i: i64) -> f64 {
        let m = (i * self.mantissa) as f64;
        if self.exp >= 0 {
            m * 10f64.powi(self.exp)
        } else {
            m / 10f64.powi(-self.exp)
        }
    }
}

/// At most [`AUTO_BUCKETS`] buckets of a readable width over the values (see the module docs),
/// each `[min, max)` but the last, which includes its `max`. No values: no buckets; one distinct
/// value: one bucket from it to it.
fn auto_buckets(nums: &[f64]) -> Vec<FacetValue> {
    let (Some(lo), Some(hi)) = (
        nums.iter().copied().reduce(f64::min),
        nums.iter().copied().reduce(f64::max),
    ) else {
        return Vec::new();
    };
    let span = hi - lo;
    // Edges as multiples of the step: a bucket count, and its first multiple, that cover the
    // values; `None` when the numbers are too far apart for whole multiples.
    let edges = if span > 0.0 && span.is_finite() {
        let mut step = Step::at_least(span / AUTO_BUCKETS as f64);
        loop {
            let first = (lo / step.value()).floor();
            if first.abs() > 1e15 || (hi / step.value()).abs() > 1e15 {
                break None;
            }
            let mut first = first as i64;
            // The division may round across an edge: the first edge must not pass `lo`.
            while step.times(first) > lo {
                first -= 1;
            }
            let mut n = 1;
            while step.times(first + n) < hi {
                n += 1;
            }
            if n as usize <= AUTO_BUCKETS {
                break Some((step, first, n));
            }
            step = step.next();
        }
    } else {
        None
    };
    let Some((step, first, n)) = edges else {
        return vec![FacetValue {
            value: range_text(Some(lo), Some(hi)),
            count: nums.len(),
            min: Some(lo),
            max: Some(hi),
        }];
    };
    let bounds: Vec<f64> = (0..=n).map(|i| step.times(first + i)).collect();
    let mut counts = vec![0usize; n as usize];
    for &x in nums {
        // The last bucket whose lower edge is at most x (the top edge counts in the last).
        let i = bounds[1..n as usize].partition_point(|&b| b <= x);
        counts[i] += 1;
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(i, count)| FacetValue {
            value: range_text(Some(bounds[i]), Some(bounds[i + 1])),
            count,
            min: Some(bounds[i]),
            max: Some(bounds[i + 1]),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema::from([
            ("brand".to_string(), AttrType::Keyword),
            ("price".to_string(), AttrType::Number),
            ("in_stock".to_string(), AttrType::Bool),
            ("released".to_string(), AttrType::Date),
        ])
    }

    fn product(id: &str, attrs: &[(&str, AttrValue)]) -> Product {
        Product {
            id: id.into(),
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            ..Product::default()
        }
    }

    fn text(s: &str) -> AttrValue {
        AttrValue::Text(s.into())
    }

    fn pairs(c: &FacetCounts) -> Vec<(&str, usize)> {
        c.values
            .iter()
            .map(|v| (v.value.as_str(), v.count))
            .collect()
    }

    fn prices(ps: &[f64]) -> Vec<Product> {
        ps.iter()
            .map(|&p| product("p", &[("price", AttrValue::Number(p))]))
            .collect()
    }

    fn auto(ps: &[f64]) -> Vec<(String, usize, f64, f64)> {
        let products = prices(ps);
        let set: Vec<Option<&Product>> = products.iter().map(Some).collect();
        let c = count_facets(&FacetRequest::parse_list("price", &schema()).unwrap(), &set);
        c[0].values
            .iter()
            .map(|v| (v.value.clone(), v.count, v.min.unwrap(), v.max.unwrap()))
            .collect()
    }

    #[test]
    fn values_are_counted_most_frequent_first_ties_by_value() {
        let a = product(
            "a",
            &[
                ("brand", text("zeta")),
                ("in_stock", AttrValue::Bool(true)),
                ("released", text("2024-03-01")),
            ],
        );
        let b = product(
            "b",
            &[
                ("brand", text("acme")),
                ("in_stock", AttrValue::Bool(false)),
            ],
        );
        let c = product(
            "c",
            &[("brand", text("beta")), ("released", text("2023-01-01"))],
        );
        let none = product("d", &[]);
        // zeta 2, acme 2, beta 1: ties by value.
        let set = [
            Some(&a),
            Some(&b),
            Some(&c),
            Some(&a),
            Some(&b),
            Some(&none),
            None,
        ];
        let req = FacetRequest::parse_list("brand,in_stock,released", &schema()).unwrap();
        let got = count_facets(&req, &set);
        assert_eq!(pairs(&got[0]), [("acme", 2), ("zeta", 2), ("beta", 1)]);
        assert_eq!(got[0].missing, 2);
        assert_eq!(pairs(&got[1]), [("false", 2), ("true", 2)]);
        assert_eq!(got[1].missing, 3);
        assert_eq!(pairs(&got[2]), [("2024-03-01", 2), ("2023-01-01", 1)]);
        assert_eq!(got[2].missing, 4);
        assert!(got.iter().all(|c| c.values.iter().all(|v| v.min.is_none())));
        // Nothing to count: no values, nothing missing.
        assert_eq!(
            count_facets(&req, &[])[0],
            FacetCounts {
                name: "brand".into(),
                kind: AttrType::Keyword,
                values: vec![],
                missing: 0,
            }
        );
    }

    #[test]
    fn at_most_max_facet_values_are_listed() {
        let products: Vec<Product> = (0..MAX_FACET_VALUES + 10)
            .map(|i| product("p", &[("brand", text(&format!("b{i:03}")))]))
            .collect();
        let mut set: Vec<Option<&Product>> = products.iter().map(Some).collect();
        set.push(Some(&products[55])); // the most frequent comes first although last by name
        let c = &count_facets(&FacetRequest::parse_list("brand", &schema()).unwrap(), &set)[0];
        assert_eq!(c.values.len(), MAX_FACET_VALUES);
        assert_eq!(pairs(c)[0], ("b055", 2));
        assert_eq!(pairs(c)[1], ("b000", 1));
        assert_eq!(c.missing, 0);
    }

    #[test]
    fn number_ranges_asked_are_half_open_and_in_the_order_asked() {
        let mut products = prices(&[10.0, 49.99, 50.0, 80.0, 120.0]);
        products.push(product("q", &[("brand", text("acme"))]));
        let set: Vec<Option<&Product>> = products.iter().map(Some).collect();
        let req = FacetRequest::parse_list("price:50..|..50|50..80|0..1000", &schema()).unwrap();
        let c = &count_facets(&req, &set)[0];
        assert_eq!(
            pairs(c),
            [("50..", 3), ("..50", 2), ("50..80", 1), ("0..1000", 5)]
        );
        assert_eq!((c.values[2].min, c.values[2].max), (Some(50.0), Some(80.0)));
        assert_eq!((c.values[0].min, c.values[0].max), (Some(50.0), None));
        assert_eq!(c.missing, 1);
    }

    #[test]
    fn automatic_buckets_have_readable_edges() {
        let b = |v: &[(&str, usize)]| -> Vec<(String, usize)> {
            v.iter().map(|(s, n)| (s.to_string(), *n)).collect()
        };
        let strip = |v: Vec<(String, usize, f64, f64)>| -> Vec<(String, usize)> {
            v.into_iter().map(|(s, n, _, _)| (s, n)).collect()
        };
        // Span 93.5 over 5 buckets: 18.7, so steps of 20 from 0.
        assert_eq!(
            strip(auto(&[3.5, 19.99, 20.0, 45.0, 97.0])),
            b(&[
                ("0..20", 2),
                ("20..40", 1),
                ("40..60", 1),
                ("60..80", 0),
                ("80..100", 1)
            ])
        );
        // 10..120: 22 would be the step; 50 is the next readable one, from 0.
        assert_eq!(
            strip(auto(&[10.0, 10.0, 10.0, 55.5, 55.5, 99.0, 120.0])),
            b(&[("0..50", 3), ("50..100", 3), ("100..150", 1)])
        );
        // The maximum on an edge falls in the last bucket, not a new one.
        assert_eq!(
            strip(auto(&[0.0, 100.0])),
            b(&[
                ("0..20", 1),
                ("20..40", 0),
                ("40..60", 0),
                ("60..80", 0),
                ("80..100", 1)
            ])
        );
        // Decimal steps are exact decimals: 0.3, not 0.30000000000000004.
        let small = auto(&[0.1, 0.25, 0.35]);
        assert_eq!(
            strip(small.clone()),
            b(&[
                ("0.1..0.15", 1),
                ("0.15..0.2", 0),
                ("0.2..0.25", 0),
                ("0.25..0.3", 1),
                ("0.3..0.35", 1)
            ])
        );
        assert_eq!(small[3].3, 0.3);
        // A step that must grow past the first guess: steps of 2 would need six buckets.
        assert_eq!(
            strip(auto(&[1.9, 10.1])),
            b(&[("0..5", 1), ("5..10", 0), ("10..15", 1)])
        );
        // Negative numbers.
        let neg = auto(&[-7.0, -1.0, 4.0, 13.0]);
        assert_eq!(
            strip(neg.clone()),
            b(&[
                ("-10..-5", 1),
                ("-5..0", 1),
                ("0..5", 1),
                ("5..10", 0),
                ("10..15", 1)
            ])
        );
        // One distinct value: one bucket from it to it; none: no buckets.
        assert_eq!(auto(&[42.0, 42.0]), [("42..42".to_string(), 2, 42.0, 42.0)]);
        assert!(auto(&[]).is_empty());
        // Far-apart values still make at most five buckets that hold every value.
        for vals in [
            vec![1e-300, 1e300],
            vec![-1.7e308, 1.7e308],
            vec![0.0, 1e-9, 3e-9],
            vec![123456789.0, 123456789.5],
        ] {
            let got = auto(&vals);
            assert!(
                !got.is_empty() && got.len() <= AUTO_BUCKETS,
                "{vals:?}: {got:?}"
            );
            assert_eq!(
                got.iter().map(|g| g.1).sum::<usize>(),
                vals.len(),
                "{vals:?}"
            );
            assert!(got[0].2 <= vals[0] && got[got.len() - 1].3 >= vals[vals.len() - 1]);
        }
    }
}
