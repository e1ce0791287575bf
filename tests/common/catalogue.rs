//! An e-commerce fixture catalogue: products with 1-3 small synthetic PNG images each (every
//! image distinct: a colour of its product, a stripe per image, seeded noise), the attributes
//! brand, color, price, category, in_stock and released, and, when asked, a few malformed
//! lines. The tests use it as a library; `examples/make_catalogue.rs` includes this file to
//! write one from the command line. Everything is a function of the product's index, so a
//! test can count facets by hand from [`product`].
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The catalogue's file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object a line (`catalogue.jsonl`).
    JsonLines,
    /// One image a row (`catalogue.csv`).
    Csv,
}

/// Brands, in turn.
pub const BRANDS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];
/// Colours, in turn (with RGB for the images).
pub const COLORS: [(&str, [u8; 3]); 5] = [
    ("red", [200, 30, 30]),
    ("blue", [30, 60, 200]),
    ("green", [30, 160, 60]),
    ("black", [20, 20, 20]),
    ("white", [235, 235, 235]),
];
/// Categories, in turn.
pub const CATEGORIES: [&str; 4] = [
    "shoes/running",
    "shoes/hiking",
    "bags/backpacks",
    "apparel/shirts",
];

/// One product of the fixture.
#[derive(Debug, Clone, PartialEq)]
pub struct FixtureProduct {
    /// `SKU-00001`.
    pub id: String,
    /// The title.
    pub title: String,
    /// The description.
    pub description: String,
    /// A keyword.
    pub brand: String,
    /// A keyword.
    pub color: String,
    /// A number.
    pub price: f64,
    /// A keyword with a `/` hierarchy.
    pub category: String,
    /// A bool.
    pub in_stock: bool,
    /// A date, `YYYY-MM-DD`.
    pub released: String,
    /// Its images, relative to the catalogue's folder.
    pub images: Vec<String>,
}

/// Product `i` (0-based): its attributes cycle through the tables above at different rates.
pub fn product(i: usize) -> FixtureProduct {
    let brand = BRANDS[i % BRANDS.len()];
    let (color, _) = COLORS[i % COLORS.len()];
    let category = CATEGORIES[(i / 2) % CATEGORIES.len()];
    let kind = category.rsplit('/').next().unwrap_or(category);
    let id = format!("SKU-{:05}", i + 1);
    let images = (1..=1 + i % 3)
        .map(|k| format!("images/{}-{k}.png", id.to_lowercase()))
        .collect();
    FixtureProduct {
        title: format!("{brand} {color} {kind} {}", i + 1),
        description: format!("A {color} item for {kind} by {brand}, model {}.", i + 1),
        brand: brand.to_string(),
        color: color.to_string(),
        // Cents, exactly: 9.99, 17.49, ... up to about 150.
        price: ((999 + (i * 750) % 14_000) as f64) / 100.0,
        category: category.to_string(),
        in_stock: i % 3 != 2,
        released: format!("2024-{:02}-{:02}", 1 + i % 12, 1 + i % 28),
        id,
        images,
    }
}

/// The first `n` products.
pub fn products(n: usize) -> Vec<FixtureProduct> {
    (0..n).map(product).collect()
}

/// What [`write_catalogue`] wrote.
#[derive(Debug, Clone)]
pub struct FixtureCatalogue {
    /// The catalogue file.
    pub file: PathBuf,
    /// Its products, as written.
    pub products: Vec<FixtureProduct>,
    /// The line numbers of its malformed lines.
    pub malformed_lines: Vec<usize>,
}

impl FixtureCatalogue {
    /// Images the products list.
    pub fn images(&self) -> usize {
        self.products.iter().map(|p| p.images.len()).sum()
    }
}

/// Writes the images of `products` under `dir` (as their relative paths say), and the
/// catalogue `dir/catalogue.jsonl` or `dir/catalogue.csv` listing them, with a few malformed
/// lines among them when `malformed`.
pub fn write_catalogue(
    dir: &Path,
    products: &[FixtureProduct],
    format: Format,
    malformed: bool,
) -> FixtureCatalogue {
    write_images(dir, products);
    write_file(dir, products, format, malformed)
}

/// Writes the images of `products` under `dir`.
pub fn write_images(dir: &Path, products: &[FixtureProduct]) {
    for (i, p) in products.iter().enumerate() {
        for (k, rel) in p.images.iter().enumerate() {
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            image_of(&p.color, i, k).save(&path).unwrap();
        }
    }
}

/// A 32x32 image of the `k`-th image of product `i` in `color`: distinct for every (i, k).
pub fn image_of(color: &str, i: usize, k: usize) -> image::RgbImage {
    let rgb = COLORS
        .iter()
        .find(|(c, _)| *c == color)
        .map_or([128, 128, 128], |(_, rgb)| *rgb);
    let mut state = (i as u32).wrapping_mul(2_654_435_761) ^ (k as u32 + 1).wrapping_mul(40_503);
    state |= 1;
    let stripe = (4 + 9 * k as u32) % 28;
    image::RgbImage::from_fn(32, 32, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state % 24) as u8;
        if (stripe..stripe + 4).contains(&y) {
            image::Rgb([255 - noise, 255 - noise, 255 - noise])
        } else if x < 4 && y < 4 {
            // Bits of the index, so that no two images are alike whatever the noise does.
            let bit = ((i * 3 + k) >> (y * 4 + x)) & 1;
            image::Rgb([bit as u8 * 255, 0, 0])
        } else {
            image::Rgb([
                rgb[0].saturating_add(noise),
                rgb[1].saturating_add(noise),
                rgb[2].saturating_add(noise),
            ])
        }
    })
}

/// Writes only the catalogue file for `products` (their images as they are).
pub fn write_file(
    dir: &Path,
    products: &[FixtureProduct],
    format: Format,
    malformed: bool,
) -> FixtureCatalogue {
    std::fs::create_dir_all(dir).unwrap();
    let (text, malformed_lines) = match format {
        Format::JsonLines => json_lines(products, malformed),
        Format::Csv => csv(products, malformed),
    };
    let file = dir.join(match format {
        Format::JsonLines => "catalogue.jsonl",
        Format::Csv => "catalogue.csv",
    });
    std::fs::write(&file, text).unwrap();
    FixtureCatalogue {
        file,
        products: products.to_vec(),
        malformed_lines,
    }
}

/// The JSON line of `p`.
pub fn json_line(p: &FixtureProduct) -> String {
    serde_json::json!({
        "product": p.id,
        "images": p.images,
        "title": p.title,
        "description": p.description,
        "attributes": {
            "brand": p.brand,
            "color": p.color,
            "price": p.price,
            "category": p.category,
            "in_stock": p.in_stock,
            "released": p.released,
        },
    })
    .to_string()
}

/// The malformed JSON lines: not JSON (no product can be read), no images, a bad attribute
/// name, a conflicting type (price is a number).
pub const MALFORMED_JSON: [&str; 4] = [
    r#"{"product": "BROKEN-1", "images": ["#,
    r#"{"product": "NOIMAGES-1", "title": "a product without images"}"#,
    r#"{"product": "BADNAME-1", "images": ["images/badname.png"], "attributes": {"in stock": true}}"#,
    r#"{"product": "CONFLICT-1", "images": ["images/conflict.png"], "attributes": {"price": "cheap"}}"#,
];

fn json_lines(products: &[FixtureProduct], malformed: bool) -> (String, Vec<usize>) {
    let mut out = String::new();
    let mut bad = Vec::new();
    let mut line = 0;
    let mut extra = MALFORMED_JSON.iter();
    for (i, p) in products.iter().enumerate() {
        line += 1;
        writeln!(out, "{}", json_line(p)).unwrap();
        // One malformed line after every other product (the first is always good, so that
        // the conflict has a type to conflict with).
        if malformed && i % 2 == 0 {
            if let Some(m) = extra.next() {
                line += 1;
                writeln!(out, "{m}").unwrap();
                bad.push(line);
            }
        }
    }
    if malformed {
        for m in extra {
            line += 1;
            writeln!(out, "{m}").unwrap();
            bad.push(line);
        }
    }
    (out, bad)
}

/// A CSV field, quoted when it needs to be.
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The malformed CSV rows: too few fields, a conflicting type (price is a number), no product.
pub const MALFORMED_CSV: [&str; 3] = [
    "SHORT-1,images/short.png",
    "CONFLICT-1,images/conflict.png,Cheap thing,,acme,red,cheap,shoes/running,true,2024-01-01",
    ",images/noproduct.png,No product,,acme,red,5,shoes/running,true,2024-01-01",
];

fn csv(products: &[FixtureProduct], malformed: bool) -> (String, Vec<usize>) {
    let mut out = String::from(
        "product,image,title,description,brand,color,price,category,in_stock,released\n",
    );
    let mut line = 1;
    let mut bad = Vec::new();
    let mut extra = MALFORMED_CSV.iter();
    for (i, p) in products.iter().enumerate() {
        for (k, img) in p.images.iter().enumerate() {
            line += 1;
            // The first row of a product carries everything; later rows only their image.
            if k == 0 {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{}",
                    field(&p.id),
                    field(img),
                    field(&p.title),
                    field(&p.description),
                    field(&p.brand),
                    field(&p.color),
                    p.price,
                    field(&p.category),
                    p.in_stock,
                    p.released
                )
                .unwrap();
            } else {
                writeln!(out, "{},{},,,,,,,,", field(&p.id), field(img)).unwrap();
            }
        }
        if malformed && i % 2 == 0 {
            if let Some(m) = extra.next() {
                line += 1;
                writeln!(out, "{m}").unwrap();
                bad.push(line);
            }
        }
    }
    if malformed {
        for m in extra {
            line += 1;
            writeln!(out, "{m}").unwrap();
            bad.push(line);
        }
    }
    (out, bad)
}
