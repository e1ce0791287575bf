//! Milvus boolean expressions, built with escaping: string literals and [`Filter`]s.

use crate::index::filter::{day_number, prefix_end, Filter};

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
    (!parts.is_empty()).then(|| parts.join(" and "))
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
    fn filters_become_expressions() {
        assert_eq!(filter_expr(&Filter::default()), None);
        let f = Filter {
            path_prefix: Some("/a/\"b".into()),
            date_from: Some("2020-01-01".into()),
            date_to: None,
            min_width: Some(10),
            min_height: None,
            attributes: Vec::new(),
        };
        assert_eq!(
            filter_expr(&f).unwrap(),
            "path >= \"/a/\\\"b\" and path < \"/a/\\\"c\" and day >= 20200101 and day <= 99999999 \
             and width >= 10"
        );
    }
}
