//! Watch streams: `{"type","object"}` JSON lines from a resourceVersion, with the current state
//! first when none is given, bookmarks, timeouts, and an ERROR 410 event when compacted.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{header, Response};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

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

/// The event a selecting watch shows for a change: a modification that moves an object into
/// the selection is ADDED, out of it DELETED, as the real server's watch cache does.
fn filtered(ev: &Event, matches: &impl Fn(&Value) -> bool) -> Option<(&'static str, Value)> {
    let o = decode(&ev.entry);
    let now = matches(&o);
    let before = ev
        .prev
        .as_ref()
        .and_then(|p| serde_json::from_slice::<Value>(p).ok())
        .map(|p| matches(&p));
    match (ev.kind, now, before) {
        (EventKind::Modified, true, Some(false)) => Some(("ADDED", o)),
        (EventKind::Modified, false, Some(true)) => Some(("DELETED", o)),
        (_, true, _) => Some((kind_name(ev.kind), o)),
        _ => None,
    }
}

struct Emitter {
    tx: mpsc::Sender<Bytes>,
    table: bool,
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
        let mut line =
            serde_json::to_vec(&json!({"type": ty, "object": obj})).expect("JSON serialises");
        line.push(b'\n');
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
    let mut em = Emitter {
        tx,
        table: http::wants_table(&c.accept),
        include: c
            .query
            .get("includeObject")
            .cloned()
            .unwrap_or_else(|| "Metadata".into()),
        headers_sent: false,
    };
    let reg = reg.clone();
    // The starting state is read now, so that errors in the request still get a plain answer.
    let (initial, from) = if send_initial {
        let all = crate::registry::ListOptions::default();
        let crate::registry::Listed { items, rev, .. } = reg.list(c.rt, c.ns.as_deref(), &all)?;
        (items, rev)
    } else {
        let from = crate::registry::parse_rv(&rv)?.unwrap_or(0);
        (Vec::new(), from)
    };
    let watch = reg.store.watch(&prefix, from);
    tokio::spawn(async move {
        let matches = |o: &Value| {
            opts.labels.matches(o.pointer("/metadata/labels")) && opts.fields.matches(o)
        };
        let mut w = match watch {
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
        let mut last = from;
        for o in initial.into_iter().filter(|o| matches(o)) {
            if !em.send(&c, "ADDED", o).await {
                return;
            }
        }
        if explicit_initial && bookmarks {
            let b = json!({"kind": c.rt.kind, "apiVersion": c.rt.api_version(), "metadata": {
                "resourceVersion": from.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
            if !em.send(&c, "BOOKMARK", b).await {
                return;
            }
        }
        for ev in std::mem::take(&mut w.backlog) {
            last = ev.entry.rev;
            if let Some((ty, o)) = filtered(&ev, &matches) {
                if !em.send(&c, ty, o).await {
                    return;
                }
            }
        }
        last = last.max(w.seen_rev);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + BOOKMARK_EVERY, BOOKMARK_EVERY);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    // A last bookmark lets the client resume right where this stream ends.
                    if bookmarks {
                        let b = json!({"kind": c.rt.kind, "apiVersion": c.rt.api_version(), "metadata": {"resourceVersion": last.to_string()}});
                        em.send(&c, "BOOKMARK", b).await;
                    }
                    return;
                }
                _ = em.tx.closed() => return,
                _ = tick.tick(), if bookmarks => {
                    let b = json!({"kind": c.rt.kind, "apiVersion": c.rt.api_version(), "metadata": {"resourceVersion": last.to_string()}});
                    if !em.send(&c, "BOOKMARK", b).await {
                        return;
                    }
                }
                ev = w.live.recv() => match ev {
                    Ok(ev) => {
                        if ev.entry.rev <= w.seen_rev || !ev.entry.key.starts_with(&prefix) {
                            continue;
                        }
                        last = ev.entry.rev;
                        if let Some((ty, o)) = filtered(&ev, &matches) {
                            if !em.send(&c, ty, o).await {
                                return;
                            }
                        }
                    }
                    // Fell behind or shut down: end the stream; the client resumes from the
                    // last resourceVersion it saw, which the log still has.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
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
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(StreamBody::new(stream).boxed())
        .expect("valid response"))
}
