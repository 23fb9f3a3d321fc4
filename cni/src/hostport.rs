//! The `portMappings` capability (pods' hostPorts) in nftables, in place of the reference
//! `portmap` plugin (which needs iptables). Each network has a table `inet
//! oxlet-hostport-<network>`; each attachment with mappings owns three base chains in it, named
//! `hp-<12 hex digits>-{pre,out,post}` from a hash of container id and ifname (the host veth's
//! hash), so DEL and GC find them without the netns or the mappings:
//!
//! - `pre` (prerouting) and `out` (output, for the node's own connections): DNAT of connections
//!   to `hostPort` on the node's local addresses (or on `hostIP` when given) to the pod's IP and
//!   `containerPort`. IPv6 localhost cannot be DNATed and is left alone, as upstream does.
//! - `post` (postrouting): masquerade of hairpin connections (the pod reaching its own hostPort)
//!   and of IPv4 connections from localhost, which `route_localnet` on the bridge lets through.
//!
//! ADD rewrites the chains in one `nft` transaction (flush and refill: ADD twice is ADD once);
//! DEL removes them; the table goes with the network's last IP, like the masquerade table.

use crate::ipam::IpNet;
use crate::masq::{self, MasqError};
use crate::types::{code, CniError};
use serde::Deserialize;
use serde_json::Value;
use std::net::IpAddr;

/// One entry of `runtimeConfig.portMappings`, as containerd and CRI-O pass it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: i64,
    pub container_port: i64,
    #[serde(default)]
    pub protocol: String,
    #[serde(rename = "hostIP", default)]
    pub host_ip: String,
}

/// The port mappings of a `runtimeConfig`, validated; none when the capability is not used.
pub fn parse(runtime_config: Option<&Value>) -> Result<Vec<PortMapping>, CniError> {
    let Some(v) = runtime_config.and_then(|rc| rc.get("portMappings")) else {
        return Ok(vec![]);
    };
    if v.is_null() {
        return Ok(vec![]);
    }
    let mut maps: Vec<PortMapping> = serde_json::from_value(v.clone()).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            "cannot decode runtimeConfig.portMappings",
        )
        .with_details(e)
    })?;
    fn bad(m: &PortMapping, what: &str) -> CniError {
        CniError::new(
            code::INVALID_CONFIG,
            format!(
                "port mapping {}:{}/{}: {what}",
                m.host_port, m.container_port, m.protocol
            ),
        )
    }
    for m in &mut maps {
        if !(1..=65535).contains(&m.host_port) || !(1..=65535).contains(&m.container_port) {
            return Err(bad(m, "ports must be in 1-65535"));
        }
        m.protocol = match m.protocol.to_ascii_lowercase().as_str() {
            "" | "tcp" => "tcp".into(),
            "udp" => "udp".into(),
            "sctp" => "sctp".into(),
            _ => return Err(bad(m, "protocol must be tcp, udp or sctp")),
        };
        if !m.host_ip.is_empty() && m.host_ip.parse::<IpAddr>().is_err() {
            return Err(bad(m, "hostIP is not an IP address"));
        }
    }
    Ok(maps)
}

/// The table holding a network's port mappings.
pub fn table_name(network: &str) -> String {
    masq::table_name(network).replacen("oxlet-cni-", "oxlet-hostport-", 1)
}

/// The chain name prefix of an attachment: `hp-` and the host veth's hash.
pub fn chain_prefix(container_id: &str, ifname: &str) -> String {
    let veth = crate::plugin::host_veth_name(container_id, ifname);
    format!("hp-{}", &veth[3..])
}

/// Suffix, hook and priority of the chains (numbers: nft 1.0.6 knows no `dstnat` in output).
const CHAINS: [(&str, &str, &str); 3] = [
    ("pre", "prerouting", "-100"),
    ("out", "output", "-100"),
    ("post", "postrouting", "100"),
];

/// The attachment's chains and rules for `mappings` to `pod_ips` (idempotent: the chains are
/// flushed and refilled in the same transaction).
pub fn render_add(
    network: &str,
    prefix: &str,
    mappings: &[PortMapping],
    pod_ips: &[IpAddr],
) -> String {
    let t = table_name(network);
    let mut s = format!("table inet {t} {{\n");
    for (suffix, hook, prio) in CHAINS {
        s += &format!(
            "\tchain {prefix}-{suffix} {{ type nat hook {hook} priority {prio}; policy accept; }}\n"
        );
    }
    s += "}\n";
    for (suffix, _, _) in CHAINS {
        s += &format!("flush chain inet {t} {prefix}-{suffix}\n");
    }
    for m in mappings {
        let host_ip: Option<IpAddr> = m
            .host_ip
            .parse()
            .ok()
            .filter(|ip: &IpAddr| !ip.is_unspecified());
        for pod in pod_ips {
            if host_ip.is_some_and(|h| h.is_ipv4() != pod.is_ipv4()) {
                continue;
            }
            let (fam, proto) = if pod.is_ipv4() {
                ("ip", "ipv4")
            } else {
                ("ip6", "ipv6")
            };
            let dst = match host_ip {
                Some(h) => format!("{fam} daddr {h}"),
                None if pod.is_ipv4() => "fib daddr type local".to_string(),
                None => "fib daddr type local ip6 daddr != ::1".to_string(),
            };
            let to = match pod {
                IpAddr::V4(a) => format!("{a}:{}", m.container_port),
                IpAddr::V6(a) => format!("[{a}]:{}", m.container_port),
            };
            let (p, hp, cp) = (&m.protocol, m.host_port, m.container_port);
            for chain in ["pre", "out"] {
                s += &format!(
                    "add rule inet {t} {prefix}-{chain} meta nfproto {proto} {dst} {p} dport {hp} dnat {fam} to {to}\n"
                );
            }
            s += &format!(
                "add rule inet {t} {prefix}-post {fam} saddr {pod} {fam} daddr {pod} {p} dport {cp} masquerade\n"
            );
            if pod.is_ipv4() {
                s += &format!(
                    "add rule inet {t} {prefix}-post ip saddr 127.0.0.0/8 ip daddr {pod} {p} dport {cp} masquerade\n"
                );
            }
        }
    }
    s
}

/// Removes the attachment's chains (idempotent: each is declared before it is deleted).
pub fn render_del(network: &str, prefix: &str) -> String {
    let t = table_name(network);
    let mut s = format!("table inet {t}\n");
    for (suffix, _, _) in CHAINS {
        s += &format!(
            "add chain inet {t} {prefix}-{suffix}\ndelete chain inet {t} {prefix}-{suffix}\n"
        );
    }
    s
}

/// Removes the network's table (idempotent).
pub fn render_drop(network: &str) -> String {
    let t = table_name(network);
    format!("table inet {t}\ndelete table inet {t}\n")
}

/// Whether the network's table exists (one netlink request).
pub fn table_exists(network: &str) -> std::io::Result<bool> {
    without_nftables_none(masq::nft_netlink::get_table(
        libc::NFPROTO_INET as u8,
        &table_name(network),
    ))
}

/// Whether the attachment has chains (one netlink request).
pub fn chains_exist(network: &str, prefix: &str) -> std::io::Result<bool> {
    without_nftables_none(masq::nft_netlink::get_chain(
        libc::NFPROTO_INET as u8,
        &table_name(network),
        &format!("{prefix}-pre"),
    ))
}

/// A kernel without nf_tables (nfnetlink answers EINVAL for an unknown subsystem) holds no
/// hostPort rules: DEL and GC then have nothing to remove, where `nft` would fail.
fn without_nftables_none(r: std::io::Result<bool>) -> std::io::Result<bool> {
    match r {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT)
            ) =>
        {
            Ok(false)
        }
        r => r,
    }
}

/// The attachment prefixes that have chains in the network's table (runs `nft`).
pub fn attachments(network: &str) -> Result<Vec<String>, MasqError> {
    let out = masq::output(&["list", "table", "inet", &table_name(network)])?;
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chain "))
        .filter_map(|c| c.split_whitespace().next())
        .filter_map(|c| {
            c.strip_suffix("-pre")
                .or(c.strip_suffix("-out"))
                .or(c.strip_suffix("-post"))
        })
        .filter(|c| c.starts_with("hp-"))
        .map(String::from)
        .collect();
    v.sort();
    v.dedup();
    Ok(v)
}

/// Lets IPv4 connections from localhost that were DNATed to a pod leave through the bridge.
pub fn enable_route_localnet(bridge: &str) -> Result<(), CniError> {
    let path = format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(&path, "1").map_err(|e| {
        CniError::new(
            code::IO_FAILURE,
            format!("cannot enable route_localnet ({path}): {e}"),
        )
    })
}

/// The pod's addresses from IPAM's answer.
pub fn pod_ips(ips: &[IpNet]) -> Vec<IpAddr> {
    ips.iter().map(|n| n.addr).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_kernel_without_nftables_has_no_chains() {
        let e = |n| Err(std::io::Error::from_raw_os_error(n));
        assert!(!without_nftables_none(e(libc::EINVAL)).unwrap());
        assert!(without_nftables_none(e(libc::EPERM)).is_err());
        assert!(without_nftables_none(Ok(true)).unwrap());
    }

    #[test]
    fn parses_and_validates() {
        let rc = json!({"portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "TCP"},
            {"hostPort": 53, "containerPort": 5353, "protocol": "udp", "hostIP": "10.0.0.1"}
        ]});
        let m = parse(Some(&rc)).unwrap();
        assert_eq!(m[0].protocol, "tcp");
        assert_eq!(m[1].host_ip, "10.0.0.1");
        assert!(parse(None).unwrap().is_empty());
        assert!(parse(Some(&json!({"bandwidth": {}}))).unwrap().is_empty());
        for bad in [
            json!([{"hostPort": 0, "containerPort": 80}]),
            json!([{"hostPort": 80, "containerPort": 80, "protocol": "icmp"}]),
            json!([{"hostPort": 80, "containerPort": 80, "hostIP": "x"}]),
        ] {
            let e = parse(Some(&json!({"portMappings": bad}))).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{e:?}");
        }
    }

    #[test]
    fn add_golden() {
        let m = parse(Some(&json!({"portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
            {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "192.0.2.1"}
        ]})))
        .unwrap();
        let s = render_add("n", "hp-1", &m, &["10.1.0.2".parse().unwrap()]);
        assert_eq!(
            s,
            "table inet oxlet-hostport-n {\n\
             \tchain hp-1-pre { type nat hook prerouting priority -100; policy accept; }\n\
             \tchain hp-1-out { type nat hook output priority -100; policy accept; }\n\
             \tchain hp-1-post { type nat hook postrouting priority 100; policy accept; }\n\
             }\n\
             flush chain inet oxlet-hostport-n hp-1-pre\n\
             flush chain inet oxlet-hostport-n hp-1-out\n\
             flush chain inet oxlet-hostport-n hp-1-post\n\
             add rule inet oxlet-hostport-n hp-1-pre meta nfproto ipv4 fib daddr type local tcp dport 8080 dnat ip to 10.1.0.2:80\n\
             add rule inet oxlet-hostport-n hp-1-out meta nfproto ipv4 fib daddr type local tcp dport 8080 dnat ip to 10.1.0.2:80\n\
             add rule inet oxlet-hostport-n hp-1-post ip saddr 10.1.0.2 ip daddr 10.1.0.2 tcp dport 80 masquerade\n\
             add rule inet oxlet-hostport-n hp-1-post ip saddr 127.0.0.0/8 ip daddr 10.1.0.2 tcp dport 80 masquerade\n\
             add rule inet oxlet-hostport-n hp-1-pre meta nfproto ipv4 ip daddr 192.0.2.1 udp dport 5353 dnat ip to 10.1.0.2:53\n\
             add rule inet oxlet-hostport-n hp-1-out meta nfproto ipv4 ip daddr 192.0.2.1 udp dport 5353 dnat ip to 10.1.0.2:53\n\
             add rule inet oxlet-hostport-n hp-1-post ip saddr 10.1.0.2 ip daddr 10.1.0.2 udp dport 53 masquerade\n\
             add rule inet oxlet-hostport-n hp-1-post ip saddr 127.0.0.0/8 ip daddr 10.1.0.2 udp dport 53 masquerade\n"
        );
        // An IPv4 hostIP does not apply to an IPv6 pod address.
        let s6 = render_add("n", "hp-1", &m[1..], &["fd00::2".parse().unwrap()]);
        assert!(!s6.contains("dnat"), "{s6}");
    }

    #[test]
    fn chains_come_and_go_over_nft() {
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let net = format!("unit-hp-{}", std::process::id());
        let m = parse(Some(
            &json!({"portMappings": [{"hostPort": 18080, "containerPort": 80}]}),
        ))
        .unwrap();
        let p = chain_prefix("c1", "eth0");
        assert!(!chains_exist(&net, &p).unwrap());
        masq::apply(render_add(&net, &p, &m, &["10.243.127.2".parse().unwrap()])).unwrap();
        masq::apply(render_add(&net, &p, &m, &["10.243.127.2".parse().unwrap()])).unwrap();
        assert!(chains_exist(&net, &p).unwrap());
        assert_eq!(attachments(&net).unwrap(), vec![p.clone()]);
        let listed = masq::output(&["list", "table", "inet", &table_name(&net)]).unwrap();
        assert_eq!(
            listed.matches("dnat ip to 10.243.127.2:80").count(),
            2,
            "{listed}"
        );
        masq::apply(render_del(&net, &p)).unwrap();
        masq::apply(render_del(&net, &p)).unwrap();
        assert!(!chains_exist(&net, &p).unwrap());
        assert!(table_exists(&net).unwrap());
        masq::apply(render_drop(&net)).unwrap();
        assert!(!table_exists(&net).unwrap());
    }
}
