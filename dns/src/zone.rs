//! Answers for the cluster domain and for reverse names, as CoreDNS's kubernetes plugin gives
//! them (schema: kubernetes/dns docs/specification.md):
//! - `<svc>.<ns>.svc.<zone>`: A/AAAA to the ClusterIPs, to the ready endpoints of a headless
//!   Service, CNAME for an ExternalName; SRV for its ports;
//! - `<host>.<svc>.<ns>.svc.<zone>`: a ready endpoint by hostname (or dashed IP);
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>`: SRV for a named port;
//! - `<a-b-c-d>.<ns>.pod.<zone>`: a pod of that namespace with that IP;
//! - PTR for ClusterIPs and endpoints.
//!
//! A name that does not exist is NXDOMAIN; one that exists without records of the asked type
//! is NOERROR with no answer; both carry the zone's SOA.

use std::collections::BTreeSet;
use std::net::IpAddr;

use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;

use crate::cluster::Cluster;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The cluster zone: its name and the TTL of its records.
#[derive(Debug, Clone)]
pub struct Zone {
    pub origin: Name,
    pub ttl: u32,
}

/// What to send for a name.
#[derive(Debug, Default)]
pub struct Answer {
    pub code: ResponseCode,
    pub answers: Vec<Record>,
    pub additionals: Vec<Record>,
    /// The zone's SOA, for the authority section of a negative answer.
    pub soa: Option<Record>,
}

/// How a query is answered.
#[derive(Debug)]
pub enum Outcome {
    /// From the cluster, authoritatively.
    Local(Answer),
    /// A CNAME whose target lies outside the zone: the target's records are to be looked up
    /// and appended.
    Alias(Answer, Name),
    /// Not the zone's: goes upstream.
    Forward,
}

impl Zone {
    pub fn new(origin: Name, ttl: u32) -> Zone {
        Zone { origin, ttl }
    }

    fn name(&self, rel: &str) -> Name {
        let s = if rel.is_empty() {
            self.origin.to_ascii()
        } else {
            format!("{rel}.{}", self.origin.to_ascii())
        };
        Name::from_ascii(&s).unwrap_or_else(|_| self.origin.clone())
    }

    fn record(&self, name: &Name, data: RData) -> Record {
        Record::from_rdata(name.clone(), self.ttl, data)
    }

    pub fn soa(&self) -> Record {
        // CoreDNS's SOA for the cluster zone; the minimum is the negative-caching TTL.
        let soa = SOA::new(
            self.name("ns.dns"),
            self.name("hostmaster"),
            12345,
            7200,
            1800,
            86400,
            self.ttl,
        );
        self.record(&self.origin, RData::SOA(soa))
    }

    fn nxdomain(&self) -> Outcome {
        Outcome::Local(Answer {
            code: ResponseCode::NXDomain,
            soa: Some(self.soa()),
            ..Default::default()
        })
    }

    /// A name that exists: its records of type `qtype` among `records`, or no data.
    fn found(&self, qtype: RecordType, records: Vec<Record>, additionals: Vec<Record>) -> Outcome {
        let answers: Vec<Record> = records
            .into_iter()
            .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
            .collect();
        let soa = answers.is_empty().then(|| self.soa());
        let additionals = if answers.is_empty() {
            Vec::new()
        } else {
            additionals
        };
        Outcome::Local(Answer {
            code: ResponseCode::NoError,
            answers,
            additionals,
            soa,
        })
    }

    /// Whether `name` is the zone's or a reverse name.
    pub fn owns(&self, name: &Name) -> bool {
        self.origin.zone_of(name) || is_reverse(name)
    }

    pub fn answer(&self, cluster: &Cluster, qname: &Name, qtype: RecordType) -> Outcome {
        let qname = qname.to_lowercase();
        if is_reverse(&qname) {
            return self.reverse(cluster, &qname, qtype);
        }
        if !self.origin.zone_of(&qname) {
            return Outcome::Forward;
        }
        let n = (qname.num_labels() - self.origin.num_labels()) as usize;
        // Labels below the zone, nearest the zone first: `svc`, ns, service, ...
        let labels: Vec<String> = qname
            .iter()
            .take(n)
            .map(|l| String::from_utf8_lossy(l).to_string())
            .rev()
            .collect();
        let l: Vec<&str> = labels.iter().map(String::as_str).collect();
        match l.as_slice() {
            [] => {
                let ns = self.record(&self.origin, RData::NS(NS(self.name("ns.dns"))));
                self.found(qtype, vec![self.soa(), ns], Vec::new())
            }
            ["svc"] | ["pod"] => self.found(qtype, Vec::new(), Vec::new()),
            ["svc" | "pod", ns] => {
                if namespace_exists(cluster, ns) {
                    self.found(qtype, Vec::new(), Vec::new())
                } else {
                    self.nxdomain()
                }
            }
            ["svc", ns, svc] => self.service(cluster, &qname, ns, svc, qtype),
            ["svc", ns, svc, host] if !host.starts_with('_') => {
                self.endpoint(cluster, &qname, ns, svc, host, qtype)
            }
            ["svc", ns, svc, proto, port] if proto.starts_with('_') && port.starts_with('_') => {
                self.srv(cluster, ns, svc, Some((&port[1..], &proto[1..])), qtype)
            }
            ["pod", ns, dashed] => self.pod(cluster, &qname, ns, dashed, qtype),
            _ => self.nxdomain(),
        }
    }

    fn service(
        &self,
        cluster: &Cluster,
        qname: &Name,
        ns: &str,
        name: &str,
        qtype: RecordType,
    ) -> Outcome {
        let Some(svc) = cluster.services.get(&ObjectRef::new(name).within(ns)) else {
            return self.nxdomain();
        };
        let spec = svc.spec.clone().unwrap_or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            let target = spec.external_name.as_deref().unwrap_or_default();
            let Ok(target) = Name::from_ascii(format!("{}.", target.trim_end_matches('.'))) else {
                return self.nxdomain();
            };
            let cname = self.record(qname, RData::CNAME(CNAME(target.clone())));
            let answer = Answer {
                code: ResponseCode::NoError,
                answers: vec![cname],
                ..Default::default()
            };
            if qtype == RecordType::CNAME {
                return Outcome::Local(answer);
            }
            if self.origin.zone_of(&target) {
                let mut answer = answer;
                if let Outcome::Local(more) | Outcome::Alias(more, _) =
                    self.answer(cluster, &target, qtype)
                {
                    answer.answers.extend(more.answers);
                    answer.code = more.code;
                    answer.soa = more.soa;
                }
                return Outcome::Local(answer);
            }
            return Outcome::Alias(answer, target);
        }
        if qtype == RecordType::SRV {
            return self.srv(cluster, ns, name, None, qtype);
        }
        if is_headless(&svc) {
            let eps = ready_endpoints(cluster, ns, name);
            if eps.is_empty() {
                return self.nxdomain();
            }
            let records = eps.iter().map(|(ip, _)| self.address(qname, *ip)).collect();
            return self.found(qtype, records, Vec::new());
        }
        let records = cluster_ips(&svc)
            .into_iter()
            .map(|ip| self.address(qname, ip))
            .collect();
        self.found(qtype, records, Vec::new())
    }

    fn address(&self, name: &Name, ip: IpAddr) -> Record {
        match ip {
            IpAddr::V4(v4) => self.record(name, RData::A(A(v4))),
            IpAddr::V6(v6) => self.record(name, RData::AAAA(AAAA(v6))),
        }
    }

    fn endpoint(
        &self,
        cluster: &Cluster,
        qname: &Name,
        ns: &str,
        svc: &str,
        host: &str,
        qtype: RecordType,
    ) -> Outcome {
        let records: Vec<Record> = ready_endpoints(cluster, ns, svc)
            .into_iter()
            .filter(|(ip, hostname)| endpoint_label(*ip, hostname.as_deref()) == host)
            .map(|(ip, _)| self.address(qname, ip))
            .collect();
        if records.is_empty() {
            return self.nxdomain();
        }
        self.found(qtype, records, Vec::new())
    }

    /// SRV records of a Service's ports, all of them or the one named `port` of `proto`.
    fn srv(
        &self,
        cluster: &Cluster,
        ns: &str,
        name: &str,
        filter: Option<(&str, &str)>,
        qtype: RecordType,
    ) -> Outcome {
        let Some(svc) = cluster.services.get(&ObjectRef::new(name).within(ns)) else {
            return self.nxdomain();
        };
        let spec = svc.spec.clone().unwrap_or_default();
        let matches = |pname: Option<&str>, pproto: Option<&str>| match filter {
            None => true,
            Some((port, proto)) => {
                pname.is_some_and(|n| n.eq_ignore_ascii_case(port))
                    && pproto.unwrap_or("TCP").eq_ignore_ascii_case(proto)
            }
        };
        let svc_fqdn = self.name(&format!("{name}.{ns}.svc"));
        let qname = match filter {
            Some((port, proto)) => self.name(&format!("_{port}._{proto}.{name}.{ns}.svc")),
            None => svc_fqdn.clone(),
        };
        let mut records = Vec::new();
        let mut additionals = Vec::new();
        if is_headless(&svc) {
            let mut targets = Vec::new();
            for slice in slices_of(cluster, ns, name) {
                for port in slice.ports.iter().flatten() {
                    if !matches(port.name.as_deref(), port.protocol.as_deref()) {
                        continue;
                    }
                    let Some(number) = port.port else { continue };
                    for (ip, hostname) in slice_ready_endpoints(&slice) {
                        let host = endpoint_label(ip, hostname.as_deref());
                        let target = self.name(&format!("{host}.{name}.{ns}.svc"));
                        targets.push((number as u16, target.clone()));
                        additionals.push(self.address(&target, ip));
                    }
                }
            }
            let weight = (100 / targets.len().max(1)).max(1) as u16;
            for (port, target) in targets {
                records.push(self.record(&qname, RData::SRV(SRV::new(0, weight, port, target))));
            }
        } else {
            let ports: Vec<_> = spec
                .ports
                .iter()
                .flatten()
                .filter(|p| matches(p.name.as_deref(), p.protocol.as_deref()))
                .collect();
            let weight = (100 / ports.len().max(1)).max(1) as u16;
            for p in &ports {
                records.push(self.record(
                    &qname,
                    RData::SRV(SRV::new(0, weight, p.port as u16, svc_fqdn.clone())),
                ));
            }
            if !ports.is_empty() {
                for ip in cluster_ips(&svc) {
                    additionals.push(self.address(&svc_fqdn, ip));
                }
            }
        }
        if records.is_empty() && filter.is_some() {
            return self.nxdomain();
        }
        self.found(qtype, records, additionals)
    }

    fn pod(
        &self,
        cluster: &Cluster,
        qname: &Name,
        ns: &str,
        dashed: &str,
        qtype: RecordType,
    ) -> Outcome {
        let Some(ip) = undash(dashed) else {
            return self.nxdomain();
        };
        let exists = cluster.pods.state().iter().any(|p| {
            p.namespace().as_deref() == Some(ns)
                && p.status.as_ref().is_some_and(|s| {
                    s.pod_ip.as_deref().and_then(|i| i.parse().ok()) == Some(ip)
                        || s.pod_ips
                            .iter()
                            .flatten()
                            .any(|i| i.ip.parse().ok() == Some(ip))
                })
        });
        if !exists {
            return self.nxdomain();
        }
        self.found(qtype, vec![self.address(qname, ip)], Vec::new())
    }

    fn reverse(&self, cluster: &Cluster, qname: &Name, qtype: RecordType) -> Outcome {
        let Ok(net) = qname.parse_arpa_name() else {
            return Outcome::Forward;
        };
        if net.prefix_len() != net.max_prefix_len() {
            return Outcome::Forward;
        }
        let ip = net.addr();
        let mut targets = BTreeSet::new();
        for svc in cluster.services.state() {
            if cluster_ips(&svc).contains(&ip) {
                let ns = svc.namespace().unwrap_or_default();
                targets.insert(self.name(&format!("{}.{ns}.svc", svc.name_any())));
            }
        }
        for slice in cluster.slices.state() {
            let Some(svc) = slice.labels().get(SERVICE_NAME_LABEL) else {
                continue;
            };
            let ns = slice.namespace().unwrap_or_default();
            for (addr, hostname) in slice_ready_endpoints(&slice) {
                if addr == ip {
                    let host = endpoint_label(addr, hostname.as_deref());
                    targets.insert(self.name(&format!("{host}.{svc}.{ns}.svc")));
                }
            }
        }
        if targets.is_empty() {
            return Outcome::Forward;
        }
        let records = targets
            .into_iter()
            .map(|t| self.record(qname, RData::PTR(PTR(t))))
            .collect();
        self.found(qtype, records, Vec::new())
    }
}

fn is_reverse(name: &Name) -> bool {
    let s = name.to_ascii().to_ascii_lowercase();
    s.ends_with(".in-addr.arpa.") || s.ends_with(".ip6.arpa.")
}

fn namespace_exists(cluster: &Cluster, ns: &str) -> bool {
    cluster.namespaces.get(&ObjectRef::new(ns)).is_some()
}

fn is_headless(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
}

fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .filter_map(|s| s.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            spec.cluster_ip
                .as_deref()
                .and_then(|s| s.parse::<IpAddr>().ok()),
        );
    }
    ips
}

fn slices_of(cluster: &Cluster, ns: &str, svc: &str) -> Vec<std::sync::Arc<EndpointSlice>> {
    cluster
        .slices
        .state()
        .into_iter()
        .filter(|s| {
            s.namespace().as_deref() == Some(ns)
                && s.labels().get(SERVICE_NAME_LABEL).map(String::as_str) == Some(svc)
        })
        .collect()
}

/// Addresses of a slice's ready endpoints (an unset `ready` means ready), with their hostname.
fn slice_ready_endpoints(slice: &EndpointSlice) -> Vec<(IpAddr, Option<String>)> {
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| {
            e.addresses
                .iter()
                .filter_map(|a| a.parse().ok())
                .map(|ip| (ip, e.hostname.clone()))
        })
        .collect()
}

fn ready_endpoints(cluster: &Cluster, ns: &str, svc: &str) -> Vec<(IpAddr, Option<String>)> {
    let mut eps: Vec<(IpAddr, Option<String>)> = slices_of(cluster, ns, svc)
        .iter()
        .flat_map(|s| slice_ready_endpoints(s))
        .collect();
    eps.sort();
    eps.dedup_by_key(|e| e.0);
    eps
}

/// An endpoint's label under its Service: its hostname, else its address with dashes.
pub fn endpoint_label(ip: IpAddr, hostname: Option<&str>) -> String {
    match hostname {
        Some(h) if !h.is_empty() => h.to_ascii_lowercase(),
        _ => dash(ip),
    }
}

/// `10.244.0.5` -> `10-244-0-5`; `fd00::5` -> `fd00--5`.
pub fn dash(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

fn undash(s: &str) -> Option<IpAddr> {
    s.replace('-', ".")
        .parse()
        .ok()
        .or_else(|| s.replace('-', ":").parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashed_addresses_round_trip() {
        for ip in ["10.244.0.5", "fd00::5", "2001:db8::1:2"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(undash(&dash(ip)), Some(ip));
        }
        assert_eq!(undash("10-244-0"), None);
        assert_eq!(undash("web"), None);
    }

    #[test]
    fn endpoints_are_named_by_hostname_or_address() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(endpoint_label(ip, Some("Web-0")), "web-0");
        assert_eq!(endpoint_label(ip, None), "10-1-2-3");
        assert_eq!(endpoint_label(ip, Some("")), "10-1-2-3");
    }
}
