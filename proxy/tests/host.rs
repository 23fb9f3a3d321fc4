//! NodePort addresses as read from this machine.

use std::net::Ipv4Addr;
use std::process::Command;

use proxy::host::{nodeport_ips, NodePortAddresses};

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn primary_means_the_addresses_of_the_default_route_interface() {
    // Read here from `ip`'s text output (the proxy reads its JSON).
    let devs: Vec<String> = sh("ip -4 route show default")
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter()
                .position(|x| *x == "dev")
                .map(|i| w[i + 1].to_string())
        })
        .collect();
    let mut want: Vec<Ipv4Addr> = devs
        .iter()
        .flat_map(|d| {
            sh(&format!("ip -4 -o addr show dev {d}"))
                .lines()
                .filter_map(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    let i = w.iter().position(|x| *x == "inet")?;
                    w[i + 1].split('/').next()?.parse().ok()
                })
                .collect::<Vec<_>>()
        })
        .filter(|ip: &Ipv4Addr| !ip.is_loopback())
        .collect();
    want.sort();
    want.dedup();
    assert!(!devs.is_empty(), "this test needs a default route");
    let got = nodeport_ips(&NodePortAddresses::Primary).await.unwrap();
    assert_eq!(got, want);
    assert!(!got.is_empty());
}

#[tokio::test]
async fn loopback_never_serves_node_ports() {
    let which: NodePortAddresses = "127.0.0.0/8".parse().unwrap();
    assert!(nodeport_ips(&which).await.unwrap().is_empty());
    let all: NodePortAddresses = "0.0.0.0/0".parse().unwrap();
    assert!(!nodeport_ips(&all)
        .await
        .unwrap()
        .iter()
        .any(|ip| ip.is_loopback()));
    assert!("10.0.0.0/8,bogus".parse::<NodePortAddresses>().is_err());
}
