//! The kubelet API on port 10250 (HTTPS, client certificates of the cluster CA): /healthz,
//! /pods, /containerLogs, /exec, /attach, /portForward, /stats/summary and /metrics, as the API
//! server's pods/log, exec, attach and portforward subresources reach them.

mod exec;
mod logs;
mod portforward;
pub mod spdy;
mod stats;
pub mod tls;
mod upgrade;

use crate::pod_runtime::PodRuntime;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

pub use tls::pem_to_der;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kubelet serving certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("kubelet TLS: {0}")]
    Tls(#[from] tokio_rustls::rustls::Error),
}

pub type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(
            Full::new(body.into())
                .map_err(|e: Infallible| match e {})
                .boxed(),
        )
        .expect("valid response")
}

/// An error the way kubelet writes one (go-restful's WriteError: the message as plain text).
fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    full(status, "text/plain; charset=utf-8", message.to_string())
}

fn json(value: &impl serde::Serialize) -> Response<Body> {
    full(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(value).expect("serializable"),
    )
}

/// A body fed chunk by chunk from a channel (followed logs).
fn streaming(content_type: &str) -> (mpsc::Sender<Bytes>, Response<Body>) {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
    });
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("valid response");
    (tx, resp)
}

/// The query's parameters in order, percent-decoded (`+` is a space, as Go encodes them).
pub(crate) fn query(uri: &hyper::Uri) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(v) => {
                            out.push(v);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

pub(crate) fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Go's strconv.ParseBool, as kubelet reads its boolean parameters.
pub(crate) fn flag(q: &[(String, String)], name: &str) -> bool {
    matches!(
        param(q, name),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True")
    )
}

type Sessions = std::collections::BTreeMap<(&'static str, &'static str), u64>;

pub(crate) struct Api {
    ctx: Arc<PodRuntime>,
    started: Instant,
    /// Streaming sessions served, by (exec|attach|portforward, websocket|spdy), for /metrics.
    sessions: std::sync::Mutex<Sessions>,
}

/// A pod the agent runs, found by namespace and name.
pub(crate) struct LocalPod {
    pub uid: String,
    pub pod: Option<Arc<Pod>>,
}

impl Api {
    pub(crate) fn count_session(&self, kind: &'static str, transport: &upgrade::Kind) {
        let t = match transport {
            upgrade::Kind::WebSocket(_) => "websocket",
            upgrade::Kind::Spdy(_) => "spdy",
        };
        *self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((kind, t))
            .or_default() += 1;
    }

    fn find_pod(&self, ns: &str, name: &str) -> Option<LocalPod> {
        if let Some(pod) = self.ctx.pods_by_name(ns, name) {
            return Some(LocalPod {
                uid: pod.metadata.uid.clone().unwrap_or_default(),
                pod: Some(pod),
            });
        }
        // A pod whose worker ended (Succeeded or Failed) still has its record and containers.
        self.ctx.local_pods().into_iter().find_map(|uid| {
            let r = self.ctx.record(&uid)?;
            (r.namespace == ns && r.name == name).then_some(LocalPod { uid, pod: None })
        })
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>, authenticated: bool) -> Response<Body> {
        if !authenticated {
            return error(StatusCode::UNAUTHORIZED, "Unauthorized");
        }
        let path = req.uri().path().to_string();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match parts.as_slice() {
            ["healthz"] => full(StatusCode::OK, "text/plain; charset=utf-8", "ok"),
            ["pods"] => json(&stats::pod_list(&self.ctx)),
            ["stats", "summary"] => {
                let api = self.clone();
                match tokio::task::spawn_blocking(move || stats::summary(&api.ctx, api.started))
                    .await
                {
                    Ok(s) => json(&s),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
                }
            }
            ["metrics"] => {
                let api = self.clone();
                let sessions = api
                    .sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                match tokio::task::spawn_blocking(move || stats::metrics(&api.ctx, &sessions)).await
                {
                    Ok(text) => full(
                        StatusCode::OK,
                        "text/plain; version=0.0.4; charset=utf-8",
                        text,
                    ),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
                }
            }
            ["containerLogs", ns, pod, container] => {
                let (ns, pod, c) = (ns.to_string(), pod.to_string(), container.to_string());
                logs::serve(&self, &ns, &pod, &c, &query(req.uri())).await
            }
            [verb @ ("exec" | "attach"), ns, pod, container]
            | [verb @ ("exec" | "attach"), ns, pod, _, container] => {
                let (ns, pod, c) = (ns.to_string(), pod.to_string(), container.to_string());
                let attach = *verb == "attach";
                exec::serve(self.clone(), req, &ns, &pod, &c, attach).await
            }
            ["portForward", ns, pod] | ["portForward", ns, pod, _] => {
                let (ns, pod) = (ns.to_string(), pod.to_string());
                portforward::serve(self.clone(), req, &ns, &pod).await
            }
            _ => error(StatusCode::NOT_FOUND, "404 page not found"),
        }
    }
}

/// Serves the kubelet API on `0.0.0.0:<cfg.kubelet_port>` until the task is dropped.
pub async fn serve(ctx: Arc<PodRuntime>) -> Result<(), Error> {
    let cfg = &ctx.cfg;
    let addrs = [ctx.host_ip];
    let tls = tls::server_config(
        &cfg.data_dir.join("kubelet-pki"),
        &cfg.node_name,
        &addrs,
        &cfg.client_ca,
    )?;
    let addr = SocketAddr::from(([0, 0, 0, 0], cfg.kubelet_port));
    let listener = TcpListener::bind(addr).await.map_err(|source| Error::Io {
        what: format!("listen on {addr}"),
        source,
    })?;
    tracing::info!(%addr, "kubelet API listening");
    let api = Arc::new(Api {
        ctx: ctx.clone(),
        started: Instant::now(),
        sessions: Default::default(),
    });
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "kubelet API accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, api) = (acceptor.clone(), api.clone());
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "kubelet API TLS handshake");
                    return;
                }
            };
            let authenticated = stream
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            let svc = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.route(req, authenticated).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await
            {
                tracing::debug!(%peer, error = %e, "kubelet API connection");
            }
        });
    }
}
