//! Object semantics on top of the store: metadata (uid, creationTimestamp, generation,
//! resourceVersion), defaulting and validation, optimistic concurrency, status separation,
//! graceful deletion and finalizers. Shared by the HTTP handlers and in-process controllers.

use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::Mutex as AsyncMutex;

use crate::defaults;
use crate::resources::{self, ResourceType};
use crate::select::{FieldSelector, LabelSelector};
use crate::services;
use crate::status::{success_status, ApiError, ApiResult};
use crate::store::{Decision, Entry, Store, StoreError};
use crate::validate;
use crate::watch_cache::{CachedList, WatchCache};

#[derive(Clone)]
pub struct Registry {
    pub store: Store,
    /// Every resource's objects and recent events, kept from the store's commits: what
    /// gets, lists and watches read.
    pub cache: Arc<WatchCache>,
    /// ClusterIPs and NodePorts in use; its lock serialises allocation with the create that
    /// uses it.
    pub alloc: Arc<AsyncMutex<services::Allocations>>,
}

#[derive(Debug, Default, Clone)]
pub struct ListOptions {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: usize,
    pub continue_token: Option<String>,
    /// `resourceVersion` of the request.
    pub resource_version: Option<String>,
    /// `resourceVersionMatch`: `Exact` reads at that revision (from the store's log),
    /// `NotOlderThan` (or none) the newest state (from the cache).
    pub resource_version_match: Option<String>,
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

/// A list answer with each item as served JSON (no decoding on the way out).
#[derive(Debug)]
pub struct ListedJson {
    pub items: Vec<Bytes>,
    pub rev: i64,
    pub continue_token: Option<String>,
    pub remaining: Option<i64>,
}

/// A page from the cache, or (for an older revision) from the store.
enum ListPage {
    Cached(CachedList),
    Stored(Listed),
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

fn continue_token(rv: i64, more_after: Option<String>) -> Option<String> {
    more_after.map(|start| {
        let t = ContinueToken { rv, start };
        base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(&t).expect("JSON serialises"))
    })
}

impl Registry {
    /// The registry over `store`, with its watch cache primed from it.
    pub fn open(store: Store) -> Result<Registry, StoreError> {
        let cache = WatchCache::start(&store)?;
        Ok(Registry {
            store,
            cache,
            alloc: Arc::new(AsyncMutex::new(services::Allocations::default())),
        })
    }

    /// As `open`, for stores known to be readable (in-memory ones in tests): panics when the
    /// store cannot be listed.
    pub fn new(store: Store) -> Registry {
        Registry::open(store).expect("the store can be listed to prime the watch cache")
    }

    pub fn get(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> ApiResult<Value> {
        self.cache
            .get(rt, &rt.key(ns, name))
            .map(|o| o.value())
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// Lists objects at one revision, filtered and paged.
    pub fn list(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        opts: &ListOptions,
    ) -> ApiResult<Listed> {
        Ok(match self.list_page(rt, ns, opts)? {
            ListPage::Stored(l) => l,
            ListPage::Cached(c) => Listed {
                items: c.items.iter().map(|o| o.value()).collect(),
                rev: c.rev,
                continue_token: continue_token(c.rev, c.more_after),
                remaining: c.remaining,
            },
        })
    }

    /// As `list`, with each item as the JSON the server sends.
    pub fn list_json(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        opts: &ListOptions,
    ) -> ApiResult<ListedJson> {
        Ok(match self.list_page(rt, ns, opts)? {
            ListPage::Stored(l) => ListedJson {
                items: l
                    .items
                    .iter()
                    .map(|v| Bytes::from(serde_json::to_vec(v).expect("JSON serialises")))
                    .collect(),
                rev: l.rev,
                continue_token: l.continue_token,
                remaining: l.remaining,
            },
            ListPage::Cached(c) => ListedJson {
                items: c.items.iter().map(|o| o.json.clone()).collect(),
                rev: c.rev,
                continue_token: continue_token(c.rev, c.more_after),
                remaining: c.remaining,
            },
        })
    }

    /// The newest state comes from the cache; an exact older revision, or the next page of
    /// a list whose resource changed since its first page, from the store's log.
    fn list_page(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        opts: &ListOptions,
    ) -> ApiResult<ListPage> {
        let prefix = rt.ns_prefix(ns);
        let (token_rv, after) = match &opts.continue_token {
            Some(t) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(t)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<ContinueToken>(&b).ok())
                    .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
                (Some(raw.rv), Some(raw.start))
            }
            None => (None, None),
        };
        let rv = parse_rv(opts.resource_version.as_deref().unwrap_or(""))?;
        match (opts.resource_version_match.as_deref(), rv) {
            (None | Some(""), _) => {}
            (Some(_), None) => {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                ))
            }
            (Some("Exact"), Some(0)) => {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                ))
            }
            (Some("Exact"), Some(at)) if token_rv.is_none() => {
                return Ok(ListPage::Stored(
                    self.list_stored(rt, &prefix, opts, at, None)?,
                ));
            }
            (Some("Exact" | "NotOlderThan"), _) => {}
            (Some(other), _) => {
                return Err(ApiError::bad_request(format!(
                    "unsupported resourceVersionMatch {other:?}: Exact or NotOlderThan"
                )))
            }
        }
        if let Some(want) = rv.filter(|r| *r > 0 && token_rv.is_none()) {
            self.wait_for(want)?;
        }
        let cached = self
            .cache
            .list(rt, &prefix, opts, after.as_deref(), token_rv);
        match cached {
            Some(c) => Ok(ListPage::Cached(c)),
            None => Ok(ListPage::Stored(self.list_stored(
                rt,
                &prefix,
                opts,
                token_rv.unwrap_or(0),
                after,
            )?)),
        }
    }

    /// A read "not older than" `rev`: waits briefly for a revision not written yet, as
    /// kube-apiserver does, then answers 504.
    fn wait_for(&self, rev: i64) -> ApiResult<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            let cur = self.store.current_rev().unwrap_or(0);
            if cur >= rev {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(ApiError::new(
                    504,
                    "Timeout",
                    format!("Too large resource version: {rev}, current: {cur}"),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Lists from the store's log at revision `at` (0: newest), after key `after`.
    fn list_stored(
        &self,
        rt: &ResourceType,
        prefix: &str,
        opts: &ListOptions,
        at: i64,
        after: Option<String>,
    ) -> ApiResult<Listed> {
        let filtered = !opts.labels.is_empty() || opts.fields != FieldSelector::default();
        // With selectors, pages are filled by scanning in chunks until `limit` matches.
        let chunk = if filtered { 0 } else { opts.limit };
        let continuing = after.is_some();
        let page = self
            .store
            .list(prefix, at, after.as_deref(), chunk)
            .map_err(|e| match e {
                StoreError::Gone { .. } if continuing => ApiError::gone(
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter.",
                ),
                StoreError::Gone { .. } => {
                    ApiError::gone("The resourceVersion for the provided list is too old.")
                }
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
        let token = continue_token(page.rev, more_after);
        // Counted only without selectors, as kube-apiserver does.
        let remaining = token.as_ref().filter(|_| !filtered).map(|_| remaining);
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
        let mut generated = None;
        if name.is_empty() {
            if let Some(g) = meta
                .get("generateName")
                .and_then(Value::as_str)
                .filter(|g| !g.is_empty())
            {
                let n = format!("{g}{}", random_suffix());
                generated = Some(g.to_string());
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
            let mut guard = self.alloc.lock().await;
            services::allocate(self, &mut guard, &mut obj)?;
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
        let mut name = name;
        // A generated name that is taken gets another suffix, as kube-apiserver 1.31+.
        for attempt in 0.. {
            match self.store.create(&rt.key(ns, &name), &encode(&obj)) {
                Ok(e) => return Ok(decode(&e)),
                Err(crate::store::StoreError::AlreadyExists) if attempt < 8 => {
                    let Some(g) = &generated else {
                        return Err(ApiError::already_exists(rt, &name));
                    };
                    name = format!("{g}{}", random_suffix());
                    obj["metadata"]["name"] = json!(name);
                }
                Err(e) => return Err(ApiError::from_store(e, rt, &name)),
            }
        }
        unreachable!("the loop returns")
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
        let mut causes = validate::fields(rt, &new);
        causes.extend(validate::update(rt, old, &new));
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
