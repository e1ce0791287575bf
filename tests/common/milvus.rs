//! A Milvus Lite server for the tests: `milvus-lite server` from the virtual environment that
//! `tests/milvus/install.sh` makes (or the binary `BLIPSEARCH_MILVUS_LITE` names), on a free
//! loopback port, its data in a temporary folder. Killed when dropped.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Milvus Lite server.
pub struct MilvusLite {
    child: Option<Child>,
    /// Its gRPC port on 127.0.0.1.
    pub port: u16,
    data: tempfile::TempDir,
}

fn binary() -> PathBuf {
    let path = std::env::var_os("BLIPSEARCH_MILVUS_LITE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/milvus-venv/bin/milvus-lite")
        });
    assert!(
        path.exists(),
        "the Milvus tests need Milvus Lite at {}: run tests/milvus/install.sh (as .ci/run does), \
         or set BLIPSEARCH_MILVUS_LITE to a milvus-lite binary",
        path.display()
    );
    path
}

impl MilvusLite {
    /// Starts a server on a new, empty data folder and waits until it accepts connections.
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut m = Self {
            child: None,
            port,
            data: tempfile::tempdir().unwrap(),
        };
        m.restart();
        m
    }

    /// `milvus://127.0.0.1:PORT/COLLECTION`.
    pub fn address(&self, collection: &str) -> String {
        format!("milvus://127.0.0.1:{}/{collection}", self.port)
    }

    /// Kills the server with SIGKILL (no chance to flush anything) and waits for it to go.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and data, once the last one is gone.
    pub fn restart(&mut self) {
        self.kill();
        let log = std::fs::File::create(self.data.path().join("server.log")).unwrap();
        let child = Command::new(binary())
            .arg("server")
            .arg("--data-dir")
            .arg(self.data.path().join("data"))
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start milvus-lite");
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = std::fs::read_to_string(self.data.path().join("server.log"));
                panic!("milvus-lite exited ({status}): {}", log.unwrap_or_default());
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "milvus-lite did not listen on port {} within 90 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for MilvusLite {
    fn drop(&mut self) {
        self.kill();
    }
}
