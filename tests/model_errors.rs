//! Bad checkpoints and bad images give named errors, never panics.

mod common;

use std::path::Path;

use candle_core::Device;
use common::*;

use blipsearch::model::preprocess::{load_image, DecodeLimits};
use blipsearch::model::{ModelError, ModelSource, Retriever};

fn copy_checkpoint(to: &Path) {
    let from = fixtures().join("tiny-a").join("retrieval");
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn load(dir: &Path) -> Result<Retriever, ModelError> {
    Retriever::load(&ModelSource::Dir(dir.to_path_buf()), &Device::Cpu)
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_checkpoint(tmp.path());
    let weights = tmp.path().join("model.safetensors");
    let mut tensors = load_tensors(&weights);
    let victim = "text_encoder.encoder.layer.1.crossattention.self.key.weight";
    assert!(tensors.remove(victim).is_some(), "fixture lacks {victim}");
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let err = load(tmp.path())
        .err()
        .expect("loading must fail")
        .to_string();
    assert!(err.contains(victim), "{err}");
}

#[test]
fn wrong_shape_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_checkpoint(tmp.path());
    let weights = tmp.path().join("model.safetensors");
    let mut tensors = load_tensors(&weights);
    let name = "itm_head.weight";
    let t = tensors[name].clone();
    let bad = candle_core::Tensor::cat(&[&t, &t], 0).unwrap();
    tensors.insert(name.to_string(), bad);
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let err = load(tmp.path())
        .err()
        .expect("loading must fail")
        .to_string();
    assert!(err.contains(name), "{err}");
}

#[test]
fn unknown_architecture_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    copy_checkpoint(tmp.path());
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["BlipForQuestionAnswering"]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = load(tmp.path())
        .err()
        .expect("loading must fail")
        .to_string();
    assert!(
        err.contains("BlipForQuestionAnswering") && err.contains("BlipForImageTextRetrieval"),
        "{err}"
    );
}

#[test]
fn caption_checkpoint_is_not_a_retrieval_model() {
    let err = load(&fixtures().join("tiny-a").join("caption"))
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("BlipForConditionalGeneration"), "{err}");
}

#[test]
fn missing_files_say_what_and_how() {
    let tmp = tempfile::tempdir().unwrap();
    copy_checkpoint(tmp.path());
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let err = load(tmp.path()).err().expect("must fail").to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("--model-dir"),
        "{err}"
    );
}

#[test]
fn bad_image_files_name_the_file_and_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<u8>); 3] = [
        ("zero.jpg", vec![]),
        ("text.png", b"this is not a png".to_vec()),
        ("cut.jpg", {
            let full = std::fs::read(fixtures().join("images").join("rocket.jpg")).unwrap();
            full[..full.len() / 3].to_vec()
        }),
    ];
    for (name, bytes) in cases {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let err = load_image(&p, DecodeLimits::default()).err();
        let err = err
            .unwrap_or_else(|| panic!("{name} must be refused"))
            .to_string();
        assert!(err.contains(name), "{err}");
    }
    let missing = tmp.path().join("nope.jpg");
    let err = load_image(&missing, DecodeLimits::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.jpg"), "{err}");
    // Over the pixel limit.
    let big = fixtures().join("images").join("chelsea.png");
    let err = load_image(&big, DecodeLimits { max_pixels: 1000 })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("chelsea.png") && err.contains("limit"),
        "{err}"
    );
}
