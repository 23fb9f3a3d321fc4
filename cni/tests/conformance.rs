//! The client driving oxlet-bridge and the reference bridge+host-local (+portmap): the same
//! tests, two implementations.

mod common;

use common::*;
use serde_json::json;

#[test]
fn two_pods_reach_each_other_and_the_node_over_tcp() {
    for imp in BOTH {
        let f = Fixture::new();
        let net = f.list(imp, vec![f.bridge_conf(imp, json!({}))]);
        let c = f.client(imp);
        let (a, b) = (f.netns(), f.netns());
        let ra = c.add(&net, &rt("pod-a", &a)).unwrap();
        let rb = c.add(&net, &rt("pod-b", &b)).unwrap();
        let (ipa, ipb) = (pod_ip(&ra), pod_ip(&rb));
        assert_ne!(ipa, ipb, "{imp:?}");
        assert_eq!(ra.interfaces[2].sandbox, a, "{imp:?}");

        let srv = serve_once(Some(&b), &format!("{ipb}:7001"));
        assert_eq!(
            talk(Some(&a), &format!("{ipb}:7001"), "a->b").unwrap(),
            "pong:a->b",
            "{imp:?}"
        );
        srv.join().unwrap();

        let srv = serve_once(None, &format!("{}:7002", f.gateway()));
        assert_eq!(
            talk(Some(&a), &format!("{}:7002", f.gateway()), "pod->node").unwrap(),
            "pong:pod->node",
            "{imp:?}"
        );
        srv.join().unwrap();

        let srv = serve_once(Some(&a), &format!("{ipa}:7003"));
        assert_eq!(
            talk(None, &format!("{ipa}:7003"), "node->pod").unwrap(),
            "pong:node->pod",
            "{imp:?}"
        );
        srv.join().unwrap();

        c.del(&net, &rt("pod-a", &a)).unwrap();
        c.del(&net, &rt("pod-b", &b)).unwrap();
        assert!(f.ip_files().is_empty(), "{imp:?}: {:?}", f.ip_files());
        f.eventually("ports gone", || f.ports().is_empty());
    }
}

#[test]
fn a_pod_reaches_itself_through_a_service_via_hairpin() {
    for imp in BOTH {
        let f = Fixture::new();
        let net = f.list(imp, vec![f.bridge_conf(imp, json!({}))]);
        let c = f.client(imp);
        let a = f.netns();
        let r = c.add(&net, &rt("pod-hp", &a)).unwrap();
        let ip = pod_ip(&r);
        let port = &r.interfaces[1].name;
        assert_eq!(
            sh_ok(&format!("cat /sys/class/net/{port}/brport/hairpin_mode")).trim(),
            "1",
            "{imp:?}"
        );
        // A ClusterIP-like DNAT to the pod itself, masqueraded because source == endpoint.
        let vip = format!("10.243.{}.1", f.x as u32 + 128);
        let t = format!("oxt-hp-{}", f.x);
        sh_ok(&format!(
            "nft -f - <<'EOF'\ntable ip {t} {{\n chain pre {{ type nat hook prerouting priority dstnat; ip daddr {vip} tcp dport 80 dnat to {ip}:8080; }}\n \
             chain post {{ type nat hook postrouting priority srcnat; ip saddr {ip} ip daddr {ip} masquerade; }}\n}}\nEOF"
        ));
        let srv = serve_once(Some(&a), "0.0.0.0:8080");
        let reply = talk(Some(&a), &format!("{vip}:80"), "me");
        sh_ok(&format!("nft delete table ip {t}"));
        assert_eq!(reply.unwrap(), "pong:me", "{imp:?}");
        srv.join().unwrap();
        c.del(&net, &rt("pod-hp", &a)).unwrap();
    }
}

#[test]
fn check_detects_a_removed_address() {
    for imp in BOTH {
        let f = Fixture::new();
        let net = f.list(imp, vec![f.bridge_conf(imp, json!({}))]);
        let c = f.client(imp);
        let a = f.netns();
        let r = c.add(&net, &rt("pod-chk", &a)).unwrap();
        c.check(&net, &rt("pod-chk", &a))
            .unwrap_or_else(|e| panic!("{imp:?}: {e}"));
        // An agent restart: a new client reads the cached result.
        let c2 = f.client(imp);
        c2.check(&net, &rt("pod-chk", &a)).unwrap();
        let ns = a.trim_start_matches("/run/netns/");
        sh_ok(&format!(
            "ip -n {ns} addr del {} dev eth0",
            r.ips[0].address
        ));
        let e = c2.check(&net, &rt("pod-chk", &a)).unwrap_err();
        assert!(
            e.to_string().contains(&pod_ip(&r)) || e.to_string().to_lowercase().contains("address"),
            "{imp:?}: {e}"
        );
        c2.del(&net, &rt("pod-chk", &a)).unwrap();
        assert!(f.ip_files().is_empty());
    }
}

#[test]
fn gc_cleans_stale_attachments() {
    for imp in BOTH {
        let f = Fixture::new();
        let net = f.list(imp, vec![f.bridge_conf(imp, json!({}))]);
        let c = f.client(imp);
        let ids = ["gc-keep", "gc-old1", "gc-old2"];
        let mut results = vec![];
        for id in ids {
            let ns = f.netns();
            results.push(c.add(&net, &rt(id, &ns)).unwrap());
        }
        assert_eq!(f.ip_files().len(), 3);
        let keep = cni::types::Attachment {
            container_id: "gc-keep".into(),
            ifname: "eth0".into(),
        };
        c.gc(&net, std::slice::from_ref(&keep))
            .unwrap_or_else(|e| panic!("{imp:?}: {e}"));
        assert_eq!(f.ip_files(), vec![pod_ip(&results[0])], "{imp:?}");
        f.eventually("stale ports gone", || {
            f.ports() == vec![results[0].interfaces[1].name.clone()]
        });
        assert_eq!(c.cached_attachments(&net).len(), 1);
        c.gc(&net, &[]).unwrap();
        assert!(f.ip_files().is_empty());
    }
}

#[test]
fn port_mappings_reach_portmap_through_runtime_config() {
    for imp in BOTH {
        let f = Fixture::new();
        let portmap = json!({"type": "portmap", "capabilities": {"portMappings": true}});
        // The reference portmap speaks up to 1.0.0.
        let net = f.list_v("1.0.0", vec![f.bridge_conf(imp, json!({})), portmap]);
        let c = f.client(imp);
        let a = f.netns();
        let host_port = 30000 + f.x as u16;
        let mut r = rt("pod-pm", &a);
        r.capability_args.insert(
            "portMappings".into(),
            json!([{"hostPort": host_port, "containerPort": 80, "protocol": "tcp"}]),
        );
        c.add(&net, &r).unwrap_or_else(|e| panic!("{imp:?}: {e}"));
        let srv = serve_once(Some(&a), "0.0.0.0:80");
        let reply = talk(None, &format!("{}:{host_port}", f.gateway()), "hostport");
        c.del(&net, &rt("pod-pm", &a)).unwrap();
        assert_eq!(reply.unwrap(), "pong:hostport", "{imp:?}");
        srv.join().unwrap();
        let rules = sh_ok("iptables-save -t nat");
        assert!(
            !rules.contains(&format!("--dport {host_port}")),
            "{imp:?}: portmap rule left after DEL"
        );
    }
    remove_portmap_leftovers();
}

/// The reference portmap keeps its shared chains (and iptables-nft its `nat` tables) after the
/// last DEL: remove them when no pod uses them any more.
fn remove_portmap_leftovers() {
    let _ = sh("iptables -t nat -S CNI-HOSTPORT-DNAT 2>/dev/null | grep -q -- '-A CNI-HOSTPORT-DNAT' || { \
        iptables -t nat -D PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT; \
        iptables -t nat -D OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT; \
        iptables -t nat -D POSTROUTING -m comment --comment 'CNI portfwd requiring masquerade' -j CNI-HOSTPORT-MASQ; \
        for c in CNI-HOSTPORT-DNAT CNI-HOSTPORT-MASQ CNI-HOSTPORT-SETMARK; do iptables -t nat -F $c; iptables -t nat -X $c; done; } 2>/dev/null; \
        iptables-save -t nat | grep -q '^-A' || nft delete table ip nat 2>/dev/null; \
        ip6tables-save -t nat | grep -q '^-A' || nft delete table ip6 nat 2>/dev/null; true");
}

#[test]
fn loopback_plugin_through_the_client() {
    // Runtimes attach `lo` as its own network with the reference loopback plugin.
    let f = Fixture::new();
    let a = f.netns();
    let ns = a.trim_start_matches("/run/netns/").to_string();
    let lo = cni::client::NetworkConfigList::parse(
        br#"{"cniVersion":"1.0.0","name":"oxt-lo","plugins":[{"type":"loopback"}]}"#,
        std::path::Path::new("lo"),
    )
    .unwrap();
    let c = f.client(Impl::Reference);
    let mut r = rt("pod-lo", &a);
    r.ifname = "lo".into();
    c.add(&lo, &r).unwrap();
    assert!(sh_ok(&format!("ip -n {ns} link show lo")).contains(",UP"));
    c.check(&lo, &r).unwrap();
    c.del(&lo, &r).unwrap();
    assert!(c.cached_attachments(&lo).is_empty());
}

#[test]
fn switching_between_the_plugins_keeps_allocations() {
    let f = Fixture::new();
    // One network, one version (the reference reads results up to 1.0.0), two plugins.
    let ox = f.list_v("1.0.0", vec![f.bridge_conf(Impl::Oxlet, json!({}))]);
    let rf = f.list_v("1.0.0", vec![f.bridge_conf(Impl::Reference, json!({}))]);
    let (cox, crf) = (f.client(Impl::Oxlet), f.client(Impl::Reference));
    let (a, b) = (f.netns(), f.netns());
    let ra = crf.add(&rf, &rt("sw-a", &a)).unwrap();
    let rb = cox.add(&ox, &rt("sw-b", &b)).unwrap();
    assert_ne!(
        pod_ip(&ra),
        pod_ip(&rb),
        "oxlet-bridge sees the reference's allocation"
    );
    let file = f.data.path().join(&f.name).join(pod_ip(&rb));
    assert_eq!(
        std::fs::read_to_string(file).unwrap(),
        "sw-b\r\neth0",
        "the reference's file layout"
    );
    // Each plugin checks and deletes what the other one made.
    cox.check(&ox, &rt("sw-a", &a)).unwrap();
    crf.check(&rf, &rt("sw-b", &b)).unwrap();
    cox.del(&ox, &rt("sw-a", &a)).unwrap();
    crf.del(&rf, &rt("sw-b", &b)).unwrap();
    assert!(f.ip_files().is_empty(), "{:?}", f.ip_files());
    f.eventually("ports gone", || f.ports().is_empty());
}

#[test]
fn dual_stack_pods_talk_over_ipv6() {
    for imp in BOTH {
        let f = Fixture::new();
        let v6 = format!("fd00:243:{}::/64", f.x);
        let ranges = json!({"ipam": {"ranges": [[{"subnet": f.subnet()}], [{"subnet": v6}]]}});
        let net = f.list(imp, vec![f.bridge_conf(imp, ranges)]);
        let c = f.client(imp);
        let (a, b) = (f.netns(), f.netns());
        c.add(&net, &rt("v6-a", &a)).unwrap();
        let rb = c.add(&net, &rt("v6-b", &b)).unwrap();
        assert_eq!(rb.ips.len(), 2, "{imp:?}");
        let ip6 = rb.ips[1].address.split('/').next().unwrap().to_string();
        assert!(ip6.starts_with("fd00:243:"), "{imp:?}: {ip6}");
        let srv = serve_once(Some(&b), "[::]:7005");
        // The reference leaves duplicate address detection on: wait for it.
        let t = std::time::Instant::now();
        let reply = loop {
            match talk(Some(&a), &format!("[{ip6}]:7005"), "v6") {
                Ok(r) => break r,
                Err(e) if t.elapsed() < std::time::Duration::from_secs(5) => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => panic!("{imp:?}: {e}"),
            }
        };
        assert_eq!(reply, "pong:v6", "{imp:?}");
        srv.join().unwrap();
        c.del(&net, &rt("v6-a", &a)).unwrap();
        c.del(&net, &rt("v6-b", &b)).unwrap();
        assert!(f.ip_files().is_empty(), "{imp:?}");
    }
}

#[test]
fn other_ipam_types_are_delegated_through_cni_path() {
    let f = Fixture::new();
    let ipam = json!({"ipam": {
        "type": "static",
        "addresses": [{"address": format!("10.243.{}.77/24", f.x), "gateway": f.gateway()}],
        "routes": [{"dst": "0.0.0.0/0"}]
    }});
    let mut conf = f.bridge_conf(Impl::Oxlet, ipam);
    conf["ipam"].as_object_mut().unwrap().remove("ranges");
    conf["ipam"].as_object_mut().unwrap().remove("dataDir");
    let net = f.list_v("1.0.0", vec![conf]);
    let c = f.client(Impl::Oxlet);
    let a = f.netns();
    let r = c.add(&net, &rt("static-a", &a)).unwrap();
    assert_eq!(pod_ip(&r), format!("10.243.{}.77", f.x));
    let ns = a.trim_start_matches("/run/netns/");
    assert!(sh_ok(&format!("ip -n {ns} addr show eth0")).contains(&format!("10.243.{}.77/24", f.x)));
    assert!(sh_ok(&format!("ip -n {ns} route")).contains(&format!("default via {}", f.gateway())));
    c.check(&net, &rt("static-a", &a)).unwrap();
    c.del(&net, &rt("static-a", &a)).unwrap();
    f.eventually("port gone", || f.ports().is_empty());
}
