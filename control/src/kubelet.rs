//! Forwarding of pods/log, exec, attach and portforward to the pod's kubelet (port 10250 unless
//! the Node says otherwise), as kube-apiserver does: logs are streamed through; exec, attach
//! and port-forward are upgraded connections (WebSocket or SPDY) copied byte for byte.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{header, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, pki_types::ServerName};
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::http::{self, Body};
use crate::registry::{meta_str, Registry};
use crate::resources;
use crate::rest::Call;
use crate::status::{ApiError, ApiResult};

pub const DEFAULT_PORT: i64 = 10250;

/// Headers that carry an upgrade negotiation and are passed on both ways.
const UPGRADE_HEADERS: &[&str] = &[
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-accept",
    "sec-websocket-extensions",
    "x-stream-protocol-version",
];

/// Where the kubelet of `node` listens: its InternalIP (else Hostname) and kubelet port.
fn kubelet_address(reg: &Registry, node: &str) -> ApiResult<(String, u16)> {
    let nt = resources::get("", "nodes");
    let n = reg.get(nt, None, node)?;
    let addrs: Vec<&Value> = n
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let pick = |t: &str| {
        addrs
            .iter()
            .find(|a| a["type"] == t)
            .and_then(|a| a["address"].as_str())
    };
    let host = pick("InternalIP")
        .or_else(|| pick("Hostname"))
        .ok_or_else(|| ApiError::bad_request(format!("node {node:?} has no address")))?;
    let port = n
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_i64)
        .filter(|p| *p > 0)
        .unwrap_or(DEFAULT_PORT);
    Ok((host.to_string(), port as u16))
}

/// The container a request is for: the `container` parameter, or the only container.
fn container(pod: &Value, call: &Call) -> ApiResult<String> {
    if let Some(c) = call.query.get("container").filter(|c| !c.is_empty()) {
        return Ok(c.clone());
    }
    let names: Vec<&str> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.to_string()),
        _ => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {}, choose one of: [{}]",
            meta_str(pod, "name"),
            names.join(" ")
        ))),
    }
}

/// The request's own query (repeated `command` parameters kept in order), less `container`,
/// which the kubelet takes in the path.
fn query_without_container(raw: Option<&str>) -> String {
    raw.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("container="))
        .collect::<Vec<_>>()
        .join("&")
}

/// Forwards a pods/{log,exec,attach,portforward} request to the pod's kubelet.
pub async fn proxy(
    reg: &Registry,
    tls: Arc<rustls::ClientConfig>,
    call: Call,
    req: Request<Incoming>,
) -> ApiResult<Response<Body>> {
    let name = call.name.clone().unwrap_or_default();
    let ns = call.ns.clone().unwrap_or_default();
    let pod = reg.get(call.rt, Some(&ns), &name)?;
    let node = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("");
    if node.is_empty() {
        return Err(ApiError::bad_request(format!(
            "pod {name} does not have a host assigned"
        )));
    }
    let (host, port) = kubelet_address(reg, node)?;
    let sub = call.sub.as_deref().unwrap_or("");
    let query = query_without_container(req.uri().query());
    let path = match sub {
        "log" => format!("/containerLogs/{ns}/{name}/{}", container(&pod, &call)?),
        "exec" => format!("/exec/{ns}/{name}/{}", container(&pod, &call)?),
        "attach" => format!("/attach/{ns}/{name}/{}", container(&pod, &call)?),
        "portforward" => format!("/portForward/{ns}/{name}"),
        _ => return Err(ApiError::path_not_found()),
    };
    let uri = if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    };
    let unavailable = |e: String| {
        ApiError::new(
            502,
            "InternalError",
            format!("error dialing kubelet {host}:{port}: {e}"),
        )
    };
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let server_name = ServerName::try_from(host.clone()).map_err(|e| unavailable(e.to_string()))?;
    let stream = TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!("kubelet connection: {e}");
        }
    });
    let mut out = Request::builder()
        .method(req.method())
        .uri(&uri)
        .header(header::HOST, format!("{host}:{port}"));
    for h in UPGRADE_HEADERS {
        for v in req.headers().get_all(*h) {
            out = out.header(*h, v);
        }
    }
    let upgrading = req.headers().contains_key(header::UPGRADE);
    let resp = sender
        .send_request(
            out.body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("valid request"),
        )
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let status = resp.status();
    if !upgrading && !status.is_success() {
        // As kube-apiserver's response checker: the kubelet's plain-text error becomes a Status.
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&body[..body.len().min(64 << 10)])
            .trim()
            .to_string();
        return Err(match status.as_u16() {
            400 => ApiError::bad_request(text),
            500 => ApiError::internal(format!("Internal error occurred: {text}")),
            401 => ApiError::new(401, "Unauthorized", text),
            403 => ApiError::new(403, "Forbidden", text),
            404 => ApiError::new(404, "NotFound", text),
            code => ApiError::new(code, "InternalError", text),
        });
    }
    let mut back = Response::builder().status(status);
    for (k, v) in resp.headers() {
        if UPGRADE_HEADERS.contains(&k.as_str()) || k == header::CONTENT_TYPE {
            back = back.header(k, v);
        }
    }
    if upgrading && status == hyper::StatusCode::SWITCHING_PROTOCOLS {
        // Both sides switch protocols; from here on the bytes are copied as they are.
        tokio::spawn(async move {
            let (client, kubelet) = match (
                hyper::upgrade::on(req).await,
                hyper::upgrade::on(resp).await,
            ) {
                (Ok(c), Ok(k)) => (c, k),
                (c, k) => {
                    debug!("upgrade failed: client {:?} kubelet {:?}", c.err(), k.err());
                    return;
                }
            };
            let (mut c, mut k) = (TokioIo::new(client), TokioIo::new(kubelet));
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut k).await {
                debug!("stream copy ended: {e}");
            }
        });
        return Ok(back
            .body(http::full(bytes::Bytes::new()))
            .expect("valid response"));
    }
    let body = resp
        .into_body()
        .map_err(|e| Box::new(e) as http::BoxError)
        .boxed();
    Ok(back.body(body).expect("valid response"))
}
