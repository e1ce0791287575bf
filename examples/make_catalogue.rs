//! Writes the e-commerce fixture catalogue the tests use (`tests/common/catalogue.rs`):
//! products with 1-3 small synthetic PNG images each, the attributes brand, color, price,
//! category, in_stock and released, and a few malformed lines (left out with
//! `--no-malformed`).
//!
//! ```sh
//! cargo run --example make_catalogue -- /tmp/shop --products 200          # catalogue.jsonl
//! cargo run --example make_catalogue -- /tmp/shop --products 200 --csv    # catalogue.csv
//! blipsearch import /tmp/shop/catalogue.jsonl --index /tmp/shop-index --no-captions
//! ```

#[path = "../tests/common/catalogue.rs"]
mod catalogue;

use std::path::PathBuf;

use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let mut out: Option<PathBuf> = None;
    let mut products = 100usize;
    let mut format = catalogue::Format::JsonLines;
    let mut malformed = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--products" => {
                products = args
                    .next()
                    .context("--products needs a number")?
                    .parse()
                    .context("--products needs a number")?;
            }
            "--csv" => format = catalogue::Format::Csv,
            "--no-malformed" => malformed = false,
            "-h" | "--help" => {
                println!(
                    "make_catalogue OUT_DIR [--products N] [--csv] [--no-malformed]: writes \
                     OUT_DIR/catalogue.jsonl (or .csv) and OUT_DIR/images/"
                );
                return Ok(());
            }
            flag if flag.starts_with('-') => bail!("unknown option {flag}"),
            dir => {
                if out.replace(PathBuf::from(dir)).is_some() {
                    bail!("one output folder");
                }
            }
        }
    }
    let Some(out) = out else {
        bail!("usage: make_catalogue OUT_DIR [--products N] [--csv] [--no-malformed]");
    };
    let written =
        catalogue::write_catalogue(&out, &catalogue::products(products), format, malformed);
    println!(
        "{}: {} products, {} images, malformed lines {:?}",
        written.file.display(),
        written.products.len(),
        written.images(),
        written.malformed_lines
    );
    Ok(())
}
