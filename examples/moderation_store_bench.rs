//! What the moderation reads of a store cost, against reading every record as the `Store`
//! trait's defaults would: `pdq_hashes` (every image's PDQ hash, what matching a list against
//! the collection starts from) and `matching` with a flag filter (the review queue's ids). The
//! embedded store answers both from its filter columns; Milvus (when `--milvus` names one) from
//! the rows' dynamic keys. `--n` synthetic images (256-d unit vectors, a caption, a PDQ hash;
//! one in a hundred flagged, half of those pending) are written first; then each read runs
//! `--runs` times and the table shows the best time of each, and how many times faster than the
//! record scan it is on the same store.
//!
//! ```sh
//! cargo run --release --example moderation_store_bench -- --n 100000 --runs 5
//! ```
//!
//! The HNSW graph is built with small parameters (`m` 4, `ef_construction` 16): it is not what
//! is measured, and filling the store is faster so.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use blipsearch::index::{
    content_hash, Caption, CaptionSource, Collection, CollectionInfo, Filter, Flag, FlagFilter,
    HnswParams, ImageId, ImageRecord, MatchRule, MilvusAddress, MilvusStore, Pdq, PdqHash, Store,
};

const DIM: usize = 256;

#[path = "common/gen.rs"]
mod gen;
use gen::Gen;

fn record(i: u64, g: &mut Gen) -> ImageRecord {
    let mut hash = [0u8; 32];
    for chunk in hash.chunks_mut(8) {
        chunk.copy_from_slice(&g.next().to_le_bytes());
    }
    let flags = match i % 100 {
        0 => vec![flag("bank", i, true)],
        50 => vec![flag("bank", i, false)],
        _ => Vec::new(),
    };
    ImageRecord {
        id: ImageId(u64::MAX),
        path: format!("/lib/img_{i:07}.jpg"),
        content_hash: content_hash(&i.to_le_bytes()),
        size_bytes: 200_000,
        width: 1024,
        height: 768,
        mtime_unix: 1_700_000_000,
        exif_date: Some("2020:05:10 12:00:00".into()),
        itc: g.unit(DIM),
        captions: vec![Caption {
            text: format!("a photograph number {i} of something on a table"),
            source: CaptionSource::Beam,
            p_match: Some(0.8),
            kept: true,
        }],
        given_texts: vec![],
        added_unix: 1_700_000_000,
        product: None,
        pdq: Some(Pdq {
            hash: PdqHash(hash),
            quality: 90,
        }),
        flags,
    }
}

fn flag(list: &str, entry: u64, pending: bool) -> Flag {
    Flag {
        list: list.into(),
        entry,
        rule: MatchRule::Pdq,
        pdq_distance: Some(4),
        cosine: None,
        flagged_unix: 1_700_000_000,
        decision: (!pending).then(|| blipsearch::index::Decision {
            verdict: blipsearch::index::Verdict::Confirmed,
            note: String::new(),
            actor: "cli".into(),
            unix: 1_700_000_000,
        }),
    }
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

/// The best of `runs` timings of `f`, and its last answer's size.
fn best(runs: usize, f: &dyn Fn() -> anyhow::Result<usize>) -> anyhow::Result<(Duration, usize)> {
    let mut out = (Duration::MAX, 0);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let n = f()?;
        out = (out.0.min(t.elapsed()), n);
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let n: u64 = arg("--n")?.unwrap_or(100_000);
    let runs: usize = arg("--runs")?.unwrap_or(5);
    let dir: PathBuf =
        arg("--index")?.unwrap_or_else(|| PathBuf::from(format!("target/bench-moderation-{n}")));
    let milvus: Option<String> = arg("--milvus")?;
    let info = CollectionInfo::new("bench/synthetic", None, DIM, 577, 768);

    let mut stores: Vec<(&str, Box<dyn Store>)> = Vec::new();
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let params = HnswParams {
        m: 4,
        ef_construction: 16,
        ..HnswParams::default()
    };
    stores.push(("embedded", Box::new(Collection::open(&dir, &info, params)?)));
    if let Some(m) = &milvus {
        let address: MilvusAddress = m.parse()?;
        MilvusStore::drop_collection(&address)?;
        stores.push(("milvus", Box::new(MilvusStore::open(&address, &info)?)));
    }

    let t = Instant::now();
    for (_, s) in stores.iter_mut() {
        let mut g = Gen(0x0DE7_A710_BE4C);
        let mut batch = Vec::new();
        for i in 0..n {
            batch.push(record(i, &mut g));
            if batch.len() == 1000 || i + 1 == n {
                let hashes: Vec<String> = batch.iter().map(|r| r.content_hash.clone()).collect();
                let hashes: Vec<&str> = hashes.iter().map(String::as_str).collect();
                let ids = s.allocate_ids(&hashes)?;
                for (r, id) in batch.iter_mut().zip(ids) {
                    r.id = id;
                }
                s.insert_all(std::mem::take(&mut batch))?;
            }
        }
        s.commit()?;
    }
    eprintln!(
        "filled {} store(s) with {n} images in {:?}",
        stores.len(),
        t.elapsed()
    );

    let pending = Filter {
        flagged: Some(FlagFilter {
            list: Some("bank".into()),
            pending_only: true,
        }),
        ..Filter::default()
    };
    println!("| store | read | answer | best of {runs} | vs record scan |");
    println!("|---|---|---|---|---|");
    for (name, s) in &stores {
        let s = &**s;
        let (scan, scanned) = best(runs, &|| {
            let mut hashes = 0;
            s.for_each(&mut |r| {
                hashes += r.pdq.is_some() as usize;
                Ok(())
            })?;
            Ok(hashes)
        })?;
        let (hashes, got) = best(runs, &|| Ok(s.pdq_hashes()?.len()))?;
        anyhow::ensure!(got == scanned, "{name}: pdq_hashes gave {got} of {scanned}");
        let (filter_scan, want) = best(runs, &|| {
            let mut ids = 0;
            s.for_each(&mut |r| {
                ids += pending.accepts(&r) as usize;
                Ok(())
            })?;
            Ok(ids)
        })?;
        let (matching, got) = best(runs, &|| Ok(s.matching(&pending, usize::MAX)?.len()))?;
        anyhow::ensure!(got == want, "{name}: matching gave {got} of {want}");
        for (read, answer, time, against) in [
            ("every record (for_each)", scanned, scan, scan),
            ("pdq_hashes", scanned, hashes, scan),
            ("for_each + Filter::accepts", want, filter_scan, filter_scan),
            ("matching(pending of bank)", want, matching, filter_scan),
        ] {
            println!(
                "| {name} | {read} | {answer} | {:.3} ms | {:.0}x |",
                time.as_secs_f64() * 1e3,
                against.as_secs_f64() / time.as_secs_f64()
            );
        }
    }
    Ok(())
}
