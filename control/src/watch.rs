//! Watch streams: `{"type","object"}` JSON lines from a resourceVersion, with the current state
//! first when none is given, bookmarks, timeouts, and an ERROR 410 event when compacted.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{header, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::debug;

use crate::http::{self, flag, Body};
use crate::registry::{decode, Registry};
use crate::rest::{list_options, Call};
use crate::status::{ApiError, ApiResult};
use crate::store::{Event, EventKind, StoreError};
use crate::table;

const BOOKMARK_EVERY: Duration = Duration::from_secs(30);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

fn kind_name(k: EventKind) -> &'static str {
    match k {
        EventKind::Added => "ADDED",
        EventKind::Modified => "MODIFIED",
        EventKind::Deleted => "DELETED",
    }
}

/// What every watcher needs from one event, derived once and shared through the event's memo:
/// the JSON it sends and what selectors look at, not the whole decoded object (events stay in
/// the watch window, whose memory this keeps small).
struct Decoded {
    /// The object as JSON, with its resourceVersion, as every non-table watcher sends it.
    json: Bytes,
    /// What selectors and the garbage collector read (see `selectable`).
    summary: Value,
    prev: Option<Value>,
}

/// The parts of an object a field or label selector can name: top-level scalars, and the
/// scalars of top-level objects (`spec.nodeName`, `status.phase`, `involvedObject.name`...),
/// plus the lists of metadata the collector reads. `managedFields`, annotations and nested
/// specs are left out.
pub(crate) fn selectable(v: &Value) -> Value {
    let Some(top) = v.as_object() else {
        return Value::Null;
    };
    let mut out = serde_json::Map::new();
    for (k, x) in top {
        match x {
            Value::Object(inner) => {
                let mut o = serde_json::Map::new();
                for (ik, ix) in inner {
                    let keep = !ix.is_object() && !ix.is_array()
                        || (k == "metadata"
                            && matches!(ik.as_str(), "labels" | "ownerReferences" | "finalizers"));
                    if keep {
                        o.insert(ik.clone(), ix.clone());
                    }
                }
                out.insert(k.clone(), Value::Object(o));
            }
            Value::Array(_) => {}
            scalar => {
                out.insert(k.clone(), scalar.clone());
            }
        }
    }
    Value::Object(out)
}

fn decoded(ev: &Event) -> Arc<Decoded> {
    ev.memo.get_or_init(|| {
        let obj = decode(&ev.entry);
        let json = Bytes::from(serde_json::to_vec(&obj).expect("JSON serialises"));
        let prev = ev
            .prev
            .as_ref()
            .and_then(|p| serde_json::from_slice::<Value>(p).ok())
            .map(|p| selectable(&p));
        Decoded {
            json,
            summary: selectable(&obj),
            prev,
        }
    })
}

/// An event's object as selectors see it, decoded once for everyone who reads the event.
pub(crate) struct DecodedObject(Arc<Decoded>);

impl std::ops::Deref for DecodedObject {
    type Target = Value;
    fn deref(&self) -> &Value {
        &self.0.summary
    }
}

impl DecodedObject {
    /// The object's JSON, with its resourceVersion.
    pub(crate) fn json(&self) -> Bytes {
        self.0.json.clone()
    }
}

pub(crate) fn decoded_object(ev: &Event) -> DecodedObject {
    DecodedObject(decoded(ev))
}

/// The event a selecting watch shows for a change: a modification that moves an object into
/// the selection is ADDED, out of it DELETED, as the real server's watch cache does. `deep`:
/// the selector names fields the summary does not keep, so this watcher decodes in full.
fn filtered(
    ev: &Event,
    matches: &impl Fn(&Value) -> bool,
    deep: bool,
) -> Option<(&'static str, Arc<Decoded>)> {
    let d = decoded(ev);
    let (now, before) = if deep {
        let full = serde_json::from_slice::<Value>(&d.json).unwrap_or(Value::Null);
        let prev = ev
            .prev
            .as_ref()
            .and_then(|p| serde_json::from_slice::<Value>(p).ok());
        (matches(&full), prev.map(|p| matches(&p)))
    } else {
        (matches(&d.summary), d.prev.as_ref().map(matches))
    };
    match (ev.kind, now, before) {
        (EventKind::Modified, true, Some(false)) => Some(("ADDED", d)),
        (EventKind::Modified, false, Some(true)) => Some(("DELETED", d)),
        (_, true, _) => Some((kind_name(ev.kind), d)),
        _ => None,
    }
}

struct Emitter {
    tx: mpsc::Sender<Bytes>,
    table: bool,
    /// Length-prefixed protobuf `WatchEvent` frames instead of JSON lines.
    protobuf: bool,
    include: String,
    headers_sent: bool,
}

impl Emitter {
    /// Sends one event; false when the client has gone.
    async fn send(&mut self, c: &Call, ty: &str, obj: Value) -> bool {
        let obj = if self.table && ty != "BOOKMARK" && ty != "ERROR" {
            let meta =
                json!({"resourceVersion": crate::registry::meta_str(&obj, "resourceVersion")});
            let t = table::table(c.rt, &[obj], meta, &self.include, !self.headers_sent);
            self.headers_sent = true;
            t
        } else {
            obj
        };
        if self.protobuf {
            if let Some(frame) = crate::protobuf::encode::watch_frame(ty, &obj) {
                return self.tx.send(Bytes::from(frame)).await.is_ok();
            }
        }
        let mut line =
            serde_json::to_vec(&json!({"type": ty, "object": obj})).expect("JSON serialises");
        line.push(b'\n');
        self.tx.send(Bytes::from(line)).await.is_ok()
    }

    /// Sends a change; the object's JSON is the one shared by all watchers of the event.
    async fn send_change(&mut self, c: &Call, ty: &str, d: &Decoded) -> bool {
        self.send_json(c, ty, &d.json).await
    }

    /// Sends an event of an object given as its served JSON.
    async fn send_json(&mut self, c: &Call, ty: &str, json: &Bytes) -> bool {
        if self.table || self.protobuf {
            let obj = serde_json::from_slice(json).unwrap_or(Value::Null);
            return self.send(c, ty, obj).await;
        }
        let mut line = Vec::with_capacity(json.len() + 32);
        line.extend_from_slice(b"{\"type\":\"");
        line.extend_from_slice(ty.as_bytes());
        line.extend_from_slice(b"\",\"object\":");
        line.extend_from_slice(json);
        line.extend_from_slice(b"}\n");
        self.tx.send(Bytes::from(line)).await.is_ok()
    }
}

pub fn watch(reg: &Registry, c: Call) -> ApiResult<Response<Body>> {
    let opts = list_options(&c.query)?;
    let rv = c.query.get("resourceVersion").cloned().unwrap_or_default();
    let explicit_initial = c.query.get("sendInitialEvents").map(String::as_str) == Some("true");
    let send_initial = match c.query.get("sendInitialEvents") {
        Some(_) => explicit_initial,
        None => rv.is_empty() || rv == "0",
    };
    let bookmarks = flag(&c.query, "allowWatchBookmarks");
    let timeout = c
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    let prefix = c.rt.ns_prefix(c.ns.as_deref());
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let protobuf = crate::protobuf::wants_protobuf(&c.accept);
    let mut em = Emitter {
        tx,
        table: http::wants_table(&c.accept),
        protobuf,
        include: c
            .query
            .get("includeObject")
            .cloned()
            .unwrap_or_else(|| "Metadata".into()),
        headers_sent: false,
    };
    // No resourceVersion (or 0) without initial events: from now on.
    let after = match crate::registry::parse_rv(&rv)? {
        Some(r) if r > 0 => Some(r),
        _ => None,
    };
    let started = reg.cache.watch(
        c.rt,
        &prefix,
        &opts.labels,
        &opts.fields,
        after,
        send_initial,
    );
    let cache = reg.cache.clone();
    tokio::spawn(async move {
        let deep = !opts.fields.shallow();
        let matches = |o: &Value| {
            opts.labels.matches(o.pointer("/metadata/labels")) && opts.fields.matches(o)
        };
        let mut w = match started {
            Ok(w) => w,
            Err(StoreError::Gone {
                requested,
                compacted,
            }) => {
                let e = ApiError::gone(format!(
                    "too old resource version: {requested} ({compacted})"
                ));
                em.send(&c, "ERROR", e.to_status()).await;
                return;
            }
            Err(e) => {
                em.send(&c, "ERROR", ApiError::internal(e.to_string()).to_status())
                    .await;
                return;
            }
        };
        for o in w.initial.take().into_iter().flatten() {
            if !em.send_json(&c, "ADDED", &o.json).await {
                return;
            }
        }
        if explicit_initial && bookmarks {
            let b = json!({"kind": c.rt.kind, "apiVersion": c.rt.api_version(), "metadata": {
                "resourceVersion": w.rev.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
            if !em.send(&c, "BOOKMARK", b).await {
                return;
            }
        }
        for ev in std::mem::take(&mut w.backlog) {
            if let Some((ty, d)) = filtered(&ev, &matches, deep) {
                if !em.send_change(&c, ty, &d).await {
                    return;
                }
            }
        }
        let mut last = w.rev;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + BOOKMARK_EVERY, BOOKMARK_EVERY);
        let bookmark = |rev: i64| json!({"kind": c.rt.kind, "apiVersion": c.rt.api_version(), "metadata": {"resourceVersion": rev.to_string()}});
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    // A last bookmark lets the client resume right where this stream ends.
                    if bookmarks {
                        let rev = cache.bookmark_rev(c.rt, &w.rx).unwrap_or(last);
                        em.send(&c, "BOOKMARK", bookmark(rev)).await;
                    }
                    return;
                }
                _ = em.tx.closed() => return,
                _ = tick.tick(), if bookmarks => {
                    // With nothing queued, the resource's current revision: a client resuming
                    // from it misses nothing, even when no event of its own came for long.
                    last = cache.bookmark_rev(c.rt, &w.rx).unwrap_or(last).max(last);
                    if !em.send(&c, "BOOKMARK", bookmark(last)).await {
                        return;
                    }
                }
                ev = w.rx.recv() => match ev {
                    Some(ev) => {
                        last = ev.entry.rev;
                        if let Some((ty, d)) = filtered(&ev, &matches, deep) {
                            if !em.send_change(&c, ty, &d).await {
                                return;
                            }
                        }
                    }
                    // Dropped from dispatch: this watcher fell a whole queue behind the
                    // writers. It ends with the 410 Expired a client answers by listing
                    // again; no one else waited for it.
                    None if w.expired.load(std::sync::atomic::Ordering::Acquire) => {
                        debug!(prefix, last, "watcher too slow, expiring it");
                        let e = ApiError::gone(format!(
                            "too old resource version: {last} ({})",
                            cache.bookmark_rev(c.rt, &w.rx).unwrap_or(last)
                        ));
                        em.send(&c, "ERROR", e.to_status()).await;
                        return;
                    }
                    None => return,
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, http::BoxError>(Frame::data(b)), rx))
    });
    Ok(Response::builder()
        .status(200)
        .header(
            header::CONTENT_TYPE,
            if protobuf {
                crate::protobuf::WATCH_CONTENT_TYPE
            } else {
                "application/json"
            },
        )
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(StreamBody::new(stream).boxed())
        .expect("valid response"))
}
