//! Renders progress events (of ingest, training, evaluation): a progress bar on a terminal; without one (piped, logged,
//! under a service manager) a line every few seconds with count, rate and ETA. Commits print a
//! stable line either way: what they report is durable and searchable.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::progress::{Event, Progress};

/// Time between progress lines when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// Draws progress on stderr.
pub struct ProgressRenderer {
    bar: Option<ProgressBar>,
    lines: Mutex<Lines>,
}

#[derive(Default)]
struct Lines {
    what: String,
    total: u64,
    done: u64,
    /// Done in this run (the rate's numerator: a resumed run starts part done).
    run: u64,
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
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {prefix} ({per_sec}, ETA {eta}) {msg}",
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
            "progress: {}/{} {} ({rate:.1}/s, {} elapsed{eta})",
            l.done,
            l.total,
            l.what,
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

impl Progress for ProgressRenderer {
    fn event(&self, event: Event<'_>) {
        match event {
            Event::Started { what, total, done } => {
                if let Some(bar) = &self.bar {
                    bar.reset();
                    bar.set_prefix(what.to_string());
                    bar.set_length(total);
                    bar.set_position(done);
                }
                if let Ok(mut l) = self.lines.lock() {
                    *l = Lines {
                        what: what.to_string(),
                        total,
                        done,
                        started: Some(Instant::now()),
                        last: Some(Instant::now()),
                        ..Lines::default()
                    };
                }
            }
            Event::Working { item } => {
                if let Some(bar) = &self.bar {
                    // A path shows as its file name.
                    bar.set_message(item.rsplit(['/', '\\']).next().unwrap_or(item).to_string());
                }
            }
            Event::Done { n } => {
                if let Some(bar) = &self.bar {
                    bar.inc(n);
                } else {
                    if let Ok(mut l) = self.lines.lock() {
                        l.done += n;
                        l.run += n;
                    }
                    self.line(false);
                }
            }
            Event::Failed { .. } => {}
            Event::Note { line } => match &self.bar {
                Some(bar) => bar.suspend(|| eprintln!("{line}")),
                None => eprintln!("{line}"),
            },
            Event::Finished => match &self.bar {
                Some(bar) => bar.finish_and_clear(),
                None => self.line(true),
            },
        }
    }
}
