//! Product catalogues: import of the fixture catalogue (JSON lines and CSV) with its counts,
//! schema and malformed lines; re-import that changes texts and attributes without embedding
//! anything again (a counting wrapper around the real models says so), a changed image
//! embedded again, a dropped image removed (its file kept), `--sync`; a type conflict named by
//! its line; CapFilt scoring product texts but never dropping them; the same on Milvus; the
//! `import` command; and `POST /api/products`, `DELETE /api/products/{product}`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use candle_core::{Device, Tensor};
use common::catalogue::{self, FixtureProduct, Format};
use common::*;
use image::DynamicImage;

use blipsearch::engine::models::{
    CapFiltCandidate, CapFiltParams, Captioner, ItmScore, ModelSource, Retriever,
};
use blipsearch::engine::{
    AttrType, AttrValue, CapFiltJob, CaptionSource, EncodedImages, EncodedText, Encoders, Engine,
    Event, ImageRecord, IngestOptions, LocalModels, Location, Progress, Schema, Silent,
    StoreLocation,
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
        batch_size: 4,
        commit_every: 8,
        ..Default::default()
    }
}

/// The real models, counting what they are asked to do.
struct Counting<'a, M: Encoders> {
    inner: &'a M,
    images: AtomicUsize,
    capfilt: AtomicUsize,
    itm: AtomicUsize,
}

impl<'a, M: Encoders> Counting<'a, M> {
    fn new(inner: &'a M) -> Self {
        Self {
            inner,
            images: AtomicUsize::new(0),
            capfilt: AtomicUsize::new(0),
            itm: AtomicUsize::new(0),
        }
    }

    /// (images encoded, images captioned, ITM pairs) since the last call.
    fn take(&self) -> (usize, usize, usize) {
        (
            self.images.swap(0, Ordering::SeqCst),
            self.capfilt.swap(0, Ordering::SeqCst),
            self.itm.swap(0, Ordering::SeqCst),
        )
    }
}

impl<M: Encoders> Encoders for Counting<'_, M> {
    fn encode_images(
        &self,
        images: Vec<DynamicImage>,
    ) -> blipsearch::engine::Result<EncodedImages> {
        self.images.fetch_add(images.len(), Ordering::SeqCst);
        self.inner.encode_images(images)
    }
    fn encode_texts(&self, texts: Vec<String>) -> blipsearch::engine::Result<Vec<EncodedText>> {
        self.inner.encode_texts(texts)
    }
    fn itm(&self, text: String, tokens: Tensor) -> blipsearch::engine::Result<Vec<ItmScore>> {
        self.itm.fetch_add(tokens.dim(0).unwrap(), Ordering::SeqCst);
        self.inner.itm(text, tokens)
    }
    fn capfilt(&self, job: CapFiltJob) -> blipsearch::engine::Result<Vec<Vec<CapFiltCandidate>>> {
        self.capfilt.fetch_add(job.images.len(), Ordering::SeqCst);
        self.inner.capfilt(job)
    }
    fn can_caption(&self) -> bool {
        self.inner.can_caption()
    }
}

/// Every event, as text.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Progress for Recorder {
    fn event(&self, e: Event<'_>) {
        let line = match e {
            Event::Started { what, total, .. } => format!("started {what} {total}"),
            Event::Working { .. } => return,
            Event::Done { n } => format!("done {n}"),
            Event::Failed { item, .. } => format!("failed {item}"),
            Event::Note { .. } => return,
            Event::Finished => "finished".into(),
        };
        self.0.lock().unwrap().push(line);
    }
}

/// The records of the collection by product id, each product's sorted by path.
fn by_product(engine: &Engine) -> BTreeMap<String, Vec<ImageRecord>> {
    let mut out: BTreeMap<String, Vec<ImageRecord>> = BTreeMap::new();
    engine
        .for_each(&mut |r| {
            let id = r.product.as_ref().map_or(String::new(), |p| p.id.clone());
            out.entry(id).or_default().push(r);
            Ok(())
        })
        .unwrap();
    for v in out.values_mut() {
        v.sort_by(|a, b| a.path.cmp(&b.path));
    }
    out
}

fn canonical(p: &Path) -> String {
    std::fs::canonicalize(p).unwrap().display().to_string()
}

fn fixture_schema() -> Schema {
    Schema::from([
        ("brand".into(), AttrType::Keyword),
        ("category".into(), AttrType::Keyword),
        ("color".into(), AttrType::Keyword),
        ("in_stock".into(), AttrType::Bool),
        ("price".into(), AttrType::Number),
        ("released".into(), AttrType::Date),
    ])
}

/// Asserts the collection holds `products` as the fixture describes them, under `shop`.
fn assert_holds(engine: &Engine, shop: &Path, products: &[FixtureProduct]) {
    let stored = by_product(engine);
    for p in products {
        let records = stored
            .get(&p.id)
            .unwrap_or_else(|| panic!("{} is missing", p.id));
        let mut want: Vec<String> = p.images.iter().map(|i| canonical(&shop.join(i))).collect();
        want.sort();
        let paths: Vec<&str> = records.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, want, "{}", p.id);
        for r in records {
            let got = r.product.as_ref().unwrap();
            assert_eq!(got.title.as_deref(), Some(p.title.as_str()));
            assert_eq!(got.description.as_deref(), Some(p.description.as_str()));
            let a = &got.attributes;
            assert_eq!(a["brand"], AttrValue::Text(p.brand.clone()));
            assert_eq!(a["color"], AttrValue::Text(p.color.clone()));
            assert_eq!(a["price"], AttrValue::Number(p.price));
            assert_eq!(a["category"], AttrValue::Text(p.category.clone()));
            assert_eq!(a["in_stock"], AttrValue::Bool(p.in_stock));
            assert_eq!(a["released"], AttrValue::Text(p.released.clone()));
            let texts: Vec<(CaptionSource, &str)> = r
                .captions
                .iter()
                .filter(|c| c.source.is_product_text())
                .map(|c| (c.source, c.text.as_str()))
                .collect();
            assert_eq!(
                texts,
                [
                    (CaptionSource::Title, p.title.as_str()),
                    (CaptionSource::Description, p.description.as_str())
                ]
            );
            assert!(r
                .captions
                .iter()
                .all(|c| c.kept || !c.source.is_product_text()));
        }
    }
}

/// Import, re-import with changes, sync: what every store must do.
fn upsert_suite(engine: &Engine, shop: &Path) {
    let r = retriever();
    let models = Counting::new(&r);
    let mut products = catalogue::products(6);
    let fx = catalogue::write_catalogue(shop, &products, Format::JsonLines, true);
    assert_eq!(fx.images(), 12);
    let rec = Recorder::default();
    let s = engine
        .import_file(&models, options(), &fx.file, None, false, &rec)
        .unwrap();
    assert_eq!(
        (s.products_added, s.images_embedded, s.failed.len(), s.total),
        (6, 12, 0, 12),
        "{s:?}"
    );
    let lines: Vec<usize> = s.malformed.iter().map(|m| m.line).collect();
    assert_eq!(lines, fx.malformed_lines);
    assert!(s
        .malformed
        .iter()
        .any(|m| m.reason.contains("\"price\" is a number")));
    assert_eq!(s.attributes, fixture_schema());
    assert_eq!(engine.info().unwrap().attributes, fixture_schema());
    assert_eq!(models.take(), (12, 0, 0));
    let events = rec.0.into_inner().unwrap();
    assert_eq!(events[0], "started products 6");
    assert!(
        events.contains(&"started files 12".to_string()),
        "{events:?}"
    );
    assert_holds(engine, shop, &products);
    let ids_before: BTreeMap<String, Vec<u64>> = by_product(engine)
        .into_iter()
        .map(|(k, v)| (k, v.iter().map(|r| r.id.0).collect()))
        .collect();

    // The same catalogue again: nothing to do.
    let s = engine
        .import_file(&models, options(), &fx.file, None, false, &Silent)
        .unwrap();
    assert_eq!(
        (s.products_unchanged, s.images_unchanged, s.images_updated),
        (6, 12, 0),
        "{s:?}"
    );
    assert_eq!(models.take(), (0, 0, 0));

    // A new title, a new price, an image changed and one dropped, a file touched.
    products[0].title = "acme crimson running shoe".into();
    products[1].price = 1.25;
    let dropped = products[2].images.pop().unwrap();
    catalogue::image_of("white", 99, 0)
        .save(shop.join(&products[2].images[0]))
        .unwrap();
    let touched = std::fs::File::options()
        .append(true)
        .open(shop.join(&products[3].images[0]))
        .unwrap();
    touched
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    let fx = catalogue::write_file(shop, &products, Format::JsonLines, false);
    let s = engine
        .import_file(&models, options(), &fx.file, None, false, &Silent)
        .unwrap();
    assert_eq!(
        (
            s.images_embedded,
            s.images_updated,
            s.images_unchanged,
            s.images_removed
        ),
        (1, 3, 7, 1),
        "{s:?}"
    );
    assert_eq!(
        (s.products_updated, s.products_unchanged, s.total),
        (3, 3, 11),
        "{s:?}"
    );
    assert_eq!(
        models.take(),
        (1, 0, 0),
        "only the changed image is embedded"
    );
    assert!(shop.join(&dropped).exists(), "the merchant's file stays");
    assert_holds(engine, shop, &products);
    let after = by_product(engine);
    let ids = |p: &str| -> Vec<u64> { after[p].iter().map(|r| r.id.0).collect() };
    assert_eq!(
        ids("SKU-00001"),
        ids_before["SKU-00001"],
        "updated in place"
    );
    assert_eq!(ids("SKU-00002"), ids_before["SKU-00002"]);
    assert!(!ids_before["SKU-00003"].contains(&ids("SKU-00003")[0]));

    // Sync with a catalogue of four products: the other two go, their files stay.
    let fx = catalogue::write_file(shop, &products[..4], Format::JsonLines, false);
    let s = engine
        .import_file(&models, options(), &fx.file, None, true, &Silent)
        .unwrap();
    assert_eq!(
        (
            s.products_removed,
            s.images_removed,
            s.products_unchanged,
            s.total
        ),
        (2, 5, 4, 6),
        "{s:?}"
    );
    assert_eq!(models.take(), (0, 0, 0));
    assert!(shop.join(&products[5].images[0]).exists());
    let stored = by_product(engine);
    assert!(!stored.contains_key("SKU-00005") && !stored.contains_key("SKU-00006"));

    // A line that names no product stops sync from removing anything.
    let mut text = std::fs::read_to_string(&fx.file).unwrap();
    text = text.lines().take(2).collect::<Vec<_>>().join("\n");
    text.push_str("\n{\"product\": \"BROKEN\", \n");
    std::fs::write(&fx.file, text).unwrap();
    let s = engine
        .import_file(&models, options(), &fx.file, None, true, &Silent)
        .unwrap();
    assert!(s.sync_skipped.is_some(), "{s:?}");
    assert_eq!((s.products_removed, s.images_removed, s.total), (0, 0, 6));
    // A listed file that cannot be read now keeps its image.
    let hidden = shop.join("hidden.png");
    std::fs::rename(shop.join(&products[0].images[0]), &hidden).unwrap();
    let fx = catalogue::write_file(shop, &products[..4], Format::JsonLines, false);
    let s = engine
        .import_file(&models, options(), &fx.file, None, true, &Silent)
        .unwrap();
    assert_eq!(
        (s.failed.len(), s.images_removed, s.total),
        (1, 0, 6),
        "{s:?}"
    );
    std::fs::rename(&hidden, shop.join(&products[0].images[0])).unwrap();
    // An empty catalogue never empties the collection.
    std::fs::write(&fx.file, "").unwrap();
    let s = engine
        .import_file(&models, options(), &fx.file, None, true, &Silent)
        .unwrap();
    assert!(s.sync_skipped.is_some(), "{s:?}");
    assert_eq!((s.products_removed, s.total), (0, 6));
}

#[test]
fn import_reimport_and_sync_on_the_embedded_store() {
    let tmp = tempfile::tempdir().unwrap();
    let r = retriever();
    let engine = Engine::open(&tmp.path().join("index"), &collection_info(&r)).unwrap();
    upsert_suite(&engine, &tmp.path().join("shop"));
}

#[test]
fn import_reimport_and_sync_on_milvus() {
    let milvus = common::milvus::MilvusLite::start();
    let tmp = tempfile::tempdir().unwrap();
    let r = retriever();
    let engine = Engine::open(
        Location {
            dir: tmp.path().join("index"),
            store: StoreLocation::Milvus(milvus.address("catalogue").parse().unwrap()),
        },
        &collection_info(&r),
    )
    .unwrap();
    upsert_suite(&engine, &tmp.path().join("shop"));
}

#[test]
fn reindex_and_folder_scans_keep_products_and_their_attribute_types() {
    let tmp = tempfile::tempdir().unwrap();
    let r = retriever();
    let index = tmp.path().join("index");
    let shop = tmp.path().join("shop");
    let products = catalogue::products(4);
    let fx = catalogue::write_catalogue(&shop, &products, Format::JsonLines, false);
    {
        let engine = Engine::open(&index, &collection_info(&r)).unwrap();
        engine
            .import_file(&r, options(), &fx.file, None, false, &Silent)
            .unwrap();
    }
    let s = Engine::reindex(&index, &r, &collection_info(&r), options(), &Silent).unwrap();
    assert_eq!(s.added, fx.images(), "{s:?}");
    let engine = Engine::open_existing(&index).unwrap();
    assert_eq!(engine.info().unwrap().attributes, fixture_schema());
    assert_holds(&engine, &shop, &products);

    // A file changed and found by a folder scan (`sync`, a server's watched folder) stays in
    // its product.
    catalogue::image_of("black", 77, 0)
        .save(shop.join(&products[1].images[0]))
        .unwrap();
    let s = engine
        .ingest(&r, options(), &[shop.join("images")], true, &Silent)
        .unwrap();
    assert_eq!(s.updated, 1, "{s:?}");
    assert_holds(&engine, &shop, &products);
}

#[test]
fn csv_catalogues_merge_rows_and_report_bad_rows_by_line() {
    let tmp = tempfile::tempdir().unwrap();
    let r = retriever();
    let engine = Engine::open(&tmp.path().join("index"), &collection_info(&r)).unwrap();
    let shop = tmp.path().join("shop");
    let products = catalogue::products(5);
    let fx = catalogue::write_catalogue(&shop, &products, Format::Csv, true);
    let s = engine
        .import_file(&r, options(), &fx.file, None, false, &Silent)
        .unwrap();
    assert_eq!(
        (s.products_added, s.images_embedded, s.failed.len()),
        (5, fx.images(), 0),
        "{s:?}"
    );
    let lines: Vec<usize> = s.malformed.iter().map(|m| m.line).collect();
    assert_eq!(lines, fx.malformed_lines, "{:?}", s.malformed);
    let reasons: Vec<&str> = s.malformed.iter().map(|m| m.reason.as_str()).collect();
    assert!(reasons[0].contains("fields"), "{reasons:?}");
    assert!(reasons[1].contains("\"price\" is a number"), "{reasons:?}");
    assert!(reasons[2].contains("no product"), "{reasons:?}");
    assert_eq!(s.attributes, fixture_schema());
    assert_holds(&engine, &shop, &products);

    // Paths relative to another folder: --images-root.
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let moved = elsewhere.join("catalogue.csv");
    std::fs::copy(&fx.file, &moved).unwrap();
    let s = engine
        .import_file(&r, options(), &moved, Some(&shop), false, &Silent)
        .unwrap();
    assert_eq!((s.products_unchanged, s.failed.len()), (5, 0), "{s:?}");
    let s = engine
        .import_file(&r, options(), &moved, None, false, &Silent)
        .unwrap();
    assert_eq!(s.failed.len(), fx.images(), "no images beside it: {s:?}");
    assert!(s.failed[0].reason.contains("cannot read"), "{s:?}");
}

#[test]
fn a_type_conflict_with_the_collection_skips_the_line_and_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let r = retriever();
    let engine = Engine::open(&tmp.path().join("index"), &collection_info(&r)).unwrap();
    let shop = tmp.path().join("shop");
    let products = catalogue::products(2);
    let fx = catalogue::write_catalogue(&shop, &products, Format::JsonLines, false);
    engine
        .import_file(&r, options(), &fx.file, None, false, &Silent)
        .unwrap();
    // Price a keyword now, in_stock a number: conflicts with the collection's types.
    let next = tmp.path().join("next.jsonl");
    std::fs::write(
        &next,
        [
            r#"{"product":"SKU-00001","images":["shop/images/sku-00001-1.png"],"attributes":{"price":"cheap"}}"#,
            r#"{"product":"NEW-1","images":["shop/images/sku-00002-1.png"],"attributes":{"weight":2.5}}"#,
            r#"{"product":"NEW-2","images":["shop/images/sku-00002-2.png"],"attributes":{"in_stock":3}}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let s = engine
        .import_file(&r, options(), &next, None, false, &Silent)
        .unwrap();
    let m: Vec<(usize, &str)> = s
        .malformed
        .iter()
        .map(|m| (m.line, m.reason.as_str()))
        .collect();
    assert_eq!(m.len(), 2, "{m:?}");
    assert_eq!(m[0].0, 1);
    assert!(
        m[0].1
            .contains("\"price\" is a number (in this collection)"),
        "{m:?}"
    );
    assert_eq!(m[1].0, 3);
    assert!(m[1].1.contains("\"in_stock\" is a bool"), "{m:?}");
    // NEW-1 took an image of SKU-00002 (the catalogue is the truth for each image it lists).
    assert_eq!(s.products_added, 1, "{s:?}");
    assert_eq!(
        engine.info().unwrap().attributes["weight"],
        AttrType::Number
    );
    let stored = by_product(&engine);
    let old = stored["SKU-00001"][0].product.as_ref().unwrap();
    assert_eq!(
        old.attributes["price"],
        AttrValue::Number(products[0].price)
    );
    // A catalogue of an unknown kind, or missing, is an error.
    let e = engine
        .import_file(
            &r,
            options(),
            &tmp.path().join("x.xml"),
            None,
            false,
            &Silent,
        )
        .unwrap_err();
    assert!(e.to_string().contains(".jsonl"), "{e}");
}

fn local_models() -> LocalModels {
    LocalModels {
        retriever: retriever(),
        captioner: Some(
            Captioner::load(
                &ModelSource::Dir(fixtures().join("tiny-a/caption")),
                &Device::Cpu,
            )
            .unwrap(),
        ),
    }
}

fn capfilt_options() -> IngestOptions {
    let mut capfilt = CapFiltParams::default();
    capfilt.sampling.num_samples = 0;
    capfilt.max_length = 8;
    capfilt.min_length = 2;
    // Nothing passes ITM: the product's texts are kept anyway.
    capfilt.threshold = 1.0;
    IngestOptions {
        capfilt: Some(capfilt),
        ..options()
    }
}

#[test]
fn capfilt_scores_product_texts_and_keeps_them_and_a_new_title_is_scored_without_embedding() {
    let tmp = tempfile::tempdir().unwrap();
    let local = local_models();
    let models = Counting::new(&local);
    let engine = Engine::open(&tmp.path().join("index"), &local.collection_info()).unwrap();
    let shop = tmp.path().join("shop");
    let mut products = catalogue::products(2);
    let fx = catalogue::write_catalogue(&shop, &products, Format::JsonLines, false);
    let s = engine
        .import_file(&models, capfilt_options(), &fx.file, None, false, &Silent)
        .unwrap();
    assert_eq!(s.images_embedded, 3, "{s:?}");
    assert_eq!(models.take().0, 3);
    for records in by_product(&engine).values() {
        for r in records {
            let title = r
                .captions
                .iter()
                .find(|c| c.source == CaptionSource::Title)
                .unwrap();
            assert!(title.kept && title.p_match.is_some(), "{:?}", r.captions);
            let beam = r
                .captions
                .iter()
                .find(|c| c.source == CaptionSource::Beam)
                .unwrap();
            assert!(
                !beam.kept,
                "ITM keeps nothing at threshold 1: {:?}",
                r.captions
            );
        }
    }
    assert_holds(&engine, &shop, &products);

    // A new title: scored by ITM on the stored features; no image embedded or captioned.
    products[1].title = "globex navy running shoe".into();
    let fx = catalogue::write_file(&shop, &products, Format::JsonLines, false);
    let s = engine
        .import_file(&models, capfilt_options(), &fx.file, None, false, &Silent)
        .unwrap();
    assert_eq!((s.images_updated, s.images_embedded), (2, 0), "{s:?}");
    assert_eq!(
        models.take(),
        (0, 0, 2),
        "one ITM pair per image of the product"
    );
    let stored = by_product(&engine);
    for r in &stored["SKU-00002"] {
        let title = r
            .captions
            .iter()
            .find(|c| c.source == CaptionSource::Title)
            .unwrap();
        assert_eq!(title.text, "globex navy running shoe");
        assert!(title.kept && title.p_match.is_some_and(|p| (0.0..=1.0).contains(&p)));
        let desc = r
            .captions
            .iter()
            .find(|c| c.source == CaptionSource::Description)
            .unwrap();
        assert!(desc.p_match.is_some(), "the description keeps its score");
    }
}

#[test]
fn the_import_command_prints_its_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let shop = tmp.path().join("shop");
    let index = tmp.path().join("index");
    let fx = catalogue::write_catalogue(&shop, &catalogue::products(4), Format::Csv, true);
    let model = fixtures().join("tiny-a/retrieval");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "import",
            fx.file.to_str().unwrap(),
            "--index",
            index.to_str().unwrap(),
            "--no-captions",
            "--model-dir",
            model.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        blipsearch(&refs)
    };
    let (ok, out, err) = run(&["--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["products_added"], 4, "{v}");
    assert_eq!(v["images_embedded"], fx.images(), "{v}");
    assert_eq!(v["attributes"]["price"], "number");
    let lines: Vec<u64> = v["malformed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["line"].as_u64().unwrap())
        .collect();
    assert_eq!(
        lines,
        fx.malformed_lines
            .iter()
            .map(|&l| l as u64)
            .collect::<Vec<_>>()
    );
    // The text form names the malformed lines.
    let (ok, out, err) = run(&[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("products: added 0, updated 0, unchanged 4"),
        "{out}"
    );
    assert!(
        out.contains(&format!("line {}:", fx.malformed_lines[0])),
        "{out}"
    );
    let (ok, _, err) = blipsearch(&[
        "import",
        tmp.path().join("none.jsonl").to_str().unwrap(),
        "--index",
        index.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("no catalogue file"), "{err}");
}

/// A PNG of one colour.
fn png(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

mod api {
    use super::*;

    use actix_web::http::StatusCode;
    use actix_web::test::{self, TestRequest};
    use blipsearch::engine::models::{DecodeBudget, DecodeLimits};
    use blipsearch::engine::uploads::uploads_dir;
    use blipsearch::server::state::ApiSettings;
    use blipsearch::server::{app, Running, ServerConfig};
    use serde_json::Value;

    const BOUNDARY: &str = "----blipsearchproductboundary";

    /// A multipart body of (field, file name, content type, bytes).
    fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> TestRequest {
        let mut body = Vec::new();
        for (name, filename, data) in parts {
            body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
            let disposition = match filename {
                Some(f) => format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                ),
                None => format!(
                    "Content-Disposition: form-data; name=\"{name}\"\r\n\
                     Content-Type: application/json\r\n\r\n"
                ),
            };
            body.extend_from_slice(disposition.as_bytes());
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        TestRequest::post()
            .uri("/api/products")
            .insert_header((
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            ))
            .set_payload(body)
    }

    fn start(index: &Path, key: Option<&str>) -> Running {
        let models = local_models();
        let engine = Engine::open(index, &models.collection_info()).unwrap();
        let limits = DecodeLimits::default();
        let budget = DecodeBudget::new(1 << 30);
        let config = ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            api: ApiSettings {
                api_key: key.map(str::to_string),
                protect_reads: false,
                max_upload_bytes: 1 << 20,
                limits,
                budget: budget.clone(),
                decode_wait: Duration::from_secs(5),
                body_timeout: Duration::from_secs(60),
                capfilt: None,
                folders: Vec::new(),
                retrieval_model: "tiny-a".into(),
                caption_model: None,
                device: "cpu".into(),
            },
            queue_capacity: 16,
            request_timeout: Duration::from_secs(120),
            rescan_interval: Duration::from_secs(3600),
            ingest: IngestOptions {
                capfilt: None,
                limits,
                budget,
                ..Default::default()
            },
            cors_origins: Vec::new(),
            http_workers: 1,
        };
        Running::start(&config, models, engine).unwrap()
    }

    fn json(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap_or_else(|e| {
            panic!("not JSON ({e}): {}", String::from_utf8_lossy(b));
        })
    }

    macro_rules! send {
        ($svc:expr, $req:expr $(,)?) => {{
            let res = test::call_service(&$svc, $req.to_request()).await;
            let status = res.status();
            (status, json(&test::read_body(res).await))
        }};
    }

    fn uploads(index: &Path) -> usize {
        std::fs::read_dir(uploads_dir(index)).unwrap().count()
    }

    #[actix_web::test]
    async fn a_product_is_sent_replaced_and_deleted_with_its_uploaded_files() {
        let tmp = tempfile::tempdir().unwrap();
        let index = tmp.path().join("index");
        let running = start(&index, Some("k3y"));
        let svc =
            test::init_service(app(running.state.clone(), running.metrics.clone(), &[])).await;
        let red = png(30, 20, [200, 20, 20]);
        let blue = png(30, 20, [20, 20, 200]);
        let green = png(30, 20, [20, 200, 20]);
        let product = serde_json::json!({
            "product": "SKU-1",
            "title": "Red running shoe",
            "description": "Light and fast",
            "attributes": {"brand": "acme", "price": 59.9, "in_stock": true, "released": "2024-03-01"}
        })
        .to_string();
        let send = |parts: &[(&str, Option<&str>, &[u8])]| {
            multipart(parts).insert_header(("x-api-key", "k3y"))
        };
        // Without the key: 401, nothing stored.
        let (st, _) = send!(
            svc,
            multipart(&[
                ("product", None, product.as_bytes()),
                ("image", Some("r.png"), &red)
            ])
        );
        assert_eq!(st, StatusCode::UNAUTHORIZED);

        let (st, v) = send!(
            svc,
            send(&[
                ("product", None, product.as_bytes()),
                ("image", Some("red.png"), &red),
                ("image", Some("blue.png"), &blue),
            ])
        );
        assert_eq!(st, StatusCode::CREATED, "{v}");
        assert_eq!(v["created"], true);
        assert_eq!(v["embedded"], 2);
        assert_eq!(v["product"]["id"], "SKU-1");
        assert_eq!(v["product"]["attributes"]["price"], 59.9);
        let images = v["images"].as_array().unwrap();
        assert_eq!(images.len(), 2);
        assert!(images[0]["file_name"]
            .as_str()
            .unwrap()
            .ends_with("-red.png"));
        assert_eq!(uploads(&index), 2);
        let engine = &running.state.engine;
        assert_eq!(
            engine.info().unwrap().attributes["released"],
            AttrType::Date
        );
        let first = images[0]["id"].as_u64().unwrap();

        // Again with red and green and a new title: blue leaves with its file.
        let renamed = product.replace("Red running shoe", "Crimson running shoe");
        let (st, v) = send!(
            svc,
            send(&[
                ("product", None, renamed.as_bytes()),
                ("image", Some("red.png"), &red),
                ("image", Some("green.png"), &green),
            ])
        );
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(
            (&v["created"], &v["embedded"], &v["updated"], &v["removed"]),
            (&Value::Bool(false), &1.into(), &1.into(), &1.into()),
            "{v}"
        );
        assert_eq!(v["images"][0]["id"], first, "red kept its id");
        assert_eq!(v["product"]["title"], "Crimson running shoe");
        assert_eq!(
            uploads(&index),
            2,
            "blue's upload is gone, green's is there"
        );
        assert_eq!(engine.len().unwrap(), 2);

        // Bad requests change nothing.
        for (parts, says) in [
            (vec![("image", Some("r.png"), red.as_slice())], "product"),
            (vec![("product", None, product.as_bytes())], "at least one"),
            (
                vec![
                    ("product", None, b"{not json".as_slice()),
                    ("image", Some("r.png"), &red),
                ],
                "not JSON",
            ),
            (
                vec![
                    (
                        "product",
                        None,
                        br#"{"product":"SKU-2","attributes":{"price":"cheap"}}"#.as_slice(),
                    ),
                    ("image", Some("r.png"), &blue),
                ],
                "is a number",
            ),
            (
                vec![
                    (
                        "product",
                        None,
                        br#"{"product":"SKU-2","images":["a.png"]}"#.as_slice(),
                    ),
                    ("image", Some("r.png"), &blue),
                ],
                "unknown field",
            ),
            (
                vec![
                    ("product", None, product.as_bytes()),
                    ("text", None, b"hello".as_slice()),
                ],
                "unexpected form field",
            ),
        ] {
            let (st, v) = send!(svc, send(&parts));
            assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.contains(says), "{says}: {message}");
        }
        let (st, v) = send!(
            svc,
            send(&[
                ("product", None, product.as_bytes()),
                ("image", Some("x.png"), b"not an image")
            ])
        );
        assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{v}");
        assert_eq!(engine.len().unwrap(), 2);
        assert_eq!(uploads(&index), 2);

        // Delete: every image, with its uploaded file; then 404.
        let delete = |p: &str| {
            TestRequest::delete()
                .uri(&format!("/api/products/{p}"))
                .insert_header(("x-api-key", "k3y"))
        };
        let (st, v) = send!(svc, delete("SKU-1"));
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!((&v["deleted"], &v["images"]), (&"SKU-1".into(), &2.into()));
        assert_eq!((engine.len().unwrap(), uploads(&index)), (0, 0));
        let (st, v) = send!(svc, delete("SKU-1"));
        assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
        let (st, v) = send!(svc, delete(&"x".repeat(80)));
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        running.stop();
    }

    #[actix_web::test]
    async fn deleting_a_product_never_deletes_the_merchants_files() {
        let tmp = tempfile::tempdir().unwrap();
        let index = tmp.path().join("index");
        let shop = tmp.path().join("shop");
        let fx =
            catalogue::write_catalogue(&shop, &catalogue::products(3), Format::JsonLines, false);
        {
            let r = retriever();
            let engine = Engine::open(&index, &collection_info(&r)).unwrap();
            engine
                .import_file(&r, options(), &fx.file, None, false, &Silent)
                .unwrap();
        }
        let running = start(&index, None);
        let svc =
            test::init_service(app(running.state.clone(), running.metrics.clone(), &[])).await;
        let (st, v) = send!(svc, TestRequest::delete().uri("/api/products/SKU-00003"));
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["images"], 3);
        for img in &fx.products[2].images {
            assert!(shop.join(img).exists(), "{img}");
        }
        assert_eq!(running.state.engine.len().unwrap(), 3);
        running.stop();
    }
}
