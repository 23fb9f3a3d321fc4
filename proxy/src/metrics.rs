//! What the proxy tells about its syncs, as kube-proxy does: Prometheus text on `/metrics`
//! (default 127.0.0.1:10249) and `/healthz` (default 0.0.0.0:10256), which turns 503 when
//! changes have waited for a sync longer than the health timeout.

use std::convert::Infallible;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::sync::{Applied, Written};
use crate::Error;

/// kube-proxy's buckets for the sync duration: 1 ms doubling to about 16 s.
const BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384,
];

#[derive(Debug, Default)]
struct State {
    /// Per bucket of BUCKETS, the syncs that took at most that long.
    buckets: [u64; 15],
    sum: f64,
    count: u64,
    full_syncs: u64,
    partial_syncs: u64,
    last_success: Option<SystemTime>,
    last_queued: Option<SystemTime>,
    /// Since when changes wait for a sync (None: nothing waits).
    waiting_since: Option<Instant>,
    sync_errors: u64,
    rules: u64,
    elements: u64,
}

/// The proxy's sync record, shared by the sync loop and the HTTP servers.
#[derive(Debug, Clone)]
pub struct Metrics {
    state: Arc<Mutex<State>>,
    health_timeout: Duration,
}

impl Metrics {
    /// `/healthz` fails once changes have waited longer than `health_timeout`.
    pub fn new(health_timeout: Duration) -> Metrics {
        Metrics {
            state: Arc::default(),
            health_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change arrived that the next sync applies.
    pub fn queued(&self) {
        let mut s = self.lock();
        s.last_queued = Some(SystemTime::now());
        s.waiting_since.get_or_insert_with(Instant::now);
    }

    /// A sync that started at `started` succeeded.
    pub fn synced(&self, started: Instant, kind: Applied, written: Written) {
        let secs = started.elapsed().as_secs_f64();
        let mut s = self.lock();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                s.buckets[i] += 1;
            }
        }
        s.sum += secs;
        s.count += 1;
        match kind {
            Applied::Full => s.full_syncs += 1,
            Applied::Partial => s.partial_syncs += 1,
            Applied::Unchanged => {}
        }
        if kind != Applied::Unchanged {
            s.rules += written.rules as u64;
            s.elements += written.elements as u64;
        }
        s.last_success = Some(SystemTime::now());
        // Changes that arrived during this sync were read by it or queue again.
        if s.waiting_since.is_some_and(|w| w <= started) {
            s.waiting_since = None;
        }
    }

    pub fn sync_failed(&self) {
        self.lock().sync_errors += 1;
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let s = self.lock();
        let mut out = String::new();
        let name = "kubeproxy_sync_proxy_rules_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} SyncProxyRules latency in seconds\n# TYPE {name} histogram"
        );
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", s.buckets[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", s.count);
        let _ = writeln!(out, "{name}_sum {}", s.sum);
        let _ = writeln!(out, "{name}_count {}", s.count);
        let secs = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0.0, |d| d.as_secs_f64())
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        gauge(
            &mut out,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            secs(s.last_success),
        );
        gauge(
            &mut out,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            secs(s.last_queued),
        );
        counter(
            &mut out,
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
            "Cumulative proxy nftables sync failures",
            s.sync_errors,
        );
        counter(
            &mut out,
            "kubeproxy_sync_full_proxy_rules_total",
            "Full syncs of the proxy rules",
            s.full_syncs,
        );
        counter(
            &mut out,
            "kubeproxy_sync_partial_proxy_rules_total",
            "Partial syncs of the proxy rules",
            s.partial_syncs,
        );
        counter(
            &mut out,
            "oxlet_proxy_nftables_rules_applied_total",
            "nftables rules written by successful syncs",
            s.rules,
        );
        counter(
            &mut out,
            "oxlet_proxy_nftables_elements_applied_total",
            "nftables set and map elements added or deleted by successful syncs",
            s.elements,
        );
        out
    }

    /// kube-proxy's /healthz answer: healthy unless changes have waited too long.
    pub fn health(&self) -> (bool, String) {
        let s = self.lock();
        let healthy = s
            .waiting_since
            .is_none_or(|w| w.elapsed() <= self.health_timeout);
        let rfc = |t: SystemTime| {
            chrono::DateTime::<chrono::Utc>::from(t)
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        };
        let body = serde_json::json!({
            "lastUpdated": s.last_success.map(rfc).unwrap_or_default(),
            "currentTime": rfc(SystemTime::now()),
            "nodeEligible": true,
        });
        (healthy, body.to_string())
    }
}

type Body = Full<Bytes>;

fn answer(status: StatusCode, kind: &str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", kind)
        .header("x-content-type-options", "nosniff")
        .body(Full::new(Bytes::from(body)))
        .expect("static headers are valid")
}

async fn route(
    m: Metrics,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(match req.uri().path() {
        "/metrics" => answer(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            m.render(),
        ),
        "/healthz" | "/livez" => {
            let (ok, body) = m.health();
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            answer(status, "application/json", body)
        }
        _ => answer(
            StatusCode::NOT_FOUND,
            "text/plain",
            "404 page not found\n".into(),
        ),
    })
}

/// Binds `addr` now (so that a taken port is an error at start) and serves `/metrics` and
/// `/healthz` from it until the returned task is aborted.
pub async fn serve(
    addr: SocketAddr,
    what: &'static str,
    m: Metrics,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Serve { what, addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| Error::Serve { what, addr, source })?;
    info!(%local, what, "serving");
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let m = m.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| route(m.clone(), req));
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    debug!(error = %e, "http connection");
                }
            });
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_fill_the_histogram_and_counters() {
        let m = Metrics::new(Duration::from_secs(60));
        let written = Written {
            rules: 7,
            elements: 3,
        };
        m.synced(Instant::now(), Applied::Full, written);
        m.sync_failed();
        let text = m.render();
        for line in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total 1",
            "kubeproxy_sync_full_proxy_rules_total 1",
            "oxlet_proxy_nftables_rules_applied_total 7",
            "oxlet_proxy_nftables_elements_applied_total 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn waiting_changes_turn_health_off_after_the_timeout() {
        let m = Metrics::new(Duration::from_millis(20));
        assert!(m.health().0);
        m.queued();
        assert!(m.health().0);
        std::thread::sleep(Duration::from_millis(40));
        let (ok, body) = m.health();
        assert!(!ok, "{body}");
        m.synced(Instant::now(), Applied::Partial, Written::default());
        let (ok, body) = m.health();
        assert!(ok);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["nodeEligible"], true);
        assert!(v["lastUpdated"].as_str().unwrap().ends_with('Z'), "{body}");
    }
}
