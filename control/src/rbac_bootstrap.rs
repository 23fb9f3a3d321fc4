//! The bootstrap RBAC policy, reconciled at every API server start as kube-apiserver's
//! `rbac/bootstrap-roles` post-start hook does: a missing role or binding is created, an
//! existing one gets the rules, aggregation selectors and subjects it lacks, and one annotated
//! `rbac.authorization.kubernetes.io/autoupdate: "false"` is left as its owner made it.
//!
//! The roles are upstream's (cluster-admin, admin/edit/view aggregated by the
//! `rbac.authorization.k8s.io/aggregate-to-*` labels, system:basic-user, system:discovery,
//! system:public-info-viewer, system:node-proxier, system:kube-scheduler) for the resources
//! oxlet serves. The in-process controllers all run as `system:kube-controller-manager`
//! (there are no per-controller service accounts), so that role holds what upstream's
//! controller roles hold for the controllers oxlet runs. Cluster DNS runs as
//! `system:serviceaccount:kube-system:coredns` with CoreDNS's `system:coredns` rules, plus a
//! Role in kube-system for the kube-dns Service and EndpointSlice it maintains.

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::{json, Value};
use tracing::{debug, info};

use crate::authz::escalation;
use crate::registry::{meta_str, Registry, Write};
use crate::resources::{self, RBAC_GROUP};
use crate::status::ApiError;

pub const AUTOUPDATE: &str = "rbac.authorization.kubernetes.io/autoupdate";
const BOOTSTRAPPING: &str = "kubernetes.io/bootstrapping";
const AGGREGATE: &str = "rbac.authorization.k8s.io/aggregate-to-";

const READ: &[&str] = &["get", "list", "watch"];
const WRITE: &[&str] = &["create", "delete", "deletecollection", "patch", "update"];
const READ_WRITE: &[&str] = &[
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
];

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

fn named(groups: &[&str], resources: &[&str], names: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "resourceNames": names, "verbs": verbs})
}

fn urls(urls: &[&str], verbs: &[&str]) -> Value {
    json!({"nonResourceURLs": urls, "verbs": verbs})
}

fn events() -> Value {
    rule(
        &["", "events.k8s.io"],
        &["events"],
        &["create", "update", "patch"],
    )
}

fn labelled(labels: &[(&str, &str)]) -> Value {
    let mut m = serde_json::Map::new();
    m.insert(BOOTSTRAPPING.into(), json!("rbac-defaults"));
    for (k, v) in labels {
        m.insert(k.to_string(), json!(v));
    }
    Value::Object(m)
}

fn role(
    kind: &str,
    ns: Option<&str>,
    name: &str,
    labels: &[(&str, &str)],
    rules: Vec<Value>,
) -> Value {
    let mut meta = json!({"name": name, "labels": labelled(labels),
        "annotations": {AUTOUPDATE: "true"}});
    if let Some(ns) = ns {
        meta["namespace"] = json!(ns);
    }
    json!({"apiVersion": format!("{RBAC_GROUP}/v1"), "kind": kind, "metadata": meta, "rules": rules})
}

fn cluster_role(name: &str, rules: Vec<Value>) -> Value {
    role("ClusterRole", None, name, &[], rules)
}

/// An aggregated ClusterRole (`admin`, `edit`, `view`), itself labelled to feed `feeds`.
fn aggregated(name: &str, feeds: Option<&str>) -> Value {
    let label = feeds.map(|f| format!("{AGGREGATE}{f}"));
    let labels: Vec<(&str, &str)> = label.iter().map(|l| (l.as_str(), "true")).collect();
    let mut r = role("ClusterRole", None, name, &labels, vec![]);
    r["aggregationRule"] = json!({"clusterRoleSelectors": [
        {"matchLabels": {format!("{AGGREGATE}{name}"): "true"}}]});
    r
}

/// A ClusterRole whose rules are aggregated into `into`.
fn aggregate_to(into: &str, rules: Vec<Value>) -> Value {
    let label = format!("{AGGREGATE}{into}");
    role(
        "ClusterRole",
        None,
        &format!("system:aggregate-to-{into}"),
        &[(label.as_str(), "true")],
        rules,
    )
}

fn binding(
    kind: &str,
    ns: Option<&str>,
    name: &str,
    role_kind: &str,
    subjects: Vec<Value>,
) -> Value {
    let mut meta = json!({"name": name, "labels": labelled(&[]),
        "annotations": {AUTOUPDATE: "true"}});
    if let Some(ns) = ns {
        meta["namespace"] = json!(ns);
    }
    json!({"apiVersion": format!("{RBAC_GROUP}/v1"), "kind": kind, "metadata": meta,
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": role_kind, "name": name}, "subjects": subjects})
}

fn group(name: &str) -> Value {
    json!({"apiGroup": RBAC_GROUP, "kind": "Group", "name": name})
}

fn user(name: &str) -> Value {
    json!({"apiGroup": RBAC_GROUP, "kind": "User", "name": name})
}

fn service_account(ns: &str, name: &str) -> Value {
    json!({"kind": "ServiceAccount", "namespace": ns, "name": name})
}

/// The identity cluster DNS runs as.
pub const COREDNS_USER: &str = "system:serviceaccount:kube-system:coredns";

/// The bootstrap ClusterRoles.
pub fn cluster_roles() -> Vec<Value> {
    let health = ["/healthz", "/livez", "/readyz", "/version", "/version/"];
    let mut discovery: Vec<&str> = health.to_vec();
    discovery.extend([
        "/api",
        "/api/*",
        "/apis",
        "/apis/*",
        "/openapi",
        "/openapi/*",
    ]);
    vec![
        cluster_role(
            "cluster-admin",
            vec![rule(&["*"], &["*"], &["*"]), urls(&["*"], &["*"])],
        ),
        cluster_role("system:discovery", vec![urls(&discovery, &["get"])]),
        cluster_role("system:public-info-viewer", vec![urls(&health, &["get"])]),
        cluster_role(
            "system:basic-user",
            vec![
                rule(
                    &["authorization.k8s.io"],
                    &["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                    &["create"],
                ),
                rule(
                    &["authentication.k8s.io"],
                    &["selfsubjectreviews"],
                    &["create"],
                ),
            ],
        ),
        aggregated("admin", None),
        aggregated("edit", Some("admin")),
        aggregated("view", Some("edit")),
        aggregate_to(
            "admin",
            vec![
                rule(
                    &["authorization.k8s.io"],
                    &["localsubjectaccessreviews"],
                    &["create"],
                ),
                rule(&[RBAC_GROUP], &["rolebindings", "roles"], READ_WRITE),
            ],
        ),
        aggregate_to(
            "edit",
            vec![
                rule(
                    &[""],
                    &[
                        "pods",
                        "pods/attach",
                        "pods/exec",
                        "pods/portforward",
                        "pods/proxy",
                    ],
                    WRITE,
                ),
                rule(&[""], &["pods/eviction"], &["create"]),
                rule(
                    &[""],
                    &[
                        "configmaps",
                        "events",
                        "persistentvolumeclaims",
                        "replicationcontrollers",
                        "replicationcontrollers/scale",
                        "secrets",
                        "serviceaccounts",
                        "services",
                        "services/proxy",
                    ],
                    WRITE,
                ),
                rule(&[""], &["serviceaccounts/token"], &["create"]),
                rule(
                    &["apps"],
                    &[
                        "daemonsets",
                        "deployments",
                        "deployments/rollback",
                        "deployments/scale",
                        "replicasets",
                        "replicasets/scale",
                        "statefulsets",
                        "statefulsets/scale",
                    ],
                    WRITE,
                ),
                rule(&["autoscaling"], &["horizontalpodautoscalers"], WRITE),
                rule(&["batch"], &["cronjobs", "jobs"], WRITE),
                rule(&["policy"], &["poddisruptionbudgets"], WRITE),
                rule(
                    &["networking.k8s.io"],
                    &["ingresses", "networkpolicies"],
                    WRITE,
                ),
                rule(
                    &[""],
                    &[
                        "pods/attach",
                        "pods/exec",
                        "pods/portforward",
                        "pods/proxy",
                        "secrets",
                        "services/proxy",
                    ],
                    READ,
                ),
                rule(&[""], &["serviceaccounts"], &["impersonate"]),
            ],
        ),
        aggregate_to(
            "view",
            vec![
                rule(
                    &[""],
                    &[
                        "configmaps",
                        "endpoints",
                        "persistentvolumeclaims",
                        "persistentvolumeclaims/status",
                        "pods",
                        "replicationcontrollers",
                        "replicationcontrollers/scale",
                        "serviceaccounts",
                        "services",
                        "services/status",
                    ],
                    READ,
                ),
                rule(
                    &[""],
                    &[
                        "bindings",
                        "events",
                        "limitranges",
                        "namespaces/status",
                        "pods/log",
                        "pods/status",
                        "replicationcontrollers/status",
                        "resourcequotas",
                        "resourcequotas/status",
                    ],
                    READ,
                ),
                rule(&[""], &["namespaces"], READ),
                rule(&["discovery.k8s.io"], &["endpointslices"], READ),
                rule(
                    &["apps"],
                    &[
                        "controllerrevisions",
                        "daemonsets",
                        "daemonsets/status",
                        "deployments",
                        "deployments/scale",
                        "deployments/status",
                        "replicasets",
                        "replicasets/scale",
                        "replicasets/status",
                        "statefulsets",
                        "statefulsets/scale",
                        "statefulsets/status",
                    ],
                    READ,
                ),
                rule(
                    &["autoscaling"],
                    &[
                        "horizontalpodautoscalers",
                        "horizontalpodautoscalers/status",
                    ],
                    READ,
                ),
                rule(
                    &["batch"],
                    &["cronjobs", "cronjobs/status", "jobs", "jobs/status"],
                    READ,
                ),
                rule(
                    &["policy"],
                    &["poddisruptionbudgets", "poddisruptionbudgets/status"],
                    READ,
                ),
                rule(
                    &["networking.k8s.io"],
                    &["ingresses", "ingresses/status", "networkpolicies"],
                    READ,
                ),
            ],
        ),
        cluster_role(
            "system:node-proxier",
            vec![
                rule(&[""], &["endpoints", "services"], &["list", "watch"]),
                rule(&[""], &["nodes"], READ),
                events(),
                rule(
                    &["discovery.k8s.io"],
                    &["endpointslices"],
                    &["list", "watch"],
                ),
            ],
        ),
        cluster_role(
            "system:kube-scheduler",
            vec![
                events(),
                rule(&["coordination.k8s.io"], &["leases"], &["create"]),
                named(
                    &["coordination.k8s.io"],
                    &["leases"],
                    &["kube-scheduler"],
                    &["get", "update"],
                ),
                rule(&[""], &["nodes"], READ),
                rule(&[""], &["namespaces"], READ),
                rule(&[""], &["pods"], &["get", "list", "watch", "delete"]),
                rule(&[""], &["bindings", "pods/binding"], &["create"]),
                rule(&[""], &["pods/status"], &["patch", "update"]),
                rule(&[""], &["replicationcontrollers", "services"], READ),
                rule(&["apps"], &["replicasets", "statefulsets"], READ),
                rule(&["policy"], &["poddisruptionbudgets"], READ),
                rule(
                    &[""],
                    &["persistentvolumeclaims", "persistentvolumes"],
                    READ,
                ),
                rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
                rule(
                    &["authorization.k8s.io"],
                    &["subjectaccessreviews"],
                    &["create"],
                ),
                rule(
                    &["storage.k8s.io"],
                    &[
                        "csidrivers",
                        "csinodes",
                        "csistoragecapacities",
                        "storageclasses",
                    ],
                    READ,
                ),
            ],
        ),
        cluster_role(
            "system:kube-controller-manager",
            vec![
                events(),
                rule(&["coordination.k8s.io"], &["leases"], READ_WRITE),
                rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
                rule(
                    &["authorization.k8s.io"],
                    &["subjectaccessreviews"],
                    &["create"],
                ),
                rule(
                    &[""],
                    &["namespaces", "serviceaccounts", "secrets", "configmaps"],
                    READ,
                ),
                rule(&[""], &["services", "services/status"], READ),
                rule(
                    &[""],
                    &["nodes"],
                    &["get", "list", "watch", "patch", "update", "delete"],
                ),
                rule(&[""], &["nodes/status"], &["patch", "update"]),
                rule(&[""], &["pods"], READ_WRITE),
                rule(&[""], &["pods/status"], &["patch", "update"]),
                rule(&[""], &["pods/eviction"], &["create"]),
                rule(&[""], &["endpoints"], READ_WRITE),
                rule(&["discovery.k8s.io"], &["endpointslices"], READ_WRITE),
                rule(
                    &["apps"],
                    &[
                        "deployments",
                        "replicasets",
                        "daemonsets",
                        "controllerrevisions",
                    ],
                    READ_WRITE,
                ),
                rule(
                    &["apps"],
                    &[
                        "deployments/status",
                        "deployments/finalizers",
                        "replicasets/status",
                        "replicasets/finalizers",
                        "daemonsets/status",
                        "daemonsets/finalizers",
                        "deployments/scale",
                        "replicasets/scale",
                    ],
                    &["get", "patch", "update"],
                ),
                rule(&["batch"], &["jobs"], READ_WRITE),
                rule(
                    &["batch"],
                    &["jobs/status", "jobs/finalizers"],
                    &["get", "patch", "update"],
                ),
            ],
        ),
        cluster_role(
            "system:coredns",
            vec![
                rule(
                    &[""],
                    &["endpoints", "services", "pods", "namespaces"],
                    &["list", "watch"],
                ),
                rule(
                    &["discovery.k8s.io"],
                    &["endpointslices"],
                    &["list", "watch"],
                ),
                rule(&[""], &["nodes"], &["get", "list", "watch"]),
            ],
        ),
    ]
}

/// The bootstrap ClusterRoleBindings.
pub fn cluster_role_bindings() -> Vec<Value> {
    let crb =
        |name: &str, subjects| binding("ClusterRoleBinding", None, name, "ClusterRole", subjects);
    vec![
        crb("cluster-admin", vec![group("system:masters")]),
        crb("system:discovery", vec![group("system:authenticated")]),
        crb("system:basic-user", vec![group("system:authenticated")]),
        crb(
            "system:public-info-viewer",
            vec![
                group("system:authenticated"),
                group("system:unauthenticated"),
            ],
        ),
        crb("system:node-proxier", vec![user("system:kube-proxy")]),
        crb(
            "system:kube-controller-manager",
            vec![user("system:kube-controller-manager")],
        ),
        crb("system:kube-scheduler", vec![user("system:kube-scheduler")]),
        crb(
            "system:coredns",
            vec![service_account("kube-system", "coredns")],
        ),
    ]
}

/// The bootstrap Roles and RoleBindings (in kube-system).
pub fn namespaced() -> (Vec<Value>, Vec<Value>) {
    let ns = Some("kube-system");
    let roles = vec![role(
        "Role",
        ns,
        "system:oxlet:kube-dns",
        &[],
        vec![
            rule(&[""], &["services"], &["get", "create", "update", "patch"]),
            rule(
                &["discovery.k8s.io"],
                &["endpointslices"],
                &["get", "create", "update", "patch", "delete"],
            ),
        ],
    )];
    let bindings = vec![binding(
        "RoleBinding",
        ns,
        "system:oxlet:kube-dns",
        "Role",
        vec![service_account("kube-system", "coredns")],
    )];
    (roles, bindings)
}

fn rules(obj: &Value) -> Vec<PolicyRule> {
    obj.get("rules")
        .cloned()
        .and_then(|r| serde_json::from_value(r).ok())
        .unwrap_or_default()
}

/// `cur` with what `want` has and it lacks; `None` when nothing is missing.
fn reconciled(cur: &Value, want: &Value) -> Option<Value> {
    let mut out = cur.clone();
    let mut changed = false;
    for field in ["labels", "annotations"] {
        for (k, v) in want["metadata"][field].as_object().into_iter().flatten() {
            if cur["metadata"][field].get(k).is_none() {
                out["metadata"][field][k] = v.clone();
                changed = true;
            }
        }
    }
    if let Some(sel) = want.pointer("/aggregationRule/clusterRoleSelectors") {
        let have = cur
            .pointer("/aggregationRule/clusterRoleSelectors")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut all = have.clone();
        for s in sel.as_array().into_iter().flatten() {
            if !have.contains(s) {
                all.push(s.clone());
            }
        }
        if all != have {
            out["aggregationRule"] = json!({"clusterRoleSelectors": all});
            changed = true;
        }
    } else if want.get("rules").is_some() {
        let have = rules(cur);
        let mut list = cur["rules"].as_array().cloned().unwrap_or_default();
        for r in want["rules"].as_array().into_iter().flatten() {
            let r_typed: PolicyRule = serde_json::from_value(r.clone()).unwrap_or_default();
            if !escalation::missing(&have, &[r_typed]).is_empty() {
                list.push(r.clone());
                changed = true;
            }
        }
        out["rules"] = json!(list);
    }
    if let Some(subjects) = want["subjects"].as_array() {
        let mut list = cur["subjects"].as_array().cloned().unwrap_or_default();
        for s in subjects {
            let same = |x: &Value| {
                x["kind"] == s["kind"] && x["name"] == s["name"] && x["namespace"] == s["namespace"]
            };
            if !list.iter().any(same) {
                list.push(s.clone());
                changed = true;
            }
        }
        out["subjects"] = json!(list);
    }
    changed.then_some(out)
}

async fn ensure(reg: &Registry, plural: &str, want: Value) -> Result<(), ApiError> {
    let rt = resources::get(RBAC_GROUP, plural);
    let ns = want["metadata"]["namespace"].as_str().map(str::to_string);
    let name = meta_str(&want, "name").to_string();
    match reg.get(rt, ns.as_deref(), &name) {
        Err(e) if e.code == 404 => {
            info!(kind = rt.kind, name, "creating bootstrap RBAC object");
            match reg.create(rt, ns.as_deref(), want, Write::NONE).await {
                Err(e) if e.code != 409 => return Err(e),
                _ => {}
            }
        }
        Err(e) => return Err(e),
        Ok(cur) => {
            if cur.pointer(&format!(
                "/metadata/annotations/{}",
                AUTOUPDATE.replace('/', "~1")
            )) == Some(&json!("false"))
            {
                debug!(kind = rt.kind, name, "autoupdate off: left alone");
                return Ok(());
            }
            if let Some(out) = reconciled(&cur, &want) {
                info!(kind = rt.kind, name, "reconciling bootstrap RBAC object");
                reg.update(rt, ns.as_deref(), &name, out, false, Write::NONE)?;
            }
        }
    }
    Ok(())
}

/// Creates or completes every bootstrap role and binding.
pub async fn reconcile(reg: &Registry) -> Result<(), ApiError> {
    for r in cluster_roles() {
        ensure(reg, "clusterroles", r).await?;
    }
    for b in cluster_role_bindings() {
        ensure(reg, "clusterrolebindings", b).await?;
    }
    let (roles, bindings) = namespaced();
    for r in roles {
        ensure(reg, "roles", r).await?;
    }
    for b in bindings {
        ensure(reg, "rolebindings", b).await?;
    }
    Ok(())
}
