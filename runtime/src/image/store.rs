//! The content-addressed store: blobs, snapshots, image records, locks and garbage collection.

use super::media::Compression;
use super::reference::Reference;
use super::{unpack, Error, Image, Layer, PullOptions, PullPolicy, Result};
use crate::oci_spec::image::ImageConfiguration;
use fs2::FileExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use tracing::{debug, info, warn};

/// Handle on an image store rooted at a directory (e.g. `<data dir>/images`). Cheap to clone;
/// every method re-reads the disk, so several handles and processes may share one root.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

/// What `images/*.json` holds: enough to rebuild an `Image` after a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub reference: String,
    pub digest: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layers: Vec<RecordLayer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RecordLayer {
    pub digest: String,
    pub diff_id: String,
    pub media_type: String,
    pub size: u64,
}

/// An in-use marker written by `mount_rootfs`: what garbage collection must keep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Marker {
    pub container_dir: PathBuf,
    pub reference: String,
    pub blobs: Vec<String>,
    pub snapshots: Vec<String>,
}

/// Name of the file in a container dir that points back at its marker.
pub(crate) const CONTAINER_LINK: &str = ".oxlet-image.json";

/// Holds a flock on the store's lock file until dropped.
pub(crate) struct LockGuard(#[allow(dead_code)] File);

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `sha256:<hex>` -> `<hex>`; digests were validated when parsed, this guards paths anyway.
pub(crate) fn digest_hex(digest: &str) -> Result<&str, String> {
    super::reference::parse_digest(digest)?;
    Ok(&digest["sha256:".len()..])
}

/// Writes `data` to `path` atomically: temp file in the same dir, fsync, rename.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), unique_suffix()));
    let mut f = File::create(&tmp).map_err(Error::io(&tmp))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(Error::io(&tmp))?;
    fs::rename(&tmp, path).map_err(Error::io(path))
}

pub(crate) fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{t:x}-{}", N.fetch_add(1, Ordering::Relaxed))
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<ImageStore> {
        let root = root.into();
        for d in [
            "blobs/sha256",
            "snapshots",
            "images",
            "containers",
            "tmp",
            "locks",
        ] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(Error::io(&p))?;
        }
        let root = root.canonicalize().map_err(Error::io(&root))?;
        Ok(ImageStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Pulls `reference` from its registry (always contacting it), stores and unpacks it.
    pub async fn pull(&self, reference: &str, opts: &PullOptions) -> Result<Image> {
        super::pull::pull(self, parse(reference)?, opts).await
    }

    /// Returns the image, pulling it as `policy` says (kubelet's `EnsureImageExists`).
    pub async fn ensure(
        &self,
        reference: &str,
        policy: PullPolicy,
        opts: &PullOptions,
    ) -> Result<Image> {
        let r = parse(reference)?;
        let present = match policy {
            PullPolicy::Always => None,
            PullPolicy::IfNotPresent | PullPolicy::Never => {
                let store = self.clone();
                let name = r.to_string();
                blocking(move || store.get(&name)).await?
            }
        };
        match (present, policy) {
            (Some(img), _) => Ok(img),
            (None, PullPolicy::Never) => Err(Error::NeverPull {
                reference: r.to_string(),
            }),
            (None, _) => super::pull::pull(self, r, opts).await,
        }
    }

    /// Imports an OCI image layout tarball or a `docker save` tarball; returns the images found.
    pub async fn import(&self, tarball: impl AsRef<Path>) -> Result<Vec<Image>> {
        let store = self.clone();
        let path = tarball.as_ref().to_path_buf();
        blocking(move || super::import::import(&store, &path)).await
    }

    /// The stored image for `reference`, if it is complete on disk.
    pub fn get(&self, reference: &str) -> Result<Option<Image>> {
        let r = parse(reference)?;
        let Some(rec) = self.read_record(&r.to_string())? else {
            return Ok(None);
        };
        let img = self.image_from_record(rec)?;
        // A snapshot removed behind our back means the image must be pulled again.
        if img.layers.iter().all(|l| l.snapshot.is_dir()) {
            Ok(Some(img))
        } else {
            warn!(
                reference,
                "image record without its snapshots; treating as absent"
            );
            Ok(None)
        }
    }

    /// All stored images, sorted by reference. Records that cannot be read are logged and skipped.
    pub fn list(&self) -> Result<Vec<Image>> {
        let mut out = Vec::new();
        for rec in self.records()? {
            match self.image_from_record(rec) {
                Ok(img) => out.push(img),
                Err(e) => warn!("skipping image record: {e}"),
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Removes the tag, then garbage-collects blobs and snapshots nothing else uses.
    pub fn remove(&self, reference: &str) -> Result<()> {
        let r = parse(reference)?.to_string();
        let _lock = self.lock(true)?;
        let path = self.record_path(&r);
        match fs::remove_file(&path) {
            Ok(()) => info!(reference = %r, "removed image"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound { reference: r })
            }
            Err(e) => return Err(Error::io(path)(e)),
        }
        self.gc_locked()
    }

    /// The references of the images some container's rootfs is made from (its in-use marker
    /// is there and its container dir still points back at it).
    pub fn references_in_use(&self) -> Result<HashSet<String>> {
        Ok(self
            .markers()?
            .into_iter()
            .filter(|(_, m)| m.container_dir.join(CONTAINER_LINK).exists())
            .map(|(_, m)| m.reference)
            .collect())
    }

    /// Deletes blobs, snapshots and temp files not referenced by any image or mounted container.
    pub fn gc(&self) -> Result<()> {
        let _lock = self.lock(true)?;
        self.gc_locked()
    }

    /// Garbage-collects unless a pull, import or mount holds the store right now (then the
    /// next collection catches up). Used after a re-pull moved a tag to new content.
    pub(crate) fn gc_if_idle(&self) -> Result<()> {
        let (f, _) = self.lock_file()?;
        if f.try_lock_exclusive().is_err() {
            debug!("store busy; skipping garbage collection");
            return Ok(());
        }
        self.gc_locked()
    }

    fn gc_locked(&self) -> Result<()> {
        let mut blobs = HashSet::new();
        let mut snaps = HashSet::new();
        for rec in self.records()? {
            blobs.insert(rec.digest.clone());
            blobs.insert(rec.manifest_digest.clone());
            blobs.insert(rec.config_digest.clone());
            for l in &rec.layers {
                blobs.insert(l.digest.clone());
                snaps.insert(l.diff_id.clone());
            }
        }
        for (path, m) in self.markers()? {
            // A container dir that lost its link file (deleted without unmount) no longer
            // holds the image: drop the stale marker instead of keeping layers forever.
            if !m.container_dir.join(CONTAINER_LINK).exists() {
                debug!(marker = %path.display(), "dropping stale in-use marker");
                let _ = fs::remove_file(&path);
                continue;
            }
            blobs.extend(m.blobs);
            snaps.extend(m.snapshots);
        }
        let keep_blob: HashSet<String> = blobs
            .iter()
            .filter_map(|d| digest_hex(d).ok().map(str::to_string))
            .collect();
        let keep_snap: HashSet<String> = snaps
            .iter()
            .filter_map(|d| digest_hex(d).ok().map(str::to_string))
            .collect();
        sweep(&self.root.join("blobs/sha256"), &keep_blob, "blob", |p| {
            fs::remove_file(p)
        })?;
        sweep(&self.root.join("snapshots"), &keep_snap, "snapshot", |p| {
            fs::remove_dir_all(p)
        })?;
        // Under the exclusive lock no pull is running, so anything in tmp/ is a leftover, and
        // so are per-layer lock files of failed unpacks.
        let ldir = self.root.join("locks");
        for e in fs::read_dir(&ldir).map_err(Error::io(&ldir))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        let tdir = self.root.join("tmp");
        for e in fs::read_dir(&tdir).map_err(Error::io(&tdir))?.flatten() {
            let p = e.path();
            let _ = if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
        Ok(())
    }

    // ----- crate-internal helpers used by pull, import and mount -----

    /// Takes the store lock: shared for pulls/imports/mounts, exclusive for GC. Blocking.
    pub(crate) fn lock(&self, exclusive: bool) -> Result<LockGuard> {
        let (f, p) = self.lock_file()?;
        if exclusive {
            f.lock_exclusive()
        } else {
            f.lock_shared()
        }
        .map_err(Error::io(&p))?;
        Ok(LockGuard(f))
    }

    /// The store's lock file, opened (created on first use), and its path.
    fn lock_file(&self) -> Result<(fs::File, PathBuf)> {
        let p = self.root.join("lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(Error::io(&p))?;
        Ok((f, p))
    }

    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf, String> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    pub(crate) fn snapshot_path(&self, diff_id: &str) -> Result<PathBuf, String> {
        Ok(self.root.join("snapshots").join(digest_hex(diff_id)?))
    }

    /// A fresh path inside the store's temp dir (same filesystem, so renames are atomic).
    pub(crate) fn tmp_path(&self, what: &str) -> PathBuf {
        self.root
            .join("tmp")
            .join(format!("{what}-{}-{}", std::process::id(), unique_suffix()))
    }

    pub(crate) fn read_blob(&self, digest: &str) -> Result<Vec<u8>, String> {
        let p = self.blob_path(digest)?;
        fs::read(&p).map_err(|e| format!("read blob {digest}: {e}"))
    }

    /// Stores a small blob held in memory after checking its digest.
    pub(crate) fn put_blob(&self, digest: &str, data: &[u8]) -> Result<(), String> {
        let got = format!("sha256:{}", sha256_hex(data));
        if got != digest {
            return Err(format!("digest mismatch: expected {digest}, got {got}"));
        }
        let p = self.blob_path(digest)?;
        if p.exists() {
            return Ok(());
        }
        write_atomic(&p, data).map_err(|e| e.to_string())
    }

    /// Unpacks a stored layer blob into its snapshot unless it is there already. Blocking; a
    /// per-layer flock makes concurrent pulls of the same layer wait for the first one.
    pub(crate) fn ensure_snapshot(
        &self,
        layer: &RecordLayer,
        compression: Option<Compression>,
    ) -> Result<PathBuf> {
        let unpack_err = |detail: String| Error::Unpack {
            digest: layer.digest.clone(),
            detail,
        };
        let dest = self.snapshot_path(&layer.diff_id).map_err(unpack_err)?;
        if dest.is_dir() {
            return Ok(dest);
        }
        let lock_path = self
            .root
            .join("locks")
            .join(digest_hex(&layer.diff_id).map_err(unpack_err)?);
        let lock = File::create(&lock_path).map_err(Error::io(&lock_path))?;
        lock.lock_exclusive().map_err(Error::io(&lock_path))?;
        if dest.is_dir() {
            return Ok(dest); // another pull finished it while we waited
        }
        let blob = self.blob_path(&layer.digest).map_err(unpack_err)?;
        let tmp = self.tmp_path("snapshot");
        let result = unpack::unpack_layer(&blob, compression, &tmp, &layer.diff_id);
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&tmp);
            return Err(unpack_err(e));
        }
        fs::rename(&tmp, &dest).map_err(Error::io(&dest))?;
        let _ = fs::remove_file(&lock_path);
        debug!(diff_id = %layer.diff_id, "unpacked layer");
        Ok(dest)
    }

    pub(crate) fn record_path(&self, reference: &str) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", sha256_hex(reference.as_bytes())))
    }

    pub(crate) fn write_record(&self, rec: &Record) -> Result<()> {
        let data = serde_json::to_vec_pretty(rec).expect("record serialises");
        write_atomic(&self.record_path(&rec.reference), &data)
    }

    pub(crate) fn read_record(&self, reference: &str) -> Result<Option<Record>> {
        let p = self.record_path(reference);
        match fs::read(&p) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|e| Error::Io {
                    path: p,
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(p)(e)),
        }
    }

    fn records(&self) -> Result<Vec<Record>> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(Error::io(&dir))? {
            let p = e.map_err(Error::io(&dir))?.path();
            if p.extension().is_some_and(|x| x == "json") {
                match fs::read(&p)
                    .map_err(|e| e.to_string())
                    .and_then(|d| serde_json::from_slice(&d).map_err(|e| e.to_string()))
                {
                    Ok(r) => out.push(r),
                    Err(e) => warn!(path = %p.display(), "unreadable image record: {e}"),
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn marker_path(&self, container_dir: &Path) -> PathBuf {
        self.root.join("containers").join(format!(
            "{}.json",
            sha256_hex(container_dir.as_os_str().as_encoded_bytes())
        ))
    }

    fn markers(&self) -> Result<Vec<(PathBuf, Marker)>> {
        let dir = self.root.join("containers");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(Error::io(&dir))? {
            let p = e.map_err(Error::io(&dir))?.path();
            if let Some(m) = fs::read(&p)
                .ok()
                .and_then(|d| serde_json::from_slice::<Marker>(&d).ok())
            {
                out.push((p, m));
            }
        }
        Ok(out)
    }

    /// Builds the `Image` from a record, parsing its config (ImageInspectError if unreadable).
    pub(crate) fn image_from_record(&self, rec: Record) -> Result<Image> {
        let inspect = |detail: String| Error::Inspect {
            reference: rec.reference.clone(),
            digest: rec.config_digest.clone(),
            detail,
        };
        let raw = self.read_blob(&rec.config_digest).map_err(inspect)?;
        let config = parse_config(&raw).map_err(inspect)?;
        let mut layers = Vec::with_capacity(rec.layers.len());
        let mut size = raw.len() as u64;
        for l in &rec.layers {
            size += l.size;
            layers.push(Layer {
                digest: l.digest.clone(),
                diff_id: l.diff_id.clone(),
                media_type: l.media_type.clone(),
                size: l.size,
                snapshot: self.snapshot_path(&l.diff_id).map_err(inspect)?,
            });
        }
        Ok(Image {
            reference: rec.reference,
            digest: rec.digest,
            manifest_digest: rec.manifest_digest,
            config_digest: rec.config_digest,
            config,
            layers,
            size,
            store_root: self.root.clone(),
        })
    }
}

/// Parses an image config and checks what we rely on: one diff id per layer, valid digests.
pub(crate) fn parse_config(raw: &[u8]) -> Result<ImageConfiguration, String> {
    let cfg: ImageConfiguration =
        serde_json::from_slice(raw).map_err(|e| format!("not an image config: {e}"))?;
    for d in cfg.rootfs().diff_ids() {
        digest_hex(d)?;
    }
    Ok(cfg)
}

pub(crate) fn parse(reference: &str) -> Result<Reference> {
    Reference::parse(reference).map_err(|detail| Error::InvalidReference {
        reference: reference.to_string(),
        detail,
    })
}

/// Runs blocking store work off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Removes the entries of `dir` whose names are not in `keep`.
fn sweep(
    dir: &Path,
    keep: &HashSet<String>,
    what: &str,
    remove: impl Fn(&Path) -> std::io::Result<()>,
) -> Result<()> {
    for e in fs::read_dir(dir).map_err(Error::io(dir))? {
        let e = e.map_err(Error::io(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name) {
            debug!(%name, what, "gc");
            remove(&e.path()).map_err(Error::io(e.path()))?;
        }
    }
    Ok(())
}
