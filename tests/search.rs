//! Search end to end on the tiny fixture models: ingest, search by text and by image, fusion,
//! ITM rerank equal to scoring the same pairs directly, filters, deletes, bad input, CLI.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::*;

use blipsearch::engine::models::{CapFiltCandidate, CapFiltJob, ItmScore};
use blipsearch::engine::search::{
    CutoffStop, SearchMode, SearchParams, SearchResults, DEFAULT_RERANK_BUDGET, MAX_RERANK_BUDGET,
};
use blipsearch::engine::{
    EncodedImages, EncodedText, Encoders, Engine, EngineError, Filter, ImageId, IngestOptions,
    Silent,
};
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

    // A minimum ITM probability keeps only what ITM has seen and accepted; without one, ITM
    // judges `rerank_k` candidates and reports no cut-off.
    assert_eq!((all.examined, all.cutoff.is_none()), (16, true));
    for min in [0.0f32, 0.5, 1.0] {
        let p = SearchParams {
            rerank_k: Some(6),
            min_itm_prob: Some(min),
            limit: 100,
            ..Default::default()
        };
        let res = c.search_text(&r, query, &p).unwrap();
        assert!(res.hits.len() <= res.examined);
        assert!(res.hits.iter().all(|h| h.itm_prob.unwrap() >= min));
        if min == 0.0 {
            // Everything passes, so ITM goes on to the last candidate.
            assert_eq!(res.hits.len(), 35);
            assert_eq!(res.examined, res.candidates);
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

/// The retrieval model, with the calls to ITM counted and a deadline that passes before the
/// ITM call numbered `deadline_at` (from 1): as the server's queue answers once a request's
/// time is up.
struct Counted<'a> {
    r: &'a Retriever,
    itm_calls: std::cell::Cell<usize>,
    deadline_at: Option<usize>,
}

impl<'a> Counted<'a> {
    fn new(r: &'a Retriever, deadline_at: Option<usize>) -> Self {
        Self {
            r,
            itm_calls: std::cell::Cell::new(0),
            deadline_at,
        }
    }
}

impl Encoders for Counted<'_> {
    fn encode_images(
        &self,
        images: Vec<image::DynamicImage>,
    ) -> blipsearch::engine::Result<EncodedImages> {
        self.r.encode_images(images)
    }
    fn encode_texts(&self, texts: Vec<String>) -> blipsearch::engine::Result<Vec<EncodedText>> {
        self.r.encode_texts(texts)
    }
    fn itm(&self, text: String, tokens: Tensor) -> blipsearch::engine::Result<Vec<ItmScore>> {
        let n = self.itm_calls.get() + 1;
        self.itm_calls.set(n);
        if self.deadline_at.is_some_and(|d| n >= d) {
            return Err(EngineError::TimedOut("the request's time is up".into()));
        }
        Encoders::itm(self.r, text, tokens)
    }
    fn capfilt(&self, job: CapFiltJob) -> blipsearch::engine::Result<Vec<Vec<CapFiltCandidate>>> {
        self.r.capfilt(job)
    }
    fn can_caption(&self) -> bool {
        false
    }
}

fn ids(r: &SearchResults) -> Vec<u64> {
    r.hits.iter().map(|h| h.id).collect()
}

/// The rule of the cut-off, run by hand over p(match) in fused order: how many candidates ITM
/// judges with rounds of `round`, and why it stops.
fn by_the_rule(probs: &[f32], min: f32, round: usize, budget: usize) -> (usize, CutoffStop) {
    let mut judged = 0;
    loop {
        let n = round.min(budget - judged).min(probs.len() - judged);
        let matched = probs[judged..judged + n].iter().any(|p| *p >= min);
        judged += n;
        if judged == probs.len() {
            return (judged, CutoffStop::Exhausted);
        }
        if !matched {
            return (judged, CutoffStop::NoMatch);
        }
        if judged == budget {
            return (judged, CutoffStop::Budget);
        }
    }
}

/// With a cut-off, ITM reranks down the fused list in rounds of `rerank_k` while the last round
/// still had a match, up to the budget, and the answer says how far it went and why it stopped.
#[test]
fn the_itm_cut_off_reranks_as_deep_as_the_matches_go() {
    let tmp = tempfile::tempdir().unwrap();
    let r = retriever();
    let photos = tmp.path().join("photos");
    let c = build(&tmp.path().join("index"), &photos, &r, 40);
    let query = "a cat lying on a sofa";
    let k = 64; // every image (45), from each retriever

    // The fused order, unreranked, and every candidate's p(match) (min 0: all pass, and ITM
    // judges every candidate, in rounds of 16 here).
    let fused = c
        .search_text(
            &r,
            query,
            &SearchParams {
                k,
                rerank_k: Some(0),
                limit: 1000,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((fused.candidates, fused.examined), (45, 0));
    let every = c
        .search_text(
            &r,
            query,
            &SearchParams {
                k,
                min_itm_prob: Some(0.0),
                limit: 1000,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((every.examined, every.hits.len()), (45, 45));
    let cut = every.cutoff.clone().unwrap();
    assert_eq!(
        (cut.budget, cut.round, cut.rounds, cut.stop),
        (DEFAULT_RERANK_BUDGET, 16, 3, CutoffStop::Exhausted)
    );
    assert!(every.hits.iter().all(|h| h.reranked));
    assert!(every.hits.windows(2).all(|w| w[0].score >= w[1].score));
    let prob: std::collections::HashMap<u64, f32> = every
        .hits
        .iter()
        .map(|h| (h.id, h.itm_prob.unwrap()))
        .collect();
    let probs: Vec<f32> = fused.hits.iter().map(|h| prob[&h.id]).collect();

    // The budget caps it, says so, and ITM judged the best of the fused list.
    let capped = c
        .search_text(
            &r,
            query,
            &SearchParams {
                k,
                rerank_k: Some(4),
                min_itm_prob: Some(0.0),
                rerank_budget: Some(22),
                limit: 1000,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        capped.examined, 22,
        "deeper than rerank_k, up to the budget"
    );
    let cut = capped.cutoff.clone().unwrap();
    assert_eq!(
        (cut.budget, cut.round, cut.rounds, cut.stop),
        (22, 4, 6, CutoffStop::Budget)
    );
    assert!(cut.stop.limited());
    let mut got = ids(&capped);
    let mut want: Vec<u64> = fused.hits[..22].iter().map(|h| h.id).collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);
    for h in &capped.hits {
        assert!(
            (h.itm_prob.unwrap() - prob[&h.id]).abs() < 1e-4,
            "batching changes nothing"
        );
    }

    // A threshold between two distinct p(match) values, such that the rule stops at a round
    // without a match after more than one round: found among round sizes and thresholds, then
    // the engine must agree with the rule run by hand.
    let mut sorted = probs.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let mut case = None;
    'find: for round in 2..=6 {
        for w in sorted.windows(2) {
            if w[0] - w[1] < 1e-3 {
                continue;
            }
            let min = (w[0] + w[1]) / 2.0;
            let (judged, stop) = by_the_rule(&probs, min, round, DEFAULT_RERANK_BUDGET);
            if stop == CutoffStop::NoMatch && judged > round {
                case = Some((round, min, judged));
                break 'find;
            }
        }
    }
    let (round, min, judged) = case.expect("a threshold where a later round has no match");
    let stopped = c
        .search_text(
            &r,
            query,
            &SearchParams {
                k,
                rerank_k: Some(round),
                min_itm_prob: Some(min),
                limit: 1000,
                ..Default::default()
            },
        )
        .unwrap();
    let cut = stopped.cutoff.clone().unwrap();
    assert_eq!((stopped.examined, cut.stop), (judged, CutoffStop::NoMatch));
    assert!(!cut.stop.limited());
    assert_eq!(cut.rounds, judged.div_ceil(round));
    let mut got = ids(&stopped);
    let mut want: Vec<u64> = fused.hits[..judged]
        .iter()
        .filter(|h| prob[&h.id] >= min)
        .map(|h| h.id)
        .collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(
        got, want,
        "what ITM accepted among the judged, and nothing else"
    );
    assert!(stopped.hits.len() < 45 && !stopped.hits.is_empty());

    // Nothing matches: one round is judged and the answer is empty, with the count.
    let none = c
        .search_text(
            &r,
            query,
            &SearchParams {
                k,
                rerank_k: Some(5),
                min_itm_prob: Some(1.0),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(sorted[0] < 1.0);
    assert_eq!((none.examined, none.hits.len(), none.total), (5, 0, 0));
    assert_eq!(none.cutoff.unwrap().stop, CutoffStop::NoMatch);

    // Retrieval fetches enough for the budget: k 3 with a budget of 30 still judges 30.
    let deep = c
        .search_text(
            &r,
            query,
            &SearchParams {
                k: 3,
                min_itm_prob: Some(0.0),
                rerank_budget: Some(30),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((deep.examined, deep.total), (30, 30));
    assert!(deep.candidates >= 30);

    // Each round is one call to the models; a deadline during a later round ends the rerank
    // with what was judged in time, and says so; during the first it fails the search.
    let p = SearchParams {
        k,
        rerank_k: Some(4),
        min_itm_prob: Some(0.0),
        limit: 1000,
        ..Default::default()
    };
    let counted = Counted::new(&r, None);
    let res = c.search_text(&counted, query, &p).unwrap();
    assert_eq!((res.examined, counted.itm_calls.get()), (45, 12));
    let late = Counted::new(&r, Some(3));
    let res = c.search_text(&late, query, &p).unwrap();
    let cut = res.cutoff.clone().unwrap();
    assert_eq!(
        (res.examined, cut.rounds, cut.stop),
        (8, 2, CutoffStop::Deadline)
    );
    assert_eq!(res.hits.len(), 8);
    assert!(cut.stop.limited());
    let mut got = ids(&res);
    let mut want: Vec<u64> = fused.hits[..8].iter().map(|h| h.id).collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);
    let early = Counted::new(&r, Some(1));
    assert!(matches!(
        c.search_text(&early, query, &p),
        Err(EngineError::TimedOut(_))
    ));
}

/// The cut-off's parameters: a budget needs the cut-off, is at least 1 and at most
/// MAX_RERANK_BUDGET (clamped, with a notice); the cut-off is a probability.
#[test]
fn cut_off_parameters_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let r = retriever();
    let c = build(&tmp.path().join("index"), &tmp.path().join("photos"), &r, 3);
    let query = "a rocket";
    for (p, says) in [
        (
            SearchParams {
                rerank_budget: Some(10),
                ..Default::default()
            },
            "needs min_itm_prob",
        ),
        (
            SearchParams {
                min_itm_prob: Some(0.5),
                rerank_budget: Some(0),
                ..Default::default()
            },
            "at least 1",
        ),
        (
            SearchParams {
                min_itm_prob: Some(1.5),
                ..Default::default()
            },
            "between 0 and 1",
        ),
        (
            SearchParams {
                min_itm_prob: Some(f32::NAN),
                ..Default::default()
            },
            "between 0 and 1",
        ),
        (
            SearchParams {
                min_itm_prob: Some(0.5),
                rerank_k: Some(0),
                ..Default::default()
            },
            "rerank_k",
        ),
    ] {
        let err = c.search_text(&r, query, &p).unwrap_err();
        assert!(matches!(err, EngineError::InvalidInput(_)), "{err}");
        assert!(err.to_string().contains(says), "{err}");
    }
    let img = load_image(
        &fixtures().join("images/coffee.png"),
        DecodeLimits::default(),
    )
    .unwrap();
    let err = c
        .search_image(
            &r,
            &img,
            &SearchParams {
                rerank_budget: Some(10),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("needs min_itm_prob"), "{err}");
    let big = c
        .search_text(
            &r,
            query,
            &SearchParams {
                min_itm_prob: Some(0.0),
                rerank_budget: Some(5000),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        big.notices
            .iter()
            .any(|n| n == &format!("rerank_budget 5000 clamped to {MAX_RERANK_BUDGET}")),
        "{:?}",
        big.notices
    );
    assert_eq!(big.cutoff.unwrap().budget, MAX_RERANK_BUDGET);
    assert_eq!(big.examined, 8, "every image");
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

    // The ITM cut-off: how many candidates ITM judged and why it stopped, in JSON and in the
    // table (p(match) >= 0 always holds: the budget stops it).
    let cut = [
        "--min-itm-prob",
        "0",
        "--rerank-k",
        "3",
        "--rerank-budget",
        "7",
    ];
    let (ok, out, err) =
        run(&[&["search", "--index", idx, "a rocket", "--json"], &cut[..]].concat());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["hits"].as_array().unwrap().len(), 7, "{v}");
    assert_eq!(
        (&v["examined"], &v["candidates"]),
        (&7.into(), &10.into()),
        "{v}"
    );
    assert_eq!(
        v["cutoff"],
        serde_json::json!({"min_itm_prob": 0.0, "budget": 7, "round": 3, "rounds": 3, "stop": "budget"})
    );
    let (ok, out, err) = run(&[&["search", "--index", idx, "a rocket"], &cut[..]].concat());
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "ITM judged 7 of 10 candidates (p(match) >= 0, budget 7): stopped at the budget"
        ),
        "{out}"
    );
    let (ok, out, err) = run(&["search", "--index", idx, "a rocket", "--min-itm-prob", "1"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("no results"), "{out}");
    assert!(
        out.contains(
            "ITM judged 10 of 10 candidates (p(match) >= 1, budget 256): every candidate judged"
        ),
        "{out}"
    );
    for (args, says) in [
        (vec!["--rerank-budget", "5"], "--min-itm-prob"),
        (vec!["--min-itm-prob", "2"], "between 0 and 1"),
        (
            vec!["--min-itm-prob", "0.5", "--rerank-budget", "0"],
            "at least 1",
        ),
    ] {
        let (ok, _, err) = run(&[&["search", "--index", idx, "a rocket"], &args[..]].concat());
        assert!(
            !ok && err.contains(says) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }

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
