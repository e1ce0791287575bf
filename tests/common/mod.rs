//! Shared helpers for the integration tests: fixture paths and tensor comparisons, and a Milvus
//! Lite server ([`milvus`]).
#![allow(dead_code)]

pub mod milvus;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// Runs the real binary offline, without the user's model/index variables: (success, stdout,
/// stderr).
pub fn blipsearch(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blipsearch"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("BLIPSEARCH_MODEL_DIR")
        .env_remove("BLIPSEARCH_CAPTION_MODEL_DIR")
        .env_remove("BLIPSEARCH_INDEX")
        .env_remove("BLIPSEARCH_STORE")
        .output()
        .expect("run blipsearch");
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

/// The tiny configs the generator writes.
pub const CONFIGS: [&str; 2] = ["tiny-a", "tiny-b"];

/// Tensors of a safetensors file.
pub fn load_tensors(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
}

/// A parsed JSON file.
pub fn load_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// (max |a - b|, mean |a - b|).
pub fn diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a: Vec<f32> = a
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = b
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
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
