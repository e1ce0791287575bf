//! Bad checkpoints and bad images give named errors, never panics.

mod common;

use std::path::Path;

use candle_core::Device;
use common::*;

use blipsearch::model::preprocess::{load_image, DecodeLimits};
use blipsearch::model::{ModelError, ModelSource, Retriever};

fn copy_checkpoint(to: &Path) {
    copy_dir(&fixtures().join("tiny-a").join("retrieval"), to);
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

/// The error names exactly the files that are missing (the hint after it names every file a
/// checkpoint needs, so the list itself is what is checked).
#[test]
fn missing_files_say_what_and_how() {
    for (remove, missing) in [
        (
            &["model.safetensors"][..],
            "model.safetensors (or pytorch_model.bin)",
        ),
        (&["config.json"][..], "config.json"),
        (&["tokenizer.json"][..], ""),
        (&["vocab.txt"][..], ""),
        (
            &["tokenizer.json", "vocab.txt"][..],
            "tokenizer.json (or vocab.txt)",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        copy_checkpoint(tmp.path());
        for f in remove {
            std::fs::remove_file(tmp.path().join(f)).unwrap();
        }
        let loaded = load(tmp.path());
        if missing.is_empty() {
            assert!(loaded.is_ok(), "without {remove:?}: {:?}", loaded.err());
            continue;
        }
        let err = loaded.err().expect("must fail").to_string();
        let head = format!("model files missing for {}: ", tmp.path().display());
        let listed = err
            .strip_prefix(&head)
            .and_then(|rest| rest.split_once(". "))
            .map(|(list, _)| list);
        assert_eq!(listed, Some(missing), "without {remove:?}: {err}");
        assert!(err.contains("--model-dir"), "{err}");
    }
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
