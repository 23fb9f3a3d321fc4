//! Object semantics on top of the store: metadata (uid, creationTimestamp, generation,
//! resourceVersion), defaulting and validation, optimistic concurrency, status separation,
//! graceful deletion and finalizers. Shared by the HTTP handlers and in-process controllers.

use std::sync::Arc;

use base64::Engine;
use chrono::{SecondsFormat, Utc};
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::Mutex as AsyncMutex;

use crate::defaults;
use crate::resources::{self, ResourceType};
use crate::select::{FieldSelector, LabelSelector};
use crate::services;
use crate::status::{success_status, ApiError, ApiResult};
use crate::store::{Decision, Entry, Store};
use crate::validate;

#[derive(Clone)]
pub struct Registry {
    pub store: Store,
    /// Serialises ClusterIP/NodePort allocation with the create that uses it.
    pub alloc: Arc<AsyncMutex<()>>,
}

#[derive(Debug, Default, Clone)]
pub struct ListOptions {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: usize,
    pub continue_token: Option<String>,
    /// `resourceVersion` of the request; only used to pin pages.
    pub resource_version: Option<String>,
}

/// How a create or update writes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Write {
    /// `dryRun=All`: everything but the write.
    pub dry_run: bool,
    /// `fieldValidation=Strict`: unknown fields are an error rather than dropped.
    pub strict: bool,
    /// A client's request, which passes admission (`crate::admission`); the server's own
    /// writes do not.
    pub admit: bool,
}

impl Write {
    pub const NONE: Write = Write {
        dry_run: false,
        strict: false,
        admit: false,
    };
}

/// A list answer: the items, the revision read at, and paging.
#[derive(Debug)]
pub struct Listed {
    pub items: Vec<Value>,
    pub rev: i64,
    pub continue_token: Option<String>,
    pub remaining: Option<i64>,
}

#[derive(Debug, Default, Clone)]
pub struct DeleteOptions {
    pub grace_seconds: Option<i64>,
    pub expected_rv: Option<i64>,
    pub expected_uid: Option<String>,
    pub propagation: Propagation,
}

/// What happens to dependents (objects whose ownerReferences name the deleted one).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// The owner goes now; the garbage collector deletes dependents after.
    #[default]
    Background,
    /// The owner stays (with the `foregroundDeletion` finalizer) until its dependents are gone.
    Foreground,
    /// Dependents stay, with the reference to the owner removed.
    Orphan,
}

pub const FOREGROUND: &str = "foregroundDeletion";

pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Decodes a stored value and sets its resourceVersion from the entry.
pub fn decode(e: &Entry) -> Value {
    let mut v: Value = serde_json::from_slice(&e.value).unwrap_or(Value::Null);
    defaults::metadata(&mut v).insert("resourceVersion".into(), json!(e.rev.to_string()));
    v
}

fn encode(obj: &Value) -> Vec<u8> {
    let mut o = obj.clone();
    // The revision is the row's; storing it would only go stale.
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    serde_json::to_vec(&o).expect("JSON values serialise")
}

pub fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

pub fn parse_rv(s: &str) -> ApiResult<Option<i64>> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s:?}")))
}

pub(crate) fn random_suffix() -> String {
    // The same alphabet as the real server: no vowels, no look-alike characters.
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::thread_rng();
    (0..5)
        .map(|_| ALPHA[rng.gen_range(0..ALPHA.len())] as char)
        .collect()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: i64,
    start: String,
}

impl Registry {
    pub fn new(store: Store) -> Registry {
        Registry {
            store,
            alloc: Arc::new(AsyncMutex::new(())),
        }
    }

    pub fn get(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> ApiResult<Value> {
        let e = self
            .store
            .get(&rt.key(ns, name))
            .map_err(|e| ApiError::from_store(e, rt, name))?;
        Ok(decode(&e))
    }

    /// Lists objects at one revision, filtered and paged.
    pub fn list(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        opts: &ListOptions,
    ) -> ApiResult<Listed> {
        let prefix = rt.ns_prefix(ns);
        let (at, after) = match &opts.continue_token {
            Some(t) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(t)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<ContinueToken>(&b).ok())
                    .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
                (raw.rv, Some(raw.start))
            }
            None => (0, None),
        };
        let filtered = !opts.labels.is_empty() || opts.fields != FieldSelector::default();
        // With selectors, pages are filled by scanning in chunks until `limit` matches.
        let chunk = if filtered { 0 } else { opts.limit };
        let page = self
            .store
            .list(&prefix, at, after.as_deref(), chunk)
            .map_err(|e| match e {
                crate::store::StoreError::Gone { .. } => ApiError::gone(
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter.",
                ),
                other => ApiError::from_store(other, rt, ""),
            })?;
        let mut items = Vec::new();
        let mut last_key = None;
        let mut remaining = page.remaining;
        let total = page.items.len();
        for (i, e) in page.items.iter().enumerate() {
            let v = decode(e);
            if !opts.labels.matches(v.pointer("/metadata/labels")) || !opts.fields.matches(&v) {
                continue;
            }
            if filtered && opts.limit > 0 && items.len() == opts.limit {
                last_key = page.items.get(i - 1).map(|e| e.key.clone());
                remaining = (total - i) as i64;
                break;
            }
            items.push(v);
        }
        let more_after = if filtered { last_key } else { page.more_after };
        let token = more_after.map(|start| {
            let t = ContinueToken {
                rv: page.rev,
                start,
            };
            base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&t).unwrap())
        });
        let remaining = token.as_ref().map(|_| remaining);
        Ok(Listed {
            items,
            rev: page.rev,
            continue_token: token,
            remaining,
        })
    }

    fn check_namespace(&self, rt: &ResourceType, ns: Option<&str>) -> ApiResult<()> {
        let Some(ns) = ns.filter(|_| rt.namespaced) else {
            return Ok(());
        };
        let nst = resources::namespaces();
        let nsobj = self.get(nst, None, ns)?;
        if nsobj.pointer("/status/phase").and_then(Value::as_str) == Some("Terminating") {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    rt.qualified(),
                    meta_str(&nsobj, "name")
                ),
            ));
        }
        Ok(())
    }

    /// Create: fills metadata, defaults, validates, stores.
    pub async fn create(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        mut obj: Value,
        opts: Write,
    ) -> ApiResult<Value> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be an object",
            ));
        }
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        let meta = defaults::metadata(&mut obj);
        if let (Some(body_ns), Some(ns)) = (meta.get("namespace").and_then(Value::as_str), ns) {
            if !body_ns.is_empty() && body_ns != ns && rt.namespaced {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
        if rt.namespaced {
            meta.insert("namespace".into(), json!(ns.unwrap_or("default")));
        } else {
            meta.remove("namespace");
        }
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty() {
            if let Some(g) = meta
                .get("generateName")
                .and_then(Value::as_str)
                .filter(|g| !g.is_empty())
            {
                let n = format!("{g}{}", random_suffix());
                meta.insert("name".into(), json!(n));
            }
        }
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert("creationTimestamp".into(), json!(now()));
        for f in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            meta.remove(f);
        }
        if rt.generation {
            meta.insert("generation".into(), json!(1));
        } else {
            meta.remove("generation");
        }
        prepare_create(rt, &mut obj);
        if rt.kind == "Job" {
            defaults::job_selector(&mut obj);
        }
        defaults::apply(rt.kind, &mut obj);
        if rt.kind == "Pod" {
            defaults::default_toleration_seconds(&mut obj);
            if opts.admit {
                // NamespaceLifecycle comes before the ServiceAccount plugin.
                self.check_namespace(rt, ns)?;
                crate::admission::pod(self, ns.unwrap_or("default"), &mut obj).await?;
            }
        }
        let mut obj = validate::typed(rt, obj, opts.strict)?;
        let name = meta_str(&obj, "name").to_string();
        let causes = validate::fields(rt, &obj);
        if !causes.is_empty() {
            return Err(ApiError::invalid(rt, &name, causes));
        }
        self.check_namespace(rt, ns)?;
        let _alloc = if rt.kind == "Service" {
            let guard = self.alloc.lock().await;
            services::allocate(self, &mut obj)?;
            Some(guard)
        } else {
            None
        };
        if rt.kind == "Secret" {
            fold_string_data(&mut obj);
        }
        if opts.dry_run {
            return Ok(obj);
        }
        let e = self
            .store
            .create(&rt.key(ns, &name), &encode(&obj))
            .map_err(|e| ApiError::from_store(e, rt, &name))?;
        Ok(decode(&e))
    }

    /// Update (PUT) of the object or, with `status`, of its status subresource.
    pub fn update(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        obj: Value,
        status: bool,
        opts: Write,
    ) -> ApiResult<Value> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be an object",
            ));
        }
        let body_name = meta_str(&obj, "name");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        let expected = parse_rv(meta_str(&obj, "resourceVersion"))?;
        let mut obj = validate::typed(rt, obj, opts.strict)?;
        let key = rt.key(ns, name);
        let mut result = None;
        let e = self.store.write(&key, |cur| -> ApiResult<Decision> {
            let cur = cur.ok_or_else(|| ApiError::not_found(rt, name))?;
            if expected.is_some_and(|e| e != cur.rev) {
                return Err(ApiError::conflict(rt, name));
            }
            let old = decode(cur);
            let new = self.merge_update(rt, &old, std::mem::take(&mut obj), status)?;
            if new == old {
                // No change: no new revision, as the real server.
                result = Some(old);
                return Ok(Decision::Keep);
            }
            let finished = new.pointer("/metadata/deletionTimestamp").is_some()
                && new
                    .pointer("/metadata/finalizers")
                    .and_then(Value::as_array)
                    .is_none_or(|f| f.is_empty())
                && !graceful_pending(rt, &new);
            let decision = match (opts.dry_run, finished) {
                (true, _) => Decision::Keep,
                (false, true) => Decision::Delete,
                (false, false) => Decision::Put(encode(&new)),
            };
            result = Some(new);
            Ok(decision)
        })?;
        let mut result = result.expect("set on success");
        if let Some(e) = e {
            defaults::metadata(&mut result)
                .insert("resourceVersion".into(), json!(e.rev.to_string()));
        }
        Ok(result)
    }

    fn merge_update(
        &self,
        rt: &ResourceType,
        old: &Value,
        mut new: Value,
        status: bool,
    ) -> ApiResult<Value> {
        if status {
            // Only status changes through the status subresource.
            let mut out = old.clone();
            out["status"] = new.get("status").cloned().unwrap_or(Value::Null);
            return Ok(out);
        }
        new["apiVersion"] = json!(rt.api_version());
        new["kind"] = json!(rt.kind);
        {
            let om = old["metadata"].as_object().cloned().unwrap_or_default();
            let meta = defaults::metadata(&mut new);
            if !meta.contains_key("managedFields") {
                if let Some(mf) = om.get("managedFields") {
                    meta.insert("managedFields".into(), mf.clone());
                }
            }
            for f in [
                "uid",
                "creationTimestamp",
                "namespace",
                "name",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "resourceVersion",
            ] {
                match om.get(f) {
                    Some(v) => meta.insert(f.into(), v.clone()),
                    None => meta.remove(f),
                };
            }
            if om.contains_key("deletionTimestamp") {
                // Once deleting, finalizers can only be removed.
                let oldf: Vec<Value> = om
                    .get("finalizers")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let newf = meta
                    .get("finalizers")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                if newf.iter().any(|f| !oldf.contains(f)) {
                    return Err(ApiError::invalid(
                        rt,
                        meta_str(old, "name"),
                        vec![crate::status::Cause::forbidden(
                            "metadata.finalizers",
                            "no new finalizers can be added if the object is being deleted",
                        )],
                    ));
                }
            }
        }
        if rt.status_sub {
            new["status"] = old.get("status").cloned().unwrap_or(Value::Null);
        }
        defaults::apply(rt.kind, &mut new);
        if rt.kind == "Service" {
            services::keep_allocations(old, &mut new);
        }
        if rt.kind == "Secret" {
            fold_string_data(&mut new);
        }
        let causes = validate::fields(rt, &new);
        if !causes.is_empty() {
            return Err(ApiError::invalid(rt, meta_str(old, "name"), causes));
        }
        if rt.generation && new.get("spec") != old.get("spec") {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            new["metadata"]["generation"] = json!(g + 1);
        }
        if new.get("status") == Some(&Value::Null) && old.get("status").is_none() {
            new.as_object_mut().expect("object").remove("status");
        }
        Ok(new)
    }

    /// Delete: immediate, or marked with deletionTimestamp when finalizers or a grace period
    /// (pods on a node) hold it. Returns the object, or a Success Status when gone.
    pub fn delete(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
    ) -> ApiResult<Value> {
        if rt.kind == "Namespace" && matches!(name, "default" | "kube-system" | "kube-public") {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!("namespaces \"{name}\" is forbidden: this namespace may not be deleted"),
            ));
        }
        let key = rt.key(ns, name);
        let mut out = None;
        let mut gone = false;
        let e = self.store.write(&key, |cur| -> ApiResult<Decision> {
            let cur = cur.ok_or_else(|| ApiError::not_found(rt, name))?;
            let mut obj = decode(cur);
            if opts.expected_rv.is_some_and(|r| r != cur.rev)
                || opts
                    .expected_uid
                    .as_deref()
                    .is_some_and(|u| u != meta_str(&obj, "uid"))
            {
                return Err(ApiError::conflict(rt, name));
            }
            if opts.propagation == Propagation::Foreground && !meta_has_finalizer(&obj, FOREGROUND)
            {
                let m = defaults::metadata(&mut obj);
                let list = m.entry("finalizers").or_insert_with(|| json!([]));
                if let Some(l) = list.as_array_mut() {
                    l.push(json!(FOREGROUND));
                }
            }
            let finalizers = obj
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_some_and(|f| !f.is_empty());
            let grace = self.grace(rt, &obj, opts);
            let already = obj.pointer("/metadata/deletionTimestamp").is_some();
            if rt.kind == "Namespace" && !already {
                crate::namespaces::mark_terminating(&mut obj);
                let enc = encode(&obj);
                out = Some(obj);
                return Ok(Decision::Put(enc));
            }
            if !finalizers && grace == 0 {
                gone = true;
                out = Some(obj);
                return Ok(Decision::Delete);
            }
            let old_grace = obj
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64);
            if already && old_grace.is_none_or(|g| grace >= g) {
                out = Some(obj);
                return Ok(Decision::Keep);
            }
            let when = Utc::now() + chrono::Duration::seconds(grace);
            let m = defaults::metadata(&mut obj);
            m.insert(
                "deletionTimestamp".into(),
                json!(when.to_rfc3339_opts(SecondsFormat::Secs, true)),
            );
            m.insert("deletionGracePeriodSeconds".into(), json!(grace));
            let enc = encode(&obj);
            out = Some(obj);
            Ok(Decision::Put(enc))
        })?;
        let mut obj = out.expect("set on success");
        if let Some(e) = &e {
            defaults::metadata(&mut obj).insert("resourceVersion".into(), json!(e.rev.to_string()));
        }
        if gone && !matches!(rt.kind, "Pod" | "Deployment" | "ReplicaSet" | "Service") {
            return Ok(success_status(rt, name, meta_str(&obj, "uid")));
        }
        Ok(obj)
    }

    fn grace(&self, rt: &ResourceType, obj: &Value, opts: &DeleteOptions) -> i64 {
        if rt.kind != "Pod" {
            return 0;
        }
        // A pod never bound to a node has no kubelet to stop it: it goes at once.
        if obj
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            return 0;
        }
        if matches!(
            obj.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        ) {
            return 0;
        }
        opts.grace_seconds
            .or_else(|| {
                obj.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(30)
            .max(0)
    }
}

pub fn meta_has_finalizer(obj: &Value, name: &str) -> bool {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| f.iter().any(|x| x == name))
}

/// A pod marked for graceful deletion stays until its kubelet deletes it with grace 0.
fn graceful_pending(rt: &ResourceType, obj: &Value) -> bool {
    rt.kind == "Pod"
        && obj
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            > 0
}

/// What the real server's PrepareForCreate does with status.
fn prepare_create(rt: &ResourceType, obj: &mut Value) {
    match rt.kind {
        "Pod" => {
            obj["status"] = json!({"phase": "Pending", "qosClass": qos_class(&obj["spec"])});
        }
        "Deployment" | "ReplicaSet" | "DaemonSet" | "Job" | "Service" => {
            let lb = if rt.kind == "Service" {
                json!({"loadBalancer": {}})
            } else {
                json!({})
            };
            obj["status"] = lb;
        }
        "Namespace" => {
            obj["status"] = json!({"phase": "Active"});
        }
        _ => {}
    }
}

fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let has = |c: &Value, k: &str| c["resources"][k].as_object().is_some_and(|m| !m.is_empty());
    if containers
        .iter()
        .all(|c| !has(c, "requests") && !has(c, "limits"))
    {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        let l = &c["resources"]["limits"];
        ["cpu", "memory"].iter().all(|r| l.get(r).is_some())
            && c["resources"]["requests"]
                .as_object()
                .is_none_or(|req| req.iter().all(|(k, v)| l.get(k) == Some(v)))
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// Secrets store `stringData` merged into `data`, base64-encoded, as the real server does.
fn fold_string_data(obj: &mut Value) {
    let Some(sd) = obj.as_object_mut().and_then(|o| o.remove("stringData")) else {
        return;
    };
    let Some(sd) = sd.as_object().cloned() else {
        return;
    };
    if !obj.get("data").is_some_and(Value::is_object) {
        obj["data"] = json!({});
    }
    for (k, v) in sd {
        let s = v.as_str().unwrap_or("");
        obj["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(s));
    }
}
