//! What the proxy reads from and sets on the node: its IPv4 addresses (for NodePorts) and the
//! bridge netfilter switch that makes bridged pod traffic pass the rules.

use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;
use serde_json::Value;
use tokio::process::Command;
use tracing::info;

use crate::Error;

async fn ip_json(args: &[&str]) -> Result<Value, Error> {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .await
        .map_err(|source| Error::Spawn { cmd: "ip", source })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: format!("ip -j {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(Error::IpJson)
}

/// The node's IPv4 addresses with their interface names (loopback included).
pub async fn ipv4_addresses() -> Result<Vec<(String, Ipv4Addr)>, Error> {
    let v = ip_json(&["-4", "addr", "show"]).await?;
    let mut out = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        let dev = link["ifname"].as_str().unwrap_or_default();
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if let Some(ip) = a["local"].as_str().and_then(|s| s.parse().ok()) {
                out.push((dev.to_string(), ip));
            }
        }
    }
    Ok(out)
}

/// Interfaces that carry an IPv4 default route.
pub async fn default_route_interfaces() -> Result<Vec<String>, Error> {
    let v = ip_json(&["-4", "route", "show", "default"]).await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["dev"].as_str().map(str::to_string))
        .collect())
}

/// Which node addresses serve NodePorts (`--nodeport-addresses`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The node's own InternalIPs from its Node object, or before it registers the addresses
    /// of the interfaces with a default route (loopback never).
    Primary,
    /// The node's addresses inside these networks.
    Cidrs(Vec<Ipv4Net>),
}

impl std::str::FromStr for NodePortAddresses {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        if s == "primary" {
            return Ok(NodePortAddresses::Primary);
        }
        s.split(',')
            .map(|c| {
                c.trim().parse().map_err(|source| Error::NodePortAddresses {
                    value: s.to_string(),
                    source,
                })
            })
            .collect::<Result<_, _>>()
            .map(NodePortAddresses::Cidrs)
    }
}

/// The node's addresses that serve NodePorts, read from its interfaces (`Primary`: those with a
/// default route); 127.0.0.0/8 never does (as upstream's nftables mode).
pub async fn nodeport_ips(which: &NodePortAddresses) -> Result<Vec<Ipv4Addr>, Error> {
    let addrs = ipv4_addresses().await?;
    let mut ips: Vec<Ipv4Addr> = match which {
        NodePortAddresses::Primary => {
            let devs = default_route_interfaces().await?;
            addrs
                .into_iter()
                .filter(|(dev, _)| devs.contains(dev))
                .map(|(_, ip)| ip)
                .collect()
        }
        NodePortAddresses::Cidrs(nets) => addrs
            .into_iter()
            .map(|(_, ip)| ip)
            .filter(|ip| nets.iter().any(|n| n.contains(ip)))
            .collect(),
    };
    ips.retain(|ip| !ip.is_loopback());
    ips.sort();
    ips.dedup();
    Ok(ips)
}

const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// Loads br_netfilter if needed and sets `net.bridge.bridge-nf-call-iptables=1` (as kubeadm
/// requires), so that pod -> Service -> pod on one bridge passes the ip hooks; logs what it did.
pub async fn ensure_bridge_netfilter() -> Result<(), Error> {
    let path = Path::new(BRIDGE_NF_CALL_IPTABLES);
    if !path.exists() {
        let out = Command::new("modprobe")
            .arg("br_netfilter")
            .output()
            .await
            .map_err(|source| Error::Spawn {
                cmd: "modprobe",
                source,
            })?;
        if !out.status.success() {
            return Err(Error::Command {
                cmd: "modprobe br_netfilter".into(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        info!("loaded kernel module br_netfilter");
    }
    let now = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| Error::BridgeNetfilter {
            what: "reading net.bridge.bridge-nf-call-iptables",
            source,
        })?;
    if now.trim() == "1" {
        info!("br_netfilter: net.bridge.bridge-nf-call-iptables is 1");
    } else {
        tokio::fs::write(path, "1")
            .await
            .map_err(|source| Error::BridgeNetfilter {
                what: "setting net.bridge.bridge-nf-call-iptables",
                source,
            })?;
        info!("br_netfilter: set net.bridge.bridge-nf-call-iptables to 1");
    }
    Ok(())
}
