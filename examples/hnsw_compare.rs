//! Our side of the vector-index comparison in `benches/compare.sh --vectors N`: builds a
//! [`VectorIndex`] over `N` seeded random 256-d unit vectors (the hardest case for a graph index:
//! no clusters), then measures recall@10 against exact search and single-thread QPS at several
//! `ef`. With `--write DIR` it also writes the vectors, queries and exact top-10 it used
//! (`vectors.f32`, `queries.f32` little-endian row-major, `truth.u32` 0-based rows, `meta.json`)
//! so that `benches/hnswlib_side.py` measures hnswlib on exactly the same data.
//!
//! ```sh
//! cargo run --release --example hnsw_compare -- --n 1000000 --write /tmp/vec1m
//! ```
//!
//! Prints JSON lines (side "ours"): build seconds, memory added by the index, and one line per
//! `ef` with recall@10 and queries/s, for our search path (side "ours"; `"exact": true` where
//! the index answers that `ef` by an exact scan, see `VectorIndex::search`) and for `hnsw_rs`'s
//! own search over the same graph (side "ours_hnsw_rs", up to ef 1024), best of three passes
//! each; then the exact scan itself (side "ours_scan", `VectorIndex::search_exact`).
//!
//! `--read DIR` takes the vectors, queries and exact top-10 from a directory an earlier `--write`
//! made instead of generating them. `--scan-only` skips the graph and measures only the exact
//! scan, over the same rows and with the same code (`ExactScan`): at 1M vectors the graph takes
//! two hours to build on two cores, the scan a few seconds to set up.
//!
//! `--index DIR` keeps the built index in `DIR` (saved as a dump) and, when `DIR` already holds
//! one of the same size, loads it instead of building (no build line is printed then): one slow
//! build, then any number of search measurements, e.g. of two builds of the search code. Use one
//! `DIR` per data set: only the size is checked.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use blipsearch::index::{dot, ExactScan, HnswParams, ImageId, VectorIndex};

const DIM: usize = 256;
const K: usize = 10;
/// Timed passes over the queries per `ef` and search path; the best is reported.
const REPEATS: usize = 3;
/// `hnsw_rs`'s own search is measured up to this `ef` only: it is a side comparison on the same
/// graph, and at 1M vectors its passes past 1024 take minutes each (3.6 queries/s at ef 2048).
const HNSW_RS_MAX_EF: usize = 1024;

/// Seeded N(0,1) stream: Box-Muller over xorshift64.
struct Gauss(u64);

impl Gauss {
    fn uniform(&mut self) -> f64 {
        let s = &mut self.0;
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        ((*s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn next(&mut self) -> f32 {
        let (a, b) = (self.uniform(), self.uniform());
        ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
    }
    fn unit(&mut self, out: &mut [f32]) {
        for x in out.iter_mut() {
            *x = self.next();
        }
        let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt();
        out.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Resident memory of this process in MiB (Linux `VmRSS`).
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Exact top-`K` rows by inner product for every query, on all cores.
fn exact_top(data: &[f32], queries: &[f32]) -> Vec<Vec<u32>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let nq = queries.len() / DIM;
    let per = nq.div_ceil(threads);
    let mut out = vec![Vec::new(); nq];
    std::thread::scope(|s| {
        for (chunk_i, chunk) in out.chunks_mut(per).enumerate() {
            s.spawn(move || {
                for (j, slot) in chunk.iter_mut().enumerate() {
                    let qi = chunk_i * per + j;
                    let q = &queries[qi * DIM..(qi + 1) * DIM];
                    let mut scores: Vec<(f32, u32)> = data
                        .chunks_exact(DIM)
                        .enumerate()
                        .map(|(i, v)| (dot(v, q), i as u32))
                        .collect();
                    scores.select_nth_unstable_by(K, |a, b| b.0.total_cmp(&a.0));
                    scores.truncate(K);
                    *slot = scores.into_iter().map(|x| x.1).collect();
                }
            });
        }
    });
    out
}

fn write_f32(path: &std::path::Path, xs: &[f32]) -> Result<()> {
    let mut f = std::io::BufWriter::new(fs_err::File::create(path)?);
    for x in xs {
        f.write_all(&x.to_le_bytes())?;
    }
    Ok(f.flush()?)
}

fn read_f32(path: &std::path::Path) -> Result<Vec<f32>> {
    let bytes = fs_err::read(path)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Vectors, queries (both row-major) and the exact top-`K` rows of each query.
type Data = (Vec<f32>, Vec<f32>, Vec<Vec<u32>>);

/// The [`Data`] written by an earlier `--write DIR`.
fn read_data(dir: &std::path::Path) -> Result<Data> {
    let meta: serde_json::Value = serde_json::from_slice(&fs_err::read(dir.join("meta.json"))?)?;
    if meta["dim"] != DIM || meta["k"] != K {
        bail!(
            "{}: dim {} and k {} (this harness: {DIM}, {K})",
            dir.display(),
            meta["dim"],
            meta["k"]
        );
    }
    let data = read_f32(&dir.join("vectors.f32"))?;
    let qs = read_f32(&dir.join("queries.f32"))?;
    let truth: Vec<Vec<u32>> = fs_err::read(dir.join("truth.u32"))?
        .chunks_exact(4 * K)
        .map(|row| {
            row.chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
        .collect();
    if data.len() % DIM != 0 || qs.len() != truth.len() * DIM {
        bail!("{}: files of inconsistent sizes", dir.display());
    }
    Ok((data, qs, truth))
}

/// Recall@`K` of `found` (0-based rows per query) against `truth`.
fn recall(truth: &[Vec<u32>], found: impl Iterator<Item = Vec<u32>>) -> f64 {
    let hits: usize = truth
        .iter()
        .zip(found)
        .map(|(want, got)| got.iter().filter(|r| want.contains(r)).count())
        .sum();
    hits as f64 / (K * truth.len()) as f64
}

fn main() -> Result<()> {
    let mut n = 100_000usize;
    let mut queries = 200usize;
    let mut write: Option<PathBuf> = None;
    let mut read: Option<PathBuf> = None;
    let mut scan_only = false;
    let mut keep: Option<PathBuf> = None;
    let mut efs = vec![64usize, 128, 256, 512, 1024];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--n" => n = value("--n")?.parse()?,
            "--queries" => queries = value("--queries")?.parse()?,
            "--write" => write = Some(value("--write")?.into()),
            "--read" => read = Some(value("--read")?.into()),
            "--scan-only" => scan_only = true,
            "--index" => keep = Some(value("--index")?.into()),
            "--ef" => {
                efs = value("--ef")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            s => bail!("unknown argument {s}"),
        }
    }
    let t = Instant::now();
    let (data, qs, truth) = match &read {
        Some(dir) => read_data(dir)?,
        None => {
            let mut g = Gauss(0x9E37_79B9_7F4A_7C15);
            let mut data = vec![0f32; n * DIM];
            data.chunks_exact_mut(DIM).for_each(|v| g.unit(v));
            let mut qs = vec![0f32; queries * DIM];
            qs.chunks_exact_mut(DIM).for_each(|v| g.unit(v));
            let truth = exact_top(&data, &qs);
            (data, qs, truth)
        }
    };
    let exact_s = t.elapsed().as_secs_f64();
    n = data.len() / DIM;
    queries = truth.len();
    if scan_only {
        let scan = ExactScan::new(DIM, &data);
        return scan_row(&qs, &truth, n, |q| {
            Ok(scan
                .top_k(q, K)
                .iter()
                .map(|&(row, _)| row as u32)
                .collect())
        });
    }
    if let Some(dir) = &write {
        fs_err::create_dir_all(dir)?;
        write_f32(&dir.join("vectors.f32"), &data)?;
        write_f32(&dir.join("queries.f32"), &qs)?;
        let flat: Vec<u8> = truth
            .iter()
            .flatten()
            .flat_map(|i| i.to_le_bytes())
            .collect();
        fs_err::write(dir.join("truth.u32"), flat)?;
        let params = HnswParams::default();
        let meta = json!({"n": n, "dim": DIM, "queries": queries, "k": K, "m": params.m,
            "ef_construction": params.ef_construction, "ef": efs});
        fs_err::write(dir.join("meta.json"), meta.to_string())?;
    }

    let tmp = tempfile::tempdir()?;
    let dir = keep.as_deref().unwrap_or(tmp.path());
    let params = HnswParams::default();
    let before = rss_mib();
    let t = Instant::now();
    let mut index = VectorIndex::open(dir, DIM, params)?;
    if index.len() == n {
        eprintln!(
            "loaded the index in {} ({:.1?})",
            dir.display(),
            t.elapsed()
        );
        return search_rows(&mut index, &efs, &qs, &truth, n);
    }
    if !index.is_empty() {
        bail!(
            "{} holds an index of {} points, not {n}",
            dir.display(),
            index.len()
        );
    }
    let t = Instant::now();
    let chunk = 20_000;
    for (c, rows) in data.chunks(chunk * DIM).enumerate() {
        let items: Vec<(ImageId, Vec<f32>)> = rows
            .chunks_exact(DIM)
            .enumerate()
            .map(|(i, v)| (ImageId((c * chunk + i) as u64 + 1), v.to_vec()))
            .collect();
        index.insert_batch(&items)?;
    }
    let build_s = t.elapsed().as_secs_f64();
    let index_mib = rss_mib() - before;
    println!(
        "{}",
        json!({"side": "ours", "kind": "build", "n": n, "dim": DIM, "m": params.m,
            "ef_construction": params.ef_construction, "build_s": build_s,
            "threads": candle_core::utils::get_num_threads(),
            "index_mib": index_mib, "exact_s": exact_s})
    );
    if keep.is_some() {
        index.save(1)?;
    }
    search_rows(&mut index, &efs, &qs, &truth, n)
}

/// Measures our search path and `hnsw_rs`'s at each `ef`, then the exact scan, and prints their
/// lines.
fn search_rows(
    index: &mut VectorIndex,
    efs: &[usize],
    qs: &[f32],
    truth: &[Vec<u32>],
    n: usize,
) -> Result<()> {
    let queries = truth.len();
    // Each `ef` is timed `REPEATS` times per search path, the paths alternating, and the best
    // time is kept (the machine is shared: the best run is the least disturbed one).
    let paths = [("ours", false), ("ours_hnsw_rs", true)];
    for &ef in efs {
        let mut best = [(0.0f64, f64::INFINITY); 2];
        let n_paths = if ef <= HNSW_RS_MAX_EF { 2 } else { 1 };
        for round in 0..REPEATS {
            for p in 0..n_paths {
                let p = if round % 2 == 0 || n_paths == 1 {
                    p
                } else {
                    1 - p
                };
                index.set_hnsw_rs_search(paths[p].1);
                let t = Instant::now();
                let mut hits = 0usize;
                for (qi, want) in truth.iter().enumerate() {
                    let got = index.search(&qs[qi * DIM..(qi + 1) * DIM], K, Some(ef), None)?;
                    hits += got
                        .iter()
                        .filter(|(id, _)| want.contains(&((id.0 - 1) as u32)))
                        .count();
                }
                let secs = t.elapsed().as_secs_f64();
                best[p] = (hits as f64 / (K * queries) as f64, best[p].1.min(secs));
            }
        }
        // What our path (not hnsw_rs's search mode) does at this `ef`.
        index.set_hnsw_rs_search(false);
        let scans = index.scans_exactly(K, Some(ef));
        for (p, (recall, secs)) in best.iter().enumerate().take(n_paths) {
            let exact = p == 0 && scans;
            println!(
                "{}",
                json!({"side": paths[p].0, "kind": "search", "ef": ef, "exact": exact,
                    "recall": recall, "qps": queries as f64 / secs})
            );
        }
    }
    index.set_hnsw_rs_search(false);
    scan_row(qs, truth, n, |q| {
        let got = index.search_exact(q, K, None)?;
        Ok(got.iter().map(|(id, _)| (id.0 - 1) as u32).collect())
    })
}

/// Times `top` (0-based rows of the top `K` of one query) over all queries, best of `REPEATS`
/// passes, and prints the exact scan's line (side "ours_scan").
fn scan_row(
    qs: &[f32],
    truth: &[Vec<u32>],
    n: usize,
    mut top: impl FnMut(&[f32]) -> Result<Vec<u32>>,
) -> Result<()> {
    let mut best = (0.0, f64::INFINITY);
    for _ in 0..REPEATS {
        let t = Instant::now();
        let found = qs
            .chunks_exact(DIM)
            .map(&mut top)
            .collect::<Result<Vec<_>>>()?;
        let secs = t.elapsed().as_secs_f64();
        best = (recall(truth, found.into_iter()), best.1.min(secs));
    }
    println!(
        "{}",
        json!({"side": "ours_scan", "kind": "search", "ef": null, "n": n,
            "recall": best.0, "qps": truth.len() as f64 / best.1})
    );
    Ok(())
}
