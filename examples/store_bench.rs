//! The record stores alone, side by side in one run: the embedded store and Milvus (when
//! `--milvus` names one), each filled with the same `--n` synthetic images (random unit 256-d
//! ITC vectors, six-word captions) through the `Store` trait as the engine does (batches of 8,
//! `add`'s default: allocate their ids, insert them, commit every `--commit-every` images, 64 by
//! default as in `add`), then queried: vector top-100, BM25 top-100, and vector top-100
//! with a path filter that passes 10%. Queries interleave across the stores so that both see the
//! same machine conditions. Prints one table: ingest rate (overall, and over the last tenth, at
//! the collection's full size) and the p50/p99 of each query.
//!
//! ```sh
//! target/milvus-venv/bin/milvus-lite server --data-dir /tmp/mv --host 127.0.0.1 --port 19530 &
//! cargo run --release --example store_bench -- --n 10000 --queries 300 \
//!     --milvus milvus://127.0.0.1:19530/bench_10k
//! ```
//!
//! Each run starts from empty stores (`--index` is removed first, the Milvus collection
//! dropped), except that `--reuse` keeps an embedded store that already holds `--n` images (its
//! ingest columns then say so). `--preload P` writes the first `P` images in batches of 1000
//! (the "bulk" column) and times ingest over the rest only: the rate at size, without waiting
//! for a slow store to be filled one small batch at a time.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use blipsearch::index::{
    content_hash, Caption, CaptionSource, Collection, CollectionInfo, Filter, HnswParams,
    ImageRecord, MilvusAddress, MilvusStore, Store,
};

const DIM: usize = 256;
const VOCAB: [&str; 16] = [
    "cat", "dog", "rug", "sofa", "coffee", "cup", "table", "rocket", "sky", "horse", "moon",
    "wall", "beach", "tree", "boat", "city",
];
const QUERIES: [&str; 6] = [
    "a cat on a rug",
    "coffee cup on a table",
    "rocket in the sky",
    "a horse near a tree",
    "boat at the beach",
    "the moon over the city",
];

#[path = "common/gen.rs"]
mod gen;
use gen::Gen;

fn record(i: u64, g: &mut Gen) -> ImageRecord {
    let w: Vec<&str> = (0..6).map(|_| VOCAB[(g.next() % 16) as usize]).collect();
    ImageRecord {
        id: blipsearch::index::ImageId(u64::MAX),
        // One image in ten is under /lib/ten/: the filtered query's 10%.
        path: format!(
            "/lib/{}/img_{i:07}.jpg",
            if i.is_multiple_of(10) { "ten" } else { "rest" }
        ),
        content_hash: content_hash(&i.to_le_bytes()),
        size_bytes: 200_000,
        width: 1024,
        height: 768,
        mtime_unix: 1_700_000_000,
        exif_date: Some("2020:05:10 12:00:00".into()),
        itc: g.unit(DIM),
        captions: vec![Caption {
            text: format!(
                "a {} and a {} by the {} {} {} {}",
                w[0], w[1], w[2], w[3], w[4], w[5]
            ),
            source: CaptionSource::Beam,
            p_match: Some(0.8),
            kept: true,
        }],
        given_texts: vec![],
        added_unix: 1_700_000_000,
        product: None,
        pdq: None,
        flags: Vec::new(),
    }
}

/// Images per write, as `add` batches them by default.
const BATCH: u64 = 8;

/// Fills `s` with `n` images as the engine does, committing every `every`, after writing the
/// first `preload` in batches of 1000; returns (bulk images/s, images/s of the rest, images/s
/// over the last tenth).
fn fill(
    name: &str,
    s: &mut dyn Store,
    n: u64,
    every: u64,
    preload: u64,
) -> anyhow::Result<(f64, f64, f64)> {
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let mut write = |s: &mut dyn Store, from: u64, to: u64| -> anyhow::Result<()> {
        let mut batch: Vec<ImageRecord> = (from..to).map(|i| record(i, &mut g)).collect();
        let hashes: Vec<&str> = batch.iter().map(|r| r.content_hash.as_str()).collect();
        let ids = s.allocate_ids(&hashes)?;
        for (r, id) in batch.iter_mut().zip(ids) {
            r.id = id;
        }
        s.insert_all(batch)?;
        Ok(())
    };
    let bulk_start = Instant::now();
    for first in (0..preload).step_by(1000) {
        write(s, first, (first + 1000).min(preload))?;
        s.commit()?;
    }
    let bulk = preload as f64 / bulk_start.elapsed().as_secs_f64().max(1e-9);
    let started = Instant::now();
    let tail_from = (n - (n - preload) / 10) / BATCH * BATCH;
    let mut tail_start = started;
    let mut since_commit = 0;
    for first in (preload..n).step_by(BATCH as usize) {
        if first == tail_from {
            tail_start = Instant::now();
        }
        let to = (first + BATCH).min(n);
        write(s, first, to)?;
        since_commit += to - first;
        if since_commit >= every {
            s.commit()?;
            since_commit = 0;
        }
        if to.is_multiple_of(10_000) {
            eprintln!(
                "{name}: {to}/{n} in {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    s.commit()?;
    let all = (n - preload) as f64 / started.elapsed().as_secs_f64();
    let tail = (n - tail_from) as f64 / tail_start.elapsed().as_secs_f64();
    Ok((bulk, all, tail))
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

fn main() -> anyhow::Result<()> {
    let n: u64 = arg("--n")?.unwrap_or(10_000);
    let runs: usize = arg("--queries")?.unwrap_or(300);
    let every: u64 = arg("--commit-every")?.unwrap_or(64).max(1);
    let preload: u64 = arg::<u64>("--preload")?.unwrap_or(0).min(n);
    let reuse = std::env::args().any(|a| a == "--reuse");
    let dir: PathBuf =
        arg("--index")?.unwrap_or_else(|| PathBuf::from(format!("target/bench-store-{n}")));
    let milvus: Option<String> = arg("--milvus")?;
    let info = CollectionInfo::new("bench/synthetic", None, DIM, 577, 768);

    let mut stores: Vec<(&str, Box<dyn Store>)> = Vec::new();
    let mut filled = vec![false];
    if reuse && Collection::exists(&dir) {
        let c = Collection::open_existing(&dir, HnswParams::default())?;
        anyhow::ensure!(c.len()? == n, "{} does not hold {n} images", dir.display());
        filled[0] = true;
        stores.push(("embedded", Box::new(c)));
    } else {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        stores.push((
            "embedded",
            Box::new(Collection::open(&dir, &info, HnswParams::default())?),
        ));
    }
    if let Some(a) = &milvus {
        let address: MilvusAddress = a.parse()?;
        MilvusStore::drop_collection(&address)?;
        stores.push(("milvus", Box::new(MilvusStore::open(&address, &info)?)));
        filled.push(false);
    }
    let mut ingest = Vec::new();
    for ((name, s), done) in stores.iter_mut().zip(&filled) {
        ingest.push(match done {
            true => None,
            false => Some(fill(name, &mut **s, n, every, preload)?),
        });
    }

    let ten = Filter {
        path_prefix: Some("/lib/ten/".into()),
        ..Default::default()
    };
    let kinds = ["vector", "bm25", "vector 10%"];
    let mut g = Gen(42);
    let mut times = vec![vec![Vec::new(); kinds.len()]; stores.len()];
    for i in 0..runs + 5 {
        let v = g.unit(DIM);
        let q = QUERIES[i % QUERIES.len()];
        for (si, (_, s)) in stores.iter().enumerate() {
            for (ki, kind) in kinds.iter().enumerate() {
                let t = Instant::now();
                let hits = match *kind {
                    "vector" => s.vector_search(&v, 100, None, &Filter::default())?,
                    "bm25" => s.text_search(q, 100, &Filter::default())?,
                    _ => s.vector_search(&v, 100, None, &ten)?,
                };
                let ms = t.elapsed().as_secs_f64() * 1e3;
                assert_eq!(hits.len(), 100, "{kind}");
                // The first few are warm-up.
                if i >= 5 {
                    times[si][ki].push(ms);
                }
            }
        }
    }
    println!(
        "{n} images of {DIM}-d ({preload} preloaded in batches of 1000), batches of {BATCH}, \
         commit every {every}, {runs} queries each (top 100), interleaved"
    );
    println!(
        "{:<9} {:>9} {:>10} {:>11} {:>19} {:>19} {:>19}",
        "store",
        "bulk /s",
        "ingest /s",
        "at size /s",
        "vector p50/p99",
        "bm25 p50/p99",
        "vector 10% p50/p99"
    );
    for (si, (name, _)) in stores.iter().enumerate() {
        let cell = |ki: usize| {
            let t = &mut times[si][ki].clone();
            format!("{:.2} / {:.2} ms", pct(t, 0.5), pct(t, 0.99))
        };
        let rates = match ingest[si] {
            Some((bulk, all, tail)) => format!("{bulk:>9.0} {all:>10.0} {tail:>11.0}"),
            None => format!("{:>9} {:>10} {:>11}", "-", "reused", "-"),
        };
        println!(
            "{name:<9} {rates} {:>19} {:>19} {:>19}",
            cell(0),
            cell(1),
            cell(2)
        );
    }
    Ok(())
}
