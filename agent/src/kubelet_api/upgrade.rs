//! Upgrade negotiation for streaming requests: WebSocket with a channel subprotocol, or SPDY/3.1
//! with `X-Stream-Protocol-Version`, answered 101 as kubelet answers them.

use super::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, CONNECTION, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;

pub type Io = TokioIo<hyper::upgrade::Upgraded>;

/// Every value of a header that may repeat and list values with commas.
fn values(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

pub enum Kind {
    /// WebSocket with the chosen subprotocol.
    WebSocket(String),
    /// SPDY/3.1 with the chosen stream protocol version.
    Spdy(String),
}

/// Picks the transport and protocol (the client's first supported one), or the status and
/// message that refuse the request.
pub fn negotiate(
    req: &Request<Incoming>,
    ws_protocols: &[&str],
    spdy_protocols: &[&str],
) -> Result<Kind, (StatusCode, String)> {
    let h = req.headers();
    let upgrade = values(h, UPGRADE.as_str());
    let is = |p: &str| upgrade.iter().any(|u| u.eq_ignore_ascii_case(p));
    if is("websocket") {
        let offered = values(h, "sec-websocket-protocol");
        return offered
            .iter()
            .find(|p| ws_protocols.contains(&p.as_str()))
            .map(|p| Kind::WebSocket(p.clone()))
            .ok_or_else(|| {
                (
                    StatusCode::BAD_REQUEST,
                    format!(
                        "requested protocol(s) are not supported: {offered:?}; supports {ws_protocols:?}"
                    ),
                )
            });
    }
    if is("SPDY/3.1") {
        let offered = values(h, "x-stream-protocol-version");
        return offered
            .iter()
            .find(|p| spdy_protocols.contains(&p.as_str()))
            .map(|p| Kind::Spdy(p.clone()))
            .ok_or_else(|| {
                (
                    StatusCode::FORBIDDEN,
                    format!(
                        "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server supports {spdy_protocols:?}"
                    ),
                )
            });
    }
    Err((
        StatusCode::BAD_REQUEST,
        "Upgrade request required".to_string(),
    ))
}

/// The 101 answer for `kind`.
pub fn switching(req: &Request<Incoming>, kind: &Kind) -> Response<Body> {
    let mut b = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(CONNECTION, "Upgrade");
    match kind {
        Kind::WebSocket(p) => {
            let key = req
                .headers()
                .get("sec-websocket-key")
                .map(|k| k.as_bytes())
                .unwrap_or_default();
            b = b
                .header(UPGRADE, "websocket")
                .header(
                    "sec-websocket-accept",
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key),
                )
                .header("sec-websocket-protocol", p.as_str());
        }
        Kind::Spdy(p) => {
            b = b
                .header(UPGRADE, "SPDY/3.1")
                .header("x-stream-protocol-version", p.as_str());
        }
    }
    b.body(
        http_body_util::Empty::new()
            .map_err(|e: Infallible| match e {})
            .boxed(),
    )
    .expect("valid response")
}

/// Waits for the connection to switch, in the background; `f` gets the raw connection.
pub fn on_upgrade<F, Fut>(req: &mut Request<Incoming>, f: F)
where
    F: FnOnce(Io) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let pending = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match pending.await {
            Ok(up) => f(TokioIo::new(up)).await,
            Err(e) => tracing::debug!(error = %e, "connection upgrade failed"),
        }
    });
}

/// A WebSocket over an upgraded connection, server side.
pub async fn websocket(io: Io) -> tokio_tungstenite::WebSocketStream<Io> {
    tokio_tungstenite::WebSocketStream::from_raw_socket(
        io,
        tokio_tungstenite::tungstenite::protocol::Role::Server,
        None,
    )
    .await
}
