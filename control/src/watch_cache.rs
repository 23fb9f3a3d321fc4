//! The watch cache: every resource's current objects in memory, primed from the store at start
//! and kept by the store's commit stream (applied before a commit becomes visible, so the cache
//! is never behind an acknowledged write). Lists, gets and watches are served from it: lists
//! page in O(page) from an ordered map, with indexes for `spec.nodeName` (pods) and the
//! `kubernetes.io/service-name` label (EndpointSlices), namespaces being key ranges. Each
//! resource keeps a window of its recent events, bounded in count and bytes, for watches
//! resuming from a recent revision; older resumes read the store's log. Watchers get events
//! through their own bounded queue, filled only with events their namespace and index value
//! can match; a watcher whose queue is full is expired (410) and holds back no one.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::registry::{decode, ListOptions};
use crate::resources::{ResourceType, TYPES};
use crate::select::{FieldSelector, LabelSelector};
use crate::store::{Event, EventKind, Store, StoreError};

/// Events of one resource kept for resuming watches, at most this many...
const WINDOW_EVENTS: usize = 2048;
/// ... and about this many bytes of object JSON.
const WINDOW_BYTES: usize = 16 << 20;
/// Events queued for one watcher and not yet taken by its stream before it is expired.
pub const WATCHER_QUEUE: usize = 1024;

/// One object as the cache holds it.
pub struct Object {
    pub rev: i64,
    /// The object as served: JSON with its resourceVersion.
    pub json: Bytes,
    labels: Option<Value>,
    /// The indexed value (a pod's node, "" when unscheduled; a slice's service name).
    ix: Option<Box<str>>,
}

impl Object {
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.json).unwrap_or(Value::Null)
    }
}

/// What a resource is indexed by.
#[derive(Clone, Copy, PartialEq, Eq)]
enum IndexBy {
    NodeName,
    ServiceName,
}

const SERVICE_NAME: &str = "kubernetes.io/service-name";

impl IndexBy {
    fn of(rt: &ResourceType) -> Option<IndexBy> {
        match (rt.group, rt.plural) {
            ("", "pods") => Some(IndexBy::NodeName),
            ("discovery.k8s.io", "endpointslices") => Some(IndexBy::ServiceName),
            _ => None,
        }
    }

    fn value(self, summary: &Value) -> Option<Box<str>> {
        match self {
            IndexBy::NodeName => Some(
                summary
                    .pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .into(),
            ),
            IndexBy::ServiceName => summary
                .pointer("/metadata/labels")
                .and_then(|l| l.get(SERVICE_NAME))
                .and_then(Value::as_str)
                .map(Into::into),
        }
    }

    /// The value a selector requires of the index, if it pins one.
    fn required<'a>(self, labels: &'a LabelSelector, fields: &'a FieldSelector) -> Option<&'a str> {
        match self {
            IndexBy::NodeName => fields.required("spec.nodeName"),
            IndexBy::ServiceName => labels.required(SERVICE_NAME),
        }
    }
}

/// A watcher's registration: which events it can want, and where they go.
struct Slot {
    prefix: String,
    ix: Option<String>,
    tx: mpsc::Sender<Arc<Event>>,
    expired: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<Arc<str>, Arc<Object>>,
    index: HashMap<Box<str>, BTreeSet<Arc<str>>>,
    window: VecDeque<Arc<Event>>,
    window_bytes: usize,
    /// The window holds every event of this resource after this revision.
    window_from: i64,
    /// The newest revision applied to this resource.
    last_rev: i64,
    slots: Vec<Slot>,
}

struct Resource {
    index_by: Option<IndexBy>,
    state: Mutex<State>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The key's resource prefix: `/core/pods/` of `/core/pods/ns/name`.
fn resource_prefix(key: &str) -> Option<&str> {
    let mut slashes = key.match_indices('/').map(|(i, _)| i);
    let third = slashes.nth(2)?;
    Some(&key[..=third])
}

/// A page of objects, as listed from the cache or the store.
pub struct CachedList {
    pub items: Vec<Arc<Object>>,
    pub rev: i64,
    /// The key after which the next page starts.
    pub more_after: Option<String>,
    pub remaining: Option<i64>,
}

/// Where a watch's events come from: its backlog, then its queue.
pub struct CacheWatch {
    pub backlog: Vec<Arc<Event>>,
    pub rx: mpsc::Receiver<Arc<Event>>,
    /// Set when the watcher fell too far behind and was dropped from dispatch.
    pub expired: Arc<AtomicBool>,
    /// The revision the backlog (or the initial list) reaches.
    pub rev: i64,
    /// The current objects, when asked for (`sendInitialEvents`, or no resourceVersion).
    pub initial: Option<Vec<Arc<Object>>>,
}

pub struct WatchCache {
    store: Store,
    resources: HashMap<String, Resource>,
}

impl WatchCache {
    /// Builds the cache from the store and keeps it from every later commit.
    pub fn start(store: &Store) -> Result<Arc<WatchCache>, StoreError> {
        let mut resources = HashMap::new();
        for rt in TYPES {
            resources.insert(
                rt.prefix(),
                Resource {
                    index_by: IndexBy::of(rt),
                    state: Mutex::new(State::default()),
                },
            );
        }
        let cache = Arc::new(WatchCache {
            store: store.clone(),
            resources,
        });
        // Every resource is held while priming: batches committed meanwhile wait in the sink.
        let mut guards: HashMap<&str, MutexGuard<'_, State>> = cache
            .resources
            .iter()
            .map(|(p, r)| (p.as_str(), lock(&r.state)))
            .collect();
        let weak = Arc::downgrade(&cache);
        let from = store.on_commit(Arc::new(move |events: &[Arc<Event>]| {
            if let Some(c) = weak.upgrade() {
                c.apply(events);
            }
        }));
        for st in guards.values_mut() {
            // Whatever happened to a resource before `from` is in the store's log.
            st.window_from = from;
            st.last_rev = from;
        }
        let page = store.list("/", from, None, 0)?;
        for e in &page.items {
            let Some(prefix) = resource_prefix(&e.key) else {
                continue;
            };
            let (Some(r), Some(st)) = (cache.resources.get(prefix), guards.get_mut(prefix)) else {
                continue;
            };
            let v = decode(e);
            let summary = crate::watch::selectable(&v);
            let obj = Object {
                rev: e.rev,
                json: Bytes::from(serde_json::to_vec(&v).expect("JSON serialises")),
                labels: summary.pointer("/metadata/labels").cloned(),
                ix: r.index_by.and_then(|i| i.value(&summary)),
            };
            insert(st, Arc::from(e.key.as_str()), Arc::new(obj));
        }
        drop(guards);
        Ok(cache)
    }

    /// Applies one durable batch (called by the store, in revision order).
    fn apply(&self, events: &[Arc<Event>]) {
        for ev in events {
            let Some(r) = resource_prefix(&ev.entry.key).and_then(|p| self.resources.get(p)) else {
                continue;
            };
            let summary = crate::watch::decoded_object(ev);
            let mut st = lock(&r.state);
            let key: Arc<str> = Arc::from(ev.entry.key.as_str());
            let old = remove(&mut st, &key);
            let new_ix = r.index_by.and_then(|i| i.value(&summary));
            if ev.kind != EventKind::Deleted {
                let obj = Object {
                    rev: ev.entry.rev,
                    json: summary.json(),
                    labels: summary.pointer("/metadata/labels").cloned(),
                    ix: new_ix.clone(),
                };
                insert(&mut st, key.clone(), Arc::new(obj));
            }
            st.last_rev = ev.entry.rev;
            // The window: newest last, oldest dropped past either bound.
            st.window_bytes += ev.entry.value.len();
            st.window.push_back(ev.clone());
            while st.window.len() > WINDOW_EVENTS || st.window_bytes > WINDOW_BYTES {
                let Some(gone) = st.window.pop_front() else {
                    break;
                };
                st.window_bytes -= gone.entry.value.len();
                st.window_from = gone.entry.rev;
            }
            let old_ix = old.as_ref().and_then(|o| o.ix.as_deref());
            st.slots.retain(|s| {
                if !key.starts_with(s.prefix.as_str()) {
                    return true;
                }
                if let Some(want) = &s.ix {
                    if new_ix.as_deref() != Some(want.as_str()) && old_ix != Some(want.as_str()) {
                        return true;
                    }
                }
                match s.tx.try_send(ev.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        s.expired.store(true, Ordering::Release);
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
        }
    }

    fn resource(&self, rt: &ResourceType) -> &Resource {
        self.resources
            .get(&rt.prefix())
            .expect("a cache for every resource type")
    }

    /// The revision a read of this resource is consistent at: its own newest change, or the
    /// store's newest revision when that is later (nothing of this resource came between).
    fn read_rev(&self, st: &State) -> i64 {
        st.last_rev.max(self.store.current_rev().unwrap_or(0))
    }

    pub fn get(&self, rt: &ResourceType, key: &str) -> Option<Arc<Object>> {
        lock(&self.resource(rt).state).objects.get(key).cloned()
    }

    /// A page of objects under `prefix` (a resource or one of its namespaces) matching the
    /// selectors of `opts`, after key `after`, at most `opts.limit` (0: all). `None` when the resource
    /// changed since `unchanged_since`: that page must come from the store.
    pub fn list(
        &self,
        rt: &ResourceType,
        prefix: &str,
        opts: &ListOptions,
        after: Option<&str>,
        unchanged_since: Option<i64>,
    ) -> Option<CachedList> {
        let (labels, fields, limit) = (&opts.labels, &opts.fields, opts.limit);
        let r = self.resource(rt);
        let st = lock(&r.state);
        if unchanged_since.is_some_and(|rev| st.last_rev > rev) {
            return None;
        }
        let rev = unchanged_since.unwrap_or_else(|| self.read_rev(&st));
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Included(prefix),
        };
        let end = crate::store::prefix_end(prefix);
        let range = (start, Bound::Excluded(end.as_str()));
        let filtered = !labels.is_empty() || *fields != FieldSelector::default();
        let ix = r.index_by.and_then(|i| i.required(labels, fields));
        let keys: Box<dyn Iterator<Item = &Arc<str>>> = match ix {
            Some(v) => match st.index.get(v) {
                Some(set) => Box::new(set.range::<str, _>(range)),
                None => Box::new(std::iter::empty()),
            },
            None => Box::new(st.objects.range::<str, _>(range).map(|(k, _)| k)),
        };
        let mut items: Vec<Arc<Object>> = Vec::new();
        let mut last: Option<&Arc<str>> = None;
        let mut more_after = None;
        let mut remaining = None;
        let mut keys = keys.filter_map(|k| st.objects.get(k).map(|o| (k, o)));
        for (k, o) in keys.by_ref() {
            if filtered && !matches(r.index_by, k, o, labels, fields) {
                continue;
            }
            if limit > 0 && items.len() == limit {
                more_after = last.map(|k| k.to_string());
                // Counted only without selectors, as kube-apiserver does.
                remaining = (!filtered).then(|| 1 + keys.count() as i64);
                break;
            }
            items.push(o.clone());
            last = Some(k);
        }
        Some(CachedList {
            remaining: more_after.as_ref().and(remaining),
            more_after,
            items,
            rev,
        })
    }

    /// Starts a watch of `rt` under `prefix` for events after `after` (`None`: from now),
    /// or, with `initial`, from the current objects. A selector that pins the resource's
    /// index value narrows dispatch to events whose object has (or had) that value. `Gone`
    /// when `after` is older than the store's log.
    pub fn watch(
        &self,
        rt: &ResourceType,
        prefix: &str,
        labels: &LabelSelector,
        fields: &FieldSelector,
        after: Option<i64>,
        initial: bool,
    ) -> Result<CacheWatch, StoreError> {
        let r = self.resource(rt);
        let ix = r
            .index_by
            .and_then(|i| i.required(labels, fields))
            .map(str::to_string);
        if let Some(after) = after.filter(|_| !initial) {
            // What the log no longer has is not resumed from memory either: one rule for all.
            let compacted = self.store.compacted_rev()?;
            if after < compacted {
                return Err(StoreError::Gone {
                    requested: after,
                    compacted,
                });
            }
        }
        let (tx, rx) = mpsc::channel(WATCHER_QUEUE);
        let expired = Arc::new(AtomicBool::new(false));
        let slot = Slot {
            prefix: prefix.to_string(),
            ix,
            tx,
            expired: expired.clone(),
        };
        let mut st = lock(&r.state);
        if initial {
            let end = crate::store::prefix_end(prefix);
            let objects: Vec<Arc<Object>> = st
                .objects
                .range::<str, _>((Bound::Included(prefix), Bound::Excluded(end.as_str())))
                .filter(|(k, o)| matches(r.index_by, k, o, labels, fields))
                .map(|(_, o)| o.clone())
                .collect();
            let rev = self.read_rev(&st);
            st.slots.push(slot);
            return Ok(CacheWatch {
                backlog: Vec::new(),
                rx,
                expired,
                rev,
                initial: Some(objects),
            });
        }
        let Some(after) = after else {
            let rev = self.read_rev(&st);
            st.slots.push(slot);
            return Ok(CacheWatch {
                backlog: Vec::new(),
                rx,
                expired,
                rev,
                initial: None,
            });
        };
        if after >= st.window_from {
            let backlog: Vec<Arc<Event>> = st
                .window
                .iter()
                .filter(|e| e.entry.rev > after && e.entry.key.starts_with(prefix))
                .cloned()
                .collect();
            let rev = self.read_rev(&st).max(after);
            st.slots.push(slot);
            return Ok(CacheWatch {
                backlog,
                rx,
                expired,
                rev,
                initial: None,
            });
        }
        // Older than the window: the log has it, if not compacted. Registered first, so
        // every later event is queued while the log is read.
        let upto = st.last_rev;
        st.slots.push(slot);
        drop(st);
        let backlog = if upto > after {
            self.store
                .history(prefix, after, upto)?
                .into_iter()
                .map(Arc::new)
                .collect()
        } else {
            Vec::new()
        };
        Ok(CacheWatch {
            backlog,
            rx,
            expired,
            rev: upto.max(after),
            initial: None,
        })
    }

    /// The revision a bookmark of `rt` may name now when the watcher has nothing queued.
    pub fn bookmark_rev(&self, rt: &ResourceType, rx: &mpsc::Receiver<Arc<Event>>) -> Option<i64> {
        let st = lock(&self.resource(rt).state);
        rx.is_empty().then(|| self.read_rev(&st))
    }
}

fn insert(st: &mut State, key: Arc<str>, obj: Arc<Object>) {
    if let Some(v) = &obj.ix {
        st.index.entry(v.clone()).or_default().insert(key.clone());
    }
    st.objects.insert(key, obj);
}

fn remove(st: &mut State, key: &Arc<str>) -> Option<Arc<Object>> {
    let old = st.objects.remove(key)?;
    if let Some(v) = &old.ix {
        if let Some(set) = st.index.get_mut(v) {
            set.remove(key);
            if set.is_empty() {
                st.index.remove(v);
            }
        }
    }
    Some(old)
}

/// Whether a cached object matches the selectors; fields other than name, namespace and the
/// index are read from the object's JSON.
fn matches(
    index_by: Option<IndexBy>,
    key: &str,
    o: &Object,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> bool {
    if !labels.matches(o.labels.as_ref()) {
        return false;
    }
    if *fields == FieldSelector::default() {
        return true;
    }
    let mut parts = key.rsplitn(3, '/');
    let name = parts.next().unwrap_or("");
    let ns = parts.next().unwrap_or("");
    let by_node = index_by == Some(IndexBy::NodeName);
    let cheap = fields.only(&["metadata.name", "metadata.namespace"])
        || (by_node && fields.only(&["metadata.name", "metadata.namespace", "spec.nodeName"]));
    if cheap {
        let mut skeleton = serde_json::json!({"metadata": {"name": name}});
        if key.matches('/').count() >= 4 {
            skeleton["metadata"]["namespace"] = Value::from(ns);
        }
        if let Some(ix) = o.ix.as_deref().filter(|_| by_node) {
            skeleton["spec"] = serde_json::json!({"nodeName": ix});
        }
        return fields.matches(&skeleton);
    }
    fields.matches(&o.value())
}
