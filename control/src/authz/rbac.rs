//! RBAC (rbac.authorization.k8s.io/v1): Roles, ClusterRoles and their bindings, evaluated as
//! kube-apiserver's RBAC authorizer evaluates them.
//!
//! Requests are decided from an in-memory index, not from SQLite: a task follows the store's
//! change stream for the RBAC prefix and, after every batch of changes, rebuilds a snapshot in
//! which each binding's role is already resolved and filed under its subjects. A decision is
//! then two or three hash lookups per subject (the user and each group) and a scan of the
//! rules those bindings grant. ClusterRole aggregation (`aggregationRule.clusterRoleSelectors`)
//! is resolved in the snapshot too, and written back into the aggregated ClusterRoles' `rules`
//! (what kube-controller-manager's clusterrole-aggregation controller does), so that reading a
//! ClusterRole shows what it grants.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};
use tracing::{debug, warn};

use super::{Attributes, NonResource};
use crate::certs::Identity;
use crate::registry::{decode, meta_str, Registry, Write};
use crate::resources::{self, RBAC_GROUP};
use crate::select::LabelSelector;
use crate::store::{EventKind, StoreError};

/// The store keys under which RBAC objects live.
const PREFIX: &str = "/rbac.authorization.k8s.io/";
const AUTHENTICATED: &str = "system:authenticated";

/// The rules one binding grants, or why it grants nothing (its role does not exist).
type Grant = Result<Arc<[PolicyRule]>, Arc<str>>;

/// What bindings give one subject: everywhere, and per namespace.
#[derive(Default)]
struct Grants {
    cluster: Vec<Grant>,
    by_ns: HashMap<String, Vec<Grant>>,
}

/// One consistent view of every role and binding.
#[derive(Default)]
pub struct Snapshot {
    users: HashMap<String, Grants>,
    groups: HashMap<String, Grants>,
    /// ClusterRole name to its effective rules (aggregated ones resolved).
    cluster_roles: HashMap<String, Arc<[PolicyRule]>>,
    roles: HashMap<(String, String), Arc<[PolicyRule]>>,
    /// Aggregated ClusterRoles whose stored rules differ from what they aggregate.
    stale_aggregates: Vec<(String, Vec<PolicyRule>)>,
}

/// The RBAC index: cheap to clone, shared by the request path and its updater.
#[derive(Clone)]
pub struct Rbac {
    snap: Arc<RwLock<Arc<Snapshot>>>,
    /// The store revision the snapshot reflects.
    rev: watch::Receiver<i64>,
}

fn rules_of(obj: &Value) -> Vec<PolicyRule> {
    obj.get("rules")
        .cloned()
        .and_then(|r| serde_json::from_value(r).ok())
        .unwrap_or_default()
}

fn has(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == want || x == "*")
}

fn opt(list: &Option<Vec<String>>) -> &[String] {
    list.as_deref().unwrap_or(&[])
}

/// Whether `rule` allows a resource request, as upstream's `RuleAllows`.
pub fn rule_allows(rule: &PolicyRule, a: &Attributes) -> bool {
    if !has(&rule.verbs, a.verb.as_str()) || !has(opt(&rule.api_groups), &a.group) {
        return false;
    }
    let resource_ok = opt(&rule.resources).iter().any(|r| {
        if r == "*" {
            return true;
        }
        if a.subresource.is_empty() {
            return *r == a.resource;
        }
        // `pods/log`, or `*/log` for that subresource of anything.
        r.strip_suffix(a.subresource.as_str())
            .and_then(|p| p.strip_suffix('/'))
            .is_some_and(|p| p == a.resource || p == "*")
    });
    if !resource_ok {
        return false;
    }
    let names = opt(&rule.resource_names);
    names.is_empty() || names.contains(&a.name)
}

/// Whether `rule` allows a non-resource request (`/healthz`, `/apis/*`).
pub fn rule_allows_path(rule: &PolicyRule, n: &NonResource) -> bool {
    has(&rule.verbs, &n.verb)
        && opt(&rule.non_resource_urls)
            .iter()
            .any(|u| match u.strip_suffix('*') {
                Some(prefix) => n.path.starts_with(prefix),
                None => *u == n.path,
            })
}

impl Snapshot {
    /// Builds the view of `objects` (store key to object).
    fn build(objects: &HashMap<String, Value>) -> Snapshot {
        let mut cluster_objs: HashMap<&str, &Value> = HashMap::new();
        let mut roles = HashMap::new();
        let mut bindings = Vec::new();
        for (key, obj) in objects {
            let rest = &key[PREFIX.len()..];
            let (plural, _) = rest.split_once('/').unwrap_or((rest, ""));
            match plural {
                "clusterroles" => {
                    cluster_objs.insert(meta_str(obj, "name"), obj);
                }
                "roles" => {
                    let k = (
                        meta_str(obj, "namespace").to_string(),
                        meta_str(obj, "name").to_string(),
                    );
                    roles.insert(k, Arc::from(rules_of(obj)));
                }
                "rolebindings" | "clusterrolebindings" => bindings.push(obj),
                _ => {}
            }
        }
        let mut snap = Snapshot {
            roles,
            ..Default::default()
        };
        for name in cluster_objs.keys() {
            let mut seen = HashSet::new();
            let rules = effective(name, &cluster_objs, &mut seen);
            let obj = cluster_objs[name];
            if obj.get("aggregationRule").is_some_and(Value::is_object) && rules_of(obj) != rules {
                snap.stale_aggregates
                    .push((name.to_string(), rules.clone()));
            }
            snap.cluster_roles
                .insert(name.to_string(), Arc::from(rules));
        }
        for b in bindings {
            let ns = meta_str(b, "namespace");
            let role = &b["roleRef"];
            let rname = role["name"].as_str().unwrap_or("");
            let grant: Grant = match role["kind"].as_str() {
                Some("ClusterRole") => snap.cluster_roles.get(rname).cloned().ok_or_else(|| {
                    Arc::from(format!("clusterrole.{RBAC_GROUP} {rname:?} not found"))
                }),
                _ => snap
                    .roles
                    .get(&(ns.to_string(), rname.to_string()))
                    .cloned()
                    .ok_or_else(|| Arc::from(format!("role.{RBAC_GROUP} {rname:?} not found"))),
            };
            for s in b["subjects"].as_array().into_iter().flatten() {
                let sname = s["name"].as_str().unwrap_or("");
                let (map, key) = match s["kind"].as_str() {
                    Some("User") => (&mut snap.users, sname.to_string()),
                    Some("Group") => (&mut snap.groups, sname.to_string()),
                    Some("ServiceAccount") => {
                        let sns = s["namespace"]
                            .as_str()
                            .filter(|n| !n.is_empty())
                            .unwrap_or(ns);
                        (
                            &mut snap.users,
                            format!("system:serviceaccount:{sns}:{sname}"),
                        )
                    }
                    _ => continue,
                };
                let g = map.entry(key).or_default();
                if ns.is_empty() {
                    g.cluster.push(grant.clone());
                } else {
                    g.by_ns
                        .entry(ns.to_string())
                        .or_default()
                        .push(grant.clone());
                }
            }
        }
        snap
    }

    /// Every grant that applies to `id` in namespace `ns` (cluster-wide ones included).
    fn visit<'s>(&'s self, id: &'s Identity, ns: &'s str) -> impl Iterator<Item = &'s Grant> + 's {
        let implicit = (!id
            .groups
            .iter()
            .any(|g| g == AUTHENTICATED || g == "system:unauthenticated"))
        .then_some(AUTHENTICATED);
        let users = self.users.get(&id.user).into_iter();
        let groups = id
            .groups
            .iter()
            .map(String::as_str)
            .chain(implicit)
            .filter_map(|g| self.groups.get(g));
        users.chain(groups).flat_map(move |g| {
            let local = if ns.is_empty() { None } else { g.by_ns.get(ns) };
            g.cluster.iter().chain(local.into_iter().flatten())
        })
    }

    /// Whether some rule allows the request; when none does, the errors met on the way
    /// (bindings to missing roles), in upstream's words.
    fn decide(
        &self,
        id: &Identity,
        ns: &str,
        allows: impl Fn(&PolicyRule) -> bool,
    ) -> Result<(), String> {
        let mut errors = Vec::new();
        for g in self.visit(id, ns) {
            match g {
                Ok(rules) if rules.iter().any(&allows) => return Ok(()),
                Ok(_) => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(match errors.len() {
            0 => String::new(),
            1 => format!("RBAC: {}", errors[0]),
            _ => format!("RBAC: [{}]", errors.join(", ")),
        })
    }

    /// Every rule `id` holds in namespace `ns`, in binding order.
    pub fn rules_for(&self, id: &Identity, ns: &str) -> Vec<PolicyRule> {
        let mut out: Vec<PolicyRule> = Vec::new();
        for rules in self.visit(id, ns).filter_map(|g| g.as_ref().ok()) {
            out.extend(rules.iter().cloned());
        }
        out
    }

    /// The effective rules of ClusterRole `name`, or of Role `ns`/`name`.
    pub fn role_rules(&self, cluster: bool, ns: &str, name: &str) -> Option<Arc<[PolicyRule]>> {
        if cluster {
            self.cluster_roles.get(name).cloned()
        } else {
            self.roles.get(&(ns.to_string(), name.to_string())).cloned()
        }
    }
}

/// A ClusterRole's rules: its own, or for an aggregated one, those of every ClusterRole its
/// selectors match (themselves resolved), without duplicates.
fn effective(
    name: &str,
    all: &HashMap<&str, &Value>,
    seen: &mut HashSet<String>,
) -> Vec<PolicyRule> {
    let obj = all[name];
    let Some(selectors) = obj
        .pointer("/aggregationRule/clusterRoleSelectors")
        .and_then(Value::as_array)
    else {
        return rules_of(obj);
    };
    seen.insert(name.to_string());
    let selectors: Vec<LabelSelector> = selectors.iter().map(LabelSelector::from_object).collect();
    let mut names: Vec<&&str> = all.keys().collect();
    names.sort();
    let mut out: Vec<PolicyRule> = Vec::new();
    for other in names {
        if seen.contains(*other) {
            continue;
        }
        let labels = all[*other].pointer("/metadata/labels");
        if !selectors.iter().any(|s| s.matches(labels)) {
            continue;
        }
        let mut inner = seen.clone();
        for r in effective(other, all, &mut inner) {
            if !out.contains(&r) {
                out.push(r);
            }
        }
    }
    out
}

impl Rbac {
    /// Loads every RBAC object and keeps the index current from the store's change stream;
    /// aggregated ClusterRoles are rewritten as their sources change.
    pub async fn start(reg: &Registry) -> Result<Rbac, StoreError> {
        let mut objects = HashMap::new();
        let page = reg.store.list(PREFIX, 0, None, 0)?;
        for e in &page.items {
            objects.insert(e.key.clone(), decode(e));
        }
        let snap = Arc::new(Snapshot::build(&objects));
        let (tx, rx) = watch::channel(page.rev);
        let rbac = Rbac {
            snap: Arc::new(RwLock::new(snap.clone())),
            rev: rx,
        };
        aggregate(reg, &snap).await;
        tokio::spawn(follow(
            reg.clone(),
            rbac.snap.clone(),
            tx,
            objects,
            page.rev,
        ));
        Ok(rbac)
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.read().expect("snapshot lock").clone()
    }

    /// Decides a resource request; `Err` holds the reason to add to the refusal, if any.
    pub fn authorize(&self, id: &Identity, a: &Attributes) -> Result<(), String> {
        self.snapshot()
            .decide(id, &a.namespace, |r| rule_allows(r, a))
    }

    /// Decides a non-resource request.
    pub fn authorize_path(&self, id: &Identity, n: &NonResource) -> Result<(), String> {
        self.snapshot().decide(id, "", |r| rule_allows_path(r, n))
    }

    /// Waits (briefly) until the index reflects revision `rev`, so that a client that changed
    /// a role or binding is decided by the change in its next request.
    pub async fn caught_up(&self, rev: i64) {
        let mut rx = self.rev.clone();
        let wait = rx.wait_for(|r| *r >= rev);
        if tokio::time::timeout(Duration::from_secs(2), wait)
            .await
            .is_err()
        {
            warn!(rev, "RBAC index behind the store");
        }
    }
}

/// Applies store changes to `objects` and publishes a new snapshot after each batch.
async fn follow(
    reg: Registry,
    snap: Arc<RwLock<Arc<Snapshot>>>,
    tx: watch::Sender<i64>,
    mut objects: HashMap<String, Value>,
    mut rev: i64,
) {
    loop {
        let mut w = match reg.store.watch(PREFIX, rev) {
            Ok(w) => w,
            Err(e) => {
                // Compacted past our revision: start over from a fresh list.
                debug!("RBAC index relists: {e}");
                match reg.store.list(PREFIX, 0, None, 0) {
                    Ok(page) => {
                        objects = page
                            .items
                            .iter()
                            .map(|e| (e.key.clone(), decode(e)))
                            .collect();
                        rev = page.rev;
                        publish(&reg, &snap, &objects).await;
                        let _ = tx.send(rev);
                    }
                    Err(e) => {
                        warn!("RBAC index: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                continue;
            }
        };
        let mut changed = false;
        for ev in w.backlog.drain(..) {
            apply(&mut objects, ev.kind, &ev.entry);
            changed = true;
        }
        rev = rev.max(w.seen_rev);
        if changed {
            publish(&reg, &snap, &objects).await;
        }
        let _ = tx.send(rev);
        loop {
            let ev = match w.live.recv().await {
                Ok(ev) => ev,
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let mut changed = false;
            let mut batch = vec![ev];
            while let Ok(ev) = w.live.try_recv() {
                batch.push(ev);
            }
            for ev in batch {
                if ev.entry.rev <= rev {
                    continue;
                }
                rev = ev.entry.rev;
                if ev.entry.key.starts_with(PREFIX) {
                    apply(&mut objects, ev.kind, &ev.entry);
                    changed = true;
                }
            }
            if changed {
                publish(&reg, &snap, &objects).await;
            }
            let _ = tx.send(rev);
        }
    }
}

fn apply(objects: &mut HashMap<String, Value>, kind: EventKind, e: &crate::store::Entry) {
    match kind {
        EventKind::Deleted => {
            objects.remove(&e.key);
        }
        _ => {
            objects.insert(e.key.clone(), decode(e));
        }
    }
}

async fn publish(reg: &Registry, slot: &RwLock<Arc<Snapshot>>, objects: &HashMap<String, Value>) {
    let snap = Arc::new(Snapshot::build(objects));
    *slot.write().expect("snapshot lock") = snap.clone();
    aggregate(reg, &snap).await;
}

/// Writes the aggregated rules into ClusterRoles whose stored rules differ (level-triggered:
/// the write comes back as a change, after which nothing differs).
async fn aggregate(reg: &Registry, snap: &Snapshot) {
    let rt = resources::get(RBAC_GROUP, "clusterroles");
    for (name, rules) in &snap.stale_aggregates {
        let Ok(mut cur) = reg.get(rt, None, name) else {
            continue;
        };
        cur["rules"] = json!(rules);
        if let Err(e) = reg.update(rt, None, name, cur, false, Write::NONE) {
            // A conflict means a newer version came in; its change event brings us back.
            debug!(clusterrole = name, "aggregation: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::FieldSelector;

    fn attrs(verb: &str, group: &str, res: &str, sub: &str, ns: &str, name: &str) -> Attributes {
        Attributes {
            verb: super::super::Verb::parse(verb),
            group: group.into(),
            resource: res.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
            fields: FieldSelector::default(),
        }
    }

    fn rule(v: Value) -> PolicyRule {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn rules_match_as_upstreams() {
        let r = rule(
            json!({"apiGroups": [""], "resources": ["pods", "*/scale"], "verbs": ["get", "list"]}),
        );
        assert!(rule_allows(&r, &attrs("get", "", "pods", "", "ns", "x")));
        assert!(!rule_allows(
            &r,
            &attrs("delete", "", "pods", "", "ns", "x")
        ));
        assert!(!rule_allows(
            &r,
            &attrs("get", "apps", "pods", "", "ns", "x")
        ));
        // A subresource needs its own entry: `pods` does not cover `pods/log`.
        assert!(!rule_allows(
            &r,
            &attrs("get", "", "pods", "log", "ns", "x")
        ));
        assert!(rule_allows(
            &r,
            &attrs("get", "", "deployments", "scale", "", "")
        ));
        let named = rule(json!({"apiGroups": ["*"], "resources": ["configmaps"],
            "resourceNames": ["a"], "verbs": ["*"]}));
        assert!(rule_allows(
            &named,
            &attrs("update", "", "configmaps", "", "ns", "a")
        ));
        assert!(!rule_allows(
            &named,
            &attrs("update", "", "configmaps", "", "ns", "b")
        ));
        assert!(!rule_allows(
            &named,
            &attrs("list", "", "configmaps", "", "ns", "")
        ));
        let urls = rule(json!({"nonResourceURLs": ["/healthz", "/apis/*"], "verbs": ["get"]}));
        let path = |verb: &str, p: &str| NonResource {
            verb: verb.into(),
            path: p.into(),
        };
        assert!(rule_allows_path(&urls, &path("get", "/healthz")));
        assert!(rule_allows_path(&urls, &path("get", "/apis/apps/v1")));
        assert!(!rule_allows_path(&urls, &path("get", "/apis")));
        assert!(!rule_allows_path(&urls, &path("post", "/healthz")));
    }

    fn objects(list: &[(&str, Value)]) -> HashMap<String, Value> {
        list.iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), v.clone()))
            .collect()
    }

    #[test]
    fn bindings_resolve_by_subject_and_namespace() {
        let snap = Snapshot::build(&objects(&[
            (
                "clusterroles/reader",
                json!({"metadata": {"name": "reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}),
            ),
            (
                "roles/ns1/secrets",
                json!({"metadata": {"name": "secrets", "namespace": "ns1"},
                "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]}),
            ),
            (
                "rolebindings/ns1/a",
                json!({"metadata": {"name": "a", "namespace": "ns1"},
                "roleRef": {"kind": "ClusterRole", "name": "reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "default"}]}),
            ),
            (
                "rolebindings/ns1/b",
                json!({"metadata": {"name": "b", "namespace": "ns1"},
                "roleRef": {"kind": "Role", "name": "secrets"},
                "subjects": [{"kind": "Group", "name": "team"}]}),
            ),
            (
                "clusterrolebindings/c",
                json!({"metadata": {"name": "c"},
                "roleRef": {"kind": "ClusterRole", "name": "missing"},
                "subjects": [{"kind": "User", "name": "bob"}]}),
            ),
        ]));
        let sa = Identity {
            user: "system:serviceaccount:ns1:default".into(),
            groups: vec![],
        };
        let allows =
            |id: &Identity, a: &Attributes| snap.decide(id, &a.namespace, |r| rule_allows(r, a));
        assert!(allows(&sa, &attrs("get", "", "pods", "", "ns1", "p")).is_ok());
        assert!(allows(&sa, &attrs("get", "", "pods", "", "ns2", "p")).is_err());
        assert!(allows(&sa, &attrs("get", "", "secrets", "", "ns1", "s")).is_err());
        let team = Identity {
            user: "x".into(),
            groups: vec!["team".into()],
        };
        assert!(allows(&team, &attrs("get", "", "secrets", "", "ns1", "s")).is_ok());
        let bob = Identity {
            user: "bob".into(),
            groups: vec![],
        };
        assert_eq!(
            allows(&bob, &attrs("get", "", "pods", "", "", "")),
            Err("RBAC: clusterrole.rbac.authorization.k8s.io \"missing\" not found".into())
        );
    }

    #[test]
    fn aggregation_follows_labels_through_chains() {
        let agg = |name: &str, label: &str, own: Option<&str>| {
            let mut o = json!({"metadata": {"name": name},
                "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {label: "true"}}]}});
            if let Some(l) = own {
                o["metadata"]["labels"] = json!({l: "true"});
            }
            o
        };
        let snap = Snapshot::build(&objects(&[
            ("clusterroles/admin", agg("admin", "to-admin", None)),
            (
                "clusterroles/view",
                agg("view", "to-view", Some("to-admin")),
            ),
            (
                "clusterroles/extra",
                json!({"metadata": {"name": "extra", "labels": {"to-view": "true"}},
                "rules": [{"apiGroups": ["x.io"], "resources": ["widgets"], "verbs": ["get"]}]}),
            ),
        ]));
        let admin = snap.role_rules(true, "", "admin").unwrap();
        assert_eq!(admin.len(), 1);
        assert_eq!(
            admin[0].resources.as_deref(),
            Some(&["widgets".to_string()][..])
        );
        assert_eq!(snap.stale_aggregates.len(), 2);
    }
}
