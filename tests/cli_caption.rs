//! The `caption` and `capfilt` JSON contract, run through the real binary on fixture checkpoints.

mod common;

use common::*;

fn path(p: &std::path::Path) -> String {
    p.to_str().unwrap().to_string()
}

fn caption_dir() -> String {
    path(&fixtures().join("tiny-a").join("caption"))
}

fn image(name: &str) -> String {
    path(&fixtures().join("images").join(name))
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// HF's output for an image in a stored case of tiny-a.
fn hf_output(case: &str, img: &str) -> Vec<u64> {
    let meta = load_json(&fixtures().join("tiny-a").join("expected.json"));
    let i = strings(&meta["images"])
        .iter()
        .position(|f| f == img)
        .unwrap();
    let pc = meta["prompt_cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == case)
        .unwrap();
    ids(&pc["outputs"][i])
}

#[test]
fn caption_json_contract() {
    let dir = caption_dir();
    let (a, b) = (image("chelsea.png"), image("astronaut.png"));
    let (ok, out, err) = blipsearch(&["caption", "--model-dir", &dir, &a, &b, "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let caps = v["captions"].as_array().unwrap();
    assert_eq!(caps.len(), 2);
    assert_eq!(caps[0]["image"], a.as_str());
    assert_eq!(caps[1]["image"], b.as_str());
    // Defaults are BLIP's: prompt "a picture of ", 3 beams, max 20 / min 5.
    assert_eq!(
        ids(&caps[0]["token_ids"]),
        hf_output("beam3_prompt_min5", "chelsea.png")
    );
    assert_eq!(
        ids(&caps[1]["token_ids"]),
        hf_output("beam3_prompt_min5", "astronaut.png")
    );
    for c in caps {
        assert_eq!(ids(&c["token_ids"])[..4], [30522, 1037, 3861, 1997]);
        assert!(!c["text"].as_str().unwrap().starts_with("a picture of"));
    }

    // Greedy without a prompt.
    let (ok, out, err) = blipsearch(&[
        "caption",
        "--model-dir",
        &dir,
        &a,
        "--greedy",
        "--prompt",
        "",
        "--min-length",
        "0",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        ids(&v["captions"][0]["token_ids"]),
        hf_output("greedy_noprompt", "chelsea.png")
    );

    // Beam count and lengths.
    let (ok, out, err) = blipsearch(&[
        "caption",
        "--model-dir",
        &dir,
        &a,
        "--beams",
        "3",
        "--max-length",
        "12",
        "--min-length",
        "0",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        ids(&v["captions"][0]["token_ids"]),
        hf_output("beam3_prompt_max12", "chelsea.png")
    );
}

#[test]
fn caption_sampling_json_contract() {
    let dir = caption_dir();
    let a = image("coffee.png");
    let run = |seed: &str| {
        let (ok, out, err) = blipsearch(&[
            "caption",
            "--model-dir",
            &dir,
            &a,
            "--sample",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--samples",
            "3",
            "--json",
        ]);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let x = run("5");
    let caps = x["captions"].as_array().unwrap();
    assert_eq!(caps.len(), 3, "one entry per sample");
    for c in caps {
        assert_eq!(c["image"], a.as_str());
        assert!(ids(&c["token_ids"]).len() <= 20);
    }
    assert_eq!(x, run("5"), "same seed, same output");
    assert_ne!(x, run("6"));
}

#[test]
fn capfilt_json_contract() {
    let (cap, itm) = (
        caption_dir(),
        path(&fixtures().join("tiny-a").join("retrieval")),
    );
    let a = image("rocket.jpg");
    // `capfilt` on the rocket with both models, `--json` and `extra`.
    let capfilt = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "capfilt",
            "--caption-model-dir",
            &cap,
            "--itm-model-dir",
            &itm,
            &a,
            "--json",
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) = blipsearch(&args);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let texts_and_samples = [
        "--text",
        "a rocket launching",
        "--text",
        "a cup of coffee",
        "--samples",
        "2",
    ];
    let v = capfilt(&texts_and_samples);
    assert_eq!(v["image"], a.as_str());
    assert_eq!(v["threshold"].as_f64().unwrap(), 0.5);
    let c = v["candidates"].as_array().unwrap();
    let sources: Vec<&str> = c.iter().map(|x| x["source"].as_str().unwrap()).collect();
    assert_eq!(sources, ["given", "given", "beam", "sample", "sample"]);
    assert_eq!(c[0]["text"], "a rocket launching");
    for x in c {
        let p = x["p_match"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p));
        assert_eq!(x["kept"].as_bool().unwrap(), p >= 0.5);
    }
    // The given texts' p(match) is what `score` reports with [ENC].
    let (ok, out, err) = blipsearch(&[
        "score",
        "--model-dir",
        &itm,
        &a,
        "a rocket launching",
        "a cup of coffee",
        "--json",
    ]);
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    for k in 0..2 {
        let want = s["results"][k]["itm_prob"].as_f64().unwrap();
        assert!((c[k]["p_match"].as_f64().unwrap() - want).abs() < 1e-5);
    }
    // The beam caption is the captioner's default caption.
    let (ok, out, err) = blipsearch(&["caption", "--model-dir", &cap, &a, "--json"]);
    assert!(ok, "{err}");
    let cv: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(c[2]["text"], cv["captions"][0]["text"]);
    // Threshold 0 keeps everything that was scored; 1 keeps only a p(match) of exactly 1 (the
    // filter keeps `p_match >= threshold`), with and without given texts and samples.
    for threshold in ["0", "1"] {
        for extra in [&["--samples", "0"][..], &texts_and_samples[..]] {
            let v = capfilt(&[&["--threshold", threshold][..], extra].concat());
            let t: f64 = threshold.parse().unwrap();
            assert_eq!(v["threshold"].as_f64().unwrap(), t);
            let c = v["candidates"].as_array().unwrap();
            let sources: Vec<&str> = c.iter().map(|x| x["source"].as_str().unwrap()).collect();
            if extra.len() == 2 {
                assert_eq!(sources, ["beam"]);
            } else {
                assert_eq!(sources, ["given", "given", "beam", "sample", "sample"]);
            }
            for x in c {
                let p = x["p_match"].as_f64().unwrap();
                let kept = x["kept"].as_bool().unwrap();
                if t == 0.0 {
                    assert!(kept, "threshold 0 keeps {x}");
                } else {
                    assert_eq!(kept, p == 1.0, "threshold 1: {x}");
                }
            }
        }
    }
}

#[test]
fn bad_caption_inputs_fail_cleanly() {
    let dir = caption_dir();
    let a = image("chelsea.png");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("broken.jpg");
    std::fs::write(&bad, b"not a jpeg").unwrap();
    let bad = path(&bad);
    let retrieval = path(&fixtures().join("tiny-a").join("retrieval"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["caption", "--model-dir", &dir, &bad, "--json"],
            "broken.jpg",
        ),
        (
            vec![
                "caption",
                "--model-dir",
                &dir,
                &a,
                "--max-length",
                "4",
                "--min-length",
                "0",
            ],
            "prompt",
        ),
        (
            vec![
                "caption",
                "--model-dir",
                &dir,
                &a,
                "--sample",
                "--samples",
                "0",
            ],
            "samples",
        ),
        (
            vec!["caption", "--model-dir", &dir, &a, "--beams", "0"],
            "beams",
        ),
        (
            vec![
                "caption",
                "--model-dir",
                &dir,
                &a,
                "--sample",
                "--top-p",
                "0",
            ],
            "top_p",
        ),
        (
            vec!["caption", "--model-dir", &dir, &a, "--greedy", "--sample"],
            "cannot be used",
        ),
        (
            vec!["caption", "--model-dir", &dir, &a, "--seed", "3"],
            "--sample",
        ),
        (
            vec!["caption", "--model-dir", "/nonexistent/dir", &a],
            "--model-dir",
        ),
        (
            vec!["caption", "--model-dir", &retrieval, &a],
            "BlipForConditionalGeneration",
        ),
        (
            vec![
                "capfilt",
                "--caption-model-dir",
                &dir,
                "--itm-model-dir",
                &dir,
                &a,
            ],
            "BlipForImageTextRetrieval",
        ),
        (
            vec![
                "capfilt",
                "--caption-model-dir",
                &dir,
                "--itm-model-dir",
                &dir,
                &a,
                "--threshold",
                "2",
            ],
            "threshold",
        ),
    ];
    for (args, needle) in cases {
        let (ok, _, err) = blipsearch(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
