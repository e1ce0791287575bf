//! `blipsearch serve` as a process: it serves at once, indexes its folder in the background,
//! and stops cleanly on Ctrl-C (SIGINT) with everything committed.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blipsearch::index::{Collection, HnswParams};

/// A plain HTTP/1.1 GET on loopback; returns (status, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split(' ').nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|x| x.1.to_string())?;
    Some((status, body))
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_blipsearch"))
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
    let c = Collection::open_existing(&index, HnswParams::default()).unwrap();
    assert_eq!(c.len().unwrap(), 3);
    assert_eq!(
        c.search_vectors(&c.iter().next().unwrap().unwrap().itc, 3, None, None)
            .unwrap()
            .len(),
        3
    );
}
