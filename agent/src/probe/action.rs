//! The actions probes and lifecycle hooks run, and where they run them.

use k8s_openapi::api::core::v1::{
    Container, ExecAction, GRPCAction, HTTPGetAction, LifecycleHandler, Probe, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// What one run of an action found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Counts as a success, with a note (kubelet: a redirect to another host).
    Warning(String),
    /// The message kubelet shows after `... probe failed: `.
    Failure(String),
}

impl Outcome {
    pub fn ok(&self) -> bool {
        !matches!(self, Outcome::Failure(_))
    }
}

/// Why an action could not be run or did not succeed, in the words kubelet shows after
/// `... probe failed: ` or in a hook's failure event.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("pod has no IP address")]
    NoPodIp,
    #[error("couldn't find port: {port} in container {container:?}")]
    NoSuchPort { port: String, container: String },
    #[error("invalid port number: {0}")]
    InvalidPort(i64),
    #[error("dial tcp {addr}: connect: {}", super::tcp::os_error(.source))]
    Dial {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("dial tcp {addr}: i/o timeout")]
    DialTimeout { addr: String },
    #[error("Get {url:?}: {}", super::http::describe(.source))]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "Get {url:?}: context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
    )]
    HttpTimeout { url: String },
    #[error("no command")]
    NoCommand,
    #[error(transparent)]
    Exec(#[from] runtime::container::Error),
    #[error("exec did not finish: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A running container attempt and the address its network actions go to.
#[derive(Clone)]
pub struct Target {
    pub rt: Arc<runtime::cri::Runtime>,
    pub container_id: String,
    pub container: Arc<Container>,
    /// The pod IP (the node's for hostNetwork pods); `None` before the network is up.
    pub host: Option<IpAddr>,
}

impl Target {
    /// The host an action connects to: its own `host` field, else the pod's address.
    pub fn host_for(&self, explicit: Option<&str>) -> Result<String, ActionError> {
        match explicit.filter(|h| !h.is_empty()) {
            Some(h) => Ok(h.to_string()),
            None => self
                .host
                .map(|ip| ip.to_string())
                .ok_or(ActionError::NoPodIp),
        }
    }

    /// A port by number or by the name of one of the container's ports.
    pub fn port(&self, p: &IntOrString) -> Result<u16, ActionError> {
        let n = match p {
            IntOrString::Int(n) => *n,
            IntOrString::String(s) => match s.parse::<i32>() {
                Ok(n) => n,
                Err(_) => self
                    .container
                    .ports
                    .iter()
                    .flatten()
                    .find(|cp| cp.name.as_deref() == Some(s.as_str()))
                    .map(|cp| cp.container_port)
                    .ok_or_else(|| ActionError::NoSuchPort {
                        port: s.clone(),
                        container: self.container.name.clone(),
                    })?,
            },
        };
        u16::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or(ActionError::InvalidPort(n.into()))
    }
}

/// `host:port` with brackets for IPv6 addresses.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// One action of a probe or a lifecycle hook.
#[derive(Debug, Clone)]
pub enum Action {
    Exec(ExecAction),
    Http(HTTPGetAction),
    Tcp(TCPSocketAction),
    Grpc(GRPCAction),
    /// A lifecycle `sleep` of this many seconds.
    Sleep(i64),
}

impl Action {
    pub fn of_probe(p: &Probe) -> Option<Action> {
        if let Some(e) = &p.exec {
            return Some(Action::Exec(e.clone()));
        }
        if let Some(h) = &p.http_get {
            return Some(Action::Http(h.clone()));
        }
        if let Some(t) = &p.tcp_socket {
            return Some(Action::Tcp(t.clone()));
        }
        p.grpc.clone().map(Action::Grpc)
    }

    pub fn of_hook(h: &LifecycleHandler) -> Option<Action> {
        if let Some(e) = &h.exec {
            return Some(Action::Exec(e.clone()));
        }
        if let Some(g) = &h.http_get {
            return Some(Action::Http(g.clone()));
        }
        if let Some(s) = &h.sleep {
            return Some(Action::Sleep(s.seconds));
        }
        h.tcp_socket.clone().map(Action::Tcp)
    }

    /// Runs the action as a probe, within `timeout`.
    pub async fn run(&self, target: &Target, timeout: Duration) -> Outcome {
        match self {
            Action::Exec(e) => super::exec::probe(target, e, timeout).await,
            Action::Http(h) => super::http::probe(target, h, timeout, super::http::PROBE).await,
            Action::Tcp(t) => super::tcp::probe(target, t, timeout).await,
            Action::Grpc(g) => super::grpc::probe(target, g, timeout).await,
            Action::Sleep(s) => {
                tokio::time::sleep(Duration::from_secs((*s).max(0) as u64).min(timeout)).await;
                Outcome::Success
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ContainerPort;

    #[test]
    fn ports_by_number_and_name() {
        let c = Container {
            name: "web".into(),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        };
        let rt = runtime::cri::Runtime::new(runtime::cri::Config {
            data_dir: "/nonexistent".into(),
            run_dir: "/nonexistent".into(),
            shim: "/nonexistent".into(),
            log_max_size: 1,
            log_max_files: 1,
        });
        let t = Target {
            rt: Arc::new(rt),
            container_id: "x".into(),
            container: Arc::new(c),
            host: None,
        };
        assert_eq!(t.port(&IntOrString::Int(81)).unwrap(), 81);
        assert_eq!(t.port(&IntOrString::String("http".into())).unwrap(), 8080);
        assert_eq!(t.port(&IntOrString::String("9000".into())).unwrap(), 9000);
        assert_eq!(
            t.port(&IntOrString::String("grpc".into()))
                .unwrap_err()
                .to_string(),
            "couldn't find port: grpc in container \"web\""
        );
        assert_eq!(
            t.port(&IntOrString::Int(0)).unwrap_err().to_string(),
            "invalid port number: 0"
        );
        assert_eq!(
            t.host_for(None).unwrap_err().to_string(),
            "pod has no IP address"
        );
        assert_eq!(t.host_for(Some("example")).unwrap(), "example");
        assert_eq!(join_host_port("fd00::1", 80), "[fd00::1]:80");
    }
}
