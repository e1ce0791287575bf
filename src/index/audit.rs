//! The audit log: append-only JSON lines beside the collection, one per moderation event (list
//! changes, matches, decisions, deletions), each written and fsynced before the call returns.
//! Nothing rewrites it; a line cut short by a crash is skipped when reading.
//!
//! Several processes may append to one log (a Milvus store shares the collection directory):
//! each append takes an exclusive OS advisory lock on the file for the one `write` of its lines,
//! so lines never interleave. A line's `seq` is its line number, counted when reading: lines are
//! never removed or reordered, so a `seq` names the same event for ever. A line left without its
//! end by a crash is not counted until the next append ends it; it then counts as a line that
//! does not parse, and is skipped.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{IndexError, Result};
use super::fsutil;

/// The name of the log file in a collection directory.
pub const AUDIT_FILE: &str = "audit.jsonl";

/// Keys every line has, which an event's details cannot use.
const RESERVED: [&str; 4] = ["seq", "time", "actor", "action"];

/// One event of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its line number in the log, from 1: stable, since the log only grows.
    #[serde(default)]
    pub seq: u64,
    /// When, RFC 3339 in UTC.
    pub time: String,
    /// Who: a key id (`key:` and 8 hex digits of the key's SHA-256), or `cli`.
    pub actor: String,
    /// What happened: `list_create`, `list_delete`, `entries_add`, `entry_remove`, `match`,
    /// `unflag` (flags dropped with their list), `decision`, `delete`.
    pub action: String,
    /// The event's particulars (list, entry, image id, distances, note, ...).
    #[serde(flatten)]
    pub details: Map<String, Value>,
}

/// An event to append: what happened and its particulars.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// See [`AuditEntry::action`].
    pub action: String,
    /// See [`AuditEntry::details`]; none of `seq`, `time`, `actor`, `action`.
    pub details: Map<String, Value>,
}

impl AuditEvent {
    /// An event of `action` with `details`.
    pub fn new(action: &str, details: Map<String, Value>) -> Self {
        Self {
            action: action.to_string(),
            details,
        }
    }
}

/// How far this handle has counted the file: bytes, and the complete lines in them.
#[derive(Debug, Default, Clone, Copy)]
struct Counted {
    bytes: u64,
    lines: u64,
}

/// The log file of a collection.
pub struct AuditLog {
    path: PathBuf,
    /// Appends of this process one at a time; the file lock orders them with other processes'.
    counted: Mutex<Counted>,
}

impl AuditLog {
    /// The log at `path` (created on the first append).
    pub fn open(path: &Path) -> Result<Self> {
        if path.exists() && !path.is_file() {
            return Err(IndexError::Corrupt {
                path: path.to_path_buf(),
                reason: "the audit log is not a file".into(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            counted: Mutex::new(Counted::default()),
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event and fsyncs it before returning; gives the entry as read back.
    pub fn append(
        &self,
        actor: &str,
        action: &str,
        details: Map<String, Value>,
    ) -> Result<AuditEntry> {
        let mut out = self.append_all(actor, vec![AuditEvent::new(action, details)])?;
        out.pop()
            .ok_or_else(|| IndexError::InvalidParams("nothing was appended".into()))
    }

    /// Appends `events` of one actor, in order, in one write, and fsyncs them before returning
    /// (a crash keeps all of them or a prefix, the last one perhaps cut short); gives the
    /// entries as read back.
    pub fn append_all(&self, actor: &str, events: Vec<AuditEvent>) -> Result<Vec<AuditEntry>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        if actor.is_empty() || actor.contains(['\n', '\r']) {
            return Err(IndexError::InvalidParams(format!(
                "audit actor {actor:?}: one line of text"
            )));
        }
        let time = rfc3339_now();
        let mut entries = Vec::with_capacity(events.len());
        let mut text = String::new();
        for e in events {
            if let Some(k) = RESERVED.iter().find(|k| e.details.contains_key(**k)) {
                return Err(IndexError::InvalidParams(format!(
                    "audit details cannot set {k:?}"
                )));
            }
            let mut line = Map::new();
            line.insert("time".into(), Value::String(time.clone()));
            line.insert("actor".into(), Value::String(actor.to_string()));
            line.insert("action".into(), Value::String(e.action.clone()));
            line.extend(e.details.clone());
            // serde_json escapes control characters: one event is one line.
            text.push_str(&serde_json::to_string(&Value::Object(line))?);
            text.push('\n');
            entries.push(AuditEntry {
                seq: 0,
                time: time.clone(),
                actor: actor.to_string(),
                action: e.action,
                details: e.details,
            });
        }

        let mut counted = self
            .counted
            .lock()
            .map_err(|_| IndexError::InvalidParams("the audit log's lock is poisoned".into()))?;
        let created = !self.path.exists();
        let mut file = fs_err::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&self.path)?
            .into_parts()
            .0;
        file.lock()
            .map_err(|e| fsutil::fs_err_io(e, "lock", &self.path))?;
        // Held until `file` is dropped (closing the file releases the lock).
        let len = file.metadata()?.len();
        if len < counted.bytes {
            // Not the file counted before (replaced by hand): count it all again.
            *counted = Counted::default();
        }
        let (lines, torn) = count_lines(&mut file, counted.bytes, len, &self.path)?;
        let mut before = counted.lines + lines;
        if torn {
            // The last line lost its end in a crash: end it, so that it stays one bad line
            // instead of swallowing the first of ours.
            text.insert(0, '\n');
            before += 1;
        }
        file.write_all(text.as_bytes())
            .map_err(|e| fsutil::fs_err_io(e, "append to", &self.path))?;
        file.sync_data()
            .map_err(|e| fsutil::fs_err_io(e, "fsync", &self.path))?;
        if created {
            fsutil::sync_dir(fsutil::parent(&self.path))?;
        }
        *counted = Counted {
            bytes: len + text.len() as u64,
            lines: before + entries.len() as u64,
        };
        for (i, e) in entries.iter_mut().enumerate() {
            e.seq = before + 1 + i as u64;
        }
        Ok(entries)
    }

    /// Up to `limit` events with `seq` above `after`, oldest first.
    pub fn read(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(fsutil::fs_err_io(e, "open", &self.path)),
        };
        let mut reader = BufReader::with_capacity(1 << 16, file);
        let mut out = Vec::new();
        let mut seq = 0u64;
        let mut line = Vec::new();
        while out.len() < limit {
            if seq < after {
                // Lines before the wanted ones are only counted.
                let buf = reader
                    .fill_buf()
                    .map_err(|e| fsutil::fs_err_io(e, "read", &self.path))?;
                if buf.is_empty() {
                    break;
                }
                let want = (after - seq) as usize;
                let mut used = buf.len();
                let mut found = 0usize;
                for (i, &b) in buf.iter().enumerate() {
                    if b == b'\n' {
                        found += 1;
                        if found == want {
                            used = i + 1;
                            break;
                        }
                    }
                }
                seq += found as u64;
                reader.consume(used);
                continue;
            }
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| fsutil::fs_err_io(e, "read", &self.path))?;
            if n == 0 || line.last() != Some(&b'\n') {
                break; // the end, or a last line without its end: not a line yet
            }
            seq += 1;
            match serde_json::from_slice::<AuditEntry>(&line) {
                Ok(mut e) => {
                    e.seq = seq;
                    out.push(e);
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), seq, %e, "skipping a bad line of the audit log");
                }
            }
        }
        Ok(out)
    }
}

/// Newlines in `file` between byte `from` and `to`, and whether the byte before `to` is not one
/// (a last line without its end).
fn count_lines(file: &mut File, from: u64, to: u64, path: &Path) -> Result<(u64, bool)> {
    if to == 0 {
        return Ok((0, false));
    }
    let io = |e| fsutil::fs_err_io(e, "read", path);
    file.seek(SeekFrom::Start(from)).map_err(io)?;
    let mut reader = (&*file).take(to - from);
    let mut buf = vec![0u8; 1 << 16];
    let mut lines = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(to - 1)).map_err(io)?;
    file.read_exact(&mut last).map_err(io)?;
    Ok((lines, last[0] != b'\n'))
}

/// Now, as `2024-05-01T12:34:56.789Z`.
fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_millis())
}

/// `unix` seconds and `millis` as RFC 3339 in UTC.
fn rfc3339(unix: i64, millis: u32) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn details(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_714_566_896, 789), "2024-05-01T12:34:56.789Z");
        assert_eq!(rfc3339(4_102_444_799, 999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn appends_read_back_in_order_with_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_FILE);
        let log = AuditLog::open(&path).unwrap();
        assert!(log.read(0, 10).unwrap().is_empty(), "no file yet");
        let a = log
            .append("cli", "list_create", details(json!({"list": "bank"})))
            .unwrap();
        assert_eq!(a.seq, 1);
        let more = log
            .append_all(
                "key:0badf00d",
                vec![
                    AuditEvent::new("match", details(json!({"id": 3, "list": "bank"}))),
                    AuditEvent::new("match", details(json!({"id": 4, "note": "two\nlines"}))),
                ],
            )
            .unwrap();
        assert_eq!(more.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
        // Another handle (another process) continues the numbering.
        let other = AuditLog::open(&path).unwrap();
        assert_eq!(other.append("cli", "decision", Map::new()).unwrap().seq, 4);
        assert_eq!(log.append("cli", "delete", Map::new()).unwrap().seq, 5);

        let all = log.read(0, 100).unwrap();
        assert_eq!(all.len(), 5);
        assert_eq!(all[0], a);
        assert_eq!(&all[1..3], &more[..]);
        assert_eq!(all[2].details["note"], "two\nlines");
        assert_eq!(all[4].action, "delete");
        assert_eq!(log.read(2, 2).unwrap(), all[2..4].to_vec());
        assert_eq!(log.read(4, 100).unwrap(), all[4..].to_vec());
        assert!(log.read(5, 100).unwrap().is_empty());
        assert!(log.read(0, 0).unwrap().is_empty());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().lines().count(),
            5,
            "one line per event"
        );
    }

    #[test]
    fn reserved_keys_and_bad_actors_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(&dir.path().join(AUDIT_FILE)).unwrap();
        assert!(log.append("cli", "x", details(json!({"seq": 9}))).is_err());
        assert!(log.append("", "x", Map::new()).is_err());
        assert!(log.append("a\nb", "x", Map::new()).is_err());
        assert!(log.read(0, 10).unwrap().is_empty(), "nothing written");
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_ended_by_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_FILE);
        let log = AuditLog::open(&path).unwrap();
        log.append("cli", "list_create", Map::new()).unwrap();
        // A crash in the middle of the second line.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(br#"{"time":"2024-01-01T00:00:00.000Z","act"#)
            .unwrap();
        drop(f);
        let read = log.read(0, 10).unwrap();
        assert_eq!(read.len(), 1, "the torn line is not an entry");
        let next = AuditLog::open(&path)
            .unwrap()
            .append("cli", "decision", Map::new())
            .unwrap();
        assert_eq!(next.seq, 3, "the torn line keeps its number");
        let read = log.read(0, 10).unwrap();
        assert_eq!(
            read.iter()
                .map(|e| (e.seq, e.action.as_str()))
                .collect::<Vec<_>>(),
            [(1, "list_create"), (3, "decision")]
        );
        // This handle counted the file before the tear: it counts on from there.
        assert_eq!(log.append("cli", "delete", Map::new()).unwrap().seq, 4);
        assert_eq!(log.read(3, 10).unwrap().len(), 1);
    }

    #[test]
    fn appends_from_threads_never_interleave() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_FILE);
        std::thread::scope(|s| {
            for t in 0..4 {
                let path = &path;
                s.spawn(move || {
                    // One handle per thread, as separate processes would have.
                    let log = AuditLog::open(path).unwrap();
                    for i in 0..25 {
                        log.append(
                            "cli",
                            "match",
                            details(json!({"t": t, "i": i, "pad": "x".repeat(3000)})),
                        )
                        .unwrap();
                    }
                });
            }
        });
        let all = AuditLog::open(&path).unwrap().read(0, 1000).unwrap();
        assert_eq!(all.len(), 100);
        assert!(all.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1));
        for t in 0..4 {
            let mine: Vec<u64> = all
                .iter()
                .filter(|e| e.details["t"] == t)
                .map(|e| e.details["i"].as_u64().unwrap())
                .collect();
            assert_eq!(mine, (0..25).collect::<Vec<_>>(), "thread {t} in order");
        }
    }
}
