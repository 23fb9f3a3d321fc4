//! What the workload controllers share: label selectors, controller references, adoption and
//! release of dependents, and expectations (what a controller wrote that its cache has not
//! shown yet, so a lagging cache never makes it create or delete twice).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::Resource;

/// Whether `labels` match `sel` (matchLabels and matchExpressions, all of them).
pub fn matches(sel: &LabelSelector, labels: Option<&BTreeMap<String, String>>) -> bool {
    let empty = BTreeMap::new();
    let labels = labels.unwrap_or(&empty);
    let by_labels = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    by_labels
        && sel.match_expressions.iter().flatten().all(|e| {
            let have = labels.get(&e.key);
            let values = e.values.as_deref().unwrap_or_default();
            match e.operator.as_str() {
                "In" => have.is_some_and(|v| values.contains(v)),
                "NotIn" => have.is_none_or(|v| !values.contains(v)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            }
        })
}

/// A selector selects something only when it has at least one requirement.
pub fn selects_anything(sel: &LabelSelector) -> bool {
    sel.match_labels.as_ref().is_some_and(|m| !m.is_empty())
        || sel
            .match_expressions
            .as_ref()
            .is_some_and(|m| !m.is_empty())
}

pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
}

/// The controller reference a controller puts on what it creates or adopts.
pub fn controller_ref<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.meta().name.clone().unwrap_or_default(),
        uid: owner.meta().uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// A merge patch that makes `owner` the controller of an orphan, guarded by its uid.
pub fn adopt_patch<K: Resource<DynamicType = ()>>(
    owner: &K,
    dep: &ObjectMeta,
) -> serde_json::Value {
    let mut refs: Vec<OwnerReference> = dep.owner_references.clone().unwrap_or_default();
    refs.push(controller_ref(owner));
    serde_json::json!({"metadata": {"ownerReferences": refs, "uid": dep.uid}})
}

/// A merge patch that removes `owner_uid` from a dependent's owners.
pub fn release_patch(owner_uid: &str, dep: &ObjectMeta) -> serde_json::Value {
    let refs: Vec<&OwnerReference> = dep
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.uid != owner_uid)
        .collect();
    serde_json::json!({"metadata": {"ownerReferences": refs, "uid": dep.uid}})
}

#[derive(Debug, Default)]
struct Pending {
    adds: HashSet<String>,
    dels: HashSet<String>,
    since: Option<Instant>,
}

/// Names created and deleted per controller key that the cache has not caught up with.
#[derive(Debug, Default)]
pub struct Expectations<K> {
    pending: Mutex<HashMap<K, Pending>>,
}

/// After this long a missing observation is given up (the object may have come and gone).
const EXPECTATION_TTL: Duration = Duration::from_secs(30);

impl<K: std::hash::Hash + Eq + Clone> Expectations<K> {
    pub fn created(&self, key: &K, name: String) {
        let mut p = self.pending.lock().expect("expectations lock");
        let e = p.entry(key.clone()).or_default();
        e.adds.insert(name);
        e.since.get_or_insert_with(Instant::now);
    }

    pub fn deleted(&self, key: &K, name: String) {
        let mut p = self.pending.lock().expect("expectations lock");
        let e = p.entry(key.clone()).or_default();
        e.dels.insert(name);
        e.since.get_or_insert_with(Instant::now);
    }

    /// Whether the cache shows everything written for `key`: `present(name)` tells whether
    /// the cache has the object (and it is not being deleted).
    pub fn satisfied(&self, key: &K, present: impl Fn(&str) -> bool) -> bool {
        let mut p = self.pending.lock().expect("expectations lock");
        let Some(e) = p.get_mut(key) else {
            return true;
        };
        e.adds.retain(|n| !present(n));
        e.dels.retain(|n| present(n));
        let expired = e.since.is_some_and(|s| s.elapsed() > EXPECTATION_TTL);
        if e.adds.is_empty() && e.dels.is_empty() || expired {
            p.remove(key);
            return true;
        }
        false
    }

    pub fn forget(&self, key: &K) {
        self.pending.lock().expect("expectations lock").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn selectors_match_labels_and_expressions() {
        let labels: BTreeMap<String, String> = [
            ("app".to_string(), "web".to_string()),
            ("tier".into(), "fe".into()),
        ]
        .into();
        let mut sel = LabelSelector {
            match_labels: Some([("app".to_string(), "web".to_string())].into()),
            match_expressions: None,
        };
        assert!(matches(&sel, Some(&labels)));
        sel.match_expressions = Some(vec![LabelSelectorRequirement {
            key: "tier".into(),
            operator: "In".into(),
            values: Some(vec!["be".into()]),
        }]);
        assert!(!matches(&sel, Some(&labels)));
        sel.match_expressions.as_mut().unwrap()[0].operator = "NotIn".into();
        assert!(matches(&sel, Some(&labels)));
        assert!(!matches(&sel, None));
        assert!(!selects_anything(&LabelSelector::default()));
    }

    #[test]
    fn expectations_wait_for_the_cache() {
        let e = Expectations::<&str>::default();
        e.created(&"rs", "p1".into());
        e.deleted(&"rs", "p0".into());
        assert!(!e.satisfied(&"rs", |n| n == "p0"));
        assert!(!e.satisfied(&"rs", |n| n == "p0" || n == "p1"));
        assert!(e.satisfied(&"rs", |n| n == "p1"));
        assert!(e.satisfied(&"other", |_| false));
    }
}
