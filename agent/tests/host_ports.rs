//! hostPorts through the CNI `portMappings` capability of oxlet-bridge: a pod's hostPort is
//! reachable at the node's address and on localhost, its rules go with the pod, and a second
//! pod asking for the same hostPort on the node is rejected as kubelet rejects it (NodePorts).
//! Root; needs `tests/testbed/up`.

mod common;

use anyhow::Result;
use common::*;
use kube::api::DeleteParams;
use serde_json::json;
use std::io::{Read, Write};
use std::time::Duration;

fn web(name: &str, host_port: u16) -> serde_json::Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "c",
                "image": busybox(),
                "command": ["sh", "-c", format!("mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p 8080 -h /www")],
                "ports": [{"containerPort": 8080, "hostPort": host_port}]
            }]
        }
    })
}

fn http_get(addr: &str) -> Result<String> {
    let addr: std::net::SocketAddr = addr.parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

async fn eventually_get(addr: &str) -> Result<String> {
    let mut last = None;
    for _ in 0..50 * slowdown() {
        match http_get(addr) {
            Ok(b) => return Ok(b),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last.unwrap().context(format!("GET http://{addr}/")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_port_reaches_the_pod_on_the_node_and_a_second_claim_is_rejected() -> Result<()> {
    let mut c = Cluster::new().await?;
    // As the agent's default network: pods route through the bridge, so replies to a
    // connection from the node's own address find their way back.
    let conf = c.cfg.cni_conf_dir.join("10-test.conflist");
    let mut net: serde_json::Value = serde_json::from_slice(&std::fs::read(&conf)?)?;
    net["plugins"][0]["isDefaultGateway"] = json!(true);
    std::fs::write(&conf, serde_json::to_vec(&net)?)?;
    c.start_agent().await?;
    let hp = free_port()?;
    c.create_pod(web("hp-web", hp)).await?;
    let p = c
        .wait_pod("hp-web", Duration::from_secs(60), "Running", |p| {
            phase(p) == "Running" && condition(p, "Ready").as_deref() == Some("True")
        })
        .await?;
    let st = p.status.clone().unwrap();
    let (host_ip, pod_ip) = (st.host_ip.unwrap(), st.pod_ip.unwrap());
    let table = format!("oxlet-hostport-oxat-{}", c.x);
    let rules = sh(&format!("nft list table inet {table}"));
    assert!(
        rules.contains(&format!("dport {hp} dnat ip to {pod_ip}:8080")),
        "{rules}"
    );
    for addr in [host_ip.as_str(), "127.0.0.1"] {
        let body = eventually_get(&format!("{addr}:{hp}")).await?;
        assert!(body.contains("hp-web"), "via {addr}: {body}");
    }

    // The same hostPort again on this node: kubelet's admission rejects it.
    c.create_pod(web("hp-again", hp)).await?;
    let p2 = c
        .wait_pod("hp-again", Duration::from_secs(30), "rejected", |p| {
            phase(p) == "Failed"
        })
        .await?;
    let st2 = p2.status.unwrap();
    assert_eq!(st2.reason.as_deref(), Some("NodePorts"));
    assert_eq!(
        st2.message.as_deref(),
        Some("Pod was rejected: Predicate NodePorts failed: node(s) didn't have free ports for the requested pod ports")
    );
    c.wait_events("hp-again", &["NodePorts"]).await?;
    let body = http_get(&format!("127.0.0.1:{hp}"))?;
    assert!(
        body.contains("hp-web"),
        "the first pod keeps the port: {body}"
    );

    for name in ["hp-again", "hp-web"] {
        c.pods().delete(name, &DeleteParams::default()).await?;
        c.wait_gone(name, Duration::from_secs(30)).await?;
    }
    let rules = sh(&format!("nft list table inet {table} 2>/dev/null"));
    assert!(!rules.contains("dnat"), "rules left: {rules}");
    assert!(http_get(&format!("127.0.0.1:{hp}")).is_err());
    Ok(())
}

/// An agent killed inside CNI ADD leaves the plugin's work (IP, veth, hostPort rules) without a
/// cache entry or a recorded network; the pod deleted meanwhile is cleaned up by the restarted
/// agent all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_port_rules_of_an_add_the_killed_agent_left_unrecorded_are_removed() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    let hp = free_port()?;
    let created = c.create_pod(web("hp-killed", hp)).await?;
    let uid = created.metadata.uid.clone().unwrap();
    let p = c
        .wait_pod("hp-killed", Duration::from_secs(60), "Running", |p| {
            phase(p) == "Running"
        })
        .await?;
    let pod_ip = p.status.unwrap().pod_ip.unwrap();
    let table = format!("oxlet-hostport-oxat-{}", c.x);
    assert!(sh(&format!("nft list table inet {table}")).contains(&pod_ip));

    c.kill_agent().await;
    // As if killed after the plugin's ADD and before the agent recorded it.
    let record = c.pod_dir(&uid).join("pod.json");
    let mut rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&record)?)?;
    let network = rec["network"].take();
    rec["network_pending"] = network;
    std::fs::write(&record, serde_json::to_vec(&rec)?)?;
    let cache = c.cfg.cni_cache_dir.join("results");
    for e in std::fs::read_dir(&cache)? {
        let path = e?.path();
        if path.to_string_lossy().contains(&uid) {
            std::fs::remove_file(path)?;
        }
    }
    c.pods()
        .delete("hp-killed", &DeleteParams::default().grace_period(0))
        .await?;
    c.wait_gone("hp-killed", Duration::from_secs(10)).await?;
    c.start_agent().await?;
    c.wait_no_leftovers(&uid).await?;
    let rules = sh(&format!("nft list table inet {table} 2>/dev/null"));
    assert!(!rules.contains(&pod_ip), "rules left: {rules}");
    let leases = c.dir.path().join(format!("ipam/oxat-{}", c.x));
    assert!(!leases.join(&pod_ip).exists(), "IP lease left");
    assert!(c.bridge_ports().is_empty(), "{:?}", c.bridge_ports());
    Ok(())
}
