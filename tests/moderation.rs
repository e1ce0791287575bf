//! Moderation through the engine, on both stores: match lists of reference images and of PDQ
//! hashes, flags at ingest and when entries are added, the flagged filter, the review queue and
//! decisions (a cleared match is never raised again), matches, removal of entries, lists and
//! flagged images, and the audit log of all of it in order; `reindex` keeping lists and flags,
//! the PDQ backfill, the audit log surviving `kill -9` of a process appending to it, and the
//! command line.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use candle_core::Device;
use common::*;
use image::{DynamicImage, ImageFormat};

use blipsearch::engine::models::{ModelSource, Retriever};
use blipsearch::engine::search::{SearchMode, SearchParams};
use blipsearch::engine::{
    Engine, ErrorKind, Filter, FlagFilter, ImageId, ImageRecord, IngestOptions, Location,
    MatchParams, MatchRule, MatchRules, Silent, StoreLocation, Verdict,
};
use blipsearch::index::{AuditLog, Store, AUDIT_FILE};

/// The rules of the lists here. The tiny fixture model has random weights: it puts unrelated
/// photos at ITC cosines up to about 0.93 (BLIP base's default of 0.92 would flag them) and
/// near-copies above 0.98.
const TINY_RULES: MatchRules = MatchRules {
    pdq_distance: 31,
    min_cosine: 0.97,
};

fn retriever() -> Retriever {
    Retriever::load(
        &ModelSource::Dir(fixtures().join("tiny-a/retrieval")),
        &Device::Cpu,
    )
    .unwrap()
}

fn options() -> IngestOptions {
    IngestOptions {
        capfilt: None,
        batch_size: 3,
        commit_every: 4,
        ..Default::default()
    }
}

fn fixture_image(name: &str) -> DynamicImage {
    image::open(fixtures().join("images").join(name)).unwrap()
}

fn save(img: &DynamicImage, path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    match path.extension().and_then(|e| e.to_str()) {
        Some("jpg") => {
            let mut out = std::fs::File::create(path).unwrap();
            let rgb = DynamicImage::ImageRgb8(img.to_rgb8());
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80)
                .encode_image(&rgb)
                .unwrap();
        }
        _ => img.save_with_format(path, ImageFormat::Png).unwrap(),
    }
}

/// Reference images and a folder of photos: copies of two references (mirrored, halved as
/// JPEG) among two unrelated pictures.
struct Scene {
    references: PathBuf,
    photos: PathBuf,
}

impl Scene {
    fn new(root: &Path) -> Self {
        let references = root.join("references");
        let photos = root.join("photos");
        save(&fixture_image("rocket.jpg"), &references.join("rocket.png"));
        save(&fixture_image("camera.png"), &references.join("camera.png"));
        let rocket = fixture_image("rocket.jpg");
        save(&rocket.fliph(), &photos.join("rocket_mirror.png"));
        let camera = fixture_image("camera.png");
        let half = camera.resize(
            camera.width() / 2,
            camera.height() / 2,
            image::imageops::FilterType::Triangle,
        );
        save(&half, &photos.join("camera_half.jpg"));
        save(
            &fixture_image("astronaut.png"),
            &photos.join("astronaut.png"),
        );
        save(&fixture_image("coffee.png"), &photos.join("coffee.png"));
        Self { references, photos }
    }
}

/// Every record, by file name.
fn records(engine: &Engine) -> std::collections::BTreeMap<String, ImageRecord> {
    let mut out = std::collections::BTreeMap::new();
    engine
        .for_each(&mut |r| {
            let name = Path::new(&r.path)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.insert(name, r);
            Ok(())
        })
        .unwrap();
    out
}

/// The file names of the images a vector search over everything returns under `flagged`.
fn flagged_names(engine: &Engine, r: &Retriever, flagged: FlagFilter) -> Vec<String> {
    let params = SearchParams {
        k: 50,
        limit: 50,
        rerank_k: Some(0),
        mode: SearchMode::Vector,
        filter: Filter {
            flagged: Some(flagged),
            ..Filter::default()
        },
        ..SearchParams::default()
    };
    let mut names: Vec<String> = engine
        .search_text(r, "a photo", &params)
        .unwrap()
        .hits
        .into_iter()
        .map(|h| {
            Path::new(&h.path)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

fn any_list() -> FlagFilter {
    FlagFilter::default()
}

/// Lists, flags, review, matches, removal and the audit log: what every store must do.
fn moderation_suite(engine: &Engine, root: &Path) {
    let r = retriever();
    let scene = Scene::new(root);

    // A list of two reference images, made before the photos arrive.
    let bank = engine.create_list("bank", TINY_RULES, "cli").unwrap();
    assert_eq!((bank.name.as_str(), bank.entries), ("bank", 0));
    let err = engine.create_list("bank", TINY_RULES, "cli").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert_eq!(
        engine
            .create_list("Bad Name", TINY_RULES, "cli")
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    let added = engine
        .add_list_files(
            &r,
            "bank",
            std::slice::from_ref(&scene.references),
            Some("known"),
            "cli",
            &Silent,
        )
        .unwrap();
    assert_eq!(added.added.len(), 2, "{:?}", added.skipped);
    assert_eq!(added.flagged, 0, "nothing in the collection yet");
    for e in &added.added {
        assert_eq!(
            e.pdq.len(),
            8,
            "a reference image has its eight dihedral hashes"
        );
        assert!(e.quality.is_some() && e.itc.is_some());
        assert_eq!(e.label.as_deref(), Some("known"));
    }
    let entry_of = |source: &str| {
        added
            .added
            .iter()
            .find(|e| e.source.as_deref() == Some(source))
            .unwrap()
            .id
    };
    let (rocket_entry, camera_entry) = (entry_of("rocket.png"), entry_of("camera.png"));
    assert_eq!(engine.lists().unwrap()[0].entries, 2);

    // The photos: the copies are flagged as they are ingested, the others not.
    let s = engine
        .ingest(
            &r,
            options(),
            std::slice::from_ref(&scene.photos),
            false,
            &Silent,
        )
        .unwrap();
    assert_eq!(s.added, 4, "{s:?}");
    let recs = records(engine);
    for r in recs.values() {
        assert!(r.pdq.is_some(), "{} has a PDQ hash", r.path);
    }
    let flags = |name: &str| -> Vec<(String, u64)> {
        recs[name]
            .flags
            .iter()
            .map(|f| (f.list.clone(), f.entry))
            .collect()
    };
    assert_eq!(
        flags("rocket_mirror.png"),
        [("bank".to_string(), rocket_entry)]
    );
    assert_eq!(
        flags("camera_half.jpg"),
        [("bank".to_string(), camera_entry)]
    );
    assert!(flags("astronaut.png").is_empty() && flags("coffee.png").is_empty());
    for name in ["rocket_mirror.png", "camera_half.jpg"] {
        let f = &recs[name].flags[0];
        assert!(
            matches!(f.rule, MatchRule::Pdq | MatchRule::Both),
            "{name}: {f:?}"
        );
        assert!(
            f.pdq_distance.unwrap() <= 31 && f.cosine.is_some() && f.pending(),
            "{f:?}"
        );
    }
    let rocket_id = recs["rocket_mirror.png"].id;
    let camera_id = recs["camera_half.jpg"].id;
    assert_eq!(
        flagged_names(engine, &r, any_list()),
        ["camera_half.jpg", "rocket_mirror.png"]
    );

    // The review queue, oldest flag first, with the entries the flags name.
    let page = engine.review_queue(None, 0, 10).unwrap();
    assert_eq!(page.total, 2);
    let mut queued: Vec<ImageId> = page.items.iter().map(|i| i.record.id).collect();
    queued.sort();
    let mut want = vec![rocket_id, camera_id];
    want.sort();
    assert_eq!(queued, want);
    for item in &page.items {
        assert_eq!(item.flags.len(), 1);
        assert_eq!(item.entries.len(), 1);
        assert_eq!(item.entries[0].id, item.flags[0].entry);
    }
    assert_eq!(engine.review_queue(None, 1, 10).unwrap().items.len(), 1);
    assert_eq!(
        engine
            .review_queue(Some("nosuch"), 0, 10)
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );

    // Decisions: the camera copy cleared, the rocket copy confirmed.
    let rec = engine
        .decide(camera_id, Verdict::Cleared, "a product shot", "cli")
        .unwrap();
    let d = rec.flags[0].decision.as_ref().unwrap();
    assert_eq!(
        (d.verdict, d.note.as_str(), d.actor.as_str()),
        (Verdict::Cleared, "a product shot", "cli")
    );
    engine
        .decide(rocket_id, Verdict::Confirmed, "", "cli")
        .unwrap();
    let again = engine
        .decide(rocket_id, Verdict::Cleared, "", "cli")
        .unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Conflict, "nothing waits: {again}");
    assert_eq!(
        engine
            .decide(ImageId(987_654_321), Verdict::Cleared, "", "cli")
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(engine.review_queue(None, 0, 10).unwrap().total, 0);
    assert_eq!(
        flagged_names(engine, &r, any_list()),
        ["rocket_mirror.png"],
        "cleared is not flagged"
    );
    assert!(flagged_names(
        engine,
        &r,
        FlagFilter {
            list: None,
            pending_only: true
        }
    )
    .is_empty());

    // The same reference added again: the cleared copy is not flagged again.
    let camera_ref = scene.references.join("camera.png");
    let again = engine
        .add_list_files(&r, "bank", &[camera_ref], None, "cli", &Silent)
        .unwrap();
    assert_eq!((again.added.len(), again.flagged), (1, 0));
    assert_eq!(
        again.added[0].id, camera_entry,
        "the same picture is the same entry"
    );
    assert_eq!(engine.list_entries("bank").unwrap().len(), 2);
    // Its plain hash from a hash file would replace the image's entry with a poorer one.
    let camera_hash = engine
        .list_entries("bank")
        .unwrap()
        .into_iter()
        .find(|e| e.id == camera_entry)
        .unwrap()
        .pdq[0];
    let dup = engine
        .add_list_hashes("bank", &camera_hash.to_hex(), None, "cli")
        .unwrap();
    assert!(dup.added.is_empty(), "{dup:?}");
    assert!(dup.skipped[0].reason.contains("camera.png"), "{dup:?}");
    let kept = engine.list_entries("bank").unwrap();
    let camera = kept.iter().find(|e| e.id == camera_entry).unwrap();
    assert_eq!((camera.pdq.len(), camera.itc.is_some()), (8, true));

    // A hash list made after the photos: the collection is checked against it at once.
    let astronaut = recs["astronaut.png"].pdq.unwrap();
    engine.create_list("hashes", TINY_RULES, "cli").unwrap();
    let text = format!("hash,label\n{},astronaut\nnot-a-hash\n\n", astronaut.hash);
    let h = engine
        .add_list_hashes("hashes", &text, Some("bank.csv"), "cli")
        .unwrap();
    assert_eq!((h.added.len(), h.flagged), (1, 1), "{h:?}");
    assert_eq!(h.skipped.len(), 1);
    assert_eq!(h.skipped[0].source, "line 3");
    let astronaut_id = recs["astronaut.png"].id;
    let rec = engine.get(astronaut_id).unwrap().unwrap();
    assert_eq!(rec.flags.len(), 1);
    let f = &rec.flags[0];
    assert_eq!(
        (f.rule, f.pdq_distance, f.cosine),
        (MatchRule::Pdq, Some(0), None)
    );
    assert_eq!(
        flagged_names(
            engine,
            &r,
            FlagFilter {
                list: Some("hashes".into()),
                pending_only: false
            }
        ),
        ["astronaut.png"]
    );
    assert_eq!(
        engine
            .add_list_hashes("nosuch", &text, None, "cli")
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );

    // Matches, computed afresh (whatever the flags say).
    let all = engine.matches(&MatchParams::default()).unwrap();
    let mut found: Vec<(ImageId, String)> = all.iter().map(|m| (m.id, m.list.clone())).collect();
    found.sort();
    let mut want = vec![
        (rocket_id, "bank".to_string()),
        (camera_id, "bank".to_string()),
        (astronaut_id, "hashes".to_string()),
    ];
    want.sort();
    assert_eq!(found, want);
    let only = engine
        .matches(&MatchParams {
            list: Some("hashes".into()),
            ..MatchParams::default()
        })
        .unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(
        (only[0].id, only[0].label.as_deref()),
        (astronaut_id, Some("astronaut"))
    );
    let tight = engine
        .matches(&MatchParams {
            pdq_distance: Some(0),
            min_cosine: Some(1.0),
            ..MatchParams::default()
        })
        .unwrap();
    assert_eq!(
        tight.iter().map(|m| m.id).collect::<Vec<_>>(),
        [astronaut_id],
        "exact hash only"
    );
    assert_eq!(
        engine
            .matches(&MatchParams {
                list: Some("nosuch".into()),
                ..MatchParams::default()
            })
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );

    // Removing an entry keeps the flags it raised; deleting a list removes its flags.
    let removed = engine
        .remove_list_entry("bank", rocket_entry, "cli")
        .unwrap();
    assert_eq!(removed.id, rocket_entry);
    assert_eq!(
        engine
            .remove_list_entry("bank", rocket_entry, "cli")
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(engine.get(rocket_id).unwrap().unwrap().flags.len(), 1);
    let gone = engine.delete_list("hashes", "cli").unwrap();
    assert_eq!((gone.name.as_str(), gone.entries), ("hashes", 1));
    assert!(engine.get(astronaut_id).unwrap().unwrap().flags.is_empty());
    assert_eq!(
        engine.delete_list("hashes", "cli").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(engine.lists().unwrap().len(), 1);

    // A flagged image removed: audited.
    assert!(engine.remove(rocket_id, "key:0badf00d").unwrap());

    // The audit log: every step in order, each with its actor, numbered from 1.
    let log = engine.audit(0, 1000).unwrap();
    assert!(
        log.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1),
        "{log:?}"
    );
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "list_create",
            "entries_add",
            "match",
            "match",
            "decision",
            "decision",
            "entries_add",
            "list_create",
            "entries_add",
            "match",
            "entry_remove",
            "unflag",
            "list_delete",
            "delete",
        ]
    );
    assert!(log[..13].iter().all(|e| e.actor == "cli"));
    assert_eq!(log[13].actor, "key:0badf00d");
    assert_eq!(log[13].details["id"], rocket_id.0);
    assert_eq!(log[4].details["verdict"], "cleared");
    assert_eq!(log[4].details["note"], "a product shot");
    assert_eq!(log[9].details["id"], astronaut_id.0);
    assert_eq!(log[9].details["rule"], "pdq");
    assert_eq!(engine.audit(12, 1).unwrap()[0].action, "list_delete");
    assert!(engine.audit(14, 10).unwrap().is_empty());
}

#[test]
fn lists_flags_review_and_audit_on_the_embedded_store() {
    let tmp = tempfile::tempdir().unwrap();
    let r = retriever();
    let index = tmp.path().join("index");
    let engine = Engine::open(&index, &collection_info(&r)).unwrap();
    moderation_suite(&engine, tmp.path());
    assert!(
        index.join(AUDIT_FILE).is_file(),
        "the log is in the collection directory"
    );
}

#[test]
fn lists_flags_review_and_audit_on_milvus() {
    let milvus = common::milvus::MilvusLite::start();
    let tmp = tempfile::tempdir().unwrap();
    let r = retriever();
    let index = tmp.path().join("index");
    let at = Location {
        dir: index.clone(),
        store: StoreLocation::Milvus(milvus.address("moderation").parse().unwrap()),
    };
    let engine = Engine::open(at.clone(), &collection_info(&r)).unwrap();
    moderation_suite(&engine, tmp.path());
    assert!(
        index.join(AUDIT_FILE).is_file(),
        "the log is beside the blobs"
    );

    // Another process sharing the store sees the lists, and adds to them: this one's next
    // ingest checks against what it added.
    let other = Engine::open_existing(at).unwrap();
    assert_eq!(other.lists().unwrap().len(), 1);
    let coffee = std::fs::canonicalize(tmp.path().join("photos/coffee.png")).unwrap();
    let coffee_id = engine
        .by_path(&coffee.display().to_string())
        .unwrap()
        .unwrap();
    let hash = engine.get(coffee_id).unwrap().unwrap().pdq.unwrap().hash;
    other
        .create_list("shared", TINY_RULES, "key:00000001")
        .unwrap();
    other
        .add_list_hashes("shared", &hash.to_hex(), None, "key:00000001")
        .unwrap();
    assert_eq!(
        engine.get(coffee_id).unwrap().unwrap().flags[0].list,
        "shared"
    );
    let copy = tmp.path().join("later/coffee_copy.png");
    save(&fixture_image("coffee.png").grayscale(), &copy);
    engine
        .ingest(&r, options(), std::slice::from_ref(&copy), false, &Silent)
        .unwrap();
    let id = engine
        .by_path(&std::fs::canonicalize(&copy).unwrap().display().to_string())
        .unwrap()
        .unwrap();
    let rec = engine.get(id).unwrap().unwrap();
    assert_eq!(
        rec.flags
            .iter()
            .map(|f| f.list.as_str())
            .collect::<Vec<_>>(),
        ["shared"],
        "{:?}",
        rec.flags
    );
    // Both processes wrote one log.
    let actors: Vec<String> = engine
        .audit(0, 1000)
        .unwrap()
        .into_iter()
        .map(|e| e.actor)
        .collect();
    assert!(actors.iter().any(|a| a == "key:00000001"));
}

#[test]
fn reindex_keeps_lists_flags_and_the_log_and_backfill_hashes_what_lacks_one() {
    let tmp = tempfile::tempdir().unwrap();
    let r = retriever();
    let index = tmp.path().join("index");
    let scene = Scene::new(tmp.path());
    {
        let engine = Engine::open(&index, &collection_info(&r)).unwrap();
        engine.create_list("bank", TINY_RULES, "cli").unwrap();
        engine
            .add_list_files(
                &r,
                "bank",
                std::slice::from_ref(&scene.references),
                None,
                "cli",
                &Silent,
            )
            .unwrap();
        engine
            .ingest(
                &r,
                options(),
                std::slice::from_ref(&scene.photos),
                false,
                &Silent,
            )
            .unwrap();
        let camera = records(&engine)["camera_half.jpg"].id;
        engine
            .decide(camera, Verdict::Cleared, "no", "cli")
            .unwrap();
    }
    let before = AuditLog::open(&index.join(AUDIT_FILE))
        .unwrap()
        .read(0, 1000)
        .unwrap();
    Engine::reindex(&index, &r, &collection_info(&r), options(), &Silent).unwrap();
    let engine = Engine::open_existing(&index).unwrap();
    assert_eq!(engine.list_entries("bank").unwrap().len(), 2);
    let recs = records(&engine);
    let camera = &recs["camera_half.jpg"].flags;
    assert_eq!(camera.len(), 1, "not flagged twice: {camera:?}");
    assert_eq!(
        camera[0].decision.as_ref().unwrap().verdict,
        Verdict::Cleared
    );
    assert_eq!(recs["rocket_mirror.png"].flags.len(), 1);
    let after = engine.audit(0, 1000).unwrap();
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "the log carried over as it was"
    );
    assert_eq!(after.len(), before.len(), "nothing new was found");

    // Records without a hash (a collection made before hashes were taken) get one from their
    // files; a file that is gone is reported.
    drop(engine);
    let mut astronaut_hash = String::new();
    {
        let mut store =
            blipsearch::index::Collection::open_existing(&index, Default::default()).unwrap();
        let mut stripped = Vec::new();
        store
            .for_each(&mut |mut r| {
                if r.path.ends_with("astronaut.png") {
                    astronaut_hash = r.pdq.unwrap().hash.to_hex();
                }
                r.pdq = None;
                stripped.push(r);
                Ok(())
            })
            .unwrap();
        store.update_all(&stripped).unwrap();
        store.commit().unwrap();
    }
    std::fs::remove_file(scene.photos.join("coffee.png")).unwrap();
    let engine = Engine::open_existing(&index).unwrap();
    engine.create_list("hashes", TINY_RULES, "cli").unwrap();
    let h = engine
        .add_list_hashes("hashes", &astronaut_hash, None, "cli")
        .unwrap();
    assert_eq!(h.flagged, 0, "no image has a hash to match yet");
    let s = engine
        .backfill_pdq(Default::default(), "cli", &Silent)
        .unwrap();
    assert_eq!((s.hashed, s.had_hash, s.flagged), (3, 0, 1), "{s:?}");
    assert_eq!(s.failed.len(), 1);
    assert!(
        s.failed[0].path.ends_with("coffee.png") && s.failed[0].reason.contains("gone"),
        "{s:?}"
    );
    let recs = records(&engine);
    assert_eq!(recs["astronaut.png"].flags[0].list, "hashes");
    assert!(recs["rocket_mirror.png"].pdq.is_some());
    let again = engine
        .backfill_pdq(Default::default(), "cli", &Silent)
        .unwrap();
    assert_eq!((again.hashed, again.had_hash, again.flagged), (0, 3, 0));
}

/// Appends to the audit log at `$BLIPSEARCH_AUDIT_CHILD` until killed: the other side of
/// `the_audit_log_survives_kill_9`, which runs this test binary with only it.
#[test]
#[ignore = "a child process of the_audit_log_survives_kill_9"]
fn audit_appender_child() {
    let path =
        std::env::var_os("BLIPSEARCH_AUDIT_CHILD").expect("run by the_audit_log_survives_kill_9");
    let log = AuditLog::open(Path::new(&path)).unwrap();
    let pad = "x".repeat(20_000);
    for i in 0u64.. {
        let d = serde_json::json!({ "i": i, "pad": pad });
        log.append("child", "match", d.as_object().unwrap().clone())
            .unwrap();
    }
}

#[test]
fn the_audit_log_survives_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(AUDIT_FILE);
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "audit_appender_child",
                "--ignored",
                "--nocapture",
            ])
            .env("BLIPSEARCH_AUDIT_CHILD", &path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while std::fs::metadata(&path).map_or(0, |m| m.len()) < (round + 1) * 2_000_000 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the child does not write"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let text = std::fs::read(&path).unwrap();
        let complete = text.iter().filter(|&&b| b == b'\n').count() as u64;
        let log = AuditLog::open(&path).unwrap();
        let read = log.read(0, 1_000_000).unwrap();
        // Every complete line but one ended by a later append after a tear parses.
        assert!(
            read.len() as u64 + round >= complete,
            "{} of {complete}",
            read.len()
        );
        assert!(read.windows(2).all(|w| w[0].seq < w[1].seq));
        let next = log
            .append("cli", "decision", serde_json::Map::new())
            .unwrap();
        let torn = text.last() != Some(&b'\n');
        assert_eq!(next.seq, complete + 1 + u64::from(torn), "round {round}");
        let back = log.read(next.seq - 1, 10).unwrap();
        assert_eq!(back.last().unwrap(), &next);
    }
}

/// Runs the binary with `args` after `--index INDEX`: (success, stdout, stderr).
fn cli(index: &Path, args: &[&str]) -> (bool, String, String) {
    let mut all: Vec<&str> = args.to_vec();
    let index = index.display().to_string();
    all.extend(["--index", index.as_str()]);
    blipsearch(&all)
}

fn cli_json(index: &Path, args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = cli(index, args);
    assert!(ok, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

#[test]
fn the_command_line_manages_lists_reviews_and_reads_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("index");
    let scene = Scene::new(tmp.path());
    let model = fixtures().join("tiny-a/retrieval").display().to_string();
    let photos = scene.photos.display().to_string();
    let (ok, _, err) = cli(
        &index,
        &["add", "--model-dir", &model, "--no-captions", &photos],
    );
    assert!(ok, "{err}");

    let (ok, out, err) = cli(&index, &["list", "create", "bank"]);
    assert!(ok && out.contains("created list bank"), "{out}{err}");
    let (ok, _, err) = cli(&index, &["list", "create", "bank"]);
    assert!(!ok && err.contains("exists"), "{err}");
    let (ok, _, err) = cli(&index, &["list", "create", "No Good"]);
    assert!(!ok && err.contains("list name"), "{err}");

    // A hash file with a header, a bad line and the hash of one photo.
    let engine_hash = {
        let engine = Engine::open_existing(&index).unwrap();
        records(&engine)["coffee.png"].pdq.unwrap().hash.to_hex()
    };
    let csv = tmp.path().join("hashes.csv");
    std::fs::write(&csv, format!("pdq,label\n{engine_hash},mug\nzz\n")).unwrap();
    let csv = csv.display().to_string();
    let v = cli_json(&index, &["list", "add", "bank", "--pdq", &csv, "--json"]);
    assert_eq!(v["added"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["added"][0]["label"], "mug");
    assert_eq!(v["added"][0]["vector"], false);
    assert_eq!(v["skipped"][0]["source"], "line 3", "{v}");
    assert_eq!(v["flagged"], 1);
    let bad = tmp.path().join("bad.csv");
    std::fs::write(&bad, "nothing here\nzz\n").unwrap();
    let (ok, out, err) = cli(
        &index,
        &["list", "add", "bank", "--pdq", &bad.display().to_string()],
    );
    assert!(
        !ok && out.contains("line 2") && err.contains("nothing was added"),
        "{out}{err}"
    );

    // Reference images: the copies among the photos are flagged.
    let refs = scene.references.display().to_string();
    let (ok, out, err) = cli(
        &index,
        &[
            "list",
            "add",
            "bank",
            &refs,
            "--label",
            "known",
            "--model-dir",
            &model,
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("added 2 entries to bank; 2 images newly flagged"),
        "{out}"
    );
    let (ok, _, err) = cli(
        &index,
        &["list", "add", "nosuch", &refs, "--model-dir", &model],
    );
    assert!(!ok && err.contains("no match list \"nosuch\""), "{err}");

    let lists = cli_json(&index, &["lists", "--json"]);
    assert_eq!(lists[0]["name"], "bank");
    assert_eq!(lists[0]["entries"], 3);
    let shown = cli_json(&index, &["list", "show", "bank", "--json"]);
    let entries = shown["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    let images: Vec<&serde_json::Value> = entries.iter().filter(|e| e["vector"] == true).collect();
    assert_eq!(images.len(), 2);
    assert!(images
        .iter()
        .all(|e| e["pdq"].as_array().unwrap().len() == 8 && e["label"] == "known"));

    let matches = cli_json(&index, &["matches", "--json"]);
    assert_eq!(matches.as_array().unwrap().len(), 3, "{matches}");
    let (ok, _, err) = cli(&index, &["matches", "--pdq-distance", "300"]);
    assert!(!ok && err.contains("PDQ distance"), "{err}");

    // The flagged filter, by file-name words without a model.
    let found = cli_json(
        &index,
        &[
            "search",
            "coffee rocket camera astronaut",
            "--mode",
            "text",
            "--rerank-k",
            "0",
            "--flagged",
            "bank",
            "--json",
        ],
    );
    let mut names: Vec<String> = found["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            Path::new(h["path"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["camera_half.jpg", "coffee.png", "rocket_mirror.png"]
    );
    let (ok, _, err) = cli(
        &index,
        &[
            "search",
            "x",
            "--mode",
            "text",
            "--rerank-k",
            "0",
            "--flagged",
            "nosuch",
        ],
    );
    assert!(!ok && err.contains("no match list"), "{err}");

    // Review and a decision.
    let queue = cli_json(&index, &["review", "--json"]);
    assert_eq!(queue["total"], 3, "{queue}");
    let first = queue["items"][0]["id"].as_u64().unwrap().to_string();
    let (ok, out, err) = cli(
        &index,
        &["review", "decide", &first, "cleared", "--note", "checked"],
    );
    assert!(ok && out.contains("1 flag(s) cleared"), "{out}{err}");
    let (ok, _, err) = cli(&index, &["review", "decide", &first, "confirmed"]);
    assert!(!ok && err.contains("no flag waiting"), "{err}");
    let (ok, _, err) = cli(&index, &["review", "decide", "abc", "cleared"]);
    assert!(!ok && err.contains("invalid value"), "{err}");
    assert_eq!(cli_json(&index, &["review", "--json"])["total"], 2);

    // Backfill: every image has its hash already.
    let (ok, out, err) = cli(&index, &["reindex", "--only", "pdq"]);
    assert!(ok && out.contains("hashed 0, had a hash 4"), "{out}{err}");

    // Entries and lists go.
    let entry = entries[0]["id"].as_u64().unwrap().to_string();
    let (ok, _, err) = cli(&index, &["list", "remove", "bank", &entry]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&index, &["list", "remove", "bank", &entry]);
    assert!(!ok && err.contains("has no entry"), "{err}");
    let (ok, _, err) = cli(&index, &["list", "delete", "bank"]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&index, &["list", "show", "bank"]);
    assert!(!ok && err.contains("no match list"), "{err}");

    // The log, all of it by the command line.
    let log = cli_json(&index, &["audit", "--json"]);
    let actions: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions[..2], ["list_create", "entries_add"]);
    assert_eq!(actions[actions.len() - 2..], ["unflag", "list_delete"]);
    assert_eq!(actions.iter().filter(|a| **a == "match").count(), 3);
    assert!(log.as_array().unwrap().iter().all(|e| e["actor"] == "cli"));
    let page = cli_json(&index, &["audit", "--after", "2", "--limit", "1", "--json"]);
    assert_eq!(page.as_array().unwrap().len(), 1);
    assert_eq!(page[0]["seq"], 3);
    let (ok, out, _) = cli(&index, &["audit", "--limit", "2"]);
    assert!(
        ok && out.lines().count() == 2 && out.contains("list_create"),
        "{out}"
    );
}

/// The transforms of `tests/fixtures/pdq` (made by its `generate.py` from the fixture photos),
/// and whether PDQ is expected to find them.
const TRANSFORMS: [(&str, bool); 8] = [
    ("resize50", true),
    ("jpeg40", true),
    ("grey", true),
    ("mirror", true),
    ("rotate90", true),
    ("text", true),
    ("crop2", false),
    ("crop5", false),
];

/// The fixture photos the transformed copies were made from.
const ORIGINALS: [&str; 5] = [
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
];

#[test]
fn transformed_copies_are_found_by_pdq_and_nothing_else_is() {
    let tmp = tempfile::tempdir().unwrap();
    let r = retriever();
    let engine = Engine::open(&tmp.path().join("index"), &collection_info(&r)).unwrap();
    let originals: Vec<PathBuf> = ORIGINALS
        .iter()
        .map(|n| fixtures().join("images").join(n))
        .collect();
    engine.create_list("originals", TINY_RULES, "cli").unwrap();
    let added = engine
        .add_list_files(&r, "originals", &originals, None, "cli", &Silent)
        .unwrap();
    assert_eq!(added.added.len(), ORIGINALS.len(), "{:?}", added.skipped);
    let entry_of = |stem: &str| {
        added
            .added
            .iter()
            .find(|e| {
                e.source
                    .as_deref()
                    .is_some_and(|s| s.starts_with(&format!("{stem}.")))
            })
            .unwrap()
            .id
    };

    // The copies, and an unrelated photo.
    let copies = tmp.path().join("copies");
    std::fs::create_dir_all(&copies).unwrap();
    for e in std::fs::read_dir(fixtures().join("pdq")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "jpg") {
            std::fs::copy(&p, copies.join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(
        fixtures().join("images/motorcycle_rgba.png"),
        copies.join("motorcycle.png"),
    )
    .unwrap();
    let s = engine
        .ingest(&r, options(), &[copies], false, &Silent)
        .unwrap();
    assert_eq!(s.added, ORIGINALS.len() * TRANSFORMS.len() + 1, "{s:?}");

    let recs = records(&engine);
    let mut table = String::from("transform  found by PDQ  distances\n");
    for (transform, expected) in TRANSFORMS {
        let mut found = 0;
        let mut distances = Vec::new();
        for original in ORIGINALS {
            let stem = original.split('.').next().unwrap();
            let rec = &recs[&format!("{stem}.{transform}.jpg")];
            let by_pdq: Vec<_> = rec
                .flags
                .iter()
                .filter(|f| matches!(f.rule, MatchRule::Pdq | MatchRule::Both))
                .collect();
            // Whatever fired, only the copy's own original.
            for f in &rec.flags {
                assert_eq!(
                    f.entry,
                    entry_of(stem),
                    "{stem}.{transform} flagged by another entry: {f:?}"
                );
            }
            let distance = rec.flags.first().and_then(|f| f.pdq_distance);
            distances.push(distance.map_or("-".to_string(), |d| d.to_string()));
            if !by_pdq.is_empty() {
                found += 1;
            }
            assert_eq!(
                !by_pdq.is_empty(),
                expected,
                "{stem}.{transform}: {:?}",
                rec.flags
            );
        }
        table.push_str(&format!(
            "{transform:<10} {found}/{}          {}\n",
            ORIGINALS.len(),
            distances.join(" ")
        ));
    }
    assert!(
        recs["motorcycle.png"].flags.is_empty(),
        "{:?}",
        recs["motorcycle.png"].flags
    );
    eprintln!("{table}");

    // `matches` with the ITC rule off finds exactly the non-crop copies.
    let by_pdq = engine
        .matches(&MatchParams {
            min_cosine: Some(1.0),
            ..MatchParams::default()
        })
        .unwrap();
    let expected = ORIGINALS.len() * TRANSFORMS.iter().filter(|t| t.1).count();
    assert_eq!(by_pdq.len(), expected, "{by_pdq:?}");
    assert!(by_pdq.iter().all(|m| m.rule == MatchRule::Pdq));
}
