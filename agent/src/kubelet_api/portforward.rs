//! /portForward/{ns}/{pod}: SPDY/3.1 (`portforward.k8s.io`), directly or tunnelled inside a
//! WebSocket (`SPDY/3.1+portforward.k8s.io`, kubectl 1.31+). Each forwarded connection is a
//! pair of streams with the same `requestID`: `error` and `data`, naming the `port`; the data
//! stream is joined to a TCP connection to localhost:port inside the pod's network namespace.

use super::spdy;
use super::upgrade::{self, Kind};
use super::{error, Api, Body, LocalPod};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const SPDY_PROTOCOLS: &[&str] = &["portforward.k8s.io"];
const WS_PROTOCOLS: &[&str] = &["SPDY/3.1+portforward.k8s.io"];
/// How long the second stream of a pair may take (kubelet's streamCreationTimeout).
const PAIR_TIMEOUT: Duration = Duration::from_secs(30);

struct Target {
    pod: String,
    uid: String,
    /// The pod's network namespace; None for a host-network pod.
    netns: Option<PathBuf>,
}

pub(super) async fn serve(
    api: Arc<Api>,
    mut req: Request<Incoming>,
    ns: &str,
    pod: &str,
) -> Response<Body> {
    let Some(LocalPod { uid, .. }) = api.find_pod(ns, pod) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("pod {:?} does not exist", format!("{ns}/{pod}")),
        );
    };
    let sandbox = match api.ctx.rt.sandbox(&uid) {
        Ok(s) if s.dir.exists() => s,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("pod {pod:?} has no running sandbox"),
            )
        }
    };
    let target = Arc::new(Target {
        pod: pod.to_string(),
        uid,
        netns: sandbox.netns(),
    });
    let kind = match upgrade::negotiate(&req, WS_PROTOCOLS, SPDY_PROTOCOLS) {
        Ok(k) => k,
        Err((code, msg)) => return error(code, msg),
    };
    let resp = upgrade::switching(&req, &kind);
    api.count_session("portforward", &kind);
    upgrade::on_upgrade(&mut req, move |io| async move {
        match kind {
            Kind::Spdy(_) => forward(spdy::Connection::serve(io), target).await,
            Kind::WebSocket(_) => {
                let ws = upgrade::websocket(io).await;
                let (inner, outer) = tokio::io::duplex(64 << 10);
                tokio::spawn(tunnel(ws, outer));
                forward(spdy::Connection::serve(inner), target).await;
            }
        }
    });
    resp
}

/// Carries a byte stream in WebSocket binary messages both ways, as client-go's
/// TunnelingConnection does.
async fn tunnel(ws: tokio_tungstenite::WebSocketStream<upgrade::Io>, io: tokio::io::DuplexStream) {
    let (mut sink, mut stream) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(io);
    let up = async move {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink
            .send(Message::Close(Some(super::exec::normal_close())))
            .await;
        let _ = sink.close().await;
    };
    let down = async move {
        while let Some(Ok(msg)) = stream.next().await {
            let go_on = match msg {
                Message::Binary(b) => wr.write_all(&b).await.is_ok(),
                Message::Close(_) => false,
                _ => true,
            };
            if !go_on {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::join!(up, down);
}

/// Pairs the streams the client opens by requestID and forwards each pair.
async fn forward(mut conn: spdy::Connection, target: Arc<Target>) {
    let mut half: HashMap<String, (spdy::Stream, tokio::time::Instant)> = HashMap::new();
    while let Some(stream) = conn.incoming.recv().await {
        let now = tokio::time::Instant::now();
        half.retain(|_, (_, at)| now.duration_since(*at) < PAIR_TIMEOUT);
        let id = stream.header("requestid").unwrap_or("").to_string();
        let Some((other, _)) = half.remove(&id) else {
            half.insert(id, (stream, now));
            continue;
        };
        let (err, data) = match (stream.header("streamtype"), other.header("streamtype")) {
            (Some("error"), Some("data")) => (stream, other),
            (Some("data"), Some("error")) => (other, stream),
            _ => {
                stream.writer.reset().await;
                other.writer.reset().await;
                continue;
            }
        };
        tokio::spawn(forward_pair(err, data, target.clone()));
    }
}

async fn forward_pair(err: spdy::Stream, data: spdy::Stream, target: Arc<Target>) {
    let port = data.header("port").unwrap_or("").to_string();
    let fail = |msg: String| async {
        let _ = err.writer.write(Bytes::from(msg)).await;
        err.writer.close().await;
        data.writer.close().await;
    };
    let port: u16 = match port.parse() {
        Ok(p) if p > 0 => p,
        _ => {
            fail(format!("invalid port {port:?}")).await;
            return;
        }
    };
    let tcp = match connect(target.netns.clone(), port).await {
        Ok(t) => t,
        Err(e) => {
            fail(format!(
                "error forwarding port {port} to pod {}, uid {}: {e}",
                target.pod, target.uid
            ))
            .await;
            return;
        }
    };
    let (mut rd, mut wr) = tcp.into_split();
    let mut input = data.data;
    let writer = data.writer.clone();
    let to_pod = async move {
        while let Some(b) = input.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    let from_pod = async move {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !writer.write(Bytes::copy_from_slice(&buf[..n])).await {
                        break;
                    }
                }
            }
        }
        writer.close().await;
    };
    tokio::join!(to_pod, from_pod);
    err.writer.close().await;
}

/// Connects to localhost:port in the network namespace `netns` (the host's when None): the
/// socket is made by a thread of its own that entered the namespace, and keeps it.
async fn connect(netns: Option<PathBuf>, port: u16) -> std::io::Result<TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let r = (|| -> std::io::Result<std::net::TcpStream> {
            if let Some(ns) = &netns {
                let f = std::fs::File::open(ns)?;
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
            }
            let s = std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(10),
            )
            .or_else(|v4| {
                std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
                    Duration::from_secs(10),
                )
                .map_err(|_| v4)
            })?;
            s.set_nonblocking(true)?;
            Ok(s)
        })();
        let _ = tx.send(r);
    });
    let s = rx
        .await
        .map_err(|_| std::io::Error::other("connect thread ended"))??;
    TcpStream::from_std(s)
}
