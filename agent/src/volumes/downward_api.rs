//! downwardAPI volumes: pod metadata and container resources as files, on a tmpfs.

use super::atomic_writer::{FileProjection, Payload};
use super::VolumeError;
use crate::fieldpath;
use k8s_openapi::api::core::v1::{DownwardAPIVolumeFile, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::BTreeMap;

pub fn payload(
    items: &[DownwardAPIVolumeFile],
    pod: &Pod,
    default_mode: i32,
    allocatable: &BTreeMap<String, Quantity>,
) -> Result<Payload, VolumeError> {
    let mut out = Payload::new();
    for it in items {
        let value = if let Some(f) = &it.field_ref {
            fieldpath::metadata_field(pod, &f.field_path)?
        } else if let Some(r) = &it.resource_field_ref {
            let container = r.container_name.clone().unwrap_or_default();
            fieldpath::pod_container_resource(pod, &container, r, allocatable)?
        } else {
            continue;
        };
        let mode = it.mode.unwrap_or(default_mode) as u32;
        out.insert(
            it.path.clone(),
            FileProjection {
                data: value.into_bytes(),
                mode,
            },
        );
    }
    Ok(out)
}
