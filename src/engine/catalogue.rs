//! Reading a merchant's product catalogue: JSON lines or CSV, told apart by the file's
//! extension (`.jsonl`/`.ndjson`, `.csv`), into [`CatalogueProduct`]s whose attributes conform
//! to one schema. What `blipsearch import` does with them is [`super::Engine::import`].
//!
//! **JSON lines**: one product per line,
//! `{"product": "SKU-1", "images": ["a.jpg", "b.jpg"], "title": "...", "description": "...",
//! "attributes": {"brand": "acme", "price": 59.9, "in_stock": true, "released": "2024-03-01"}}`.
//! `product` and a non-empty `images` are required; any other field is refused. Attribute
//! values are strings, numbers or booleans (`null` or `""`: absent).
//!
//! **CSV**: a header `product,image,title,description,<attribute>...` (`title`, `description`
//! and attributes optional, in any order), then one row per image. Rows of one product are
//! merged: a cell left empty says nothing (so only the first row of a product needs its
//! title), and a non-empty cell must agree with what an earlier row of the product said, or
//! the row is malformed. A row with an empty `image` cell only carries texts and attributes.
//!
//! **Paths** of images are relative to the catalogue's folder, or to `--images-root` when
//! given; absolute paths are taken as they are. An image listed by two products is an error
//! on the later line.
//!
//! **Types** of attributes: an attribute the collection knows keeps its type; a new one gets
//! the type of its first value (JSON: a boolean, a number, a string that is a day
//! `YYYY-MM-DD` is a date, any other string a keyword; CSV: the type most non-empty cells of
//! the column have, keyword on a tie, where `true`/`false` is a bool, a finite number a
//! number, a day a date, anything else a keyword). A keyword takes any value as its text. A
//! value that cannot be of its attribute's type is a conflict: the line is
//! malformed and the message names the attribute, its type and where that type came from.
//!
//! **Malformed lines** (not JSON, no product or images, an unknown field, a bad attribute
//! name, a conflict, a line over [`MAX_LINE_BYTES`], too many attributes) are reported with
//! their line number and skipped; the rest is read. A file that cannot be read at all, or a
//! CSV header that is not usable, is an error.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::error::{EngineError, Result};
use crate::index::attributes::{check_name, MAX_ATTRIBUTES, MAX_NAME, MAX_VALUE};
use crate::index::{day_number, AttrType, AttrValue, Product, Schema};

/// Longest line (a CSV record, with its quoted line breaks), in bytes.
pub const MAX_LINE_BYTES: usize = 256 * 1024;
/// Longest title, in characters.
pub const MAX_TITLE_CHARS: usize = 1024;
/// Longest description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 16 * 1024;
/// Most images one product may list.
pub const MAX_IMAGES: usize = 64;
/// Longest image path, in bytes.
const MAX_PATH_BYTES: usize = 4096;

/// One product of a catalogue, its attributes conformed to the catalogue's schema.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogueProduct {
    /// The line it starts on (1-based).
    pub line: usize,
    /// Id, texts and attributes.
    pub product: Product,
    /// Its images, absolute (canonical when the file exists), without repeats.
    pub images: Vec<PathBuf>,
}

/// A line that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Malformed {
    /// The line (1-based).
    pub line: usize,
    /// The product it names, when that much could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// What is wrong with it.
    pub reason: String,
}

/// A catalogue read from a file.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    /// The products, in the order of their first lines.
    pub products: Vec<CatalogueProduct>,
    /// The lines skipped.
    pub malformed: Vec<Malformed>,
    /// The type of every attribute the products carry (the collection's types, and the ones
    /// inferred for new attributes).
    pub attributes: Schema,
}

impl Catalogue {
    /// Reads the catalogue at `path` (JSON lines or CSV, by extension), its relative image
    /// paths taken from `images_root` or else the catalogue's folder, its attributes conformed
    /// to `schema` (the collection's).
    pub fn read(path: &Path, images_root: Option<&Path>, schema: &Schema) -> Result<Catalogue> {
        let io = |source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        };
        let kind = Kind::of(path)?;
        let base = match images_root {
            Some(root) => root.to_path_buf(),
            None => path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
        };
        let base = std::path::absolute(&base).map_err(io)?;
        if !base.is_dir() {
            return Err(EngineError::InvalidInput(format!(
                "the images root {} is not a folder",
                base.display()
            )));
        }
        let file = std::fs::File::open(path).map_err(io)?;
        let reader = std::io::BufReader::new(file);
        let read = match kind {
            Kind::JsonLines => Self::from_json_lines(reader, &base, schema),
            Kind::Csv => Self::from_csv(reader, &base, schema),
        };
        read.map_err(|e| match e {
            EngineError::Io { source, .. } => io(source),
            other => other,
        })
    }

    /// Reads JSON lines from `reader`; relative image paths are taken from `base`.
    pub fn from_json_lines(
        mut reader: impl BufRead,
        base: &Path,
        schema: &Schema,
    ) -> Result<Catalogue> {
        let mut b = Builder::new(base, schema);
        let mut line = Vec::new();
        let mut number = 0;
        loop {
            line.clear();
            let Some(complete) = read_bounded_line(&mut reader, &mut line, MAX_LINE_BYTES)
                .map_err(|source| EngineError::Io {
                    path: base.to_path_buf(),
                    source,
                })?
            else {
                break;
            };
            number += 1;
            if !complete {
                b.malformed(
                    number,
                    None,
                    format!("the line is longer than {MAX_LINE_BYTES} bytes"),
                );
                continue;
            }
            let mut text = match std::str::from_utf8(&line) {
                Ok(t) => t,
                Err(_) => {
                    b.malformed(number, None, "the line is not UTF-8".into());
                    continue;
                }
            };
            if number == 1 {
                text = text.strip_prefix('\u{feff}').unwrap_or(text);
            }
            if text.trim().is_empty() {
                continue;
            }
            let value: Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(e) => {
                    b.malformed(number, None, format!("not JSON: {e}"));
                    continue;
                }
            };
            let id = value
                .get("product")
                .and_then(Value::as_str)
                .map(str::to_string);
            if let Err(reason) = b.json_line(number, value) {
                b.malformed(number, id, reason);
            }
        }
        Ok(b.finish())
    }

    /// Reads CSV from `reader`; relative image paths are taken from `base`.
    pub fn from_csv(reader: impl Read, base: &Path, schema: &Schema) -> Result<Catalogue> {
        let bounded = RecordBound::new(reader);
        let start = bounded.record_start.clone();
        let mut csv = csv::ReaderBuilder::new()
            .has_headers(false)
            .trim(csv::Trim::All)
            .from_reader(bounded);
        let file_error = |line: u64, why: String| {
            EngineError::InvalidInput(format!("catalogue line {line}: {why}"))
        };
        let mut header = csv::StringRecord::new();
        match csv.read_record(&mut header) {
            Ok(true) => {}
            Ok(false) => return Ok(Catalogue::default()),
            Err(e) => return Err(csv_file_error(e, 1)),
        }
        let columns = Columns::of(&header).map_err(|why| file_error(1, why))?;
        // Column types need every cell: read the rows first (each bounded), then judge them.
        let mut rows: Vec<(usize, csv::StringRecord)> = Vec::new();
        let mut b = Builder::new(base, schema);
        loop {
            let mut record = csv::StringRecord::new();
            start.set(csv.position().byte());
            let line = csv.position().line() as usize;
            match csv.read_record(&mut record) {
                Ok(true) => {
                    let line = record.position().map_or(line, |p| p.line() as usize);
                    rows.push((line, record));
                }
                Ok(false) => break,
                Err(e) => match e.kind() {
                    csv::ErrorKind::UnequalLengths { pos, len, .. } => {
                        let line = pos.as_ref().map_or(line, |p| p.line() as usize);
                        b.malformed(
                            line,
                            None,
                            format!("{len} fields, the header has {}", header.len()),
                        );
                    }
                    csv::ErrorKind::Utf8 { pos, .. } => {
                        let line = pos.as_ref().map_or(line, |p| p.line() as usize);
                        b.malformed(line, None, "the line is not UTF-8".into());
                    }
                    _ => return Err(csv_file_error(e, line as u64)),
                },
            }
        }
        let types = columns.types(&rows, schema);
        for (line, row) in &rows {
            let cell = |i: Option<usize>| i.and_then(|i| row.get(i)).filter(|c| !c.is_empty());
            let id = cell(Some(columns.product)).map(str::to_string);
            if let Err(reason) = b.csv_row(*line, row, &columns, &types) {
                b.malformed(*line, id, reason);
            }
        }
        Ok(b.finish())
    }

    /// Whether some malformed line did not say which product it is about.
    pub fn has_unreadable_lines(&self) -> bool {
        self.malformed.iter().any(|m| m.product.is_none())
    }
}

/// A product as an API sends it, `{"product", "title", "description", "attributes"}` (its
/// images come apart), checked as a catalogue line is, its attributes conformed to `schema`
/// (the collection's types); returns it with `schema` and the types of its new attributes.
pub fn read_product(
    value: Value,
    schema: &Schema,
) -> std::result::Result<(Product, Schema), String> {
    let Value::Object(mut obj) = value else {
        return Err("the product must be a JSON object".into());
    };
    let id = match obj.remove("product") {
        Some(Value::String(s)) => s,
        Some(_) => return Err("\"product\" must be a string".into()),
        None => return Err("no \"product\"".into()),
    };
    Builder::check_id(&id)?;
    let b = Builder::new(Path::new("/"), schema);
    let (product, new_types) = b.json_product(
        1,
        id,
        obj,
        "a product has product, title, description and attributes (images are file parts)",
    )?;
    let mut types = schema.clone();
    types.extend(new_types.into_iter().map(|(name, (ty, _))| (name, ty)));
    Ok((product, types))
}

/// Checks a product id as catalogues and the API take them: not empty, at most [`MAX_NAME`]
/// bytes, no control characters.
pub fn check_product_id(id: &str) -> std::result::Result<(), String> {
    Builder::check_id(id)
}

fn csv_file_error(e: csv::Error, line: u64) -> EngineError {
    let line = e.position().map_or(line, |p| p.line());
    match e.into_kind() {
        csv::ErrorKind::Io(source) if source.kind() == std::io::ErrorKind::InvalidData => {
            EngineError::InvalidInput(format!("catalogue line {line}: {source}"))
        }
        csv::ErrorKind::Io(source) => EngineError::Io {
            path: PathBuf::new(),
            source,
        },
        other => EngineError::InvalidInput(format!("catalogue line {line}: {other:?}")),
    }
}

/// The formats, by extension.
enum Kind {
    JsonLines,
    Csv,
}

impl Kind {
    fn of(path: &Path) -> Result<Kind> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("jsonl" | "ndjson") => Ok(Kind::JsonLines),
            Some("csv") => Ok(Kind::Csv),
            _ => Err(EngineError::InvalidInput(format!(
                "{}: a catalogue is JSON lines (.jsonl, .ndjson) or CSV (.csv), told by its \
                 extension",
                path.display()
            ))),
        }
    }
}

/// Reads one line (without its `\n` or `\r\n`) into `out`, keeping at most `max` bytes of it;
/// `Some(false)` when the line was longer (the rest is read and dropped), `None` at the end.
fn read_bounded_line(
    reader: &mut impl BufRead,
    out: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<bool>> {
    let mut seen = false;
    let mut complete = true;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        seen = true;
        let (chunk, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if complete && out.len() + chunk.len() <= max {
            out.extend_from_slice(chunk);
        } else {
            complete = false;
            out.clear();
        }
        let used = end.unwrap_or(buf.len());
        reader.consume(used);
        if end.is_some() {
            break;
        }
    }
    if out.last() == Some(&b'\r') {
        out.pop();
    }
    Ok(seen.then_some(complete))
}

/// A reader that fails once more than [`MAX_LINE_BYTES`] (plus the CSV reader's buffer) were
/// read since the record in progress began: memory stays bounded whatever a quoted field holds.
struct RecordBound<R> {
    inner: R,
    read: u64,
    record_start: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R> RecordBound<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            read: 0,
            record_start: Default::default(),
        }
    }
}

impl<R: Read> Read for RecordBound<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // The CSV reader buffers 8 KiB ahead of the record it parses.
        if self.read.saturating_sub(self.record_start.get()) > (MAX_LINE_BYTES + (64 << 10)) as u64
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a record longer than {MAX_LINE_BYTES} bytes"),
            ));
        }
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// Where the columns of a CSV catalogue are.
struct Columns {
    product: usize,
    image: usize,
    title: Option<usize>,
    description: Option<usize>,
    /// Attribute columns: (index, name).
    attributes: Vec<(usize, String)>,
}

impl Columns {
    fn of(header: &csv::StringRecord) -> std::result::Result<Columns, String> {
        let mut seen = HashMap::new();
        let (mut product, mut image, mut title, mut description) = (None, None, None, None);
        let mut attributes = Vec::new();
        for (i, name) in header.iter().enumerate() {
            let name = if i == 0 {
                name.strip_prefix('\u{feff}').unwrap_or(name)
            } else {
                name
            };
            if let Some(j) = seen.insert(name.to_string(), i) {
                return Err(format!(
                    "column {name:?} appears twice (columns {} and {})",
                    j + 1,
                    i + 1
                ));
            }
            match name {
                "product" => product = Some(i),
                "image" => image = Some(i),
                "title" => title = Some(i),
                "description" => description = Some(i),
                _ => {
                    check_name(name).map_err(|e| format!("column {}: {}", i + 1, name_error(e)))?;
                    attributes.push((i, name.to_string()));
                }
            }
        }
        if attributes.len() > MAX_ATTRIBUTES {
            return Err(format!(
                "{} attribute columns, at most {MAX_ATTRIBUTES}",
                attributes.len()
            ));
        }
        let (Some(product), Some(image)) = (product, image) else {
            return Err(
                "the header must name the columns product and image (then title, description \
                 and attributes, in any order)"
                    .into(),
            );
        };
        Ok(Columns {
            product,
            image,
            title,
            description,
            attributes,
        })
    }

    /// The type of each attribute column: the collection's, else the one most of its
    /// non-empty cells have (keyword on a tie). One stray cell does not turn a column of prices
    /// into keywords: its row is a conflict instead.
    fn types(&self, rows: &[(usize, csv::StringRecord)], schema: &Schema) -> Vec<AttrType> {
        self.attributes
            .iter()
            .map(|(i, name)| {
                if let Some(&ty) = schema.get(name) {
                    return ty;
                }
                let mut counts: BTreeMap<AttrType, usize> = BTreeMap::new();
                for c in rows.iter().filter_map(|(_, r)| r.get(*i)) {
                    if !c.is_empty() {
                        *counts.entry(cell_type(c)).or_default() += 1;
                    }
                }
                let most = counts.values().copied().max().unwrap_or(0);
                let leaders: Vec<AttrType> = counts
                    .into_iter()
                    .filter(|&(_, n)| n == most)
                    .map(|(ty, _)| ty)
                    .collect();
                match leaders.as_slice() {
                    [ty] => *ty,
                    _ => AttrType::Keyword,
                }
            })
            .collect()
    }
}

/// The message of a refused attribute name.
fn name_error(e: crate::index::IndexError) -> String {
    match e {
        crate::index::IndexError::InvalidParams(m) => m,
        other => other.to_string(),
    }
}

/// The type a CSV cell looks like.
fn cell_type(cell: &str) -> AttrType {
    if cell == "true" || cell == "false" {
        AttrType::Bool
    } else if cell.parse::<f64>().is_ok_and(f64::is_finite) {
        AttrType::Number
    } else if day_number(cell).is_some() {
        AttrType::Date
    } else {
        AttrType::Keyword
    }
}

/// A CSV cell as a value of type `ty`.
fn cell_value(cell: &str, ty: AttrType) -> std::result::Result<AttrValue, String> {
    match ty {
        AttrType::Keyword => Ok(AttrValue::Text(cell.to_string())),
        AttrType::Number => match cell.parse::<f64>() {
            Ok(n) if n.is_finite() => Ok(AttrValue::Number(n)),
            _ => Err(format!("{cell:?} is not a number")),
        },
        AttrType::Bool => match cell {
            "true" => Ok(AttrValue::Bool(true)),
            "false" => Ok(AttrValue::Bool(false)),
            _ => Err(format!("{cell:?} is not a bool (true or false)")),
        },
        AttrType::Date => match day_number(cell) {
            Some(_) => Ok(AttrValue::Text(cell.to_string())),
            None => Err(format!("{cell:?} is not a date YYYY-MM-DD")),
        },
    }
}

/// Types of attributes new to the collection, each with the line that gave it.
type NewTypes = BTreeMap<String, (AttrType, usize)>;

/// Gathers products, checks them against each other and the schema, and records malformed
/// lines.
struct Builder<'a> {
    base: &'a Path,
    /// The collection's types.
    known: &'a Schema,
    /// Types of new attributes, with the line that gave each.
    inferred: NewTypes,
    products: Vec<CatalogueProduct>,
    by_id: HashMap<String, usize>,
    /// Which product (and line) lists each image.
    image_owner: HashMap<PathBuf, (String, usize)>,
    malformed: Vec<Malformed>,
}

impl<'a> Builder<'a> {
    fn new(base: &'a Path, known: &'a Schema) -> Self {
        Self {
            base,
            known,
            inferred: BTreeMap::new(),
            products: Vec::new(),
            by_id: HashMap::new(),
            image_owner: HashMap::new(),
            malformed: Vec::new(),
        }
    }

    fn malformed(&mut self, line: usize, product: Option<String>, reason: String) {
        self.malformed.push(Malformed {
            line,
            product,
            reason,
        });
    }

    fn finish(mut self) -> Catalogue {
        // CSV rows may carry a product's texts without an image: a product needs one.
        let (products, imageless): (Vec<_>, Vec<_>) = std::mem::take(&mut self.products)
            .into_iter()
            .partition(|p| !p.images.is_empty());
        for p in imageless {
            self.malformed(
                p.line,
                Some(p.product.id),
                "the product has no image".into(),
            );
        }
        self.products = products;
        let mut attributes = self.known.clone();
        for (name, (ty, _)) in self.inferred {
            attributes.insert(name, ty);
        }
        self.malformed.sort_by_key(|m| m.line);
        Catalogue {
            products: self.products,
            malformed: self.malformed,
            attributes,
        }
    }

    /// The type of attribute `name`, and where it comes from (for messages).
    fn type_of(&self, name: &str) -> Option<(AttrType, String)> {
        if let Some(&ty) = self.known.get(name) {
            return Some((ty, "in this collection".into()));
        }
        self.inferred
            .get(name)
            .map(|&(ty, line)| (ty, format!("since line {line}")))
    }

    /// Conforms `value` to the type of `name` (inferring it when new, into `new_types`).
    fn conform(
        &self,
        line: usize,
        name: &str,
        value: AttrValue,
        new_types: &mut NewTypes,
    ) -> std::result::Result<AttrValue, String> {
        check_name(name).map_err(name_error)?;
        if let AttrValue::Text(s) = &value {
            if s.len() > MAX_VALUE {
                return Err(format!(
                    "attribute {name:?}: a value over {MAX_VALUE} bytes"
                ));
            }
        }
        let (ty, whence) = match self.type_of(name) {
            Some(t) => t,
            None => {
                let ty = new_types
                    .entry(name.to_string())
                    .or_insert((value.inferred_type(), line))
                    .0;
                (ty, format!("since line {line}"))
            }
        };
        value.conform(ty).map_err(|why| {
            format!("attribute {name:?} is a {ty} ({whence}): {why}; a conflicting type")
        })
    }

    /// An image path of a line, made absolute (canonical when the file exists).
    fn image_path(&self, raw: &str) -> std::result::Result<PathBuf, String> {
        if raw.is_empty() {
            return Err("an empty image path".into());
        }
        if raw.len() > MAX_PATH_BYTES {
            return Err(format!("an image path over {MAX_PATH_BYTES} bytes"));
        }
        if raw.contains('\0') {
            return Err("an image path with a NUL byte".into());
        }
        let joined = self.base.join(raw);
        Ok(std::fs::canonicalize(&joined).unwrap_or(joined))
    }

    /// Checks a product id.
    fn check_id(id: &str) -> std::result::Result<(), String> {
        if id.is_empty() {
            return Err("an empty product id".into());
        }
        if id.len() > MAX_NAME {
            return Err(format!("a product id over {MAX_NAME} bytes"));
        }
        if id.chars().any(char::is_control) {
            return Err("a product id with control characters".into());
        }
        Ok(())
    }

    /// A title or description, trimmed (`None` when empty), within its bound.
    fn text(
        what: &str,
        value: Option<&str>,
        max: usize,
    ) -> std::result::Result<Option<String>, String> {
        let Some(t) = value.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        if t.chars().count() > max {
            return Err(format!("the {what} is over {max} characters"));
        }
        Ok(Some(t.to_string()))
    }

    /// Claims `images` for product `id` of `line`: an image another product listed is an error.
    fn check_owners(&self, id: &str, images: &[PathBuf]) -> std::result::Result<(), String> {
        for p in images {
            if let Some((other, line)) = self.image_owner.get(p) {
                if other != id {
                    return Err(format!(
                        "image {} is already listed by product {other:?} (line {line})",
                        p.display()
                    ));
                }
            }
        }
        Ok(())
    }

    fn json_line(&mut self, line: usize, value: Value) -> std::result::Result<(), String> {
        let Value::Object(mut obj) = value else {
            return Err("a line must be a JSON object".into());
        };
        let id = match obj.remove("product") {
            Some(Value::String(s)) => s,
            Some(_) => return Err("\"product\" must be a string".into()),
            None => return Err("no \"product\"".into()),
        };
        Self::check_id(&id)?;
        if let Some(&i) = self.by_id.get(&id) {
            return Err(format!(
                "product {id:?} is already on line {}",
                self.products[i].line
            ));
        }
        let raw_images = match obj.remove("images") {
            Some(Value::Array(a)) if !a.is_empty() => a,
            Some(Value::Array(_)) | None => return Err("no \"images\"".into()),
            Some(_) => return Err("\"images\" must be a list of paths".into()),
        };
        if raw_images.len() > MAX_IMAGES {
            return Err(format!("{} images, at most {MAX_IMAGES}", raw_images.len()));
        }
        let mut images = Vec::with_capacity(raw_images.len());
        for v in raw_images {
            let Value::String(s) = v else {
                return Err("\"images\" must be a list of paths".into());
            };
            let p = self.image_path(&s)?;
            if !images.contains(&p) {
                images.push(p);
            }
        }
        let (product, new_types) = self.json_product(
            line,
            id,
            obj,
            "a line has product, images, title, description and attributes",
        )?;
        self.check_owners(&product.id, &images)?;
        self.add(line, product, images, new_types);
        Ok(())
    }

    /// The rest of a JSON product (title, description, attributes) once its id and images
    /// are taken out of `obj`; `fields` says which fields there may be.
    fn json_product(
        &self,
        line: usize,
        id: String,
        mut obj: serde_json::Map<String, Value>,
        fields: &str,
    ) -> std::result::Result<(Product, NewTypes), String> {
        let string = |obj: &mut serde_json::Map<String, Value>, key: &str| match obj.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("{key:?} must be a string")),
        };
        let title = Self::text(
            "title",
            string(&mut obj, "title")?.as_deref(),
            MAX_TITLE_CHARS,
        )?;
        let description = Self::text(
            "description",
            string(&mut obj, "description")?.as_deref(),
            MAX_DESCRIPTION_CHARS,
        )?;
        let attributes = match obj.remove("attributes") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(a)) => a,
            Some(_) => return Err("\"attributes\" must be an object".into()),
        };
        if let Some(unknown) = obj.keys().next() {
            return Err(format!("unknown field {unknown:?}: {fields}"));
        }
        let (attributes, new_types) = self.json_attributes(line, attributes)?;
        Ok((
            Product {
                id,
                title,
                description,
                attributes,
            },
            new_types,
        ))
    }

    /// The attributes of a JSON object, conformed; with the types they introduce.
    fn json_attributes(
        &self,
        line: usize,
        attributes: serde_json::Map<String, Value>,
    ) -> std::result::Result<(BTreeMap<String, AttrValue>, NewTypes), String> {
        if attributes.len() > MAX_ATTRIBUTES {
            return Err(format!(
                "{} attributes, at most {MAX_ATTRIBUTES}",
                attributes.len()
            ));
        }
        let mut out = BTreeMap::new();
        let mut new_types = BTreeMap::new();
        for (name, v) in attributes {
            let value = match v {
                Value::Null => continue,
                Value::String(s) if s.trim().is_empty() => continue,
                Value::String(s) => AttrValue::Text(s.trim().to_string()),
                Value::Bool(b) => AttrValue::Bool(b),
                Value::Number(n) => match n.as_f64() {
                    Some(f) if f.is_finite() => AttrValue::Number(f),
                    _ => return Err(format!("attribute {name:?}: {n} is not a finite number")),
                },
                Value::Array(_) | Value::Object(_) => {
                    return Err(format!(
                        "attribute {name:?} must be a string, a number or a boolean"
                    ))
                }
            };
            let value = self.conform(line, &name, value, &mut new_types)?;
            out.insert(name, value);
        }
        Ok((out, new_types))
    }

    fn csv_row(
        &mut self,
        line: usize,
        row: &csv::StringRecord,
        columns: &Columns,
        types: &[AttrType],
    ) -> std::result::Result<(), String> {
        let cell = |i: usize| row.get(i).filter(|c| !c.is_empty());
        let id = cell(columns.product).ok_or("no product")?.to_string();
        Self::check_id(&id)?;
        let title = Self::text("title", columns.title.and_then(cell), MAX_TITLE_CHARS)?;
        let description = Self::text(
            "description",
            columns.description.and_then(cell),
            MAX_DESCRIPTION_CHARS,
        )?;
        let mut attributes = BTreeMap::new();
        let mut new_types = BTreeMap::new();
        for ((i, name), &ty) in columns.attributes.iter().zip(types) {
            let Some(c) = cell(*i) else { continue };
            let value = cell_value(c, ty).map_err(|why| {
                let whence = match self.known.contains_key(name) {
                    true => "in this collection",
                    false => "in this column",
                };
                format!("attribute {name:?} is a {ty} ({whence}): {why}; a conflicting type")
            })?;
            let value = self.conform(line, name, value, &mut new_types)?;
            attributes.insert(name.clone(), value);
        }
        let image = cell(columns.image)
            .map(|c| self.image_path(c))
            .transpose()?;
        let images: Vec<PathBuf> = image.into_iter().collect();
        self.check_owners(&id, &images)?;
        match self.by_id.get(&id).copied() {
            None => self.add(
                line,
                Product {
                    id,
                    title,
                    description,
                    attributes,
                },
                images,
                new_types,
            ),
            Some(i) => {
                // Rows of one product must agree on what they both say.
                let have = &self.products[i];
                let first = have.line;
                let differs = |a: &Option<String>, b: &Option<String>| matches!((a, b), (Some(x), Some(y)) if x != y);
                if differs(&have.product.title, &title) {
                    return Err(format!("the title differs from line {first}'s"));
                }
                if differs(&have.product.description, &description) {
                    return Err(format!("the description differs from line {first}'s"));
                }
                for (name, v) in &attributes {
                    if have.product.attributes.get(name).is_some_and(|h| h != v) {
                        return Err(format!("attribute {name:?} differs from line {first}'s"));
                    }
                }
                let fresh: Vec<PathBuf> = images
                    .into_iter()
                    .filter(|p| !have.images.contains(p))
                    .collect();
                if have.images.len() + fresh.len() > MAX_IMAGES {
                    return Err(format!("more than {MAX_IMAGES} images for product {id:?}"));
                }
                for p in &fresh {
                    self.image_owner.insert(p.clone(), (id.clone(), line));
                }
                let have = &mut self.products[i];
                if have.product.title.is_none() {
                    have.product.title = title;
                }
                if have.product.description.is_none() {
                    have.product.description = description;
                }
                for (name, v) in attributes {
                    have.product.attributes.entry(name).or_insert(v);
                }
                have.images.extend(fresh);
                self.commit_types(new_types);
            }
        }
        Ok(())
    }

    fn commit_types(&mut self, new_types: NewTypes) {
        for (name, t) in new_types {
            self.inferred.entry(name).or_insert(t);
        }
    }

    fn add(&mut self, line: usize, product: Product, images: Vec<PathBuf>, new_types: NewTypes) {
        for p in &images {
            self.image_owner
                .insert(p.clone(), (product.id.clone(), line));
        }
        self.commit_types(new_types);
        self.by_id.insert(product.id.clone(), self.products.len());
        self.products.push(CatalogueProduct {
            line,
            product,
            images,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jsonl(text: &str, schema: &Schema) -> Catalogue {
        Catalogue::from_json_lines(text.as_bytes(), Path::new("/shop"), schema).unwrap()
    }

    fn csv(text: &str, schema: &Schema) -> Result<Catalogue> {
        Catalogue::from_csv(text.as_bytes(), Path::new("/shop"), schema)
    }

    fn reasons(c: &Catalogue) -> Vec<(usize, String)> {
        c.malformed
            .iter()
            .map(|m| (m.line, m.reason.clone()))
            .collect()
    }

    #[test]
    fn json_lines_infer_types_and_skip_malformed_lines_by_number() {
        let text = [
            r#"{"product":"A","images":["a1.png","img/a2.png"],"title":" Red shoe ","attributes":{"brand":"acme","price":59.9,"in_stock":true,"released":"2024-03-01","note":null}}"#,
            "",
            r#"{"product":"B","images":["b.png"],"attributes":{"price":"cheap"}}"#,
            r#"{"product":"C","images":[]}"#,
            r#"{"product":"D","images":["d.png"],"attributes":{"in stock":true}}"#,
            r#"{"product":"E","images":["d.png"],"colour":"red"}"#,
            r#"{"product":"F","images":["a1.png"]}"#,
            r#"{"product":"A","images":["x.png"]}"#,
            r#"{"product": "G", "images": ["#,
            r#"{"product":"H","images":["h.png"],"attributes":{"brand":7,"released":"soon"}}"#,
        ]
        .join("\n");
        let c = jsonl(&text, &Schema::new());
        let ids: Vec<&str> = c.products.iter().map(|p| p.product.id.as_str()).collect();
        assert_eq!(ids, ["A"]);
        let a = &c.products[0];
        assert_eq!(a.line, 1);
        assert_eq!(a.product.title.as_deref(), Some("Red shoe"));
        assert_eq!(
            a.images,
            [
                PathBuf::from("/shop/a1.png"),
                PathBuf::from("/shop/img/a2.png")
            ]
        );
        assert_eq!(
            c.attributes,
            Schema::from([
                ("brand".into(), AttrType::Keyword),
                ("in_stock".into(), AttrType::Bool),
                ("price".into(), AttrType::Number),
                ("released".into(), AttrType::Date),
            ])
        );
        let r = reasons(&c);
        let lines: Vec<usize> = r.iter().map(|x| x.0).collect();
        assert_eq!(lines, [3, 4, 5, 6, 7, 8, 9, 10], "{r:?}");
        let says = |line: usize, what: &str| {
            let (_, reason) = r.iter().find(|x| x.0 == line).unwrap();
            assert!(reason.contains(what), "line {line}: {reason}");
        };
        says(3, "\"price\" is a number (since line 1)");
        says(4, "no \"images\"");
        says(5, "must be a letter");
        says(6, "unknown field \"colour\"");
        says(7, "already listed by product \"A\" (line 1)");
        says(8, "already on line 1");
        says(9, "not JSON");
        // A keyword takes a number as its text; a date must be a day.
        says(10, "\"released\" is a date");
        assert_eq!(c.malformed[6].product, None, "line 9 names no product");
        assert_eq!(c.malformed[0].product.as_deref(), Some("B"));
        assert!(c.has_unreadable_lines());
    }

    #[test]
    fn the_collection_types_win_and_long_lines_are_skipped() {
        let known = Schema::from([("code".into(), AttrType::Keyword)]);
        let long = format!(
            r#"{{"product":"L","images":["l.png"],"title":"{}"}}"#,
            "x".repeat(MAX_LINE_BYTES)
        );
        let text = format!(
            "\u{feff}{}\n{long}\r\n{}\r\n",
            r#"{"product":"A","images":["a.png"],"attributes":{"code":7}}"#,
            r#"{"product":"B","images":["b.png"],"attributes":{"code":"x7"}}"#
        );
        let c = jsonl(&text, &known);
        assert_eq!(c.products.len(), 2, "{:?}", c.malformed);
        assert_eq!(
            c.products[0].product.attributes["code"],
            AttrValue::Text("7".into())
        );
        assert_eq!(reasons(&c)[0].0, 2);
        assert!(reasons(&c)[0].1.contains("longer than"));
    }

    #[test]
    fn csv_rows_merge_by_product_and_columns_take_the_type_most_cells_have() {
        let text = "\u{feff}product,image,title,description,price,color,code\n\
                    A,a1.png,Red shoe,\"Light, fast\nand red\",59.9,red,007\n\
                    A,a2.png,,,,,\n\
                    B,b1.png,Blue bag,,cheap,blue,A12\n\
                    B,b2.png,Green bag,,12,,\n\
                    C,,Only words,,3,,\n\
                    D,d.png,x\n\
                    E,a1.png,Copy,,4,,\n";
        let c = csv(text, &Schema::new()).unwrap();
        let ids: Vec<&str> = c.products.iter().map(|p| p.product.id.as_str()).collect();
        assert_eq!(ids, ["A", "B"]);
        let a = &c.products[0];
        assert_eq!(a.images.len(), 2);
        assert_eq!(
            a.product.description.as_deref(),
            Some("Light, fast\nand red")
        );
        assert_eq!(a.product.attributes["price"], AttrValue::Number(59.9));
        assert_eq!(a.product.attributes["code"], AttrValue::Text("007".into()));
        assert_eq!(c.attributes["price"], AttrType::Number);
        assert_eq!(
            c.attributes["code"],
            AttrType::Keyword,
            "a tie is a keyword"
        );
        let r = reasons(&c);
        let lines: Vec<usize> = r.iter().map(|x| x.0).collect();
        // B's first row conflicts (price), so its second row starts the product.
        assert_eq!(lines, [5, 7, 8, 9], "{r:?}");
        assert!(r[0].1.contains("\"price\" is a number"), "{r:?}");
        assert!(r[1].1.contains("no image"), "{r:?}");
        assert!(r[2].1.contains("fields"), "{r:?}");
        assert!(r[3].1.contains("already listed by product \"A\""), "{r:?}");
        assert_eq!(c.products[1].line, 6);
        assert_eq!(c.products[1].product.title.as_deref(), Some("Green bag"));

        // Rows that disagree: the later one is refused.
        let c = csv(
            "product,image,title\nA,a1.png,One\nA,a2.png,Two\n",
            &Schema::new(),
        )
        .unwrap();
        assert_eq!(c.products[0].images.len(), 1);
        assert!(reasons(&c)[0].1.contains("title differs from line 2"));
        // Headers that cannot be used fail the file.
        for (header, says) in [
            ("product,title\n", "product and image"),
            ("product,image,in stock\n", "column 3"),
            ("product,image,x,x\n", "appears twice"),
        ] {
            let e = csv(header, &Schema::new()).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("line 1"), "{header}: {e}");
        }
    }

    #[test]
    fn products_from_the_api_are_checked_like_lines() {
        let schema = Schema::from([("price".into(), AttrType::Number)]);
        let (p, types) = read_product(
            serde_json::json!({"product":"S","title":"T","attributes":{"price":3,"brand":"b"}}),
            &schema,
        )
        .unwrap();
        assert_eq!(p.attributes["price"], AttrValue::Number(3.0));
        assert_eq!(types["brand"], AttrType::Keyword);
        for (v, says) in [
            (
                serde_json::json!({"product":"S","attributes":{"price":"x"}}),
                "is a number",
            ),
            (
                serde_json::json!({"product":"S","images":["a"]}),
                "file parts",
            ),
            (serde_json::json!({"title":"T"}), "no \"product\""),
            (serde_json::json!({"product":""}), "empty product id"),
        ] {
            let e = read_product(v.clone(), &schema).unwrap_err();
            assert!(e.contains(says), "{v}: {e}");
        }
    }
}
