//! httpGet actions: a GET from the node to the pod (or `host`), TLS unverified, redirects
//! followed only to the same host, as kubelet's prober does.

use super::action::{join_host_port, ActionError};
use super::{Outcome, Target};
use k8s_openapi::api::core::v1::HTTPGetAction;
use std::sync::OnceLock;
use std::time::Duration;

/// User-Agent product of probes (`kube-probe/1.33`).
pub const PROBE: &str = "kube-probe";
/// User-Agent product of lifecycle hooks.
pub const HOOK: &str = "kube-lifecycle";
/// How much of a body kubelet keeps for messages.
const MAX_BODY: usize = 10 * 1024;

/// `major.minor` of the kubelet version the node reports.
pub(crate) fn version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        let v = crate::node::KUBELET_VERSION.trim_start_matches('v');
        v.splitn(3, '.').take(2).collect::<Vec<_>>().join(".")
    })
}

fn client() -> &'static reqwest::Client {
    static C: OnceLock<reqwest::Client> = OnceLock::new();
    C.get_or_init(|| {
        let policy = reqwest::redirect::Policy::custom(|a| {
            let first = a.previous().first().cloned();
            if a.previous().len() >= 10 {
                a.error("stopped after 10 redirects")
            } else if first.is_some_and(|f| {
                f.host_str() == a.url().host_str()
                    && f.port_or_known_default() == a.url().port_or_known_default()
            }) {
                a.follow()
            } else {
                // Another host: the 3xx itself is the answer.
                a.stop()
            }
        });
        reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .no_proxy()
            .pool_max_idle_per_host(0)
            .redirect(policy)
            .build()
            .expect("HTTP client with rustls")
    })
}

/// The URL an action requests.
pub fn url(target: &Target, h: &HTTPGetAction) -> Result<String, ActionError> {
    let host = target.host_for(h.host.as_deref())?;
    let port = target.port(&h.port)?;
    let scheme = h.scheme.as_deref().unwrap_or("HTTP").to_ascii_lowercase();
    let path = h.path.as_deref().unwrap_or("");
    let slash = if path.starts_with('/') { "" } else { "/" };
    Ok(format!(
        "{scheme}://{}{slash}{path}",
        join_host_port(&host, port)
    ))
}

/// Go's wording of why a request failed, after `Get "http://...": ` (`dial tcp ...: connect:
/// connection refused`).
pub fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "context deadline exceeded (Client.Timeout exceeded while awaiting headers)".into();
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            let addr = e
                .url()
                .and_then(|u| Some(join_host_port(u.host_str()?, u.port_or_known_default()?)))
                .unwrap_or_default();
            return format!("dial tcp {addr}: connect: {}", super::tcp::os_error(io));
        }
        src = s.source();
    }
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    msg
}

/// Sends the GET; the status and the start of the body.
pub async fn get(
    target: &Target,
    h: &HTTPGetAction,
    timeout: Duration,
    agent: &str,
) -> Result<(u16, String), ActionError> {
    let url = url(target, h)?;
    let mut req = client().get(&url).timeout(timeout);
    let headers = h.http_headers.clone().unwrap_or_default();
    let has = |n: &str| headers.iter().any(|x| x.name.eq_ignore_ascii_case(n));
    if !has("user-agent") {
        req = req.header("User-Agent", format!("{agent}/{}", version()));
    }
    if !has("accept") {
        req = req.header("Accept", "*/*");
    }
    for x in &headers {
        req = req.header(x.name.as_str(), x.value.as_str());
    }
    let read = async {
        let mut resp = req.send().await.map_err(|source| ActionError::Http {
            url: url.clone(),
            source,
        })?;
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        while body.len() < MAX_BODY {
            match resp.chunk().await {
                Ok(Some(c)) => body.extend_from_slice(&c),
                _ => break,
            }
        }
        body.truncate(MAX_BODY);
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r,
        Err(_) => Err(ActionError::HttpTimeout { url }),
    }
}

/// An httpGet probe: 2xx success, 3xx success with a warning, anything else failure.
pub async fn probe(target: &Target, h: &HTTPGetAction, timeout: Duration, agent: &str) -> Outcome {
    match get(target, h, timeout, agent).await {
        Ok((s, _)) if (200..300).contains(&s) => Outcome::Success,
        Ok((s, body)) if (300..400).contains(&s) => {
            Outcome::Warning(format!("Probe terminated redirects, Response body: {body}"))
        }
        Ok((s, _)) => Outcome::Failure(format!("HTTP probe failed with statuscode: {s}")),
        Err(e) => Outcome::Failure(e.to_string()),
    }
}
