use super::*;
use crate::model::Protocol;
use crate::ruleset::ENDPOINT_RANGE;

fn layout() -> Layout {
    Layout {
        table: "t".into(),
        service_cidr: "10.96.0.0/12".parse().unwrap(),
        cluster_cidr: "10.244.0.0/16".parse().unwrap(),
        nodeport_ips: vec!["192.0.2.2".parse().unwrap()],
    }
}

fn web(eps: &[(&str, bool)]) -> ServicePort {
    ServicePort {
        id: ServicePortName {
            namespace: "ns".into(),
            name: "web".into(),
            port: "http".into(),
            protocol: Protocol::Tcp,
        },
        cluster_ip: "10.96.0.10".parse().unwrap(),
        port: 80,
        node_port: Some(30080),
        external_ips: vec![],
        affinity_timeout: None,
        external_local: false,
        internal_local: false,
        endpoints: eps
            .iter()
            .map(|(ip, local)| Endpoint {
                ip: ip.parse().unwrap(),
                port: 8080,
                local: *local,
            })
            .collect(),
    }
}

/// The map key written as nft writes it.
fn key(text: &str) -> Key {
    let parts: Vec<&str> = text.split(" . ").collect();
    let proto = |p: &str| match p {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => Protocol::Sctp,
    };
    match parts[..] {
        [a] => Key::Addr(a.parse().unwrap()),
        [a, p, port] => Key::AddrProtoPort(a.parse().unwrap(), proto(p), port.parse().unwrap()),
        [p, port] => Key::ProtoPort(proto(p), port.parse().unwrap()),
        _ => panic!("{text}"),
    }
}

/// The lines of the full rendering that mention `what`.
fn lines_with(r: &Ruleset, what: &str) -> Vec<String> {
    r.render_commands()
        .lines()
        .filter(|l| l.contains(what))
        .map(str::to_string)
        .collect()
}

#[test]
fn base_chains_and_fixed_rules() {
    let r = build(&layout(), &[]);
    let text = r.render_commands();
    for line in [
        "add chain ip t filter-input { type filter hook input priority -110 ; }",
        "add chain ip t filter-forward { type filter hook forward priority -110 ; }",
        "add chain ip t filter-output { type filter hook output priority -110 ; }",
        "add chain ip t filter-output-post-dnat { type filter hook output priority -90 ; }",
        "add chain ip t nat-prerouting { type nat hook prerouting priority dstnat ; }",
        "add chain ip t nat-output { type nat hook output priority -100 ; }",
        "add chain ip t nat-postrouting { type nat hook postrouting priority srcnat ; }",
        "add rule ip t services ip daddr . meta l4proto . th dport vmap @service-ips",
        "add rule ip t services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        "add rule ip t cluster-ips-check ip daddr @cluster-ips goto reject-chain",
        "add rule ip t cluster-ips-check ip daddr 10.96.0.0/12 drop",
        "add rule ip t masquerading meta mark & 0x4000 == 0 return",
        "add rule ip t masquerading meta mark set meta mark ^ 0x4000",
        "add rule ip t masquerading masquerade fully-random",
        "add rule ip t mark-for-masquerade meta mark set meta mark | 0x4000",
        "add rule ip t reject-chain meta l4proto tcp reject with tcp reset",
        "add element ip t nodeport-ips { 192.0.2.2 }",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
}

#[test]
fn service_with_two_endpoints_golden() {
    let r = build(
        &layout(),
        &[web(&[("10.244.0.2", true), ("10.244.0.3", false)])],
    );
    let svc = "service-c7a03e88-ns/web/tcp/http";
    let eps = "endpoints-c7a03e88-ns/web/tcp/http";
    let ext = "external-c7a03e88-ns/web/tcp/http";
    let golden = format!(
        "add rule ip t {svc} ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
add rule ip t {svc} meta l4proto tcp dnat ip to numgen random mod 65536 map @{eps}
add rule ip t {ext} jump mark-for-masquerade
add rule ip t {ext} goto {svc}
add element ip t cluster-ips {{ 10.96.0.10 }}
add element ip t hairpin-endpoints {{ 10.244.0.2 . 10.244.0.2 }}
add element ip t hairpin-endpoints {{ 10.244.0.3 . 10.244.0.3 }}
add element ip t {eps} {{ 0-32767 : 10.244.0.2 . 8080 }}
add element ip t {eps} {{ 32768-65535 : 10.244.0.3 . 8080 }}
add element ip t service-ips {{ 10.96.0.10 . tcp . 80 : goto {svc} }}
add element ip t service-nodeports {{ tcp . 30080 : goto {ext} }}
"
    );
    let text = r.render_commands();
    let ours: String = text
        .lines()
        .filter(|l| {
            (l.starts_with("add rule") && l.contains("ns/web"))
                || (l.starts_with("add element") && !l.contains("nodeport-ips"))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let mut sorted_golden: Vec<&str> = golden.lines().collect();
    let mut sorted_ours: Vec<&str> = ours.lines().collect();
    sorted_golden.sort();
    sorted_ours.sort();
    assert_eq!(sorted_ours, sorted_golden, "{text}");
    assert!(text.contains(&format!(
        "add map ip t {eps} {{ typeof numgen random mod 65536 : ip daddr . tcp dport ; flags interval ; }}\n"
    )));
    // A pod reaching itself through a Service is masqueraded, whichever Service it was.
    assert_eq!(
        r.chains["masquerading"].rules[0].to_string(),
        "ct status dnat ip saddr . ip daddr @hairpin-endpoints jump mark-for-masquerade"
    );
}

#[test]
fn each_of_n_endpoints_gets_one_chance_in_n() {
    for n in 1..=12u32 {
        let eps: Vec<(String, bool)> = (1..=n).map(|i| (format!("10.244.0.{i}"), false)).collect();
        let eps: Vec<(&str, bool)> = eps.iter().map(|(s, l)| (s.as_str(), *l)).collect();
        let r = build(&layout(), &[web(&eps)]);
        let map = &r.endpoint_maps["endpoints-c7a03e88-ns/web/tcp/http"];
        let ranges: Vec<(u32, u32, Ipv4Addr, u16)> = map.ranges().collect();
        assert_eq!(ranges.len() as u32, n);
        // The ranges tile the random numbers in order, each endpoint once, in shares equal to
        // within one number.
        let mut next = 0;
        for (k, (first, last, ip, port)) in ranges.iter().enumerate() {
            assert_eq!(*first, next, "n={n}");
            assert_eq!(ip.to_string(), eps[k].0);
            assert_eq!(*port, 8080);
            let share = last - first + 1;
            assert!(share.abs_diff(ENDPOINT_RANGE / n) <= 1, "n={n}: {share}");
            next = last + 1;
        }
        assert_eq!(next, ENDPOINT_RANGE, "n={n}");
    }
}

#[test]
fn service_without_endpoints_is_rejected_not_dispatched() {
    let r = build(&layout(), &[web(&[])]);
    assert_eq!(
        lines_with(&r, "add element"),
        vec![
            "add element ip t cluster-ips { 10.96.0.10 }",
            "add element ip t nodeport-ips { 192.0.2.2 }",
            "add element ip t no-endpoint-nodeports { tcp . 30080 : goto reject-chain }",
            "add element ip t no-endpoint-services { 10.96.0.10 . tcp . 80 : goto reject-chain }",
        ]
    );
    assert!(lines_with(&r, "ns/web").is_empty());
}

#[test]
fn session_affinity_remembers_the_client_per_endpoint() {
    let mut sp = web(&[("10.244.0.2", false)]);
    sp.affinity_timeout = Some(60);
    sp.node_port = None;
    let r = build(&layout(), &[sp]);
    let set = "affinity-6c6c8a63-ns/web/tcp/http__10.244.0.2/8080";
    let ep = "endpoint-6c6c8a63-ns/web/tcp/http__10.244.0.2/8080";
    assert_eq!(
        lines_with(&r, "affinity-"),
        vec![
            format!(
                "add set ip t {set} {{ type ipv4_addr ; flags dynamic,timeout ; timeout 60s ; }}"
            ),
            format!("add rule ip t {ep} update @{set} {{ ip saddr }}"),
            format!("add rule ip t service-c7a03e88-ns/web/tcp/http ip saddr @{set} goto {ep}"),
        ]
    );
}

#[test]
fn local_policies_use_local_endpoints() {
    let mut sp = web(&[("10.244.0.2", true), ("10.244.0.3", false)]);
    sp.internal_local = true;
    sp.external_local = true;
    sp.external_ips = vec!["192.0.2.50".parse().unwrap()];
    let r = build(&layout(), &[sp.clone()]);
    let local = "local-c7a03e88-ns/web/tcp/http";
    let ext = "external-c7a03e88-ns/web/tcp/http";
    let local_eps = "local-endpoints-c7a03e88-ns/web/tcp/http";
    assert_eq!(
        r.chains[local].rules[1..]
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>(),
        [format!(
            "meta l4proto tcp dnat ip to numgen random mod 65536 map @{local_eps}"
        )]
    );
    assert_eq!(
        r.endpoint_maps[local_eps].targets,
        [("10.244.0.2".parse().unwrap(), 8080)]
    );
    assert_eq!(
        r.maps["service-ips"].elements[&key("10.96.0.10 . tcp . 80")].to_string(),
        format!("goto {local}")
    );
    assert_eq!(
        r.maps["service-ips"].elements[&key("192.0.2.50 . tcp . 80")].to_string(),
        format!("goto {ext}")
    );
    assert_eq!(
        r.chains[ext].rules.last().unwrap().to_string(),
        format!("goto {local}")
    );
    // No local endpoint: cluster and external traffic drop, as upstream.
    sp.endpoints.retain(|e| !e.local);
    let r = build(&layout(), &[sp]);
    assert_eq!(
        r.maps["no-endpoint-services"].elements[&key("10.96.0.10 . tcp . 80")].to_string(),
        "drop"
    );
    assert_eq!(
        r.maps["no-endpoint-nodeports"].elements[&key("tcp . 30080")].to_string(),
        "drop"
    );
    assert!(!r.chains.contains_key(local));
}

#[test]
fn removing_a_service_deletes_its_chains_and_elements() {
    let old = build(&layout(), &[web(&[("10.244.0.2", false)])]);
    let new = build(&layout(), &[]);
    let diff = new.render_diff(&old).unwrap();
    // Elements first, the map once no rule uses it, chains once flushed.
    assert_eq!(
        diff,
        "add table ip t
delete element ip t service-ips { 10.96.0.10 . tcp . 80 }
delete element ip t service-nodeports { tcp . 30080 }
delete element ip t cluster-ips { 10.96.0.10 }
delete element ip t hairpin-endpoints { 10.244.0.2 . 10.244.0.2 }
flush chain ip t external-c7a03e88-ns/web/tcp/http
flush chain ip t service-c7a03e88-ns/web/tcp/http
delete map ip t endpoints-c7a03e88-ns/web/tcp/http
delete chain ip t external-c7a03e88-ns/web/tcp/http
delete chain ip t service-c7a03e88-ns/web/tcp/http
"
    );
    assert!(!diff.contains("add rule"), "{diff}");
}
