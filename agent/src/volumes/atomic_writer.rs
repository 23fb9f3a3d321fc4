//! Writes a volume's files so that a reader sees either the old set or the new one, never a
//! mix (kubelet's atomic writer): the files go into a fresh timestamped directory, the `..data`
//! symlink is swapped to it with a rename, and each user-visible top-level name is a symlink
//! `<name> -> ..data/<name>`.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path};

pub const DATA_DIR: &str = "..data";
const DATA_DIR_TMP: &str = "..data_tmp";

/// One file of a volume: its content and permission bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProjection {
    pub data: Vec<u8>,
    pub mode: u32,
}

pub type Payload = BTreeMap<String, FileProjection>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid path {0:?}: must be relative, without '..' and not start with '..'")]
    Path(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// A payload path is relative, has no `..` element and does not start with `..`.
pub fn valid_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with("..")
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Every regular file below `dir`, by path relative to it.
fn read_tree(dir: &Path) -> io::Result<Payload> {
    let mut out = Payload::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let rel = e.path().strip_prefix(dir).unwrap_or(&e.path()).to_owned();
                let mode = e.metadata()?.permissions().mode() & 0o7777;
                out.insert(
                    rel.to_string_lossy().into_owned(),
                    FileProjection {
                        data: std::fs::read(e.path())?,
                        mode,
                    },
                );
            }
        }
    }
    Ok(out)
}

fn top_level(p: &str) -> &str {
    p.split('/').next().unwrap_or(p)
}

/// Makes `dir` hold exactly `payload`. Returns whether anything was rewritten (an unchanged
/// payload keeps the current directory).
pub fn write(dir: &Path, payload: &Payload) -> Result<bool, Error> {
    for p in payload.keys() {
        if !valid_path(p) {
            return Err(Error::Path(p.clone()));
        }
    }
    let data_link = dir.join(DATA_DIR);
    let old = std::fs::read_link(&data_link).ok();
    let unchanged = old
        .as_ref()
        .and_then(|o| read_tree(&dir.join(o)).ok())
        .is_some_and(|cur| &cur == payload);
    let changed = !unchanged;
    if changed {
        let stamp = chrono::Utc::now().format("..%Y_%m_%d_%H_%M_%S");
        let ts_name = format!("{stamp}.{}", rand_digits());
        let ts = dir.join(&ts_name);
        std::fs::create_dir(&ts).map_err(io_err(format!("create {}", ts.display())))?;
        std::fs::set_permissions(&ts, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err(format!("chmod {}", ts.display())))?;
        for (p, f) in payload {
            let path = ts.join(p);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io_err(format!("create {}", parent.display())))?;
            }
            std::fs::write(&path, &f.data).map_err(io_err(format!("write {}", path.display())))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode))
                .map_err(io_err(format!("chmod {}", path.display())))?;
        }
        let tmp = dir.join(DATA_DIR_TMP);
        let _ = std::fs::remove_file(&tmp);
        symlink(&ts_name, &tmp).map_err(io_err(format!("symlink {}", tmp.display())))?;
        std::fs::rename(&tmp, &data_link)
            .map_err(io_err(format!("rename {}", data_link.display())))?;
    }
    let wanted: BTreeSet<&str> = payload.keys().map(|p| top_level(p)).collect();
    for name in &wanted {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(Path::new(DATA_DIR).join(name), &link)
                .map_err(io_err(format!("symlink {}", link.display())))?;
        }
    }
    let current = std::fs::read_link(&data_link).ok();
    for e in std::fs::read_dir(dir)
        .map_err(io_err(format!("read {}", dir.display())))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if name.starts_with("..") {
            // Old timestamped directories (also of a write interrupted earlier).
            let is_current = current.as_deref() == Some(Path::new(&name));
            if name != DATA_DIR && !is_current && path.is_dir() {
                std::fs::remove_dir_all(&path)
                    .map_err(io_err(format!("remove {}", path.display())))?;
            }
        } else if !wanted.contains(name.as_str()) {
            std::fs::remove_file(&path).map_err(io_err(format!("remove {}", path.display())))?;
        }
    }
    Ok(changed)
}

fn rand_digits() -> u32 {
    rand::random::<u32>() % 1_000_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(files: &[(&str, &str, u32)]) -> Payload {
        files
            .iter()
            .map(|(p, d, m)| {
                (
                    p.to_string(),
                    FileProjection {
                        data: d.as_bytes().to_vec(),
                        mode: *m,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn swaps_the_data_link_and_keeps_user_names_as_links() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let first = payload(&[("user", "admin", 0o644), ("sub/pass", "x", 0o400)]);
        assert!(write(d, &first).unwrap());
        let ts1 = std::fs::read_link(d.join(DATA_DIR)).unwrap();
        assert!(ts1.to_string_lossy().starts_with("..20"));
        assert_eq!(
            std::fs::read_link(d.join("user")).unwrap(),
            Path::new("..data/user")
        );
        assert_eq!(std::fs::read_to_string(d.join("sub/pass")).unwrap(), "x");
        let mode = std::fs::metadata(d.join("sub/pass"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);
        assert!(!write(d, &first).unwrap(), "same payload, no rewrite");
        assert_eq!(std::fs::read_link(d.join(DATA_DIR)).unwrap(), ts1);

        let second = payload(&[("user", "root", 0o644)]);
        assert!(write(d, &second).unwrap());
        let ts2 = std::fs::read_link(d.join(DATA_DIR)).unwrap();
        assert_ne!(ts1, ts2);
        assert!(!d.join(&ts1).exists(), "old directory removed");
        assert!(std::fs::symlink_metadata(d.join("sub")).is_err());
        assert_eq!(std::fs::read_to_string(d.join("user")).unwrap(), "root");
        assert!(std::fs::symlink_metadata(d.join(DATA_DIR_TMP)).is_err());
    }

    #[test]
    fn refuses_paths_that_leave_the_volume() {
        for bad in ["../x", "/etc/passwd", "a/../../b", "..data", ""] {
            assert!(!valid_path(bad), "{bad}");
        }
        assert!(valid_path("a/b.txt") && valid_path("x..y"));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            write(dir.path(), &payload(&[("../x", "", 0o644)])),
            Err(Error::Path(_))
        ));
    }
}
