//! `synth-world`, `eval` and `capfilt-dataset` through the real binary, on the tiny random
//! fixture checkpoints (plumbing: the numbers are checked against `embed` and `score`, which
//! the parity tests tie to transformers).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn retrieval_dir() -> String {
    s(&fixtures().join("tiny-a").join("retrieval"))
}

fn caption_dir() -> String {
    s(&fixtures().join("tiny-a").join("caption"))
}

/// A fresh synthetic world with `test` test images.
fn world(test: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("world");
    let (ok, _, err) = blipsearch(&[
        "synth-world",
        &s(&out),
        "--train",
        "4",
        "--test",
        &test.to_string(),
        "--seed",
        "5",
        "--size",
        "32",
    ]);
    assert!(ok, "{err}");
    (dir, out)
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

/// Recall@1/5/10 (percent) from 0-based ranks.
fn recall(ranks: &[usize]) -> [f64; 3] {
    [1, 5, 10].map(|k| 100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64)
}

fn assert_recall(what: &str, got: &Value, want: [f64; 3]) {
    let got = [f(&got["r1"]), f(&got["r5"]), f(&got["r10"])];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-9, "{what}: {got:?} vs {want:?}");
    }
}

/// Rank of the first index of `order` (sorted by descending `score`) that `hit` accepts.
fn rank(score: &[f64], hit: impl Fn(usize) -> bool) -> usize {
    let mut idx: Vec<usize> = (0..score.len()).collect();
    idx.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
    idx.iter().position(|&i| hit(i)).unwrap()
}

#[test]
fn synth_world_refuses_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let out = s(&dir.path().join("w"));
    let (ok, _, err) = blipsearch(&["synth-world", &out, "--test", "289"]);
    assert!(!ok && err.contains("288"), "{err}");
    let (ok, _, err) = blipsearch(&["synth-world", &out, "--wrong-share", "1.5"]);
    assert!(!ok && err.contains("--wrong-share"), "{err}");
    let (ok, out_text, err) =
        blipsearch(&["synth-world", &out, "--train", "3", "--test", "2", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(json(&out_text)["test_images"], 2);
    let (ok, _, err) = blipsearch(&["synth-world", &out, "--train", "3", "--test", "2"]);
    assert!(!ok && err.contains("not empty"), "{err}");
}

/// eval's ITC and ITM numbers equal recall computed from `embed` and `score` outputs, for k
/// covering every candidate (so the rerank is the full ITM + ITC ordering).
#[test]
fn eval_recall_matches_embed_and_score() {
    let (_tmp, w) = world(6);
    let data = w.join("test.json");
    let ann = load_json(&data);
    let items = ann.as_array().unwrap();
    let mut texts = Vec::new();
    let mut owner = Vec::new();
    for (i, item) in items.iter().enumerate() {
        for t in strings(&item["caption"]) {
            texts.push(t);
            owner.push(i);
        }
    }
    let images: Vec<String> = items
        .iter()
        .map(|it| s(&w.join(it["image"].as_str().unwrap())))
        .collect();
    let (n_img, n_txt) = (images.len(), texts.len());

    let (ok, out, err) = blipsearch(&[
        "eval",
        &s(&data),
        "--model-dir",
        &retrieval_dir(),
        "--k",
        "100",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v = json(&out);
    assert_eq!(v["format"], "annotations");
    assert_eq!(v["images"], n_img);
    assert_eq!(v["texts"], n_txt);
    assert!(v.get("captions").is_none());
    let r = &v["retrieval"];

    // ITC from `embed`.
    let mut args = vec![
        "embed".to_string(),
        "--model-dir".into(),
        retrieval_dir(),
        "--json".into(),
    ];
    for i in &images {
        args.extend(["--image".into(), i.clone()]);
    }
    for t in &texts {
        args.extend(["--text".into(), t.clone()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = blipsearch(&argv);
    assert!(ok, "{err}");
    let e = json(&out);
    let vecs = |key: &str| -> Vec<Vec<f64>> {
        e[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["embedding"].as_array().unwrap().iter().map(f).collect())
            .collect()
    };
    let (iv, tv) = (vecs("images"), vecs("texts"));
    let sim = |i: usize, t: usize| iv[i].iter().zip(&tv[t]).map(|(a, b)| a * b).sum::<f64>();
    let tr: Vec<usize> = (0..n_img)
        .map(|i| {
            rank(&(0..n_txt).map(|t| sim(i, t)).collect::<Vec<_>>(), |t| {
                owner[t] == i
            })
        })
        .collect();
    let ir: Vec<usize> = (0..n_txt)
        .map(|t| {
            rank(&(0..n_img).map(|i| sim(i, t)).collect::<Vec<_>>(), |i| {
                i == owner[t]
            })
        })
        .collect();
    assert_recall("ITC TR", &r["itc"]["text_retrieval"], recall(&tr));
    assert_recall("ITC IR", &r["itc"]["image_retrieval"], recall(&ir));

    // ITM logit + ITC from `score`, every pair.
    let mut full = vec![vec![0.0; n_txt]; n_img];
    for (i, img) in images.iter().enumerate() {
        let mut args = vec!["score", "--model-dir"];
        let dir = retrieval_dir();
        args.push(&dir);
        args.push("--json");
        args.push(img);
        args.extend(texts.iter().map(String::as_str));
        let (ok, out, err) = blipsearch(&args);
        assert!(ok, "{err}");
        for (t, res) in json(&out)["results"].as_array().unwrap().iter().enumerate() {
            full[i][t] = f(&res["itm_logits"][1]) + f(&res["itc"]);
        }
    }
    let tr: Vec<usize> = (0..n_img)
        .map(|i| rank(&full[i], |t| owner[t] == i))
        .collect();
    let ir: Vec<usize> = (0..n_txt)
        .map(|t| {
            rank(&(0..n_img).map(|i| full[i][t]).collect::<Vec<_>>(), |i| {
                i == owner[t]
            })
        })
        .collect();
    assert_recall("ITM TR", &r["itm_rerank"]["text_retrieval"], recall(&tr));
    assert_recall("ITM IR", &r["itm_rerank"]["image_retrieval"], recall(&ir));
}

#[test]
fn eval_captions_and_formats() {
    let (_tmp, w) = world(5);
    let caps = w.join("caps.jsonl");
    // Karpathy file, test split, captions only.
    let (ok, out, err) = blipsearch(&[
        "eval",
        &s(&w.join("dataset_synth.json")),
        "--split",
        "test",
        "--no-retrieval",
        "--caption-model-dir",
        &caption_dir(),
        "--captions-out",
        &s(&caps),
        "--json",
    ]);
    assert!(ok, "{err}");
    let v = json(&out);
    assert_eq!(v["format"], "karpathy");
    assert_eq!(v["images"], 5);
    assert!(v.get("retrieval").is_none());
    let c = &v["captions"];
    assert_eq!(c["images"], 5);
    for key in ["bleu4", "cider"] {
        let x = f(&c[key]);
        assert!(x.is_finite() && x >= 0.0, "{key} {x}");
    }
    // The captions written are the `caption` command's (same defaults: 3 beams, max 20, min 5).
    let lines: Vec<Value> = std::fs::read_to_string(&caps)
        .unwrap()
        .lines()
        .map(json)
        .collect();
    assert_eq!(lines.len(), 5);
    let first = s(&w.join(lines[0]["image"].as_str().unwrap()));
    let (ok, out, err) = blipsearch(&["caption", "--model-dir", &caption_dir(), &first, "--json"]);
    assert!(ok, "{err}");
    assert_eq!(json(&out)["captions"][0]["text"], lines[0]["caption"]);

    // JSON lines, ITC only, text table.
    let (ok, out, err) = blipsearch(&[
        "eval",
        &s(&w.join("test.jsonl")),
        "--model-dir",
        &retrieval_dir(),
        "--k",
        "0",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("(jsonlines): 5 images, 5 texts"), "{out}");
    assert!(out.contains("ITC") && !out.contains("ITM"), "{out}");
}

#[test]
fn eval_reports_bad_datasets() {
    let (_tmp, w) = world(3);
    let bad = w.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"image\":\"images/test/00000.png\",\"caption\":\"a red circle\"}\n{\"image\": 3}\n",
    )
    .unwrap();
    let (ok, _, err) = blipsearch(&["eval", &s(&bad), "--model-dir", &retrieval_dir()]);
    assert!(!ok && err.contains("bad.jsonl line 2"), "{err}");

    let missing = w.join("missing.jsonl");
    std::fs::write(
        &missing,
        "{\"image\":\"images/test/nope.png\",\"caption\":\"a red circle\"}\n",
    )
    .unwrap();
    let (ok, _, err) = blipsearch(&["eval", &s(&missing), "--model-dir", &retrieval_dir()]);
    assert!(!ok && err.contains("nope.png"), "{err}");

    let (ok, _, err) = blipsearch(&[
        "eval",
        &s(&w.join("test.jsonl")),
        "--split",
        "test",
        "--model-dir",
        &retrieval_dir(),
    ]);
    assert!(!ok && err.contains("only Karpathy"), "{err}");
    let (ok, _, err) = blipsearch(&[
        "eval",
        &s(&w.join("dataset_synth.json")),
        "--model-dir",
        &retrieval_dir(),
    ]);
    assert!(!ok && err.contains("--split"), "{err}");
    let (ok, _, err) = blipsearch(&[
        "eval",
        &s(&w.join("test.jsonl")),
        "--no-retrieval",
        "--model-dir",
        &retrieval_dir(),
    ]);
    assert!(!ok && err.contains("nothing to evaluate"), "{err}");
}

#[test]
fn capfilt_dataset_writes_every_text_and_counts_by_source() {
    let (_tmp, w) = world(4);
    // The noisy test split plus a missing image.
    let input = w.join("in.jsonl");
    let mut text = std::fs::read_to_string(w.join("test_noisy.jsonl")).unwrap();
    text.push_str("{\"image\":\"images/test/gone.png\",\"caption\":\"a blue square\"}\n");
    std::fs::write(&input, text).unwrap();
    let out = w.join("boot.jsonl");
    let (ok, stdout, err) = blipsearch(&[
        "capfilt-dataset",
        &s(&input),
        &s(&out),
        "--caption-model-dir",
        &caption_dir(),
        "--itm-model-dir",
        &retrieval_dir(),
        "--samples",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v = json(&stdout);
    assert_eq!(v["images"], 4);
    let skipped = v["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0]["image"], "images/test/gone.png");
    assert_eq!(v["given"]["total"], 4);
    assert_eq!(v["beam"]["total"], 4);
    assert_eq!(v["sample"]["total"], 8);
    let records: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(json)
        .collect();
    assert_eq!(records.len(), 16);
    let kept = records.iter().filter(|r| r["kept"] == true).count();
    assert_eq!(v["kept"], kept);
    for r in &records {
        let p = f(&r["p_match"]);
        assert_eq!(r["kept"] == true, p >= 0.5, "{r}");
        assert_eq!(r.get("wrong").is_some(), r["source"] == "given", "{r}");
    }
    // Filter quality is computed from the marks.
    let q = &v["quality"];
    let wrong = records.iter().filter(|r| r["wrong"] == true).count();
    assert_eq!(q["wrong"], wrong);
    let dropped_wrong = records
        .iter()
        .filter(|r| r["wrong"] == true && r["kept"] == false)
        .count();
    assert_eq!(q["dropped_wrong"], dropped_wrong);

    // A malformed line is named and nothing is written.
    let bad = w.join("bad.jsonl");
    std::fs::write(&bad, "{\"image\":\"x.png\",\"caption\":\"a\"}\nnot json\n").unwrap();
    let (ok, _, err) = blipsearch(&[
        "capfilt-dataset",
        &s(&bad),
        &s(&w.join("never.jsonl")),
        "--caption-model-dir",
        &caption_dir(),
        "--itm-model-dir",
        &retrieval_dir(),
    ]);
    assert!(!ok && err.contains("bad.jsonl line 2"), "{err}");
    assert!(!w.join("never.jsonl").exists());
}
