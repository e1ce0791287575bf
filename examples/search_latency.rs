//! Query latency on an existing collection: vector only, hybrid, and hybrid + ITM rerank of 16,
//! interleaved query by query so that the modes share the machine's conditions.
//!
//! ```sh
//! blipsearch add --index /tmp/idx --model-dir MODEL --no-captions PHOTOS
//! cargo run --release --example search_latency -- /tmp/idx 100
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use blipsearch::engine::models::{ModelSource, Retriever};
use blipsearch::engine::search::{SearchMode, SearchParams};
use blipsearch::engine::Engine;

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

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: search_latency INDEX [RUNS]")?,
    );
    let runs: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(50);
    let c = Engine::open_existing(&dir)?;
    let name = c.info()?.retrieval_model;
    let r = Retriever::load(&ModelSource::Dir(name.into()), &candle_core::Device::Cpu)?;
    let modes = [
        (
            "vector only",
            SearchParams {
                mode: SearchMode::Vector,
                rerank_k: Some(0),
                ..Default::default()
            },
        ),
        (
            "hybrid",
            SearchParams {
                rerank_k: Some(0),
                ..Default::default()
            },
        ),
        (
            "hybrid + rerank 16",
            SearchParams {
                rerank_k: Some(16),
                ..Default::default()
            },
        ),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for (_, p) in &modes {
        c.search_text(&r, QUERIES[0], p)?; // warm-up
    }
    for i in 0..runs {
        let q = QUERIES[i % QUERIES.len()];
        for (m, (_, p)) in modes.iter().enumerate() {
            let t = Instant::now();
            c.search_text(&r, q, p)?;
            times[m].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!("{} images, {runs} queries per mode", c.len()?);
    println!("{:<20}  {:>9}  {:>9}", "mode", "p50 ms", "p99 ms");
    for ((label, _), t) in modes.iter().zip(times.iter_mut()) {
        let (p50, p99) = (pct(t, 0.5), pct(t, 0.99));
        println!("{label:<20}  {p50:>9.1}  {p99:>9.1}");
    }
    Ok(())
}
