//! The proxy's nftables layout (kube-proxy's nftables mode, KEP-3866, in our own table):
//! verdict maps keyed by address, protocol and port dispatch to per-service-port chains, which
//! DNAT to the endpoint a random number picks from the service's endpoint map (a data map of
//! ranges). Unlike upstream's per-endpoint chains, a change of endpoints only replaces map
//! elements: the kernel re-validates the whole chain graph for every rule or verdict element
//! a transaction adds, but not for data elements. A pod reaching itself through its Service
//! is masqueraded by one rule that looks up `saddr . daddr` in the set of endpoints.
//! Services with session affinity keep upstream's per-endpoint chains (they record clients).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use crate::model::{Endpoint, Protocol, ServicePort, ServicePortName};
use crate::ruleset::{
    Action, Addr, BaseChain, Chain, ChainType, EndpointMap, Hook, Key, KeyType, Map, Match, Rule,
    Ruleset, Set, Verdict,
};

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
pub const HAIRPIN_ENDPOINTS: &str = "hairpin-endpoints";

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

fn endpoints_map(id: &ServicePortName) -> String {
    named("endpoints", &id.to_string())
}

fn local_endpoints_map(id: &ServicePortName) -> String {
    named("local-endpoints", &id.to_string())
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

fn base(kind: ChainType, hook: Hook, priority: &'static str, rules: Vec<Rule>) -> Chain {
    Chain {
        base: Some(BaseChain {
            kind,
            hook,
            priority,
        }),
        rules,
    }
}

fn regular(rules: Vec<Rule>) -> Chain {
    Chain { base: None, rules }
}

fn jump(matches: Vec<Match>, chain: &str) -> Rule {
    Rule::verdict(matches, Verdict::Jump(chain.into()))
}

fn goto(matches: Vec<Match>, chain: &str) -> Rule {
    Rule::verdict(matches, Verdict::Goto(chain.into()))
}

fn addr(field: Addr, net: Ipv4Net) -> Match {
    Match::Addr {
        field,
        negate: false,
        net,
    }
}

fn host(field: Addr, ip: Ipv4Addr) -> Match {
    addr(field, Ipv4Net::from(ip))
}

fn addr_in(field: Addr, set: &str) -> Match {
    Match::AddrIn {
        field,
        set: set.into(),
    }
}

/// The whole desired table for these Service ports.
pub fn build(layout: &Layout, ports: &[ServicePort]) -> Ruleset {
    let mut r = build_fixed(layout);
    r.merge(build_services(layout, ports));
    r.sets
        .get_mut(HAIRPIN_ENDPOINTS)
        .expect("the fixed table has the hairpin set")
        .elements
        .extend(endpoint_ips(ports).into_iter().map(hairpin_key));
    r
}

/// The addresses of these ports' endpoints: what the hairpin set holds for them.
pub fn endpoint_ips(ports: &[ServicePort]) -> BTreeSet<Ipv4Addr> {
    ports
        .iter()
        .flat_map(|p| p.endpoints.iter().map(|e| e.ip))
        .collect()
}

/// The hairpin set's element for an endpoint: traffic from it, DNATed back to it.
pub fn hairpin_key(ip: Ipv4Addr) -> Key {
    Key::AddrAddr(ip, ip)
}

/// The table without any Service: base chains, fixed rules, the node's NodePort addresses and
/// the empty shared sets and maps.
pub fn build_fixed(layout: &Layout) -> Ruleset {
    let mut r = Ruleset::new(layout.table.clone());
    let c = &mut r.chains;
    use ChainType::{Filter, Nat};
    let new_check = |chain: &str| jump(vec![Match::CtStateNew], chain);
    c.insert(
        "filter-input".into(),
        base(
            Filter,
            Hook::Input,
            "-110",
            vec![
                new_check("nodeport-endpoints-check"),
                new_check("service-endpoints-check"),
            ],
        ),
    );
    c.insert(
        "filter-forward".into(),
        base(
            Filter,
            Hook::Forward,
            "-110",
            vec![
                new_check("service-endpoints-check"),
                new_check("cluster-ips-check"),
            ],
        ),
    );
    c.insert(
        "filter-output".into(),
        base(
            Filter,
            Hook::Output,
            "-110",
            vec![new_check("service-endpoints-check")],
        ),
    );
    // After DNAT: what still goes to the service CIDR matched no Service port.
    c.insert(
        "filter-output-post-dnat".into(),
        base(
            Filter,
            Hook::Output,
            "-90",
            vec![new_check("cluster-ips-check")],
        ),
    );
    c.insert(
        "nat-prerouting".into(),
        base(
            Nat,
            Hook::Prerouting,
            "dstnat",
            vec![jump(vec![], "services")],
        ),
    );
    c.insert(
        "nat-output".into(),
        // nft 1.0.6 names `dstnat` for prerouting only; -100 is its value.
        base(Nat, Hook::Output, "-100", vec![jump(vec![], "services")]),
    );
    c.insert(
        "nat-postrouting".into(),
        base(
            Nat,
            Hook::Postrouting,
            "srcnat",
            vec![jump(vec![], "masquerading")],
        ),
    );
    c.insert(
        "services".into(),
        regular(vec![
            Rule::new(
                vec![],
                Action::Vmap(KeyType::AddrProtoPort, SERVICE_IPS.into()),
            ),
            Rule::new(
                vec![addr_in(Addr::Daddr, NODEPORT_IPS)],
                Action::Vmap(KeyType::ProtoPort, SERVICE_NODEPORTS.into()),
            ),
        ]),
    );
    c.insert(
        "service-endpoints-check".into(),
        regular(vec![Rule::new(
            vec![],
            Action::Vmap(KeyType::AddrProtoPort, NO_ENDPOINT_SERVICES.into()),
        )]),
    );
    c.insert(
        "nodeport-endpoints-check".into(),
        regular(vec![Rule::new(
            vec![addr_in(Addr::Daddr, NODEPORT_IPS)],
            Action::Vmap(KeyType::ProtoPort, NO_ENDPOINT_NODEPORTS.into()),
        )]),
    );
    c.insert(
        "cluster-ips-check".into(),
        regular(vec![
            goto(vec![addr_in(Addr::Daddr, CLUSTER_IPS)], REJECT_CHAIN),
            Rule::verdict(
                vec![addr(Addr::Daddr, layout.service_cidr.trunc())],
                Verdict::Drop,
            ),
        ]),
    );
    c.insert(
        MARK_FOR_MASQUERADE.into(),
        regular(vec![Rule::new(vec![], Action::MarkOr(MASQUERADE_MARK))]),
    );
    c.insert(
        "masquerading".into(),
        regular(vec![
            jump(
                vec![
                    Match::CtStatusDnat,
                    Match::AddrPairIn(HAIRPIN_ENDPOINTS.into()),
                ],
                MARK_FOR_MASQUERADE,
            ),
            Rule::verdict(vec![Match::MarkClear(MASQUERADE_MARK)], Verdict::Return),
            Rule::new(vec![], Action::MarkXor(MASQUERADE_MARK)),
            Rule::new(vec![], Action::MasqueradeFullyRandom),
        ]),
    );
    c.insert(
        REJECT_CHAIN.into(),
        regular(vec![
            Rule::new(vec![Match::L4Proto(Protocol::Tcp)], Action::RejectTcpReset),
            Rule::new(vec![], Action::Reject),
        ]),
    );
    let mut nodeport_ips = Set::new(KeyType::Addr);
    nodeport_ips
        .elements
        .extend(layout.nodeport_ips.iter().map(|ip| Key::Addr(*ip)));
    r.sets.insert(NODEPORT_IPS.into(), nodeport_ips);
    r.sets
        .insert(HAIRPIN_ENDPOINTS.into(), Set::new(KeyType::AddrAddr));
    r.merge(shared(&layout.table));
    r
}

/// The sets and maps every Service adds elements to, empty.
fn shared(table: &str) -> Ruleset {
    let mut r = Ruleset::new(table);
    r.sets.insert(CLUSTER_IPS.into(), Set::new(KeyType::Addr));
    for (name, key) in [
        (SERVICE_IPS, KeyType::AddrProtoPort),
        (SERVICE_NODEPORTS, KeyType::ProtoPort),
        (NO_ENDPOINT_SERVICES, KeyType::AddrProtoPort),
        (NO_ENDPOINT_NODEPORTS, KeyType::ProtoPort),
    ] {
        r.maps.insert(name.into(), Map::new(key));
    }
    r
}

/// The part of the table these Service ports own: their chains and affinity sets, and their
/// elements of the shared sets and maps (which are present, maybe empty).
pub fn build_services(layout: &Layout, ports: &[ServicePort]) -> Ruleset {
    let mut r = Ruleset::new(layout.table.clone());
    let mut cluster_ips = Set::new(KeyType::Addr);
    let mut service_ips = Map::new(KeyType::AddrProtoPort);
    let mut service_nodeports = Map::new(KeyType::ProtoPort);
    let mut no_endpoint_services = Map::new(KeyType::AddrProtoPort);
    let mut no_endpoint_nodeports = Map::new(KeyType::ProtoPort);

    for sp in ports {
        cluster_ips.elements.insert(Key::Addr(sp.cluster_ip));
        let proto = sp.id.protocol;
        let cluster_key = Key::AddrProtoPort(sp.cluster_ip, proto, sp.port);
        let external_keys: Vec<Key> = sp
            .external_ips
            .iter()
            .map(|ip| Key::AddrProtoPort(*ip, proto, sp.port))
            .collect();
        let nodeport_key = sp.node_port.map(|np| Key::ProtoPort(proto, np));
        let reject = Verdict::Goto(REJECT_CHAIN.into());
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
        let masq_outside = jump(
            vec![
                host(Addr::Daddr, sp.cluster_ip),
                Match::Dport(proto, sp.port),
                Match::Addr {
                    field: Addr::Saddr,
                    negate: true,
                    net: layout.cluster_cidr.trunc(),
                },
            ],
            MARK_FOR_MASQUERADE,
        );
        let svc_chain = service_chain(&sp.id);
        let loc_chain = local_chain(&sp.id);
        let needs_local = sp.internal_local || sp.external_local;
        let pick = |chain: &str, map: String, eps: &[&Endpoint], r: &mut Ruleset| {
            let mut rules = vec![masq_outside.clone()];
            if sp.affinity_timeout.is_some() {
                balance(&mut rules, sp, eps);
            } else {
                rules.push(Rule::new(
                    vec![Match::L4Proto(proto)],
                    Action::DnatRandom(map.clone()),
                ));
                let targets = eps.iter().map(|e| (e.ip, e.port)).collect();
                r.endpoint_maps.insert(
                    map,
                    EndpointMap {
                        protocol: proto,
                        targets,
                    },
                );
            }
            r.chains.insert(chain.to_string(), regular(rules));
        };
        pick(&svc_chain, endpoints_map(&sp.id), &all, &mut r);
        if needs_local && !local.is_empty() {
            pick(&loc_chain, local_endpoints_map(&sp.id), &local, &mut r);
        }
        if let Some(timeout) = sp.affinity_timeout {
            for ep in &all {
                let set = affinity_set(&sp.id, ep);
                let rules = vec![
                    Rule::new(vec![], Action::UpdateSaddr(set.clone())),
                    Rule::new(vec![Match::L4Proto(proto)], Action::Dnat(ep.ip, ep.port)),
                ];
                let mut s = Set::new(KeyType::Addr);
                s.timeout = Some(timeout);
                r.sets.insert(set, s);
                r.chains.insert(endpoint_chain(&sp.id, ep), regular(rules));
            }
        }
        // ClusterIP: internalTrafficPolicy Local without a local endpoint drops.
        if !sp.internal_local {
            service_ips
                .elements
                .insert(cluster_key, Verdict::Goto(svc_chain.clone()));
        } else if !local.is_empty() {
            service_ips
                .elements
                .insert(cluster_key, Verdict::Goto(loc_chain.clone()));
        } else {
            no_endpoint_services
                .elements
                .insert(cluster_key, Verdict::Drop);
        }
        if external_keys.is_empty() && nodeport_key.is_none() {
            continue;
        }
        if sp.external_local && local.is_empty() {
            for k in external_keys {
                no_endpoint_services.elements.insert(k, Verdict::Drop);
            }
            if let Some(k) = nodeport_key {
                no_endpoint_nodeports.elements.insert(k, Verdict::Drop);
            }
            continue;
        }
        let ext_chain = external_chain(&sp.id);
        let rules = if sp.external_local {
            // Pods and the node itself still reach every endpoint; the rest keep their source.
            vec![
                goto(
                    vec![addr(Addr::Saddr, layout.cluster_cidr.trunc())],
                    &svc_chain,
                ),
                jump(vec![Match::FibSaddrLocal], MARK_FOR_MASQUERADE),
                goto(vec![Match::FibSaddrLocal], &svc_chain),
                goto(vec![], &loc_chain),
            ]
        } else {
            vec![jump(vec![], MARK_FOR_MASQUERADE), goto(vec![], &svc_chain)]
        };
        r.chains.insert(ext_chain.clone(), regular(rules));
        for k in external_keys {
            service_ips
                .elements
                .insert(k, Verdict::Goto(ext_chain.clone()));
        }
        if let Some(k) = nodeport_key {
            service_nodeports
                .elements
                .insert(k, Verdict::Goto(ext_chain.clone()));
        }
    }
    r.sets.insert(CLUSTER_IPS.into(), cluster_ips);
    r.maps.insert(SERVICE_IPS.into(), service_ips);
    r.maps.insert(SERVICE_NODEPORTS.into(), service_nodeports);
    r.maps
        .insert(NO_ENDPOINT_SERVICES.into(), no_endpoint_services);
    r.maps
        .insert(NO_ENDPOINT_NODEPORTS.into(), no_endpoint_nodeports);
    r
}

/// With session affinity: rules that send a client back to the endpoint it had, else a new
/// connection to one of `eps` with equal chances: the k-th rule matches one time in (N-k), so
/// each endpoint gets 1/N.
fn balance(rules: &mut Vec<Rule>, sp: &ServicePort, eps: &[&Endpoint]) {
    for ep in eps {
        rules.push(goto(
            vec![addr_in(Addr::Saddr, &affinity_set(&sp.id, ep))],
            &endpoint_chain(&sp.id, ep),
        ));
    }
    let n = eps.len();
    for (k, ep) in eps.iter().enumerate() {
        let chain = endpoint_chain(&sp.id, ep);
        if n - k > 1 {
            rules.push(goto(vec![Match::NumgenZero((n - k) as u32)], &chain));
        } else {
            rules.push(goto(vec![], &chain));
        }
    }
}

#[cfg(test)]
mod tests;
