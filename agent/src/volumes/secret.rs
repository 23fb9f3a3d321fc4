//! secret volumes: the Secret's keys (or the chosen items) as files, on a tmpfs.

use super::atomic_writer::{FileProjection, Payload};
use super::VolumeError;
use k8s_openapi::api::core::v1::{KeyToPath, Secret};

/// The files of `secret`: every key of `data`, or only `items` (a missing key is an error
/// unless `optional`).
pub fn payload(
    items: Option<&[KeyToPath]>,
    secret: &Secret,
    default_mode: i32,
    optional: bool,
) -> Result<Payload, VolumeError> {
    let data = secret.data.clone().unwrap_or_default();
    let mut out = Payload::new();
    match items.filter(|i| !i.is_empty()) {
        None => {
            for (k, v) in data {
                let mode = default_mode as u32;
                out.insert(k, FileProjection { data: v.0, mode });
            }
        }
        Some(items) => {
            for it in items {
                let Some(v) = data.get(&it.key) else {
                    if optional {
                        continue;
                    }
                    return Err(VolumeError::MissingSecretKey(it.key.clone()));
                };
                let mode = it.mode.unwrap_or(default_mode) as u32;
                out.insert(
                    it.path.clone(),
                    FileProjection {
                        data: v.0.clone(),
                        mode,
                    },
                );
            }
        }
    }
    Ok(out)
}
