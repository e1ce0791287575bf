//! Milvus boolean expressions, built with escaping: string literals and [`Filter`]s.

use crate::index::attributes::{day_bounds, AttrFilter, AttrTest, AttrValue};
use crate::index::filter::{day_number, prefix_end, Filter};
use crate::index::moderation::FlagFilter;

/// The dynamic key of a row holding its product's id.
pub(super) const PRODUCT_KEY: &str = "product";
/// The dynamic key of a row holding its product's attributes, a JSON object by name.
pub(super) const ATTRS_KEY: &str = "attrs";
/// The dynamic key of a row holding, for each attribute whose value is a calendar day, that day
/// as the number `YYYYMMDD` (what date filters compare).
pub(super) const DAYS_KEY: &str = "attr_days";

/// The dynamic key of a row holding the names of the lists it has an active flag of (not
/// cleared), each once: a JSON array of strings, empty when none.
pub(super) const FLAG_LISTS_KEY: &str = "flag_lists";
/// The dynamic key of a row holding the names of the lists it has a pending flag of (no
/// decision yet), each once.
pub(super) const PENDING_LISTS_KEY: &str = "pending_lists";
/// The dynamic key of a row holding its PDQ hash as 64 hex digits (null without one).
pub(super) const PDQ_KEY: &str = "pdq";
/// The dynamic key of a row holding its PDQ hash's quality (null without one).
pub(super) const PDQ_QUALITY_KEY: &str = "pdq_quality";

/// `s` as a Milvus expression string literal (which knows the escapes `\" \' \\ \n \r \t`).
pub(super) fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The Milvus boolean expression meaning `filter` (see [`Filter::accepts`]); `None` when it
/// accepts everything. A path prefix is a range of strings (`>=` the prefix, `<` its
/// [`prefix_end`]), which needs no LIKE escaping and matches exactly.
pub(super) fn filter_expr(filter: &Filter) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(p) = &filter.path_prefix {
        parts.push(format!("path >= {}", literal(p)));
        if let Some(end) = prefix_end(p) {
            parts.push(format!("path < {}", literal(&end)));
        }
    }
    if filter.date_from.is_some() || filter.date_to.is_some() {
        let from = filter
            .date_from
            .as_deref()
            .and_then(day_number)
            .unwrap_or(0);
        let to = filter
            .date_to
            .as_deref()
            .and_then(day_number)
            .unwrap_or(99_999_999);
        parts.push(format!("day >= {from} and day <= {to}"));
    }
    if let Some(w) = filter.min_width {
        parts.push(format!("width >= {w}"));
    }
    if let Some(h) = filter.min_height {
        parts.push(format!("height >= {h}"));
    }
    parts.extend(filter.attributes.iter().map(attr_expr));
    parts.extend(filter.flagged.as_ref().map(flag_expr));
    (!parts.is_empty()).then(|| parts.join(" and "))
}

/// The expression meaning `f` (see [`FlagFilter::accepts`]) on the row's list-name arrays: a
/// list's name in [`FLAG_LISTS_KEY`] (in [`PENDING_LISTS_KEY`] for pending flags only), or, for
/// any list, a first element there (a string, so `>= ""`; an empty array, a null and a row
/// without the key have none).
fn flag_expr(f: &FlagFilter) -> String {
    let key = match f.pending_only {
        true => PENDING_LISTS_KEY,
        false => FLAG_LISTS_KEY,
    };
    match &f.list {
        Some(list) => format!("json_contains({key}, {})", literal(list)),
        None => format!("{key}[0] >= \"\""),
    }
}

/// The expression meaning `f` (see [`AttrFilter::accepts`]): its alternatives OR-ed, each on
/// the row's `attrs` object (`attr_days` for days). Milvus compares JSON values only with
/// values of their own type and a missing key with nothing, so a number never passes a text
/// test, and a row without the attribute (or without a product, as rows written before products
/// were stored) passes none. A prefix is a range of strings, as for paths.
fn attr_expr(f: &AttrFilter) -> String {
    let name = literal(&f.name);
    let value = format!("{ATTRS_KEY}[{name}]");
    let alternatives: Vec<String> = f
        .any_of
        .iter()
        .map(|t| match t {
            AttrTest::Equals(AttrValue::Text(s)) => format!("{value} == {}", literal(s)),
            AttrTest::Equals(AttrValue::Bool(b)) => format!("{value} == {b}"),
            AttrTest::Equals(AttrValue::Number(n)) => format!("{value} == {}", number(*n)),
            AttrTest::Prefix(p) => match prefix_end(p) {
                Some(end) => format!("{value} >= {} and {value} < {}", literal(p), literal(&end)),
                None => format!("{value} >= {}", literal(p)),
            },
            AttrTest::Range { min, max } => match (min, max) {
                (Some(a), Some(b)) => {
                    format!("{value} >= {} and {value} <= {}", number(*a), number(*b))
                }
                (Some(a), None) => format!("{value} >= {}", number(*a)),
                (None, Some(b)) => format!("{value} <= {}", number(*b)),
                // Any number.
                (None, None) => format!("{value} >= 0 or {value} < 0"),
            },
            AttrTest::Days { from, to } => {
                let (lo, hi) = day_bounds(from.as_deref(), to.as_deref());
                let day = format!("{DAYS_KEY}[{name}]");
                format!("{day} >= {lo} and {day} <= {}", hi.min(99_999_999))
            }
        })
        .map(|e| format!("({e})"))
        .collect();
    format!("({})", alternatives.join(" or "))
}

/// `n` as a Milvus number literal: Rust's shortest exact form, always with a `.` or an exponent
/// (`80.0`, `59.9`, `1e20`, `-0.5`), so that it parses as a double and never overflows an
/// integer.
fn number(n: f64) -> String {
    format!("{n:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_escape_what_the_parser_knows() {
        assert_eq!(literal("a\"b\\c\nd\te"), "\"a\\\"b\\\\c\\nd\\te\"");
        assert_eq!(literal("/photos/été 50%_x"), "\"/photos/été 50%_x\"");
    }

    #[test]
    fn attribute_filters_become_escaped_expressions() {
        use crate::index::{AttrFilter, AttrType, Schema};
        let schema = Schema::from([
            ("brand".to_string(), AttrType::Keyword),
            ("category".to_string(), AttrType::Keyword),
            ("price".to_string(), AttrType::Number),
            ("in_stock".to_string(), AttrType::Bool),
            ("released".to_string(), AttrType::Date),
        ]);
        let expr = |filters: &[&str]| {
            filter_expr(&Filter {
                attributes: filters
                    .iter()
                    .map(|f| AttrFilter::parse(f, &schema).unwrap())
                    .collect(),
                ..Filter::default()
            })
            .unwrap()
        };
        assert_eq!(
            expr(&["brand:acme|zeta", "in_stock:true"]),
            r#"((attrs["brand"] == "acme") or (attrs["brand"] == "zeta")) and ((attrs["in_stock"] == true))"#
        );
        assert_eq!(
            expr(&["category:shoes/*"]),
            r#"((attrs["category"] >= "shoes/" and attrs["category"] < "shoes0"))"#
        );
        assert_eq!(
            expr(&["price:..80|100|120.5.."]),
            r#"((attrs["price"] <= 80.0) or (attrs["price"] >= 100.0 and attrs["price"] <= 100.0) or (attrs["price"] >= 120.5))"#
        );
        assert_eq!(
            expr(&["released:2024-01-01.."]),
            r#"((attr_days["released"] >= 20240101 and attr_days["released"] <= 99999999))"#
        );
        // The value stays inside its string literal: without escaping, the expression would
        // read `attrs["brand"] == "x" or id > 0 or ""` and match every row with an id.
        assert_eq!(
            expr(&[r#"brand:x" or id > 0 or ""#]),
            r#"((attrs["brand"] == "x\" or id > 0 or \""))"#
        );
        assert_eq!(number(1e20), "1e20");
        assert_eq!(number(-0.5), "-0.5");
    }

    #[test]
    fn filters_become_expressions() {
        assert_eq!(filter_expr(&Filter::default()), None);
        let f = Filter {
            path_prefix: Some("/a/\"b".into()),
            date_from: Some("2020-01-01".into()),
            date_to: None,
            min_width: Some(10),
            min_height: None,
            attributes: Vec::new(),
            flagged: None,
        };
        assert_eq!(
            filter_expr(&f).unwrap(),
            "path >= \"/a/\\\"b\" and path < \"/a/\\\"c\" and day >= 20200101 and day <= 99999999 \
             and width >= 10"
        );
        let flagged = |list: Option<&str>, pending_only| {
            filter_expr(&Filter {
                flagged: Some(FlagFilter {
                    list: list.map(str::to_string),
                    pending_only,
                }),
                ..Filter::default()
            })
            .unwrap()
        };
        assert_eq!(flagged(None, false), "flag_lists[0] >= \"\"");
        assert_eq!(flagged(None, true), "pending_lists[0] >= \"\"");
        assert_eq!(
            flagged(Some("bank"), false),
            "json_contains(flag_lists, \"bank\")"
        );
        assert_eq!(
            flagged(Some("bank"), true),
            "json_contains(pending_lists, \"bank\")"
        );
    }
}
