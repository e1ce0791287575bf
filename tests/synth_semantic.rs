//! Semantic checks on the tiny models trained on the synthetic world (`tests/fixtures/synth/`,
//! trained with `blipsearch train` on `blipsearch synth-world` output; the world is regenerated
//! here from the parameters in `world.json`, byte-identical to the one trained on). The test
//! images were never trained on; their scenes were, in other renderings (see `eval::synth`).

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

fn recall(v: &Value, scoring: &str, direction: &str) -> f64 {
    v["retrieval"][scoring][direction]["r1"].as_f64().unwrap()
}

/// Share of captions naming each attribute of the scene right: colour, shape, size, count,
/// position (the count word is "a" for one), and colour and shape together.
fn attribute_accuracy(caps: &Path, scenes: &HashMap<String, Value>) -> [f64; 6] {
    let lines: Vec<Value> = std::fs::read_to_string(caps)
        .unwrap()
        .lines()
        .map(json)
        .collect();
    let mut right = [0usize; 6];
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
        let colour = has(scene["colour"].as_str().unwrap());
        let shape = has(shape) || has(&format!("{shape}s"));
        let checks = [
            colour,
            shape,
            has(scene["size"].as_str().unwrap()),
            has(count),
            has(scene["position"].as_str().unwrap()),
            colour && shape,
        ];
        for (r, ok) in right.iter_mut().zip(checks) {
            *r += ok as usize;
        }
    }
    right.map(|r| r as f64 / lines.len() as f64)
}

/// The captioner on the 200 test images (new renderings of training scenes). Measured with the committed checkpoint (3450
/// steps): colour 1.00, shape 0.915, size 0.97, count 0.925, position 0.57 (chance 0.25), colour
/// and shape together 0.915, BLEU-4 76.7, CIDEr 659.3 (x100). The target is the right shape and
/// colour for most images; the thresholds leave a margin under the measured figures.
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
    let acc = attribute_accuracy(&caps, &common::synth_scenes(&w));
    eprintln!("{v}\ncolour, shape, size, count, position, colour+shape right: {acc:?}");
    let [colour, shape, size, count, position, both] = acc;
    assert!(colour >= 0.95, "colour right on {colour}");
    assert!(shape >= 0.85, "shape right on {shape}");
    assert!(both >= 0.85, "colour and shape right together on {both}");
    assert!(size >= 0.9, "size right on {size}");
    assert!(count >= 0.85, "count right on {count} (chance 0.33)");
    assert!(
        position >= 0.45,
        "position right on {position} (chance 0.25)"
    );
    let cider = v["captions"]["cider"].as_f64().unwrap();
    let bleu4 = v["captions"]["bleu4"].as_f64().unwrap();
    assert!(
        cider > 550.0 && bleu4 > 65.0,
        "CIDEr {cider}, BLEU-4 {bleu4}"
    );
}

/// Retrieval on the 200 test images (600 captions, each matching exactly one image):
/// `eval --k 16 --json`.
fn held_out_retrieval() -> Value {
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
    v
}

/// What the committed retrieval model does: ITC ranks far above chance (R@1 0.5%, R@10 5% for
/// text->image; R@1 1.5%, R@10 15% for image->text, three captions per image). Measured: IR R@1
/// 93.8, R@10 99.5; TR R@1 93.0, R@10 98.5.
#[test]
fn held_out_itc_retrieval_beats_chance() {
    let v = held_out_retrieval();
    let itc = &v["retrieval"]["itc"];
    let ir = &itc["image_retrieval"];
    let tr = &itc["text_retrieval"];
    let get = |x: &Value, k: &str| x[k].as_f64().unwrap();
    assert!(get(ir, "r1") >= 85.0 && get(ir, "r10") >= 95.0, "IR {ir}");
    assert!(get(tr, "r1") >= 85.0 && get(tr, "r10") >= 95.0, "TR {tr}");
}

/// The ITM rerank (ITC top 16) ranks better than ITC alone, summed over both directions (R@1).
/// Measured: text->image 99.3 with rerank against 93.8, image->text 95.5 against 93.0.
#[test]
fn held_out_itm_rerank_beats_itc() {
    let v = held_out_retrieval();
    let ir_itc = recall(&v, "itc", "image_retrieval");
    let ir_itm = recall(&v, "itm_rerank", "image_retrieval");
    let tr_itc = recall(&v, "itc", "text_retrieval");
    let tr_itm = recall(&v, "itm_rerank", "text_retrieval");
    assert!(
        ir_itm + tr_itm > ir_itc + tr_itc,
        "rerank ({tr_itm}, {ir_itm}) no better than ITC ({tr_itc}, {ir_itc})"
    );
}

/// The target: text->image R@1 >= 80% with the ITM rerank, and the rerank better than ITC.
/// Measured: text->image R@1 99.3 with rerank (93.8 ITC), image->text 95.5 (93.0).
#[test]
fn held_out_itm_rerank_reaches_the_target() {
    let v = held_out_retrieval();
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

/// The target: CapFilt's filter drops the injected wrong captions of `test_noisy.jsonl` with
/// precision and recall >= 0.9. Measured: all 40 wrong captions dropped and 2 of the 160 right
/// ones (precision 0.952, recall 1.0).
#[test]
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

const QUERIES: [(&str, &str, &str); 6] = [
    ("a red circle", "red", "circle"),
    ("a blue square", "blue", "square"),
    ("a green triangle", "green", "triangle"),
    ("a yellow circle", "yellow", "circle"),
    ("a red triangle", "red", "triangle"),
    ("a green square", "green", "square"),
];

/// Ingests the test images with `add` (captions on) and runs every query of [`QUERIES`]
/// at each `--rerank-k` of `reranks`: (query, rerank, colour, shape, scene of the first hit).
fn first_hits(reranks: &[&'static str]) -> Vec<(String, &'static str, String, String, Value)> {
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
    let scenes = common::synth_scenes(&w);
    let mut out = Vec::new();
    for &rerank in reranks {
        for (q, colour, shape) in QUERIES {
            let (ok, stdout, err) = blipsearch(&[
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
            let hits = json(&stdout)["hits"].as_array().unwrap().clone();
            assert!(!hits.is_empty(), "{q}: no results");
            let first = Path::new(hits[0]["path"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((
                q.to_string(),
                rerank,
                colour.to_string(),
                shape.to_string(),
                scenes[&first].clone(),
            ));
        }
    }
    out
}

/// The first hit without rerank (hybrid ITC + BM25 over the captions) is the asked colour and
/// shape: 6 of 6 measured.
#[test]
fn search_finds_the_described_scenes() {
    for (q, rerank, colour, shape, scene) in first_hits(&["0"]) {
        assert!(
            scene["colour"] == colour.as_str() && scene["shape"] == shape.as_str(),
            "{q} (rerank {rerank}): first hit is {scene}"
        );
    }
}

/// The target: the first hit is the asked colour and shape with the ITM rerank as well (6 of 6
/// measured, with and without; the retrieval model was trained on partial captions too).
#[test]
fn search_with_rerank_finds_the_described_scenes() {
    for (q, rerank, colour, shape, scene) in first_hits(&["0", "16"]) {
        assert!(
            scene["colour"] == colour.as_str() && scene["shape"] == shape.as_str(),
            "{q} (rerank {rerank}): first hit is {scene}"
        );
    }
}
