//! Unit tests of [`super::VectorIndex`]: parameters, inputs, persistence, the flat copy.

use super::persist::MANIFEST;
use super::search::Strategy;
use super::*;
use crate::index::testutil::Rng;

const DIM: usize = 16;

fn small(n: usize) -> Vec<(ImageId, Vec<f32>)> {
    let mut rng = Rng::new(3);
    (0..n as u64)
        .map(|i| (ImageId(i * 3 + 1), rng.unit_vector(DIM)))
        .collect()
}

fn open(dir: &Path) -> VectorIndex {
    VectorIndex::open(dir, DIM, HnswParams::default()).unwrap()
}

#[test]
fn large_ef_is_answered_by_the_exact_scan() {
    let dir = tempfile::tempdir().unwrap();
    let params = HnswParams {
        exact_threshold: 0,
        ..HnswParams::default()
    };
    let mut index = VectorIndex::open(dir.path(), DIM, params).unwrap();
    let items = small(300);
    index.insert_batch(&items).unwrap();
    // 300 live points: 128 * 2 = 256 < 300 walks the graph, 128 * 3 = 384 scans.
    assert!(!index.scans_exactly(1, Some(2)));
    assert!(index.scans_exactly(1, Some(3)));
    assert!(index.scans_exactly(3, Some(1)), "ef is at least k");
    let q = &items[7].1;
    let mut brute: Vec<(ImageId, f32)> = items
        .iter()
        .map(|(id, v)| (*id, v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>()))
        .collect();
    brute.sort_by(|a, b| b.1.total_cmp(&a.1));
    let exact = index.search_exact(q, 10, None).unwrap();
    let ids = |hits: &[(ImageId, f32)]| hits.iter().map(|h| h.0).collect::<Vec<_>>();
    assert_eq!(ids(&exact), ids(&brute[..10]));
    for ((_, a), (_, b)) in exact.iter().zip(&brute) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    // A search at an ef past the ratio returns the exact answer.
    assert_eq!(
        ids(&index.search(q, 10, Some(3), None).unwrap()),
        ids(&exact)
    );
}

#[test]
fn params_are_validated_instead_of_exiting() {
    for m in [0, 1, 256, 300, 100_000] {
        let p = HnswParams {
            m,
            ..HnswParams::default()
        };
        assert!(
            matches!(p.validate(), Err(IndexError::InvalidParams(_))),
            "m={m}"
        );
    }
    let p = HnswParams {
        compact_fraction: 0.0,
        ..HnswParams::default()
    };
    assert!(p.validate().is_err());
    let dir = tempfile::tempdir().unwrap();
    assert!(VectorIndex::open(dir.path(), 0, HnswParams::default()).is_err());
    HnswParams::default().validate().unwrap();
}

#[test]
fn bad_vectors_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut index = open(dir.path());
    assert!(matches!(
        index.insert(ImageId(1), &[1.0; 3]),
        Err(IndexError::DimensionMismatch {
            expected: 16,
            got: 3
        })
    ));
    let mut v = vec![0.5; DIM];
    v[3] = f32::NAN;
    assert!(matches!(
        index.insert(ImageId(1), &v),
        Err(IndexError::InvalidVector(_))
    ));
    assert!(matches!(
        index.insert(ImageId(1), &[0.0; DIM]),
        Err(IndexError::InvalidVector(_))
    ));
    assert!(index.search(&[f32::INFINITY; DIM], 3, None, None).is_err());
    index.insert(ImageId(1), &[1.0; DIM]).unwrap();
    assert!(matches!(
        index.insert(ImageId(1), &[2.0; DIM]),
        Err(IndexError::DuplicateId(ImageId(1)))
    ));
    index.remove(ImageId(1));
    assert!(matches!(
        index.insert(ImageId(1), &[2.0; DIM]),
        Err(IndexError::DuplicateId(ImageId(1)))
    ));
}

#[test]
fn self_match_scores_cosine_one_and_unnormalised_input_is_fine() {
    let dir = tempfile::tempdir().unwrap();
    let mut index = open(dir.path());
    let items = small(50);
    index.insert_batch(&items).unwrap();
    for (id, v) in items.iter().take(10) {
        // Scaled copies of stored vectors: same direction, cosine 1.
        let q: Vec<f32> = v.iter().map(|x| x * 7.5).collect();
        let hits = index.search(&q, 1, None, None).unwrap();
        assert_eq!(hits[0].0, *id);
        assert!((hits[0].1 - 1.0).abs() < 1e-5, "{}", hits[0].1);
    }
    // Scores are cosines, best first.
    let hits = index.search(&items[0].1, 50, None, None).unwrap();
    assert_eq!(hits.len(), 50);
    for w in hits.windows(2) {
        assert!(w[0].1 >= w[1].1);
    }
    let dot: f32 = items[0].1.iter().zip(&items[9].1).map(|(a, b)| a * b).sum();
    let got = hits.iter().find(|(id, _)| *id == items[9].0).unwrap().1;
    assert!((got - dot).abs() < 1e-5, "{got} vs {dot}");
}

#[test]
fn empty_small_and_over_asked_searches() {
    let dir = tempfile::tempdir().unwrap();
    let mut index = open(dir.path());
    let q = vec![1.0; DIM];
    assert!(index.search(&q, 10, None, None).unwrap().is_empty());
    index.save(1).unwrap(); // empty graph: manifest only
    let items = small(5);
    index.insert_batch(&items).unwrap();
    assert_eq!(index.search(&q, 0, None, None).unwrap(), vec![]);
    assert_eq!(index.search(&q, 100, None, None).unwrap().len(), 5);
    index.remove(items[0].0);
    let hits = index.search(&q, 100, None, None).unwrap();
    assert_eq!(hits.len(), 4);
    assert!(hits.iter().all(|(id, _)| *id != items[0].0));
    // A filter nothing passes; a filter passing exactly two ids (graph path forced).
    let none = |_: ImageId| false;
    assert!(index.search(&q, 3, None, Some(&none)).unwrap().is_empty());
    index.params.exact_threshold = 0;
    let two = |id: ImageId| id == items[1].0 || id == items[4].0;
    let hits = index.search(&q, 3, None, Some(&two)).unwrap();
    let mut got: Vec<ImageId> = hits.iter().map(|h| h.0).collect();
    got.sort();
    assert_eq!(got, vec![items[1].0, items[4].0]);
}

#[test]
fn save_reopen_gives_the_same_answers() {
    let dir = tempfile::tempdir().unwrap();
    let items = small(300);
    let q = Rng::new(9).unit_vector(DIM);
    let before = {
        let mut index = open(dir.path());
        assert_eq!(index.generation(), None);
        index.insert_batch(&items).unwrap();
        index.remove(items[7].0);
        index.save(3).unwrap();
        index.search(&q, 20, None, None).unwrap()
    };
    let mut index = open(dir.path());
    assert_eq!(index.generation(), Some(3));
    assert_eq!(index.len(), 299);
    assert_eq!(index.tombstones(), 1);
    assert!(!index.is_live(items[7].0) && index.contains(items[7].0));
    assert_eq!(index.search(&q, 20, None, None).unwrap(), before);

    // A loaded graph accepts inserts and saves again (hnsw_rs will not overwrite a loaded
    // dump in place; the old files are replaced by the new generation's).
    index.insert(ImageId(10_000), &q).unwrap();
    index.save(4).unwrap();
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"g4.hnsw.graph".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("g3")), "{names:?}");
    drop(index);
    let index = open(dir.path());
    assert_eq!(index.generation(), Some(4));
    assert_eq!(
        index.search(&q, 1, None, None).unwrap()[0].0,
        ImageId(10_000)
    );
}

#[test]
fn damaged_dumps_open_empty_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut index = open(dir.path());
        index.insert_batch(&small(100)).unwrap();
        index.save(1).unwrap();
    }
    let data = dir.path().join("g1.hnsw.data");
    let graph = dir.path().join("g1.hnsw.graph");
    let manifest = dir.path().join(MANIFEST);
    let good_data = std::fs::read(&data).unwrap();
    let good_manifest = std::fs::read(&manifest).unwrap();

    // Truncated data file: hnsw_rs would `process::exit`; the checksum stops it first.
    std::fs::write(&data, &good_data[..good_data.len() / 2]).unwrap();
    let index = open(dir.path());
    assert_eq!((index.generation(), index.len()), (None, 0));
    drop(index);
    // Same length, flipped byte.
    let mut flipped = good_data.clone();
    flipped[40] ^= 1;
    std::fs::write(&data, &flipped).unwrap();
    assert_eq!(open(dir.path()).generation(), None);
    std::fs::write(&data, &good_data).unwrap();
    assert_eq!(open(dir.path()).generation(), Some(1));
    // Missing graph file, garbage manifest, missing manifest.
    let good_graph = std::fs::read(&graph).unwrap();
    std::fs::remove_file(&graph).unwrap();
    assert_eq!(open(dir.path()).generation(), None);
    std::fs::write(&graph, &good_graph).unwrap();
    std::fs::write(&manifest, b"{\"format\": 1").unwrap();
    assert_eq!(open(dir.path()).generation(), None);
    std::fs::remove_file(&manifest).unwrap();
    assert_eq!(open(dir.path()).generation(), None);
    std::fs::write(&manifest, &good_manifest).unwrap();
    assert_eq!(open(dir.path()).len(), 100);
    // Another dimension.
    assert_eq!(
        VectorIndex::open(dir.path(), DIM + 1, HnswParams::default())
            .unwrap()
            .generation(),
        None
    );
}

/// Exact top-`k` (id, cosine) among `items` passing `allow`, ties by id.
fn exact_top(
    items: &[(ImageId, Vec<f32>)],
    q: &[f32],
    k: usize,
    allow: &dyn Fn(ImageId) -> bool,
) -> Vec<(ImageId, f32)> {
    let mut scored: Vec<(ImageId, f32)> = items
        .iter()
        .filter(|(id, _)| allow(*id))
        .map(|(id, v)| (*id, v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>()))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(k);
    scored
}

/// Same ids (as sets: near-equal scores may swap) and scores within `tol` (matched by id).
fn assert_same_hits(got: &[(ImageId, f32)], want: &[(ImageId, f32)], tol: f32) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    let mut g: Vec<ImageId> = got.iter().map(|h| h.0).collect();
    let mut w: Vec<ImageId> = want.iter().map(|h| h.0).collect();
    g.sort();
    w.sort();
    if g != w {
        // Only a tie at the cut may differ.
        let last = want.last().map_or(0.0, |h| h.1);
        for (id, s) in got.iter().filter(|h| !w.contains(&h.0)) {
            assert!((s - last).abs() <= tol, "{id} ({s}) not in {want:?}");
        }
    }
    for (id, s) in got {
        if let Some((_, ws)) = want.iter().find(|h| h.0 == *id) {
            assert!((s - ws).abs() <= tol, "{id}: {s} vs {ws}");
        }
    }
    for w in got.windows(2) {
        assert!(w[0].1 >= w[1].1, "not best first: {got:?}");
    }
}

/// A flat copy is made (not left to the staleness rule) and used.
fn synced(index: &mut VectorIndex) {
    index.sync_flat();
    assert!(!index.hnsw_rs_search);
    assert!(index.pending_ids.is_empty());
    assert_eq!(index.flat.len(), index.ids.len());
}

#[test]
fn flat_search_at_full_ef_is_exact_with_and_without_filters() {
    let dir = tempfile::tempdir().unwrap();
    let mut index = open(dir.path());
    let items = small(600);
    index.insert_batch(&items).unwrap();
    synced(&mut index);
    let mut rng = Rng::new(21);
    let odd = |id: ImageId| id.0 % 2 == 1 && !id.0.is_multiple_of(7);
    for _ in 0..20 {
        let q = rng.unit_vector(DIM);
        let all = exact_top(&items, &q, 10, &|_| true);
        for strategy in [Strategy::Plain, Strategy::Exact] {
            let got = index
                .search_with(&q, 10, Some(600), None, strategy)
                .unwrap();
            assert_same_hits(&got, &all, 1e-5);
        }
        let want = exact_top(&items, &q, 10, &odd);
        for strategy in [
            Strategy::GraphFilter,
            Strategy::PostFilter(0.4),
            Strategy::Exact,
        ] {
            let got = index
                .search_with(&q, 10, Some(600), Some(&odd), strategy)
                .unwrap();
            assert_same_hits(&got, &want, 1e-5);
        }
    }
}

#[test]
fn flat_search_agrees_with_hnsw_rs_search() {
    let dir = tempfile::tempdir().unwrap();
    let mut index = open(dir.path());
    let items = small(3000);
    // One by one: with parallel inserts hnsw_rs's entry point is not always the first point
    // on the top level, and the two searches would start from different points.
    for (id, v) in &items {
        index.insert(*id, v).unwrap();
    }
    synced(&mut index);
    let mut rng = Rng::new(23);
    let (mut same, mut total) = (0usize, 0usize);
    for _ in 0..50 {
        let q = rng.unit_vector(DIM);
        let flat = index
            .search_with(&q, 10, Some(32), None, Strategy::Plain)
            .unwrap();
        index.hnsw_rs_search = true;
        let theirs = index
            .search_with(&q, 10, Some(32), None, Strategy::Plain)
            .unwrap();
        index.hnsw_rs_search = false;
        assert_eq!(flat.len(), 10);
        for (id, s) in &flat {
            total += 1;
            if let Some((_, t)) = theirs.iter().find(|h| h.0 == *id) {
                same += 1;
                // Theirs is 1 - d²/2 from an L2 distance; ours a dot product.
                assert!((s - t).abs() < 1e-5, "{id}: {s} vs {t}");
            }
        }
    }
    // The walks differ only in the upper-layer descent (ours repeats the greedy step until
    // no neighbour is closer, hnsw_rs takes one step per layer).
    assert!(same as f64 / total as f64 >= 0.97, "{same}/{total}");
}

#[test]
fn flat_search_follows_removes_inserts_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let mut items = small(1500);
    let later = items.split_off(1200);
    let mut index = open(dir.path());
    index.insert_batch(&items).unwrap();
    synced(&mut index);
    // Tombstones in the copy, and points inserted after it (scanned exactly).
    let removed: HashSet<ImageId> = items.iter().step_by(3).map(|(id, _)| *id).collect();
    for id in &removed {
        assert!(index.remove(*id));
    }
    for (id, v) in &later[..100] {
        index.insert(*id, v).unwrap();
    }
    index.insert_batch(&later[100..]).unwrap();
    assert_eq!(index.pending_ids.len(), 300, "below the staleness limit");
    let everything: Vec<(ImageId, Vec<f32>)> = items.iter().chain(&later).cloned().collect();
    let live = |id: ImageId| !removed.contains(&id);
    let even = |id: ImageId| id.0.is_multiple_of(2);
    let mut rng = Rng::new(29);
    let queries: Vec<Vec<f32>> = (0..10).map(|_| rng.unit_vector(DIM)).collect();
    let check = |index: &VectorIndex| {
        for q in &queries {
            let want = exact_top(&everything, q, 10, &live);
            for strategy in [
                Strategy::PostFilter(0.7),
                Strategy::GraphFilter,
                Strategy::Exact,
            ] {
                let got = index
                    .search_with(q, 10, Some(1500), None, strategy)
                    .unwrap();
                assert_same_hits(&got, &want, 1e-5);
            }
            let want = exact_top(&everything, q, 10, &|id| live(id) && even(id));
            for strategy in [Strategy::PostFilter(0.3), Strategy::GraphFilter] {
                let got = index
                    .search_with(q, 10, Some(1500), Some(&even), strategy)
                    .unwrap();
                assert_same_hits(&got, &want, 1e-5);
            }
        }
    };
    check(&index);
    let before: Vec<_> = queries
        .iter()
        .map(|q| index.search(q, 10, None, None).unwrap())
        .collect();
    index.save(1).unwrap();
    drop(index);
    let mut index = open(dir.path());
    // Reloaded: one flat copy of everything, tombstones marked.
    assert!(index.pending_ids.is_empty());
    assert_eq!(index.flat.len(), 1500);
    check(&index);
    for (q, b) in queries.iter().zip(&before) {
        assert_eq!(&index.search(q, 10, None, None).unwrap(), b);
    }
    // Compaction remakes the copy without the tombstones.
    index.compact().unwrap();
    assert_eq!(index.flat.len(), 1500 - removed.len());
    check(&index);
}

#[test]
fn enough_inserts_remake_the_flat_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut index = open(dir.path());
    let items = small(2100);
    index.insert_batch(&items[..1000]).unwrap();
    assert_eq!((index.flat.len(), index.pending_ids.len()), (0, 1000));
    index.insert_batch(&items[1000..1100]).unwrap();
    assert_eq!((index.flat.len(), index.pending_ids.len()), (1100, 0));
    for (id, v) in &items[1100..] {
        index.insert(*id, v).unwrap();
    }
    assert_eq!(index.flat.len() + index.pending_ids.len(), 2100);
    assert_eq!(index.pending_ids.len(), 1000);
}

#[test]
fn compaction_drops_tombstones_and_keeps_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut index = open(dir.path());
    let items = small(200);
    index.insert_batch(&items).unwrap();
    for (id, _) in items.iter().take(39) {
        index.remove(*id);
    }
    assert!(!index.needs_compaction()); // 39/200 < 20%
    index.remove(items[39].0);
    assert!(index.needs_compaction()); // 40/200
    let q = Rng::new(11).unit_vector(DIM);
    let before = index.search(&q, 10, Some(200), None).unwrap();
    index.compact().unwrap();
    assert_eq!((index.len(), index.tombstones()), (160, 0));
    assert!(!index.contains(items[0].0));
    assert_eq!(index.search(&q, 10, Some(200), None).unwrap(), before);
}
