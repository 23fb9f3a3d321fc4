//! projected volumes: any mix of secrets, config maps, downward API items and service account
//! tokens in one directory, on a tmpfs.

use super::atomic_writer::{FileProjection, Payload};
use super::token::Tokens;
use super::{config_map, downward_api, secret, VolumeError};
use crate::objects::Objects;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ProjectedVolumeSource, Secret};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::BTreeMap;

/// The token lifetime when a projection names none (the API's default).
const DEFAULT_TOKEN_SECONDS: i64 = 3600;

/// Everything the sources make, later sources overwriting earlier ones at the same path; the
/// errors of all sources that failed.
pub async fn payload(
    src: &ProjectedVolumeSource,
    pod: &Pod,
    objects: &Objects,
    tokens: &mut Tokens,
    allocatable: &BTreeMap<String, Quantity>,
) -> Result<Payload, VolumeError> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mode = src.default_mode.unwrap_or(0o644);
    let mut out = Payload::new();
    let mut errors: Vec<VolumeError> = Vec::new();
    for p in src.sources.iter().flatten() {
        let part = if let Some(s) = &p.secret {
            let optional = s.optional == Some(true);
            match objects.secret(ns, &s.name).await {
                Ok(obj) => secret::payload(s.items.as_deref(), &obj, mode, optional),
                Err(e) if e.is_not_found() && optional => {
                    secret::payload(s.items.as_deref(), &Secret::default(), mode, optional)
                }
                Err(e) => Err(e.into()),
            }
        } else if let Some(c) = &p.config_map {
            let optional = c.optional == Some(true);
            match objects.config_map(ns, &c.name).await {
                Ok(obj) => config_map::payload(c.items.as_deref(), &obj, mode, optional),
                Err(e) if e.is_not_found() && optional => {
                    config_map::payload(c.items.as_deref(), &ConfigMap::default(), mode, optional)
                }
                Err(e) => Err(e.into()),
            }
        } else if let Some(d) = &p.downward_api {
            let items = d.items.clone().unwrap_or_default();
            downward_api::payload(&items, pod, mode, allocatable)
        } else if let Some(t) = &p.service_account_token {
            let exp = t.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS);
            let aud = t.audience.clone().unwrap_or_default();
            match tokens.get(objects, pod, &aud, exp).await {
                Ok(token) => Ok(Payload::from([(
                    t.path.clone(),
                    FileProjection {
                        data: token.into_bytes(),
                        mode: mode as u32,
                    },
                )])),
                Err(e) => Err(e.into()),
            }
        } else {
            Ok(Payload::new())
        };
        match part {
            Ok(files) => out.extend(files),
            Err(e) => errors.push(e),
        }
    }
    match errors.len() {
        0 => Ok(out),
        1 => Err(errors.remove(0)),
        _ => Err(VolumeError::Aggregate(errors)),
    }
}
