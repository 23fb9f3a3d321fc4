//! What the proxy programs, computed from Services and EndpointSlices: one `ServicePort` per
//! port of every proxied Service, with the endpoints it load-balances to.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The name nft uses (`inet_proto`, `meta l4proto`).
    pub fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    fn parse(s: Option<&str>) -> Option<Protocol> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// Identifies one port of one Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The Service port's name; empty for the single unnamed port.
    pub port: String,
    pub protocol: Protocol,
}

impl std::fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.namespace,
            self.name,
            self.protocol.nft(),
            self.port
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// On this node (`nodeName` equals ours).
    pub local: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub id: ServicePortName,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// spec.externalIPs and status.loadBalancer.ingress[].ip (IPv4 only).
    pub external_ips: Vec<Ipv4Addr>,
    /// sessionAffinity ClientIP: its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// externalTrafficPolicy Local (NodePort, external IPs only to local endpoints).
    pub external_local: bool,
    /// internalTrafficPolicy Local (ClusterIP only to local endpoints).
    pub internal_local: bool,
    /// Ready endpoints, or when none is ready the serving and terminating ones; sorted.
    pub endpoints: Vec<Endpoint>,
}

/// The default sessionAffinityConfig.clientIP.timeoutSeconds (3 hours).
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

/// All proxied Service ports, sorted by id. Headless Services, ExternalName Services and
/// non-IPv4 cluster IPs are left out; `node` is this node's name (for Local policies).
pub fn service_ports<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &str,
) -> Vec<ServicePort> {
    // (namespace, service) -> slices
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if s.address_type != "IPv4" {
            continue;
        }
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        by_service.entry((ns, svc.clone())).or_default().push(s);
    }
    let mut out = Vec::new();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let Some(cluster_ip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            continue; // headless ("None"), unallocated or IPv6
        };
        let namespace = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let mut external_ips: Vec<Ipv4Addr> = spec
            .external_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        if let Some(ingress) = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
        {
            external_ips.extend(
                ingress
                    .iter()
                    .filter_map(|i| i.ip.as_deref()?.parse::<Ipv4Addr>().ok()),
            );
        }
        external_ips.sort();
        external_ips.dedup();
        let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .map_or(DEFAULT_AFFINITY_TIMEOUT, |t| t.max(1) as u32)
        });
        let slices = by_service
            .get(&(namespace.clone(), name.clone()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for p in spec.ports.iter().flatten() {
            let Some(protocol) = Protocol::parse(p.protocol.as_deref()) else {
                continue;
            };
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            let port_name = p.name.clone().unwrap_or_default();
            out.push(ServicePort {
                id: ServicePortName {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    port: port_name.clone(),
                    protocol,
                },
                cluster_ip,
                port,
                node_port: p.node_port.and_then(|n| u16::try_from(n).ok()),
                external_ips: external_ips.clone(),
                affinity_timeout,
                external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
                internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
                endpoints: endpoints(slices, &port_name, protocol, node),
            });
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// The endpoints of one Service port across its slices: the slice port of the same name and
/// protocol gives the target port number (named target ports are resolved there).
fn endpoints(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Protocol,
    node: &str,
) -> Vec<Endpoint> {
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for s in slices {
        let Some(port) = s.ports.iter().flatten().find_map(|p| {
            let same = p.name.as_deref().unwrap_or("") == port_name
                && Protocol::parse(p.protocol.as_deref()) == Some(protocol);
            same.then_some(p.port?)
        }) else {
            continue;
        };
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        for e in &s.endpoints {
            let Some(ip) = e.addresses.first().and_then(|a| a.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            let c = e.conditions.as_ref();
            // Unset conditions: ready and serving mean true, terminating means false.
            let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(is_ready);
            let is_terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let ep = Endpoint {
                ip,
                port,
                local: e.node_name.as_deref() == Some(node),
            };
            if is_ready {
                ready.insert(ep);
            } else if serving && is_terminating {
                terminating.insert(ep);
            }
        }
    }
    if ready.is_empty() {
        terminating.into_iter().collect()
    } else {
        ready.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }
    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    fn web() -> Service {
        svc(json!({"metadata": {"namespace": "ns", "name": "web"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080},
                          {"name": "dns", "port": 53, "protocol": "UDP"}]}}))
    }

    #[test]
    fn ports_take_target_ports_and_ready_endpoints_from_their_slices() {
        let s = slice(json!({"metadata": {"namespace": "ns", "name": "web-1",
                "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.244.0.2"], "conditions": {"ready": true}, "nodeName": "n1"},
                {"addresses": ["10.244.0.3"], "conditions": {"ready": false}},
                {"addresses": ["10.244.0.4"]}]}));
        let ports = service_ports([&web()], [&s], "n1");
        assert_eq!(ports.len(), 2);
        let http = &ports[1];
        assert_eq!(http.id.to_string(), "ns/web/tcp/http");
        assert_eq!(http.node_port, Some(30080));
        assert_eq!(
            http.endpoints,
            vec![
                Endpoint {
                    ip: "10.244.0.2".parse().unwrap(),
                    port: 8080,
                    local: true
                },
                Endpoint {
                    ip: "10.244.0.4".parse().unwrap(),
                    port: 8080,
                    local: false
                }
            ]
        );
        assert_eq!(ports[0].id.to_string(), "ns/web/udp/dns");
        assert_eq!(ports[0].endpoints[0].port, 5353);
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let mk = |ready: bool| {
            slice(json!({"metadata": {"namespace": "ns", "name": "web-1",
                    "labels": {SERVICE_NAME_LABEL: "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [
                    {"addresses": ["10.244.0.2"], "conditions": {"ready": ready}},
                    {"addresses": ["10.244.0.3"],
                     "conditions": {"ready": false, "serving": true, "terminating": true}},
                    {"addresses": ["10.244.0.5"],
                     "conditions": {"ready": false, "serving": false, "terminating": true}}]}))
        };
        let ips = |s: &EndpointSlice| -> Vec<String> {
            service_ports([&web()], [s], "n1")[1]
                .endpoints
                .iter()
                .map(|e| e.ip.to_string())
                .collect()
        };
        assert_eq!(ips(&mk(true)), vec!["10.244.0.2"]);
        assert_eq!(ips(&mk(false)), vec!["10.244.0.3"]);
    }

    #[test]
    fn headless_external_name_and_foreign_slices_are_ignored() {
        let headless = svc(json!({"metadata": {"namespace": "ns", "name": "h"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}));
        let ext = svc(json!({"metadata": {"namespace": "ns", "name": "e"},
            "spec": {"type": "ExternalName", "externalName": "example.org"}}));
        assert!(service_ports([&headless, &ext], [], "n1").is_empty());
        // A slice of another namespace's Service of the same name gives no endpoints.
        let other = slice(json!({"metadata": {"namespace": "other", "name": "web-1",
                "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.244.0.2"]}]}));
        let ports = service_ports([&web()], [&other], "n1");
        assert!(ports.iter().all(|p| p.endpoints.is_empty()));
    }

    #[test]
    fn external_ips_affinity_and_policies_are_read() {
        let s = svc(json!({"metadata": {"namespace": "ns", "name": "lb"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.11",
                "externalIPs": ["192.0.2.50", "2001:db8::1"],
                "sessionAffinity": "ClientIP",
                "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
                "ports": [{"port": 443, "nodePort": 31443}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.60"}]}}}));
        let p = &service_ports([&s], [], "n1")[0];
        assert_eq!(p.id.to_string(), "ns/lb/tcp/");
        assert_eq!(
            p.external_ips,
            vec![
                "192.0.2.50".parse::<Ipv4Addr>().unwrap(),
                "192.0.2.60".parse().unwrap()
            ]
        );
        assert_eq!(p.affinity_timeout, Some(10800));
        assert!(p.external_local && p.internal_local);
    }
}
