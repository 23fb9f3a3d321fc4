//! Stale UDP conntrack entries: a UDP flow keeps going to the endpoint its first packet was
//! DNATed to, even after that endpoint left the Service, until its entry is deleted (as
//! kube-proxy does). Deleted through conntrack netlink.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};
use tracing::{debug, warn};

use crate::model::{Protocol, ServicePort};
use crate::Error;

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

/// Deletes the conntrack entries of these flows through conntrack netlink (one dump of the
/// IPv4 table, then one delete per matching entry); failures are logged (the flow then lives
/// until its entry times out).
pub async fn clear(flows: &[StaleFlow]) {
    if flows.is_empty() {
        return;
    }
    let owned = flows.to_vec();
    match tokio::task::spawn_blocking(move || delete(&owned)).await {
        Ok(Ok(n)) => debug!(?flows, entries = n, "cleared UDP conntrack entries"),
        Ok(Err(e)) => warn!(?flows, error = %e, "clearing UDP conntrack entries"),
        Err(e) => warn!(?flows, error = %e, "clearing UDP conntrack entries"),
    }
}

/// One conntrack entry's original direction and the source of its reply direction (the
/// endpoint after DNAT).
#[derive(Debug, Clone)]
struct Entry {
    orig: Vec<Tuple>,
    proto: u8,
    orig_dst: Option<IpAddr>,
    orig_dport: Option<u16>,
    reply_src: Option<IpAddr>,
}

fn entry(attrs: &[ConntrackAttribute]) -> Option<Entry> {
    let mut e = Entry {
        orig: vec![],
        proto: 0,
        orig_dst: None,
        orig_dport: None,
        reply_src: None,
    };
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => {
                e.orig = t.clone();
                for part in t {
                    match part {
                        Tuple::Ip(ips) => {
                            for ip in ips {
                                if let IPTuple::DestinationAddress(d) = ip {
                                    e.orig_dst = Some(*d);
                                }
                            }
                        }
                        Tuple::Proto(ps) => {
                            for p in ps {
                                match p {
                                    ProtoTuple::Protocol(p) => e.proto = u8::from(*p),
                                    ProtoTuple::DestinationPort(port) => e.orig_dport = Some(*port),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            ConntrackAttribute::CtaTupleReply(t) => {
                for part in t {
                    if let Tuple::Ip(ips) = part {
                        for ip in ips {
                            if let IPTuple::SourceAddress(s) = ip {
                                e.reply_src = Some(*s);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    (!e.orig.is_empty()).then_some(e)
}

fn stale(e: &Entry, flows: &[StaleFlow]) -> bool {
    const UDP: u8 = 17;
    e.proto == UDP
        && flows.iter().any(|f| {
            f.service.is_none_or(|s| e.orig_dst == Some(IpAddr::V4(s)))
                && e.orig_dport == Some(f.port)
                && e.reply_src == Some(IpAddr::V4(f.endpoint))
        })
}

fn request(msg: ConntrackMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let inner = NetfilterMessage::new(NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0), msg);
    let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
    m.finalize();
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    buf
}

/// Reads answers to request `seq` until its end (DONE or the ACK); `each` sees every entry.
fn read_answers(
    sock: &Socket,
    seq: u32,
    mut each: impl FnMut(&[ConntrackAttribute]),
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = sock.recv(&mut &mut buf[..], 0)?;
        let mut at = 0;
        while at < n {
            let m = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[at..n])
                .map_err(std::io::Error::other)?;
            let len = m.header.length as usize;
            if len == 0 {
                return Err(std::io::Error::other("empty netlink message"));
            }
            at += (len + 3) & !3;
            if m.header.sequence_number != seq {
                continue;
            }
            match m.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) if e.code.is_none() => return Ok(()),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)),
                    ..
                }) => each(&attrs),
                _ => {}
            }
        }
    }
}

/// Dumps the IPv4 conntrack table and deletes the entries of `flows`; returns how many went.
fn delete(flows: &[StaleFlow]) -> Result<usize, Error> {
    let err = Error::Conntrack;
    let mut sock = Socket::new(NETLINK_NETFILTER).map_err(err)?;
    sock.bind_auto().map_err(err)?;
    let seq = 1;
    let dump = request(
        ConntrackMessage::Get(vec![]),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
    );
    sock.send(&dump, 0).map_err(err)?;
    let mut doomed = vec![];
    read_answers(&sock, seq, |attrs| {
        if let Some(e) = entry(attrs) {
            if stale(&e, flows) {
                doomed.push(e);
            }
        }
    })
    .map_err(err)?;
    let mut deleted = 0;
    for (i, e) in doomed.into_iter().enumerate() {
        let seq = seq + 1 + i as u32;
        let del = request(
            ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(e.orig)]),
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
        );
        sock.send(&del, 0).map_err(err)?;
        match read_answers(&sock, seq, |_| {}) {
            Ok(()) => deleted += 1,
            // Gone meanwhile (timed out or deleted by someone else).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(Error::Conntrack(e)),
        }
    }
    Ok(deleted)
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
