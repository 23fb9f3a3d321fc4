//! Container root filesystems: an overlayfs of the image's snapshots with a per-container upper.

use super::store::{write_atomic, ImageStore, Marker, CONTAINER_LINK};
use super::{Error, Image, Result};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tracing::{debug, warn};

/// The kernel calls rootfs handling needs, behind a trait so the unmount logic (busy mounts,
/// stacked mounts, nothing mounted) is unit-tested with a fake.
pub(crate) trait MountOps {
    fn mount_overlay(&self, target: &Path, options: &str) -> nix::Result<()>;
    fn unmount(&self, target: &Path, detach: bool) -> nix::Result<()>;
}

/// The real kernel.
pub(crate) struct Kernel;

impl MountOps for Kernel {
    fn mount_overlay(&self, target: &Path, options: &str) -> nix::Result<()> {
        mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(options),
        )
    }

    fn unmount(&self, target: &Path, detach: bool) -> nix::Result<()> {
        let flags = if detach {
            MntFlags::MNT_DETACH
        } else {
            MntFlags::empty()
        };
        umount2(target, flags)
    }
}

/// Kept in `container_dir/.oxlet-image.json` so unmount (which only gets the dir) finds the
/// in-use marker it must remove from the store.
#[derive(Serialize, Deserialize)]
struct Link {
    marker: PathBuf,
    reference: String,
}

fn merr(path: &Path, detail: impl Into<String>) -> Error {
    Error::Mount {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Mounts the image's layers read-only under a writable upper at `container_dir/rootfs`
/// (`upper/` and `work/` sit next to it) and marks the image's content in use so garbage
/// collection keeps it until `unmount_rootfs`. Returns the rootfs path. Mounting an already
/// mounted container dir returns the existing rootfs.
pub fn mount_rootfs(image: &Image, container_dir: &Path) -> Result<PathBuf> {
    mount_rootfs_with(&Kernel, image, container_dir)
}

pub(crate) fn mount_rootfs_with(
    ops: &dyn MountOps,
    image: &Image,
    container_dir: &Path,
) -> Result<PathBuf> {
    fs::create_dir_all(container_dir).map_err(Error::io(container_dir))?;
    let dir = container_dir
        .canonicalize()
        .map_err(Error::io(container_dir))?;
    let rootfs = dir.join("rootfs");
    let upper = dir.join("upper");
    let work = dir.join("work");
    for d in [&rootfs, &upper, &work] {
        fs::create_dir_all(d).map_err(Error::io(d))?;
    }
    if is_mountpoint(&rootfs) {
        debug!(rootfs = %rootfs.display(), "rootfs already mounted");
        return Ok(rootfs);
    }

    let mut lowers: Vec<PathBuf> = image
        .layers
        .iter()
        .rev()
        .map(|l| l.snapshot.clone())
        .collect();
    if let Some(missing) = lowers.iter().find(|p| !p.is_dir()) {
        return Err(merr(
            &rootfs,
            format!(
                "layer snapshot {} of {} is missing; pull the image again",
                missing.display(),
                image.reference
            ),
        ));
    }
    if lowers.is_empty() {
        // overlayfs needs a lower dir; an image without layers gets an empty one.
        let empty = dir.join("empty-lower");
        fs::create_dir_all(&empty).map_err(Error::io(&empty))?;
        lowers.push(empty);
    }
    let data = overlay_options(&lowers, &upper, &work).map_err(|d| merr(&rootfs, d))?;

    // Mark in use under the shared store lock, so a concurrent GC either ran before (and the
    // snapshots we just checked would be gone: we fail above) or runs after and sees the marker.
    let store = ImageStore::open(&image.store_root)?;
    let _lock = store.lock(false)?;
    let marker_path = store.marker_path(&dir);
    let marker = Marker {
        container_dir: dir.clone(),
        reference: image.reference.clone(),
        blobs: [&image.digest, &image.manifest_digest, &image.config_digest]
            .into_iter()
            .cloned()
            .chain(image.layers.iter().map(|l| l.digest.clone()))
            .collect(),
        snapshots: image.layers.iter().map(|l| l.diff_id.clone()).collect(),
    };
    let link = Link {
        marker: marker_path.clone(),
        reference: image.reference.clone(),
    };
    write_atomic(
        &dir.join(CONTAINER_LINK),
        &serde_json::to_vec(&link).expect("json"),
    )?;
    write_atomic(&marker_path, &serde_json::to_vec(&marker).expect("json"))?;
    if let Some(missing) = lowers.iter().find(|p| !p.is_dir()) {
        let _ = fs::remove_file(&marker_path);
        return Err(merr(
            &rootfs,
            format!("layer snapshot {} vanished", missing.display()),
        ));
    }

    if let Err(e) = ops.mount_overlay(&rootfs, &data) {
        let _ = fs::remove_file(&marker_path);
        let _ = fs::remove_file(dir.join(CONTAINER_LINK));
        return Err(merr(&rootfs, format!("overlay mount: {e}")));
    }
    debug!(rootfs = %rootfs.display(), layers = image.layers.len(), "mounted rootfs");
    Ok(rootfs)
}

/// The overlay mount data. The kernel copies mount options into one page, so an image with
/// very many layers (long store paths) cannot be mounted this way: say so clearly.
fn overlay_options(lowers: &[PathBuf], upper: &Path, work: &Path) -> Result<String, String> {
    for p in lowers.iter().map(PathBuf::as_path).chain([upper, work]) {
        let s = p.to_string_lossy();
        if s.contains([':', ',', '\\']) {
            return Err(format!(
                "path {s} contains ':', ',' or '\\', which overlayfs options cannot carry"
            ));
        }
    }
    let lower = lowers
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":");
    let data = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    if data.len() >= page {
        return Err(format!(
            "{} layers make overlay options of {} bytes; the kernel accepts fewer than {page}",
            lowers.len(),
            data.len()
        ));
    }
    Ok(data)
}

/// Unmounts `container_dir/rootfs`, drops the in-use marker and removes rootfs, upper and work.
/// Succeeds when nothing is mounted or the dir is gone, so callers can always call it.
pub fn unmount_rootfs(container_dir: &Path) -> Result<()> {
    unmount_rootfs_with(&Kernel, container_dir)
}

pub(crate) fn unmount_rootfs_with(ops: &dyn MountOps, container_dir: &Path) -> Result<()> {
    let rootfs = container_dir.join("rootfs");
    // Loop: a rootfs mounted twice (a crashed earlier attempt) has stacked mounts.
    for _ in 0..8 {
        match ops.unmount(&rootfs, false) {
            Ok(()) => continue,
            Err(Errno::EINVAL) | Err(Errno::ENOENT) => break,
            Err(Errno::EBUSY) => {
                // A process still holds files in it; detach so the path is free now and the
                // kernel finishes when the last user goes.
                warn!(rootfs = %rootfs.display(), "rootfs busy; detaching lazily");
                ops.unmount(&rootfs, true)
                    .map_err(|e| merr(&rootfs, format!("unmount: {e}")))?;
            }
            Err(e) => return Err(merr(&rootfs, format!("unmount: {e}"))),
        }
    }
    let link_path = container_dir.join(CONTAINER_LINK);
    if let Ok(data) = fs::read(&link_path) {
        if let Ok(link) = serde_json::from_slice::<Link>(&data) {
            remove_file_tolerant(&link.marker)?;
            debug!(reference = %link.reference, "released image");
        }
    }
    remove_file_tolerant(&link_path)?;
    for d in ["rootfs", "upper", "work", "empty-lower"] {
        let p = container_dir.join(d);
        match fs::remove_dir_all(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(p)(e)),
        }
    }
    Ok(())
}

fn remove_file_tolerant(p: &Path) -> Result<()> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(p)(e)),
    }
}

/// A mount point sits on another device than its parent (overlay gets its own st_dev).
fn is_mountpoint(p: &Path) -> bool {
    match (
        fs::symlink_metadata(p),
        p.parent().map(fs::symlink_metadata),
    ) {
        (Ok(m), Some(Ok(parent))) => m.dev() != parent.dev(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records calls; `unmount` answers from a script of results, then EINVAL (not mounted).
    struct Fake {
        calls: Mutex<Vec<String>>,
        unmount_results: Mutex<Vec<nix::Result<()>>>,
    }

    impl Fake {
        fn new(results: Vec<nix::Result<()>>) -> Fake {
            Fake {
                calls: Mutex::default(),
                unmount_results: Mutex::new(results),
            }
        }
    }

    impl MountOps for Fake {
        fn mount_overlay(&self, target: &Path, options: &str) -> nix::Result<()> {
            let call = format!("mount {} {options}", target.display());
            self.calls.lock().unwrap().push(call);
            Ok(())
        }
        fn unmount(&self, target: &Path, detach: bool) -> nix::Result<()> {
            let call = format!("umount {} detach={detach}", target.display());
            self.calls.lock().unwrap().push(call);
            let mut r = self.unmount_results.lock().unwrap();
            if r.is_empty() {
                Err(Errno::EINVAL)
            } else {
                r.remove(0)
            }
        }
    }

    #[test]
    fn busy_rootfs_is_detached_and_stacked_mounts_all_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::create_dir_all(dir.join("rootfs")).unwrap();
        fs::create_dir_all(dir.join("upper/x")).unwrap();
        let fake = Fake::new(vec![Ok(()), Err(Errno::EBUSY), Ok(())]);
        unmount_rootfs_with(&fake, dir).unwrap();
        let r = dir.join("rootfs").display().to_string();
        assert_eq!(
            *fake.calls.lock().unwrap(),
            vec![
                format!("umount {r} detach=false"),
                format!("umount {r} detach=false"),
                format!("umount {r} detach=true"),
                format!("umount {r} detach=false"),
            ]
        );
        assert!(!dir.join("rootfs").exists() && !dir.join("upper").exists());
    }

    #[test]
    fn unmount_errors_other_than_not_mounted_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = Fake::new(vec![Err(Errno::EPERM)]);
        let e = unmount_rootfs_with(&fake, tmp.path()).unwrap_err();
        assert_eq!(e.reason(), "CreateContainerError");
        // Nothing mounted at all (a dir that never existed) is fine.
        let fake = Fake::new(vec![Err(Errno::ENOENT)]);
        unmount_rootfs_with(&fake, &tmp.path().join("gone")).unwrap();
    }

    #[test]
    fn mount_passes_layers_top_first_and_marks_use() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path().join("store")).unwrap();
        let snap = |n: &str| {
            let p = store.root().join("snapshots").join(n);
            fs::create_dir_all(&p).unwrap();
            p
        };
        let layer = |n: &str| super::super::Layer {
            digest: format!("sha256:{}", n.repeat(64)),
            diff_id: format!("sha256:{}", n.repeat(64)),
            media_type: String::new(),
            size: 1,
            snapshot: snap(n),
        };
        let image = Image {
            reference: "x".into(),
            digest: format!("sha256:{}", "c".repeat(64)),
            manifest_digest: format!("sha256:{}", "c".repeat(64)),
            config_digest: format!("sha256:{}", "d".repeat(64)),
            config: Default::default(),
            layers: vec![layer("a"), layer("b")],
            size: 2,
            store_root: store.root().to_path_buf(),
        };
        let fake = Fake::new(vec![]);
        let cdir = tmp.path().join("c");
        let rootfs = mount_rootfs_with(&fake, &image, &cdir).unwrap();
        let cdir = cdir.canonicalize().unwrap();
        assert_eq!(rootfs, cdir.join("rootfs"));
        let calls = fake.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            vec![format!(
                "mount {} lowerdir={}:{},upperdir={},workdir={}",
                rootfs.display(),
                image.layers[1].snapshot.display(),
                image.layers[0].snapshot.display(),
                cdir.join("upper").display(),
                cdir.join("work").display()
            )]
        );
        let marker = store.marker_path(&cdir);
        assert!(marker.is_file());
        unmount_rootfs_with(&fake, &cdir).unwrap();
        assert!(!marker.exists());
    }

    #[test]
    fn overlay_options_top_layer_first_and_page_limit() {
        let lowers = vec![PathBuf::from("/s/top"), PathBuf::from("/s/base")];
        let data = overlay_options(&lowers, Path::new("/c/upper"), Path::new("/c/work")).unwrap();
        assert_eq!(
            data,
            "lowerdir=/s/top:/s/base,upperdir=/c/upper,workdir=/c/work"
        );

        let many: Vec<PathBuf> = (0..200)
            .map(|i| PathBuf::from(format!("/var/lib/oxlet/images/snapshots/{i:064}")))
            .collect();
        let err = overlay_options(&many, Path::new("/u"), Path::new("/w")).unwrap_err();
        assert!(err.contains("200 layers"), "{err}");

        let odd = vec![PathBuf::from("/s/a:b")];
        assert!(overlay_options(&odd, Path::new("/u"), Path::new("/w")).is_err());
    }
}
