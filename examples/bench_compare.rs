//! The Rust side of `benches/compare.sh`: times blipsearch's model operations on full-size
//! checkpoints and prints one JSON object per line for `benches/report.py` to combine with the
//! PyTorch side (`benches/pytorch_side.py`), which times the same operations on the same inputs.
//!
//! ```sh
//! cargo run --release --example bench_compare -- \
//!     --retrieval ~/.cache/blipsearch/full/retrieval --caption ~/.cache/blipsearch/full/caption \
//!     --iters 2 tests/fixtures/images/{chelsea.png,coffee.png,rocket.jpg,astronaut.png}
//! ```
//!
//! Operations (names shared with the Python side), each timed `--iters` times after one warm-up
//! call of every operation; a sample is the wall time of one call:
//!
//! - `image_b1`, `image_b8`: preprocess + ViT + `vision_proj` + normalise for 1 and 8 decoded
//!   images (the photos cycled);
//! - `text_query`: clean + tokenise + text encoder + `text_proj` + normalise for one short query;
//! - `itm`: one 35-token text against the stored ViT outputs of 8 images (8 pairs, [ENC] first);
//! - `caption`: ViT + beam search (3 beams, max 20 / min 5, prompt "a picture of ") for one image.
//!
//! The analytic FLOP count of each call is printed beside it, so that the report can give the
//! achieved FLOP/s; the process's peak resident memory (VmHWM) is printed last.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::DynamicImage;
use serde_json::json;

use blipsearch::model::preprocess::{load_image, DecodeLimits};
use blipsearch::model::{
    BlipTextConfig, BlipVisionConfig, CaptionParams, Captioner, ItmFirstToken, ModelSource,
    Retriever,
};

/// The query of `text_query` (6 words, 8 tokens with [CLS]/[SEP]).
pub const QUERY: &str = "a dog playing on the beach";
/// The ITM text: longer than 35 tokens, so it is cut to exactly 35.
pub const LONG_TEXT: &str =
    "a man in a red jacket riding a bicycle down a busy city street next to a yellow taxi while \
     people walk past brightly lit shops and a small dog watches them from the corner of a bakery";

struct Options {
    retrieval: PathBuf,
    caption: PathBuf,
    images: Vec<PathBuf>,
    iters: usize,
    ops: Vec<String>,
}

fn parse() -> Result<Options> {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let full = home.join(".cache/blipsearch/full");
    let mut o = Options {
        retrieval: full.join("retrieval"),
        caption: full.join("caption"),
        images: Vec::new(),
        iters: 2,
        ops: ["image_b1", "image_b8", "text_query", "itm", "caption"]
            .map(String::from)
            .to_vec(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--retrieval" => o.retrieval = value("--retrieval")?.into(),
            "--caption" => o.caption = value("--caption")?.into(),
            "--iters" => o.iters = value("--iters")?.parse()?,
            "--ops" => o.ops = value("--ops")?.split(',').map(String::from).collect(),
            s if s.starts_with("--") => bail!("unknown option {s}"),
            s => o.images.push(s.into()),
        }
    }
    if o.images.is_empty() {
        bail!("give at least one image file");
    }
    if o.iters == 0 {
        bail!("--iters must be at least 1");
    }
    Ok(o)
}

/// FLOPs (2 per multiply-add) of the ViT for one image, patch embedding and `vision_proj`
/// included; LayerNorm, softmax and GELU are left out (a few percent).
fn vit_flops(v: &BlipVisionConfig, proj: usize) -> f64 {
    let (d, i, t) = (
        v.hidden_size as f64,
        v.intermediate_size as f64,
        v.num_tokens() as f64,
    );
    let patches = t - 1.0;
    let patch = 2.0 * patches * (3 * v.patch_size * v.patch_size) as f64 * d;
    let layer = 2.0 * t * d * (3.0 * d + d + 2.0 * i) + 4.0 * t * t * d;
    patch + v.num_hidden_layers as f64 * layer + 2.0 * d * proj as f64
}

/// FLOPs of the text encoder over `t` tokens, with cross-attention to `image_tokens` tokens of
/// width `dv` when given (the image keys/values counted once per pair).
fn text_flops(c: &BlipTextConfig, t: f64, cross: Option<(f64, f64)>) -> f64 {
    let (d, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let mut layer = 2.0 * t * d * (3.0 * d + d + 2.0 * i) + 4.0 * t * t * d;
    if let Some((n, dv)) = cross {
        layer += 2.0 * n * dv * 2.0 * d + 2.0 * t * d * 2.0 * d + 4.0 * t * n * d;
    }
    c.num_hidden_layers as f64 * layer
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

struct Op<'a> {
    name: &'static str,
    items: usize,
    unit: &'static str,
    flops: f64,
    run: Box<dyn Fn() -> Result<serde_json::Value> + 'a>,
}

fn main() -> Result<()> {
    blipsearch::model::device::tune_malloc();
    let o = parse()?;
    let device = Device::Cpu;
    let t = Instant::now();
    let retriever = Retriever::load(&ModelSource::Dir(o.retrieval.clone()), &device)
        .with_context(|| format!("loading {}", o.retrieval.display()))?;
    let captioner = Captioner::load(&ModelSource::Dir(o.caption.clone()), &device)
        .with_context(|| format!("loading {}", o.caption.display()))?;
    let load_s = t.elapsed().as_secs_f64();
    let photos = o
        .images
        .iter()
        .map(|p| load_image(p, DecodeLimits::default()))
        .collect::<Result<Vec<_>, _>>()?;
    let batch =
        |n: usize| -> Vec<DynamicImage> { photos.iter().cycle().take(n).cloned().collect() };
    let (b1, b8) = (batch(1), batch(8));
    let cfg = retriever.config().clone();
    let proj = cfg.image_text_hidden_size;
    let vit = vit_flops(&cfg.vision, proj);
    // Stored image features, as the engine keeps them for reranking (computed outside the timing).
    let stored: Tensor = retriever.embed_images(&b8)?.tokens;
    let stored_tokens = stored.dims()[1] as f64;
    let query_tokens = retriever.encode(&[QUERY])?.ids[0].len() as f64;
    let itm_texts = [LONG_TEXT; 8];
    let itm_tokens = retriever.encode(&itm_texts[..1])?.ids[0].len() as f64;
    let pairs: Vec<usize> = (0..8).collect();
    let caption_params = CaptionParams::default();
    let prompt_len = captioner.prompt_ids(&caption_params.prompt)?.len();

    let ops = [
        Op {
            name: "image_b1",
            items: 1,
            unit: "images/s",
            flops: vit,
            run: Box::new(|| {
                retriever.embed_images(&b1)?;
                Ok(json!({}))
            }),
        },
        Op {
            name: "image_b8",
            items: 8,
            unit: "images/s",
            flops: 8.0 * vit,
            run: Box::new(|| {
                retriever.embed_images(&b8)?;
                Ok(json!({}))
            }),
        },
        Op {
            name: "text_query",
            items: 1,
            unit: "queries/s",
            flops: text_flops(&cfg.text, query_tokens, None) + 2.0 * 768.0 * proj as f64,
            run: Box::new(|| {
                retriever.embed_texts(&[QUERY])?;
                Ok(json!({}))
            }),
        },
        Op {
            name: "itm",
            items: 8,
            unit: "pairs/s",
            flops: 8.0
                * text_flops(
                    &cfg.text,
                    itm_tokens,
                    Some((stored_tokens, cfg.vision.hidden_size as f64)),
                ),
            run: Box::new(|| {
                let s = retriever.itm(&itm_texts, &stored, &pairs, ItmFirstToken::Enc)?;
                Ok(json!({ "p_match": s.iter().map(|s| s.prob).collect::<Vec<_>>() }))
            }),
        },
        Op {
            name: "caption",
            items: 1,
            unit: "s/caption",
            flops: 0.0,
            run: Box::new(|| {
                let caps = captioner.caption_images(&b1, &caption_params)?;
                let c = &caps[0][0];
                Ok(json!({
                    "tokens": c.token_ids.len() - prompt_len,
                    "text": c.text,
                }))
            }),
        },
    ];
    let selected: Vec<&Op> = ops
        .iter()
        .filter(|op| o.ops.iter().any(|n| n == op.name))
        .collect();
    if selected.len() != o.ops.len() {
        bail!("unknown operation in --ops {:?}", o.ops);
    }
    println!(
        "{}",
        json!({
            "side": "ours",
            "kind": "info",
            "threads": candle_core::utils::get_num_threads(),
            "load_s": load_s,
            "query_tokens": query_tokens,
            "itm_tokens": itm_tokens,
        })
    );
    // Warm-up: thread pool, allocator, page cache of the weights.
    for op in &selected {
        (op.run)()?;
    }
    for op in &selected {
        let mut samples = Vec::with_capacity(o.iters);
        let mut extra = json!({});
        for _ in 0..o.iters {
            let t = Instant::now();
            extra = (op.run)()?;
            samples.push(t.elapsed().as_secs_f64());
        }
        println!(
            "{}",
            json!({
                "side": "ours",
                "kind": "op",
                "op": op.name,
                "items": op.items,
                "unit": op.unit,
                "flops": op.flops,
                "seconds": samples,
                "extra": extra,
            })
        );
    }
    println!(
        "{}",
        json!({ "side": "ours", "kind": "memory", "peak_rss_mib": peak_rss_mib() })
    );
    Ok(())
}
