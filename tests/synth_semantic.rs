//! Semantic checks on the tiny models trained on the synthetic world (`tests/fixtures/synth/`,
//! trained with `blipsearch train` on `blipsearch synth-world` output; the world is regenerated
//! here from the parameters in `world.json`, byte-identical to the one trained on). The test
//! split was never trained on.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn synth() -> PathBuf {
    fixtures().join("synth")
}

fn retrieval_dir() -> String {
    s(&synth().join("retrieval"))
}

fn caption_dir() -> String {
    s(&synth().join("caption"))
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// The world the fixtures were trained on, regenerated.
fn world() -> (tempfile::TempDir, PathBuf) {
    let w = load_json(&synth().join("world.json"));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("world");
    let num = |v: &Value| v.as_f64().unwrap().to_string();
    let (ok, _, err) = blipsearch(&[
        "synth-world",
        &s(&out),
        "--train",
        &num(&w["summary"]["train_images"]),
        "--test",
        &num(&w["summary"]["test_images"]),
        "--seed",
        &num(&w["seed"]),
        "--size",
        &num(&w["size"]),
        "--wrong-share",
        &num(&w["wrong_share"]),
    ]);
    assert!(ok, "{err}");
    // The same world: the regenerated files hash as the ones the fixtures were trained on.
    let record = load_json(&out.join("world.json"));
    for key in ["train_jsonl_sha256", "test_jsonl_sha256"] {
        assert_eq!(
            record[key], w[key],
            "{key}: the regenerated world differs from the trained one"
        );
    }
    (dir, out)
}

/// Test scenes by image file name (`00012.png`).
fn scenes(world: &Path) -> HashMap<String, Value> {
    std::fs::read_to_string(world.join("test.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let r = json(l);
            let name = Path::new(r["image"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (name, r["scene"].clone())
        })
        .collect()
}

fn recall(v: &Value, scoring: &str, direction: &str) -> f64 {
    v["retrieval"][scoring][direction]["r1"].as_f64().unwrap()
}

/// Share of captions naming each attribute of the scene right: colour, shape, size, count,
/// position (the count word is "a" for one).
fn attribute_accuracy(caps: &Path, scenes: &HashMap<String, Value>) -> [f64; 5] {
    let lines: Vec<Value> = std::fs::read_to_string(caps)
        .unwrap()
        .lines()
        .map(json)
        .collect();
    let mut right = [0usize; 5];
    for l in &lines {
        let name = Path::new(l["image"].as_str().unwrap())
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let scene = &scenes[&name];
        let words: Vec<&str> = l["caption"].as_str().unwrap().split_whitespace().collect();
        let has = |w: &str| words.contains(&w);
        let shape = scene["shape"].as_str().unwrap();
        let count = match scene["count"].as_u64().unwrap() {
            1 => "a",
            2 => "two",
            _ => "three",
        };
        let checks = [
            has(scene["colour"].as_str().unwrap()),
            has(shape) || has(&format!("{shape}s")),
            has(scene["size"].as_str().unwrap()),
            has(count),
            has(scene["position"].as_str().unwrap()),
        ];
        for (r, ok) in right.iter_mut().zip(checks) {
            *r += ok as usize;
        }
    }
    right.map(|r| r as f64 / lines.len() as f64)
}

/// The captioner on the 200 held-out scenes. Measured with the committed checkpoint (20 epochs):
/// colour 1.00, shape 0.405, size 0.95, count 0.73, position 0.23 (always "at the bottom"; chance
/// is 0.25), BLEU-4 49.6, CIDEr 357.6 (x100). It has learnt colour, size and mostly count, not yet
/// shape or position: the thresholds below hold what it does and fail if that regresses.
#[test]
fn held_out_captions() {
    let (_tmp, w) = world();
    let caps = w.join("captions.jsonl");
    let (ok, out, err) = blipsearch(&[
        "eval",
        &s(&w.join("test.json")),
        "--no-retrieval",
        "--caption-model-dir",
        &caption_dir(),
        "--captions-out",
        &s(&caps),
        "--json",
    ]);
    assert!(ok, "{err}");
    let v = json(&out);
    let acc = attribute_accuracy(&caps, &scenes(&w));
    eprintln!("{v}\ncolour, shape, size, count, position right: {acc:?}");
    let [colour, _shape, size, count, _position] = acc;
    assert!(colour >= 0.95, "colour right on {colour}");
    assert!(size >= 0.85, "size right on {size}");
    assert!(count >= 0.6, "count right on {count} (chance 0.33)");
    let cider = v["captions"]["cider"].as_f64().unwrap();
    let bleu4 = v["captions"]["bleu4"].as_f64().unwrap();
    assert!(
        cider > 250.0 && bleu4 > 35.0,
        "CIDEr {cider}, BLEU-4 {bleu4}"
    );
}

/// Retrieval on the 200 held-out scenes (600 captions, each matching exactly one image).
#[test]
#[ignore = "needs tests/fixtures/synth/retrieval from issue8-train"]
fn held_out_retrieval() {
    let (_tmp, w) = world();
    let (ok, out, err) = blipsearch(&[
        "eval",
        &s(&w.join("test.json")),
        "--model-dir",
        &retrieval_dir(),
        "--k",
        "16",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v = json(&out);
    eprintln!("{v}");
    let ir_itc = recall(&v, "itc", "image_retrieval");
    let ir_itm = recall(&v, "itm_rerank", "image_retrieval");
    let tr_itc = recall(&v, "itc", "text_retrieval");
    let tr_itm = recall(&v, "itm_rerank", "text_retrieval");
    assert!(ir_itm >= 80.0, "text->image R@1 with rerank {ir_itm}");
    assert!(
        ir_itm + tr_itm > ir_itc + tr_itc,
        "rerank ({tr_itm}, {ir_itm}) no better than ITC ({tr_itc}, {ir_itc})"
    );
}

#[test]
#[ignore = "needs tests/fixtures/synth/retrieval from issue8-train"]
fn capfilt_drops_the_wrong_captions() {
    let (_tmp, w) = world();
    let (ok, out, err) = blipsearch(&[
        "capfilt-dataset",
        &s(&w.join("test_noisy.jsonl")),
        &s(&w.join("boot.jsonl")),
        "--caption-model-dir",
        &caption_dir(),
        "--itm-model-dir",
        &retrieval_dir(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let v = json(&out);
    eprintln!("{v}");
    let q = &v["quality"];
    assert!(q["wrong"].as_u64().unwrap() > 0);
    let precision = q["precision"].as_f64().unwrap();
    let recall = q["recall"].as_f64().unwrap();
    assert!(precision >= 0.9, "precision {precision}");
    assert!(recall >= 0.9, "recall {recall}");
}

#[test]
#[ignore = "needs tests/fixtures/synth/retrieval from issue8-train"]
fn search_finds_the_described_scenes() {
    let (tmp, w) = world();
    let index = tmp.path().join("index");
    let (ok, _, err) = blipsearch(&[
        "add",
        "--index",
        &s(&index),
        "--model-dir",
        &retrieval_dir(),
        "--caption-model-dir",
        &caption_dir(),
        "--samples",
        "1",
        &s(&w.join("images/test")),
    ]);
    assert!(ok, "{err}");
    let scenes = scenes(&w);
    let queries = [
        ("a red circle", "red", "circle"),
        ("a blue square", "blue", "square"),
        ("a green triangle", "green", "triangle"),
        ("a yellow circle", "yellow", "circle"),
        ("a red triangle", "red", "triangle"),
        ("a green square", "green", "square"),
    ];
    for rerank in ["0", "16"] {
        for (q, colour, shape) in queries {
            let (ok, out, err) = blipsearch(&[
                "search",
                "--index",
                &s(&index),
                q,
                "--rerank-k",
                rerank,
                "--limit",
                "3",
                "--json",
            ]);
            assert!(ok, "{err}");
            let hits = json(&out)["hits"].as_array().unwrap().clone();
            assert!(!hits.is_empty(), "{q}: no results");
            let first = Path::new(hits[0]["path"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let scene = &scenes[&first];
            assert!(
                scene["colour"] == colour && scene["shape"] == shape,
                "{q} (rerank {rerank}): first hit {first} is {scene}"
            );
        }
    }
}
