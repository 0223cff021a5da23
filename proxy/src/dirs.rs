//! `servicekeel-proxy prepare-dirs`: the router DaemonSet's init container.
//!
//! The router's socket and state directories are host directories the kubelet makes owned by
//! root. The router runs as a user of its own with no capabilities: as root it shared the
//! kernel's per-user pipe budget (`fs.pipe-user-pages-soft`) with every root process on the
//! node, and its relays got two-page pipes once they had spent it. So before it starts, a
//! container allowed to change owners (`CAP_CHOWN` alone) hands each directory over, with what
//! an earlier router left in it.
//!
//! Only the directory and the entries directly in it change owner: the router keeps no
//! subdirectories, and walking further would follow paths an earlier occupant could have laid.
//! Owners change with `lchown`, so a symbolic link in the directory is handed over itself and
//! what it points at is left alone. Modes are left as they are.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A numeric user and group, written `UID:GID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl FromStr for Owner {
    type Err = String;

    fn from_str(text: &str) -> Result<Owner, String> {
        let number = |part: &str, what: &str| {
            part.parse::<u32>()
                .map_err(|_| format!("`{text}`: the {what} must be a number (UID:GID)"))
        };
        let (uid, gid) = text
            .split_once(':')
            .ok_or_else(|| format!("`{text}`: give the owner as UID:GID"))?;
        Ok(Owner {
            uid: number(uid, "user")?,
            gid: number(gid, "group")?,
        })
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

/// What [`prepare`] did to one directory.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    /// Whether the directory had to be made.
    pub created: bool,
    /// Entries looked at: the directory and each entry in it.
    pub entries: usize,
    /// Those whose owner changed; the others already had it.
    pub changed: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DirsError {
    #[error("{}: exists and is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("{}: is a symbolic link; give the directory itself", path.display())]
    Link { path: PathBuf },
    #[error("{}: cannot {action}: {cause}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        cause: std::io::Error,
    },
    #[error(
        "{}: cannot hand it to {owner}: {cause} (changing owners needs root's CAP_CHOWN)",
        path.display()
    )]
    Chown {
        path: PathBuf,
        owner: Owner,
        cause: std::io::Error,
    },
}

/// Makes `dir` (and its parents) when missing, then gives it and every entry directly in it to
/// `owner`.
pub fn prepare(dir: &Path, owner: Owner) -> Result<Prepared, DirsError> {
    let io = |action, cause| DirsError::Io {
        path: dir.to_owned(),
        action,
        cause,
    };
    let mut prepared = Prepared::default();
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|cause| io("create it", cause))?;
            prepared.created = true;
            std::fs::symlink_metadata(dir).map_err(|cause| io("read it", cause))?
        }
        Err(cause) => return Err(io("read it", cause)),
    };
    if meta.file_type().is_symlink() {
        return Err(DirsError::Link {
            path: dir.to_owned(),
        });
    }
    if !meta.is_dir() {
        return Err(DirsError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    hand_over(dir, &meta, owner, &mut prepared)?;
    let listing = std::fs::read_dir(dir).map_err(|cause| io("list it", cause))?;
    for entry in listing {
        let entry = entry.map_err(|cause| io("list it", cause))?;
        // Of the entry itself, a link not followed.
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            // Gone since it was listed: nothing of it to hand over.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(cause) => {
                return Err(DirsError::Io {
                    path: entry.path(),
                    action: "read it",
                    cause,
                });
            }
        };
        hand_over(&entry.path(), &meta, owner, &mut prepared)?;
    }
    Ok(prepared)
}

/// Gives `path` to `owner` unless it has it already, without following a symbolic link.
fn hand_over(
    path: &Path,
    meta: &std::fs::Metadata,
    owner: Owner,
    prepared: &mut Prepared,
) -> Result<(), DirsError> {
    prepared.entries += 1;
    if (meta.uid(), meta.gid()) == (owner.uid, owner.gid) {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid)).map_err(|cause| {
        DirsError::Chown {
            path: path.to_owned(),
            owner,
            cause,
        }
    })?;
    prepared.changed += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_is_two_numbers() {
        assert_eq!(
            "65533:65532".parse::<Owner>(),
            Ok(Owner {
                uid: 65533,
                gid: 65532
            })
        );
        assert_eq!(Owner { uid: 1, gid: 2 }.to_string(), "1:2");
        for (text, says) in [
            ("65533", "give the owner as UID:GID"),
            ("router:65532", "the user must be a number"),
            ("65533:", "the group must be a number"),
            ("65533:-1", "the group must be a number"),
            ("65533:65532:1", "the group must be a number"),
        ] {
            let error = text.parse::<Owner>().unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    fn owner_of(path: &Path) -> (u32, u32) {
        let meta = std::fs::symlink_metadata(path).unwrap();
        (meta.uid(), meta.gid())
    }

    // Changing owners needs root (CAP_CHOWN), as the CI machine has.
    #[test]
    fn a_directory_and_its_entries_are_handed_over_and_links_are_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("outside");
        std::fs::write(&outside, "not the router's").unwrap();
        let dir = root.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("registry.json"), "{}").unwrap();
        std::fs::create_dir_all(dir.join("deeper/still")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
        let owner = Owner {
            uid: 65533,
            gid: 65532,
        };

        let prepared = prepare(&dir, owner).unwrap();
        assert_eq!(
            prepared,
            Prepared {
                created: false,
                entries: 4,
                changed: 4
            }
        );
        for path in ["", "registry.json", "deeper", "link"] {
            assert_eq!(owner_of(&dir.join(path)), (65533, 65532), "{path}");
        }
        // Neither what the link points at nor what is below a subdirectory.
        assert_eq!(owner_of(&outside), (0, 0));
        assert_eq!(owner_of(&dir.join("deeper/still")), (0, 0));

        // Again: nothing left to change.
        assert_eq!(prepare(&dir, owner).unwrap().changed, 0);
    }

    #[test]
    fn a_missing_directory_is_made_and_anything_else_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let owner = Owner {
            uid: 65533,
            gid: 65532,
        };
        let dir = root.path().join("run/servicekeel");
        let prepared = prepare(&dir, owner).unwrap();
        assert!(prepared.created);
        assert!(dir.is_dir());
        assert_eq!(owner_of(&dir), (65533, 65532));

        let file = root.path().join("file");
        std::fs::write(&file, "").unwrap();
        let error = prepare(&file, owner).unwrap_err().to_string();
        assert!(error.contains("exists and is not a directory"), "{error}");
        assert_eq!(owner_of(&file), (0, 0));

        let link = root.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let error = prepare(&link, owner).unwrap_err().to_string();
        assert!(error.contains("is a symbolic link"), "{error}");
    }
}
