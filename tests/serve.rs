//! `blipsearch serve` as a process: it serves at once, indexes its folder in the background,
//! and stops cleanly on Ctrl-C (SIGINT) with everything committed.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use blipsearch::index::{Collection, Filter, HnswParams, ImageId, Store};

/// The status and body of the response on `s`.
fn response(s: &mut TcpStream) -> Option<(u16, String)> {
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split(' ').nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|x| x.1.to_string())?;
    Some((status, body))
}

/// A plain HTTP/1.1 GET on loopback; returns (status, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    response(&mut s)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[cfg(unix)]
#[test]
fn serves_ingests_in_background_and_stops_cleanly_on_ctrl_c() {
    let fx = common::fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    for f in ["astronaut.png", "chelsea.png", "coffee.png"] {
        std::fs::copy(fx.join("images").join(f), photos.join(f)).unwrap();
    }
    let index = tmp.path().join("index");
    let port = free_port();
    let mut child = common::command()
        .args(["serve", "--images"])
        .arg(&photos)
        .arg("--index")
        .arg(&index)
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .arg("--model-dir")
        .arg(fx.join("tiny-a/retrieval"))
        .arg("--no-captions")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some((200, body)) = get(port, "/api/status") {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["images"] == 3 && v["ingest"]["state"] == "idle" {
                break v;
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("serve exited early ({st}): {err}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not ready in time"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["ingest"]["done"], 3);
    let (code, _) = get(port, "/api/search?q=a%20cat&rerank_k=2").unwrap();
    assert_eq!(code, 200);

    // A command refused by the server's lock says how to do the same through the server.
    let url = format!("http://127.0.0.1:{port}");
    for (args, how) in [
        (vec!["search", "a cat"], format!("{url}/api/search?q=")),
        (vec!["stats"], format!("curl {url}/api/status")),
        (
            vec!["remove", "0"],
            format!("curl -X DELETE {url}/api/images/ID"),
        ),
        (
            vec!["add", "--no-captions", photos.to_str().unwrap()],
            format!("image=@photo.jpg {url}/api/images"),
        ),
    ] {
        let out = common::command()
            .args(&args)
            .arg("--index")
            .arg(&index)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("locked by pid") && err.contains(&how),
            "{args:?}: {err}"
        );
    }

    // Ctrl-C: exit status 0, and the collection reopens with everything in it.
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let exit = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(exit.success(), "{exit}: {err}");
    assert!(err.contains("stopped"), "{err}");
    assert!(
        !index.join("SERVING").exists(),
        "the address is taken back at stop"
    );
    let c = Collection::open_existing(&index, HnswParams::default()).unwrap();
    assert_eq!(c.len().unwrap(), 3);
    let first = c.get(ImageId(0)).unwrap().unwrap();
    assert_eq!(
        c.vector_search(&first.itc, 3, None, &Filter::default())
            .unwrap()
            .len(),
        3
    );
}

/// A plain HTTP/1.1 multipart POST of one `image` field, a file named `name`, on loopback;
/// returns (status, body).
fn post_image(port: u16, path: &str, name: &str, image: &[u8]) -> Option<(u16, String)> {
    let boundary = "----blipsearchtest";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; \
         filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(image);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .ok()?;
    s.write_all(&body).ok()?;
    response(&mut s)
}

/// `VmRSS` and `VmHWM` (peak) of a process, in MiB.
#[cfg(target_os = "linux")]
fn rss_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
            / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Eight concurrent searches by a 99-megapixel 16-bit RGBA PNG (under 1 MB on the wire, 1.5 GB
/// to decode and convert) against a server whose decode budget admits one at a time: each is
/// answered 200 or 429 (never 5xx), and the server's peak RSS stays within its resident size
/// before the burst plus twice the budget (the allocator's two arenas each keep what they
/// freed; one decode usually runs in the time the others wait, which peaks at once the budget)
/// and a margin for the model's own working memory. Without the budget it passed 14 GiB.
#[cfg(target_os = "linux")]
#[test]
fn peak_memory_stays_within_the_decode_budget_under_concurrent_huge_images() {
    const BUDGET_MIB: u64 = 1600;
    let fx = common::fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = common::command()
        .arg("serve")
        .arg("--index")
        .arg(tmp.path().join("index"))
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .arg("--model-dir")
        .arg(fx.join("tiny-a/retrieval"))
        .arg("--no-captions")
        .args(["--decode-memory-mb", &BUDGET_MIB.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while get(port, "/readyz").is_none_or(|(c, _)| c != 200) {
        assert!(child.try_wait().unwrap().is_none(), "serve exited early");
        assert!(started.elapsed() < Duration::from_secs(120), "not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    // 9950 x 9950 = 99.0 MP, rows of zeros: deflate squeezes 792 MB to a few hundred KB.
    let (w, h) = (9950u32, 9950u32);
    let png_bytes = common::huge_png(w, h, png::Compression::High);
    assert!(png_bytes.len() < 1 << 20, "{}", png_bytes.len());
    let (before, _) = rss_mib(child.id());
    let png_bytes = std::sync::Arc::new(png_bytes);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let b = png_bytes.clone();
            std::thread::spawn(move || {
                post_image(port, "/api/search/image", "huge.png", &b).map(|r| r.0)
            })
        })
        .collect();
    let codes: Vec<Option<u16>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let (_, peak) = rss_mib(child.id());
    child.kill().unwrap();
    let _ = child.wait();
    eprintln!("statuses {codes:?}; RSS before {before} MiB, peak {peak} MiB");
    assert!(
        codes.iter().all(|c| matches!(c, Some(200) | Some(429))),
        "{codes:?}"
    );
    assert!(codes.contains(&Some(200)), "one at a time fits: {codes:?}");
    assert!(
        peak <= before + 2 * BUDGET_MIB + 256,
        "peak RSS {peak} MiB over {before} + 2 x {BUDGET_MIB} + 256 MiB"
    );
}

fn cli(args: &[&str]) -> serde_json::Value {
    let out = common::command()
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {err}");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Every image's id and path, by file name.
fn ids_by_name(index: &std::path::Path) -> std::collections::BTreeMap<String, (u64, String)> {
    let c = Collection::open_existing(index, HnswParams::default()).unwrap();
    let mut out = std::collections::BTreeMap::new();
    c.for_each(&mut |r| {
        let name = std::path::Path::new(&r.path)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        out.insert(name, (r.id.0, r.path));
        Ok(())
    })
    .unwrap();
    out
}

/// Days of normal use, process after process: add, serve + upload, restart, reindex, move the
/// folder, sync, remove, rescan. Ids, files and search results are checked at each step.
#[cfg(unix)]
#[test]
fn a_collection_keeps_its_promises_across_processes() {
    let fx = common::fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    for f in ["astronaut.png", "chelsea.png", "coffee.png"] {
        std::fs::copy(fx.join("images").join(f), photos.join(f)).unwrap();
    }
    let index = tmp.path().join("index");
    let idx = index.to_str().unwrap();
    let model = fx.join("tiny-a/retrieval");
    let s = cli(&[
        "add",
        "--index",
        idx,
        "--no-captions",
        "--json",
        "--model-dir",
        model.to_str().unwrap(),
        photos.to_str().unwrap(),
    ]);
    assert_eq!(s["added"], 3);
    let day1 = ids_by_name(&index);

    // Serve (the collection's models, no flags), upload, stop.
    let port = free_port();
    let mut child = serve_node(&["--index", idx], port);
    let rocket = std::fs::read(fx.join("images/rocket.jpg")).unwrap();
    let (code, body) = post_image(port, "/api/images", "rocket.jpg", &rocket).unwrap();
    assert_eq!(code, 201, "{body}");
    let uploaded: serde_json::Value = serde_json::from_str(&body).unwrap();
    let up_id = uploaded["id"].as_u64().unwrap();
    let (code, body) = get(port, "/api/search?q=rocket&mode=text&rerank_k=0").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains(&format!("\"id\":{up_id}")), "{body}");
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    assert!(child.wait().unwrap().success());

    // Restart: everything is there with the same ids; the upload's file is kept.
    let day2 = ids_by_name(&index);
    for (name, id) in &day1 {
        assert_eq!(day2[name].0, id.0, "{name}");
    }
    let upload = day2.values().find(|v| v.0 == up_id).unwrap().1.clone();
    assert!(std::path::Path::new(&upload).exists());

    // Reindex (the collection's models again): ids, and the uploaded file, survive.
    let s = cli(&["reindex", "--index", idx, "--no-captions", "--json"]);
    assert_eq!(s["total"], 4, "{s}");
    let day3 = ids_by_name(&index);
    assert_eq!(day3, day2);
    assert!(std::path::Path::new(&upload).exists());

    // The folder moves: sync of the new place keeps every id.
    let moved = tmp.path().join("photos2");
    std::fs::rename(&photos, &moved).unwrap();
    let s = cli(&[
        "sync",
        "--index",
        idx,
        "--no-captions",
        "--json",
        moved.to_str().unwrap(),
    ]);
    assert_eq!(
        (s["moved"].as_u64(), s["added"].as_u64()),
        (Some(3), Some(0)),
        "{s}"
    );
    let day4 = ids_by_name(&index);
    for (name, id) in &day1 {
        assert_eq!(day4[name].0, id.0, "{name}");
        assert!(
            std::path::Path::new(&day4[name].1).starts_with(std::fs::canonicalize(&moved).unwrap())
        );
    }

    // Remove one: it stays removed through a rescan, and its file stays on disk.
    let cat_id = day4["chelsea.png"].0;
    let cat = cat_id.to_string();
    cli(&["remove", "--index", idx, &cat]);
    let s = cli(&[
        "sync",
        "--index",
        idx,
        "--no-captions",
        "--json",
        moved.to_str().unwrap(),
    ]);
    assert_eq!(
        (s["excluded"].as_u64(), s["total"].as_u64()),
        (Some(1), Some(3)),
        "{s}"
    );
    assert!(moved.join("chelsea.png").exists());
    let v = cli(&[
        "search",
        "--index",
        idx,
        "cat",
        "--mode",
        "text",
        "--rerank-k",
        "0",
        "--json",
    ]);
    let hits = v["hits"].as_array().unwrap();
    assert!(hits.iter().all(|h| h["id"] != cat_id), "{v}");
}

/// A `serve --no-captions` process with the collection's models and `args` (where the
/// collection is) on `port`; returns once it is ready.
fn serve_node(args: &[&str], port: u16) -> std::process::Child {
    let mut child = common::command()
        .args(["serve", "--no-captions"])
        .args(args)
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while get(port, "/readyz").is_none_or(|r| r.0 != 200) {
        assert!(child.try_wait().unwrap().is_none(), "serve exited early");
        assert!(started.elapsed() < Duration::from_secs(120), "not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

/// The status of a plain GET on loopback whose body may be binary.
fn status_of(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let head = String::from_utf8_lossy(&raw[..raw.len().min(64)]).into_owned();
    head.split(' ').nth(1)?.parse().ok()
}

/// Waits (up to `limit`) until `GET path` on `port` answers 200; returns the body.
fn until_ok(port: u16, path: &str, limit: Duration) -> String {
    let started = Instant::now();
    loop {
        match get(port, path) {
            Some((200, body)) => return body,
            other => assert!(
                started.elapsed() < limit,
                "GET {path} on {port}: still {other:?} after {limit:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stateless serve nodes: two `serve` processes on one Milvus collection and one blob folder.
/// An upload through one is found through the other within two seconds; the same bytes
/// uploaded through both are one image; the CLI works on the collection while both serve; when
/// Milvus goes down, requests answer 503 (and /readyz too) and work again once it is back; a
/// reindex keeps every id.
#[cfg(unix)]
#[test]
fn serve_nodes_share_one_milvus_collection() {
    let mut milvus = common::milvus::MilvusLite::start();
    let store = milvus.address("shared");
    let fx = common::fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    for f in ["astronaut.png", "coffee.png"] {
        std::fs::copy(fx.join("images").join(f), photos.join(f)).unwrap();
    }
    let index = tmp.path().join("shared-blobs");
    let idx = index.to_str().unwrap();
    let model = fx.join("tiny-a/retrieval");
    let s = cli(&[
        "add",
        "--store",
        &store,
        "--index",
        idx,
        "--no-captions",
        "--json",
        "--model-dir",
        model.to_str().unwrap(),
        photos.to_str().unwrap(),
    ]);
    assert_eq!(s["added"], 2, "{s}");

    let (pa, pb) = (free_port(), free_port());
    let mut a = serve_node(&["--index", idx, "--store", &store], pa);
    let mut b = serve_node(&["--index", idx, "--store", &store], pb);

    let rocket = std::fs::read(fx.join("images/rocket.jpg")).unwrap();
    let (code, body) = post_image(pa, "/api/images", "rocket.jpg", &rocket).unwrap();
    assert_eq!(code, 201, "{body}");
    let up: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = up["id"].as_u64().unwrap();
    let found = until_ok(
        pb,
        "/api/search?q=rocket&mode=text&rerank_k=0",
        Duration::from_secs(2),
    );
    assert!(found.contains(&format!("\"id\":{id}")), "{found}");
    // Its thumbnail, written by the other node, is in the shared blob folder.
    assert_eq!(
        status_of(pb, &format!("/api/images/{id}/thumbnail")),
        Some(200)
    );
    // The same bytes through the other node: the same image.
    let (code, body) = post_image(pb, "/api/images", "again.jpg", &rocket).unwrap();
    assert_eq!(code, 200, "{body}");
    let again: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (again["id"].as_u64(), again["duplicate"].as_bool()),
        (Some(id), Some(true))
    );
    // The CLI needs no lock while both serve.
    let st = cli(&["stats", "--store", &store, "--index", idx, "--json"]);
    assert_eq!(st["stats"]["images"], 3, "{st}");

    // Milvus goes down: 503 with a message, not a crash; back up: answers again.
    milvus.kill();
    let (code, body) = get(pa, "/api/search?q=rocket&mode=text&rerank_k=0").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("unavailable") && body.contains("Milvus"),
        "{body}"
    );
    assert_eq!(get(pb, "/readyz").unwrap().0, 503);
    milvus.restart();
    for port in [pa, pb] {
        let back = until_ok(
            port,
            "/api/search?q=rocket&mode=text&rerank_k=0",
            Duration::from_secs(30),
        );
        assert!(back.contains(&format!("\"id\":{id}")), "{back}");
    }
    for child in [&mut a, &mut b] {
        // SAFETY: plain kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
        assert!(child.wait().unwrap().success());
    }

    // Reindex into a new Milvus collection that replaces the old: every id stays.
    let ids = |v: &serde_json::Value| -> std::collections::BTreeSet<u64> {
        v["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["id"].as_u64().unwrap())
            .collect()
    };
    let search = || {
        cli(&[
            "search",
            "--store",
            &store,
            "--index",
            idx,
            "a",
            "--mode",
            "vector",
            "--rerank-k",
            "0",
            "--json",
        ])
    };
    let before = ids(&search());
    assert_eq!(before.len(), 3);
    let s = cli(&[
        "reindex",
        "--store",
        &store,
        "--index",
        idx,
        "--no-captions",
        "--json",
    ]);
    assert_eq!(s["total"], 3, "{s}");
    assert_eq!(ids(&search()), before);
    let p = free_port();
    let mut c = serve_node(&["--index", idx, "--store", &store], p);
    assert_eq!(
        status_of(p, &format!("/api/images/{id}/thumbnail")),
        Some(200)
    );
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(c.id() as i32, libc::SIGINT) }, 0);
    assert!(c.wait().unwrap().success());
}
