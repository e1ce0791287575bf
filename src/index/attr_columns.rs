//! Product attributes column by column, in memory: what the embedded store evaluates attribute
//! filters on. Each attribute name has one dense column of 8-byte cells, one per row of
//! [`super::filter::Columns`], and a dictionary of its texts; a filter is compiled once per
//! search (each text of the dictionary tested once), then every row costs one array read and a
//! table lookup or a number comparison, with no pointer to follow and no string to compare.
//! 100k rows evaluate in under a millisecond in a release build.
//!
//! Memory: 8 bytes per row per attribute name the collection has seen, plus each distinct text
//! value once per attribute (freed when no row holds it any more).

use std::collections::HashMap;

use super::attributes::{AttrFilter, AttrTest, AttrValue, Product};

/// One attribute value of one row in 8 bytes: a number as its bits; no value, a bool, or a
/// text (by its index in the column's dictionary) as a NaN payload that no stored number has
/// (every NaN is stored as the one canonical NaN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cell(u64);

const TAG_SHIFT: u32 = 48;
const TAG_MISSING: u64 = 0xFFF9;
const TAG_BOOL: u64 = 0xFFFA;
const TAG_TEXT: u64 = 0xFFFB;

/// What a [`Cell`] holds.
enum CellValue {
    Missing,
    Bool(bool),
    Number(f64),
    Text(u32),
}

impl Cell {
    const MISSING: Cell = Cell(TAG_MISSING << TAG_SHIFT);

    fn number(n: f64) -> Cell {
        Cell(if n.is_nan() {
            f64::NAN.to_bits()
        } else {
            n.to_bits()
        })
    }

    fn bool(b: bool) -> Cell {
        Cell(TAG_BOOL << TAG_SHIFT | b as u64)
    }

    fn text(index: u32) -> Cell {
        Cell(TAG_TEXT << TAG_SHIFT | index as u64)
    }

    #[inline]
    fn value(self) -> CellValue {
        match self.0 >> TAG_SHIFT {
            TAG_MISSING => CellValue::Missing,
            TAG_BOOL => CellValue::Bool(self.0 & 1 == 1),
            TAG_TEXT => CellValue::Text(self.0 as u32),
            _ => CellValue::Number(f64::from_bits(self.0)),
        }
    }
}

/// The distinct texts of one column, each with the number of rows holding it; a text no row
/// holds leaves a free slot for the next new one.
#[derive(Debug, Default)]
struct Dictionary {
    /// Each text as the [`AttrValue::Text`] a filter test takes (free slots keep their old text
    /// until reused).
    values: Vec<AttrValue>,
    uses: Vec<u32>,
    index: HashMap<String, u32>,
    free: Vec<u32>,
}

impl Dictionary {
    fn intern(&mut self, text: &str) -> u32 {
        if let Some(&i) = self.index.get(text) {
            self.uses[i as usize] += 1;
            return i;
        }
        let value = AttrValue::Text(text.to_string());
        let i = match self.free.pop() {
            Some(i) => {
                self.values[i as usize] = value;
                self.uses[i as usize] = 1;
                i
            }
            None => {
                self.values.push(value);
                self.uses.push(1);
                (self.values.len() - 1) as u32
            }
        };
        self.index.insert(text.to_string(), i);
        i
    }

    fn release(&mut self, i: u32) {
        let uses = &mut self.uses[i as usize];
        *uses -= 1;
        if *uses == 0 {
            if let Some(text) = self.values[i as usize].as_text() {
                self.index.remove(text);
            }
            self.free.push(i);
        }
    }
}

/// One attribute: a cell per row, and its texts.
#[derive(Debug, Default)]
struct Column {
    cells: Vec<Cell>,
    texts: Dictionary,
}

impl Column {
    fn cell_of(&mut self, value: Option<&AttrValue>) -> Cell {
        match value {
            None => Cell::MISSING,
            Some(AttrValue::Bool(b)) => Cell::bool(*b),
            Some(AttrValue::Number(n)) => Cell::number(*n),
            Some(AttrValue::Text(s)) => Cell::text(self.texts.intern(s)),
        }
    }
}

/// The attributes of every row, one [`Column`] per attribute name. Rows are added at the end
/// and removed by swapping the last row in, as [`super::filter::Columns`] does.
#[derive(Debug, Default)]
pub(crate) struct AttrColumns {
    columns: HashMap<String, Column>,
    rows: usize,
}

impl AttrColumns {
    /// Adds a row with the attributes of `product` (none without one).
    pub(crate) fn push(&mut self, product: Option<&Product>) {
        if let Some(p) = product {
            for name in p.attributes.keys() {
                if !self.columns.contains_key(name) {
                    let column = Column {
                        cells: vec![Cell::MISSING; self.rows],
                        texts: Dictionary::default(),
                    };
                    self.columns.insert(name.clone(), column);
                }
            }
        }
        for (name, column) in &mut self.columns {
            let value = product.and_then(|p| p.attributes.get(name));
            let cell = column.cell_of(value);
            column.cells.push(cell);
        }
        self.rows += 1;
    }

    /// Removes row `row`; the last row takes its place.
    pub(crate) fn swap_remove(&mut self, row: usize) {
        for column in self.columns.values_mut() {
            if let CellValue::Text(i) = column.cells.swap_remove(row).value() {
                column.texts.release(i);
            }
        }
        self.rows -= 1;
    }

    /// `filters` ready to test rows, or `None` when one of them names an attribute no row has
    /// ever had (so no row passes).
    pub(crate) fn compile<'a>(&'a self, filters: &'a [AttrFilter]) -> Option<Vec<Compiled<'a>>> {
        filters
            .iter()
            .map(|f| {
                let column = self.columns.get(&f.name)?;
                let passes = |v: &AttrValue| f.any_of.iter().any(|t| t.accepts(v));
                // What a number must be within to pass: a range, or an equality as the range
                // of one value (the same for every number, -0.0 and NaN included); no other
                // test passes a number.
                let ranges = f
                    .any_of
                    .iter()
                    .filter_map(|t| match t {
                        AttrTest::Range { min, max } => Some((*min, *max)),
                        AttrTest::Equals(AttrValue::Number(n)) => Some((Some(*n), Some(*n))),
                        _ => None,
                    })
                    .collect();
                Some(Compiled {
                    cells: &column.cells,
                    texts: column.texts.values.iter().map(passes).collect(),
                    bools: [
                        passes(&AttrValue::Bool(false)),
                        passes(&AttrValue::Bool(true)),
                    ],
                    ranges,
                })
            })
            .collect()
    }
}

/// An [`AttrFilter`] over one column: its answer for each text and bool worked out once, and
/// the ranges a number must fall in.
pub(crate) struct Compiled<'a> {
    cells: &'a [Cell],
    texts: Vec<bool>,
    bools: [bool; 2],
    ranges: Vec<(Option<f64>, Option<f64>)>,
}

impl Compiled<'_> {
    /// Whether row `row` passes: [`AttrFilter::accepts`] on the row's product.
    #[inline]
    pub(crate) fn accepts(&self, row: usize) -> bool {
        match self.cells[row].value() {
            CellValue::Missing => false,
            CellValue::Bool(b) => self.bools[b as usize],
            CellValue::Text(i) => self.texts[i as usize],
            CellValue::Number(n) => self
                .ranges
                .iter()
                .any(|(min, max)| min.is_none_or(|m| n >= m) && max.is_none_or(|m| n <= m)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_keep_every_value_apart() {
        for n in [
            0.0,
            -0.0,
            1.5,
            -1e300,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN,
        ] {
            match Cell::number(n).value() {
                CellValue::Number(m) => assert_eq!(m.to_bits(), n.to_bits()),
                _ => panic!("{n}"),
            }
        }
        // A NaN with the payload of a tag is still a number.
        let tricky = f64::from_bits(TAG_TEXT << TAG_SHIFT | 7);
        assert!(tricky.is_nan());
        assert!(matches!(Cell::number(tricky).value(), CellValue::Number(m) if m.is_nan()));
        assert!(matches!(Cell::bool(true).value(), CellValue::Bool(true)));
        assert!(matches!(Cell::bool(false).value(), CellValue::Bool(false)));
        assert!(matches!(
            Cell::text(u32::MAX).value(),
            CellValue::Text(u32::MAX)
        ));
        assert!(matches!(Cell::MISSING.value(), CellValue::Missing));
    }

    #[test]
    fn texts_no_row_holds_are_forgotten() {
        let mut c = AttrColumns::default();
        let p = |brand: &str| Product {
            id: "p".into(),
            attributes: [("brand".to_string(), AttrValue::Text(brand.into()))].into(),
            ..Product::default()
        };
        c.push(Some(&p("acme")));
        c.push(Some(&p("acme")));
        c.push(Some(&p("zeta")));
        c.swap_remove(2);
        let texts = &c.columns["brand"].texts;
        assert_eq!(texts.index.len(), 1);
        assert_eq!(texts.free, [1]);
        c.push(Some(&p("omega")));
        let texts = &c.columns["brand"].texts;
        assert_eq!((texts.values.len(), texts.index["omega"]), (2, 1));
        c.swap_remove(0);
        c.swap_remove(0);
        c.swap_remove(0);
        assert!(c.columns["brand"].texts.index.is_empty());
        assert_eq!(c.rows, 0);
    }
}
