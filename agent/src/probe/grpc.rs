//! grpc actions: `grpc.health.v1.Health/Check` over plaintext HTTP/2, as kubelet's gRPC prober.

use super::action::join_host_port;
use super::{Outcome, Target};
use k8s_openapi::api::core::v1::GRPCAction;
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Go's `time.Duration` wording of whole seconds.
fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// Checks `service` at `addr` (`host:port`); SERVING is success.
pub async fn check(addr: &str, service: &str, timeout: Duration) -> Outcome {
    let ep = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(ep) => ep.connect_timeout(timeout).timeout(timeout),
        Err(e) => return Outcome::Failure(format!("error: {e}")),
    };
    let agent = format!("{}/{}", super::http::PROBE, super::http::version());
    let ep = match ep.user_agent(agent) {
        Ok(ep) => ep,
        Err(e) => return Outcome::Failure(format!("error: {e}")),
    };
    let connected = tokio::time::timeout(timeout, ep.connect()).await;
    let channel = match connected {
        Ok(Ok(ch)) => ch,
        Ok(Err(e)) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            return Outcome::Failure(format!(
                "timeout: failed to connect service {addr:?} within {}: {msg}",
                secs(timeout)
            ));
        }
        Err(_) => {
            return Outcome::Failure(format!(
                "timeout: failed to connect service {addr:?} within {}: context deadline exceeded",
                secs(timeout)
            ))
        }
    };
    let req = HealthCheckRequest {
        service: service.to_string(),
    };
    let timed_out = || {
        Outcome::Failure(format!(
            "timeout: health rpc did not complete within {}",
            secs(timeout)
        ))
    };
    match tokio::time::timeout(timeout, HealthClient::new(channel).check(req)).await {
        Err(_) => timed_out(),
        Ok(Err(s)) if s.code() == tonic::Code::DeadlineExceeded => timed_out(),
        Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => Outcome::Failure(format!(
            "error: this server does not implement the grpc health protocol (grpc.health.v1.Health): {}",
            s.message()
        )),
        Ok(Err(s)) => Outcome::Failure(format!(
            "error: health rpc probe failed: rpc error: code = {:?} desc = {}",
            s.code(),
            s.message()
        )),
        Ok(Ok(resp)) => {
            let status = resp.into_inner().status;
            if status == ServingStatus::Serving as i32 {
                Outcome::Success
            } else {
                let name = ServingStatus::try_from(status)
                    .map(|s| s.as_str_name())
                    .unwrap_or("UNKNOWN");
                Outcome::Failure(format!("service unhealthy (responded with {name:?})"))
            }
        }
    }
}

pub async fn probe(target: &Target, g: &GRPCAction, timeout: Duration) -> Outcome {
    let host = match target.host_for(None) {
        Ok(h) => h,
        Err(e) => return Outcome::Failure(e.to_string()),
    };
    let Ok(port) = u16::try_from(g.port) else {
        return Outcome::Failure(format!("invalid port number: {}", g.port));
    };
    let addr = join_host_port(&host, port);
    check(&addr, g.service.as_deref().unwrap_or(""), timeout).await
}
