//! Catalogue search on the record stores: filtered vector search against unfiltered in the same
//! run, and facet counting over a relevant set, on `--n` synthetic product images (random unit
//! 256-d ITC vectors; products of 1 to 3 images with a brand, colour, price, stock flag and
//! category). Filters pass 1% (a rare brand), 10% (a colour) and 50% (in stock) of the images;
//! each is timed twice per query: as a new filter (the store's cached selection is of another
//! filter, so it is evaluated on the columns) and repeated (the same filter again, as the two
//! searches of a hybrid query and the pages of one result list ask). Facets: the products of
//! the top 1000 of a vector search read in one `Store::products_of` call and five facets counted
//! (`count_facets`), timed apart and together. The engine rows run `Engine::search_similar` end
//! to end (records read, facets, grouping). Queries interleave across rows so that every row
//! sees the same machine conditions; the table gives each row's p50 and p99 and its p50 over
//! the p50 of its block's first row.
//!
//! ```sh
//! cargo run --release --example catalogue_bench -- --n 100000 --queries 300
//! target/milvus-venv/bin/milvus-lite server --data-dir /tmp/mv --host 127.0.0.1 --port 19530 &
//! cargo run --release --example catalogue_bench -- --n 10000 \
//!     --milvus milvus://127.0.0.1:19530/catalogue_10k
//! ```
//!
//! The embedded collection is generated once into `--index` (default
//! `target/bench-catalogue-N`) and reused by later runs with the same `--n`; a Milvus collection
//! named by `--milvus` is dropped and filled again on every run.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use blipsearch::engine::facets::{count_facets, FacetRequest, GroupBy};
use blipsearch::engine::models::NoModels;
use blipsearch::engine::search::{SearchMode, SearchParams};
use blipsearch::engine::Engine;
use blipsearch::index::{
    content_hash, AttrFilter, AttrType, AttrValue, Caption, CaptionSource, Collection,
    CollectionInfo, Filter, HnswParams, ImageId, ImageRecord, MilvusAddress, MilvusStore, Product,
    Schema, Store,
};

const DIM: usize = 256;
const BRANDS: usize = 40;
const COLORS: [&str; 4] = ["blue", "green", "black", "white"];
const CATEGORIES: [&str; 5] = [
    "shoes/running",
    "shoes/trail",
    "bags/backpacks",
    "hats",
    "socks",
];
/// The facets counted: every attribute, the price in automatic buckets.
const FACETS: &str = "brand,color,price,in_stock,category";

#[path = "common/gen.rs"]
mod gen;
use gen::Gen;

fn schema() -> Schema {
    Schema::from([
        ("brand".to_string(), AttrType::Keyword),
        ("color".to_string(), AttrType::Keyword),
        ("price".to_string(), AttrType::Number),
        ("in_stock".to_string(), AttrType::Bool),
        ("category".to_string(), AttrType::Keyword),
    ])
}

/// Product `p`. Its attributes depend on `p` alone and its image count on the generator, so a
/// share of products is the same share of images: brands `rare_a` and `rare_b` 1% each,
/// colours `red` and `navy` 10% each, in stock 50%.
fn product(p: u64) -> Product {
    let brand = match p % 100 {
        7 => "rare_a".to_string(),
        57 => "rare_b".to_string(),
        _ => format!("brand{:02}", p % BRANDS as u64),
    };
    let color = match p % 10 {
        3 => "red",
        8 => "navy",
        _ => COLORS[(p / 10 % 4) as usize],
    };
    let attributes = [
        ("brand", AttrValue::Text(brand)),
        ("color", AttrValue::Text(color.into())),
        (
            "price",
            AttrValue::Number((p * 7919 % 20_000) as f64 / 100.0),
        ),
        ("in_stock", AttrValue::Bool(p.is_multiple_of(2))),
        (
            "category",
            AttrValue::Text(CATEGORIES[(p / 3 % 5) as usize].into()),
        ),
    ];
    Product {
        id: format!("SKU-{p:07}"),
        title: Some(format!("{color} product {p}")),
        description: None,
        attributes: attributes
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    }
}

/// The `n` images, in order: products of 1 to 3 images.
fn records(n: u64) -> impl Iterator<Item = ImageRecord> {
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let (mut p, mut left, mut prod) = (0u64, 0u64, product(0));
    (0..n).map(move |i| {
        if left == 0 {
            prod = product(p);
            p += 1;
            left = 1 + g.next() % 3;
        }
        left -= 1;
        ImageRecord {
            id: ImageId(u64::MAX),
            path: format!("/shop/img_{i:07}.jpg"),
            content_hash: content_hash(&i.to_le_bytes()),
            size_bytes: 200_000,
            width: 1024,
            height: 1024,
            mtime_unix: 1_700_000_000,
            exif_date: None,
            itc: g.unit(DIM),
            captions: vec![Caption {
                text: "a product photo".into(),
                source: CaptionSource::Beam,
                p_match: Some(0.8),
                kept: true,
            }],
            given_texts: vec![],
            added_unix: 1_700_000_000,
            product: Some(prod.clone()),
            pdq: None,
            flags: Vec::new(),
        }
    })
}

/// Writes the `n` images into `s` in batches of 1000, committing every 10 000.
fn fill(name: &str, s: &mut dyn Store, n: u64) -> anyhow::Result<()> {
    s.extend_schema(&schema())?;
    let started = Instant::now();
    let mut all = records(n);
    let mut done = 0;
    loop {
        let mut batch: Vec<ImageRecord> = all.by_ref().take(1000).collect();
        if batch.is_empty() {
            break;
        }
        let hashes: Vec<&str> = batch.iter().map(|r| r.content_hash.as_str()).collect();
        let ids = s.allocate_ids(&hashes)?;
        for (r, id) in batch.iter_mut().zip(ids) {
            r.id = id;
        }
        done += batch.len();
        s.insert_all(batch)?;
        if done % 10_000 == 0 || done as u64 == n {
            s.commit()?;
            eprintln!(
                "{name}: {done}/{n} in {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn arg<T: std::str::FromStr>(name: &str) -> anyhow::Result<Option<T>> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .map(Some)
            .with_context(|| format!("{name} takes a value")),
    }
}

/// Times of one row, and the hits it returned.
#[derive(Default, Clone)]
struct Row {
    ms: Vec<f64>,
    hits: usize,
}

impl Row {
    fn time<T>(&mut self, f: impl FnOnce() -> anyhow::Result<(T, usize)>) -> anyhow::Result<T> {
        let t = Instant::now();
        let (out, hits) = f()?;
        self.ms.push(t.elapsed().as_secs_f64() * 1e3);
        self.hits += hits;
        Ok(out)
    }
}

/// The filter rows: label, and the two filters of the same share it alternates between (so
/// that a "new filter" search never finds its selection cached).
fn filters() -> anyhow::Result<Vec<(&'static str, [Filter; 2])>> {
    let f = |s: &str| -> anyhow::Result<Filter> {
        Ok(Filter {
            attributes: vec![AttrFilter::parse(s, &schema())?],
            ..Filter::default()
        })
    };
    Ok(vec![
        ("brand 1%", [f("brand:rare_a")?, f("brand:rare_b")?]),
        ("color 10%", [f("color:red")?, f("color:navy")?]),
        ("in_stock 50%", [f("in_stock:true")?, f("in_stock:false")?]),
    ])
}

/// The store rows over `s`: labels and times.
fn bench_store(s: &dyn Store, runs: usize) -> anyhow::Result<Vec<(String, Row)>> {
    let rows = filters()?;
    let facets = FacetRequest::parse_list(FACETS, &schema())?;
    let mut labels = vec!["vector top-100, unfiltered".to_string()];
    for (l, _) in &rows {
        labels.push(format!("{l}, new filter"));
        labels.push(format!("{l}, repeated"));
    }
    labels.push("facets top-1000: products_of".into());
    labels.push("facets top-1000: 5 counts".into());
    labels.push("facets top-1000: both".into());
    let mut out: Vec<Row> = vec![Row::default(); labels.len()];
    let mut g = Gen(42);
    let warmup = 5;
    for i in 0..runs + warmup {
        let mut row = 0;
        let mut next = |out: &mut Vec<Row>| {
            let r = row;
            row += 1;
            if i == warmup {
                out[r] = Row::default();
            }
            r
        };
        let v = g.unit(DIM);
        let r = next(&mut out);
        out[r].time(|| {
            let h = s.vector_search(&v, 100, None, &Filter::default())?;
            Ok(((), h.len()))
        })?;
        for (_, variants) in &rows {
            let f = &variants[i % 2];
            let r = next(&mut out);
            out[r].time(|| {
                let h = s.vector_search(&v, 100, None, f)?;
                Ok(((), h.len()))
            })?;
            let v2 = g.unit(DIM);
            let r = next(&mut out);
            out[r].time(|| {
                let h = s.vector_search(&v2, 100, None, f)?;
                Ok(((), h.len()))
            })?;
        }
        let top: Vec<ImageId> = s
            .vector_search(&v, 1000, None, &Filter::default())?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        // The products read once, then counted: the two parts of the engine's facet step.
        let t = Instant::now();
        let products = s.products_of(&top)?;
        let read = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let set: Vec<Option<&Product>> = products.iter().map(Option::as_ref).collect();
        let counts = count_facets(&facets, &set);
        let counted = t.elapsed().as_secs_f64() * 1e3;
        for (ms, n) in [
            (read, products.iter().filter(|p| p.is_some()).count()),
            (counted, counts.iter().map(|c| c.values.len()).sum()),
            (read + counted, counts.len()),
        ] {
            let r = next(&mut out);
            out[r].ms.push(ms);
            out[r].hits += n;
        }
    }
    Ok(labels.into_iter().zip(out).collect())
}

/// The engine rows: `search_similar` end to end.
fn bench_engine(e: &Engine, n: u64, runs: usize) -> anyhow::Result<Vec<(String, Row)>> {
    let facets = e.parse_facets(FACETS)?;
    let one = filters()?.remove(0).1;
    let cases: Vec<(&str, SearchParams)> = vec![
        (
            "engine: similar k=100",
            SearchParams {
                mode: SearchMode::Vector,
                ..SearchParams::default()
            },
        ),
        (
            "engine: similar k=100, brand 1%",
            SearchParams {
                mode: SearchMode::Vector,
                filter: one[0].clone(),
                ..SearchParams::default()
            },
        ),
        (
            "engine: similar k=1000 + 5 facets",
            SearchParams {
                mode: SearchMode::Vector,
                k: 1000,
                facets: facets.clone(),
                ..SearchParams::default()
            },
        ),
        (
            "engine: similar k=250 x4 grouped + facets",
            SearchParams {
                mode: SearchMode::Vector,
                k: 250,
                facets,
                group_by: Some(GroupBy::Product),
                ..SearchParams::default()
            },
        ),
    ];
    let mut out = vec![Row::default(); cases.len()];
    let mut g = Gen(7);
    for i in 0..runs + 5 {
        let id = ImageId(g.next() % n);
        for (r, (_, p)) in cases.iter().enumerate() {
            if i == 5 {
                out[r] = Row::default();
            }
            out[r].time(|| {
                let res = e.search_similar(&NoModels, id, p)?;
                Ok(((), res.hits.len()))
            })?;
        }
    }
    Ok(cases
        .into_iter()
        .map(|(l, _)| l.to_string())
        .zip(out)
        .collect())
}

/// Prints rows as markdown table lines; the ratio is to the block's first row (searches only).
fn print(store: &str, rows: &mut [(String, Row)], runs: usize) {
    let base = pct(&mut rows[0].1.ms.clone(), 0.5);
    for (label, row) in rows.iter_mut() {
        let (p50, p99) = (pct(&mut row.ms, 0.5), pct(&mut row.ms, 0.99));
        let ratio = match label.starts_with("facets") {
            true => "-".to_string(),
            false => format!("{:.2}x", p50 / base),
        };
        println!(
            "| {store} | {label} | {p50:.3} | {p99:.3} | {ratio} | {:.0} |",
            row.hits as f64 / runs as f64
        );
    }
}

fn main() -> anyhow::Result<()> {
    let n: u64 = arg("--n")?.unwrap_or(100_000);
    let runs: usize = arg("--queries")?.unwrap_or(300);
    let dir: PathBuf =
        arg("--index")?.unwrap_or_else(|| PathBuf::from(format!("target/bench-catalogue-{n}")));
    let milvus: Option<String> = arg("--milvus")?;
    if n < 1000 {
        bail!("--n must be at least 1000 (the facet rows read the top 1000)");
    }
    let info = CollectionInfo::new("bench/synthetic", None, DIM, 577, 768);

    let mut c = Collection::open(&dir, &info, HnswParams::default())?;
    match c.len()? {
        0 => fill("embedded", &mut c, n)?,
        have if have == n => {}
        have => bail!(
            "{} holds {have} images, not {n}: use another --index",
            dir.display()
        ),
    }
    println!(
        "{n} images of {DIM}-d in {} products of 1-3 images, {runs} queries per row, \
         interleaved; ratio: p50 over the p50 of the block's first row (unfiltered)",
        records(n)
            .map(|r| r.product.unwrap().id)
            .collect::<std::collections::HashSet<_>>()
            .len()
    );
    println!("| store | row | p50 ms | p99 ms | p50 ratio | results/query |");
    println!("|---|---|---:|---:|---:|---:|");
    let mut rows = bench_store(&c, runs)?;
    print("embedded", &mut rows, runs);
    drop(c);
    let e = Engine::open_existing(&dir)?;
    let mut rows = bench_engine(&e, n, runs)?;
    print("embedded", &mut rows, runs);
    drop(e);

    if let Some(a) = &milvus {
        let address: MilvusAddress = a.parse()?;
        MilvusStore::drop_collection(&address)?;
        let mut m = MilvusStore::open(&address, &info)?;
        fill("milvus", &mut m, n)?;
        let mut rows = bench_store(&m, runs)?;
        print("milvus", &mut rows, runs);
    }
    Ok(())
}
