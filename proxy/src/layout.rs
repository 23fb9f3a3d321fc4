//! The proxy's nftables layout (kube-proxy's nftables mode, KEP-3866, in our own table):
//! verdict maps keyed by address, protocol and port dispatch to per-service-port chains, which
//! pick an endpoint chain at random, which DNATs.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use crate::model::{Endpoint, ServicePort, ServicePortName};
use crate::ruleset::{BaseChain, Chain, ChainType, Hook, Map, Ruleset, Set};

/// The packet mark bit that asks `nat-postrouting` to masquerade (as kube-proxy's).
pub const MASQUERADE_MARK: u32 = 0x4000;

/// Where and for which networks the layout is built.
#[derive(Debug, Clone)]
pub struct Layout {
    /// nft table name (family ip).
    pub table: String,
    /// Traffic to an address of this network that no Service owns is dropped.
    pub service_cidr: Ipv4Net,
    /// Pods: traffic from elsewhere to a ClusterIP is masqueraded.
    pub cluster_cidr: Ipv4Net,
    /// This node's addresses that serve NodePorts.
    pub nodeport_ips: Vec<Ipv4Addr>,
}

const SERVICE_IPS: &str = "service-ips";
const SERVICE_NODEPORTS: &str = "service-nodeports";
const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
const CLUSTER_IPS: &str = "cluster-ips";
const NODEPORT_IPS: &str = "nodeport-ips";
const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
const REJECT_CHAIN: &str = "reject-chain";

const ADDR_PROTO_PORT: &str = "ipv4_addr . inet_proto . inet_service";
const PROTO_PORT: &str = "inet_proto . inet_service";

/// The first 8 hex digits of SHA-256: keeps names distinct whatever the readable part holds.
fn hash(s: &str) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..4])
}

fn named(prefix: &str, id: &str) -> String {
    format!("{prefix}-{}-{id}", hash(id))
}

pub fn service_chain(id: &ServicePortName) -> String {
    named("service", &id.to_string())
}

fn local_chain(id: &ServicePortName) -> String {
    named("local", &id.to_string())
}

fn external_chain(id: &ServicePortName) -> String {
    named("external", &id.to_string())
}

fn endpoint_id(id: &ServicePortName, ep: &Endpoint) -> String {
    format!("{id}__{}/{}", ep.ip, ep.port)
}

pub fn endpoint_chain(id: &ServicePortName, ep: &Endpoint) -> String {
    named("endpoint", &endpoint_id(id, ep))
}

fn affinity_set(id: &ServicePortName, ep: &Endpoint) -> String {
    named("affinity", &endpoint_id(id, ep))
}

fn base(kind: ChainType, hook: Hook, priority: &'static str, rules: &[&str]) -> Chain {
    Chain {
        base: Some(BaseChain {
            kind,
            hook,
            priority,
        }),
        rules: rules.iter().map(|r| r.to_string()).collect(),
    }
}

fn regular(rules: Vec<String>) -> Chain {
    Chain { base: None, rules }
}

/// The whole desired table for these Service ports.
pub fn build(layout: &Layout, ports: &[ServicePort]) -> Ruleset {
    let mut r = Ruleset::new(layout.table.clone());
    let c = &mut r.chains;
    use ChainType::{Filter, Nat};
    let new_check = |chain: &str| format!("ct state new jump {chain}");
    c.insert(
        "filter-input".into(),
        base(
            Filter,
            Hook::Input,
            "-110",
            &[
                &new_check("nodeport-endpoints-check"),
                &new_check("service-endpoints-check"),
            ],
        ),
    );
    c.insert(
        "filter-forward".into(),
        base(
            Filter,
            Hook::Forward,
            "-110",
            &[
                &new_check("service-endpoints-check"),
                &new_check("cluster-ips-check"),
            ],
        ),
    );
    c.insert(
        "filter-output".into(),
        base(
            Filter,
            Hook::Output,
            "-110",
            &[&new_check("service-endpoints-check")],
        ),
    );
    // After DNAT: what still goes to the service CIDR matched no Service port.
    c.insert(
        "filter-output-post-dnat".into(),
        base(
            Filter,
            Hook::Output,
            "-90",
            &[&new_check("cluster-ips-check")],
        ),
    );
    c.insert(
        "nat-prerouting".into(),
        base(Nat, Hook::Prerouting, "dstnat", &["jump services"]),
    );
    c.insert(
        "nat-output".into(),
        // nft 1.0.6 names `dstnat` for prerouting only; -100 is its value.
        base(Nat, Hook::Output, "-100", &["jump services"]),
    );
    c.insert(
        "nat-postrouting".into(),
        base(Nat, Hook::Postrouting, "srcnat", &["jump masquerading"]),
    );
    c.insert(
        "services".into(),
        regular(vec![
            format!("ip daddr . meta l4proto . th dport vmap @{SERVICE_IPS}"),
            format!("ip daddr @{NODEPORT_IPS} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}"),
        ]),
    );
    c.insert(
        "service-endpoints-check".into(),
        regular(vec![format!(
            "ip daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}"
        )]),
    );
    c.insert(
        "nodeport-endpoints-check".into(),
        regular(vec![format!(
            "ip daddr @{NODEPORT_IPS} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"
        )]),
    );
    c.insert(
        "cluster-ips-check".into(),
        regular(vec![
            format!("ip daddr @{CLUSTER_IPS} goto {REJECT_CHAIN}"),
            format!("ip daddr {} drop", layout.service_cidr.trunc()),
        ]),
    );
    c.insert(
        MARK_FOR_MASQUERADE.into(),
        regular(vec![format!(
            "meta mark set meta mark | {MASQUERADE_MARK:#x}"
        )]),
    );
    c.insert(
        "masquerading".into(),
        regular(vec![
            format!("meta mark & {MASQUERADE_MARK:#x} == 0 return"),
            format!("meta mark set meta mark ^ {MASQUERADE_MARK:#x}"),
            "masquerade fully-random".into(),
        ]),
    );
    c.insert(
        REJECT_CHAIN.into(),
        regular(vec![
            "meta l4proto tcp reject with tcp reset".into(),
            "reject".into(),
        ]),
    );
    let mut cluster_ips = Set::new("ipv4_addr");
    let mut nodeport_ips = Set::new("ipv4_addr");
    nodeport_ips
        .elements
        .extend(layout.nodeport_ips.iter().map(Ipv4Addr::to_string));
    let mut service_ips = Map::new(ADDR_PROTO_PORT);
    let mut service_nodeports = Map::new(PROTO_PORT);
    let mut no_endpoint_services = Map::new(ADDR_PROTO_PORT);
    let mut no_endpoint_nodeports = Map::new(PROTO_PORT);

    for sp in ports {
        cluster_ips.elements.insert(sp.cluster_ip.to_string());
        let proto = sp.id.protocol.nft();
        let cluster_key = format!("{} . {proto} . {}", sp.cluster_ip, sp.port);
        let external_keys: Vec<String> = sp
            .external_ips
            .iter()
            .map(|ip| format!("{ip} . {proto} . {}", sp.port))
            .collect();
        let nodeport_key = sp.node_port.map(|np| format!("{proto} . {np}"));
        let reject = format!("goto {REJECT_CHAIN}");
        if sp.endpoints.is_empty() {
            no_endpoint_services
                .elements
                .insert(cluster_key, reject.clone());
            for k in external_keys {
                no_endpoint_services.elements.insert(k, reject.clone());
            }
            if let Some(k) = nodeport_key {
                no_endpoint_nodeports.elements.insert(k, reject);
            }
            continue;
        }
        let local: Vec<&Endpoint> = sp.endpoints.iter().filter(|e| e.local).collect();
        let all: Vec<&Endpoint> = sp.endpoints.iter().collect();
        let masq_outside = format!(
            "ip daddr {} {proto} dport {} ip saddr != {} jump {MARK_FOR_MASQUERADE}",
            sp.cluster_ip,
            sp.port,
            layout.cluster_cidr.trunc()
        );
        let svc_chain = service_chain(&sp.id);
        let loc_chain = local_chain(&sp.id);
        let mut rules = vec![masq_outside.clone()];
        balance(&mut rules, sp, &all);
        r.chains.insert(svc_chain.clone(), regular(rules));
        let needs_local = sp.internal_local || sp.external_local;
        if needs_local && !local.is_empty() {
            let mut rules = vec![masq_outside];
            balance(&mut rules, sp, &local);
            r.chains.insert(loc_chain.clone(), regular(rules));
        }
        for ep in &all {
            let mut rules = vec![format!("ip saddr {} jump {MARK_FOR_MASQUERADE}", ep.ip)];
            if let Some(timeout) = sp.affinity_timeout {
                let set = affinity_set(&sp.id, ep);
                rules.push(format!("update @{set} {{ ip saddr }}"));
                let mut s = Set::new("ipv4_addr");
                s.flags = Some("dynamic,timeout");
                s.timeout = Some(timeout);
                r.sets.insert(set, s);
            }
            rules.push(format!(
                "meta l4proto {proto} dnat to {}:{}",
                ep.ip, ep.port
            ));
            r.chains.insert(endpoint_chain(&sp.id, ep), regular(rules));
        }
        // ClusterIP: internalTrafficPolicy Local without a local endpoint drops.
        if !sp.internal_local {
            service_ips
                .elements
                .insert(cluster_key, format!("goto {svc_chain}"));
        } else if !local.is_empty() {
            service_ips
                .elements
                .insert(cluster_key, format!("goto {loc_chain}"));
        } else {
            no_endpoint_services
                .elements
                .insert(cluster_key, "drop".into());
        }
        if external_keys.is_empty() && nodeport_key.is_none() {
            continue;
        }
        if sp.external_local && local.is_empty() {
            for k in external_keys {
                no_endpoint_services.elements.insert(k, "drop".into());
            }
            if let Some(k) = nodeport_key {
                no_endpoint_nodeports.elements.insert(k, "drop".into());
            }
            continue;
        }
        let ext_chain = external_chain(&sp.id);
        let rules = if sp.external_local {
            // Pods and the node itself still reach every endpoint; the rest keep their source.
            vec![
                format!("ip saddr {} goto {svc_chain}", layout.cluster_cidr.trunc()),
                format!("fib saddr type local jump {MARK_FOR_MASQUERADE}"),
                format!("fib saddr type local goto {svc_chain}"),
                format!("goto {loc_chain}"),
            ]
        } else {
            vec![
                format!("jump {MARK_FOR_MASQUERADE}"),
                format!("goto {svc_chain}"),
            ]
        };
        r.chains.insert(ext_chain.clone(), regular(rules));
        for k in external_keys {
            service_ips.elements.insert(k, format!("goto {ext_chain}"));
        }
        if let Some(k) = nodeport_key {
            service_nodeports
                .elements
                .insert(k, format!("goto {ext_chain}"));
        }
    }
    r.sets.insert(CLUSTER_IPS.into(), cluster_ips);
    r.sets.insert(NODEPORT_IPS.into(), nodeport_ips);
    r.maps.insert(SERVICE_IPS.into(), service_ips);
    r.maps.insert(SERVICE_NODEPORTS.into(), service_nodeports);
    r.maps
        .insert(NO_ENDPOINT_SERVICES.into(), no_endpoint_services);
    r.maps
        .insert(NO_ENDPOINT_NODEPORTS.into(), no_endpoint_nodeports);
    r
}

/// Rules that send a new connection to one of `eps` with equal chances: the k-th rule matches
/// one time in (N-k), so each endpoint gets 1/N. Plain rules load linearly where one anonymous
/// vmap per service loads quadratically.
fn balance(rules: &mut Vec<String>, sp: &ServicePort, eps: &[&Endpoint]) {
    if sp.affinity_timeout.is_some() {
        for ep in eps {
            rules.push(format!(
                "ip saddr @{} goto {}",
                affinity_set(&sp.id, ep),
                endpoint_chain(&sp.id, ep)
            ));
        }
    }
    let n = eps.len();
    for (k, ep) in eps.iter().enumerate() {
        let chain = endpoint_chain(&sp.id, ep);
        if n - k > 1 {
            rules.push(format!("numgen random mod {} == 0 goto {chain}", n - k));
        } else {
            rules.push(format!("goto {chain}"));
        }
    }
}

#[cfg(test)]
mod tests;
