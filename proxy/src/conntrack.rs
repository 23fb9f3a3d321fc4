//! Stale UDP conntrack entries: a UDP flow keeps going to the endpoint its first packet was
//! DNATed to, even after that endpoint left the Service, until its entry is deleted (as
//! kube-proxy does). Deleted with the `conntrack` tool for now; conntrack netlink is later work.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use tokio::process::Command;
use tracing::{debug, warn};

use crate::model::{Protocol, ServicePort};

/// A UDP flow target whose entries must go: traffic to `service` (any node address for a
/// NodePort: None) and `port`, DNATed to `endpoint`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaleFlow {
    pub service: Option<Ipv4Addr>,
    pub port: u16,
    pub endpoint: Ipv4Addr,
}

/// Per UDP service address (None: NodePort) and port, the endpoint addresses.
fn udp_targets(ports: &[ServicePort]) -> BTreeMap<(Option<Ipv4Addr>, u16), BTreeSet<Ipv4Addr>> {
    let mut out: BTreeMap<(Option<Ipv4Addr>, u16), BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for p in ports.iter().filter(|p| p.id.protocol == Protocol::Udp) {
        let eps: BTreeSet<Ipv4Addr> = p.endpoints.iter().map(|e| e.ip).collect();
        for ip in std::iter::once(&p.cluster_ip).chain(&p.external_ips) {
            out.entry((Some(*ip), p.port)).or_default().extend(&eps);
        }
        if let Some(np) = p.node_port {
            out.entry((None, np)).or_default().extend(&eps);
        }
    }
    out
}

/// The UDP flows that `old` DNATed and `new` no longer does.
pub fn stale_flows(old: &[ServicePort], new: &[ServicePort]) -> Vec<StaleFlow> {
    let new = udp_targets(new);
    let mut out = vec![];
    for ((service, port), eps) in udp_targets(old) {
        let kept = new.get(&(service, port));
        for endpoint in eps {
            if !kept.is_some_and(|k| k.contains(&endpoint)) {
                out.push(StaleFlow {
                    service,
                    port,
                    endpoint,
                });
            }
        }
    }
    out
}

/// Deletes the conntrack entries of these flows; failures are logged (the flow then lives
/// until its entry times out).
pub async fn clear(flows: &[StaleFlow]) {
    for f in flows {
        let mut cmd = Command::new("conntrack");
        cmd.args(["-D", "-p", "udp"]);
        if let Some(ip) = f.service {
            cmd.arg("--orig-dst").arg(ip.to_string());
        }
        let out = cmd
            .arg("--orig-port-dst")
            .arg(f.port.to_string())
            .arg("--dst-nat")
            .arg(f.endpoint.to_string())
            .output()
            .await;
        match out {
            // Exit 1 with "0 flow entries have been deleted" just means there were none.
            Ok(o)
                if o.status.success()
                    || String::from_utf8_lossy(&o.stderr).contains(" 0 flow entries") =>
            {
                debug!(?f, "cleared UDP conntrack entries");
            }
            Ok(o) => {
                warn!(?f, stderr = %String::from_utf8_lossy(&o.stderr).trim(), "conntrack -D failed")
            }
            Err(e) => warn!(?f, error = %e, "running conntrack"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, ServicePortName};

    fn udp(eps: &[&str]) -> ServicePort {
        ServicePort {
            id: ServicePortName {
                namespace: "ns".into(),
                name: "dns".into(),
                port: "".into(),
                protocol: Protocol::Udp,
            },
            cluster_ip: "10.96.0.10".parse().unwrap(),
            port: 53,
            node_port: None,
            external_ips: vec![],
            affinity_timeout: None,
            external_local: false,
            internal_local: false,
            endpoints: eps
                .iter()
                .map(|ip| Endpoint {
                    ip: ip.parse().unwrap(),
                    port: 5353,
                    local: false,
                })
                .collect(),
        }
    }

    #[test]
    fn removed_udp_endpoints_are_stale() {
        let flows = stale_flows(
            &[udp(&["10.244.0.2", "10.244.0.3"])],
            &[udp(&["10.244.0.3"])],
        );
        assert_eq!(
            flows,
            vec![StaleFlow {
                service: Some("10.96.0.10".parse().unwrap()),
                port: 53,
                endpoint: "10.244.0.2".parse().unwrap()
            }]
        );
        assert!(stale_flows(&[udp(&["10.244.0.2"])], &[udp(&["10.244.0.2"])]).is_empty());
        // A removed Service's flows go too, its NodePort's included; TCP ones are left to the
        // endpoint's resets.
        assert_eq!(stale_flows(&[udp(&["10.244.0.2"])], &[]).len(), 1);
        let mut np = udp(&["10.244.0.2"]);
        np.node_port = Some(30053);
        assert_eq!(
            stale_flows(&[np], &[])[0],
            StaleFlow {
                service: None,
                port: 30053,
                endpoint: "10.244.0.2".parse().unwrap()
            }
        );
        let mut tcp = udp(&["10.244.0.2"]);
        tcp.id.protocol = Protocol::Tcp;
        assert!(stale_flows(&[tcp], &[]).is_empty());
    }
}
