//! The proxy on the real kernel: Services and hand-written EndpointSlices in an in-process API
//! server, busybox httpd backends in network namespaces, requests from the node and from a
//! client namespace. Every request goes to an address that the test checked the proxy's table
//! handles first (or to this machine's own address).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::*;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

fn web_service(bed: &Bed, name: &str, ip: u8, extra: serde_json::Value) -> serde_json::Value {
    let mut v = json!({"metadata": {"name": name},
        "spec": {"clusterIP": bed.service_ip(ip).to_string(),
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}});
    for (k, x) in extra.as_object().unwrap() {
        v["spec"][k] = x.clone();
    }
    v
}

/// A slice for Service `svc` with the bed's pods `ready[i]` ready (or not).
fn web_slice(bed: &Bed, svc: &str, ready: &[bool]) -> serde_json::Value {
    let eps: Vec<_> = bed
        .pods
        .iter()
        .zip(ready)
        .map(|(p, r)| json!({"addresses": [p.ip.to_string()], "conditions": {"ready": r}, "nodeName": "node-a"}))
        .collect();
    json!({"metadata": {"name": format!("{svc}-1"), "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps})
}

/// Bodies seen over `n` requests from the node.
async fn bodies(ip: std::net::Ipv4Addr, port: u16, n: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        seen.insert(
            get(ip, port)
                .await
                .unwrap_or_else(|e| format!("error: {e}")),
        );
    }
    seen
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ip_balances_over_ready_endpoints_and_rejects_without_them() -> Result<()> {
    let bed = Bed::new(2).await?;
    let client = bed.client().await?;
    create_service(&client, web_service(&bed, "web", 1, json!({}))).await?;
    create_slice(&client, web_slice(&bed, "web", &[true, true])).await?;
    create_service(&client, web_service(&bed, "empty", 2, json!({}))).await?;
    let _proxy = bed.start_proxy().await?;
    let (web, empty) = (bed.service_ip(1), bed.service_ip(2));
    bed.wait_element("service-ips", &format!("{web} . tcp . 80 : goto service-"))
        .await?;
    bed.wait_element(
        "no-endpoint-services",
        &format!("{empty} . tcp . 80 : goto reject-chain"),
    )
    .await?;

    // From the node: both backends answer over 30 requests.
    assert_eq!(bodies(web, 80, 30).await, set(&["b1", "b2"]));
    // From a namespace acting as another machine.
    let from_ns = get_from(&bed.client.netns, web, 80).await;
    assert!(
        matches!(from_ns.as_deref(), Ok("b1") | Ok("b2")),
        "{from_ns:?}"
    );

    // No endpoints: refused at once, not a timeout.
    let t0 = Instant::now();
    let e = get(empty, 80).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(1));
    let t0 = Instant::now();
    let e = get_from(&bed.client.netns, empty, 80).await.unwrap_err();
    assert!(e.contains("Couldn't connect"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(1));
    // A port the Service does not have on its ClusterIP: refused too.
    let e = get(web, 81).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let e = get_from(&bed.client.netns, web, 81).await.unwrap_err();
    assert!(e.contains("Couldn't connect"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readiness_flip_removes_and_restores_an_endpoint() -> Result<()> {
    let bed = Bed::new(2).await?;
    let client = bed.client().await?;
    create_service(&client, web_service(&bed, "web", 1, json!({}))).await?;
    create_slice(&client, web_slice(&bed, "web", &[true, true])).await?;
    let _proxy = bed.start_proxy().await?;
    let web = bed.service_ip(1);
    bed.wait_element("service-ips", &format!("{web} . tcp . 80 : goto service-"))
        .await?;
    assert_eq!(bodies(web, 80, 30).await, set(&["b1", "b2"]));

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let patch = |ready: bool| {
        let mut v = web_slice(&bed, "web", &[true, ready]);
        v["apiVersion"] = json!("discovery.k8s.io/v1");
        v["kind"] = json!("EndpointSlice");
        v
    };
    let b2 = bed.pods[1].ip.to_string();
    slices
        .patch(
            "web-1",
            &PatchParams::apply("test").force(),
            &Patch::Apply(patch(false)),
        )
        .await?;
    wait_for(Duration::from_secs(5), || !bed.table_text().contains(&b2)).await?;
    assert_eq!(bodies(web, 80, 20).await, set(&["b1"]));

    slices
        .patch(
            "web-1",
            &PatchParams::apply("test").force(),
            &Patch::Apply(patch(true)),
        )
        .await?;
    wait_for(Duration::from_secs(5), || bed.table_text().contains(&b2)).await?;
    assert_eq!(bodies(web, 80, 30).await, set(&["b1", "b2"]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_port_serves_the_node_address_from_the_node_and_from_outside() -> Result<()> {
    let bed = Bed::new(2).await?;
    let client = bed.client().await?;
    let np = bed.node_port(1);
    let mut svc = web_service(&bed, "web", 1, json!({"type": "NodePort"}));
    svc["spec"]["ports"][0]["nodePort"] = json!(np);
    create_service(&client, svc).await?;
    create_slice(&client, web_slice(&bed, "web", &[true, true])).await?;
    let _proxy = bed.start_proxy().await?;
    bed.wait_element("service-nodeports", &format!("tcp . {np} : goto external-"))
        .await?;
    assert!(bed.set("nodeport-ips").contains(&bed.node_ip().to_string()));

    assert_eq!(bodies(bed.node_ip(), np, 30).await, set(&["b1", "b2"]));
    let from_ns = get_from(&bed.client.netns, bed.node_ip(), np).await;
    assert!(
        matches!(from_ns.as_deref(), Ok("b1") | Ok("b2")),
        "{from_ns:?}"
    );
    // Never on 127.0.0.1 (as upstream's nftables mode): nothing listens there.
    let e = get("127.0.0.1".parse()?, np).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_reaches_itself_through_its_service() -> Result<()> {
    let bed = Bed::new(1).await?;
    let client = bed.client().await?;
    create_service(&client, web_service(&bed, "web", 3, json!({}))).await?;
    create_slice(&client, web_slice(&bed, "web", &[true])).await?;
    let _proxy = bed.start_proxy().await?;
    let web = bed.service_ip(3);
    bed.wait_element("service-ips", &format!("{web} . tcp . 80 : goto service-"))
        .await?;
    // Source == endpoint: without hairpin masquerade the reply would bypass the DNAT.
    let got = get_from(&bed.pods[0].netns, web, 80).await;
    assert_eq!(got.as_deref(), Ok("b1"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_affinity_keeps_a_client_on_one_endpoint() -> Result<()> {
    let bed = Bed::new(2).await?;
    let client = bed.client().await?;
    let svc = web_service(
        &bed,
        "web",
        4,
        json!({"sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
    );
    create_service(&client, svc).await?;
    create_slice(&client, web_slice(&bed, "web", &[true, true])).await?;
    let _proxy = bed.start_proxy().await?;
    let web = bed.service_ip(4);
    bed.wait_element("service-ips", &format!("{web} . tcp . 80 : goto service-"))
        .await?;
    let seen = bodies(web, 80, 20).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen == set(&["b1"]) || seen == set(&["b2"]), "{seen:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_service_removes_its_rules() -> Result<()> {
    let bed = Bed::new(1).await?;
    let client = bed.client().await?;
    create_service(&client, web_service(&bed, "web", 5, json!({}))).await?;
    create_slice(&client, web_slice(&bed, "web", &[true])).await?;
    let _proxy = bed.start_proxy().await?;
    let web = bed.service_ip(5);
    bed.wait_element("service-ips", &format!("{web} . tcp . 80 : goto service-"))
        .await?;
    assert_eq!(get(web, 80).await?, "b1");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services.delete("web", &DeleteParams::default()).await?;
    wait_for(Duration::from_secs(5), || {
        let t = bed.table_text();
        !t.contains("default/web") && !t.contains(&web.to_string()) && t.contains("chain services")
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_replaces_the_table_and_cleanup_removes_it() -> Result<()> {
    let bed = Bed::new(1).await?;
    let client = bed.client().await?;
    create_service(&client, web_service(&bed, "web", 6, json!({}))).await?;
    create_slice(&client, web_slice(&bed, "web", &[true])).await?;
    let web = bed.service_ip(6);
    let proxy = bed.start_proxy().await?;
    bed.wait_element("service-ips", &format!("{web} . tcp . 80 : goto service-"))
        .await?;
    drop(proxy);
    // Stopped: the rules stay and still serve.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get(web, 80).await?, "b1");

    // Leftovers a previous run may have had: a stale chain and a stale element.
    sh_ok(&format!(
        "nft 'add chain ip {t} service-stale; add element ip {t} no-endpoint-services {{ {web} . tcp . 99 : drop }}'",
        t = bed.table
    ));
    let _proxy = bed.start_proxy().await?;
    wait_for(Duration::from_secs(10), || {
        let t = bed.table_text();
        !t.contains("service-stale") && !t.contains(". tcp . 99")
    })
    .await?;
    assert_eq!(get(web, 80).await?, "b1");

    proxy::cleanup(&bed.table).await?;
    assert_eq!(bed.table_text(), "");
    // Twice is fine.
    proxy::cleanup(&bed.table).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_move_off_a_removed_endpoint() -> Result<()> {
    let mut bed = Bed::new(2).await?;
    bed.udp_server(0, 5353)?;
    bed.udp_server(1, 5353)?;
    let client = bed.client().await?;
    let dns = bed.service_ip(7);
    create_service(
        &client,
        json!({"metadata": {"name": "dns"}, "spec": {"clusterIP": dns.to_string(),
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}}),
    )
    .await?;
    let slice_with = |pod: usize| {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "dns-1", "labels": {"kubernetes.io/service-name": "dns"}},
            "addressType": "IPv4",
            "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [{"addresses": [bed.pods[pod].ip.to_string()]}]})
    };
    create_slice(&client, slice_with(0)).await?;
    let _proxy = bed.start_proxy().await?;
    bed.wait_element("service-ips", &format!("{dns} . udp . 53 : goto service-"))
        .await?;
    // One socket, one flow: its conntrack entry pins it to the endpoint it first reached.
    let sock = tokio::net::UdpSocket::bind((bed.client.host_ip, 0)).await?;
    assert_eq!(udp_ask(&sock, dns, 53).await.as_deref(), Some("b1"));
    assert_eq!(udp_ask(&sock, dns, 53).await.as_deref(), Some("b1"));

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    slices
        .patch(
            "dns-1",
            &PatchParams::apply("test").force(),
            &Patch::Apply(slice_with(1)),
        )
        .await?;
    let b1 = bed.pods[0].ip.to_string();
    wait_for(Duration::from_secs(5), || !bed.table_text().contains(&b1)).await?;
    // b1 still runs: only a deleted conntrack entry moves the flow to b2.
    let mut got = None;
    for _ in 0..20 {
        got = udp_ask(&sock, dns, 53).await;
        if got.as_deref() == Some("b2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got.as_deref(), Some("b2"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_reaches_a_pod_on_its_bridge_through_a_service() -> Result<()> {
    let mut bed = Bed::new(0).await?;
    let (_p1, p2) = bed.bridged_pods()?;
    let client = bed.client().await?;
    let web = bed.service_ip(8);
    create_service(
        &client,
        json!({"metadata": {"name": "web"}, "spec": {"clusterIP": web.to_string(),
        "ports": [{"port": 80, "targetPort": 8080}]}}),
    )
    .await?;
    create_slice(&client, json!({"metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"port": 8080}], "endpoints": [{"addresses": [p2.to_string()]}]}))
    .await?;
    let _proxy = bed.start_proxy().await?;
    bed.wait_element("service-ips", &format!("{web} . tcp . 80 : goto service-"))
        .await?;
    // The reply p2 -> p1 is bridged, not routed: only br_netfilter lets conntrack undo the DNAT.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")?.trim(),
        "1"
    );
    let netns = format!("oxp-{}-p1", bed.x);
    for _ in 0..5 {
        assert_eq!(get_from(&netns, web, 80).await.as_deref(), Ok("p2"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_ips_are_served() -> Result<()> {
    let bed = Bed::new(2).await?;
    let client = bed.client().await?;
    // An address of the bed's service network that no Service owns as its ClusterIP.
    let ext = bed.service_ip(14);
    create_service(
        &client,
        web_service(&bed, "web", 9, json!({"externalIPs": [ext.to_string()]})),
    )
    .await?;
    create_slice(&client, web_slice(&bed, "web", &[true, true])).await?;
    let _proxy = bed.start_proxy().await?;
    bed.wait_element("service-ips", &format!("{ext} . tcp . 80 : goto external-"))
        .await?;
    assert_eq!(bodies(ext, 80, 30).await, set(&["b1", "b2"]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_traffic_policies_keep_traffic_on_local_endpoints() -> Result<()> {
    let bed = Bed::new(2).await?;
    let client = bed.client().await?;
    let np = bed.node_port(2);
    let mut svc = web_service(
        &bed,
        "web",
        10,
        json!({"type": "NodePort", "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local"}),
    );
    svc["spec"]["ports"][0]["nodePort"] = json!(np);
    create_service(&client, svc).await?;
    // b1 runs on this node (node-a), b2 on another.
    let mut slice = web_slice(&bed, "web", &[true, true]);
    slice["endpoints"][1]["nodeName"] = json!("node-b");
    create_slice(&client, slice).await?;
    let _proxy = bed.start_proxy().await?;
    let web = bed.service_ip(10);
    bed.wait_element("service-ips", &format!("{web} . tcp . 80 : goto local-"))
        .await?;
    bed.wait_element("service-nodeports", &format!("tcp . {np} : goto external-"))
        .await?;
    assert_eq!(bodies(web, 80, 20).await, set(&["b1"]));
    // From another machine, a Local NodePort goes to this node's endpoints only.
    for _ in 0..10 {
        let got = get_from(&bed.client.netns, bed.node_ip(), np).await;
        assert_eq!(got.as_deref(), Ok("b1"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_periodic_full_sync_repairs_the_table() -> Result<()> {
    let bed = Bed::new(1).await?;
    let client = bed.client().await?;
    create_service(&client, web_service(&bed, "web", 11, json!({}))).await?;
    create_slice(&client, web_slice(&bed, "web", &[true])).await?;
    let mut cfg = bed.config();
    cfg.full_sync_period = Duration::from_millis(500);
    let _proxy = ProxyTask(tokio::spawn(proxy::run(client, cfg)));
    let web = bed.service_ip(11);
    let key = format!("{web} . tcp . 80 : goto service-");
    bed.wait_element("service-ips", &key).await?;
    // Someone else removes the table; no Service changes, yet it comes back.
    proxy::cleanup(&bed.table).await?;
    assert_eq!(bed.table_text(), "");
    bed.wait_element("service-ips", &key).await?;
    assert_eq!(get(web, 80).await?, "b1");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_node_port_addresses_come_from_the_node_object() -> Result<()> {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::PostParams;
    let bed = Bed::new(0).await?;
    let client = bed.client().await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "node-a"}}))?;
    nodes.create(&PostParams::default(), &node).await?;
    // One InternalIP of this machine, one that is not (ignored), one ExternalIP (ignored).
    let status = json!({"status": {"addresses": [
        {"type": "InternalIP", "address": bed.node_ip().to_string()},
        {"type": "InternalIP", "address": "192.0.2.254"},
        {"type": "ExternalIP", "address": "127.0.0.1"}]}});
    nodes
        .patch_status("node-a", &PatchParams::default(), &Patch::Merge(status))
        .await?;
    let mut cfg = bed.config();
    cfg.nodeport_addresses = proxy::NodePortAddresses::Primary;
    let _proxy = ProxyTask(tokio::spawn(proxy::run(client, cfg)));
    wait_for(Duration::from_secs(10), || {
        bed.set("nodeport-ips").contains("elements")
    })
    .await?;
    let set = bed.set("nodeport-ips");
    assert!(
        set.contains(&format!("elements = {{ {} }}", bed.node_ip())),
        "{set}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unallocated_service_addresses_are_dropped_not_routed() -> Result<()> {
    let bed = Bed::new(0).await?;
    let unallocated = bed.service_ip(13);
    let dev = bed.client.host_if.clone();
    // Whether the node tried to send to the address on its route (it resolves the neighbor).
    let routed = || {
        let out = sh_ok(&format!("ip neigh show {unallocated} dev {dev}"));
        !out.trim().is_empty()
    };
    let attempt = || async {
        let _ = get(unallocated, 80).await;
        let _ = tokio::process::Command::new("ip")
            .args(["netns", "exec", &bed.client.netns, "curl", "-sS", "-m", "1"])
            .arg(format!("http://{unallocated}/"))
            .output()
            .await;
    };
    // Without the proxy the node routes it (here into the client namespace, never further).
    attempt().await;
    assert!(routed(), "the control attempt was not routed");
    sh_ok(&format!("ip neigh flush dev {dev}"));

    let client = bed.client().await?;
    create_service(&client, web_service(&bed, "web", 1, json!({}))).await?;
    let _proxy = bed.start_proxy().await?;
    bed.wait_element(
        "no-endpoint-services",
        &format!("{} . tcp . 80", bed.service_ip(1)),
    )
    .await?;
    attempt().await;
    assert!(!routed(), "{}", sh_ok(&format!("ip neigh show dev {dev}")));
    Ok(())
}
