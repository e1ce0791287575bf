//! How long a catalogue re-import takes when only texts and attributes changed: the case a
//! merchant runs every night. A collection of `--products` fixture products (1-3 images each,
//! as `tests/common/catalogue.rs` makes them) is written straight into the embedded store (the
//! images on disk, their records as an earlier import left them), then a catalogue with every
//! price and every tenth title changed is imported through [`Engine::import_file`] with
//! [`NoModels`]: any model call would fail, so the run proves nothing is embedded.
//!
//! ```sh
//! cargo run --release --example import_speed -- --products 100000 --dir /tmp/import-speed
//! ```
//!
//! The images and the collection are made once into `--dir` and reused by later runs with the
//! same `--products` (each run imports the same changed catalogue into a fresh copy of the
//! records).

#[path = "../tests/common/catalogue.rs"]
mod catalogue;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use blipsearch::engine::models::NoModels;
use blipsearch::engine::{Engine, IngestOptions, Silent};
use blipsearch::index::{
    content_hash, AttrValue, Caption, CaptionSource, Collection, CollectionInfo, HnswParams,
    ImageRecord, Product, Store,
};

/// Tiny vectors: the store's work is what is measured, not the vector index's.
const DIM: usize = 8;

fn product_of(p: &catalogue::FixtureProduct) -> Product {
    Product {
        id: p.id.clone(),
        title: Some(p.title.clone()),
        description: Some(p.description.clone()),
        attributes: [
            ("brand", AttrValue::Text(p.brand.clone())),
            ("color", AttrValue::Text(p.color.clone())),
            ("price", AttrValue::Number(p.price)),
            ("category", AttrValue::Text(p.category.clone())),
            ("in_stock", AttrValue::Bool(p.in_stock)),
            ("released", AttrValue::Text(p.released.clone())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    }
}

/// The collection as an earlier import of `products` left it, written into `index`.
fn build(index: &Path, shop: &Path, products: &[catalogue::FixtureProduct]) -> anyhow::Result<()> {
    let info = CollectionInfo::new("import-speed", None, DIM, 1, 1);
    let mut store = Collection::open(index, &info, HnswParams::default())?;
    let mut n = 0u64;
    for p in products {
        let product = product_of(p);
        for rel in &p.images {
            let path = std::fs::canonicalize(shop.join(rel))?;
            let bytes = std::fs::read(&path)?;
            let meta = std::fs::metadata(&path)?;
            let mtime = meta
                .modified()?
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs() as i64;
            let hash = content_hash(&bytes);
            let id = store.allocate_id(&hash)?;
            n += 1;
            let mut itc = vec![0f32; DIM];
            itc[(n as usize) % DIM] = 1.0;
            store.insert(ImageRecord {
                id,
                path: path.display().to_string(),
                content_hash: hash,
                size_bytes: meta.len(),
                width: 32,
                height: 32,
                mtime_unix: mtime,
                exif_date: None,
                itc,
                captions: vec![
                    Caption {
                        text: p.title.clone(),
                        source: CaptionSource::Title,
                        p_match: None,
                        kept: true,
                    },
                    Caption {
                        text: p.description.clone(),
                        source: CaptionSource::Description,
                        p_match: None,
                        kept: true,
                    },
                ],
                given_texts: Vec::new(),
                // Indexed after the file was written: trusted by size and mtime.
                added_unix: mtime + 1,
                product: Some(product.clone()),
                pdq: None,
                flags: Vec::new(),
            })?;
        }
    }
    let mut schema = blipsearch::index::Schema::new();
    for p in products.iter().take(1) {
        for (k, v) in &product_of(p).attributes {
            schema.insert(k.clone(), v.inferred_type());
        }
    }
    store.extend_schema(&schema)?;
    store.commit()?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `RUST_LOG=blipsearch=debug` shows the import's phases.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut n = 100_000usize;
    let mut dir = PathBuf::from("/tmp/import-speed");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--products" => n = args.next().context("--products N")?.parse()?,
            "--dir" => dir = PathBuf::from(args.next().context("--dir DIR")?),
            other => bail!("unknown argument {other}"),
        }
    }
    let shop = dir.join(format!("shop-{n}"));
    let pristine = dir.join(format!("index-{n}"));
    let mut products = catalogue::products(n);
    if !pristine.exists() {
        let t = Instant::now();
        catalogue::write_images(&shop, &products);
        build(&pristine, &shop, &products)?;
        println!(
            "built {} products, {} images in {:.1} s",
            n,
            products.iter().map(|p| p.images.len()).sum::<usize>(),
            t.elapsed().as_secs_f64()
        );
    }
    // Every price changes, and every tenth title.
    for (i, p) in products.iter_mut().enumerate() {
        p.price += 1.0;
        if i % 10 == 0 {
            p.title.push_str(" (new)");
        }
    }
    let file = catalogue::write_file(&shop, &products, catalogue::Format::JsonLines, false).file;
    let index = dir.join(format!("index-{n}-run"));
    if index.exists() {
        std::fs::remove_dir_all(&index)?;
    }
    copy_dir(&pristine, &index)?;
    let engine = Engine::open_existing(&index)?;
    let options = IngestOptions {
        capfilt: None,
        ..Default::default()
    };
    let t = Instant::now();
    let s = engine.import_file(&NoModels, options, &file, None, false, &Silent)?;
    let took = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let read = blipsearch::engine::Catalogue::read(&file, None, &engine.info()?.attributes)?;
    println!(
        "(of which reading the catalogue: {:.2} s, {} products)",
        t.elapsed().as_secs_f64(),
        read.products.len()
    );
    println!(
        "re-import of {n} products with changed attributes: {took:.2} s \
         (products updated {}, unchanged {}; images updated {}, embedded {}, unchanged {}; \
         malformed {}, failed {})",
        s.products_updated,
        s.products_unchanged,
        s.images_updated,
        s.images_embedded,
        s.images_unchanged,
        s.malformed.len(),
        s.failed.len()
    );
    if s.images_embedded > 0 || s.products_updated != n {
        bail!("expected every product updated and nothing embedded: {s:?}");
    }
    Ok(())
}
