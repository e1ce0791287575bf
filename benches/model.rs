//! Model operations on a checkpoint: image encoding (batch 1 and 8), text query encoding and ITM
//! pairs. Uses the tiny fixture checkpoint by default (fast enough to run anywhere); set
//! `BLIPSEARCH_BENCH_MODEL_DIR` to a full-size checkpoint (e.g. one written by
//! `tests/fixtures/generate.py --full`) for real numbers:
//!
//! ```sh
//! BLIPSEARCH_BENCH_MODEL_DIR=~/.cache/blipsearch/full/retrieval cargo bench --bench model
//! ```

use std::path::PathBuf;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use blipsearch::model::preprocess::{load_image, DecodeLimits};
use blipsearch::model::{ItmFirstToken, ModelSource, Retriever};

fn model_dir() -> PathBuf {
    std::env::var_os("BLIPSEARCH_BENCH_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-a/retrieval")
        })
}

fn bench(c: &mut Criterion) {
    let dir = model_dir();
    let model = Retriever::load(&ModelSource::Dir(dir.clone()), &Device::Cpu).expect("load model");
    let images_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images");
    let photos: Vec<_> = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"]
        .iter()
        .map(|f| load_image(&images_dir.join(f), DecodeLimits::default()).expect("fixture image"))
        .collect();
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut g = c.benchmark_group(format!("model/{name}"));
    g.sample_size(10);
    for batch in [1usize, 8] {
        let imgs: Vec<_> = photos.iter().cycle().take(batch).cloned().collect();
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::new("embed_images", batch), &imgs, |b, imgs| {
            b.iter(|| model.embed_images(imgs).expect("embed"))
        });
    }
    let query = ["a dog playing on the beach"];
    g.throughput(Throughput::Elements(1));
    g.bench_function("embed_text_query", |b| {
        b.iter(|| model.embed_texts(&query).expect("embed"))
    });
    let tokens = model.embed_images(&photos[..1]).expect("embed").tokens;
    let long =
        "a man in a red jacket riding a bicycle down a busy city street next to a yellow taxi \
                while people walk past shops and a dog watches from the corner";
    let texts: Vec<&str> = std::iter::repeat_n(long, 16).collect();
    g.throughput(Throughput::Elements(texts.len() as u64));
    g.bench_function("itm_16_pairs_35_tokens", |b| {
        b.iter(|| {
            model
                .itm(&texts, &tokens, &[0; 16], ItmFirstToken::Enc)
                .expect("itm")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
