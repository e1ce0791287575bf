//! Products and their attributes: what a catalogue says about an image beyond its pixels, the
//! types a collection records for each attribute ([`Schema`]), and attribute filters
//! ([`AttrFilter`]) with their string form (`brand:acme`, `color:red|blue`, `price:10..80`,
//! `in_stock:true`, `released:2024-01-01..`, `category:shoes/*`).
//!
//! An image belongs to at most one product; every image of a product carries the product's
//! title, description and attributes, so that filters and facets work per image in any store.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::{IndexError, Result};
use super::filter::day_number;

/// Longest product id, attribute name or keyword value, in bytes.
pub const MAX_NAME: usize = 64;
/// Longest keyword or date value, in bytes.
pub const MAX_VALUE: usize = 256;
/// Most attributes one product may carry.
pub const MAX_ATTRIBUTES: usize = 64;

/// The type of an attribute, inferred from its first value and recorded in the collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttrType {
    /// A string matched whole (or by prefix with `*`): brand, colour, category.
    Keyword,
    /// A finite number: price, weight; filtered by ranges.
    Number,
    /// `true` or `false`: in stock.
    Bool,
    /// A calendar day `YYYY-MM-DD`; filtered by ranges of days.
    Date,
}

impl fmt::Display for AttrType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Keyword => "keyword",
            Self::Number => "number",
            Self::Bool => "bool",
            Self::Date => "date",
        })
    }
}

/// One attribute value as stored: a JSON scalar. Whether a string is a keyword or a date is
/// the collection's [`Schema`]'s to say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttrValue {
    /// `true` or `false`.
    Bool(bool),
    /// A finite number.
    Number(f64),
    /// A keyword or a date.
    Text(String),
}

impl AttrValue {
    /// The type a first value of this form gives its attribute: a string that is a calendar
    /// day is a date.
    pub fn inferred_type(&self) -> AttrType {
        match self {
            Self::Bool(_) => AttrType::Bool,
            Self::Number(_) => AttrType::Number,
            Self::Text(s) if day_number(s).is_some() => AttrType::Date,
            Self::Text(_) => AttrType::Keyword,
        }
    }

    /// This value as an attribute of type `ty`, or why it cannot be one. A keyword takes any
    /// value as its text (a CSV column of codes may look like numbers); the other types take
    /// only their own form.
    pub fn conform(self, ty: AttrType) -> std::result::Result<AttrValue, String> {
        match (ty, self) {
            (AttrType::Keyword, Self::Text(s)) => Ok(Self::Text(s)),
            (AttrType::Keyword, Self::Bool(b)) => Ok(Self::Text(b.to_string())),
            (AttrType::Keyword, Self::Number(n)) => Ok(Self::Text(number_text(n))),
            (AttrType::Number, Self::Number(n)) => Ok(Self::Number(n)),
            (AttrType::Bool, Self::Bool(b)) => Ok(Self::Bool(b)),
            (AttrType::Date, Self::Text(s)) if day_number(&s).is_some() => Ok(Self::Text(s)),
            (ty, v) => Err(format!("{v} is not a {ty}")),
        }
    }

    /// The text of a keyword or date value.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Self::Text(s) => Some(s),
            _ => None,
        }
    }

    /// The number of a number value.
    pub fn as_number(&self) -> Option<f64> {
        match self {
            Self::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// The day number (`YYYYMMDD`) of a date value.
    pub fn as_day(&self) -> Option<u32> {
        self.as_text().and_then(day_number)
    }
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bool(b) => write!(f, "{b}"),
            Self::Number(n) => f.write_str(&number_text(*n)),
            Self::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// A number as a person writes it: `59.9`, `80` (not `80.0`).
pub fn number_text(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// The type of every attribute a collection has seen, by name.
pub type Schema = BTreeMap<String, AttrType>;

/// Adds the types of `more` to `schema`; an attribute already there must keep its type.
pub fn merge_schema(schema: &mut Schema, more: &Schema) -> Result<()> {
    for (name, ty) in more {
        check_name(name)?;
        match schema.get(name) {
            Some(have) if have != ty => {
                return Err(IndexError::InvalidParams(format!(
                    "attribute {name:?} is a {have} in this collection, not a {ty}"
                )))
            }
            Some(_) => {}
            None => {
                schema.insert(name.clone(), *ty);
            }
        }
    }
    Ok(())
}

/// Refuses an attribute name that is not an identifier (`[A-Za-z_][A-Za-z0-9_]*`, at most
/// [`MAX_NAME`] bytes): names appear in filter strings and in remote stores' expressions.
pub fn check_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = name.len() <= MAX_NAME
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(IndexError::InvalidParams(format!(
            "attribute name {name:?} must be a letter or _ followed by letters, digits or _ \
             (at most {MAX_NAME} bytes)"
        )))
    }
}

/// The product an image belongs to, as stored with each of its images.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Product {
    /// The product's id in the merchant's catalogue (a SKU).
    pub id: String,
    /// The product's title: trusted text, BM25-indexed with its own boost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The product's description: trusted text, BM25-indexed with its own boost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Attribute values by name, conforming to the collection's [`Schema`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, AttrValue>,
}

/// One alternative of an attribute filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttrTest {
    /// A keyword equal to this text, or a bool equal to this value (`true`/`false`).
    Equals(AttrValue),
    /// A keyword starting with this text (`category:shoes/*`).
    Prefix(String),
    /// A number within `[min, max]`; an unset end is open.
    Range {
        /// Smallest accepted number.
        min: Option<f64>,
        /// Largest accepted number.
        max: Option<f64>,
    },
    /// A date within `[from, to]` (`YYYY-MM-DD`); an unset end is open.
    Days {
        /// First accepted day.
        from: Option<String>,
        /// Last accepted day.
        to: Option<String>,
    },
}

impl AttrTest {
    /// Whether `v` passes this test.
    pub fn accepts(&self, v: &AttrValue) -> bool {
        match self {
            Self::Equals(want) => match (want, v) {
                (AttrValue::Text(a), AttrValue::Text(b)) => a == b,
                (AttrValue::Bool(a), AttrValue::Bool(b)) => a == b,
                (AttrValue::Number(a), AttrValue::Number(b)) => a == b,
                _ => false,
            },
            Self::Prefix(p) => v.as_text().is_some_and(|s| s.starts_with(p.as_str())),
            Self::Range { min, max } => v
                .as_number()
                .is_some_and(|n| min.is_none_or(|m| n >= m) && max.is_none_or(|m| n <= m)),
            Self::Days { from, to } => v.as_day().is_some_and(|d| {
                let (lo, hi) = day_bounds(from.as_deref(), to.as_deref());
                (lo..=hi).contains(&d)
            }),
        }
    }
}

/// `(from, to)` as day numbers; an unset end is open.
pub fn day_bounds(from: Option<&str>, to: Option<&str>) -> (u32, u32) {
    (
        from.and_then(day_number).unwrap_or(0),
        to.and_then(day_number).unwrap_or(u32::MAX),
    )
}

/// An image passes when its product has attribute `name` and the value passes any of `any_of`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttrFilter {
    /// The attribute.
    pub name: String,
    /// Alternatives (`color:red|blue`): at least one must hold.
    pub any_of: Vec<AttrTest>,
}

impl AttrFilter {
    /// Whether `product` passes (an image without a product, or without the attribute, fails).
    pub fn accepts(&self, product: Option<&Product>) -> bool {
        product
            .and_then(|p| p.attributes.get(&self.name))
            .is_some_and(|v| self.any_of.iter().any(|t| t.accepts(v)))
    }

    /// Refuses a filter that cannot mean anything: a bad name, no alternative, an empty range,
    /// a date that is not a calendar day.
    pub fn check(&self) -> Result<()> {
        check_name(&self.name)?;
        let bad = |why: String| Err(IndexError::InvalidFilter(format!("{}: {why}", self.name)));
        if self.any_of.is_empty() {
            return bad("no value to match".into());
        }
        for t in &self.any_of {
            match t {
                AttrTest::Range { min, max } => {
                    if min.is_some_and(|m| !m.is_finite()) || max.is_some_and(|m| !m.is_finite()) {
                        return bad("range ends must be finite numbers".into());
                    }
                    if let (Some(a), Some(b)) = (min, max) {
                        if a > b {
                            return bad(format!("empty range {a}..{b}"));
                        }
                    }
                }
                AttrTest::Days { from, to } => {
                    for d in [from, to].into_iter().flatten() {
                        if day_number(d).is_none() {
                            return bad(format!("{d:?} is not a calendar date YYYY-MM-DD"));
                        }
                    }
                }
                AttrTest::Equals(AttrValue::Number(n)) if !n.is_finite() => {
                    return bad("numbers must be finite".into());
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Parses `name:value` with the types of `schema`:
    ///
    /// | type    | forms (alternatives joined by `\|`)                          |
    /// |---------|--------------------------------------------------------------|
    /// | keyword | `brand:acme`, `color:red\|blue`, `category:shoes/*` (prefix) |
    /// | number  | `price:10..80`, `price:..80`, `price:10..`, `price:59.9`     |
    /// | bool    | `in_stock:true`                                              |
    /// | date    | `released:2024-01-01..`, `..2024-12-31`, `a..b`, one day     |
    ///
    /// In keyword values `\|`, `\*` and `\\` stand for the characters themselves.
    ///
    /// ```
    /// use blipsearch::index::{AttrFilter, AttrTest, AttrType, Schema};
    ///
    /// let schema = Schema::from([("price".to_string(), AttrType::Number)]);
    /// let f = AttrFilter::parse("price:..80", &schema).unwrap();
    /// assert_eq!(f.any_of, [AttrTest::Range { min: None, max: Some(80.0) }]);
    /// assert!(AttrFilter::parse("price:cheap", &schema).is_err());
    /// assert!(AttrFilter::parse("colour:red", &schema).is_err()); // not in the collection
    /// ```
    pub fn parse(s: &str, schema: &Schema) -> Result<AttrFilter> {
        let bad = |why: String| IndexError::InvalidFilter(format!("filter {s:?}: {why}"));
        let (name, value) = s
            .split_once(':')
            .ok_or_else(|| bad("write it as name:value, e.g. brand:acme".into()))?;
        let name = name.trim();
        let Some(&ty) = schema.get(name) else {
            let known: Vec<&str> = schema.keys().map(String::as_str).collect();
            return Err(bad(if known.is_empty() {
                format!("no attribute {name:?}: this collection has no product attributes")
            } else {
                format!(
                    "no attribute {name:?}: this collection has {}",
                    known.join(", ")
                )
            }));
        };
        let alternatives = split_unescaped(value);
        let mut any_of = Vec::with_capacity(alternatives.len());
        for (text, starred) in alternatives {
            let text = text.trim().to_string();
            if text.is_empty() && !starred {
                return Err(bad("an empty value".into()));
            }
            let test = match ty {
                AttrType::Keyword if starred => AttrTest::Prefix(text),
                AttrType::Keyword => AttrTest::Equals(AttrValue::Text(text)),
                _ if starred => return Err(bad(format!("{name} is a {ty}: * is for keywords"))),
                AttrType::Bool => match text.as_str() {
                    "true" => AttrTest::Equals(AttrValue::Bool(true)),
                    "false" => AttrTest::Equals(AttrValue::Bool(false)),
                    _ => return Err(bad(format!("{name} is a bool: use true or false"))),
                },
                AttrType::Number => {
                    let num = |t: &str| -> Result<Option<f64>> {
                        if t.trim().is_empty() {
                            return Ok(None);
                        }
                        match t.trim().parse::<f64>() {
                            Ok(n) if n.is_finite() => Ok(Some(n)),
                            _ => Err(bad(format!("{name} is a number: {t:?} is not one"))),
                        }
                    };
                    match text.split_once("..") {
                        Some((a, b)) => AttrTest::Range {
                            min: num(a)?,
                            max: num(b)?,
                        },
                        None => {
                            let n = num(&text)?;
                            AttrTest::Range { min: n, max: n }
                        }
                    }
                }
                AttrType::Date => {
                    let day = |t: &str| -> Result<Option<String>> {
                        let t = t.trim();
                        if t.is_empty() {
                            return Ok(None);
                        }
                        day_number(t).map(|_| Some(t.to_string())).ok_or_else(|| {
                            bad(format!("{name} is a date: {t:?} is not a day YYYY-MM-DD"))
                        })
                    };
                    match text.split_once("..") {
                        Some((a, b)) => AttrTest::Days {
                            from: day(a)?,
                            to: day(b)?,
                        },
                        None => {
                            let d = day(&text)?;
                            AttrTest::Days {
                                from: d.clone(),
                                to: d,
                            }
                        }
                    }
                }
            };
            any_of.push(test);
        }
        let f = AttrFilter {
            name: name.to_string(),
            any_of,
        };
        f.check().map_err(|e| match e {
            IndexError::InvalidFilter(m) => bad(m),
            other => other,
        })?;
        Ok(f)
    }
}

/// `value` split at unescaped `|`, each part unescaped, with whether it ended in an unescaped
/// `*` (which is removed).
fn split_unescaped(value: &str) -> Vec<(String, bool)> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut starred = false;
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                starred = false;
                match chars.next() {
                    Some(n) => cur.push(n),
                    None => cur.push('\\'),
                }
            }
            '|' => {
                parts.push((std::mem::take(&mut cur), starred));
                starred = false;
            }
            '*' if starred => cur.push('*'),
            '*' => starred = true,
            c => {
                if starred {
                    // A `*` not at the end is a literal.
                    cur.push('*');
                    starred = false;
                }
                cur.push(c);
            }
        }
    }
    parts.push((cur, starred));
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema::from([
            ("brand".into(), AttrType::Keyword),
            ("color".into(), AttrType::Keyword),
            ("category".into(), AttrType::Keyword),
            ("price".into(), AttrType::Number),
            ("in_stock".into(), AttrType::Bool),
            ("released".into(), AttrType::Date),
        ])
    }

    fn product(attrs: &[(&str, AttrValue)]) -> Product {
        Product {
            id: "SKU".into(),
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            ..Product::default()
        }
    }

    #[test]
    fn every_form_parses_and_means_what_it_says() {
        let s = schema();
        let p = product(&[
            ("brand", AttrValue::Text("acme".into())),
            ("color", AttrValue::Text("red".into())),
            ("category", AttrValue::Text("shoes/running".into())),
            ("price", AttrValue::Number(59.9)),
            ("in_stock", AttrValue::Bool(true)),
            ("released", AttrValue::Text("2024-03-01".into())),
        ]);
        for (f, want) in [
            ("brand:acme", true),
            ("brand:other", false),
            ("color:blue|red", true),
            ("color:blue|green", false),
            ("category:shoes/*", true),
            ("category:bags/*|shoes/*", true),
            ("category:shoes", false),
            ("price:10..80", true),
            ("price:..59.9", true),
            ("price:..59", false),
            ("price:60..", false),
            ("price:59.9", true),
            ("price:..10|50..", true),
            ("in_stock:true", true),
            ("in_stock:false", false),
            ("released:2024-01-01..", true),
            ("released:..2024-02-29", false),
            ("released:2024-03-01", true),
        ] {
            let parsed = AttrFilter::parse(f, &s).unwrap();
            assert_eq!(parsed.accepts(Some(&p)), want, "{f}");
            assert!(!parsed.accepts(None), "{f}: no product, no match");
            assert!(!parsed.accepts(Some(&product(&[]))), "{f}: no attribute");
        }
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        let s = schema();
        for (f, says) in [
            ("brand", "name:value"),
            ("colour:red", "brand, category, color"),
            ("price:cheap", "is a number"),
            ("price:80..10", "empty range"),
            ("price:inf..", "is a number"),
            ("in_stock:yes", "true or false"),
            ("released:2023-02-29..", "YYYY-MM-DD"),
            ("price:10*", "for keywords"),
            ("brand:", "empty value"),
            ("color:red|", "empty value"),
        ] {
            let e = AttrFilter::parse(f, &s).unwrap_err().to_string();
            assert!(e.contains(says), "{f}: {e}");
        }
        assert!(AttrFilter::parse("brand:acme", &Schema::new())
            .unwrap_err()
            .to_string()
            .contains("no product attributes"));
    }

    #[test]
    fn escapes_keep_separators_literal() {
        let s = schema();
        let f = AttrFilter::parse(r"brand:a\|b|c\*|d*", &s).unwrap();
        assert_eq!(
            f.any_of,
            [
                AttrTest::Equals(AttrValue::Text("a|b".into())),
                AttrTest::Equals(AttrValue::Text("c*".into())),
                AttrTest::Prefix("d".into()),
            ]
        );
        // A value that would break an expression language is just text here.
        let f = AttrFilter::parse(r#"brand:x" or id > 0 or ""#, &s).unwrap();
        assert_eq!(
            f.any_of,
            [AttrTest::Equals(AttrValue::Text(
                r#"x" or id > 0 or ""#.into()
            ))]
        );
    }

    #[test]
    fn types_are_inferred_and_conformed() {
        assert_eq!(AttrValue::Number(1.0).inferred_type(), AttrType::Number);
        assert_eq!(
            AttrValue::Text("2024-03-01".into()).inferred_type(),
            AttrType::Date
        );
        assert_eq!(
            AttrValue::Text("2024-13-01".into()).inferred_type(),
            AttrType::Keyword
        );
        assert_eq!(
            AttrValue::Number(80.0).conform(AttrType::Keyword),
            Ok(AttrValue::Text("80".into()))
        );
        assert!(AttrValue::Text("red".into())
            .conform(AttrType::Number)
            .unwrap_err()
            .contains("not a number"));
        let mut s = schema();
        merge_schema(&mut s, &Schema::from([("weight".into(), AttrType::Number)])).unwrap();
        let e = merge_schema(&mut s, &Schema::from([("price".into(), AttrType::Keyword)]));
        assert!(e.unwrap_err().to_string().contains("is a number"));
        assert!(check_name("in stock").is_err());
        assert!(check_name("_x1").is_ok());
    }

    #[test]
    fn stored_values_keep_their_json_form() {
        let p = product(&[
            ("price", AttrValue::Number(59.9)),
            ("in_stock", AttrValue::Bool(false)),
            ("brand", AttrValue::Text("acme".into())),
        ]);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"id":"SKU","attributes":{"brand":"acme","in_stock":false,"price":59.9}}"#
        );
        assert_eq!(serde_json::from_str::<Product>(&json).unwrap(), p);
    }
}
