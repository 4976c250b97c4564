//! One file-change detector for the files the kubelet mounts: the proxy config and the trust
//! roots.
//!
//! The kubelet updates a ConfigMap volume by writing a new timestamped directory and renaming
//! the `..data` symlink onto it, so a file (a symlink through `..data`) changes in one step.
//! [`FileWatch::poll`] resolves the path and compares the target's identity (resolved path,
//! inode, length, modification time); only when that changes, or while the last attempt failed,
//! does it read the file, and only when the bytes' SHA-256 differs from the last attempt does it
//! hand them over to be parsed. Polling needs no inotify instance per pod, follows the symlink
//! swap without special cases, and also catches editors that rewrite in place.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::config::sha256_hex;

/// What identifies one version of a file on disk without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileIdentity {
    resolved: PathBuf,
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

fn file_identity(path: &Path) -> std::io::Result<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    let resolved = std::fs::canonicalize(path)?;
    let meta = std::fs::metadata(&resolved)?;
    Ok(FileIdentity {
        resolved,
        inode: meta.ino(),
        len: meta.len(),
        modified: meta.modified().ok(),
    })
}

/// What one [`FileWatch::poll`] found.
#[derive(Debug)]
pub(crate) enum Poll {
    /// Nothing to do: the same file, the same bytes as the last attempt, the same read error
    /// again, or a file still missing.
    Unchanged,
    /// The file has just gone missing (said once until it appears again).
    Missing,
    /// Reading failed with an error other than the last one.
    ReadFailed(std::io::Error),
    /// New bytes: parse them, then say how that went with [`FileWatch::attempted`].
    Changed(Vec<u8>),
}

/// Tracks one file between polls.
#[derive(Debug)]
pub(crate) struct FileWatch {
    path: PathBuf,
    seen: Option<FileIdentity>,
    /// The SHA-256 of the bytes last handed over, or the text of the last read error (so the
    /// same failure is reported once).
    last_attempt: Option<String>,
    last_failed: bool,
    missing_said: bool,
}

impl FileWatch {
    /// A detector of `path`, which has not been seen yet.
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            seen: None,
            last_attempt: None,
            last_failed: false,
            missing_said: false,
        }
    }

    /// The file watched.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Looks at the file once.
    pub(crate) fn poll(&mut self) -> Poll {
        let id = match file_identity(&self.path) {
            Ok(id) => id,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.seen = None;
                if self.missing_said {
                    return Poll::Unchanged;
                }
                self.missing_said = true;
                return Poll::Missing;
            }
            Err(source) => return self.fail_read(source),
        };
        self.missing_said = false;
        if self.seen.as_ref() == Some(&id) && !self.last_failed {
            return Poll::Unchanged;
        }
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Poll::Unchanged,
            Err(source) => return self.fail_read(source),
        };
        self.seen = Some(id);
        let hash = sha256_hex(&bytes);
        if self.last_attempt.as_deref() == Some(hash.as_str()) {
            return Poll::Unchanged;
        }
        self.last_attempt = Some(hash);
        Poll::Changed(bytes)
    }

    /// Whether the bytes of the last [`Poll::Changed`] were applied; while they were not, the
    /// next poll reads the file again.
    pub(crate) fn attempted(&mut self, ok: bool) {
        self.last_failed = !ok;
    }

    fn fail_read(&mut self, source: std::io::Error) -> Poll {
        self.last_failed = true;
        let message = source.to_string();
        if self.last_attempt.as_deref() == Some(message.as_str()) {
            return Poll::Unchanged;
        }
        self.last_attempt = Some(message);
        Poll::ReadFailed(source)
    }
}

/// Calls `check` every `interval`, forever (a tick missed while busy is delayed, not bunched).
pub(crate) async fn every(interval: Duration, mut check: impl FnMut()) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        check();
    }
}
