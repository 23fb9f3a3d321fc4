//! Static pods, as kubelet's file source: every file in `--pod-manifest-path` holds one pod
//! (YAML or JSON). The agent runs them with the same workers as the API's pods, and keeps a
//! mirror pod of each in the API (annotation `kubernetes.io/config.mirror`, owned by the Node)
//! so that they can be seen, but not controlled, with kubectl. A pod's UID is a hash of its
//! file, node and path: a changed file is a new pod (the old one stops, the new one starts), a
//! removed file stops the pod and deletes its mirror.

use k8s_openapi::api::core::v1::{Node, Pod, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

pub const MIRROR: &str = "kubernetes.io/config.mirror";
pub const SOURCE: &str = "kubernetes.io/config.source";
pub const HASH: &str = "kubernetes.io/config.hash";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a pod: {detail}")]
    Decode { path: PathBuf, detail: String },
    #[error("{path}: the pod has no metadata.name")]
    NoName { path: PathBuf },
}

/// Whether a pod from the API is the mirror of a static pod.
pub fn is_mirror(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR))
}

/// The static pod UID a mirror pod stands for.
pub fn mirror_hash(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(MIRROR)
        .map(String::as_str)
}

/// Whether a pod the agent runs came from the manifest directory.
pub fn is_static(pod: &Pod) -> bool {
    !is_mirror(pod)
        && pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOURCE))
            .is_some_and(|s| s == "file")
}

/// The static pod a manifest file describes, with kubelet's defaults: name `<name>-<node>`,
/// namespace `default`, bound to the node, tolerating NoExecute taints, UID and config hash
/// from the file's content, node and path.
pub fn from_manifest(path: &Path, bytes: &[u8], node: &str) -> Result<Pod, ManifestError> {
    let decode = |detail: String| ManifestError::Decode {
        path: path.to_path_buf(),
        detail,
    };
    let value: serde_json::Value = if bytes.trim_ascii_start().starts_with(b"{") {
        serde_json::from_slice(bytes).map_err(|e| decode(e.to_string()))?
    } else {
        serde_yaml::from_slice(bytes).map_err(|e| decode(e.to_string()))?
    };
    if value.get("kind").and_then(|k| k.as_str()) != Some("Pod") {
        return Err(decode(format!(
            "kind is {}, not Pod",
            value.get("kind").unwrap_or(&serde_json::Value::Null)
        )));
    }
    let mut pod: Pod = serde_json::from_value(value).map_err(|e| decode(e.to_string()))?;
    let name = pod
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ManifestError::NoName {
            path: path.to_path_buf(),
        })?;
    let mut h = Sha256::new();
    h.update(bytes);
    h.update(format!("\0host:{node}\0file:{}", path.display()));
    let hash = hex::encode(&h.finalize()[..16]);
    let m = &mut pod.metadata;
    m.name = Some(format!("{name}-{}", node.to_lowercase()));
    m.namespace.get_or_insert_with(|| "default".into());
    m.uid = Some(hash.clone());
    let ann = m.annotations.get_or_insert_with(BTreeMap::new);
    ann.insert(HASH.into(), hash);
    ann.insert(SOURCE.into(), "file".into());
    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.node_name = Some(node.to_string());
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    tolerations.push(Toleration {
        operator: Some("Exists".into()),
        effect: Some("NoExecute".into()),
        ..Default::default()
    });
    Ok(pod)
}

/// The static pods of a manifest directory by UID (blocking). Unreadable files and files that
/// are not pods are logged and skipped, as kubelet does; hidden files are ignored.
pub fn read_dir(dir: &Path, node: &str) -> BTreeMap<String, Pod> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    paths.sort();
    for p in paths {
        let pod = std::fs::read(&p)
            .map_err(|source| ManifestError::Read {
                path: p.clone(),
                source,
            })
            .and_then(|b| from_manifest(&p, &b, node));
        match pod {
            Ok(pod) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                out.insert(uid, pod);
            }
            Err(e) => tracing::warn!(error = %e, "static pod manifest skipped"),
        }
    }
    out
}

/// The mirror of a static pod: its metadata and spec, marked and owned by the node.
pub fn mirror_of(pod: &Pod, node: &Node) -> Pod {
    let mut m = Pod {
        metadata: pod.metadata.clone(),
        spec: pod.spec.clone(),
        status: None,
    };
    let hash = pod.metadata.uid.clone().unwrap_or_default();
    m.metadata.uid = None;
    m.metadata.resource_version = None;
    m.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(MIRROR.into(), hash);
    m.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node.metadata.name.clone().unwrap_or_default(),
        uid: node.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }]);
    m
}

/// Brings the mirror pods in the API in line with the static pods (level-triggered): creates
/// missing ones, replaces outdated or deleted-and-terminating ones, deletes those of static
/// pods that are gone.
pub async fn sync_mirrors(
    client: &kube::Client,
    node_name: &str,
    statics: &BTreeMap<String, Pod>,
) -> Result<(), kube::Error> {
    let all: Api<Pod> = Api::all(client.clone());
    let listed = all
        .list(&ListParams::default().fields(&format!("spec.nodeName={node_name}")))
        .await?;
    let mut node: Option<Node> = None;
    let want: HashSet<(String, String)> = statics
        .values()
        .map(|p| {
            (
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    // Mirrors of static pods that are no more.
    for m in listed.items.iter().filter(|p| is_mirror(p)) {
        let key = (
            m.metadata.namespace.clone().unwrap_or_default(),
            m.metadata.name.clone().unwrap_or_default(),
        );
        if !want.contains(&key) {
            delete_mirror(client, m).await?;
        }
    }
    for pod in statics.values() {
        let (ns, name) = (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        let hash = pod.metadata.uid.clone().unwrap_or_default();
        let existing = listed.items.iter().find(|p| {
            p.metadata.namespace.as_deref() == Some(&ns)
                && p.metadata.name.as_deref() == Some(&name)
        });
        if let Some(e) = existing {
            let current = e
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(MIRROR))
                .is_some_and(|h| *h == hash);
            if current && e.metadata.deletion_timestamp.is_none() {
                continue;
            }
            if !is_mirror(e) {
                // A pod of the API holds the name: kubelet leaves it and runs the static pod
                // without a mirror.
                tracing::warn!(pod = %name, namespace = %ns, "a pod that is not a mirror has the static pod's name");
                continue;
            }
            delete_mirror(client, e).await?;
        }
        if node.is_none() {
            node = Some(Api::<Node>::all(client.clone()).get(node_name).await?);
        }
        let mirror = mirror_of(pod, node.as_ref().expect("node read"));
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        match api.create(&PostParams::default(), &mirror).await {
            Ok(_) => tracing::info!(pod = %name, namespace = %ns, "created mirror pod"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn delete_mirror(client: &kube::Client, m: &Pod) -> Result<(), kube::Error> {
    let api: Api<Pod> = Api::namespaced(
        client.clone(),
        m.metadata.namespace.as_deref().unwrap_or("default"),
    );
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: m.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api
        .delete(m.metadata.name.as_deref().unwrap_or_default(), &params)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  labels: {app: web}\nspec:\n  containers:\n  - name: c\n    image: busybox\n";

    #[test]
    fn manifests_get_kubelets_defaults() {
        let p = from_manifest(Path::new("/m/web.yaml"), YAML.as_bytes(), "Node-1").unwrap();
        assert_eq!(p.metadata.name.as_deref(), Some("web-node-1"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("default"));
        let uid = p.metadata.uid.clone().unwrap();
        assert_eq!(uid.len(), 32);
        let ann = p.metadata.annotations.clone().unwrap();
        assert_eq!(ann[HASH], uid);
        assert_eq!(ann[SOURCE], "file");
        let spec = p.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("Node-1"));
        assert_eq!(
            spec.tolerations.unwrap()[0].effect.as_deref(),
            Some("NoExecute")
        );
        // The same content elsewhere, or changed, is another pod.
        let other = from_manifest(Path::new("/m/web2.yaml"), YAML.as_bytes(), "Node-1").unwrap();
        assert_ne!(other.metadata.uid.unwrap(), uid);
        let json = serde_json::to_vec(&serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "j"}, "spec": {"containers": []}})).unwrap();
        assert!(from_manifest(Path::new("/m/j.json"), &json, "n").is_ok());
        assert!(from_manifest(
            Path::new("/m/x"),
            b"kind: Service\nmetadata: {name: s}\n",
            "n"
        )
        .is_err());
        assert!(from_manifest(
            Path::new("/m/x"),
            b"kind: Pod\nspec: {containers: []}\n",
            "n"
        )
        .is_err());
    }

    #[test]
    fn mirrors_are_marked_and_owned_by_the_node() {
        let p = from_manifest(Path::new("/m/web.yaml"), YAML.as_bytes(), "n1").unwrap();
        let node = Node {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("n1".into()),
                uid: Some("node-uid".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let m = mirror_of(&p, &node);
        assert!(is_mirror(&m) && !is_mirror(&p));
        assert_eq!(m.metadata.uid, None);
        assert_eq!(
            m.metadata.annotations.unwrap()[MIRROR],
            p.metadata.uid.unwrap()
        );
        let owner = &m.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Node", "n1", "node-uid")
        );
        assert_eq!(owner.controller, Some(true));
    }
}
