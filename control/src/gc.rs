//! Garbage collection by ownerReferences (background propagation): when an owner is deleted,
//! dependents whose owners are all gone are deleted too; references to gone owners are dropped
//! from dependents that still have a live owner.

use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::registry::{
    decode, meta_has_finalizer, meta_str, DeleteOptions, ListOptions, Listed, Registry, Write,
    FOREGROUND,
};
use crate::resources::{self, TYPES};
use crate::store::EventKind;

fn owner_alive(reg: &Registry, ns: Option<&str>, r: &Value) -> bool {
    let (Some(av), Some(kind), Some(name), Some(uid)) = (
        r["apiVersion"].as_str(),
        r["kind"].as_str(),
        r["name"].as_str(),
        r["uid"].as_str(),
    ) else {
        return false;
    };
    let Some(rt) = resources::by_kind(av, kind) else {
        // Owners of kinds we do not serve cannot be checked; keep the dependent.
        return true;
    };
    let ns = if rt.namespaced { ns } else { None };
    reg.get(rt, ns, name)
        .is_ok_and(|o| meta_str(&o, "uid") == uid)
}

/// Objects (in `ns`, or anywhere for a cluster-scoped owner) with an ownerReference to
/// `owner_uid`, each with its ownerReferences.
fn dependents(
    reg: &Registry,
    ns: Option<&str>,
    owner_uid: &str,
) -> Vec<(&'static resources::ResourceType, Value, Vec<Value>)> {
    let mut found = Vec::new();
    for rt in TYPES.iter().filter(|t| t.namespaced || ns.is_none()) {
        let scope = if rt.namespaced { ns } else { None };
        let Ok(Listed { items, .. }) = reg.list(rt, scope, &ListOptions::default()) else {
            continue;
        };
        for obj in items {
            let refs: Vec<Value> = obj
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if refs.iter().any(|r| r["uid"] == owner_uid) {
                found.push((rt, obj, refs));
            }
        }
    }
    found
}

/// Deletes or trims the dependents of `gone_uid` (whose object lived in `ns`, if namespaced).
pub fn collect(reg: &Registry, ns: Option<&str>, gone_uid: &str) {
    for (rt, obj, refs) in dependents(reg, ns, gone_uid) {
        let name = meta_str(&obj, "name").to_string();
        let obj_ns = meta_str(&obj, "namespace").to_string();
        let obj_ns = (!obj_ns.is_empty()).then_some(obj_ns);
        let others: Vec<Value> = refs
            .iter()
            .filter(|r| r["uid"] != gone_uid)
            .cloned()
            .collect();
        if others
            .iter()
            .any(|r| owner_alive(reg, obj_ns.as_deref(), r))
        {
            let mut o = obj.clone();
            o["metadata"]["ownerReferences"] = json!(others);
            if let Err(e) = reg.update(rt, obj_ns.as_deref(), &name, o, false, Write::NONE) {
                debug!(name, "gc trim: {e}");
            }
        } else {
            debug!(kind = rt.kind, name, "gc: owner gone, deleting");
            if let Err(e) = reg.delete(rt, obj_ns.as_deref(), &name, &DeleteOptions::default()) {
                if e.code != 404 {
                    warn!(name, "gc delete: {e}");
                }
            }
        }
    }
}

/// Removes references to `owner_uid` from its dependents, which then stay (Orphan).
pub fn orphan(reg: &Registry, ns: Option<&str>, owner_uid: &str) {
    for (rt, obj, refs) in dependents(reg, ns, owner_uid) {
        let kept: Vec<Value> = refs.into_iter().filter(|r| r["uid"] != owner_uid).collect();
        let mut o = obj.clone();
        o["metadata"]["ownerReferences"] = if kept.is_empty() {
            Value::Null
        } else {
            json!(kept)
        };
        let (name, ons) = (
            meta_str(&obj, "name").to_string(),
            meta_str(&obj, "namespace").to_string(),
        );
        let ons = (!ons.is_empty()).then_some(ons);
        if let Err(e) = reg.update(rt, ons.as_deref(), &name, o, false, Write::NONE) {
            warn!(name, "orphaning: {e}");
        }
    }
}

/// Foreground deletion: deletes the dependents, then lets the owner go by removing its
/// `foregroundDeletion` finalizer.
fn finish_foreground(reg: &Registry, key: &str, owner: &Value) {
    let ns = meta_str(owner, "namespace").to_string();
    let ns = (!ns.is_empty()).then_some(ns);
    collect(reg, ns.as_deref(), meta_str(owner, "uid"));
    let Some(rt) = resources::by_kind(
        owner["apiVersion"].as_str().unwrap_or(""),
        owner["kind"].as_str().unwrap_or(""),
    ) else {
        return;
    };
    let name = meta_str(owner, "name");
    let Ok(mut cur) = reg.get(rt, ns.as_deref(), name) else {
        return;
    };
    if let Some(f) = cur
        .pointer_mut("/metadata/finalizers")
        .and_then(Value::as_array_mut)
    {
        f.retain(|x| x != FOREGROUND);
    }
    if let Err(e) = reg.update(rt, ns.as_deref(), name, cur, false, Write::NONE) {
        debug!(key, "foreground finish: {e}");
    }
}

/// Runs forever, collecting after every deletion.
pub async fn run(reg: Registry) {
    loop {
        let Ok(mut w) = reg.store.watch("/", reg.store.current_rev().unwrap_or(0)) else {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            continue;
        };
        loop {
            match w.live.recv().await {
                Ok(ev) if ev.kind == EventKind::Deleted => {
                    let o = decode(&ev.entry);
                    let uid = meta_str(&o, "uid").to_string();
                    let ns = meta_str(&o, "namespace").to_string();
                    let r = reg.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        collect(&r, (!ns.is_empty()).then_some(ns.as_str()), &uid)
                    })
                    .await;
                }
                Ok(ev) if ev.kind == EventKind::Modified => {
                    let o = decode(&ev.entry);
                    if o.pointer("/metadata/deletionTimestamp").is_some()
                        && meta_has_finalizer(&o, FOREGROUND)
                    {
                        let (r, key) = (reg.clone(), ev.entry.key.clone());
                        let _ =
                            tokio::task::spawn_blocking(move || finish_foreground(&r, &key, &o))
                                .await;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                Err(_) => return,
            }
        }
    }
}
