//! Images: references, registry pulls, the content-addressed store, layer snapshots and rootfs mounts.
//!
//! Owned by the image work (issue 2, "Images"). Contract used by the rest of oxlet:
//! - `ImageStore::open(root)`; `ensure(reference, PullPolicy, &PullOptions)` returns an `Image`
//!   (pulling as the policy says); `pull`, `get`, `list`, `remove`, `import`.
//! - `Image { reference, digest, config: oci_spec::image::ImageConfiguration, .. }`.
//! - `mount_rootfs(&image, container_dir)` mounts overlayfs at `container_dir/rootfs` with upper and
//!   work dirs inside `container_dir`; `unmount_rootfs(container_dir)` undoes it (idempotent).
//! - `Error::reason()` gives the kubelet reason: InvalidImageName, ErrImagePull, ErrImageNeverPull,
//!   ImageInspectError.
//!
//! `pull`, `ensure` and `import` are async (unpacking runs in `spawn_blocking`); `get`, `list`,
//! `remove`, `gc`, `mount_rootfs` and `unmount_rootfs` are blocking file-system work
//! (`remove` and `gc` wait for running pulls and imports to finish).
//!
//! Store layout under the root (all writes are temp file/dir + rename, so a crash leaves only
//! `tmp/` leftovers that the next garbage collection removes):
//! - `blobs/sha256/<hex>`: manifests, configs and compressed layers, verified before rename.
//! - `snapshots/<diff id hex>/`: one unpacked layer each, whiteouts in overlayfs form. Keyed by the
//!   diff id alone because an overlay lower dir does not depend on the layers below it.
//! - `images/<sha256(reference)>.json`: the image records; `containers/*.json`: in-use markers.
//! - `lock`: shared by pulls and mounts, exclusive for garbage collection.

mod auth;
pub mod gc;
mod import;
mod media;
mod mount;
mod pull;
mod reference;
mod registry;
mod store;
mod unpack;

pub use auth::{Credentials, DockerConfig};
pub use mount::{mount_rootfs, unmount_rootfs};
pub use reference::Reference;
pub use store::ImageStore;

use crate::oci_spec::image::ImageConfiguration;
use std::path::PathBuf;
use std::sync::Arc;

/// Errors of the image module. `reason()` maps each to what kubelet reports in pod status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {reference:?}: {detail}")]
    InvalidReference { reference: String, detail: String },
    /// Anything that went wrong fetching: unreachable registry, 401, 404, digest mismatch.
    #[error("pull {reference}: {detail}")]
    Pull { reference: String, detail: String },
    #[error("image {reference} is not present and the pull policy is Never")]
    NeverPull { reference: String },
    #[error("image {reference}: config {digest} cannot be read: {detail}")]
    Inspect {
        reference: String,
        digest: String,
        detail: String,
    },
    #[error("unpack layer {digest}: {detail}")]
    Unpack { digest: String, detail: String },
    #[error("image {reference} not found")]
    NotFound { reference: String },
    #[error("import {path}: {detail}")]
    Import { path: PathBuf, detail: String },
    #[error("mount rootfs at {path}: {detail}")]
    Mount { path: PathBuf, detail: String },
    #[error("image store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The reason kubelet puts in a waiting container's status for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidReference { .. } => "InvalidImageName",
            Error::NeverPull { .. } => "ErrImageNeverPull",
            Error::Inspect { .. } => "ImageInspectError",
            Error::Mount { .. } => "CreateContainerError",
            Error::NotFound { .. } => "ImageNotFound",
            Error::Pull { .. } | Error::Unpack { .. } | Error::Import { .. } | Error::Io { .. } => {
                "ErrImagePull"
            }
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// When to contact the registry (the pod spec's `imagePullPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// Progress of one pull, for the command line (and logs).
#[derive(Debug, Clone)]
pub enum Progress {
    /// A layer download starts; `size` from the manifest.
    LayerStart { digest: String, size: u64 },
    /// Bytes of a layer received so far.
    LayerBytes {
        digest: String,
        downloaded: u64,
        size: u64,
    },
    /// The layer is downloaded and verified, or `cached` when it was already in the store.
    LayerDone {
        digest: String,
        size: u64,
        cached: bool,
    },
}

/// A progress callback.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// How to pull: credentials, which registries may be plain HTTP, progress reporting.
#[derive(Clone, Default)]
pub struct PullOptions {
    /// Credentials (from imagePullSecrets or `--auth-file`).
    pub auth: DockerConfig,
    /// Registries (`host:port` or `host`) to talk to over plain HTTP besides loopback.
    pub insecure_registries: Vec<String>,
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullOptions")
            .field("auth", &self.auth)
            .field("insecure_registries", &self.insecure_registries)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// One layer of a stored image, bottom first in `Image::layers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Digest of the compressed blob, `sha256:..`.
    pub digest: String,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
    pub media_type: String,
    /// Compressed size in bytes.
    pub size: u64,
    /// The unpacked layer, an overlayfs lower dir.
    pub snapshot: PathBuf,
}

/// A pulled or imported image.
#[derive(Debug, Clone)]
pub struct Image {
    /// Normalised reference, e.g. `127.0.0.1:5000/test/busybox:latest`.
    pub reference: String,
    /// Digest of what the reference resolved to in the registry (`sha256:..`): the index for a
    /// multi-platform image, as `docker images --digests` and kubelet's imageID show it.
    pub digest: String,
    /// Digest of the platform-specific manifest (equals `digest` for single-platform images).
    pub manifest_digest: String,
    pub config_digest: String,
    pub config: ImageConfiguration,
    pub layers: Vec<Layer>,
    /// Bytes in the store: compressed layers plus config.
    pub size: u64,
    /// The store the image lives in; mounts record their use there.
    pub store_root: PathBuf,
}
