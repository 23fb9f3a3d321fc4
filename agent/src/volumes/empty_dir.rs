//! emptyDir volumes: a directory of the pod on the node's disk, or a tmpfs (medium Memory)
//! no bigger than its sizeLimit, the pod's memory limit and the node's allocatable memory.

use super::{mounts, VolumeError};
use k8s_openapi::api::core::v1::{EmptyDirVolumeSource, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use runtime::cgroup::memory_bytes;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The size of a memory-backed volume, as kubelet computes it.
pub fn memory_size(
    pod: &Pod,
    allocatable: &BTreeMap<String, Quantity>,
    size_limit: Option<&Quantity>,
) -> Option<u64> {
    let mut size = allocatable
        .get("memory")
        .and_then(|q| memory_bytes(q).ok())?;
    let spec = pod.spec.clone().unwrap_or_default();
    if let Ok((_, _, Some(limit))) = runtime::cgroup::pod_resources(&spec) {
        let limit = limit as u64;
        if limit > 0 && limit <= size {
            size = limit;
        }
    }
    if let Some(l) = size_limit.and_then(|q| memory_bytes(q).ok()) {
        if l > 0 && l <= size {
            size = l;
        }
    }
    Some(size)
}

/// Makes the volume's directory (world-writable, as kubelet does), on a tmpfs when `tmpfs` has
/// a size (blocking).
pub fn make_dir(dir: &Path, tmpfs: Option<Option<u64>>) -> Result<(), VolumeError> {
    let io = |what: &str| {
        let what = format!("{what} {}", dir.display());
        move |source| VolumeError::Io { what, source }
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io("create"))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
            .map_err(io("chmod"))?;
    }
    if let Some(size) = tmpfs {
        mounts::ensure_tmpfs(dir, size).map_err(io("mount tmpfs on"))?;
    }
    Ok(())
}

/// Sets up an emptyDir volume at `dir` (blocking).
pub fn set_up(
    dir: &Path,
    src: &EmptyDirVolumeSource,
    pod: &Pod,
    allocatable: &BTreeMap<String, Quantity>,
) -> Result<(), VolumeError> {
    match src.medium.as_deref().unwrap_or("") {
        "" => make_dir(dir, None),
        "Memory" => make_dir(
            dir,
            Some(memory_size(pod, allocatable, src.size_limit.as_ref())),
        ),
        other => Err(VolumeError::Medium(other.to_string())),
    }
}
