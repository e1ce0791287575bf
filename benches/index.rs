//! The derived indexes on seeded synthetic data: `VectorIndex` over 256-d random unit vectors
//! (the hardest case for a graph) and BM25 search (`TextIndex` over generated captions). Sizes
//! are in the bench names; they are kept small enough to run on a laptop in a minute.
//!
//! Groups say what answers a search, since `VectorIndex` picks between graph and scan itself:
//! `hnsw` builds the graph or walks it (`ef` and filter chosen so that it does), `exact_scan`
//! scores every candidate, `tantivy` is BM25. The 1M-vector comparison with hnswlib is
//! `benches/compare.sh --vectors`.
//!
//! ```sh
//! cargo bench --bench index
//! ```

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use blipsearch::index::{
    Caption, CaptionSource, HnswParams, ImageId, ImageRecord, TextIndex, VectorIndex,
};

const DIM: usize = 256;

/// Whether this is a measuring run: `cargo bench` passes `--bench`; `cargo test --all-targets`
/// runs each bench once without it.
fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// `n` when measuring; a tenth of it in a test run, so that CI stays quick (at that size every
/// search is an exact scan, whatever the bench's name: a test run measures nothing).
fn scale(n: usize) -> usize {
    if measuring() {
        n
    } else {
        n / 10
    }
}

/// Seeded uniform stream (xorshift64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit_vector(&mut self) -> Vec<f32> {
        // Sum of uniforms: close enough to Gaussian for direction sampling.
        let v: Vec<f32> = (0..DIM)
            .map(|_| {
                (0..4)
                    .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                    .sum()
            })
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }
}

fn vectors(c: &mut Criterion) {
    let mut rng = Rng(0x5EED);
    let n = scale(20_000);
    let items: Vec<(ImageId, Vec<f32>)> = (0..n)
        .map(|i| (ImageId(i as u64 + 1), rng.unit_vector()))
        .collect();
    let queries: Vec<Vec<f32>> = (0..64).map(|_| rng.unit_vector()).collect();
    let params = HnswParams::default();
    let mut g = c.benchmark_group("hnsw");
    g.sample_size(10);
    let small = scale(2_000);
    g.throughput(Throughput::Elements(small as u64));
    g.bench_function(BenchmarkId::new("insert_batch_256d", small), |b| {
        b.iter(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut index = VectorIndex::open(dir.path(), DIM, params).expect("open");
            index.insert_batch(&items[..small]).expect("insert");
            index
        })
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let mut index = VectorIndex::open(dir.path(), DIM, params).expect("open");
    index.insert_batch(&items).expect("insert");
    g.throughput(Throughput::Elements(queries.len() as u64));
    // Graph walks: at 20k points `VectorIndex` walks the graph up to `ef` 156 and scans exactly
    // from there on (it scans when the points number at most 128 per unit of `ef`).
    for ef in [64usize, 128] {
        assert!(
            !measuring() || !index.scans_exactly(10, Some(ef)),
            "ef {ef} at n {n} is answered by an exact scan, not the graph"
        );
        g.bench_with_input(
            BenchmarkId::new(format!("search_k10_n{n}"), format!("ef{ef}")),
            &ef,
            |b, &ef| {
                b.iter(|| {
                    for q in &queries {
                        index.search(q, 10, Some(ef), None).expect("search");
                    }
                })
            },
        );
    }
    // Two thirds of the ids pass (13k, above the exact threshold): an unfiltered walk for
    // `4k / share` candidates, filtered afterwards.
    g.bench_function(
        BenchmarkId::new(format!("search_k10_n{n}"), "filter_67pct_ef64"),
        |b| {
            let keep = |id: ImageId| !id.0.is_multiple_of(3);
            b.iter(|| {
                for q in &queries {
                    index.search(q, 10, Some(64), Some(&keep)).expect("search");
                }
            })
        },
    );
    g.finish();

    // Exact scans: every live point, and a 5% filter (1k candidates, below the exact threshold,
    // so `VectorIndex::search` itself scans them).
    let mut g = c.benchmark_group("exact_scan");
    g.sample_size(10);
    g.throughput(Throughput::Elements(queries.len() as u64));
    g.bench_function(BenchmarkId::new(format!("search_k10_n{n}"), "all"), |b| {
        b.iter(|| {
            for q in &queries {
                index.search_exact(q, 10, None).expect("search");
            }
        })
    });
    g.bench_function(
        BenchmarkId::new(format!("search_k10_n{n}"), "filter_5pct"),
        |b| {
            let keep = |id: ImageId| id.0.is_multiple_of(20);
            b.iter(|| {
                for q in &queries {
                    index.search(q, 10, None, Some(&keep)).expect("search");
                }
            })
        },
    );
    g.finish();
}

const WORDS: &[&str] = &[
    "dog", "cat", "beach", "street", "red", "car", "bicycle", "man", "woman", "child", "playing",
    "running", "sitting", "table", "coffee", "cup", "rocket", "sky", "night", "city", "tree",
    "park", "snow", "mountain", "river", "boat", "bird", "flower", "garden", "window", "kitchen",
    "food", "plate", "pizza", "train", "station", "bus", "horse", "field", "grass",
];

fn text(c: &mut Criterion) {
    let mut rng = Rng(0xC0FFEE);
    let mut sentence = |len: usize| {
        (0..len)
            .map(|_| WORDS[(rng.next() % WORDS.len() as u64) as usize])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let n = scale(10_000) as u64;
    let records: Vec<ImageRecord> = (1..=n)
        .map(|id| ImageRecord {
            id: ImageId(id),
            path: format!("photos/{}/{}.jpg", id % 37, sentence(2).replace(' ', "_")),
            content_hash: format!("{id:064x}"),
            size_bytes: 1,
            width: 1,
            height: 1,
            mtime_unix: 0,
            exif_date: None,
            itc: Vec::new(),
            captions: vec![Caption {
                text: sentence(9),
                source: CaptionSource::Beam,
                p_match: None,
                kept: true,
            }],
            given_texts: Vec::new(),
            added_unix: 0,
            product: None,
            pdq: None,
            flags: Vec::new(),
        })
        .collect();
    let mut g = c.benchmark_group("tantivy");
    g.sample_size(10);
    let small = scale(1_000);
    g.throughput(Throughput::Elements(small as u64));
    g.bench_function(BenchmarkId::new("upsert_commit", small), |b| {
        b.iter(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut index = TextIndex::open(dir.path()).expect("open");
            for r in &records[..small] {
                index.upsert(r).expect("upsert");
            }
            index.commit(1).expect("commit");
        })
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let mut index = TextIndex::open(dir.path()).expect("open");
    for r in &records {
        index.upsert(r).expect("upsert");
    }
    index.commit(1).expect("commit");
    for query in [
        "dog",
        "red bicycle street",
        "a child playing with a dog in the park",
    ] {
        let words = query.split(' ').count();
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(
            BenchmarkId::new(format!("search_k20_n{n}"), format!("{words}_words")),
            &query,
            |b, q| b.iter(|| index.search(q, 20).expect("search")),
        );
    }
    g.finish();
}

criterion_group!(benches, vectors, text);
criterion_main!(benches);
