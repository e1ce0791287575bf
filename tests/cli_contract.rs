//! The `embed` and `score` JSON contract, run through the real binary on a fixture checkpoint.

mod common;

use common::*;

fn norm(v: &serde_json::Value) -> f64 {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap().powi(2))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn embed_json_contract() {
    let dir = fixtures().join("tiny-a").join("retrieval");
    let img = fixtures().join("images").join("chelsea.png");
    let img2 = fixtures().join("images").join("rocket.jpg");
    let (ok, out, err) = blipsearch(&[
        "embed",
        "--model-dir",
        dir.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--image",
        img2.to_str().unwrap(),
        "--text",
        "a photo of a cat",
        "--text",
        "dog",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0]["path"], img.to_str().unwrap());
    assert_eq!(images[1]["path"], img2.to_str().unwrap());
    for i in images {
        assert_eq!(i["embedding"].as_array().unwrap().len(), 256);
        assert!((norm(&i["embedding"]) - 1.0).abs() < 1e-4);
    }
    let texts = v["texts"].as_array().unwrap();
    assert_eq!(texts.len(), 2);
    assert_eq!(texts[0]["text"], "a photo of a cat");
    assert_eq!(texts[1]["text"], "dog");
    for t in texts {
        assert_eq!(t["embedding"].as_array().unwrap().len(), 256);
        assert!((norm(&t["embedding"]) - 1.0).abs() < 1e-4);
    }
    // Text embeddings are fully determined by the checkpoint: compare with transformers.
    let meta = load_json(&fixtures().join("tiny-a").join("expected.json"));
    let expected = load_tensors(&fixtures().join("tiny-a").join("expected.safetensors"));
    let all: Vec<Vec<f32>> = expected["text_embeds"].to_vec2().unwrap();
    let idx = strings(&meta["texts"])
        .iter()
        .position(|t| t == "a photo of a cat")
        .unwrap();
    for (a, b) in texts[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&all[idx])
    {
        assert!((a.as_f64().unwrap() as f32 - b).abs() < 1e-4);
    }
}

#[test]
fn score_json_contract_and_first_token() {
    let dir = fixtures().join("tiny-a").join("retrieval");
    let img = fixtures().join("images").join("coffee.png");
    let run = |first: &str| {
        let (ok, out, err) = blipsearch(&[
            "score",
            "--model-dir",
            dir.to_str().unwrap(),
            img.to_str().unwrap(),
            "a cup of coffee",
            "a rocket launching",
            "--itm-first-token",
            first,
            "--json",
        ]);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let enc = run("enc");
    let cls = run("cls");
    assert_eq!(enc["image"], img.to_str().unwrap());
    let results = enc["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        let l = r["itm_logits"].as_array().unwrap();
        let (no, yes) = (l[0].as_f64().unwrap(), l[1].as_f64().unwrap());
        let p = 1.0 / (1.0 + (no - yes).exp());
        assert!((r["itm_prob"].as_f64().unwrap() - p).abs() < 1e-5);
        assert!(r["itc"].as_f64().unwrap().abs() <= 1.0 + 1e-5);
    }
    // ITC does not depend on the ITM first token; ITM does.
    for (a, b) in results.iter().zip(cls["results"].as_array().unwrap()) {
        assert_eq!(a["itc"], b["itc"]);
        assert_ne!(a["itm_logits"], b["itm_logits"]);
    }
}

#[test]
fn bad_inputs_fail_cleanly() {
    let dir = fixtures().join("tiny-a").join("retrieval");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("broken.jpg");
    std::fs::write(&bad, b"not a jpeg").unwrap();
    let (ok, _, err) = blipsearch(&[
        "score",
        "--model-dir",
        dir.to_str().unwrap(),
        bad.to_str().unwrap(),
        "a cat",
        "--json",
    ]);
    assert!(!ok);
    assert!(err.contains("broken.jpg"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let (ok, _, err) = blipsearch(&["embed", "--model-dir", "/nonexistent/dir", "--text", "x"]);
    assert!(!ok && err.contains("--model-dir"), "{err}");
    let (ok, _, err) = blipsearch(&[
        "embed",
        "--model-dir",
        dir.to_str().unwrap(),
        "--text",
        "!!! ...",
        "--json",
    ]);
    assert!(!ok && err.contains("empty"), "{err}");
    let (ok, _, err) = blipsearch(&["embed", "--model-dir", dir.to_str().unwrap()]);
    assert!(!ok && err.contains("nothing to embed"), "{err}");
}

#[test]
fn offline_hub_id_explains_model_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let out = command()
        .args([
            "embed",
            "--model",
            "Salesforce/blip-itm-base-coco",
            "--text",
            "a cat",
        ])
        // An empty cache.
        .env("HF_HOME", tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("config.json") && err.contains("--model-dir"),
        "{err}"
    );
}
