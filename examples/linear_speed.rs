//! The small-M linear kernel and the fused softmax against candle's matmul and softmax, in one
//! process, alternating.
//!
//! Part 1 times `Linear::forward` on random weights for the shapes of BLIP-base's text model
//! (768 -> 768, 768 -> 3072, 3072 -> 768, the 768 -> 30524 vocabulary head) at the row counts of
//! a text query, a decoding step and ITM, with the kernel on and off. Part 2 (with checkpoint
//! directories) times a text query, the caption model's ViT on one image and a caption the same
//! way (both kernels on against both off). Because both paths run in the
//! same process, one after the other, load from other processes hits both alike.
//!
//! ```sh
//! cargo run --release --example linear_speed
//! cargo run --release --example linear_speed -- --retrieval ~/.cache/blipsearch/full/retrieval \
//!     --caption ~/.cache/blipsearch/full/caption --rounds 3
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use blipsearch::model::kernels::Kernels;
use blipsearch::model::linear::Linear;
use blipsearch::model::preprocess::{load_image, DecodeLimits};
use blipsearch::model::{CaptionParams, Captioner, ItmFirstToken, ModelSource, Retriever};
use candle_core::{Device, Module, Tensor};

struct Options {
    retrieval: Option<PathBuf>,
    caption: Option<PathBuf>,
    rounds: usize,
    skip_shapes: bool,
}

fn parse() -> Result<Options> {
    let mut args = std::env::args().skip(1);
    let mut o = Options {
        retrieval: None,
        caption: None,
        rounds: 3,
        skip_shapes: false,
    };
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--retrieval" => o.retrieval = Some(value("--retrieval")?.into()),
            "--caption" => o.caption = Some(value("--caption")?.into()),
            "--rounds" => o.rounds = value("--rounds")?.parse()?,
            "--skip-shapes" => o.skip_shapes = true,
            s => bail!("unknown argument {s}"),
        }
    }
    Ok(o)
}

/// Best of `reps` calls, in seconds.
fn best(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Median of the samples.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn shapes(rounds: usize) -> Result<()> {
    let dev = Device::Cpu;
    println!(
        "threads {}; best of 5 calls per round, median over {rounds} rounds",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:>4} {:>13} | {:>10} {:>10} | {:>7} | {:>9}",
        "M", "K -> N", "candle ms", "kernel ms", "speedup", "kernel GB/s"
    );
    for &(k, n) in &[(768, 768), (768, 3072), (3072, 768), (768, 30524)] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let b = Tensor::randn(0f32, 0.02, n, &dev)?;
        let lin = Linear::new(w, Some(b));
        for &m in &[1, 3, 8, 10, 16, 35, 48, 64, 280, 577] {
            let xs = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?;
            let (mut old, mut new) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                for on in [false, true] {
                    let _kernels = Kernels {
                        fast: on,
                        ..Kernels::default()
                    }
                    .enter();
                    let s = best(5, || lin.forward(&xs).map(drop).map_err(Into::into))?;
                    if on { &mut new } else { &mut old }.push(s);
                }
            }
            let (old, new) = (median(old), median(new));
            println!(
                "{m:>4} {:>13} | {:>10.3} {:>10.3} | {:>6.2}x | {:>9.1}",
                format!("{k} -> {n}"),
                old * 1e3,
                new * 1e3,
                old / new,
                (n * k * 4) as f64 / new / 1e9
            );
        }
    }
    Ok(())
}

/// ITM as `benches/compare.sh` runs it (one 35-token text against the stored ViT outputs of 8
/// images), with the image tokens projected to keys and values against read unprojected.
fn itm(model: &Retriever, rounds: usize) -> Result<()> {
    const TEXT: &str = "a man in a red jacket riding a bicycle down a busy city street next to a \
         yellow taxi while people walk past brightly lit shops and a small dog watches them from \
         the corner of a bakery";
    let photos = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"]
        .iter()
        .map(|n| {
            load_image(
                &std::path::Path::new("tests/fixtures/images").join(n),
                DecodeLimits::default(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let images: Vec<_> = photos.iter().cycle().take(8).cloned().collect();
    let stored = model.embed_images(&images)?.tokens;
    let texts = [TEXT; 8];
    let pairs: Vec<usize> = (0..8).collect();
    let mut probs = Vec::new();
    let (mut old, mut new) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for on in [false, true] {
            let _kernels = Kernels {
                absorbed_cross_attention: on,
                ..Kernels::default()
            }
            .enter();
            let s = best(2, || {
                let s = model.itm(&texts, &stored, &pairs, ItmFirstToken::Enc)?;
                probs.push((on, s.iter().map(|s| s.prob).collect::<Vec<_>>()));
                Ok(())
            })?;
            if on { &mut new } else { &mut old }.push(s);
        }
    }
    let worst = probs
        .iter()
        .flat_map(|(_, p)| p.iter().zip(&probs[0].1).map(|(a, b)| (a - b).abs()))
        .fold(0f32, f32::max);
    let (old, new) = (median(old), median(new));
    println!(
        "ITM, 8 pairs: projected K/V {:.0} ms ({:.2} pairs/s), unprojected {:.0} ms ({:.2} pairs/s): \
         {:.2}x; p(match) max |diff| {worst:.2e}",
        old * 1e3,
        8.0 / old,
        new * 1e3,
        8.0 / new,
        old / new
    );
    Ok(())
}

/// The retrieval model's ViT on one image (`embed_images`, preprocessing included) with the
/// large-M matmul against candle's, every other kernel on.
fn vit_large_m(model: &Retriever, rounds: usize) -> Result<()> {
    let image = load_image(
        std::path::Path::new("tests/fixtures/images/chelsea.png"),
        DecodeLimits::default(),
    )?;
    let images = [image];
    let (mut old, mut new) = (Vec::new(), Vec::new());
    let mut itc = Vec::new();
    for _ in 0..rounds {
        for on in [false, true] {
            let _kernels = Kernels {
                large_m: on,
                ..Kernels::default()
            }
            .enter();
            let s = best(2, || {
                itc.push(
                    model
                        .embed_images(&images)?
                        .itc
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                );
                Ok(())
            })?;
            if on { &mut new } else { &mut old }.push(s);
        }
    }
    let worst = itc
        .iter()
        .flat_map(|v| v.iter().zip(&itc[0]).map(|(a, b)| (a - b).abs()))
        .fold(0f32, f32::max);
    let (old, new) = (median(old), median(new));
    println!(
        "ViT + ITC, 1 image: candle's matmul {:.0} ms, large-M kernel {:.0} ms: {:.2}x; \
         ITC max |diff| {worst:.2e}",
        old * 1e3,
        new * 1e3,
        old / new
    );
    Ok(())
}

fn main() -> Result<()> {
    blipsearch::model::device::tune_malloc();
    let o = parse()?;
    if !o.skip_shapes {
        shapes(o.rounds)?;
    }
    let dev = Device::Cpu;
    if let Some(dir) = &o.retrieval {
        let model = Retriever::load(&ModelSource::Dir(dir.clone()), &dev)?;
        let query = ["a dog running on the beach with a ball"];
        model.embed_texts(&query)?;
        let (mut old, mut new) = (Vec::new(), Vec::new());
        for _ in 0..o.rounds {
            for on in [false, true] {
                let _kernels = Kernels {
                    fast: on,
                    ..Kernels::default()
                }
                .enter();
                let s = best(5, || {
                    model.embed_texts(&query).map(drop).map_err(Into::into)
                })?;
                if on { &mut new } else { &mut old }.push(s);
            }
        }
        let (old, new) = (median(old), median(new));
        itm(&model, o.rounds)?;
        vit_large_m(&model, o.rounds)?;
        println!(
            "text query: candle {:.1} ms ({:.2} q/s), kernels {:.1} ms ({:.2} q/s): {:.2}x",
            old * 1e3,
            1.0 / old,
            new * 1e3,
            1.0 / new,
            old / new
        );
    }
    if let Some(dir) = &o.caption {
        let model = Captioner::load(&ModelSource::Dir(dir.clone()), &dev)?;
        let image = load_image(
            std::path::Path::new("tests/fixtures/images/chelsea.png"),
            DecodeLimits::default(),
        )?;
        let params = CaptionParams::default();
        let images = [image];
        let (mut old, mut new) = (Vec::new(), Vec::new());
        for _ in 0..o.rounds {
            for on in [false, true] {
                let _kernels = Kernels {
                    fast: on,
                    ..Kernels::default()
                }
                .enter();
                let s = best(2, || {
                    model.embed_images(&images).map(drop).map_err(Into::into)
                })?;
                if on { &mut new } else { &mut old }.push(s);
            }
        }
        let (old, new) = (median(old), median(new));
        println!(
            "ViT, 1 image: candle {:.0} ms, kernels {:.0} ms: {:.2}x",
            old * 1e3,
            new * 1e3,
            old / new
        );
        let mut texts = Vec::new();
        let (mut old, mut new) = (Vec::new(), Vec::new());
        for _ in 0..o.rounds {
            for on in [false, true] {
                let _kernels = Kernels {
                    fast: on,
                    ..Kernels::default()
                }
                .enter();
                let t = Instant::now();
                let caps = model.caption_images(&images, &params)?;
                if on { &mut new } else { &mut old }.push(t.elapsed().as_secs_f64());
                texts.push(caps[0][0].text.clone());
            }
        }
        let (old, new) = (median(old), median(new));
        println!(
            "caption (beam 3, max 20): candle {old:.2} s, kernels {new:.2} s: {:.2}x",
            old / new
        );
        texts.dedup();
        println!("captions written: {texts:?}");
    }
    Ok(())
}
