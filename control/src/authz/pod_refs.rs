//! What a pod references, and so what its node may read: secrets, config maps and its service
//! account.

use std::collections::BTreeSet;

use serde_json::Value;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRefs {
    pub secrets: BTreeSet<String>,
    pub config_maps: BTreeSet<String>,
    /// `spec.serviceAccountName`; `default` when unset, as the ServiceAccount admission plugin
    /// of kube-apiserver would have set it.
    pub service_account: String,
}

/// Volume sources whose `secretRef.name` names a secret.
const SECRET_REF_VOLUMES: &[&str] = &[
    "cephfs",
    "cinder",
    "flexVolume",
    "iscsi",
    "rbd",
    "scaleIO",
    "storageos",
];

fn items<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

fn name_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

impl PodRefs {
    pub fn of(pod: &Value) -> PodRefs {
        let spec = pod.get("spec").unwrap_or(&Value::Null);
        let mut r = PodRefs {
            service_account: name_at(spec, "/serviceAccountName")
                .or_else(|| name_at(spec, "/serviceAccount"))
                .unwrap_or("default")
                .to_string(),
            ..PodRefs::default()
        };
        let mut secret = |s: Option<&str>| {
            if let Some(s) = s {
                r.secrets.insert(s.to_string());
            }
        };
        for ips in items(spec, "imagePullSecrets") {
            secret(name_at(ips, "/name"));
        }
        for vol in items(spec, "volumes") {
            secret(name_at(vol, "/secret/secretName"));
            secret(name_at(vol, "/azureFile/secretName"));
            secret(name_at(vol, "/csi/nodePublishSecretRef/name"));
            for src in SECRET_REF_VOLUMES {
                secret(name_at(vol, &format!("/{src}/secretRef/name")));
            }
            for p in items(vol.get("projected").unwrap_or(&Value::Null), "sources") {
                secret(name_at(p, "/secret/name"));
            }
        }
        let containers = || {
            ["initContainers", "containers", "ephemeralContainers"]
                .into_iter()
                .flat_map(|k| items(spec, k))
        };
        for c in containers() {
            for e in items(c, "env") {
                secret(name_at(e, "/valueFrom/secretKeyRef/name"));
            }
            for e in items(c, "envFrom") {
                secret(name_at(e, "/secretRef/name"));
            }
        }
        let mut cm = |s: Option<&str>| {
            if let Some(s) = s {
                r.config_maps.insert(s.to_string());
            }
        };
        for vol in items(spec, "volumes") {
            cm(name_at(vol, "/configMap/name"));
            for p in items(vol.get("projected").unwrap_or(&Value::Null), "sources") {
                cm(name_at(p, "/configMap/name"));
            }
        }
        for c in containers() {
            for e in items(c, "env") {
                cm(name_at(e, "/valueFrom/configMapKeyRef/name"));
            }
            for e in items(c, "envFrom") {
                cm(name_at(e, "/configMapRef/name"));
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_kind_of_reference() {
        let pod = json!({"spec": {
            "serviceAccountName": "runner",
            "imagePullSecrets": [{"name": "pull"}],
            "volumes": [
                {"name": "a", "secret": {"secretName": "vol"}},
                {"name": "b", "configMap": {"name": "cm-vol"}},
                {"name": "c", "projected": {"sources": [
                    {"secret": {"name": "proj"}}, {"configMap": {"name": "cm-proj"}},
                    {"serviceAccountToken": {"path": "token"}}]}},
                {"name": "d", "csi": {"driver": "x", "nodePublishSecretRef": {"name": "csi"}}},
                {"name": "e", "emptyDir": {}}],
            "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "init-from"}}]}],
            "containers": [{"name": "c",
                "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "env", "key": "k"}}},
                        {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cm-env", "key": "k"}}},
                        {"name": "C", "value": "plain"}],
                "envFrom": [{"configMapRef": {"name": "cm-from"}}]}],
            "ephemeralContainers": [{"name": "dbg",
                "env": [{"name": "D", "valueFrom": {"secretKeyRef": {"name": "eph", "key": "k"}}}]}]}});
        let r = PodRefs::of(&pod);
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            r.secrets,
            set(&["csi", "env", "eph", "init-from", "proj", "pull", "vol"])
        );
        assert_eq!(
            r.config_maps,
            set(&["cm-env", "cm-from", "cm-proj", "cm-vol"])
        );
        assert_eq!(r.service_account, "runner");
        assert_eq!(
            PodRefs::of(&json!({"spec": {"containers": []}})).service_account,
            "default"
        );
    }
}
