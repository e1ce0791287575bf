//! Renders the engine's ingest events: a progress bar on a terminal; without one (piped, logged,
//! under a service manager) a line every few seconds with count, rate and ETA. Commits print a
//! stable line either way: what they report is durable and searchable.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::engine::{IngestEvent, IngestObserver};

/// Time between progress lines when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// Draws ingest progress on stderr.
pub struct ProgressRenderer {
    bar: Option<ProgressBar>,
    lines: Mutex<Lines>,
}

#[derive(Default)]
struct Lines {
    total: u64,
    done: u64,
    started: Option<Instant>,
    last: Option<Instant>,
}

impl ProgressRenderer {
    /// A bar when stderr is a terminal, lines otherwise.
    pub fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} images ({per_sec}, ETA {eta}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        Self {
            bar,
            lines: Mutex::new(Lines::default()),
        }
    }

    fn line(&self, force: bool) {
        let Ok(mut l) = self.lines.lock() else {
            return;
        };
        let now = Instant::now();
        if !force && l.last.is_some_and(|t| now - t < LINE_EVERY) {
            return;
        }
        l.last = Some(now);
        let secs = l.started.map_or(0.0, |s| (now - s).as_secs_f64());
        let rate = if secs > 0.0 {
            l.done as f64 / secs
        } else {
            0.0
        };
        let eta = if rate > 0.0 && l.total > l.done {
            format!(", ETA {}", hms(((l.total - l.done) as f64 / rate) as u64))
        } else {
            String::new()
        };
        eprintln!(
            "progress: {}/{} files ({rate:.1}/s, {} elapsed{eta})",
            l.done,
            l.total,
            hms(secs as u64)
        );
    }
}

impl Default for ProgressRenderer {
    fn default() -> Self {
        Self::new()
    }
}

fn hms(s: u64) -> String {
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

impl IngestObserver for ProgressRenderer {
    fn event(&self, event: IngestEvent<'_>) {
        match event {
            IngestEvent::Started { total } => {
                if let Some(bar) = &self.bar {
                    bar.set_length(total);
                    bar.set_position(0);
                    bar.reset_eta();
                }
                if let Ok(mut l) = self.lines.lock() {
                    *l = Lines {
                        total,
                        started: Some(Instant::now()),
                        last: Some(Instant::now()),
                        ..Lines::default()
                    };
                }
            }
            IngestEvent::Reading { path } => {
                if let Some(bar) = &self.bar {
                    bar.set_message(
                        path.file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    );
                }
            }
            IngestEvent::Done { files } => {
                if let Some(bar) = &self.bar {
                    bar.inc(files);
                } else {
                    if let Ok(mut l) = self.lines.lock() {
                        l.done += files;
                    }
                    self.line(false);
                }
            }
            IngestEvent::Failed { .. } => {}
            IngestEvent::Committed { images } => {
                let say = || eprintln!("committed: {images} images in the collection");
                match &self.bar {
                    Some(bar) => bar.suspend(say),
                    None => say(),
                }
            }
            IngestEvent::Finished => match &self.bar {
                Some(bar) => bar.finish_and_clear(),
                None => self.line(true),
            },
        }
    }
}
