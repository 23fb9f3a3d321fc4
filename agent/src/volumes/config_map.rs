//! configMap volumes: the ConfigMap's keys (or the chosen items) as files, on disk.

use super::atomic_writer::{FileProjection, Payload};
use super::VolumeError;
use k8s_openapi::api::core::v1::{ConfigMap, KeyToPath};

/// The files of `cm`: every key of `data` and `binaryData`, or only `items` (a missing key is an
/// error unless `optional`).
pub fn payload(
    items: Option<&[KeyToPath]>,
    cm: &ConfigMap,
    default_mode: i32,
    optional: bool,
) -> Result<Payload, VolumeError> {
    let get = |k: &str| -> Option<Vec<u8>> {
        cm.data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|v| v.as_bytes().to_vec())
            .or_else(|| {
                cm.binary_data
                    .as_ref()
                    .and_then(|d| d.get(k))
                    .map(|b| b.0.clone())
            })
    };
    let mut out = Payload::new();
    match items.filter(|i| !i.is_empty()) {
        None => {
            let keys = cm
                .data
                .iter()
                .flat_map(|d| d.keys())
                .chain(cm.binary_data.iter().flat_map(|d| d.keys()));
            for k in keys {
                let data = get(k).unwrap_or_default();
                let mode = default_mode as u32;
                out.insert(k.clone(), FileProjection { data, mode });
            }
        }
        Some(items) => {
            for it in items {
                let Some(data) = get(&it.key) else {
                    if optional {
                        continue;
                    }
                    return Err(VolumeError::MissingConfigKey(it.key.clone()));
                };
                let mode = it.mode.unwrap_or(default_mode) as u32;
                out.insert(it.path.clone(), FileProjection { data, mode });
            }
        }
    }
    Ok(out)
}
