//! tcpSocket actions: a TCP connection from the node to the pod, closed at once.

use super::action::{join_host_port, ActionError};
use super::{Outcome, Target};
use k8s_openapi::api::core::v1::TCPSocketAction;
use std::time::Duration;

/// Go's wording of a socket error (`connect: connection refused`).
pub fn os_error(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => {
            let desc = nix::errno::Errno::from_raw(n).desc();
            let mut c = desc.chars();
            match c.next() {
                Some(f) => f.to_lowercase().chain(c).collect(),
                None => e.to_string(),
            }
        }
        None => e.to_string(),
    }
}

/// Connects to `addr` (`host:port`) within `timeout`; the error as Go's dialer words it.
pub async fn dial(addr: &str, timeout: Duration) -> Result<tokio::net::TcpStream, ActionError> {
    let addr = addr.to_string();
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(ActionError::Dial { addr, source }),
        Err(_) => Err(ActionError::DialTimeout { addr }),
    }
}

pub async fn probe(target: &Target, t: &TCPSocketAction, timeout: Duration) -> Outcome {
    let addr = match target
        .host_for(t.host.as_deref())
        .and_then(|h| Ok(join_host_port(&h, target.port(&t.port)?)))
    {
        Ok(a) => a,
        Err(e) => return Outcome::Failure(e.to_string()),
    };
    match dial(&addr, timeout).await {
        Ok(_) => Outcome::Success,
        Err(e) => Outcome::Failure(e.to_string()),
    }
}
