//! Caption decode speed: how fast the captioner writes captions, on a full-size checkpoint.
//!
//! The numbers that matter are tokens/s (caption tokens produced, prompt excluded) and captions/s
//! at BLIP's settings (beam 3, max 20 / min 5 counting [DEC] and the prompt), for one image per
//! call and for four images batched in one call. The ViT is timed apart from decoding: in an
//! ingest pipeline its output is shared with the rest of the work.
//!
//! ```sh
//! # full-size random weights from tests/fixtures/generate.py --full
//! cargo run --release --example caption_speed -- ~/.cache/blipsearch/full/caption
//! cargo run --release --example caption_speed -- DIR --iters 3 --min-length 20   # fixed 16-token captions
//! ```
//!
//! With random weights the caption lengths are whatever the weights produce; `--min-length 20`
//! forces every caption to `max_length` so that runs are comparable across checkpoints.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use blipsearch::model::preprocess::{load_image, DecodeLimits};
use blipsearch::model::{
    select_device, BeamParams, Caption, CaptionParams, Captioner, GenerationMode, ModelSource,
};

struct Options {
    model_dir: PathBuf,
    iters: usize,
    beams: usize,
    min_length: usize,
    max_length: usize,
    device: String,
}

fn parse() -> Result<Options> {
    let mut args = std::env::args().skip(1);
    let mut o = Options {
        model_dir: dirs_home().join(".cache/blipsearch/full/caption"),
        iters: 2,
        beams: 3,
        min_length: 5,
        max_length: 20,
        device: "cpu".into(),
    };
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--iters" => o.iters = value("--iters")?.parse()?,
            "--beams" => o.beams = value("--beams")?.parse()?,
            "--min-length" => o.min_length = value("--min-length")?.parse()?,
            "--max-length" => o.max_length = value("--max-length")?.parse()?,
            "--device" => o.device = value("--device")?,
            s if s.starts_with("--") => bail!("unknown option {s}"),
            s => o.model_dir = PathBuf::from(s),
        }
    }
    Ok(o)
}

fn dirs_home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

/// Caption tokens (after the prompt) in a batch of results.
fn new_tokens(caps: &[Vec<Caption>], prompt_len: usize) -> usize {
    caps.iter()
        .flatten()
        .map(|c| c.token_ids.len() - prompt_len)
        .sum()
}

fn main() -> Result<()> {
    let o = parse()?;
    let device = select_device(&o.device)?;
    let t = Instant::now();
    let model = Captioner::load(&ModelSource::Dir(o.model_dir.clone()), &device)
        .with_context(|| format!("loading {}", o.model_dir.display()))?;
    println!(
        "model {} loaded in {:.2}s; device {:?}; {} threads; vision {}x{} layers, text {} layers",
        o.model_dir.display(),
        t.elapsed().as_secs_f64(),
        device,
        candle_core::utils::get_num_threads(),
        model.config().vision.hidden_size,
        model.config().vision.num_hidden_layers,
        model.config().text.num_hidden_layers,
    );
    let images_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images");
    let images = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"]
        .iter()
        .map(|f| load_image(&images_dir.join(f), DecodeLimits::default()))
        .collect::<Result<Vec<_>, _>>()?;
    let params = CaptionParams {
        mode: GenerationMode::Beam(BeamParams {
            num_beams: o.beams,
            ..BeamParams::default()
        }),
        min_length: o.min_length,
        max_length: o.max_length,
        ..CaptionParams::default()
    };
    let prompt_len = model.prompt_ids(&params.prompt)?.len();
    println!(
        "beam {}, max_length {} / min_length {} (prompt {:?} = {} tokens with [DEC]), {} iterations",
        o.beams, o.max_length, o.min_length, params.prompt, prompt_len, o.iters
    );

    // Warm-up (allocator, thread pool, page cache of the weights).
    let warm = model.embed_images(&images[..1])?;
    model.generate(&warm, &params)?;

    for batch in [1usize, 4] {
        let (mut vit_s, mut dec_s, mut tokens, mut captions) = (0.0, 0.0, 0, 0);
        for _ in 0..o.iters {
            for chunk in images.chunks(batch) {
                let t = Instant::now();
                let image_tokens = model.embed_images(chunk)?;
                vit_s += t.elapsed().as_secs_f64();
                let t = Instant::now();
                let caps = model.generate(&image_tokens, &params)?;
                dec_s += t.elapsed().as_secs_f64();
                tokens += new_tokens(&caps, prompt_len);
                captions += caps.len();
            }
        }
        println!(
            "batch {batch}: {captions} captions, {:.1} tokens/caption | decode {:.1} tokens/s, {:.2} captions/s \
             ({:.0} ms/caption) | ViT {:.0} ms/image | end to end {:.2} captions/s",
            tokens as f64 / captions as f64,
            tokens as f64 / dec_s,
            captions as f64 / dec_s,
            1e3 * dec_s / captions as f64,
            1e3 * vit_s / captions as f64,
            captions as f64 / (vit_s + dec_s),
        );
    }
    Ok(())
}
