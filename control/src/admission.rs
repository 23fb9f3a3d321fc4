//! Mutating admission of API requests, as kube-apiserver's ServiceAccount plugin does it for
//! new pods: `serviceAccountName` defaulted to `default`, the service account required to
//! exist, its imagePullSecrets copied to a pod without any, and unless automounting is turned
//! off (by the pod, else by the service account) a `kube-api-access-<random>` projected volume
//! (a bound token, the cluster CA, the namespace) mounted read-only in every container at
//! /var/run/secrets/kubernetes.io/serviceaccount.

use serde_json::{json, Value};
use std::time::Duration;

use crate::registry::{meta_str, Registry};
use crate::resources;
use crate::status::ApiError;

pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const VOLUME_PREFIX: &str = "kube-api-access-";
/// Kubernetes' lifetime of the automounted token: one hour and seven seconds, so that a token
/// of this age can be recognised.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3607;
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The projected source of the automounted volume.
pub fn token_volume_source() -> Value {
    json!({
        "defaultMode": 0o644,
        "sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": TOKEN_EXPIRATION_SECONDS}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace",
                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
        ]
    })
}

/// The service account, retried for a while when it is `default` (the namespace controller
/// makes it just after the namespace), as the plugin does.
async fn service_account(reg: &Registry, ns: &str, name: &str) -> Result<Option<Value>, ApiError> {
    let rt = resources::get("", "serviceaccounts");
    let attempts = if name == "default" { 10 } else { 1 };
    let pause = Duration::from_millis(100 + rand::random::<u64>() % 100);
    for i in 0..attempts {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        match reg.get(rt, Some(ns), name) {
            Ok(sa) => return Ok(Some(sa)),
            Err(e) if e.code == 404 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Admits a new pod of namespace `ns` (mutating `pod`).
pub async fn pod(reg: &Registry, ns: &str, pod: &mut Value) -> Result<(), ApiError> {
    if pod
        .pointer(&format!(
            "/metadata/annotations/{}",
            MIRROR_ANNOTATION.replace('/', "~1")
        ))
        .is_some()
    {
        return Ok(());
    }
    if !pod.get("spec").is_some_and(Value::is_object) {
        return Ok(());
    }
    let spec = &mut pod["spec"];
    let name = spec["serviceAccountName"]
        .as_str()
        .filter(|s| !s.is_empty())
        .or_else(|| spec["serviceAccount"].as_str().filter(|s| !s.is_empty()))
        .unwrap_or("default")
        .to_string();
    spec["serviceAccountName"] = json!(name);
    spec["serviceAccount"] = json!(name);
    let Some(sa) = service_account(reg, ns, &name).await? else {
        let why = format!(
            "error looking up service account {ns}/{name}: serviceaccount \"{name}\" not found"
        );
        return Err(ApiError::forbidden("", "pods", meta_str(pod, "name"), &why));
    };
    let spec = &mut pod["spec"];
    let automount = spec["automountServiceAccountToken"]
        .as_bool()
        .or_else(|| sa["automountServiceAccountToken"].as_bool())
        .unwrap_or(true);
    if automount {
        mount_token(spec);
    }
    let has_pull_secrets = spec["imagePullSecrets"]
        .as_array()
        .is_some_and(|a| !a.is_empty());
    if !has_pull_secrets {
        if let Some(ips) = sa["imagePullSecrets"].as_array().filter(|a| !a.is_empty()) {
            let refs: Vec<Value> = ips.iter().map(|r| json!({"name": r["name"]})).collect();
            spec["imagePullSecrets"] = json!(refs);
        }
    }
    Ok(())
}

/// Adds the token volume and its mount in each container that has nothing at the mount path.
fn mount_token(spec: &mut Value) {
    let existing = spec["volumes"].as_array().and_then(|vs| {
        vs.iter()
            .map(|v| v["name"].as_str().unwrap_or(""))
            .find(|n| n.starts_with(VOLUME_PREFIX))
            .map(String::from)
    });
    let volume = existing
        .clone()
        .unwrap_or_else(|| format!("{VOLUME_PREFIX}{}", crate::registry::random_suffix()));
    let mount = json!({"name": volume, "readOnly": true, "mountPath": TOKEN_MOUNT_PATH});
    let mut needed = false;
    for key in ["initContainers", "containers"] {
        for c in spec
            .get_mut(key)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let taken = c["volumeMounts"]
                .as_array()
                .is_some_and(|ms| ms.iter().any(|m| m["mountPath"] == TOKEN_MOUNT_PATH));
            if taken {
                continue;
            }
            if !c["volumeMounts"].is_array() {
                c["volumeMounts"] = json!([]);
            }
            c["volumeMounts"]
                .as_array_mut()
                .expect("array")
                .push(mount.clone());
            needed = true;
        }
    }
    if needed && existing.is_none() {
        if !spec["volumes"].is_array() {
            spec["volumes"] = json!([]);
        }
        spec["volumes"]
            .as_array_mut()
            .expect("array")
            .push(json!({"name": volume, "projected": token_volume_source()}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_volume_in_every_container_without_one() {
        let mut spec = json!({
            "initContainers": [{"name": "i"}],
            "containers": [
                {"name": "a", "volumeMounts": [{"name": "x", "mountPath": "/x"}]},
                {"name": "b", "volumeMounts": [{"name": "own", "mountPath": TOKEN_MOUNT_PATH}]}
            ]
        });
        mount_token(&mut spec);
        let vols = spec["volumes"].as_array().unwrap();
        assert_eq!(vols.len(), 1);
        let name = vols[0]["name"].as_str().unwrap();
        let suffix = name.strip_prefix(VOLUME_PREFIX).unwrap();
        assert_eq!(suffix.len(), 5);
        assert!(suffix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_eq!(
            vols[0]["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"],
            3607
        );
        assert_eq!(spec["initContainers"][0]["volumeMounts"][0]["name"], name);
        assert_eq!(spec["containers"][0]["volumeMounts"][1]["readOnly"], true);
        assert_eq!(
            spec["containers"][1]["volumeMounts"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        // Admitting again (a volume is there) adds nothing.
        mount_token(&mut spec);
        assert_eq!(spec["volumes"].as_array().unwrap().len(), 1);
        assert_eq!(
            spec["containers"][0]["volumeMounts"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
