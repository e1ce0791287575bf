//! Filtered search against unfiltered search on one collection, in one run: hybrid search
//! (ITC vectors + BM25, no rerank) through the engine with the synthetic-world retrieval model
//! (so the model costs little and the store's work shows), over a generated collection where
//! path-prefix filters pass 1%, 10% and 50% of the images, a size filter 10% and a date filter
//! 50%. Queries are interleaved across the rows so that every row sees the same machine
//! conditions; the table gives each row's p50 and p99 and its p50 over the unfiltered p50.
//!
//! ```sh
//! cargo run --release --example filtered_search -- --n 100000 --queries 300 --index /tmp/fs100k
//! ```
//!
//! The collection is generated once into `--index` (random unit ITC vectors, captions from a
//! small vocabulary) and reused by later runs with the same `--n`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use blipsearch::engine::models::{ModelSource, Retriever};
use blipsearch::engine::search::{SearchMode, SearchParams};
use blipsearch::engine::{Engine, Filter};
use blipsearch::index::{
    content_hash, Caption, CaptionSource, Collection, CollectionInfo, HnswParams, ImageRecord,
    Store,
};

const VOCAB: [&str; 24] = [
    "cat",
    "dog",
    "rug",
    "sofa",
    "astronaut",
    "suit",
    "coffee",
    "cup",
    "table",
    "rocket",
    "sky",
    "motorcycle",
    "coins",
    "horse",
    "moon",
    "wall",
    "brick",
    "page",
    "text",
    "beach",
    "tree",
    "boat",
    "city",
    "street",
];

const QUERIES: [&str; 10] = [
    "a cat lying on a rug",
    "an astronaut in a white suit",
    "a cup of coffee on a table",
    "a rocket launching into the sky",
    "a red motorcycle",
    "coins on a dark background",
    "a horse",
    "the surface of the moon",
    "a brick wall",
    "a page of printed text",
];

/// xorshift64*: deterministic data without an RNG dependency.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn normal(&mut self) -> f32 {
        // Sum of uniforms: close enough to Gaussian for random directions.
        (0..4)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32)
            .sum::<f32>()
            - 2.0
    }
    fn unit(&mut self, dim: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dim).map(|_| self.normal()).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }
}

/// Image `i`'s folder: nested so that each prefix below passes a fixed share.
fn folder(i: u64) -> &'static str {
    match i % 100 {
        0 => "/lib/h/t/o/",
        1..=9 => "/lib/h/t/",
        10..=49 => "/lib/h/",
        _ => "/lib/x/",
    }
}

fn build(dir: &Path, n: u64, dim: usize, model: &str) -> anyhow::Result<()> {
    let info = CollectionInfo::new(model, None, dim, 5, 8);
    let mut c = Collection::open(dir, &info, HnswParams::default())?;
    let have = c.len()?;
    if have == n {
        return Ok(());
    }
    if have != 0 {
        bail!(
            "{} holds {have} images, not {n}: use another --index",
            dir.display()
        );
    }
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let started = Instant::now();
    for i in 0..n {
        let words: Vec<&str> = (0..6).map(|_| VOCAB[(g.next() % 24) as usize]).collect();
        let hash = content_hash(&i.to_le_bytes());
        let id = c.allocate_id(&hash)?;
        c.insert(ImageRecord {
            id,
            path: format!("{}img_{i:07}.jpg", folder(i)),
            content_hash: hash,
            size_bytes: 200_000,
            width: if i % 10 == 3 { 4000 } else { 1024 },
            height: 768,
            mtime_unix: 1_700_000_000,
            exif_date: Some(format!(
                "{}:{:02}:10 12:00:00",
                if i % 2 == 0 { 2020 } else { 2018 },
                1 + i % 12
            )),
            itc: g.unit(dim),
            captions: vec![Caption {
                text: format!(
                    "a {} near a {} with a {} {} {} {}",
                    words[0], words[1], words[2], words[3], words[4], words[5]
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
        })?;
        if (i + 1) % 10_000 == 0 {
            c.commit()?;
            eprintln!(
                "built {}/{n} in {:.0} s",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    c.commit()?;
    Ok(())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn arg<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} takes a value")),
    }
}

fn main() -> anyhow::Result<()> {
    let n: u64 = arg("--n", 100_000)?;
    let runs: usize = arg("--queries", 300)?;
    let dir: PathBuf = arg(
        "--index",
        PathBuf::from(format!("target/bench-filtered-{n}")),
    )?;
    let model_dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/synth/retrieval");
    let r = Retriever::load(
        &ModelSource::Dir(model_dir.clone()),
        &candle_core::Device::Cpu,
    )?;
    build(&dir, n, r.embedding_dim(), r.name())?;
    let opening = Instant::now();
    let engine = Engine::open_existing(&dir)?;
    let opened = opening.elapsed().as_secs_f64();
    let prefix = |p: &str| Filter {
        path_prefix: Some(p.into()),
        ..Default::default()
    };
    let rows: Vec<(&str, Filter)> = vec![
        ("unfiltered", Filter::default()),
        ("path 1%", prefix("/lib/h/t/o/")),
        ("path 10%", prefix("/lib/h/t/")),
        ("path 50%", prefix("/lib/h/")),
        (
            "width 10%",
            Filter {
                min_width: Some(2000),
                ..Default::default()
            },
        ),
        (
            "date 50%",
            Filter {
                date_from: Some("2020-01-01".into()),
                ..Default::default()
            },
        ),
    ];
    let params = |f: &Filter| SearchParams {
        mode: SearchMode::Hybrid,
        rerank_k: Some(0),
        filter: f.clone(),
        ..Default::default()
    };
    for (_, f) in &rows {
        engine.search_text(&r, QUERIES[0], &params(f))?; // warm-up
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
    let mut hits: Vec<usize> = vec![0; rows.len()];
    for i in 0..runs {
        let q = QUERIES[i % QUERIES.len()];
        for (row, (_, f)) in rows.iter().enumerate() {
            let p = params(f);
            let t = Instant::now();
            let res = engine.search_text(&r, q, &p)?;
            times[row].push(t.elapsed().as_secs_f64() * 1e3);
            hits[row] += res.hits.len();
        }
    }
    println!(
        "{} images (opened in {opened:.2} s), {runs} queries per row, hybrid k=100 limit=20 \
         rerank 0, model {}",
        engine.len()?,
        model_dir.display()
    );
    println!(
        "{:<12}  {:>8}  {:>8}  {:>13}  {:>9}",
        "filter", "p50 ms", "p99 ms", "p50 / unfilt.", "hits/query"
    );
    let base = pct(&mut times[0].clone(), 0.5);
    for (row, (label, _)) in rows.iter().enumerate() {
        let t = &mut times[row];
        let (p50, p99) = (pct(t, 0.5), pct(t, 0.99));
        println!(
            "{label:<12}  {p50:>8.2}  {p99:>8.2}  {:>12.2}x  {:>9.1}",
            p50 / base,
            hits[row] as f64 / runs as f64
        );
    }
    Ok(())
}
