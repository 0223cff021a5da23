//! The registry on disk, so a router started while the API server is unreachable routes from
//! what it last knew. Written atomically (a temporary file in the same directory, synced, then
//! renamed over the old one) and at most once per [`DEBOUNCE`] however often the registry
//! changes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use servicekeel_api::tunnel::FlowTarget;
use tokio::sync::{Notify, watch};

use crate::registry::{Endpoint, Entry};

/// Version of the file format; another is refused (the router then starts empty).
pub const FORMAT: u32 = 1;
/// Quiet time after a change before the snapshot is written.
pub const DEBOUNCE: Duration = Duration::from_millis(500);
/// File name inside the state directory.
pub const FILE_NAME: &str = servicekeel_api::defaults::ROUTER_SNAPSHOT_FILE;

#[derive(Debug, Serialize, Deserialize)]
struct File {
    format: u32,
    /// Seconds since the Unix epoch when it was written.
    saved: u64,
    entries: Vec<FileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    /// `name.namespace.cluster:port/PROTOCOL`.
    target: String,
    #[serde(flatten)]
    endpoint: Endpoint,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot write {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// Writes `entries` to `path` atomically.
pub fn save(path: &Path, entries: &[Entry], now: SystemTime) -> Result<(), SnapshotError> {
    let write_error = |cause| SnapshotError::Write {
        path: path.to_owned(),
        cause,
    };
    let file = File {
        format: FORMAT,
        saved: now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        entries: entries
            .iter()
            .map(|(target, endpoint)| FileEntry {
                target: target.to_string(),
                endpoint: endpoint.clone(),
            })
            .collect(),
    };
    let text =
        serde_json::to_vec_pretty(&file).map_err(|e| write_error(std::io::Error::other(e)))?;
    let temporary = path.with_extension("json.tmp");
    let mut out = std::fs::File::create(&temporary).map_err(write_error)?;
    out.write_all(&text).map_err(write_error)?;
    out.sync_all().map_err(write_error)?;
    std::fs::rename(&temporary, path).map_err(write_error)
}

/// Reads a snapshot: its entries and when it was written.
pub fn load(path: &Path) -> Result<(Vec<Entry>, SystemTime), SnapshotError> {
    let invalid = |message: String| SnapshotError::Invalid {
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|cause| SnapshotError::Read {
        path: path.to_owned(),
        cause,
    })?;
    let file: File = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if file.format != FORMAT {
        return Err(invalid(format!("format {} is not {FORMAT}", file.format)));
    }
    let mut entries = Vec::with_capacity(file.entries.len());
    for (index, entry) in file.entries.into_iter().enumerate() {
        let target: FlowTarget = entry
            .target
            .parse()
            .map_err(|e| invalid(format!("entries[{index}]: {e}")))?;
        entries.push((target, entry.endpoint));
    }
    Ok((entries, UNIX_EPOCH + Duration::from_secs(file.saved)))
}

/// Writes the snapshot after changes: `changed` is notified on every change, `entries` gives
/// the current content; the time of the last successful write is published on `saved`.
pub async fn keep(
    path: PathBuf,
    changed: Arc<Notify>,
    entries: impl Fn() -> Vec<Entry> + Send + 'static,
    saved: watch::Sender<Option<SystemTime>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = changed.notified() => {}
            _ = crate::shutdown::stopped(&mut stop) => return,
        }
        // Let a burst of changes settle, then write once.
        tokio::time::sleep(DEBOUNCE).await;
        let now = SystemTime::now();
        match save(&path, &entries(), now) {
            Ok(()) => {
                saved.send_replace(Some(now));
            }
            Err(error) => tracing::warn!(%error, "registry snapshot not written"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use servicekeel_api::Protocol;

    fn entries() -> Vec<Entry> {
        vec![
            (
                FlowTarget::new("web", "default", "cluster-a.local", 80, Protocol::Tcp),
                Endpoint {
                    addr: "10.244.1.7:8080".parse().unwrap(),
                    node: "edge-1".into(),
                    ready: true,
                },
            ),
            (
                FlowTarget::new("dns", "kube-system", "cluster-a.local", 53, Protocol::Udp),
                Endpoint {
                    addr: "[fd00::7]:53".parse().unwrap(),
                    node: String::new(),
                    ready: false,
                },
            ),
        ]
    }

    #[test]
    fn round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let when = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        save(&path, &entries(), when).unwrap();
        let (loaded, saved) = load(&path).unwrap();
        assert_eq!(loaded, entries());
        assert_eq!(saved, when);
        save(&path, &entries()[..1], when).unwrap();
        assert_eq!(load(&path).unwrap().0.len(), 1, "replaced whole");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME], "no temporary left behind");
    }

    #[test]
    fn bad_files_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        assert!(
            load(&path)
                .unwrap_err()
                .to_string()
                .starts_with("cannot read")
        );
        for (text, expected) in [
            ("{", "EOF"),
            (
                r#"{"format":2,"saved":0,"entries":[]}"#,
                "format 2 is not 1",
            ),
            (
                r#"{"format":1,"saved":0,"entries":[{"target":"x:1/TCP","addr":"10.0.0.1:1","node":"","ready":true}]}"#,
                "entries[0]: flow target",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let error = load(&path).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
    }
}
