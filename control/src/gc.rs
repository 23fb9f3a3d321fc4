//! Garbage collection by ownerReferences (background propagation): when an owner is deleted,
//! dependents whose owners are all gone are deleted too; references to gone owners are dropped
//! from dependents that still have a live owner. Dependents are found through an owner index
//! kept from the change stream, not by reading every resource.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tracing::{debug, warn};

use crate::registry::{
    decode, meta_has_finalizer, meta_str, DeleteOptions, ListOptions, Listed, Registry, Write,
    FOREGROUND,
};
use crate::resources::{self, ResourceType, TYPES};
use crate::store::{Event, EventKind, StoreError};

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

/// Deletes `dep` (a dependent of the gone `gone_uid`) when none of its other owners is alive,
/// or else drops the reference to the gone owner from it.
fn collect_one(reg: &Registry, rt: &ResourceType, obj: &Value, gone_uid: &str) {
    let refs: Vec<Value> = obj
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let name = meta_str(obj, "name").to_string();
    let obj_ns = meta_str(obj, "namespace").to_string();
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

/// Where an object lives, by uid.
struct Located {
    rt: &'static ResourceType,
    key: String,
    owners: Vec<String>,
}

/// Every object's uid, location and owners, and each owner's dependents: kept from a list and
/// the change stream, so a deletion finds its dependents without reading anything else.
#[derive(Default)]
struct OwnerIndex {
    objects: HashMap<String, Located>,
    dependents: HashMap<String, HashSet<String>>,
}

fn owner_uids(o: &Value) -> Vec<String> {
    o.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|r| {
            // Owners of kinds not served here cannot be checked; they never make a dependent
            // collectable.
            resources::by_kind(
                r["apiVersion"].as_str().unwrap_or(""),
                r["kind"].as_str().unwrap_or(""),
            )
            .is_some()
        })
        .filter_map(|r| r["uid"].as_str().map(str::to_string))
        .collect()
}

impl OwnerIndex {
    /// Records `o` (stored under `key`); returns whether one of its owners is unknown.
    fn upsert(&mut self, key: &str, o: &Value) -> bool {
        let uid = meta_str(o, "uid");
        let Some(rt) = resources::by_kind(
            o["apiVersion"].as_str().unwrap_or(""),
            o["kind"].as_str().unwrap_or(""),
        ) else {
            return false;
        };
        if uid.is_empty() {
            return false;
        }
        let owners = owner_uids(o);
        self.unlink(uid);
        for ow in &owners {
            self.dependents
                .entry(ow.clone())
                .or_default()
                .insert(uid.to_string());
        }
        let orphaned = owners.iter().any(|ow| !self.objects.contains_key(ow));
        self.objects.insert(
            uid.to_string(),
            Located {
                rt,
                key: key.to_string(),
                owners,
            },
        );
        orphaned
    }

    /// Drops `uid`'s links to its owners.
    fn unlink(&mut self, uid: &str) {
        let Some(old) = self.objects.get(uid) else {
            return;
        };
        for ow in &old.owners {
            if let Some(d) = self.dependents.get_mut(ow) {
                d.remove(uid);
                if d.is_empty() {
                    self.dependents.remove(ow);
                }
            }
        }
    }

    /// Forgets `uid` (its dependents stay listed under it until collected).
    fn remove(&mut self, uid: &str) {
        self.unlink(uid);
        self.objects.remove(uid);
    }

    /// The dependents of `uid` that still exist: their type and current object.
    fn dependents_of(&self, reg: &Registry, uid: &str) -> Vec<(&'static ResourceType, Value)> {
        let Some(deps) = self.dependents.get(uid) else {
            return Vec::new();
        };
        deps.iter()
            .filter_map(|d| self.objects.get(d))
            .filter_map(|l| {
                let e = reg.store.get(&l.key).ok()?;
                Some((l.rt, decode(&e)))
            })
            .collect()
    }
}

/// Collects the current dependents of the gone `uid`.
fn collect_dependents(reg: &Registry, index: &OwnerIndex, uid: &str) {
    for (rt, dep) in index.dependents_of(reg, uid) {
        collect_one(reg, rt, &dep, uid);
    }
}

/// A dependent with an owner the index does not know: collected when, read again, none of
/// its owners is alive (the owner went while the collector was not looking).
fn collect_if_orphaned(reg: &Registry, rt: &'static ResourceType, key: &str) {
    let Ok(e) = reg.store.get(key) else {
        return;
    };
    let o = decode(&e);
    let ns = meta_str(&o, "namespace").to_string();
    let ns = (!ns.is_empty()).then_some(ns);
    let refs: Vec<Value> = o
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let gone: Vec<&Value> = refs
        .iter()
        .filter(|r| !owner_alive(reg, ns.as_deref(), r))
        .collect();
    if let Some(g) = gone.first() {
        let uid = g["uid"].as_str().unwrap_or("").to_string();
        collect_one(reg, rt, &o, &uid);
    }
}

/// Foreground deletion: deletes the dependents, then lets the owner go by removing its
/// `foregroundDeletion` finalizer.
fn finish_foreground(reg: &Registry, index: &OwnerIndex, key: &str, owner: &Value) {
    let ns = meta_str(owner, "namespace").to_string();
    let ns = (!ns.is_empty()).then_some(ns);
    collect_dependents(reg, index, meta_str(owner, "uid"));
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

fn foreground_pending(o: &Value) -> bool {
    o.pointer("/metadata/deletionTimestamp").is_some() && meta_has_finalizer(o, FOREGROUND)
}

/// Builds the index from a list of everything at one revision and collects what a missed
/// deletion left behind. Returns the revision to watch from.
fn resync(reg: &Registry, index: &mut OwnerIndex) -> Result<i64, StoreError> {
    let rev = reg.store.current_rev()?;
    let page = reg.store.list("/", rev, None, 0)?;
    *index = OwnerIndex::default();
    let mut objects = Vec::with_capacity(page.items.len());
    for e in &page.items {
        let o = decode(e);
        index.upsert(&e.key, &o);
        objects.push((e.key.clone(), o));
    }
    for (key, o) in objects {
        if foreground_pending(&o) {
            finish_foreground(reg, index, &key, &o);
        }
        let owners = owner_uids(&o);
        if owners.iter().any(|ow| !index.objects.contains_key(ow)) {
            if let Some(l) = index.objects.get(meta_str(&o, "uid")) {
                collect_if_orphaned(reg, l.rt, &key);
            }
        }
    }
    Ok(rev)
}

/// One change: keeps the index and collects what the change orphaned.
fn handle(reg: &Registry, index: &mut OwnerIndex, ev: &Event) {
    let d = crate::watch::decoded_object(ev);
    let o: &Value = &d;
    match ev.kind {
        EventKind::Deleted => {
            let uid = meta_str(o, "uid");
            index.remove(uid);
            collect_dependents(reg, index, uid);
            index.dependents.remove(uid);
        }
        EventKind::Added | EventKind::Modified => {
            let orphaned = index.upsert(&ev.entry.key, o);
            if foreground_pending(o) {
                finish_foreground(reg, index, &ev.entry.key, o);
            }
            if orphaned {
                if let Some(l) = index.objects.get(meta_str(o, "uid")) {
                    collect_if_orphaned(reg, l.rt, &ev.entry.key);
                }
            }
        }
    }
}

/// Runs forever: collects after every deletion; after falling behind the change stream it
/// starts over from a list, so nothing deleted meanwhile is missed.
pub async fn run(reg: Registry) {
    let index = Arc::new(Mutex::new(OwnerIndex::default()));
    loop {
        let (r, ix) = (reg.clone(), index.clone());
        let started = tokio::task::spawn_blocking(move || {
            let mut ix = ix.lock().unwrap_or_else(|e| e.into_inner());
            let rev = resync(&r, &mut ix)?;
            r.store.watch("/", rev)
        })
        .await;
        let mut w = match started {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => {
                debug!("gc resync: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => return,
        };
        let backlog = std::mem::take(&mut w.backlog);
        let (r, ix) = (reg.clone(), index.clone());
        let _ = tokio::task::spawn_blocking(move || {
            let mut ix = ix.lock().unwrap_or_else(|e| e.into_inner());
            for ev in &backlog {
                handle(&r, &mut ix, ev);
            }
        })
        .await;
        loop {
            let mut batch = match w.live.recv().await {
                Ok(ev) => vec![ev],
                Err(RecvError::Lagged(n)) => {
                    debug!(skipped = n, "gc fell behind; resyncing from a list");
                    break;
                }
                Err(RecvError::Closed) => return,
            };
            // What else has arrived is handled in the same blocking call.
            let mut lagged = false;
            while batch.len() < 512 {
                match w.live.try_recv() {
                    Ok(ev) => batch.push(ev),
                    Err(TryRecvError::Lagged(_)) => {
                        lagged = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            batch.retain(|ev| ev.entry.rev > w.seen_rev);
            let (r, ix) = (reg.clone(), index.clone());
            let _ = tokio::task::spawn_blocking(move || {
                let mut ix = ix.lock().unwrap_or_else(|e| e.into_inner());
                for ev in &batch {
                    handle(&r, &mut ix, ev);
                }
            })
            .await;
            if lagged {
                debug!("gc fell behind; resyncing from a list");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use std::time::Duration;

    fn put(reg: &Registry, name: &str, uid: &str, owners: &[&str]) {
        let refs: Vec<Value> = owners
            .iter()
            .map(|o| json!({"apiVersion": "v1", "kind": "ConfigMap", "name": format!("owner-{o}"), "uid": o}))
            .collect();
        let mut obj = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "default", "uid": uid}});
        if !refs.is_empty() {
            obj["metadata"]["ownerReferences"] = json!(refs);
        }
        let rt = resources::get("", "configmaps");
        reg.store
            .create(
                &rt.key(Some("default"), name),
                &serde_json::to_vec(&obj).unwrap(),
            )
            .unwrap();
    }

    fn exists(reg: &Registry, name: &str) -> Option<Value> {
        reg.get(resources::get("", "configmaps"), Some("default"), name)
            .ok()
    }

    async fn until(f: impl Fn() -> bool) -> bool {
        for _ in 0..100 {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn collects_what_an_owner_deleted_while_not_watching_left() {
        let reg = Registry::new(Store::open_in_memory().unwrap());
        let rt = resources::get("", "configmaps");
        put(&reg, "owner-a", "a", &[]);
        put(&reg, "owner-b", "b", &[]);
        put(&reg, "only-a", "d1", &["a"]);
        put(&reg, "a-and-b", "d2", &["a", "b"]);
        put(&reg, "unrelated", "d3", &[]);
        // The owner goes while no collector runs: as after falling behind the change stream.
        reg.store
            .delete(&rt.key(Some("default"), "owner-a"), None)
            .unwrap();
        let gc = tokio::spawn(run(reg.clone()));
        assert!(
            until(|| exists(&reg, "only-a").is_none()).await,
            "the dependent of the deleted owner is collected on resync"
        );
        let trimmed = until(|| {
            exists(&reg, "a-and-b").is_some_and(|o| {
                o.pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|r| r.len() == 1 && r[0]["uid"] == "b")
            })
        })
        .await;
        assert!(
            trimmed,
            "a dependent with a live owner keeps only that owner"
        );
        assert!(exists(&reg, "unrelated").is_some());
        // Live deletions go through the owner index.
        put(&reg, "of-b", "d4", &["b"]);
        reg.store
            .delete(&rt.key(Some("default"), "owner-b"), None)
            .unwrap();
        assert!(until(|| exists(&reg, "of-b").is_none()).await);
        assert!(until(|| exists(&reg, "a-and-b").is_none()).await);
        assert!(exists(&reg, "unrelated").is_some());
        gc.abort();
    }
}
