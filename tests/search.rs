//! Search end to end on the tiny fixture models: ingest, search by text and by image, fusion,
//! ITM rerank equal to scoring the same pairs directly, filters, deletes, bad input, CLI.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::*;

use blipsearch::engine::search::{SearchMode, SearchParams};
use blipsearch::engine::{Engine, Filter, ImageId, IngestOptions, Silent};
use blipsearch::model::preprocess::{load_image, DecodeLimits};
use blipsearch::model::{ItmFirstToken, ModelSource, Retriever};

fn retriever() -> Retriever {
    Retriever::load(
        &ModelSource::Dir(fixtures().join("tiny-a/retrieval")),
        &Device::Cpu,
    )
    .unwrap()
}

/// A collection of the fixture photos plus `n` noise images named `noise_<i>.png`.
fn build(dir: &Path, photos: &Path, r: &Retriever, n: usize) -> Engine {
    std::fs::create_dir_all(photos.join("noise")).unwrap();
    for f in [
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
        "astronaut.png",
        "camera.png",
    ] {
        std::fs::copy(fixtures().join("images").join(f), photos.join(f)).unwrap();
    }
    for i in 0..n {
        let img = image::RgbImage::from_fn(24, 16 + (i % 5) as u32, |x, y| {
            image::Rgb([
                (x * 9 + i as u32 * 31) as u8,
                (y * 13 + i as u32 * 7) as u8,
                (i * 5) as u8,
            ])
        });
        img.save(photos.join("noise").join(format!("noise_{i}.png")))
            .unwrap();
    }
    let info = collection_info(r);
    let c = Engine::open(dir, &info).unwrap();
    let opts = IngestOptions {
        capfilt: None,
        ..Default::default()
    };
    // Image files beside `noise/`, which is itself one entry.
    let files = std::fs::read_dir(photos).unwrap().count() - 1;
    let s = c
        .ingest(r, opts, &[photos.to_path_buf()], false, &Silent)
        .unwrap();
    assert_eq!(s.added, files + n, "{s:?}");
    c
}

fn path_of(c: &Engine, id: u64) -> String {
    c.get(ImageId(id)).unwrap().unwrap().path
}

#[test]
fn text_search_rerank_fusion_filters_and_deletes() {
    let tmp = tempfile::tempdir().unwrap();
    let r = retriever();
    let photos = tmp.path().join("photos");
    let c = build(&tmp.path().join("index"), &photos, &r, 30);
    let query = "a cat lying on a sofa";

    // Vector only, no rerank: ordered by ITC cosine, which equals the dot product of embeddings.
    let p = SearchParams {
        mode: SearchMode::Vector,
        rerank_k: Some(0),
        limit: 35,
        ..Default::default()
    };
    let res = c.search_text(&r, query, &p).unwrap();
    assert_eq!(res.hits.len(), 35);
    let q: Vec<f32> = r
        .embed_texts(&[query])
        .unwrap()
        .itc
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for h in &res.hits {
        let rec = c.get(ImageId(h.id)).unwrap().unwrap();
        let cos: f32 = q.iter().zip(&rec.itc).map(|(a, b)| a * b).sum();
        assert!((cos - h.itc.unwrap()).abs() < 1e-4);
    }
    assert!(res.hits.windows(2).all(|w| w[0].itc >= w[1].itc));

    // Rerank: order and scores equal to scoring the same pairs directly with the model.
    let p = SearchParams {
        mode: SearchMode::Vector,
        rerank_k: Some(8),
        limit: 8,
        ..Default::default()
    };
    let res = c.search_text(&r, query, &p).unwrap();
    let ids: Vec<u64> = res.hits.iter().map(|h| h.id).collect();
    let mut feats = Vec::new();
    for id in &ids {
        feats.extend(c.features(ImageId(*id)).unwrap().data);
    }
    let cfg = r.config();
    let tokens = Tensor::from_vec(
        feats,
        (ids.len(), cfg.vision.num_tokens(), cfg.vision.hidden_size),
        &Device::Cpu,
    )
    .unwrap();
    let direct = r
        .itm(
            &vec![query; ids.len()],
            &tokens,
            &(0..ids.len()).collect::<Vec<_>>(),
            ItmFirstToken::Enc,
        )
        .unwrap();
    let mut expected: Vec<(u64, f32)> = ids
        .iter()
        .zip(&direct)
        .zip(&res.hits)
        .map(|((id, d), h)| (*id, d.logits[1] + h.itc.unwrap()))
        .collect();
    expected.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    for (h, (id, score)) in res.hits.iter().zip(&expected) {
        assert_eq!(h.id, *id);
        assert!((h.score - score).abs() < 1e-4);
        assert!(h.itm_prob.is_some());
    }

    // Text mode finds a file by a word of its name; hybrid keeps it among the candidates.
    let p = SearchParams {
        mode: SearchMode::Text,
        rerank_k: Some(0),
        ..Default::default()
    };
    let res = c.search_text(&r, "rocket", &p).unwrap();
    assert!(path_of(&c, res.hits[0].id).ends_with("rocket.jpg"));
    let p = SearchParams {
        rerank_k: Some(0),
        k: 10,
        limit: 50,
        ..Default::default()
    };
    let res = c.search_text(&r, "rocket", &p).unwrap();
    let rocket = res
        .hits
        .iter()
        .find(|h| path_of(&c, h.id).ends_with("rocket.jpg"))
        .unwrap();
    assert_eq!(rocket.text_rank, Some(1));

    // Filters: path prefix and size.
    let prefix = std::fs::canonicalize(photos.join("noise"))
        .unwrap()
        .display()
        .to_string();
    let p = SearchParams {
        rerank_k: Some(0),
        limit: 100,
        filter: Filter {
            path_prefix: Some(prefix.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    let res = c.search_text(&r, query, &p).unwrap();
    assert_eq!(res.hits.len(), 30);
    assert!(res.hits.iter().all(|h| h.path.starts_with(&prefix)));
    let p = SearchParams {
        rerank_k: Some(0),
        limit: 100,
        filter: Filter {
            min_width: Some(200),
            ..Default::default()
        },
        ..Default::default()
    };
    let res = c.search_text(&r, query, &p).unwrap();
    assert!(
        !res.hits.is_empty()
            && res
                .hits
                .iter()
                .all(|h| c.get(ImageId(h.id)).unwrap().unwrap().width >= 200)
    );

    // Paging is a window of the same order.
    let all = c
        .search_text(
            &r,
            query,
            &SearchParams {
                limit: 20,
                ..Default::default()
            },
        )
        .unwrap();
    let page = c
        .search_text(
            &r,
            query,
            &SearchParams {
                limit: 5,
                offset: 5,
                ..Default::default()
            },
        )
        .unwrap();
    let a: Vec<u64> = all.hits[5..10].iter().map(|h| h.id).collect();
    let b: Vec<u64> = page.hits.iter().map(|h| h.id).collect();
    assert_eq!(a, b);

    // A minimum ITM probability keeps only what ITM has seen and accepted.
    for min in [0.0f32, 0.5, 1.0] {
        let p = SearchParams {
            rerank_k: Some(6),
            min_itm_prob: Some(min),
            ..Default::default()
        };
        let res = c.search_text(&r, query, &p).unwrap();
        assert!(res.hits.len() <= 6);
        assert!(res.hits.iter().all(|h| h.itm_prob.unwrap() >= min));
        if min == 0.0 {
            assert_eq!(res.hits.len(), 6);
        }
    }

    // Bad input.
    assert!(c.search_text(&r, "   ", &SearchParams::default()).is_err());
    assert!(c
        .search_text(
            &r,
            query,
            &SearchParams {
                k: 0,
                ..Default::default()
            }
        )
        .is_err());
    let big = c
        .search_text(
            &r,
            query,
            &SearchParams {
                k: 1_000_000,
                rerank_k: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(big.notices.iter().any(|n| n.contains("clamped")));
    let long = "word ".repeat(80);
    assert!(
        c.search_text(
            &r,
            &long,
            &SearchParams {
                rerank_k: Some(0),
                ..Default::default()
            }
        )
        .unwrap()
        .truncated
    );
    let bad_date = Filter {
        date_from: Some("yesterday".into()),
        ..Default::default()
    };
    assert!(c
        .search_text(
            &r,
            query,
            &SearchParams {
                filter: bad_date,
                ..Default::default()
            }
        )
        .is_err());

    // Deleted images never come back.
    let gone: Vec<u64> = all.hits.iter().take(3).map(|h| h.id).collect();
    for id in &gone {
        assert!(c.remove(ImageId(*id), "cli").unwrap());
    }
    c.commit().unwrap();
    for mode in [SearchMode::Hybrid, SearchMode::Vector, SearchMode::Text] {
        let res = c
            .search_text(
                &r,
                query,
                &SearchParams {
                    mode,
                    limit: 100,
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(res.hits.iter().all(|h| !gone.contains(&h.id)), "{mode:?}");
    }
}

#[test]
fn image_search_finds_the_image_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let r = retriever();
    let photos = tmp.path().join("photos");
    let c = build(&tmp.path().join("index"), &photos, &r, 10);
    let img = load_image(&photos.join("coffee.png"), DecodeLimits::default()).unwrap();
    let res = c.search_image(&r, &img, &SearchParams::default()).unwrap();
    assert!(path_of(&c, res.hits[0].id).ends_with("coffee.png"));
    assert!((res.hits[0].itc.unwrap() - 1.0).abs() < 1e-4);
    let first = res.hits[0].id;
    // More like this: the image itself only when asked for.
    let res = c
        .search_similar(&r, ImageId(first), &SearchParams::default())
        .unwrap();
    assert!(res.hits.iter().all(|h| h.id != first));
    assert_eq!(res.hits.len(), 14, "every other image");
    let res = c
        .search_similar(
            &r,
            ImageId(first),
            &SearchParams {
                include_self: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(res.hits[0].id, first);
    // A search by image cannot rerank.
    for p in [
        SearchParams {
            rerank_k: Some(4),
            ..Default::default()
        },
        SearchParams {
            min_itm_prob: Some(0.5),
            ..Default::default()
        },
    ] {
        let err = c.search_image(&r, &img, &p).unwrap_err();
        assert!(err.to_string().contains("cannot rerank"), "{err}");
        assert!(c.search_similar(&r, ImageId(first), &p).is_err());
    }
    assert!(c
        .search_image(
            &r,
            &img,
            &SearchParams {
                rerank_k: Some(0),
                ..Default::default()
            }
        )
        .is_ok());
    assert!(c
        .search_similar(&r, ImageId(999_999), &SearchParams::default())
        .is_err());
}

#[test]
fn cli_search_json_and_table() {
    let tmp = tempfile::tempdir().unwrap();
    let photos: PathBuf = tmp.path().join("photos");
    let index = tmp.path().join("index");
    {
        let r = retriever();
        build(&index, &photos, &r, 5);
    }
    let run = blipsearch;
    let idx = index.to_str().unwrap();
    let (ok, out, err) = run(&[
        "search",
        "--index",
        idx,
        "a rocket",
        "--json",
        "--rerank-k",
        "4",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let hits = v["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 10);
    assert!(hits[0]["itm_prob"].is_number() && hits[0]["itc"].is_number());
    let (ok, out, err) = run(&["search", "--index", idx, "rocket", "--mode", "text"]);
    assert!(ok, "{err}");
    assert!(out.lines().nth(1).unwrap().contains("rocket.jpg"), "{out}");
    let cat = photos.join("chelsea.png");
    let (ok, out, err) = run(&[
        "search",
        "--index",
        idx,
        "--image",
        cat.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["hits"][0]["path"]
        .as_str()
        .unwrap()
        .ends_with("chelsea.png"));
    let (ok, _, err) = run(&["search", "--index", idx, "x", "--mode", "fuzzy"]);
    assert!(!ok && err.contains("unknown mode"), "{err}");
    let not_image = photos.join("notes.jpg");
    std::fs::write(&not_image, b"plain text").unwrap();
    let (ok, _, err) = run(&[
        "search",
        "--index",
        idx,
        "--image",
        not_image.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("notes.jpg") && !err.contains("panicked"),
        "{err}"
    );
    let (ok, _, err) = run(&["search", "--index", idx, "   "]);
    assert!(!ok && err.contains("empty"), "{err}");

    // --folder takes a relative folder (its images only) and keeps --path-prefix as an alias.
    let noise = std::fs::canonicalize(photos.join("noise")).unwrap();
    let out = command()
        .current_dir(tmp.path())
        .args([
            "search",
            "--index",
            idx,
            "a rocket",
            "--json",
            "--rerank-k",
            "0",
        ])
        .args(["--folder", "photos/noise"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let in_noise = |v: &serde_json::Value| {
        let hits = v["hits"].as_array().unwrap();
        assert_eq!(hits.len(), 5, "{v}");
        for h in hits {
            assert!(
                Path::new(h["path"].as_str().unwrap()).starts_with(&noise),
                "{h}"
            );
        }
    };
    in_noise(&v);
    let (ok, out, err) = run(&[
        "search",
        "--index",
        idx,
        "a rocket",
        "--json",
        "--path-prefix",
        noise.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    in_noise(&serde_json::from_str(&out).unwrap());
}

#[test]
fn near_duplicates_group_a_recompressed_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let r = retriever();
    let photos = tmp.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    let cat = image::open(fixtures().join("images/chelsea.png")).unwrap();
    let mut buf = std::io::Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 95)
        .encode_image(&cat)
        .unwrap();
    std::fs::write(photos.join("chelsea_copy.jpg"), buf.into_inner()).unwrap();
    let c = build(&tmp.path().join("index"), &photos, &r, 3);
    let groups = c.duplicates(0.999).unwrap();
    let g = groups
        .iter()
        .find(|g| {
            g.images
                .iter()
                .any(|(_, p)| p.ends_with("chelsea_copy.jpg"))
        })
        .expect("the copy is in a group");
    assert!(
        g.images.iter().any(|(_, p)| p.ends_with("chelsea.png")),
        "{groups:?}"
    );
    assert!(g.max_cosine >= 0.999);
    assert!(c.duplicates(2.0).is_err());
}

/// `search --filter/--facet/--group-by` on a catalogue built through the store (searches by
/// an indexed image need no model): ranked by cosine to `q`, the images are a1 (product P1,
/// acme, 10), b1 (P2, zenith, 60), a2 (P1), n1 (no product).
#[test]
fn cli_search_filters_facets_and_groups_products() {
    use blipsearch::index::{
        content_hash, AttrType, AttrValue, Collection, CollectionInfo, HnswParams, ImageRecord,
        Product, Schema, Store,
    };
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("index");
    let product = |id: &str, brand: &str, price: f64| Product {
        id: id.into(),
        title: Some(format!("{brand} shoe")),
        description: None,
        attributes: [
            ("brand".to_string(), AttrValue::Text(brand.into())),
            ("price".to_string(), AttrValue::Number(price)),
        ]
        .into(),
    };
    let (p1, p2) = (product("P1", "acme", 10.0), product("P2", "zenith", 60.0));
    let mut ids = std::collections::HashMap::new();
    {
        let info = CollectionInfo::new("test/model", None, 4, 5, 8);
        let mut c = Collection::open(&index, &info, HnswParams::default()).unwrap();
        c.extend_schema(&Schema::from([
            ("brand".to_string(), AttrType::Keyword),
            ("price".to_string(), AttrType::Number),
        ]))
        .unwrap();
        for (name, cos, p) in [
            ("q", 1.0f32, None),
            ("a1", 0.9, Some(&p1)),
            ("b1", 0.8, Some(&p2)),
            ("a2", 0.7, Some(&p1)),
            ("n1", 0.6, None),
        ] {
            let hash = content_hash(name.as_bytes());
            let id = c.allocate_id(&hash).unwrap();
            c.insert(ImageRecord {
                id,
                path: format!("/shop/{name}.jpg"),
                content_hash: hash,
                size_bytes: 1,
                width: 10,
                height: 10,
                mtime_unix: 0,
                exif_date: None,
                itc: vec![cos, (1.0 - cos * cos).sqrt(), 0.0, 0.0],
                captions: vec![],
                given_texts: vec![],
                added_unix: 0,
                product: p.cloned(),
                pdq: None,
                flags: Vec::new(),
            })
            .unwrap();
            ids.insert(name, id.0);
        }
        c.commit().unwrap();
    }
    let idx = index.to_str().unwrap();
    let q = ids["q"].to_string();
    let search = |extra: &[&str]| {
        let mut args = vec!["search", "--index", idx, "--similar-to", &q];
        args.extend_from_slice(extra);
        blipsearch(&args)
    };
    let json = |extra: &[&str]| -> serde_json::Value {
        let mut args = extra.to_vec();
        args.push("--json");
        let (ok, out, err) = search(&args);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let hit_ids = |v: &serde_json::Value| -> Vec<u64> {
        v["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["id"].as_u64().unwrap())
            .collect()
    };

    // Grouped, with facets: three groups, counted once each.
    let v = json(&[
        "--facet",
        "brand",
        "--facet",
        "price:..50|50..",
        "--group-by",
        "product",
    ]);
    assert_eq!(hit_ids(&v), [ids["a1"], ids["b1"], ids["n1"]], "{v}");
    assert_eq!(v["total"], 3);
    assert_eq!(
        v["hits"][0]["group"],
        serde_json::json!({"product": "P1", "size": 2, "matching": [ids["a2"]]})
    );
    assert_eq!(
        v["hits"][2]["group"],
        serde_json::json!({"product": null, "size": 1, "matching": []})
    );
    assert_eq!(v["hits"][0]["product"]["id"], "P1");
    assert_eq!(v["hits"][0]["product"]["attributes"]["price"], 10.0);
    assert!(v["hits"][2].get("product").is_none(), "{v}");
    assert_eq!(
        v["facets"][0],
        serde_json::json!({"name": "brand", "kind": "keyword", "missing": 1,
            "values": [{"value": "acme", "count": 1}, {"value": "zenith", "count": 1}]})
    );
    assert_eq!(
        v["facets"][1]["values"],
        serde_json::json!([{"value": "..50", "count": 1, "max": 50.0},
            {"value": "50..", "count": 1, "min": 50.0}])
    );

    // Filters: one, then two that must both hold; ungrouped hits have no group.
    let v = json(&["--filter", "brand:acme"]);
    assert_eq!(hit_ids(&v), [ids["a1"], ids["a2"]]);
    assert_eq!(v["total"], 2);
    assert!(v["hits"][0].get("group").is_none());
    assert_eq!(v["facets"], serde_json::json!([]));
    let v = json(&["--filter", "price:50..", "--filter", "brand:zenith|acme"]);
    assert_eq!(hit_ids(&v), [ids["b1"]]);
    let v = json(&["--filter", "price:..50", "--filter", "brand:zenith"]);
    assert_eq!(v["total"], 0);

    // The table shows products, groups and facets.
    let (ok, out, err) = search(&["--group-by", "product", "--facet", "brand"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("product P1: acme shoe  [brand=acme, price=10]"),
        "{out}"
    );
    assert!(
        out.contains(&format!("group P1: 2 images, also matching {}", ids["a2"])),
        "{out}"
    );
    assert!(out.contains("3 of 3 groups"), "{out}");
    assert!(out.contains("brand: acme 1, zenith 1 (1 without)"), "{out}");

    // Bad input: clear errors, no panic.
    for (args, says) in [
        (vec!["--filter", "colour:red"], "colour"),
        (vec!["--filter", "price:cheap"], "price"),
        (vec!["--filter", "brand"], "name:value"),
        (vec!["--facet", "brand:..5"], "ranges are for numbers"),
        (vec!["--facet", "size"], "no such attribute"),
        (vec!["--group-by", "brand"], "cannot group by"),
    ] {
        let (ok, _, err) = search(&args);
        assert!(
            !ok && err.contains(says) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
