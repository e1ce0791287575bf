//! Ingestion through the real binary on the tiny fixture models: incremental runs, bad files,
//! and crash safety under `kill -9`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn bin() -> Command {
    let mut c = command();
    c.env("RUST_LOG", "warn");
    c
}

fn model_args() -> Vec<String> {
    let f = fixtures().join("tiny-a");
    vec![
        "--model-dir".into(),
        f.join("retrieval").display().to_string(),
        "--caption-model-dir".into(),
        f.join("caption").display().to_string(),
    ]
}

/// `n` distinct small PNGs (different noise) in `dir`.
fn make_images(dir: &Path, n: usize, seed: u32) -> Vec<PathBuf> {
    common::noise_pngs(
        dir,
        n,
        seed,
        |_| (40, 30),
        |i| format!("img_{seed}_{i:03}.png"),
    )
}

fn run_json(args: &[String]) -> serde_json::Value {
    let out = bin().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn add(index: &Path, extra: &[&str], paths: &[&Path]) -> serde_json::Value {
    let mut args: Vec<String> = vec![
        "add".into(),
        "--index".into(),
        index.display().to_string(),
        "--json".into(),
    ];
    args.extend(model_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(paths.iter().map(|p| p.display().to_string()));
    run_json(&args)
}

/// The tiny-b retrieval checkpoint (another model than `model_args`'), as an argument.
fn tiny_b() -> String {
    fixtures().join("tiny-b/retrieval").display().to_string()
}

/// `reindex` of `index` onto the tiny-b model, without captions; its JSON summary.
fn reindex_to_tiny_b(index: &Path) -> serde_json::Value {
    run_json(&[
        "reindex".into(),
        "--index".into(),
        index.display().to_string(),
        "--json".into(),
        "--no-captions".into(),
        "--model-dir".into(),
        tiny_b(),
    ])
}

fn stats(index: &Path) -> serde_json::Value {
    run_json(&[
        "stats".into(),
        "--index".into(),
        index.display().to_string(),
        "--json".into(),
    ])["stats"]
        .clone()
}

/// Every record is findable by its own vector and its file name, and has its rerank features and
/// thumbnail: nothing half-written is visible.
fn assert_searchable(index: &Path) {
    use blipsearch::index::{BlobStore, Collection, Filter, HnswParams, Store};
    let c = Collection::open_existing(index, HnswParams::default()).unwrap();
    let blobs = BlobStore::open(index).unwrap();
    let mut records = Vec::new();
    c.for_each(&mut |r| {
        records.push(r);
        Ok(())
    })
    .unwrap();
    for r in records {
        let hits = c
            .vector_search(&r.itc, 1, None, &Filter::default())
            .unwrap();
        assert_eq!(
            hits.first().map(|h| h.0),
            Some(r.id),
            "{} not found by its vector",
            r.path
        );
        let stem = Path::new(&r.path)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .replace('_', " ");
        let words = stem.split(' ').next_back().unwrap().to_string();
        let text = c.text_search(&words, 5, &Filter::default()).unwrap();
        assert!(
            text.iter().any(|h| h.0 == r.id),
            "{} not found by file name {words}",
            r.path
        );
        blobs.features(r.id).unwrap();
        assert!(!blobs.thumbnail(r.id).unwrap().is_empty());
    }
}

fn assert_consistent(index: &Path) -> u64 {
    let s = stats(index);
    let images = s["images"].as_u64().unwrap();
    assert_eq!(s["vectors"].as_u64().unwrap(), images, "hnsw vs sled: {s}");
    assert_eq!(
        s["text_docs"].as_u64().unwrap(),
        images,
        "tantivy vs sled: {s}"
    );
    assert_eq!(s["pending"].as_u64().unwrap(), 0, "{s}");
    images
}

#[test]
fn incremental_add_sync_remove_and_bad_files() {
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    let index = tmp.path().join("index");
    let imgs = make_images(&photos, 5, 1);
    std::fs::copy(
        fixtures().join("images/chelsea_exif6.jpg"),
        photos.join("cat.jpg"),
    )
    .unwrap();
    std::fs::write(photos.join("cat.txt"), "a cat lying on a rug").unwrap();
    std::fs::copy(&imgs[0], photos.join("copy_of_first.png")).unwrap(); // duplicate content
    std::fs::write(photos.join("empty.jpg"), b"").unwrap();
    std::fs::write(photos.join("fake.png"), b"I am text").unwrap();
    let cut = std::fs::read(fixtures().join("images/rocket.jpg")).unwrap();
    std::fs::write(photos.join("cut.jpg"), &cut[..cut.len() / 2]).unwrap();
    std::fs::write(photos.join("notes.pdf"), b"%PDF").unwrap();
    std::fs::write(photos.join(".secret.png"), b"x").unwrap();

    let s = add(&index, &["--samples", "1"], &[&photos]);
    assert_eq!(s["added"], 6, "{s}");
    assert_eq!(s["duplicates"], 1, "{s}");
    assert_eq!(s["failed"].as_array().unwrap().len(), 3, "{s}");
    assert_eq!(s["unsupported"], 1, "{s}");
    assert_eq!(s["hidden"], 1, "{s}");
    let reasons = s["failed"].to_string();
    assert!(
        reasons.contains("empty") && reasons.contains("truncated"),
        "{reasons}"
    );
    assert_eq!(assert_consistent(&index), 6);

    // Nothing changed: nothing is embedded again.
    let s = add(&index, &["--no-captions"], &[&photos]);
    assert_eq!(
        (s["added"].as_u64(), s["unchanged"].as_u64()),
        (Some(0), Some(6)),
        "{s}"
    );

    // A changed file is embedded again; a deleted one goes with sync.
    make_images(&tmp.path().join("other"), 1, 9);
    std::fs::copy(tmp.path().join("other/img_9_000.png"), &imgs[1]).unwrap();
    std::fs::remove_file(&imgs[2]).unwrap();
    let mut args: Vec<String> = vec![
        "sync".into(),
        "--index".into(),
        index.display().to_string(),
        "--json".into(),
        "--no-captions".into(),
    ];
    args.extend(model_args());
    args.push(photos.display().to_string());
    let s = run_json(&args);
    assert_eq!(
        (s["updated"].as_u64(), s["removed"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
    assert_eq!(assert_consistent(&index), 5);

    // remove by path
    let out = bin()
        .args([
            "remove",
            "--index",
            index.to_str().unwrap(),
            imgs[3].to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(assert_consistent(&index), 4);
    // One unknown target among known ones removes nothing.
    let out = bin()
        .args([
            "remove",
            "--index",
            index.to_str().unwrap(),
            imgs[4].to_str().unwrap(),
            "/no/such/file.png",
            "999999",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("/no/such/file.png, 999999") && err.contains("nothing was removed"),
        "{err}"
    );
    assert_eq!(assert_consistent(&index), 4);

    // Another model on the same index is refused with a hint.
    let mut args: Vec<String> = vec![
        "add".into(),
        "--index".into(),
        index.display().to_string(),
        "--no-captions".into(),
    ];
    args.extend([
        "--model-dir".into(),
        fixtures().join("tiny-b/retrieval").display().to_string(),
    ]);
    args.push(photos.display().to_string());
    let out = bin().args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("reindex"), "{err}");
    // reindex moves the collection to the other model, keeping its images.
    let s = reindex_to_tiny_b(&index);
    assert_eq!(s["added"], 4, "{s}");
    assert_eq!(assert_consistent(&index), 4);
    let info = run_json(&[
        "stats".into(),
        "--index".into(),
        index.display().to_string(),
        "--json".into(),
    ])["info"]
        .clone();
    assert!(
        info["retrieval_model"].as_str().unwrap().contains("tiny-b"),
        "{info}"
    );
}

#[test]
fn kill_minus_nine_mid_ingest_leaves_a_consistent_index() {
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    let index = tmp.path().join("index");
    let n = 160;
    make_images(&photos, n, 7);
    // Kill moments: during start-up (before anything is committed), then after the 1st, 3rd, 7th
    // and 12th commit of a run, i.e. always while it is still ingesting.
    let plans: [(u64, usize); 5] = [(30, 0), (0, 1), (0, 3), (0, 7), (0, 12)];
    let mut interrupted = 0;
    for (round, &(delay_ms, after_commits)) in plans.iter().enumerate() {
        let mut args: Vec<String> =
            vec!["add".into(), "--index".into(), index.display().to_string()];
        args.extend(model_args());
        args.extend(
            ["--no-captions", "--batch-size", "2", "--commit-every", "2"].map(String::from),
        );
        args.push(photos.display().to_string());
        let mut child = bin()
            .args(&args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let reader = std::thread::spawn(move || {
            let mut committed = 0u64;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("committed: ") {
                    committed = rest.split(' ').next().unwrap().parse().unwrap();
                    let _ = tx.send(committed);
                }
            }
            committed
        });
        if after_commits == 0 {
            std::thread::sleep(Duration::from_millis(delay_ms));
        } else {
            for _ in 0..after_commits {
                if rx.recv_timeout(Duration::from_secs(60)).is_err() {
                    break; // the run ended (or stalled): kill whatever is left
                }
            }
        }
        if child.try_wait().unwrap().is_none() {
            interrupted += 1;
        }
        let _ = child.kill(); // SIGKILL on unix
        let _ = child.wait();
        let reported = reader.join().unwrap();
        let out = bin()
            .args(["stats", "--index", index.to_str().unwrap(), "--json"])
            .output()
            .unwrap();
        if !out.status.success() {
            // Killed before the collection was created: nothing may have been reported.
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("no collection") && reported == 0,
                "round {round}: {err}"
            );
            continue;
        }
        let images = assert_consistent(&index);
        assert_searchable(&index);
        assert!(
            images >= reported,
            "round {round}: {images} searchable < {reported} reported committed"
        );
        assert!(
            images < n as u64,
            "round {round}: the ingest finished before the kill"
        );
    }
    assert!(
        interrupted >= 4,
        "only {interrupted} rounds were killed mid-ingest"
    );
    // A final run finishes the rest.
    let s = add(&index, &["--no-captions"], &[&photos]);
    assert_eq!(s["total"].as_u64().unwrap(), n as u64, "{s}");
    assert_eq!(assert_consistent(&index), n as u64);
}

/// Every image's id, by file name.
fn ids_by_name(index: &Path) -> std::collections::BTreeMap<String, u64> {
    let c = blipsearch::engine::Engine::open_existing(index).unwrap();
    let mut records = Vec::new();
    c.for_each(&mut |r| {
        records.push(r);
        Ok(())
    })
    .unwrap();
    records
        .into_iter()
        .map(|r| {
            let name = Path::new(&r.path)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (name, r.id.0)
        })
        .collect()
}

/// Ids are consecutive across processes (each `add` used to jump the counter by a million),
/// `reindex` keeps every image's id and never hands out an old one again, and files uploaded
/// into the collection (`<index>/uploads/`) survive it.
#[test]
fn ids_survive_restarts_and_reindex_and_uploads_survive_reindex() {
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("index");
    for (i, folder) in ["a", "b", "c"].iter().enumerate() {
        let dir = tmp.path().join(folder);
        make_images(&dir, 1, 20 + i as u32);
        add(&index, &["--no-captions"], &[&dir]);
    }
    // An upload as the server stores it: a file in <index>/uploads, indexed from there.
    let uploads = index.join("uploads");
    let up = make_images(&uploads, 1, 30).remove(0);
    add(&index, &["--no-captions"], &[&up]);
    let before = ids_by_name(&index);
    assert_eq!(
        before.values().copied().collect::<Vec<_>>(),
        vec![0, 1, 2, 3],
        "{before:?}"
    );
    // A removed image's id is not given again.
    let gone = tmp.path().join("c").join("img_22_000.png");
    let out = bin()
        .args([
            "remove",
            "--index",
            index.to_str().unwrap(),
            gone.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = reindex_to_tiny_b(&index);
    assert_eq!(s["added"], 3, "{s}");
    assert!(up.exists(), "the uploaded file survives reindex");
    let mut expected = before.clone();
    expected.remove("img_22_000.png");
    assert_eq!(ids_by_name(&index), expected);
    let dir = tmp.path().join("d");
    make_images(&dir, 1, 40);
    let args: Vec<String> = vec![
        "add".into(),
        "--index".into(),
        index.display().to_string(),
        "--json".into(),
        "--no-captions".into(),
        "--model-dir".into(),
        tiny_b(),
        dir.display().to_string(),
    ];
    run_json(&args);
    assert_eq!(ids_by_name(&index)["img_40_000.png"], 4);
}

/// The live progress counts every file it found as done by the end of a run, whether it was
/// embedded, skipped (unchanged or a duplicate) or failed, whatever the batch size.
#[test]
fn progress_reads_done_equals_total_with_skipped_files() {
    use blipsearch::engine::models::{ModelSource, Retriever};
    use blipsearch::engine::{Counters, Engine, IngestOptions};
    use std::sync::atomic::Ordering;
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    let imgs = make_images(&photos, 5, 3);
    std::fs::copy(&imgs[0], photos.join("zz_copy.png")).unwrap(); // a duplicate
    std::fs::write(photos.join("zz_broken.png"), b"not a png").unwrap(); // a failure
    let r = Retriever::load(
        &ModelSource::Dir(fixtures().join("tiny-a/retrieval")),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let info = collection_info(&r);
    let c = Engine::open(&tmp.path().join("index"), &info).unwrap();
    for run in 0..2 {
        let progress = Counters::default();
        let opts = IngestOptions {
            capfilt: None,
            batch_size: 2,
            ..Default::default()
        };
        let s = c
            .ingest(&r, opts, std::slice::from_ref(&photos), false, &progress)
            .unwrap();
        let (done, total) = (
            progress.done.load(Ordering::SeqCst),
            progress.total.load(Ordering::SeqCst),
        );
        assert_eq!(total, 7, "run {run}: {s:?}");
        assert_eq!(done, total, "run {run}: {s:?}");
    }
}

/// Once a collection exists, every command uses the models it was built with: `add`, `sync`,
/// `reindex` and `search` need no model flags, and another retrieval model is refused.
#[test]
fn commands_use_the_collections_models_unless_told_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("index");
    let photos = tmp.path().join("photos");
    make_images(&photos, 3, 9);
    let s = add(&index, &[], &[&photos]);
    assert_eq!(s["added"], 3, "{s}");
    make_images(&photos, 5, 9);
    let idx = index.display().to_string();
    let ph = photos.display().to_string();
    for cmd in ["add", "sync"] {
        let s = run_json(&[
            cmd.into(),
            "--index".into(),
            idx.clone(),
            "--json".into(),
            ph.clone(),
        ]);
        assert_eq!(s["total"], 5, "{cmd}: {s}");
    }
    let s = run_json(&[
        "reindex".into(),
        "--index".into(),
        idx.clone(),
        "--json".into(),
    ]);
    assert_eq!(s["total"], 5, "{s}");
    let out = bin()
        .args(["search", "--index", &idx, "a photo", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another retrieval model than the collection's is refused, naming reindex.
    let other = fixtures().join("tiny-b/retrieval").display().to_string();
    let out = bin()
        .args([
            "add",
            "--index",
            &idx,
            "--no-captions",
            "--model-dir",
            &other,
            &ph,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("reindex"), "{err}");
}

/// Models are matched by content: a copy of the weights elsewhere is the same model, a moved
/// model folder is found again with --model-dir (and remembered), and a text-only search needs
/// no model at all.
#[test]
fn models_are_matched_by_content_and_text_search_needs_none() {
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("index");
    let idx = index.display().to_string();
    let photos = tmp.path().join("photos");
    make_images(&photos, 3, 12);
    let first = tmp.path().join("models/a");
    copy_dir(&fixtures().join("tiny-a/retrieval"), &first);
    let add_with = |dir: &Path| {
        bin()
            .args([
                "add",
                "--index",
                &idx,
                "--no-captions",
                "--json",
                "--model-dir",
            ])
            .arg(dir)
            .arg(&photos)
            .output()
            .unwrap()
    };
    let out = add_with(&first);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A copy of the same weights elsewhere is accepted.
    let copy = tmp.path().join("models/copy");
    copy_dir(&first, &copy);
    let out = add_with(&copy);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The model folder goes away.
    std::fs::remove_dir_all(tmp.path().join("models")).unwrap();
    let search = |extra: &[&str]| {
        bin()
            .args(["search", "--index", &idx, "img", "--json"])
            .args(extra)
            .output()
            .unwrap()
    };
    // BM25 alone needs no model.
    let out = search(&["--mode", "text", "--rerank-k", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["hits"].as_array().unwrap().len(), 3, "{v}");
    assert!(v["hits"][0]["itc"].is_null());
    // Anything else says where the model was and how to point to it.
    let out = search(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is gone") && err.contains("--model-dir"),
        "{err}"
    );
    // Found again elsewhere by content, and remembered.
    let moved = tmp.path().join("elsewhere/model");
    copy_dir(&fixtures().join("tiny-a/retrieval"), &moved);
    let out = search(&["--model-dir", moved.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = search(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Other weights are refused even under a familiar place.
    let other = tmp.path().join("elsewhere/other");
    copy_dir(&fixtures().join("tiny-b/retrieval"), &other);
    let out = search(&["--model-dir", other.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("reindex"), "{err}");
}
