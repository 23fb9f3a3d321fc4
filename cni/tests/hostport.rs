//! The `portMappings` capability of oxlet-bridge on the real kernel: hostPorts reachable on the
//! node's addresses, from localhost and from the pod itself (hairpin); CHECK, idempotent ADD,
//! DEL without runtimeConfig and GC remove exactly the attachment's rules.

mod common;

use common::*;
use serde_json::{json, Value};

fn vars<'a>(cmd: &'a str, id: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An IPv4 address of this node that is not on a bridge of the tests.
fn node_address() -> String {
    let out = sh_ok("ip -4 -o addr show scope global");
    out.lines()
        .filter(|l| !l.contains(" oxtb") && !l.contains(" oxab") && !l.contains(" oxlet0"))
        .filter_map(|l| l.split_whitespace().nth(3))
        .map(|a| a.split('/').next().unwrap().to_string())
        .next()
        .expect("the node has a global IPv4 address")
}

fn stdin_with_ports(f: &Fixture, ports: Value) -> String {
    let mut c: Value = serde_json::from_str(&plugin_stdin(f, "1.1.0", json!({}))).unwrap();
    c["capabilities"] = json!({"portMappings": true});
    c["runtimeConfig"] = json!({ "portMappings": ports });
    c.to_string()
}

fn ip_of(r: &Value) -> String {
    r["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn host_ports_reach_the_pod_from_the_node_localhost_and_the_pod_itself() {
    let f = Fixture::new();
    let hp = free_port();
    let stdin = stdin_with_ports(
        &f,
        json!([{"hostPort": hp, "containerPort": 7300, "protocol": "tcp"}]),
    );
    let pod = f.netns();
    let (ok, r) = run_plugin(&vars("ADD", "hp1", &pod), &stdin);
    assert!(ok, "{r}");
    let ip = ip_of(&r);
    let rules = f.hostport_rules();
    assert_eq!(
        rules
            .matches(&format!("dport {hp} dnat ip to {ip}:7300"))
            .count(),
        2,
        "{rules}"
    );

    let node = node_address();
    for addr in [node.as_str(), "127.0.0.1"] {
        let srv = serve_once(Some(&pod), "0.0.0.0:7300");
        let got = talk(None, &format!("{addr}:{hp}"), "ping");
        srv.join().unwrap();
        assert_eq!(got.unwrap(), "pong:ping", "via {addr}:{hp}");
    }
    // Hairpin: the pod reaches itself through the node's address, masqueraded.
    let srv = serve_peer(Some(&pod), "0.0.0.0:7300");
    let seen = talk(Some(&pod), &format!("{node}:{hp}"), "");
    srv.join().unwrap();
    assert_eq!(seen.unwrap(), f.gateway(), "hairpin traffic is masqueraded");

    // ADD again is ADD once; CHECK sees the rules and misses them when they are gone.
    let (ok, r2) = run_plugin(&vars("ADD", "hp1", &pod), &stdin);
    assert!(ok, "{r2}");
    assert_eq!(ip_of(&r2), ip);
    assert_eq!(f.hostport_rules().matches("dnat ip to").count(), 2);
    let mut chk: Value = serde_json::from_str(&stdin).unwrap();
    chk["prevResult"] = r.clone();
    let out = run_plugin(&vars("CHECK", "hp1", &pod), &chk.to_string());
    assert!(out.0, "{}", out.1);
    let prefix = cni::hostport::chain_prefix("hp1", "eth0");
    sh_ok(&format!(
        "nft delete chain inet {} {prefix}-pre",
        f.hostport_table()
    ));
    let out = run_plugin(&vars("CHECK", "hp1", &pod), &chk.to_string());
    assert!(
        !out.0 && out.1["msg"].as_str().unwrap().contains("hostPort"),
        "{}",
        out.1
    );
    assert!(run_plugin(&vars("ADD", "hp1", &pod), &stdin).0);
    assert!(run_plugin(&vars("CHECK", "hp1", &pod), &chk.to_string()).0);

    // DEL as a runtime without its cache sends it: no runtimeConfig.
    let plain = plugin_stdin(&f, "1.1.0", json!({}));
    assert!(run_plugin(&vars("DEL", "hp1", &pod), &plain).0);
    assert_eq!(f.hostport_rules(), "", "the table goes with the last pod");
    assert!(talk(None, &format!("127.0.0.1:{hp}"), "ping").is_err());
}

#[test]
fn bad_port_mappings_are_config_errors() {
    let f = Fixture::new();
    let pod = f.netns();
    let stdin = stdin_with_ports(
        &f,
        json!([{"hostPort": 70000, "containerPort": 80, "protocol": "tcp"}]),
    );
    let out = run_plugin(&vars("ADD", "bad", &pod), &stdin);
    assert!(!out.0);
    assert_eq!(out.1["code"], 7, "{}", out.1);
    assert!(f.ip_files().is_empty());
}

#[test]
fn del_and_gc_remove_only_their_attachments_rules() {
    let f = Fixture::new();
    let (p1, p2) = (free_port(), free_port());
    let mut ips = vec![];
    for (id, hp) in [("a1", p1), ("a2", p2)] {
        let ns = f.netns();
        let stdin = stdin_with_ports(&f, json!([{"hostPort": hp, "containerPort": 80}]));
        let (ok, r) = run_plugin(&vars("ADD", id, &ns), &stdin);
        assert!(ok, "{r}");
        ips.push(ip_of(&r));
    }
    let rules = f.hostport_rules();
    assert!(
        rules.contains(&format!("dport {p1} dnat ip to {}:80", ips[0])),
        "{rules}"
    );
    assert!(
        rules.contains(&format!("dport {p2} dnat ip to {}:80", ips[1])),
        "{rules}"
    );

    // An ADD killed before its runtime recorded it: GC removes its rules with its IP.
    let mut gc: Value = serde_json::from_str(&plugin_stdin(&f, "1.1.0", json!({}))).unwrap();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "a2", "ifname": "eth0"}]);
    let (ok, r) = run_plugin(&[("CNI_COMMAND", "GC")], &gc.to_string());
    assert!(ok, "{r}");
    let rules = f.hostport_rules();
    assert!(!rules.contains(&format!("dport {p1} ")), "{rules}");
    assert!(
        rules.contains(&format!("dport {p2} dnat ip to {}:80", ips[1])),
        "{rules}"
    );
    assert_eq!(f.ip_files(), vec![ips[1].clone()]);

    gc["cni.dev/valid-attachments"] = json!([]);
    assert!(run_plugin(&[("CNI_COMMAND", "GC")], &gc.to_string()).0);
    assert_eq!(f.hostport_rules(), "");
}
