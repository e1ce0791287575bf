//! HNSW at scale: build time, recall@10 against exact search, and single-thread QPS at several
//! `ef`, on seeded random 256-d unit vectors (the hardest case for a graph index).
//!
//! ```sh
//! cargo run --release --example hnsw_recall -- 100000
//! ```

use std::time::Instant;

use blipsearch::index::{dot, HnswParams, ImageId, VectorIndex};

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    let dim = 256;
    let queries = 200;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut gauss = move || {
        // Box-Muller over a xorshift stream.
        let mut u = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (a, b) = (u(), u());
        ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
    };
    let mut unit = || {
        let v: Vec<f32> = (0..dim).map(|_| gauss()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect::<Vec<f32>>()
    };
    let data: Vec<(ImageId, Vec<f32>)> = (0..n).map(|i| (ImageId(i as u64 + 1), unit())).collect();
    let qs: Vec<Vec<f32>> = (0..queries).map(|_| unit()).collect();
    let dir = tempfile::tempdir()?;
    let params = HnswParams::default();
    let mut index = VectorIndex::open(dir.path(), dim, params)?;
    let t = Instant::now();
    for chunk in data.chunks(10_000) {
        index.insert_batch(chunk)?;
    }
    let build_s = t.elapsed().as_secs_f64();
    let truth: Vec<Vec<u64>> = qs
        .iter()
        .map(|q| {
            let mut s: Vec<(f32, u64)> = data.iter().map(|(id, v)| (dot(v, q), id.0)).collect();
            s.select_nth_unstable_by(10, |a, b| b.0.total_cmp(&a.0));
            s.truncate(10);
            s.into_iter().map(|x| x.1).collect()
        })
        .collect();
    println!(
        "n = {n}, dim = {dim}, m = {}, ef_construction = {}",
        params.m, params.ef_construction
    );
    println!(
        "build: {build_s:.1} s ({:.0} vectors/s, 2 threads)",
        n as f64 / build_s
    );
    println!("{:>6}  {:>10}  {:>10}", "ef", "recall@10", "QPS (1 thr)");
    for ef in [100, 200, 400, 800] {
        let t = Instant::now();
        let mut hit = 0;
        for (q, want) in qs.iter().zip(&truth) {
            let got = index.search(q, 10, Some(ef), None)?;
            hit += got.iter().filter(|(id, _)| want.contains(&id.0)).count();
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{ef:>6}  {:>10.4}  {:>10.0}",
            hit as f64 / (10 * queries) as f64,
            queries as f64 / secs
        );
    }
    Ok(())
}
