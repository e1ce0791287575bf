//! The audit log: append-only JSON lines beside the collection, one per moderation event (list
//! changes, matches, decisions, deletions), each written and fsynced before the call returns.
//! Nothing rewrites it; a line cut short by a crash is skipped when reading.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::Result;

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
    /// `decision`, `delete`.
    pub action: String,
    /// The event's particulars (list, entry, image id, distances, note, ...).
    #[serde(flatten)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// The log file of a collection.
pub struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    /// The log at `path` (created on the first append).
    pub fn open(path: &Path) -> Result<Self> {
        let _ = path;
        todo!("audit log")
    }

    /// Appends one event and fsyncs it before returning; gives the entry as read back.
    pub fn append(
        &self,
        actor: &str,
        action: &str,
        details: serde_json::Map<String, serde_json::Value>,
    ) -> Result<AuditEntry> {
        let _ = (actor, action, details);
        todo!("audit log")
    }

    /// Up to `limit` events with `seq` above `after`, oldest first.
    pub fn read(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let _ = (after, limit, &self.path);
        todo!("audit log")
    }
}
