//! `synth-world`, `eval` and `capfilt-dataset`: measuring models and bootstrapping datasets.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::eval::synth::{generate, SynthParams};

/// `blipsearch synth-world`.
#[derive(Debug, Args)]
pub struct SynthWorldArgs {
    /// Folder to write (created; must be empty or absent).
    out: PathBuf,
    /// Training images (one caption each).
    #[arg(long, default_value_t = 2000)]
    train: usize,
    /// Test images (at most 288, each a distinct scene).
    #[arg(long, default_value_t = 200)]
    test: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Share of deliberately wrong captions in train.jsonl and test_noisy.jsonl.
    #[arg(long, default_value_t = 0.2)]
    wrong_share: f64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn synth_world(a: SynthWorldArgs) -> Result<()> {
    let params = SynthParams {
        train: a.train,
        test: a.test,
        seed: a.seed,
        wrong_share: a.wrong_share,
        size: a.size,
    };
    let summary = generate(&a.out, &params)?;
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "{}: {} train images ({} wrong captions), {} test images ({} wrong in test_noisy.jsonl)",
            a.out.display(),
            summary.train_images,
            summary.train_wrong,
            summary.test_images,
            summary.test_noisy_wrong
        );
    }
    Ok(())
}
