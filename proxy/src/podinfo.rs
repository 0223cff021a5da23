//! The pod's imported and exported services, from the downward-API annotations file.
//!
//! The kubelet updates that file by writing a new timestamped directory and swapping the
//! `..data` symlink to it, so a watch on the file's inode never fires. [`Watcher::poll`] instead
//! re-reads the path (which follows the symlinks to the current content) and reports a change
//! only when the bytes differ. A new value that does not parse or validate is reported as an
//! error and the last good set stays in force.

use std::path::{Path, PathBuf};

use servicekeel_api::keys::Direction;
use servicekeel_api::podinfo::{PodInfoError, parse_annotations};
use servicekeel_api::{FieldError, ParseError, ServiceKey, ServiceList};

/// Whom the relative entries (no namespace, no cluster) refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    pub namespace: String,
    pub cluster: String,
}

/// The services this pod imports and exports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodServices {
    pub imported: ServiceList,
    pub exported: ServiceList,
}

impl PodServices {
    /// The imported services' identities, namespace and cluster filled in.
    pub fn imported_keys(&self, home: &Home) -> Vec<ServiceKey> {
        self.imported
            .services
            .iter()
            .map(|s| s.key(&home.namespace, &home.cluster))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {cause}")]
    Format { path: PathBuf, cause: PodInfoError },
    #[error("{key}: {cause}")]
    Services {
        key: &'static str,
        cause: ParseError,
    },
    #[error("{key}: {cause}")]
    Invalid {
        key: &'static str,
        cause: FieldError,
    },
}

/// Reads the services out of the annotations file's text.
pub fn services_from(text: &str, path: &Path, home: &Home) -> Result<PodServices, ReadError> {
    let annotations = parse_annotations(text).map_err(|cause| ReadError::Format {
        path: path.to_owned(),
        cause,
    })?;
    let list = |direction: Direction| -> Result<ServiceList, ReadError> {
        let Some((key, value)) = direction.find(&annotations) else {
            return Ok(ServiceList::default());
        };
        let list = ServiceList::parse(value).map_err(|cause| ReadError::Services { key, cause })?;
        list.check_unique(&home.namespace, &home.cluster)
            .map_err(|cause| ReadError::Invalid { key, cause })?;
        if direction == Direction::Imported {
            list.check_import_limit()
                .map_err(|cause| ReadError::Invalid { key, cause })?;
        }
        Ok(list)
    };
    Ok(PodServices {
        imported: list(Direction::Imported)?,
        exported: list(Direction::Exported)?,
    })
}

/// Follows the annotations file.
#[derive(Debug)]
pub struct Watcher {
    path: PathBuf,
    home: Home,
    last: Option<Vec<u8>>,
}

impl Watcher {
    pub fn new(path: impl Into<PathBuf>, home: Home) -> Self {
        Watcher {
            path: path.into(),
            home,
            last: None,
        }
    }

    /// `Ok(Some(services))` when the file changed (or on the first call) and is valid,
    /// `Ok(None)` when it did not change, `Err` when it cannot be read or the new value is
    /// invalid; an invalid value is reported once, not on every poll.
    pub fn poll(&mut self) -> Result<Option<PodServices>, ReadError> {
        let bytes = std::fs::read(&self.path).map_err(|cause| ReadError::Read {
            path: self.path.clone(),
            cause,
        })?;
        if self.last.as_deref() == Some(bytes.as_slice()) {
            return Ok(None);
        }
        self.last = Some(bytes.clone());
        let text = String::from_utf8_lossy(&bytes);
        services_from(&text, &self.path, &self.home).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::symlink;

    use servicekeel_api::podinfo::format_annotations;

    use super::*;

    /// Writes `annotations` the way the kubelet's atomic writer does: a fresh timestamped
    /// directory, `..data` swapped to it by renaming a new symlink over it, the old one removed.
    struct Kubelet {
        dir: tempfile::TempDir,
        generation: usize,
    }

    impl Kubelet {
        fn new() -> Self {
            let kubelet = Kubelet {
                dir: tempfile::tempdir().unwrap(),
                generation: 0,
            };
            symlink("..data/annotations", kubelet.path()).unwrap();
            kubelet
        }

        fn path(&self) -> PathBuf {
            self.dir.path().join("annotations")
        }

        fn write(&mut self, pairs: &[(&str, &str)]) {
            let map: BTreeMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            self.generation += 1;
            let old = format!("..2026_11_22_{}", self.generation - 1);
            let new = format!("..2026_11_22_{}", self.generation);
            std::fs::create_dir(self.dir.path().join(&new)).unwrap();
            std::fs::write(
                self.dir.path().join(&new).join("annotations"),
                format_annotations(&map),
            )
            .unwrap();
            symlink(&new, self.dir.path().join("..data_tmp")).unwrap();
            std::fs::rename(
                self.dir.path().join("..data_tmp"),
                self.dir.path().join("..data"),
            )
            .unwrap();
            let _ = std::fs::remove_dir_all(self.dir.path().join(old));
        }
    }

    fn home() -> Home {
        Home {
            namespace: "default".into(),
            cluster: "cluster-a".into(),
        }
    }

    #[test]
    fn follows_the_kubelets_symlink_swaps_and_keeps_the_last_good_set() {
        let mut kubelet = Kubelet::new();
        kubelet.write(&[(
            "servicekeel.io/imported-services",
            "services:\n  - name: simple-server\n    cluster: cluster-a.local\n    ports:\n      - port: 8080\n        targetport: 8080\n",
        )]);
        let mut watcher = Watcher::new(kubelet.path(), home());
        let first = watcher.poll().unwrap().expect("first read");
        assert_eq!(
            first.imported_keys(&home()),
            vec![ServiceKey {
                name: "simple-server".into(),
                namespace: "default".into(),
                cluster: "cluster-a.local".into()
            }]
        );
        assert_eq!(watcher.poll().unwrap(), None, "nothing changed");

        kubelet.write(&[
            (
                "edge.io/exported-services",
                r#"{"services":[{"name":"web","ports":[{"port":80}]}]}"#,
            ),
            (
                "servicekeel.io/imported-services",
                "services: [{name: db, ports: [{port: 5432}]}]",
            ),
        ]);
        let second = watcher.poll().unwrap().expect("the swap is seen");
        assert_eq!(second.imported.services[0].name, "db");
        assert_eq!(second.exported.services[0].name, "web");

        kubelet.write(&[(
            "servicekeel.io/imported-services",
            "services: [{name: db, ports: [{port: 0}]}]",
        )]);
        let error = watcher
            .poll()
            .expect_err("invalid value reported")
            .to_string();
        assert!(
            error.starts_with("servicekeel.io/imported-services: services[0].ports[0].port"),
            "{error}"
        );
        assert_eq!(
            watcher.poll().unwrap(),
            None,
            "reported once; the caller keeps the last good set"
        );

        kubelet.write(&[]);
        assert_eq!(watcher.poll().unwrap(), Some(PodServices::default()));
    }

    #[test]
    fn a_missing_or_garbled_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut watcher = Watcher::new(dir.path().join("annotations"), home());
        assert!(
            watcher
                .poll()
                .unwrap_err()
                .to_string()
                .starts_with("cannot read")
        );
        std::fs::write(dir.path().join("annotations"), "no equals sign").unwrap();
        let error = watcher.poll().unwrap_err().to_string();
        assert!(
            error.contains("annotations file line 1: expected key=\"value\""),
            "{error}"
        );
    }
}
