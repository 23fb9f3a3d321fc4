//! What a node may do: Kubernetes' Node authorizer and NodeRestriction admission plugin, for
//! the resources this server serves.
//!
//! Relationships (is this pod bound to the node, does one of its pods reference this secret)
//! are read from the registry at each request rather than kept in a graph as kube-apiserver
//! does; see `referenced`.

use serde_json::Value;

use super::{Attributes, Decision, PodRefs, Verb};
use crate::registry::{meta_str, ListOptions, Registry};
use crate::resources;
use crate::select::FieldSelector;

/// The annotation that marks a mirror pod (the API's copy of a node's static pod).
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The namespace of node leases (heartbeats).
pub const LEASE_NAMESPACE: &str = "kube-node-lease";

fn no_relationship(node: &str) -> Decision {
    Decision::deny(format!(
        "no relationship found between node '{node}' and this object"
    ))
}

fn is_read(v: &Verb) -> bool {
    matches!(v, Verb::Get | Verb::List | Verb::Watch)
}

pub(super) fn authorize(reg: &Registry, node: &str, a: &Attributes) -> Decision {
    let sub = a.subresource.as_str();
    match (a.group.as_str(), a.resource.as_str()) {
        ("", "nodes") => nodes(node, a),
        ("", "services" | "endpoints" | "namespaces") | ("discovery.k8s.io", "endpointslices")
            if sub.is_empty() && is_read(&a.verb) =>
        {
            Decision::Allow
        }
        ("", "pods") => pods(reg, node, a),
        ("", "secrets" | "configmaps") => read_referenced(reg, node, a),
        ("", "serviceaccounts") => service_accounts(reg, node, a),
        ("coordination.k8s.io", "leases") => lease(node, a),
        ("", "events") if sub.is_empty() => match a.verb {
            Verb::Create | Verb::Update | Verb::Patch => Decision::Allow,
            _ => Decision::deny(""),
        },
        ("authentication.k8s.io", "selfsubjectreviews")
        | ("authorization.k8s.io", "selfsubjectaccessreviews")
            if a.verb == Verb::Create =>
        {
            Decision::Allow
        }
        _ => Decision::deny(""),
    }
}

fn modify_node(node: &str, name: &str) -> Decision {
    if name == node {
        Decision::Allow
    } else {
        Decision::restrict(format!(
            "node {node:?} is not allowed to modify node {name:?}"
        ))
    }
}

/// Any node may be read; only its own may be created or written, status included. A create
/// names its node in the body only, which `admit` checks.
fn nodes(node: &str, a: &Attributes) -> Decision {
    match (a.subresource.as_str(), &a.verb) {
        ("" | "status", v) if is_read(v) => Decision::Allow,
        ("", Verb::Create) if a.name.is_empty() => Decision::Allow,
        ("", Verb::Create) | ("" | "status", Verb::Update | Verb::Patch) => {
            modify_node(node, &a.name)
        }
        _ => Decision::deny(""),
    }
}

/// The node a stored pod is bound to, if the pod exists.
fn pod_node(reg: &Registry, ns: &str, name: &str) -> Option<String> {
    let pod = reg.get(resources::get("", "pods"), Some(ns), name).ok()?;
    Some(
        pod.pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    )
}

fn pods(reg: &Registry, node: &str, a: &Attributes) -> Decision {
    let bound = || pod_node(reg, &a.namespace, &a.name);
    match (a.subresource.as_str(), &a.verb) {
        ("", Verb::Get) => match bound() {
            Some(n) if n == node => Decision::Allow,
            _ => no_relationship(node),
        },
        ("", Verb::List | Verb::Watch) => {
            if a.fields.requires("spec.nodeName", node) {
                Decision::Allow
            } else if !a.name.is_empty() {
                match bound() {
                    Some(n) if n == node => Decision::Allow,
                    _ => no_relationship(node),
                }
            } else {
                Decision::deny("can only list/watch pods with spec.nodeName field selector")
            }
        }
        // The kubelet deletes the pods it has terminated, and reports its pods' status. A pod
        // that is not there is left to the handler's 404, as NodeRestriction does.
        ("", Verb::Delete) => match bound() {
            Some(n) if n != node => Decision::restrict(format!(
                "node {node:?} can only delete pods with spec.nodeName set to itself"
            )),
            _ => Decision::Allow,
        },
        ("status", Verb::Update | Verb::Patch) => match bound() {
            Some(n) if n != node => Decision::restrict(format!(
                "node {node:?} can only update pod status for pods with spec.nodeName set to itself"
            )),
            _ => Decision::Allow,
        },
        // Mirror pods of the node's static pods; `admit` checks the object.
        ("", Verb::Create) => Decision::Allow,
        _ => Decision::deny(""),
    }
}

/// NodeRestriction on a pod a node creates: only a mirror pod, bound to the node, owned by it
/// at most, referencing no other object.
fn mirror_pod(node: &str, pod: &Value) -> Decision {
    let has_mirror = pod
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION));
    if !has_mirror {
        return Decision::restrict(format!(
            "pod does not have \"{MIRROR_ANNOTATION}\" annotation, node {node:?} can only create mirror pods"
        ));
    }
    if pod.pointer("/spec/nodeName").and_then(Value::as_str) != Some(node) {
        return Decision::restrict(format!(
            "node {node:?} can only create pods with spec.nodeName set to itself"
        ));
    }
    let owners = pod
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if owners.len() > 1 {
        return Decision::restrict(format!(
            "node {node:?} can only create pods with a single owner reference set to itself"
        ));
    }
    if let Some(o) = owners.first() {
        if o["apiVersion"] != "v1" || o["kind"] != "Node" || o["name"] != node {
            return Decision::restrict(format!(
                "node {node:?} can only create pods with an owner reference set to itself"
            ));
        }
        if o["controller"] != true {
            return Decision::restrict(format!(
                "node {node:?} can only create pods with a controller owner reference set to itself"
            ));
        }
        if o["blockOwnerDeletion"] == true {
            return Decision::restrict(format!(
                "node {node:?} must not set blockOwnerDeletion on an owner reference"
            ));
        }
    }
    let sa = pod
        .pointer("/spec/serviceAccountName")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !sa.is_empty() {
        return Decision::restrict(format!(
            "node {node:?} can not create pods that reference a service account"
        ));
    }
    let refs = PodRefs::of(pod);
    if !refs.secrets.is_empty() {
        return Decision::restrict(format!(
            "node {node:?} can not create pods that reference secrets"
        ));
    }
    if !refs.config_maps.is_empty() {
        return Decision::restrict(format!(
            "node {node:?} can not create pods that reference configmaps"
        ));
    }
    let claims = pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .is_some_and(|v| v.iter().any(|v| v.get("persistentVolumeClaim").is_some()));
    if claims {
        return Decision::restrict(format!(
            "node {node:?} can not create pods that reference persistentvolumeclaims"
        ));
    }
    Decision::Allow
}

/// Which objects a relationship check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Secret,
    ConfigMap,
    ServiceAccount,
}

/// Whether a pod bound to `node` in `ns` references object `name` of `kind`.
///
/// Cost: one read of the namespace's pods (decoded, then filtered on spec.nodeName) per
/// request, which is fine at this server's scale and for a kubelet that reads a secret when it
/// starts a pod. Kubernetes keeps a graph of pods and what they reference instead; this would
/// be the place for one if namespaces grow to thousands of pods.
fn referenced(reg: &Registry, node: &str, ns: &str, kind: Kind, name: &str) -> bool {
    let opts = ListOptions {
        fields: FieldSelector::parse(&format!("spec.nodeName={node}")).unwrap_or_default(),
        ..ListOptions::default()
    };
    let Ok(pods) = reg.list(resources::get("", "pods"), Some(ns), &opts) else {
        return false;
    };
    // A terminating pod (deletionTimestamp set) still counts, as in Kubernetes' graph: its
    // kubelet runs it until it is gone.
    pods.items.iter().any(|p| {
        let refs = PodRefs::of(p);
        match kind {
            Kind::Secret => refs.secrets.contains(name),
            Kind::ConfigMap => refs.config_maps.contains(name),
            Kind::ServiceAccount => refs.service_account == name,
        }
    })
}

/// Secrets and config maps: `get`, or `list`/`watch` pinned by `metadata.name=` (the kubelet's
/// watch-based secret and config map managers), of one referenced by a pod on the node.
fn read_referenced(reg: &Registry, node: &str, a: &Attributes) -> Decision {
    let kind = if a.resource == "secrets" {
        Kind::Secret
    } else {
        Kind::ConfigMap
    };
    if !matches!(a.verb, Verb::Get | Verb::List | Verb::Watch) {
        return Decision::deny("can only read resources of this type");
    }
    if !a.subresource.is_empty() {
        return Decision::deny("cannot read subresource");
    }
    if a.namespace.is_empty() {
        return Decision::deny("can only read namespaced object of this type");
    }
    if a.name.is_empty() {
        return Decision::deny("No Object name found");
    }
    if referenced(reg, node, &a.namespace, kind, &a.name) {
        Decision::Allow
    } else {
        no_relationship(node)
    }
}

/// Service accounts: `get` of, and TokenRequests for, one that a pod on the node runs as.
fn service_accounts(reg: &Registry, node: &str, a: &Attributes) -> Decision {
    match (a.subresource.as_str(), &a.verb) {
        ("", Verb::Get) | ("token", Verb::Create) => {}
        (_, Verb::Create) => {
            return Decision::deny("can only create token subresource of serviceaccount")
        }
        _ => return Decision::deny("can only create tokens for individual service accounts"),
    }
    if a.namespace.is_empty() || a.name.is_empty() {
        return Decision::deny("No Object name found");
    }
    if referenced(reg, node, &a.namespace, Kind::ServiceAccount, &a.name) {
        Decision::Allow
    } else {
        no_relationship(node)
    }
}

const LEASE_NAME: &str = "can only access node lease with the same name as the requesting node";

/// Leases: its own, in `kube-node-lease`. A create names its lease in the body only, which
/// `admit` checks.
fn lease(node: &str, a: &Attributes) -> Decision {
    match a.verb {
        Verb::Get | Verb::Create | Verb::Update | Verb::Patch | Verb::Delete
            if a.subresource.is_empty() => {}
        _ => return Decision::deny("can only get, create, update, patch, or delete a node lease"),
    }
    if a.namespace != LEASE_NAMESPACE {
        return Decision::deny(format!(
            "can only access leases in the {LEASE_NAMESPACE:?} system namespace"
        ));
    }
    if a.name != node && !(a.verb == Verb::Create && a.name.is_empty()) {
        return Decision::deny(LEASE_NAME);
    }
    Decision::Allow
}

pub(super) fn needs_object(a: &Attributes) -> bool {
    if a.verb != Verb::Create {
        return false;
    }
    matches!(
        (
            a.group.as_str(),
            a.resource.as_str(),
            a.subresource.as_str()
        ),
        ("", "nodes", "")
            | ("", "pods", "")
            | ("", "serviceaccounts", "token")
            | ("coordination.k8s.io", "leases", "")
    )
}

/// What NodeRestriction checks in the object of an authorized create.
pub(super) fn admit(reg: &Registry, node: &str, a: &Attributes, obj: &Value) -> Decision {
    if !needs_object(a) {
        return Decision::Allow;
    }
    match a.resource.as_str() {
        "nodes" => modify_node(node, meta_str(obj, "name")),
        "leases" if meta_str(obj, "name") != node => Decision::restrict(LEASE_NAME),
        "serviceaccounts" => token_binding(reg, node, a, obj),
        "pods" => mirror_pod(node, obj),
        _ => Decision::Allow,
    }
}

/// A token a node asks for may be bound to a pod only if that pod is on the node. (Kubernetes
/// requires the binding; here an unbound token for a service account of one of the node's pods
/// is allowed too.)
fn token_binding(reg: &Registry, node: &str, a: &Attributes, tr: &Value) -> Decision {
    let bound = &tr["spec"]["boundObjectRef"];
    if bound.is_null() {
        return Decision::Allow;
    }
    let name = bound["name"].as_str().unwrap_or("");
    if bound["kind"] != "Pod" || name.is_empty() {
        return Decision::restrict("node requested token not bound to a pod");
    }
    let Ok(pod) = reg.get(resources::get("", "pods"), Some(&a.namespace), name) else {
        // Not there: the token request itself answers 404.
        return Decision::Allow;
    };
    let uid = bound["uid"].as_str().unwrap_or("");
    if !uid.is_empty() && uid != meta_str(&pod, "uid") {
        return Decision::restrict(format!(
            "the UID in the bound object reference ({uid}) does not match the UID in record. \
             The object might have been deleted and then recreated"
        ));
    }
    if pod.pointer("/spec/nodeName").and_then(Value::as_str) != Some(node) {
        return Decision::restrict(
            "node requested token bound to a pod scheduled on a different node",
        );
    }
    Decision::Allow
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Write;
    use crate::store::Store;
    use serde_json::json;

    fn attrs(verb: &str, resource: &str, ns: &str, name: &str) -> Attributes {
        let (group, resource) = resource
            .split_once('.')
            .map_or(("", resource), |(r, g)| (g, r));
        let (resource, sub) = resource.split_once('/').unwrap_or((resource, ""));
        Attributes {
            verb: Verb::parse(verb),
            group: group.into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
            fields: FieldSelector::default(),
        }
    }

    async fn registry() -> Registry {
        let reg = Registry::new(Store::open_in_memory().unwrap());
        crate::namespaces::bootstrap(&reg).await.unwrap();
        let pods = resources::get("", "pods");
        let pod = json!({"metadata": {"name": "web"}, "spec": {"nodeName": "n1",
            "serviceAccountName": "runner",
            "volumes": [{"name": "v", "secret": {"secretName": "tls"}}],
            "containers": [{"name": "c", "image": "i",
                "envFrom": [{"configMapRef": {"name": "settings"}}]}]}});
        reg.create(pods, Some("default"), pod, Write::NONE)
            .await
            .unwrap();
        let other = json!({"metadata": {"name": "db"}, "spec": {"nodeName": "n2",
            "containers": [{"name": "c", "image": "i"}]}});
        reg.create(pods, Some("default"), other, Write::NONE)
            .await
            .unwrap();
        reg
    }

    #[tokio::test]
    async fn a_node_reads_what_its_pods_need_and_writes_its_own() {
        let reg = registry().await;
        let d = |verb, res, ns, name| authorize(&reg, "n1", &attrs(verb, res, ns, name));
        let ok = Decision::Allow;
        let none = || no_relationship("n1");
        for res in [
            "nodes",
            "services",
            "endpoints",
            "namespaces",
            "endpointslices.discovery.k8s.io",
        ] {
            assert_eq!(d("list", res, "", ""), ok, "{res}");
            assert_eq!(d("watch", res, "", ""), ok, "{res}");
        }
        assert_eq!(d("get", "nodes", "", "n2"), ok);
        assert_eq!(d("update", "nodes/status", "", "n1"), ok);
        assert_eq!(
            d("patch", "nodes", "", "n2"),
            Decision::restrict("node \"n1\" is not allowed to modify node \"n2\"")
        );
        assert_eq!(d("delete", "nodes", "", "n1"), Decision::deny(""));
        assert_eq!(d("delete", "services", "default", "s"), Decision::deny(""));

        assert_eq!(d("get", "pods", "default", "web"), ok);
        assert_eq!(d("get", "pods", "default", "db"), none());
        assert_eq!(d("get", "pods", "default", "missing"), none());
        assert_eq!(
            d("list", "pods", "", ""),
            Decision::deny("can only list/watch pods with spec.nodeName field selector")
        );
        let mut scoped = attrs("watch", "pods", "", "");
        scoped.fields = FieldSelector::parse("spec.nodeName=n1").unwrap();
        assert_eq!(authorize(&reg, "n1", &scoped), ok);
        assert_ne!(authorize(&reg, "n2", &scoped), ok);
        assert_eq!(d("patch", "pods/status", "default", "web"), ok);
        assert!(matches!(
            d("update", "pods/status", "default", "db"),
            Decision::Restrict { .. }
        ));
        assert_eq!(d("delete", "pods", "default", "web"), ok);
        assert!(matches!(
            d("delete", "pods", "default", "db"),
            Decision::Restrict { .. }
        ));
        assert_eq!(d("create", "pods", "default", ""), ok);
        assert_eq!(d("get", "pods/log", "default", "web"), Decision::deny(""));

        assert_eq!(d("get", "secrets", "default", "tls"), ok);
        assert_eq!(d("get", "secrets", "default", "other"), none());
        assert_eq!(d("get", "secrets", "kube-system", "tls"), none());
        assert_eq!(
            d("get", "secrets", "default", ""),
            Decision::deny("No Object name found")
        );
        assert_ne!(d("list", "secrets", "default", ""), ok);
        // list/watch pinned to one name (`metadata.name=`) carry that name.
        assert_eq!(d("watch", "secrets", "default", "tls"), ok);
        assert_eq!(d("list", "configmaps", "default", "other"), none());
        assert_ne!(d("update", "secrets", "default", "tls"), ok);
        assert_eq!(d("get", "configmaps", "default", "settings"), ok);
        assert_eq!(d("get", "serviceaccounts", "default", "runner"), ok);
        assert_eq!(
            d("create", "serviceaccounts/token", "default", "runner"),
            ok
        );
        assert_eq!(
            d("create", "serviceaccounts/token", "default", "default"),
            none()
        );
        // n2's pod runs as `default`.
        assert_eq!(
            authorize(
                &reg,
                "n2",
                &attrs("create", "serviceaccounts/token", "default", "default")
            ),
            ok
        );
        assert_eq!(
            authorize(&reg, "n2", &attrs("get", "secrets", "default", "tls")),
            no_relationship("n2")
        );

        assert_eq!(
            d(
                "update",
                "leases.coordination.k8s.io",
                LEASE_NAMESPACE,
                "n1"
            ),
            ok
        );
        assert_eq!(
            d("create", "leases.coordination.k8s.io", LEASE_NAMESPACE, ""),
            ok
        );
        assert_eq!(
            d("get", "leases.coordination.k8s.io", LEASE_NAMESPACE, "n2"),
            Decision::deny(LEASE_NAME)
        );
        assert!(matches!(
            d("get", "leases.coordination.k8s.io", "default", "n1"),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            d("list", "leases.coordination.k8s.io", LEASE_NAMESPACE, ""),
            Decision::Deny { .. }
        ));

        assert_eq!(d("create", "events", "default", ""), ok);
        assert_eq!(d("get", "events", "default", "e"), Decision::deny(""));
        assert_eq!(
            d("get", "deployments.apps", "default", "d"),
            Decision::deny("")
        );
    }

    #[tokio::test]
    async fn creates_are_admitted_by_their_object() {
        let reg = registry().await;
        let a = |res| attrs("create", res, "", "");
        let adm = |a: &Attributes, obj| admit(&reg, "n1", a, &obj);
        assert_eq!(
            adm(&a("nodes"), json!({"metadata": {"name": "n1"}})),
            Decision::Allow
        );
        assert!(matches!(
            adm(&a("nodes"), json!({"metadata": {"name": "n2"}})),
            Decision::Restrict { .. }
        ));
        let lease = attrs("create", "leases.coordination.k8s.io", LEASE_NAMESPACE, "");
        assert_eq!(
            adm(&lease, json!({"metadata": {"name": "n1"}})),
            Decision::Allow
        );
        assert_eq!(
            adm(&lease, json!({"metadata": {"name": "n2"}})),
            Decision::restrict(LEASE_NAME)
        );
        let token = attrs("create", "serviceaccounts/token", "default", "default");
        assert_eq!(adm(&token, json!({"spec": {}})), Decision::Allow);
        let bound = |pod: &str| json!({"spec": {"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod}}});
        assert_eq!(adm(&token, bound("web")), Decision::Allow);
        assert_eq!(
            adm(&token, bound("db")),
            Decision::restrict("node requested token bound to a pod scheduled on a different node")
        );
        let pod = attrs("create", "pods", "default", "");
        let mirror = |extra: serde_json::Value| {
            let mut p = json!({"metadata": {"name": "web-n1",
                "annotations": {"kubernetes.io/config.mirror": "h"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "u", "controller": true}]},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]}});
            for (path, v) in extra.as_object().unwrap() {
                *p.pointer_mut(path).unwrap() = v.clone();
            }
            p
        };
        assert_eq!(adm(&pod, mirror(json!({}))), Decision::Allow);
        for (extra, why) in [
            (json!({"/metadata/annotations": {}}), "pod does not have \"kubernetes.io/config.mirror\" annotation, node \"n1\" can only create mirror pods"),
            (json!({"/spec/nodeName": "n2"}), "node \"n1\" can only create pods with spec.nodeName set to itself"),
            (json!({"/metadata/ownerReferences/0/name": "n2"}), "node \"n1\" can only create pods with an owner reference set to itself"),
            (json!({"/metadata/ownerReferences/0/controller": false}), "node \"n1\" can only create pods with a controller owner reference set to itself"),
            (json!({"/spec/containers/0": {"name": "c", "image": "i", "envFrom": [{"secretRef": {"name": "s"}}]}}), "node \"n1\" can not create pods that reference secrets"),
            (json!({"/spec/containers/0": {"name": "c", "image": "i", "envFrom": [{"configMapRef": {"name": "m"}}]}}), "node \"n1\" can not create pods that reference configmaps"),
        ] {
            assert_eq!(adm(&pod, mirror(extra)), Decision::restrict(why));
        }
        let secret = json!({"kind": "Secret", "name": "x"});
        assert_eq!(
            adm(&token, json!({"spec": {"boundObjectRef": secret}})),
            Decision::restrict("node requested token not bound to a pod")
        );
    }
}
