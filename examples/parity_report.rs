//! Prints how far blipsearch's retrieval model is from transformers on a fixture directory written
//! by `tests/fixtures/generate.py` (tiny or `--full`), quantity by quantity.
//!
//! ```sh
//! python tests/fixtures/generate.py --full ~/.cache/blipsearch/full
//! cargo run --release --example parity_report -- ~/.cache/blipsearch/full
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};

use blipsearch::model::preprocess::{load_image, pixel_values, DecodeLimits};
use blipsearch::model::tokenizer::ENC;
use blipsearch::model::{ModelSource, Retriever};

fn diff(a: &Tensor, b: &Tensor) -> Result<(f32, f32)> {
    let d = (a - b)?.abs()?.flatten_all()?;
    Ok((d.max(0)?.to_scalar()?, d.mean(0)?.to_scalar()?))
}

fn main() -> Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: parity_report DIR")?,
    );
    let images_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images");
    let exp = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)?;
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let model = Retriever::load(&ModelSource::Dir(dir.join("retrieval")), &Device::Cpu)?;
    let size = model.config().vision.image_size;
    let names: Vec<String> = meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let imgs = names
        .iter()
        .map(|n| load_image(&images_dir.join(n), DecodeLimits::default()))
        .collect::<Result<Vec<_>, _>>()?;
    let row =
        |what: &str, (max, mean): (f32, f32)| println!("{what:<28} max {max:.3e}  mean {mean:.3e}");
    println!("{} ({} images, {}px)", dir.display(), names.len(), size);
    row(
        "pixel values",
        diff(
            &pixel_values(&imgs, size, &Device::Cpu)?,
            &exp["pixel_values"],
        )?,
    );
    let t = std::time::Instant::now();
    let out = model.embed_pixels(&exp["pixel_values"])?;
    let vit_s = t.elapsed().as_secs_f64();
    row(
        "ViT last hidden state",
        diff(&out.tokens, &exp["vision_last_hidden"])?,
    );
    row("image ITC", diff(&out.itc, &exp["image_embeds"])?);
    let ids = exp["input_ids"].to_dtype(DType::U32)?;
    let mask = exp["attention_mask"].to_dtype(DType::U32)?;
    row(
        "text last hidden state",
        diff(&model.text_hidden(&ids, &mask)?, &exp["text_last_hidden"])?,
    );
    row(
        "text ITC",
        diff(&model.text_itc(&ids, &mask)?, &exp["text_embeds"])?,
    );
    let pairs = meta["pairs"].as_array().unwrap();
    let text_of: Vec<u32> = pairs
        .iter()
        .map(|p| p[1].as_u64().unwrap() as u32)
        .collect();
    let image_of: Vec<usize> = pairs
        .iter()
        .map(|p| p[0].as_u64().unwrap() as usize)
        .collect();
    let sel = Tensor::new(text_of.as_slice(), &Device::Cpu)?;
    let (pids, pmask) = (ids.index_select(&sel, 0)?, mask.index_select(&sel, 0)?);
    let tokens = &exp["vision_last_hidden"];
    row(
        "ITM logits [CLS]",
        diff(
            &model.itm_logits(&pids, &pmask, tokens, &image_of)?,
            &exp["itm_logits_cls"],
        )?,
    );
    let enc = Tensor::cat(
        &[
            &Tensor::full(ENC, (pids.dims()[0], 1), &Device::Cpu)?,
            &pids.i((.., 1..))?,
        ],
        1,
    )?;
    row(
        "ITM logits [ENC]",
        diff(
            &model.itm_logits(&enc, &pmask, tokens, &image_of)?,
            &exp["itm_logits_enc"],
        )?,
    );
    println!("(ViT forward for {} images: {:.2} s)", names.len(), vit_s);
    Ok(())
}
