//! Shared helpers for the integration tests: fixture paths, generated images, tensor
//! comparisons, a Milvus Lite server ([`milvus`]) and an e-commerce catalogue ([`catalogue`]).
#![allow(dead_code)]

pub mod catalogue;
pub mod milvus;
pub mod products;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// The real binary, offline and without the user's `BLIPSEARCH_*` settings (models, index, store,
/// key, device), so that a test runs the same in any shell.
pub fn command() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_blipsearch"));
    c.env("HF_HUB_OFFLINE", "1");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("BLIPSEARCH_") {
            c.env_remove(name);
        }
    }
    c
}

/// Runs the real binary ([`command`]): (success, stdout, stderr).
pub fn blipsearch(args: &[&str]) -> (bool, String, String) {
    let out = command().args(args).output().expect("run blipsearch");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What a collection of retrieval model `r` (without captions) records about its models.
pub fn collection_info(r: &blipsearch::model::Retriever) -> blipsearch::index::CollectionInfo {
    let cfg = r.config();
    blipsearch::index::CollectionInfo::new(
        r.name(),
        None,
        r.embedding_dim(),
        cfg.vision.num_tokens(),
        cfg.vision.hidden_size,
    )
}

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// Copies the files of `from` into `to` (made if missing); links are copied as the files they
/// point to.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The tiny configs the generator writes.
pub const CONFIGS: [&str; 2] = ["tiny-a", "tiny-b"];

/// `n` distinct noise PNGs in `dir`, image `i` named `name(i)` and `size(i)` pixels; a seed
/// gives the same images on every run.
pub fn noise_pngs(
    dir: &Path,
    n: usize,
    seed: u32,
    size: impl Fn(usize) -> (u32, u32),
    name: impl Fn(usize) -> String,
) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| {
            let mut state = seed
                .wrapping_mul(2654435761)
                .wrapping_add(i as u32 * 40503 + 1);
            let (w, h) = size(i);
            let img = image::RgbImage::from_fn(w, h, |_, _| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
            });
            let p = dir.join(name(i));
            img.save(&p).unwrap();
            p
        })
        .collect()
}

/// A PNG whose header claims `w` x `h` 16-bit RGBA pixels (every row filtered "none", all
/// zeros, so it compresses to almost nothing): small on the wire, huge once decoded.
pub fn huge_png(w: u32, h: u32, compression: png::Compression) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, w, h);
        e.set_color(png::ColorType::Rgba);
        e.set_depth(png::BitDepth::Sixteen);
        e.set_compression(compression);
        let mut writer = e.write_header().unwrap();
        let mut stream = writer.stream_writer().unwrap();
        let row = vec![0u8; w as usize * 8];
        for _ in 0..h {
            stream.write_all(&row).unwrap();
        }
        stream.finish().unwrap();
    }
    out
}

/// The scenes of a synthetic world's test split (`test.jsonl`), by image file name
/// (`00012.png`).
pub fn synth_scenes(world: &Path) -> HashMap<String, serde_json::Value> {
    std::fs::read_to_string(world.join("test.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            let name = Path::new(r["image"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (name, r["scene"].clone())
        })
        .collect()
}

/// Tensors of a safetensors file.
pub fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
}

/// A parsed JSON file.
pub fn load_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// (max |a - b|, mean |a - b|).
pub fn diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let values = |t: &Tensor| -> Vec<f32> {
        t.flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (values(a), values(b));
    let mut max = 0f32;
    let mut sum = 0f64;
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        assert!(d.is_finite(), "non-finite value");
        max = max.max(d);
        sum += f64::from(d);
    }
    (max, (sum / a.len().max(1) as f64) as f32)
}

/// Asserts max |a - b| <= tol, naming what was compared.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let (max, mean) = diff(a, b);
    assert!(
        max <= tol,
        "{what}: max |diff| {max:e} > {tol:e} (mean {mean:e})"
    );
}

/// The strings of a JSON array.
pub fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}
