//! The HTTP API on the real app (`server::app`) with the tiny fixture models and a temporary
//! collection: every endpoint, the error cases, the API key.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use actix_web::web::Bytes;
use blipsearch::engine::uploads::uploads_dir;
use blipsearch::engine::{CollectionInfo, Engine};
use blipsearch::engine::{IngestOptions, LocalModels};
use blipsearch::model::capfilt::CapFiltParams;
use blipsearch::model::caption::Captioner;
use blipsearch::model::preprocess::{DecodeBudget, DecodeLimits};
use blipsearch::model::{ModelSource, Retriever};
use blipsearch::server::routes::ROUTES;
use blipsearch::server::state::ApiSettings;
use blipsearch::server::{app, Running, ServerConfig};
use candle_core::Device;
use serde_json::Value;

/// A running app's parts, and the temporary folder that holds its collection and photos.
struct Setup {
    running: Running,
    _tmp: tempfile::TempDir,
    /// The collection directory.
    index: PathBuf,
    /// The watched folder.
    photos: PathBuf,
}

struct Options {
    api_key: Option<&'static str>,
    protect_reads: bool,
    max_upload_bytes: usize,
    max_pixels: u64,
    /// The decode memory budget.
    decode_memory_bytes: u64,
    /// How long a request waits for room in the budget.
    decode_wait: Duration,
    /// How long a request body may take.
    body_timeout: Duration,
    /// A collection directory to open instead of a fresh one.
    index: Option<PathBuf>,
    /// Checkpoints (retrieval, caption) other than the random tiny-a ones.
    models: Option<(PathBuf, PathBuf)>,
    /// A folder to serve instead of a copy of the fixture photos.
    photos: Option<PathBuf>,
    /// The record store (`milvus://...`) instead of the embedded one.
    store: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            api_key: None,
            protect_reads: false,
            max_upload_bytes: 5 << 20,
            max_pixels: 100_000_000,
            decode_memory_bytes: 2 << 30,
            decode_wait: Duration::from_secs(5),
            body_timeout: Duration::from_secs(60),
            index: None,
            models: None,
            photos: None,
            store: None,
        }
    }
}

fn start(o: Options) -> Setup {
    let fx = common::fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let photos = match o.photos {
        Some(p) => p,
        None => {
            let photos = tmp.path().join("photos");
            std::fs::create_dir_all(&photos).unwrap();
            for f in ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"] {
                std::fs::copy(fx.join("images").join(f), photos.join(f)).unwrap();
            }
            // A sidecar text makes one image findable by words.
            std::fs::write(photos.join("rocket.jpg.txt"), "a rocket launch at dusk").unwrap();
            photos
        }
    };
    let (retrieval_dir, caption_dir) = o
        .models
        .unwrap_or_else(|| (fx.join("tiny-a/retrieval"), fx.join("tiny-a/caption")));
    let retriever = Retriever::load(&ModelSource::Dir(retrieval_dir), &Device::Cpu).unwrap();
    let captioner = Captioner::load(&ModelSource::Dir(caption_dir), &Device::Cpu).unwrap();
    let cfg = retriever.config();
    let info = CollectionInfo::new(
        retriever.name(),
        Some(captioner.name().to_string()),
        retriever.embedding_dim(),
        cfg.vision.num_tokens(),
        cfg.vision.hidden_size,
    );
    let index = o.index.unwrap_or_else(|| tmp.path().join("index"));
    let location = blipsearch::engine::Location {
        dir: index.clone(),
        store: o
            .store
            .as_deref()
            .map_or(Default::default(), |s| s.parse().unwrap()),
    };
    let engine = Engine::open(location, &info).unwrap();
    let mut capfilt = CapFiltParams::default();
    capfilt.sampling.num_samples = 1;
    capfilt.max_length = 8;
    capfilt.min_length = 2;
    let limits = DecodeLimits {
        max_pixels: o.max_pixels,
    };
    let budget = DecodeBudget::new(o.decode_memory_bytes);
    let config = ServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        api: ApiSettings {
            api_key: o.api_key.map(str::to_string),
            protect_reads: o.protect_reads,
            max_upload_bytes: o.max_upload_bytes,
            limits,
            budget: budget.clone(),
            decode_wait: o.decode_wait,
            body_timeout: o.body_timeout,
            capfilt: Some(capfilt.clone()),
            folders: vec![std::fs::canonicalize(&photos).unwrap()],
            retrieval_model: retriever.name().to_string(),
            caption_model: Some(captioner.name().to_string()),
            device: "cpu".into(),
        },
        queue_capacity: 16,
        request_timeout: Duration::from_secs(120),
        rescan_interval: Duration::from_secs(3600),
        ingest: IngestOptions {
            capfilt: Some(capfilt),
            limits,
            ..Default::default()
        },
        cors_origins: Vec::new(),
        http_workers: 1,
    };
    let models = LocalModels {
        retriever,
        captioner: Some(captioner),
    };
    let running = Running::start(&config, models, engine).unwrap();
    Setup {
        running,
        _tmp: tmp,
        index,
        photos,
    }
}

macro_rules! service {
    ($s:expr) => {
        test::init_service(app(
            $s.running.state.clone(),
            $s.running.metrics.clone(),
            &[],
        ))
        .await
    };
}

/// Sends a request; returns status and body.
macro_rules! send {
    ($svc:expr, $req:expr $(,)?) => {{
        let res = test::call_service(&$svc, $req.to_request()).await;
        let status = res.status();
        (status, test::read_body(res).await)
    }};
}

fn json(b: &Bytes) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {}", String::from_utf8_lossy(b));
    })
}

/// An error body: `{"error":{"code","message"}}`; returns the code.
fn error_code(b: &Bytes) -> String {
    let v = json(b);
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    v["error"]["code"].as_str().unwrap().to_string()
}

const BOUNDARY: &str = "----blipsearchtestboundary";

fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={BOUNDARY}"), body)
}

fn post_multipart(uri: &str, parts: &[(&str, Option<&str>, &[u8])]) -> TestRequest {
    let (ct, body) = multipart(parts);
    TestRequest::post()
        .uri(uri)
        .insert_header(("content-type", ct))
        .set_payload(body)
}

fn png(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Waits until the background folder sync has finished its first run; returns the status.
macro_rules! wait_for_ingest {
    ($svc:expr, $key:expr) => {{
        let started = Instant::now();
        loop {
            let (st, b) = send!(
                $svc,
                TestRequest::get()
                    .uri("/api/status")
                    .insert_header(("x-api-key", $key))
            );
            assert_eq!(st, StatusCode::OK);
            let v = json(&b);
            if v["ingest"]["last_run_unix"].is_i64() && v["ingest"]["state"] == "idle" {
                break v;
            }
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "ingest did not finish: {v}"
            );
            actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        }
    }};
}

/// The app on the default options with the fixture folder ingested: `(setup, service)`.
macro_rules! ingested {
    () => {
        ingested!(Options::default())
    };
    ($o:expr) => {{
        let s = start($o);
        let svc = service!(s);
        wait_for_ingest!(svc, "");
        (s, svc)
    }};
}

/// The id of rocket.jpg, found by the words of its sidecar text.
macro_rules! rocket_id {
    ($svc:expr) => {{
        let (_, b) = send!(
            $svc,
            TestRequest::get().uri("/api/search?q=launch%20dusk&mode=text&rerank_k=0"),
        );
        let v = json(&b);
        assert_eq!(v["hits"][0]["file_name"], "rocket.jpg", "{v}");
        v["hits"][0]["id"].as_u64().unwrap()
    }};
}

/// The number of images the status reports.
macro_rules! image_count {
    ($svc:expr) => {{
        let (_, b) = send!($svc, TestRequest::get().uri("/api/status"));
        json(&b)["images"].as_u64().unwrap()
    }};
}

fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[actix_web::test]
async fn health_readiness_and_the_status_of_the_first_ingest() {
    let s = start(Options::default());
    let svc = service!(s);

    // Health before anything else: the process answers and the worker runs.
    let (st, b) = send!(svc, TestRequest::get().uri("/healthz"));
    assert_eq!((st, &b[..]), (StatusCode::OK, &b"ok"[..]));
    let (st, _) = send!(svc, TestRequest::get().uri("/readyz"));
    assert_eq!(st, StatusCode::OK);

    // The folder is ingested in the background; status shows it.
    let status = wait_for_ingest!(svc, "");
    assert_eq!(status["images"], 4, "{status}");
    assert_eq!(status["ingest"]["done"], 4, "{status}");
    assert_eq!(status["ingest"]["failed"], 0, "{status}");
    assert_eq!(status["device"], "cpu");
    assert_eq!(
        status["attributes"],
        serde_json::json!({}),
        "no products, no attributes"
    );
    assert!(status["models"]["caption"].is_string());
    s.running.stop();
}

#[actix_web::test]
async fn text_search_reranks_pages_filters_and_refuses_bad_parameters() {
    let (s, svc) = ingested!();

    // Text search, reranked: every hit has ITM scores within the rerank depth, and carries
    // what the UI shows.
    let (st, b) = send!(
        svc,
        TestRequest::get().uri("/api/search?q=a%20rocket&rerank_k=4")
    );
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    let hits = v["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 4, "{v}");
    for h in hits {
        assert!(h["itm_prob"].is_f64(), "{h}");
        let (logit, itc) = (h["itm_logit"].as_f64().unwrap(), h["itc"].as_f64().unwrap());
        assert!(
            (h["score"].as_f64().unwrap() - (logit + itc)).abs() < 1e-4,
            "{h}"
        );
        assert!(h["thumbnail_url"].as_str().unwrap().ends_with("/thumbnail"));
        assert!(h["width"].as_u64().unwrap() > 0);
    }
    let scores: Vec<f64> = hits.iter().map(|h| h["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert_eq!(
        (&v["examined"], &v["cutoff"]),
        (&serde_json::json!(4), &Value::Null),
        "{v}"
    );
    // With a cut-off ITM judges in rounds of rerank_k, as deep as the matches go, within the
    // budget; the answer says how far it went and why it stopped. p(match) >= 0 always holds.
    let (st, b) = send!(
        svc,
        TestRequest::get()
            .uri("/api/search?q=a%20rocket&rerank_k=1&min_itm_prob=0&rerank_budget=3")
    );
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert_eq!(v["hits"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["examined"], 3, "{v}");
    assert_eq!(
        v["cutoff"],
        serde_json::json!({"min_itm_prob": 0.0, "budget": 3, "round": 1, "rounds": 3, "stop": "budget"})
    );
    let (_, b) = send!(
        svc,
        TestRequest::get().uri("/api/search?q=a%20rocket&rerank_k=3&min_itm_prob=0")
    );
    let v = json(&b);
    assert_eq!(
        (&v["examined"], &v["total"]),
        (&serde_json::json!(4), &serde_json::json!(4)),
        "{v}"
    );
    assert_eq!(v["cutoff"]["stop"], "exhausted", "{v}");
    assert_eq!(v["cutoff"]["budget"], 256, "{v}");
    // Words of the sidecar text find the rocket through BM25, with rerank off.
    let (st, b) = send!(
        svc,
        TestRequest::get().uri("/api/search?q=launch%20dusk&mode=text&rerank_k=0"),
    );
    assert_eq!(st, StatusCode::OK);
    let v = json(&b);
    assert_eq!(v["hits"][0]["file_name"], "rocket.jpg", "{v}");
    assert!(v["hits"][0]["bm25"].as_f64().unwrap() > 0.0);
    assert!(v["hits"][0]["itm_prob"].is_null());
    // Paging and folder filter.
    let (_, b) = send!(
        svc,
        TestRequest::get().uri("/api/search?q=photo&limit=2&offset=1&rerank_k=0")
    );
    assert_eq!(json(&b)["hits"].as_array().unwrap().len(), 2);
    let (_, b) = send!(
        svc,
        TestRequest::get().uri("/api/search?q=photo&folder=/nowhere&rerank_k=0")
    );
    assert_eq!(json(&b)["hits"].as_array().unwrap().len(), 0);
    // Grouped by product, images without one are groups of their own.
    let (st, b) = send!(
        svc,
        TestRequest::get().uri("/api/search?q=photo&rerank_k=0&group_by=product")
    );
    assert_eq!(st, StatusCode::OK);
    let v = json(&b);
    assert_eq!(v["total"], 4, "{v}");
    for h in v["hits"].as_array().unwrap() {
        assert_eq!(h["group"]["size"], 1, "{h}");
        assert_eq!(h["group"]["product"], Value::Null, "{h}");
    }
    // Bad searches.
    for (uri, code) in [
        ("/api/search", StatusCode::BAD_REQUEST),
        ("/api/search?q=%20%20", StatusCode::BAD_REQUEST),
        ("/api/search?q=x&mode=fuzzy", StatusCode::BAD_REQUEST),
        ("/api/search?q=x&k=lots", StatusCode::BAD_REQUEST),
        ("/api/search?q=x&k=0", StatusCode::BAD_REQUEST),
        ("/api/search?q=x&min_itm_prob=2", StatusCode::BAD_REQUEST),
        // min_itm_prob keeps what ITM accepted: without rerank it would mean nothing.
        (
            "/api/search?q=x&rerank_k=0&min_itm_prob=0.5",
            StatusCode::BAD_REQUEST,
        ),
        ("/api/search?q=x&include_self=true", StatusCode::BAD_REQUEST),
        (
            "/api/search?q=x&date_from=yesterday",
            StatusCode::BAD_REQUEST,
        ),
        // What the OpenAPI document rules out is refused, not clamped or ignored.
        ("/api/search?q=x&k=1001", StatusCode::BAD_REQUEST),
        ("/api/search?q=x&rerank_k=257", StatusCode::BAD_REQUEST),
        ("/api/search?q=x&limit=1001", StatusCode::BAD_REQUEST),
        ("/api/search?q=x&offset=10001", StatusCode::BAD_REQUEST),
        (
            "/api/search?q=x&min_itm_prob=0.5&rerank_budget=0",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/search?q=x&min_itm_prob=0.5&rerank_budget=1001",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/search?q=x&min_itm_prob=0.5&rerank_budget=many",
            StatusCode::BAD_REQUEST,
        ),
        // A budget bounds the cut-off's rerank: without one it would mean nothing.
        ("/api/search?q=x&rerank_budget=10", StatusCode::BAD_REQUEST),
        ("/api/search?q=x&date_from=", StatusCode::BAD_REQUEST),
        ("/api/search?q=x&colour=red", StatusCode::BAD_REQUEST),
        // A folder collection has no product attributes to filter or count.
        ("/api/search?q=x&filter=brand:acme", StatusCode::BAD_REQUEST),
        ("/api/search?q=x&facets=brand", StatusCode::BAD_REQUEST),
        ("/api/search?q=x&group_by=folder", StatusCode::BAD_REQUEST),
        (
            "/api/search?q=x&min_itm_prob=1.0000000000000002",
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (st, b) = send!(svc, TestRequest::get().uri(uri));
        assert_eq!(st, code, "{uri}: {}", String::from_utf8_lossy(&b));
        assert_eq!(error_code(&b), "bad_request");
    }
    s.running.stop();
}

#[actix_web::test]
async fn query_parameters_beyond_the_documented_ones_are_refused_but_the_key() {
    let (s, svc) = ingested!();
    let rocket = rocket_id!(svc);
    // The key of a GET may come in the query, the one parameter beyond the documented ones.
    let (st, _) = send!(
        svc,
        TestRequest::get().uri("/api/search?q=x&rerank_k=0&api_key=k")
    );
    assert_eq!(st, StatusCode::OK);
    // Every other API route takes no query parameter but the key: a misspelt option is refused,
    // as an unknown JSON field is. The UI's own links (`/?q=...`) are not the API's.
    for uri in [
        "/api/status?verbose=1".to_string(),
        format!("/api/images/{rocket}?size=big"),
        format!("/api/images/{rocket}/thumbnail?w=64"),
    ] {
        let (st, b) = send!(svc, TestRequest::get().uri(&uri));
        assert_eq!(
            st,
            StatusCode::BAD_REQUEST,
            "{uri}: {}",
            String::from_utf8_lossy(&b)
        );
        assert!(String::from_utf8_lossy(&b).contains("unknown query parameter"));
    }
    for uri in ["/api/status?api_key=k", "/?q=cat&like=3"] {
        let (st, _) = send!(svc, TestRequest::get().uri(uri));
        assert_eq!(st, StatusCode::OK, "{uri}");
    }
    s.running.stop();
}

#[actix_web::test]
async fn image_metadata_thumbnail_and_file() {
    let (s, svc) = ingested!();
    let rocket = rocket_id!(svc);
    let (st, b) = send!(
        svc,
        TestRequest::get().uri(&format!("/api/images/{rocket}"))
    );
    assert_eq!(st, StatusCode::OK);
    let img = json(&b);
    assert_eq!(img["given_texts"][0], "a rocket launch at dusk", "{img}");
    assert!(img["captions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["source"] == "beam"));
    assert!(img["captions"][0]["p_match"].is_f64(), "{img}");
    let res = test::call_service(
        &svc,
        TestRequest::get()
            .uri(&format!("/api/images/{rocket}/thumbnail"))
            .to_request(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers().get("content-type").unwrap(), "image/jpeg");
    let thumb = test::read_body(res).await;
    assert!(image::load_from_memory(&thumb).is_ok());
    let res = test::call_service(
        &svc,
        TestRequest::get()
            .uri(&format!("/api/images/{rocket}/file"))
            .to_request(),
    )
    .await;
    assert_eq!(res.headers().get("content-type").unwrap(), "image/jpeg");
    assert_eq!(
        test::read_body(res).await.to_vec(),
        file_bytes(&s.photos.join("rocket.jpg"))
    );
    for uri in [
        "/api/images/999999",
        "/api/images/999999/thumbnail",
        "/api/images/999999/file",
    ] {
        let (st, b) = send!(svc, TestRequest::get().uri(uri));
        assert_eq!(st, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(error_code(&b), "not_found");
    }
    for uri in [
        "/api/images/abc",
        "/api/images/-1/file",
        "/api/images/..%2F..%2Fetc%2Fpasswd/file",
    ] {
        let (st, b) = send!(svc, TestRequest::get().uri(uri));
        assert_eq!(st, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(error_code(&b), "bad_request");
    }
    s.running.stop();
}

#[actix_web::test]
async fn search_by_uploaded_or_indexed_image_and_its_errors() {
    let (s, svc) = ingested!();
    let rocket = rocket_id!(svc);
    // Search by an uploaded image: the same picture comes first, with cosine 1.
    let coffee = file_bytes(&s.photos.join("coffee.png"));
    let (st, b) = send!(
        svc,
        post_multipart("/api/search/image", &[("image", Some("q.png"), &coffee)]),
    );
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert_eq!(v["hits"][0]["file_name"], "coffee.png", "{v}");
    assert!((v["hits"][0]["itc"].as_f64().unwrap() - 1.0).abs() < 1e-4);
    // ... and by an indexed id ("more like this").
    let (st, b) = send!(
        svc,
        TestRequest::post()
            .uri("/api/search/image?limit=2")
            .set_json(serde_json::json!({ "similar_to": rocket })),
    );
    assert_eq!(st, StatusCode::OK);
    let v = json(&b);
    assert_eq!(v["similar_to"], rocket);
    assert_eq!(v["hits"].as_array().unwrap().len(), 2);
    assert!(
        v["hits"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["id"] != rocket),
        "{v}"
    );
    // `id`, the field's older name, still works.
    let (st, b) = send!(
        svc,
        TestRequest::post()
            .uri("/api/search/image?limit=2&include_self=true")
            .set_json(serde_json::json!({ "id": rocket })),
    );
    assert_eq!(st, StatusCode::OK);
    assert_eq!(json(&b)["hits"][0]["id"], rocket);
    for (req, code, what) in [
        (
            TestRequest::post()
                .uri("/api/search/image")
                .set_json(serde_json::json!({ "similar_to": 424242 })),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            TestRequest::post()
                .uri("/api/search/image")
                .set_json(serde_json::json!({ "similar_to": rocket, "id": rocket })),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            TestRequest::post()
                .uri("/api/search/image")
                .set_json(serde_json::json!({ "path": "/etc/passwd" })),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            TestRequest::post()
                .uri("/api/search/image")
                .insert_header(("content-type", "text/plain"))
                .set_payload("hello"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            post_multipart("/api/search/image", &[("text", None, b"no image")]),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            post_multipart("/api/search/image", &[("colour", None, b"")]),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            TestRequest::post()
                .uri("/api/search/image?q=cat")
                .set_json(serde_json::json!({ "similar_to": 0 })),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        // ITM needs a text: a search by image refuses to rerank.
        (
            TestRequest::post()
                .uri("/api/search/image?rerank_k=4")
                .set_json(serde_json::json!({ "similar_to": 0 })),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            post_multipart(
                "/api/search/image?min_itm_prob=0.5",
                &[("image", Some("q.png"), &coffee)],
            ),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            post_multipart(
                "/api/search/image?include_self=true",
                &[("image", Some("q.png"), &coffee)],
            ),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            post_multipart(
                "/api/search/image",
                &[("image", Some("x.png"), b"not an image")],
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
    ] {
        let (st, b) = send!(svc, req);
        assert_eq!(st, code, "{}", String::from_utf8_lossy(&b));
        assert_eq!(error_code(&b), what);
    }
    s.running.stop();
}

/// Posts `red` with a text to /api/images; returns the answer's status and JSON.
macro_rules! upload_red {
    ($svc:expr, $red:expr) => {{
        let (st, b) = send!(
            $svc,
            post_multipart(
                "/api/images",
                &[
                    ("image", Some("red.png"), $red),
                    ("text", None, b"a crimson square tile")
                ],
            ),
        );
        (st, json(&b))
    }};
}

#[actix_web::test]
async fn uploads_are_captioned_indexed_and_deduplicated_and_bad_ones_add_nothing() {
    let (s, svc) = ingested!();
    // Upload with a text: CapFilt captions, indexed at once, findable by its text.
    let red = png(40, 30, [220, 20, 20]);
    let (st, up) = upload_red!(svc, &red);
    assert_eq!(st, StatusCode::CREATED, "{up}");
    let new_id = up["id"].as_u64().unwrap();
    assert_eq!(up["duplicate"], false);
    let stored = up["image"]["file_name"].as_str().unwrap();
    assert!(
        stored.ends_with("-red.png"),
        "uploads keep their name: {stored}"
    );
    let caps = up["captions"].as_array().unwrap();
    assert_eq!(caps[0]["source"], "given", "{up}");
    assert_eq!(caps[0]["text"], "a crimson square tile");
    assert!(caps.iter().any(|c| c["source"] == "beam"));
    assert!(caps.iter().all(|c| c["p_match"].is_f64()));
    assert_eq!(image_count!(svc), 5);
    let (_, b) = send!(
        svc,
        TestRequest::get().uri("/api/search?q=crimson%20square&mode=text&rerank_k=0")
    );
    assert_eq!(json(&b)["hits"][0]["id"], new_id, "findable by its text");
    // The same bytes again: the existing image.
    let (st, b) = send!(
        svc,
        post_multipart("/api/images", &[("image", Some("again.png"), &red)])
    );
    assert_eq!(st, StatusCode::OK);
    assert_eq!(json(&b)["duplicate"], true);
    assert_eq!(json(&b)["id"], new_id);
    // Bad uploads, and none of them adds anything.
    let mut truncated = file_bytes(&s.photos.join("rocket.jpg"));
    truncated.truncate(truncated.len() / 2);
    for (req, code, what) in [
        (
            post_multipart("/api/images", &[("image", Some("t.txt"), b"plain text")]),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            post_multipart("/api/images", &[("image", Some("cut.jpg"), &truncated)]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_image",
        ),
        (
            post_multipart("/api/images", &[("image", Some("e.png"), b"")]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_image",
        ),
        (
            post_multipart("/api/images", &[("text", None, b"only words")]),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            TestRequest::post()
                .uri("/api/images")
                .set_json(serde_json::json!({"image": "x"})),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            TestRequest::post()
                .uri("/api/images")
                .insert_header(("content-type", "multipart/form-data; boundary=zzz"))
                .set_payload("--zzz\r\nbroken"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ] {
        let (st, b) = send!(svc, req);
        assert_eq!(st, code, "{}", String::from_utf8_lossy(&b));
        assert_eq!(error_code(&b), what);
    }
    assert_eq!(image_count!(svc), 5);
    let uploads: Vec<_> = std::fs::read_dir(uploads_dir(&s.index)).unwrap().collect();
    assert_eq!(uploads.len(), 1, "failed uploads must not leave files");
    s.running.stop();
}

#[actix_web::test]
async fn caption_answers_without_indexing() {
    let (s, svc) = ingested!();
    let coffee = file_bytes(&s.photos.join("coffee.png"));
    let (st, b) = send!(
        svc,
        post_multipart("/api/caption", &[("image", Some("c.png"), &coffee)])
    );
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert_eq!(v["captions"][0]["source"], "beam", "{v}");
    assert_eq!(image_count!(svc), 4);
    s.running.stop();
}

#[actix_web::test]
async fn delete_removes_an_upload_with_its_file_but_never_a_watched_file() {
    let (s, svc) = ingested!();
    let rocket = rocket_id!(svc);
    let (st, up) = upload_red!(svc, &png(40, 30, [220, 20, 20]));
    assert_eq!(st, StatusCode::CREATED, "{up}");
    let new_id = up["id"].as_u64().unwrap();
    // Delete: gone from metadata and search; the uploaded file is removed with it.
    let (st, b) = send!(
        svc,
        TestRequest::delete().uri(&format!("/api/images/{new_id}"))
    );
    assert_eq!(st, StatusCode::OK);
    assert_eq!(json(&b)["deleted"], new_id);
    let (st, _) = send!(
        svc,
        TestRequest::get().uri(&format!("/api/images/{new_id}"))
    );
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = send!(
        svc,
        TestRequest::delete().uri(&format!("/api/images/{new_id}"))
    );
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, b) = send!(
        svc,
        TestRequest::get().uri("/api/search?q=crimson%20square&rerank_k=0&limit=50")
    );
    assert!(json(&b)["hits"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["id"] != new_id));
    assert_eq!(std::fs::read_dir(uploads_dir(&s.index)).unwrap().count(), 0);
    // A file in a watched folder is never deleted by the API.
    let (st, _) = send!(
        svc,
        TestRequest::delete().uri(&format!("/api/images/{rocket}"))
    );
    assert_eq!(st, StatusCode::OK);
    assert!(s.photos.join("rocket.jpg").exists());
    s.running.stop();
}

#[actix_web::test]
async fn unknown_routes_are_404_and_the_ui_is_served_with_its_assets() {
    let (s, svc) = ingested!();
    let (st, b) = send!(svc, TestRequest::get().uri("/api/nothing"));
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&b), "not_found");

    // The UI is served, with its assets.
    let res = test::call_service(&svc, TestRequest::get().uri("/").to_request()).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(res.headers().contains_key("content-security-policy"));
    let html = String::from_utf8(test::read_body(res).await.to_vec()).unwrap();
    assert!(html.contains("/assets/app.js"), "the page loads its script");
    for a in ["app.js", "style.css", "favicon.svg"] {
        let (st, _) = send!(svc, TestRequest::get().uri(&format!("/assets/{a}")));
        assert_eq!(st, StatusCode::OK, "{a}");
    }
    let (st, _) = send!(svc, TestRequest::get().uri("/assets/..%2FCargo.toml"));
    assert_eq!(st, StatusCode::NOT_FOUND);
    s.running.stop();
}

/// Per-route counters and durations, queue and index figures, after a reranked search, an
/// upload and a delete.
#[actix_web::test]
async fn metrics_count_routes_inference_and_images() {
    let (s, svc) = ingested!();
    let (st, _) = send!(
        svc,
        TestRequest::get().uri("/api/search?q=a%20rocket&rerank_k=4")
    );
    assert_eq!(st, StatusCode::OK);
    let (st, up) = upload_red!(svc, &png(40, 30, [220, 20, 20]));
    assert_eq!(st, StatusCode::CREATED, "{up}");
    let rocket = rocket_id!(svc);
    let (st, _) = send!(
        svc,
        TestRequest::delete().uri(&format!("/api/images/{rocket}"))
    );
    assert_eq!(st, StatusCode::OK);
    let (st, b) = send!(svc, TestRequest::get().uri("/metrics"));
    assert_eq!(st, StatusCode::OK);
    let m = String::from_utf8(b.to_vec()).unwrap();
    for needle in [
        "blipsearch_http_requests_total{method=\"GET\",route=\"/api/search\",status=\"200\"}",
        "blipsearch_http_request_duration_seconds_bucket{method=\"POST\",route=\"/api/images\"",
        "blipsearch_http_requests_total{method=\"DELETE\",route=\"/api/images/{id}\",status=\"200\"}",
        "blipsearch_inference_seconds_count{kind=\"itm\"}",
        "blipsearch_inference_batch_size_bucket{kind=\"text\"",
        "blipsearch_inference_queue_seconds_count{kind=\"capfilt\"}",
        "blipsearch_index_images 4",
        "blipsearch_inference_rejected_total 0",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
    }
    s.running.stop();
}

#[actix_web::test]
async fn the_openapi_document_describes_every_route_and_only_those() {
    let s = start(Options::default());
    let svc = service!(s);
    let (st, b) = send!(svc, TestRequest::get().uri("/api/openapi.json"));
    assert_eq!(st, StatusCode::OK);
    let doc = json(&b);
    let mut documented = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.push((method.clone(), path.clone()));
        }
    }
    // The UI's own pages are not part of the API.
    let mut routes: Vec<(String, String)> = ROUTES
        .iter()
        .filter(|(_, p, _)| *p != "/" && !p.starts_with("/assets/"))
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    documented.sort();
    routes.sort();
    assert_eq!(documented, routes);

    s.running.stop();
}

#[actix_web::test]
async fn api_key_guards_writes_and_optionally_reads() {
    let key = "correct-horse-battery";
    // Writes need the key; reads do not.
    let (s, svc) = ingested!(Options {
        api_key: Some(key),
        ..Default::default()
    });
    let red = png(20, 20, [200, 0, 0]);
    let (st, b) = send!(
        svc,
        post_multipart("/api/images", &[("image", Some("r.png"), &red)])
    );
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&b), "unauthorized");
    let (st, _) = send!(
        svc,
        post_multipart("/api/images", &[("image", Some("r.png"), &red)])
            .insert_header(("authorization", "Bearer wrong-key-entirely")),
    );
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    for (name, value) in [
        ("authorization", format!("Bearer {key}")),
        ("x-api-key", key.to_string()),
    ] {
        let (st, b) = send!(
            svc,
            post_multipart("/api/caption", &[("image", Some("r.png"), &red)])
                .insert_header((name, value)),
        );
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    }
    let (st, _) = send!(svc, TestRequest::delete().uri("/api/images/1"));
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) = send!(svc, TestRequest::get().uri("/api/search?q=x&rerank_k=0"));
    assert_eq!(st, StatusCode::OK);
    let (st, _) = send!(
        svc,
        post_multipart("/api/search/image", &[("image", Some("r.png"), &red)]),
    );
    assert_eq!(st, StatusCode::OK, "searching by image is a read");
    s.running.stop();

    // With --protect-reads, reads need it too (the UI shell and health checks do not).
    let s = start(Options {
        api_key: Some(key),
        protect_reads: true,
        ..Default::default()
    });
    let svc = service!(s);
    for uri in [
        "/api/search?q=x",
        "/api/status",
        "/api/images/1/thumbnail",
        "/metrics",
    ] {
        let (st, _) = send!(svc, TestRequest::get().uri(uri));
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{uri}");
    }
    for uri in [
        "/",
        "/assets/app.js",
        "/healthz",
        "/readyz",
        "/api/openapi.json",
    ] {
        let (st, _) = send!(svc, TestRequest::get().uri(uri));
        assert_eq!(st, StatusCode::OK, "{uri}");
    }
    let (st, _) = send!(
        svc,
        TestRequest::get()
            .uri("/api/status")
            .insert_header(("authorization", format!("Bearer {key}"))),
    );
    assert_eq!(st, StatusCode::OK);
    // <img> tags cannot send headers: GET takes ?api_key=.
    wait_for_ingest!(svc, key);
    let (st, _) = send!(
        svc,
        TestRequest::get().uri(&format!("/api/images/1/thumbnail?api_key={key}")),
    );
    assert_eq!(st, StatusCode::OK);
    s.running.stop();
}

#[actix_web::test]
async fn upload_limits_in_bytes_and_pixels() {
    let s = start(Options {
        max_upload_bytes: 4000,
        max_pixels: 10_000,
        ..Default::default()
    });
    let svc = service!(s);
    // Over the byte limit (a noisy PNG does not compress).
    let noisy = image::RgbImage::from_fn(80, 80, |x, y| {
        image::Rgb([(x * 37 + y * 11) as u8, (x * y) as u8, ((x ^ y) * 3) as u8])
    });
    let mut big = std::io::Cursor::new(Vec::new());
    noisy.write_to(&mut big, image::ImageFormat::Png).unwrap();
    let big = big.into_inner();
    assert!(big.len() > 4000);
    let (st, b) = send!(
        svc,
        post_multipart("/api/images", &[("image", Some("b.png"), &big)])
    );
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&b), "payload_too_large");
    // Small in bytes, over the pixel limit: refused before decoding.
    let wide = png(200, 100, [0, 0, 255]);
    assert!(wide.len() < 4000);
    for uri in ["/api/images", "/api/search/image", "/api/caption"] {
        let (st, b) = send!(svc, post_multipart(uri, &[("image", Some("w.png"), &wide)]));
        assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{uri}");
        assert!(
            String::from_utf8_lossy(&b).contains("megapixels"),
            "{}",
            String::from_utf8_lossy(&b)
        );
    }
    // Texts are limited in characters (what the document's maxLength counts) and in number,
    // blank ones included.
    let small = png(20, 20, [0, 200, 0]);
    let wide_text = "é".repeat(4096);
    let long_text = "a".repeat(4097);
    let (st, b) = send!(
        svc,
        post_multipart(
            "/api/caption",
            &[
                ("image", Some("s.png"), &small),
                ("text", None, wide_text.as_bytes())
            ]
        )
    );
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let blanks: Vec<(&str, Option<&str>, &[u8])> =
        std::iter::once(("image", Some("s.png"), &small[..]))
            .chain(std::iter::repeat_n(("text", None, &b" "[..]), 17))
            .collect();
    for parts in [
        vec![
            ("image", Some("s.png"), &small[..]),
            ("text", None, long_text.as_bytes()),
        ],
        blanks,
    ] {
        let (st, b) = send!(svc, post_multipart("/api/caption", &parts));
        assert_eq!(
            st,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(&b)
        );
    }
    s.running.stop();
}

/// With the models trained on the synthetic world (tests/fixtures/synth), searching the API for
/// a described scene ranks a matching scene first (hybrid ITC + BM25 ranking, no rerank).
#[actix_web::test]
async fn api_search_finds_described_synthetic_scenes() {
    described_synthetic_scenes_rank_first(0).await;
}

/// The same with the ITM rerank over the first 16.
#[actix_web::test]
async fn api_search_with_rerank_finds_described_synthetic_scenes() {
    described_synthetic_scenes_rank_first(16).await;
}

async fn described_synthetic_scenes_rank_first(rerank: u32) {
    use blipsearch::eval::synth::{generate, SynthParams};
    let fx = common::fixtures();
    let world = tempfile::tempdir().unwrap();
    // A fresh world from the same generator (another seed): new renderings (placement,
    // background) of scenes the models trained on, never these images.
    generate(
        world.path(),
        &SynthParams {
            train: 0,
            test: 80,
            seed: 7,
            ..Default::default()
        },
    )
    .unwrap();
    let scenes = common::synth_scenes(world.path());
    let s = start(Options {
        models: Some((fx.join("synth/retrieval"), fx.join("synth/caption"))),
        photos: Some(world.path().join("images/test")),
        ..Default::default()
    });
    let svc = service!(s);
    let status = wait_for_ingest!(svc, "");
    assert_eq!(status["images"], 80, "{status}");
    let mut checked = 0;
    for (colour, shape) in [
        ("red", "circle"),
        ("blue", "square"),
        ("green", "triangle"),
        ("yellow", "circle"),
        ("red", "triangle"),
        ("green", "square"),
    ] {
        if !scenes
            .values()
            .any(|sc| sc["colour"] == colour && sc["shape"] == shape)
        {
            continue;
        }
        checked += 1;
        let uri = format!("/api/search?q=a%20{colour}%20{shape}&rerank_k={rerank}&limit=3");
        let (st, b) = send!(svc, TestRequest::get().uri(&uri));
        assert_eq!(st, StatusCode::OK);
        let v = json(&b);
        let first = v["hits"][0]["file_name"].as_str().unwrap_or_default();
        let scene = &scenes[first];
        assert!(
            scene["colour"] == colour && scene["shape"] == shape,
            "a {colour} {shape} (rerank {rerank}): first hit {first} is {scene}"
        );
    }
    assert!(checked >= 4, "the world has too few of the queried scenes");
    s.running.stop();
}

/// Protection is decided on the route that runs: no spelling of a protected path reaches its
/// handler without the key (each of these used to slip past a check on the raw path).
#[actix_web::test]
async fn the_key_is_checked_on_the_route_that_runs() {
    let key = "correct-horse-battery";
    let s = start(Options {
        api_key: Some(key),
        protect_reads: true,
        ..Default::default()
    });
    let svc = service!(s);
    wait_for_ingest!(svc, key);
    let red = png(20, 20, [200, 0, 0]);
    let writes: Vec<(&str, String)> = vec![
        ("DELETE", "/%61pi/images/1".into()),
        ("DELETE", "/api/images/%31".into()),
        ("DELETE", "/api/%69mages/1".into()),
        ("DELETE", "//api/images/1".into()),
        ("DELETE", "/api/./images/1".into()),
        ("DELETE", "/api/images/1/".into()),
        ("DELETE", "/API/images/1".into()),
        ("DELETE", "/api/images//1".into()),
        ("POST", "/%61pi/images".into()),
        ("POST", "/api/image%73".into()),
        ("POST", "/%61pi/caption".into()),
        ("POST", "/api/caption/".into()),
        ("POST", "/%61pi/search/image".into()),
    ];
    for (method, uri) in &writes {
        let req = post_multipart(uri, &[("image", Some("r.png"), &red)])
            .method(actix_web::http::Method::from_bytes(method.as_bytes()).unwrap());
        let (st, b) = send!(svc, req);
        assert!(
            st == StatusCode::UNAUTHORIZED || st == StatusCode::NOT_FOUND,
            "{method} {uri}: {st} {}",
            String::from_utf8_lossy(&b)
        );
    }
    for uri in [
        "/%61pi/search?q=x",
        "/api/%73earch?q=x",
        "/%61pi/status",
        "/api/images/%31",
        "/api/images/1/%74humbnail",
        "/api/images/1/fil%65",
        "/m%65trics",
        "//metrics",
        "/metrics/",
    ] {
        for method in ["GET", "HEAD"] {
            let req = TestRequest::default()
                .method(actix_web::http::Method::from_bytes(method.as_bytes()).unwrap())
                .uri(uri);
            let (st, _) = send!(svc, req);
            assert!(
                st == StatusCode::UNAUTHORIZED || st == StatusCode::NOT_FOUND,
                "{method} {uri}: {st}"
            );
        }
    }
    // Every route in the table: without the key, 401 unless it is open; with it, not 401.
    for (method, pattern, access) in ROUTES {
        // An id that does not exist: the DELETE with the key must not remove anything.
        let uri = pattern
            .replace("{id}", "999999")
            .replace("{product}", "NO-SUCH-PRODUCT")
            .replace("{file}", "app.js");
        let m = actix_web::http::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let (st, _) = send!(svc, TestRequest::default().method(m.clone()).uri(&uri));
        let open = *access == blipsearch::server::auth::Access::Open;
        assert_eq!(
            st == StatusCode::UNAUTHORIZED,
            !open,
            "{method} {uri}: {st}"
        );
        let (st, _) = send!(
            svc,
            TestRequest::default()
                .method(m)
                .uri(&uri)
                .insert_header(("x-api-key", key))
        );
        assert_ne!(st, StatusCode::UNAUTHORIZED, "{method} {uri} with the key");
    }
    // Nothing was deleted on the way.
    let (st, _) = send!(
        svc,
        TestRequest::get()
            .uri("/api/images/1")
            .insert_header(("x-api-key", key))
    );
    assert_eq!(st, StatusCode::OK);
    s.running.stop();
}

/// Deep or long queries are refused with 400 before tantivy's recursive parser sees them (800
/// open parentheses used to overflow the stack and abort the process); the server goes on.
#[actix_web::test]
async fn queries_past_the_parser_bounds_are_400_and_the_server_lives() {
    let (s, svc) = ingested!();
    let enc = |q: &str| q.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
    for q in [
        "(".repeat(800),
        "(".repeat(1500),
        format!("+{}", "(".repeat(700)),
        format!("\"{}\"", "(".repeat(900)),
        format!("{}rocket{}", "(".repeat(20), ")".repeat(20)),
        vec!["rocket"; 400].join(" AND "),
        "a".repeat(2001),
    ] {
        let (st, b) = send!(
            svc,
            TestRequest::get().uri(&format!("/api/search?q={}&rerank_k=0", enc(&q)))
        );
        assert_eq!(
            st,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(&b)
        );
        assert_eq!(error_code(&b), "bad_request");
    }
    for q in [
        "(rocket AND (launch OR dusk))",
        "[a TO z]",
        "\"a rocket\"~2",
        "+rocket -cat",
    ] {
        let (st, _) = send!(
            svc,
            TestRequest::get().uri(&format!("/api/search?q={}&rerank_k=0", enc(q)))
        );
        assert_eq!(st, StatusCode::OK, "{q}");
    }
    s.running.stop();
}

/// Decoding is admitted by the bytes the header promises: an image larger than the whole
/// budget is 413 before any pixel is decoded (also through the keyless search by image), and
/// while the budget is taken requests get 429 with Retry-After, then succeed once it is free.
#[actix_web::test]
async fn decodes_are_admitted_under_the_memory_budget() {
    let (s, svc) = ingested!(Options {
        decode_memory_bytes: 64 << 20,
        decode_wait: Duration::from_millis(300),
        ..Default::default()
    });
    // 3000 x 3000 16-bit RGBA: 72 MB decoded, well under 1 MB on the wire.
    let huge = common::huge_png(3000, 3000, png::Compression::Fast);
    assert!(huge.len() < 1 << 20, "{}", huge.len());
    for uri in ["/api/images", "/api/search/image", "/api/caption"] {
        let (st, b) = send!(svc, post_multipart(uri, &[("image", Some("h.png"), &huge)]));
        assert_eq!(
            st,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{uri}: {}",
            String::from_utf8_lossy(&b)
        );
        assert!(String::from_utf8_lossy(&b).contains("decode memory budget"));
    }
    // Someone else holds the budget: a fitting image waits, then gets 429 with Retry-After.
    let budget = s.running.state.settings.budget.clone();
    let held = budget
        .admit(budget.capacity() - 100_000, Path::new("held"), None)
        .unwrap();
    let small = png(300, 300, [10, 200, 30]);
    for uri in ["/api/images", "/api/search/image"] {
        let res = test::call_service(
            &svc,
            post_multipart(uri, &[("image", Some("s.png"), &small)]).to_request(),
        )
        .await;
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS, "{uri}");
        assert!(res.headers().contains_key("retry-after"), "{uri}");
    }
    drop(held);
    let (st, b) = send!(
        svc,
        post_multipart("/api/images", &[("image", Some("s.png"), &small)])
    );
    assert_eq!(st, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b));
    assert_eq!(budget.in_use(), 0, "every permit is given back");
    s.running.stop();
}

/// Concurrent uploads under one file name, some of identical bytes, some not: no 5xx, the
/// identical ones answer one id, and every answered image keeps its file.
#[actix_web::test]
async fn concurrent_uploads_with_one_name_never_lose_a_file() {
    let (s, svc) = ingested!();
    let same = png(24, 24, [1, 2, 3]);
    let mut bodies: Vec<Vec<u8>> = (0..6).map(|_| same.clone()).collect();
    bodies.extend((0..6u8).map(|i| png(24, 24, [100, i, 200])));
    let requests = bodies.iter().map(|b| {
        test::call_service(
            &svc,
            post_multipart("/api/images", &[("image", Some("same-name.png"), b)]).to_request(),
        )
    });
    let responses = futures_util::future::join_all(requests).await;
    let mut ids = Vec::new();
    for res in responses {
        let st = res.status();
        let b = test::read_body(res).await;
        assert!(
            st == StatusCode::CREATED || st == StatusCode::OK,
            "{st}: {}",
            String::from_utf8_lossy(&b)
        );
        ids.push(json(&b)["id"].as_u64().unwrap());
    }
    assert!(ids[..6].iter().all(|&i| i == ids[0]), "{ids:?}");
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), 7, "{ids:?}");
    for id in ids {
        let (st, b) = send!(
            svc,
            TestRequest::get().uri(&format!("/api/images/{id}/file"))
        );
        assert_eq!(st, StatusCode::OK, "image {id}");
        assert!(!b.is_empty());
    }
    s.running.stop();
}

/// The HTTP details: 405 with Allow on a known path, HEAD wherever GET works, Range on files,
/// bounded metric labels, calendar dates, a stalled body answered 408.
#[actix_web::test]
async fn methods_ranges_labels_dates_and_stalled_bodies() {
    let (s, svc) = ingested!(Options {
        body_timeout: Duration::from_millis(500),
        ..Default::default()
    });
    let res = test::call_service(&svc, TestRequest::put().uri("/api/search").to_request()).await;
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers().get("allow").unwrap(), "GET, HEAD");
    let res =
        test::call_service(&svc, TestRequest::patch().uri("/api/images/1").to_request()).await;
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers().get("allow").unwrap(), "GET, HEAD, DELETE");
    let (st, b) = send!(
        svc,
        TestRequest::default()
            .method(actix_web::http::Method::from_bytes(b"BREW").unwrap())
            .uri("/api/status")
    );
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_code(&b), "method_not_allowed");
    let (st, _) = send!(svc, TestRequest::get().uri("/api/nothing-here"));
    assert_eq!(st, StatusCode::NOT_FOUND);
    for uri in [
        "/api/status",
        "/api/images/1",
        "/api/images/1/thumbnail",
        "/healthz",
        "/",
    ] {
        let (st, _) = send!(
            svc,
            TestRequest::default()
                .method(actix_web::http::Method::HEAD)
                .uri(uri)
        );
        assert_eq!(st, StatusCode::OK, "HEAD {uri}");
    }
    // The file is streamed with Range support.
    let (st, whole) = send!(svc, TestRequest::get().uri("/api/images/1/file"));
    assert_eq!(st, StatusCode::OK);
    let res = test::call_service(
        &svc,
        TestRequest::get()
            .uri("/api/images/1/file")
            .insert_header(("range", "bytes=0-9"))
            .to_request(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        res.headers().get("x-content-type-options").unwrap(),
        "nosniff"
    );
    assert_eq!(test::read_body(res).await, whole.slice(0..10));
    let res = test::call_service(
        &svc,
        TestRequest::get()
            .uri("/api/images/1/file")
            .insert_header(("range", "bytes=999999999-"))
            .to_request(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert!(res.headers().contains_key("content-range"));
    assert_eq!(
        error_code(&test::read_body(res).await),
        "range_not_satisfiable"
    );
    // Dates that are not in the calendar are 400.
    for d in ["2024-02-31", "2023-02-29", "2024-13-01"] {
        let (st, b) = send!(
            svc,
            TestRequest::get().uri(&format!("/api/search?q=x&date_from={d}"))
        );
        assert_eq!(
            st,
            StatusCode::BAD_REQUEST,
            "{d}: {}",
            String::from_utf8_lossy(&b)
        );
    }
    let (st, _) = send!(
        svc,
        TestRequest::get().uri("/api/search?q=x&rerank_k=0&date_to=2024-02-29")
    );
    assert_eq!(st, StatusCode::OK);
    // Metric labels take only known methods.
    let (_, m) = send!(svc, TestRequest::get().uri("/metrics"));
    let m = String::from_utf8(m.to_vec()).unwrap();
    assert!(!m.contains("BREW"), "{m}");
    assert!(m.contains("method=\"other\""), "{m}");
    // A body that stops arriving is answered 408 and the connection closed.
    let (ct, body) = multipart(&[("image", Some("r.png"), &png(20, 20, [1, 1, 1]))]);
    let first = Bytes::copy_from_slice(&body[..body.len() / 2]);
    use futures_util::StreamExt;
    let stalled = futures_util::stream::iter([Ok::<_, actix_web::error::PayloadError>(first)])
        .chain(futures_util::stream::pending());
    let req = TestRequest::post()
        .uri("/api/search/image")
        .insert_header(("content-type", ct))
        .to_request();
    let payload: actix_web::dev::Payload = actix_web::dev::Payload::from(Box::pin(stalled)
        as std::pin::Pin<
            Box<dyn futures_util::Stream<Item = Result<Bytes, actix_web::error::PayloadError>>>,
        >);
    let (req, _) = req.replace_payload(payload);
    let started = Instant::now();
    let res = test::call_service(&svc, req).await;
    assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(10));
    s.running.stop();
}

/// Without the key, paths start at their root folder's name (the server's layout stays
/// private); with the key they are whole; a folder filter takes either form.
#[actix_web::test]
async fn paths_are_relative_to_their_root_without_the_key() {
    let key = "correct-horse-battery";
    let (s, svc) = ingested!(Options {
        api_key: Some(key),
        ..Default::default()
    });
    let (_, b) = send!(svc, TestRequest::get().uri("/api/images/1"));
    let shown = json(&b)["path"].as_str().unwrap().to_string();
    assert!(shown.starts_with("photos/"), "{shown}");
    let (_, b) = send!(
        svc,
        TestRequest::get()
            .uri("/api/images/1")
            .insert_header(("x-api-key", key))
    );
    let whole = json(&b)["path"].as_str().unwrap().to_string();
    assert!(
        Path::new(&whole).is_absolute() && whole.ends_with(&shown[7..]),
        "{whole}"
    );
    let (_, b) = send!(svc, TestRequest::get().uri("/api/status"));
    assert_eq!(json(&b)["folders"], serde_json::json!(["photos"]));
    for folder in [
        "photos",
        &std::fs::canonicalize(&s.photos)
            .unwrap()
            .display()
            .to_string(),
    ] {
        let (st, b) = send!(
            svc,
            TestRequest::get().uri(&format!("/api/search?q=rocket&rerank_k=0&folder={folder}"))
        );
        assert_eq!(st, StatusCode::OK);
        let hits = json(&b)["hits"].as_array().unwrap().clone();
        assert!(!hits.is_empty(), "{folder}");
        assert!(hits
            .iter()
            .all(|h| h["path"].as_str().unwrap().starts_with("photos/")));
    }
    s.running.stop();
}

/// Files in the upload folder that no image points to (a crash between writing and indexing)
/// are removed when the server starts; uploaded images keep theirs.
#[actix_web::test]
async fn orphan_uploads_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("index");
    let (s, svc) = ingested!(Options {
        index: Some(index.clone()),
        ..Default::default()
    });
    let (st, b) = send!(
        svc,
        post_multipart(
            "/api/images",
            &[("image", Some("kept.png"), &png(30, 30, [9, 9, 9]))]
        )
    );
    assert_eq!(st, StatusCode::CREATED);
    let id = json(&b)["id"].as_u64().unwrap();
    // The app holds the state: drop it first, so that stopping closes the collection.
    drop(svc);
    s.running.stop();
    let uploads = uploads_dir(&index);
    let orphan = uploads.join("0123456789ab-orphan.png");
    std::fs::write(&orphan, png(5, 5, [1, 1, 1])).unwrap();
    let kept: Vec<_> = std::fs::read_dir(&uploads).unwrap().collect();
    assert_eq!(kept.len(), 2);
    let s = start(Options {
        index: Some(index.clone()),
        ..Default::default()
    });
    let svc = service!(s);
    assert!(!orphan.exists(), "the orphan is gone");
    let (st, _) = send!(
        svc,
        TestRequest::get().uri(&format!("/api/images/{id}/file"))
    );
    assert_eq!(st, StatusCode::OK, "the uploaded image keeps its file");
    s.running.stop();
}

/// Mutated images (flipped bytes, cut files, headers claiming huge sizes, in every format we
/// read) through the keyless search by image and the upload: always an answer below 500.
#[actix_web::test]
async fn mutated_and_huge_header_images_never_get_a_5xx() {
    use rand::{Rng, SeedableRng};
    let (s, svc) = ingested!(Options {
        decode_memory_bytes: 256 << 20,
        decode_wait: Duration::from_millis(200),
        ..Default::default()
    });
    let fx = common::fixtures().join("images");
    let base = image::open(fx.join("chelsea.png"))
        .unwrap()
        .thumbnail(48, 48);
    let mut seeds: Vec<Vec<u8>> = vec![file_bytes(&fx.join("rocket.jpg"))];
    for format in [
        image::ImageFormat::Png,
        image::ImageFormat::Jpeg,
        image::ImageFormat::Gif,
        image::ImageFormat::Bmp,
        image::ImageFormat::Tiff,
        image::ImageFormat::WebP,
    ] {
        let mut out = std::io::Cursor::new(Vec::new());
        base.to_rgb8().write_to(&mut out, format).unwrap();
        seeds.push(out.into_inner());
    }
    seeds.push(common::huge_png(60_000, 60_000 / 8, png::Compression::Fast));
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let mut statuses = std::collections::BTreeMap::new();
    for case in 0..160 {
        let mut b = seeds[case % seeds.len()].clone();
        match case % 4 {
            // Flip bytes anywhere.
            0 => {
                for _ in 0..rng.random_range(1..8) {
                    let i = rng.random_range(0..b.len());
                    b[i] ^= rng.random_range(1..=255u8);
                }
            }
            // Cut the file.
            1 => b.truncate(rng.random_range(0..b.len())),
            // Write large numbers over the first 40 bytes (where every format keeps its size).
            2 => {
                let i = rng.random_range(0..b.len().min(40).saturating_sub(4));
                let v: u32 = rng.random_range(30_000..u32::MAX);
                b[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            // Splice: a header followed by another file's body.
            _ => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                b.truncate(b.len().min(64));
                b.extend_from_slice(&other[other.len().min(64)..]);
            }
        }
        let uri = if case % 5 == 0 {
            "/api/images"
        } else {
            "/api/search/image"
        };
        let (st, body) = send!(svc, post_multipart(uri, &[("image", Some("m.img"), &b)]));
        assert!(
            st.as_u16() < 500,
            "case {case} on {uri}: {st} {}",
            String::from_utf8_lossy(&body)
        );
        *statuses.entry(st.as_u16()).or_insert(0) += 1;
    }
    eprintln!("statuses of mutated images: {statuses:?}");
    assert_eq!(s.running.state.settings.budget.in_use(), 0);
    s.running.stop();
}

/// `s` with every byte but the unreserved ones percent-encoded, for a query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A brand that would break a Milvus expression if it were pasted into one: a filter on it must
/// match this text and nothing else.
const INJECTION: &str = r#"x" or id > 0 or ""#;

/// The test catalogue: four products over seven images, and rocket.jpg without a product.
fn catalogue() -> Vec<common::products::CatalogueEntry> {
    use blipsearch::index::AttrValue::{Bool, Number};
    use common::products::{product, text, CatalogueEntry};
    vec![
        CatalogueEntry {
            product: product(
                "SKU-1",
                "Trail runner",
                &[
                    ("brand", text("acme")),
                    ("color", text("red")),
                    ("price", Number(59.9)),
                    ("in_stock", Bool(true)),
                    ("released", text("2024-03-01")),
                    ("category", text("shoes/running")),
                ],
            ),
            images: vec!["astronaut.png", "n0.png"],
        },
        CatalogueEntry {
            product: product(
                "SKU-2",
                "Summit boot",
                &[
                    ("brand", text("acme")),
                    ("color", text("blue")),
                    ("price", Number(120.0)),
                    ("in_stock", Bool(false)),
                    ("released", text("2023-10-15")),
                    ("category", text("shoes/hiking")),
                ],
            ),
            images: vec!["chelsea.png", "n1.png", "n2.png"],
        },
        CatalogueEntry {
            product: product(
                "SKU-3",
                "Day pack",
                &[
                    ("brand", text("zenith")),
                    ("color", text("red")),
                    ("price", Number(35.0)),
                    ("in_stock", Bool(true)),
                    ("released", text("2024-06-01")),
                    ("category", text("bags/day")),
                ],
            ),
            images: vec!["coffee.png"],
        },
        CatalogueEntry {
            product: product(
                "SKU-4",
                "Odd one",
                &[
                    ("brand", text(INJECTION)),
                    ("color", text("green")),
                    ("price", Number(80.0)),
                    ("in_stock", Bool(true)),
                    ("category", text("bags/travel")),
                ],
            ),
            images: vec!["n3.png"],
        },
    ]
}

/// Stops a server off the test's runtime, where a Milvus store's own runtime may be dropped.
async fn stop(running: Running) {
    actix_web::rt::task::spawn_blocking(move || running.stop())
        .await
        .unwrap();
}

/// How a server opens the catalogue collection in `dir` ([`make_catalogue`]), its records in
/// the embedded store or in `store` (`milvus://...`).
fn catalogue_options(dir: &Path, store: Option<&str>) -> Options {
    Options {
        index: Some(dir.join("index")),
        photos: Some(dir.join("images")),
        store: store.map(str::to_string),
        ..Default::default()
    }
}

/// [`catalogue`] in `dir`: the folder `dir/images` (the four fixture images and four noise
/// PNGs) is ingested into `dir/index` by a server, and the products are written into the
/// closed collection. Returns rocket.jpg's id and the ids of each product's images.
async fn make_catalogue(
    dir: &Path,
    store: Option<&str>,
) -> (
    u64,
    std::collections::BTreeMap<String, Vec<blipsearch::index::ImageId>>,
) {
    let photos = dir.join("images");
    std::fs::create_dir_all(&photos).unwrap();
    for f in ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"] {
        std::fs::copy(common::fixtures().join("images").join(f), photos.join(f)).unwrap();
    }
    std::fs::write(photos.join("rocket.jpg.txt"), "a rocket launch at dusk").unwrap();
    common::noise_pngs(&photos, 4, 11, |_| (48, 40), |i| format!("n{i}.png"));
    let (s, svc) = ingested!(catalogue_options(dir, store));
    assert_eq!(image_count!(svc), 8);
    let rocket = rocket_id!(svc);
    // The app holds the state: drop it first, so that stopping closes the collection.
    drop(svc);
    stop(s.running).await;
    let index = dir.join("index");
    let store = store.map(str::to_string);
    // Off the test's runtime: a Milvus store runs (and drops) a runtime of its own.
    let ids = actix_web::rt::task::spawn_blocking(move || match store {
        None => common::products::assign_products(&index, &catalogue()),
        Some(address) => {
            let mut milvus =
                blipsearch::index::MilvusStore::open_existing(&address.parse().unwrap()).unwrap();
            common::products::assign_products_in(&mut milvus, &catalogue())
        }
    })
    .await
    .unwrap();
    (rocket, ids)
}

/// The app over [`catalogue`] ([`make_catalogue`]): `(setup, service, tempdir, ids of each
/// product's images, rocket's id)`.
macro_rules! catalogue_app {
    () => {
        catalogue_app!(None)
    };
    ($store:expr) => {{
        let dir = tempfile::tempdir().unwrap();
        let (rocket, ids) = make_catalogue(dir.path(), $store).await;
        let (s, svc) = ingested!(catalogue_options(dir.path(), $store));
        (s, svc, dir, ids, rocket)
    }};
}

/// Not a check of its own: writes [`catalogue`] into `$BROWSER_CATALOGUE_DIR` (`images/`,
/// `index/`) for the facet pass of the browser test (tests/browser/run.sh), which serves it.
#[actix_web::test]
#[ignore = "tests/browser/run.sh runs it to make its catalogue"]
async fn browser_catalogue() {
    let dir = std::env::var_os("BROWSER_CATALOGUE_DIR")
        .map(PathBuf::from)
        .expect("set BROWSER_CATALOGUE_DIR to an empty folder");
    let (_, ids) = make_catalogue(&dir, None).await;
    assert_eq!(ids.len(), 4);
}

/// A search whose candidates are every image (vector candidates over the whole small
/// collection), without a limit.
const UNPAGED: &str = "/api/search?q=a%20photo&mode=vector&rerank_k=0&k=50";
/// Every image a search can return, on one page.
const ALL: &str = concat!(
    "/api/search?q=a%20photo&mode=vector&rerank_k=0&k=50",
    "&limit=50"
);

/// GETs `uri`, which must answer 200; its JSON.
macro_rules! get_ok {
    ($svc:expr, $uri:expr) => {{
        let uri: String = $uri;
        let (st, b) = send!($svc, TestRequest::get().uri(&uri));
        assert_eq!(st, StatusCode::OK, "{uri}: {}", String::from_utf8_lossy(&b));
        json(&b)
    }};
}

/// The ids of a search's hits, sorted.
fn hit_ids(v: &Value) -> Vec<u64> {
    let mut ids: Vec<u64> = v["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_u64().unwrap())
        .collect();
    ids.sort();
    ids
}

/// Product filters on the catalogue app ([`catalogue_app`]): every kind, on both searches, and
/// the 400s of bad filters, facets and groupings.
macro_rules! check_product_filters {
    ($svc:expr, $ids:expr, $rocket:expr) => {{
        let (svc, ids, rocket) = (&$svc, &$ids, $rocket);
            let of = |skus: &[&str]| {
                let mut v: Vec<u64> = skus
                    .iter()
                    .flat_map(|p| ids[*p].iter().map(|i| i.0))
                    .collect();
                v.sort();
                v
            };
            // The status lists the attribute types: what the UI offers facets for.
            let (_, b) = send!(*svc, TestRequest::get().uri("/api/status"));
            assert_eq!(
                json(&b)["attributes"],
                serde_json::json!({"brand": "keyword", "category": "keyword", "color": "keyword",
                    "in_stock": "bool", "price": "number", "released": "date"})
            );
            // Unfiltered: every image, with its product (rocket.jpg has none).
            let all = get_ok!(*svc, ALL.to_string());
            assert_eq!(all["hits"].as_array().unwrap().len(), 8, "{all}");
            assert_eq!(all["total"], 8);
            for h in all["hits"].as_array().unwrap() {
                if h["id"] == rocket {
                    assert!(h.get("product").is_none(), "{h}");
                } else {
                    assert!(
                        h["product"]["id"].as_str().unwrap().starts_with("SKU-"),
                        "{h}"
                    );
                }
            }
            let sku1 = all["hits"]
                .as_array()
                .unwrap()
                .iter()
                .find(|h| h["product"]["id"] == "SKU-1")
                .unwrap();
            assert_eq!(sku1["product"]["title"], "Trail runner");
            assert_eq!(sku1["product"]["attributes"]["price"], 59.9);
            assert_eq!(sku1["product"]["attributes"]["in_stock"], true);
            assert_eq!(sku1["product"]["attributes"]["brand"], "acme");
            // Every filter kind, and several filters at once (all must hold).
            let injection = format!("brand:{INJECTION}");
            for (filters, want) in [
                (vec!["brand:acme"], of(&["SKU-1", "SKU-2"])),
                (vec!["color:red|blue"], of(&["SKU-1", "SKU-2", "SKU-3"])),
                (vec!["price:..60"], of(&["SKU-1", "SKU-3"])),
                (vec!["price:59.9"], of(&["SKU-1"])),
                (vec!["price:60.."], of(&["SKU-2", "SKU-4"])),
                (vec!["price:60..", "in_stock:true"], of(&["SKU-4"])),
                (vec!["in_stock:false"], of(&["SKU-2"])),
                (vec!["released:2024-01-01.."], of(&["SKU-1", "SKU-3"])),
                (vec!["released:..2023-12-31"], of(&["SKU-2"])),
                (vec!["category:shoes/*"], of(&["SKU-1", "SKU-2"])),
                (vec!["category:bags/*", "color:red"], of(&["SKU-3"])),
                (vec!["brand:acme", "brand:zenith"], vec![]),
                // A value that would be an expression elsewhere is a literal: that brand alone...
                (vec![injection.as_str()], of(&["SKU-4"])),
                // ... and a near miss matches nothing, not everything.
                (vec![r#"brand:x" or id > 0 or "x"#], vec![]),
            ] {
                let query: String = filters
                    .iter()
                    .map(|f| format!("&filter={}", enc(f)))
                    .collect();
                let v = get_ok!(*svc, format!("{ALL}{query}"));
                assert_eq!(hit_ids(&v), want, "{filters:?}: {v}");
                assert_eq!(v["total"], want.len(), "{filters:?}");
            }
            // Paging keeps the total.
            let v = get_ok!(*svc, format!("{UNPAGED}&filter=brand:acme&limit=2&offset=1"));
            assert_eq!(v["hits"].as_array().unwrap().len(), 2);
            assert_eq!(v["total"], 5);
            // The same filters on a search by image, by an indexed id and by an upload.
            let (st, b) = send!(
                *svc,
                TestRequest::post()
                    .uri("/api/search/image?k=50&limit=50&filter=color:red&filter=brand:zenith")
                    .set_json(serde_json::json!({ "similar_to": rocket })),
            );
            assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
            assert_eq!(hit_ids(&json(&b)), of(&["SKU-3"]));
            let coffee = file_bytes(&common::fixtures().join("images/coffee.png"));
            let (st, b) = send!(
                *svc,
                post_multipart(
                    "/api/search/image?k=50&limit=50&filter=category:shoes/*",
                    &[("image", Some("q.png"), &coffee)]
                ),
            );
            assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
            assert_eq!(hit_ids(&json(&b)), of(&["SKU-1", "SKU-2"]));

            // Bad filters, facets and groupings: 400, with a message naming what is wrong.
            for (query, says) in [
                ("filter=colour:red", "colour"),
                ("filter=price:80..10", "price:80..10"),
                ("filter=price:cheap", "price:cheap"),
                ("filter=in_stock:yes", "in_stock:yes"),
                ("filter=released:2024-02-30", "released:2024-02-30"),
                ("filter=brand", "name:value"),
                ("filter=brand:", "brand:"),
                ("filter=price:5*", "price:5*"),
                ("filter=brand:acme&filter=size:9", "size:9"),
                ("facets=brand:..5", "brand:..5"),
                ("facets=size", "size"),
                ("facets=price:50..10", "price:50..10"),
                ("facets=price:cheap..", "cheap"),
                ("facets=brand,brand", "twice"),
                ("group_by=brand", "brand"),
                ("group_by=", "group"),
            ] {
                for (req, what) in [
                    (TestRequest::get().uri(&format!("{ALL}&{query}")), "text"),
                    (
                        TestRequest::post()
                            .uri(&format!("/api/search/image?{query}"))
                            .set_json(serde_json::json!({ "similar_to": rocket })),
                        "image",
                    ),
                ] {
                    let (st, b) = send!(*svc, req);
                    assert_eq!(st, StatusCode::BAD_REQUEST, "{what} {query}");
                    assert_eq!(error_code(&b), "bad_request");
                    let message = json(&b)["error"]["message"].as_str().unwrap().to_string();
                    assert!(message.contains(says), "{what} {query}: {message}");
                }
            }
            let (st, b) = send!(
                *svc,
                TestRequest::get().uri(&format!("{ALL}&facets={}", ",".repeat(2001)))
            );
            assert_eq!(st, StatusCode::BAD_REQUEST);
            assert!(String::from_utf8_lossy(&b).contains("over 2000"));
            let many: String = (0..33).map(|_| "&filter=brand:acme").collect();
            let (st, b) = send!(*svc, TestRequest::get().uri(&format!("{ALL}{many}")));
            assert_eq!(st, StatusCode::BAD_REQUEST);
            assert!(String::from_utf8_lossy(&b).contains("at most 32"));
    }};
}

#[actix_web::test]
async fn product_filters_narrow_both_searches_and_bad_ones_are_400() {
    let (s, svc, _dir, ids, rocket) = catalogue_app!();
    check_product_filters!(svc, ids, rocket);
    s.running.stop();
}

/// The counts of a facet as `(value, count)`, in the order given.
fn facet(v: &Value, name: &str) -> (Vec<(String, u64)>, u64) {
    let f = v["facets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no facet {name}: {v}"));
    let values = f["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["value"].as_str().unwrap().to_string(),
                x["count"].as_u64().unwrap(),
            )
        })
        .collect();
    (values, f["missing"].as_u64().unwrap())
}

fn pairs(p: &[(&str, u64)]) -> Vec<(String, u64)> {
    p.iter().map(|(v, n)| (v.to_string(), *n)).collect()
}

fn sorted(mut p: Vec<(String, u64)>) -> Vec<(String, u64)> {
    p.sort();
    p
}

/// Facets counted by hand and one hit per product on the catalogue app ([`catalogue_app`]).
macro_rules! check_facets_and_groups {
    ($svc:expr, $ids:expr, $rocket:expr) => {{
        let (svc, ids, rocket) = (&$svc, &$ids, $rocket);
            // Facets over all eight images, counted by hand from `catalogue`.
            let facets = enc("brand,color,in_stock,price:..50|50..100|100..,released,category");
            let v = get_ok!(*svc, format!("{ALL}&facets={facets}"));
            assert_eq!(v["total"], 8);
            let names: Vec<&str> = v["facets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["name"].as_str().unwrap())
                .collect();
            assert_eq!(
                names,
                ["brand", "color", "in_stock", "price", "released", "category"]
            );
            // Keywords: most frequent first, ties by value.
            assert_eq!(
                facet(&v, "brand"),
                (pairs(&[("acme", 5), (INJECTION, 1), ("zenith", 1)]), 1)
            );
            assert_eq!(
                facet(&v, "color"),
                (pairs(&[("blue", 3), ("red", 3), ("green", 1)]), 1)
            );
            let (stock, missing) = facet(&v, "in_stock");
            assert_eq!(
                (sorted(stock), missing),
                (pairs(&[("false", 3), ("true", 4)]), 1)
            );
            let (days, missing) = facet(&v, "released");
            assert_eq!(
                (sorted(days), missing),
                (
                    pairs(&[("2023-10-15", 3), ("2024-03-01", 2), ("2024-06-01", 1)]),
                    2
                )
            );
            // Number ranges in the order asked, with their ends.
            let price = v["facets"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["name"] == "price")
                .unwrap();
            assert_eq!(price["kind"], "number");
            assert_eq!(price["missing"], 1);
            let counts: Vec<(Option<f64>, Option<f64>, u64)> = price["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| {
                    (
                        x["min"].as_f64(),
                        x["max"].as_f64(),
                        x["count"].as_u64().unwrap(),
                    )
                })
                .collect();
            assert_eq!(
                counts,
                [
                    (None, Some(50.0), 1),
                    (Some(50.0), Some(100.0), 3),
                    (Some(100.0), None, 3)
                ]
            );
            // Automatic buckets cover every priced image.
            let v = get_ok!(*svc, format!("{ALL}&facets=price"));
            let (buckets, missing) = facet(&v, "price");
            assert_eq!(missing, 1);
            assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 7, "{v}");
            // Facets count what the filters leave.
            let v = get_ok!(*svc, format!("{ALL}&filter=brand:acme&facets=color,brand"));
            assert_eq!(facet(&v, "color"), (pairs(&[("blue", 3), ("red", 2)]), 0));
            assert_eq!(facet(&v, "brand"), (pairs(&[("acme", 5)]), 0));
            // ... and the facets of a search by image.
            let (st, b) = send!(
                *svc,
                TestRequest::post()
                    .uri("/api/search/image?k=50&limit=50&include_self=true&facets=brand")
                    .set_json(serde_json::json!({ "similar_to": rocket })),
            );
            assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
            assert_eq!(
                facet(&json(&b), "brand"),
                (pairs(&[("acme", 5), (INJECTION, 1), ("zenith", 1)]), 1)
            );

            // One hit per product: five groups (rocket.jpg is a group of its own).
            let v = get_ok!(*svc, format!("{ALL}&group_by=product&facets=brand"));
            assert_eq!(v["total"], 5, "{v}");
            let hits = v["hits"].as_array().unwrap();
            assert_eq!(hits.len(), 5);
            for h in hits {
                let g = &h["group"];
                let matching: Vec<u64> = g["matching"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m.as_u64().unwrap())
                    .collect();
                if h["id"] == rocket {
                    assert_eq!(g["product"], Value::Null, "{h}");
                    assert_eq!((g["size"].as_u64(), matching.len()), (Some(1), 0));
                    continue;
                }
                let sku = h["product"]["id"].as_str().unwrap();
                assert_eq!(g["product"], sku, "{h}");
                // Every image matched (all are candidates): the group is the product's images.
                let mut all: Vec<u64> = matching.clone();
                all.push(h["id"].as_u64().unwrap());
                all.sort();
                let mut want: Vec<u64> = ids[sku].iter().map(|i| i.0).collect();
                want.sort();
                assert_eq!(all, want, "{h}");
                assert_eq!(g["size"].as_u64().unwrap() as usize, want.len());
            }
            // Grouped facets count groups.
            assert_eq!(
                facet(&v, "brand"),
                (pairs(&[("acme", 2), (INJECTION, 1), ("zenith", 1)]), 1)
            );
            // Pages of groups: every group once over the pages, the total on each.
            let mut seen = Vec::new();
            for offset in [0, 2, 4] {
                let v = get_ok!(
                    *svc,
                    format!("{UNPAGED}&group_by=product&limit=2&offset={offset}")
                );
                assert_eq!(v["total"], 5);
                let hits = v["hits"].as_array().unwrap();
                assert_eq!(hits.len(), if offset == 4 { 1 } else { 2 });
                seen.extend(hits.iter().map(|h| h["group"]["product"].to_string()));
            }
            seen.sort();
            assert_eq!(
                seen,
                ["\"SKU-1\"", "\"SKU-2\"", "\"SKU-3\"", "\"SKU-4\"", "null"]
            );
            // Grouping after filtering: a group's size is the product's, its matches the filtered ones.
            let v = get_ok!(*svc, format!("{ALL}&group_by=product&filter=color:red"));
            assert_eq!(v["total"], 2);
            let mut products: Vec<&str> = v["hits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h["group"]["product"].as_str().unwrap())
                .collect();
            products.sort();
            assert_eq!(products, ["SKU-1", "SKU-3"]);
            // A search by image groups too.
            let (st, b) = send!(
                *svc,
                TestRequest::post()
                    .uri("/api/search/image?k=50&limit=50&group_by=product&filter=brand:acme")
                    .set_json(serde_json::json!({ "similar_to": rocket })),
            );
            assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
            assert_eq!(json(&b)["total"], 2);
    }};
}

#[actix_web::test]
async fn facets_count_the_relevant_set_and_group_by_gives_one_hit_per_product() {
    let (s, svc, _dir, ids, rocket) = catalogue_app!();
    check_facets_and_groups!(svc, ids, rocket);
    s.running.stop();
}

/// The same filters (the Milvus-injection brand among them), facets and groups with the records
/// in Milvus (Milvus Lite; see tests/common/milvus.rs).
#[actix_web::test]
async fn on_milvus_product_filters_facets_and_groups() {
    let milvus = common::milvus::MilvusLite::start();
    let address = milvus.address("catalogue");
    let (s, svc, _dir, ids, rocket) = catalogue_app!(Some(address.as_str()));
    check_product_filters!(svc, ids, rocket);
    check_facets_and_groups!(svc, ids, rocket);
    drop(svc);
    stop(s.running).await;
}

/// The key of the moderation tests.
const MOD_KEY: &str = "moderator-key-1234";

/// `req` with the moderation key.
fn keyed(req: TestRequest) -> TestRequest {
    req.insert_header(("authorization", format!("Bearer {MOD_KEY}")))
}

/// A JSON POST with the moderation key.
fn keyed_json(uri: &str, body: Value) -> TestRequest {
    keyed(TestRequest::post().uri(uri).set_json(body))
}

/// The `action` of every audit event, in order.
fn audit_actions(v: &Value) -> Vec<String> {
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect()
}

/// The whole moderation flow over the API with the key: lists, reference images and hash files,
/// flags on the matching image and the flagged filter, the review queue and a decision, matches,
/// removal, and the audit log of all of it.
macro_rules! check_moderation {
    ($svc:expr) => {{
        let svc = &$svc;
        let rocket = {
            let (_, b) = send!(
                svc,
                TestRequest::get().uri("/api/search?q=launch%20dusk&mode=text&rerank_k=0"),
            );
            let v = json(&b);
            assert_eq!(v["hits"][0]["file_name"], "rocket.jpg", "{v}");
            v["hits"][0]["id"].as_u64().unwrap()
        };
        // Every moderation route needs the key.
        for uri in ["/api/lists", "/api/review", "/api/audit", "/api/matches"] {
            let (st, b) = send!(svc, TestRequest::get().uri(uri));
            assert_eq!(st, StatusCode::UNAUTHORIZED, "{uri}");
            assert_eq!(error_code(&b), "unauthorized");
        }
        let (st, b) = send!(svc, keyed(TestRequest::get().uri("/api/lists")));
        assert_eq!(st, StatusCode::OK);
        assert_eq!(json(&b)["lists"], serde_json::json!([]));

        // Lists: created once, with a valid name.
        // The tiny random model puts unrelated photos near BLIP base's default cosine (0.92).
        let bank = serde_json::json!({"name": "bank", "min_cosine": 0.97});
        let (st, b) = send!(svc, keyed_json("/api/lists", bank));
        assert_eq!(st, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b));
        assert_eq!(json(&b)["name"], "bank");
        assert_eq!(json(&b)["pdq_distance"], 31);
        assert!((json(&b)["min_cosine"].as_f64().unwrap() - 0.97).abs() < 1e-6);
        let (st, b) = send!(svc, keyed_json("/api/lists", serde_json::json!({"name": "bank"})));
        assert_eq!(st, StatusCode::OK, "an existing list is answered as it is");
        assert_eq!(json(&b)["entries"], 0);
        for bad in [
            serde_json::json!({"name": "Bad Name"}),
            serde_json::json!({"nom": "x"}),
            serde_json::json!({"name": "x", "pdq_distance": 300}),
            serde_json::json!({"name": "x", "min_cosine": 3}),
        ] {
            let (st, _) = send!(svc, keyed_json("/api/lists", bad.clone()));
            assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}");
        }
        let (st, _) = send!(svc, keyed(TestRequest::get().uri("/api/lists/nosuch")));
        assert_eq!(st, StatusCode::NOT_FOUND);

        // A reference image (a copy of rocket.jpg) and a hash file with one good and one bad
        // line: the rocket is flagged.
        let reference = file_bytes(&common::fixtures().join("images/rocket.jpg"));
        let (st, b) = send!(
            svc,
            keyed(post_multipart(
                "/api/lists/bank/entries",
                &[
                    ("image", Some("ref-rocket.jpg"), &reference),
                    ("label", None, b"known rocket"),
                ],
            )),
        );
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        let added = json(&b);
        assert_eq!(added["added"].as_array().unwrap().len(), 1, "{added}");
        let entry = added["added"][0].clone();
        assert_eq!(entry["label"], "known rocket");
        assert_eq!(entry["source"], "ref-rocket.jpg");
        assert_eq!(entry["dihedral"], true);
        assert_eq!(entry["itc"], true);
        // The seven other dihedral hashes, so that a reviewer sees the one that matched.
        let variants = entry["pdq_variants"].as_array().unwrap();
        assert_eq!(variants.len(), 7, "{entry}");
        assert!(variants.iter().all(|h| h.as_str().unwrap().len() == 64 && *h != entry["pdq"]));
        assert_eq!(added["flagged"], 1, "{added}");
        let hashes = format!("{},other bank\nnot-a-hash\n", "0f".repeat(32));
        let (st, b) = send!(
            svc,
            keyed(post_multipart(
                "/api/lists/bank/entries",
                &[("pdq", Some("bank.csv"), hashes.as_bytes())],
            )),
        );
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        let v = json(&b);
        assert_eq!(v["added"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["added"][0]["dihedral"], false);
        assert_eq!(v["added"][0]["itc"], false);
        assert!(v["added"][0].get("pdq_variants").is_none(), "a hash-only entry: {v}");
        assert_eq!(v["skipped"].as_array().unwrap().len(), 1, "{v}");
        let (st, b) = send!(svc, keyed(TestRequest::get().uri("/api/lists/bank")));
        assert_eq!(st, StatusCode::OK);
        let v = json(&b);
        assert_eq!(v["entries"].as_array().unwrap().len(), 2, "{v}");
        assert_eq!(v["list"]["entries"], 2, "{v}");

        // The flag shows to the key holder only, and the flagged filter needs the key.
        let flagged = "/api/search?q=a%20photo&mode=vector&rerank_k=0&k=50&limit=50&flagged=";
        for list in ["bank", "%2A"] {
            let (st, b) = send!(svc, keyed(TestRequest::get().uri(&format!("{flagged}{list}"))));
            assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
            let v = json(&b);
            assert_eq!(hit_ids(&v), vec![rocket], "{v}");
            assert_eq!(v["hits"][0]["flags"][0]["list"], "bank");
            assert!(v["hits"][0]["flags"][0]["pdq_distance"].as_u64().unwrap() <= 2, "{v}");
        }
        let (st, _) = send!(svc, TestRequest::get().uri(&format!("{flagged}bank")));
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        let (st, _) = send!(svc, keyed(TestRequest::get().uri(&format!("{flagged}Bad%20Name"))));
        assert_eq!(st, StatusCode::BAD_REQUEST);
        let (_, b) = send!(svc, TestRequest::get().uri(&format!("/api/images/{rocket}")));
        assert!(json(&b).get("flags").is_none(), "flags are not shown without the key");
        let (_, b) = send!(svc, keyed(TestRequest::get().uri(&format!("/api/images/{rocket}"))));
        assert_eq!(json(&b)["flags"][0]["list"], "bank");

        // Matches, computed afresh.
        let (st, b) = send!(svc, keyed(TestRequest::get().uri("/api/matches?list=bank")));
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        let v = json(&b);
        assert_eq!(v["total"], 1, "{v}");
        assert_eq!(v["matches"][0]["id"], rocket);
        assert_ne!(v["matches"][0]["rule"], "itc", "an exact copy matches by PDQ: {v}");
        for bad in ["/api/matches?pdq_distance=999", "/api/matches?min_cosine=2", "/api/matches?x=1"] {
            let (st, _) = send!(svc, keyed(TestRequest::get().uri(bad)));
            assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}");
        }

        // The review queue, and a decision.
        let (st, b) = send!(svc, keyed(TestRequest::get().uri("/api/review")));
        assert_eq!(st, StatusCode::OK);
        let v = json(&b);
        assert_eq!(v["total"], 1, "{v}");
        assert_eq!(v["items"][0]["image"]["id"], rocket);
        assert_eq!(v["items"][0]["pending"][0]["entry"], entry["id"]);
        assert_eq!(v["items"][0]["entries"][0]["label"], "known rocket");
        for (body, want) in [
            (serde_json::json!({"decision": "maybe"}), StatusCode::BAD_REQUEST),
            (serde_json::json!({"decision": "cleared", "extra": 1}), StatusCode::BAD_REQUEST),
        ] {
            let (st, _) = send!(svc, keyed_json(&format!("/api/review/{rocket}"), body.clone()));
            assert_eq!(st, want, "{body}");
        }
        let (st, _) = send!(
            svc,
            keyed_json("/api/review/999999999", serde_json::json!({"decision": "cleared"}))
        );
        assert_eq!(st, StatusCode::NOT_FOUND);
        let (st, b) = send!(
            svc,
            keyed_json(
                &format!("/api/review/{rocket}"),
                serde_json::json!({"decision": "cleared", "note": "a launch photo, not the bank's"}),
            )
        );
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        let v = json(&b);
        assert_eq!(v["image"]["flags"][0]["decision"]["verdict"], "cleared", "{v}");
        assert!(v["image"]["flags"][0]["decision"]["actor"]
            .as_str()
            .unwrap()
            .starts_with("key:"));
        let (_, b) = send!(svc, keyed(TestRequest::get().uri("/api/review")));
        assert_eq!(json(&b)["total"], 0);
        let (st, b) = send!(
            svc,
            keyed_json(&format!("/api/review/{rocket}"), serde_json::json!({"decision": "confirmed"}))
        );
        assert_eq!(st, StatusCode::CONFLICT, "nothing waits for review");
        assert_eq!(error_code(&b), "conflict");
        let (st, _) = send!(svc, keyed(TestRequest::get().uri("/api/review?list=nosuch")));
        assert_eq!(st, StatusCode::NOT_FOUND);
        let (st, _) = send!(svc, keyed(TestRequest::get().uri("/api/audit?after=9223372036854775808")));
        assert_eq!(st, StatusCode::BAD_REQUEST);
        let (_, b) = send!(svc, keyed(TestRequest::get().uri(&format!("{flagged}bank"))));
        assert_eq!(hit_ids(&json(&b)), Vec::<u64>::new(), "a cleared image is not flagged");

        // Adding the same reference again flags nothing: cleared stays cleared.
        let (st, b) = send!(
            svc,
            keyed(post_multipart(
                "/api/lists/bank/entries",
                &[("image", Some("again.jpg"), &reference)],
            )),
        );
        assert_eq!(st, StatusCode::OK);
        assert_eq!(json(&b)["flagged"], 0);

        // Removal.
        let id = entry["id"].as_u64().unwrap();
        let (st, b) = send!(
            svc,
            keyed(TestRequest::delete().uri(&format!("/api/lists/bank/entries/{id}")))
        );
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        let (st, _) = send!(
            svc,
            keyed(TestRequest::delete().uri(&format!("/api/lists/bank/entries/{id}")))
        );
        assert_eq!(st, StatusCode::NOT_FOUND);
        let (st, _) = send!(svc, keyed(TestRequest::delete().uri("/api/lists/bank")));
        assert_eq!(st, StatusCode::OK);
        let (st, _) = send!(svc, keyed(TestRequest::get().uri("/api/lists/bank")));
        assert_eq!(st, StatusCode::NOT_FOUND);

        // The audit log: every step, in order, by the key's id and never the key.
        let (st, b) = send!(svc, keyed(TestRequest::get().uri("/api/audit?limit=1000")));
        assert_eq!(st, StatusCode::OK);
        let log = json(&b);
        let actions = audit_actions(&log);
        let order = ["list_create", "entries_add", "match", "decision", "entry_remove", "list_delete"];
        let mut at = 0;
        for want in order {
            at += actions[at..]
                .iter()
                .position(|a| a == want)
                .unwrap_or_else(|| panic!("no {want} after {at} in {actions:?}"));
        }
        assert!(!String::from_utf8_lossy(&b).contains(MOD_KEY), "the key is never logged");
        let first = log["entries"][0]["seq"].as_u64().unwrap();
        let (_, b) = send!(svc, keyed(TestRequest::get().uri(&format!("/api/audit?after={first}&limit=1"))));
        let page = json(&b);
        assert_eq!(page["entries"][0]["seq"], first + 1, "{page}");
        assert_eq!(page["next_after"], first + 1);
    }};
}

#[actix_web::test]
async fn moderation_lists_flags_review_and_audit() {
    // A server without a key refuses moderation: nobody could be named in the audit log.
    let s = start(Options::default());
    let svc = service!(s);
    let (st, b) = send!(svc, TestRequest::get().uri("/api/lists"));
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&b), "no_api_key");
    drop(svc);
    stop(s.running).await;

    let (s, svc) = ingested!(Options {
        api_key: Some(MOD_KEY),
        ..Default::default()
    });
    check_moderation!(svc);
    drop(svc);
    stop(s.running).await;
}

#[actix_web::test]
async fn on_milvus_moderation_lists_flags_review_and_audit() {
    let milvus = common::milvus::MilvusLite::start();
    let address = milvus.address("moderation");
    let (s, svc) = ingested!(Options {
        api_key: Some(MOD_KEY),
        store: Some(address),
        ..Default::default()
    });
    check_moderation!(svc);
    drop(svc);
    stop(s.running).await;
}
