//! What the proxy shows of itself and cleans up after: /metrics and /healthz of a running proxy,
//! and stale UDP conntrack entries deleted through conntrack netlink.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use common::*;
use proxy::conntrack::{self, StaleFlow};
use proxy::layout::{self, Layout};
use proxy::model::{Endpoint, Protocol, ServicePort, ServicePortName};
use proxy::sync::Syncer;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A port on 127.0.0.1 that nothing listens on right now.
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// GET `path` from `addr`: the status code and the body.
async fn get_http(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let (head, body) = out.split_once("\r\n\r\n").context("an HTTP answer")?;
    let code = head.split(' ').nth(1).context("a status line")?.parse()?;
    Ok((code, body.to_string()))
}

/// The value of an unlabelled sample in Prometheus text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz_tell_how_syncs_go() -> Result<()> {
    let bed = Bed::new(2).await?;
    let client = bed.client().await?;
    let ip = bed.service_ip(1);
    create_service(
        &client,
        json!({"metadata": {"name": "web"}, "spec": {"clusterIP": ip.to_string(),
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
    )
    .await?;
    let mut cfg = bed.config();
    let (metrics, healthz) = (free_port(), free_port());
    cfg.metrics_bind_address = Some(metrics);
    cfg.healthz_bind_address = Some(healthz);
    let _proxy = ProxyTask(tokio::spawn(proxy::run(client.clone(), cfg)));
    bed.wait_element(
        "no-endpoint-services",
        &format!("{ip} . tcp . 80 : goto reject-chain"),
    )
    .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        if let Ok((200, body)) = get_http(metrics, "/metrics").await {
            if sample(&body, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= Some(1.0) {
                break body;
            }
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "/metrics never counted a sync"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let last = sample(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").unwrap();
    assert!((now - last).abs() < 60.0, "{text}");
    assert!(
        sample(&text, "kubeproxy_sync_full_proxy_rules_total") >= Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "oxlet_proxy_nftables_rules_applied_total") >= Some(10.0),
        "{text}"
    );
    assert!(
        sample(&text, "oxlet_proxy_nftables_elements_applied_total") >= Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total"
        ),
        Some(0.0)
    );
    assert!(text.contains("# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram"));

    // An endpoint appears: one more sync, partial.
    create_slice(
        &client,
        json!({"metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [bed.pods[0].ip.to_string()]}]}),
    )
    .await?;
    bed.wait_element("service-ips", &format!("{ip} . tcp . 80 : goto service-"))
        .await?;
    let (code, text) = get_http(metrics, "/metrics").await?;
    assert_eq!(code, 200);
    assert!(
        sample(&text, "kubeproxy_sync_partial_proxy_rules_total") >= Some(1.0),
        "{text}"
    );

    let (code, body) = get_http(healthz, "/healthz").await?;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["nodeEligible"], true);
    for field in ["lastUpdated", "currentTime"] {
        let t = v[field].as_str().unwrap_or_default();
        assert!(
            chrono::DateTime::parse_from_rfc3339(t).is_ok(),
            "{field}: {body}"
        );
    }
    assert_eq!(get_http(healthz, "/nope").await?.0, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_udp_entries_are_deleted_through_conntrack_netlink() -> Result<()> {
    let mut bed = Bed::new(2).await?;
    bed.udp_server(0, 5353)?;
    let dns = bed.service_ip(9);
    let b1 = bed.pods[0].ip;
    let port = ServicePort {
        id: ServicePortName {
            namespace: "default".into(),
            name: "dns".into(),
            port: "dns".into(),
            protocol: Protocol::Udp,
        },
        cluster_ip: dns,
        port: 53,
        node_port: None,
        external_ips: vec![],
        affinity_timeout: None,
        external_local: false,
        internal_local: false,
        endpoints: vec![Endpoint {
            ip: b1,
            port: 5353,
            local: false,
        }],
    };
    let lay = Layout {
        table: bed.table.clone(),
        service_cidr: bed.service_cidr().parse()?,
        cluster_cidr: bed.cluster_cidr().parse()?,
        nodeport_ips: vec![bed.node_ip()],
    };
    Syncer::new().sync(layout::build(&lay, &[port])).await?;
    let sock = tokio::net::UdpSocket::bind((bed.client.host_ip, 0)).await?;
    assert_eq!(udp_ask(&sock, dns, 53).await.as_deref(), Some("b1"));
    let src_port = sock.local_addr()?.port();
    // This flow's entry, as the conntrack tool lists it (only to look).
    let listed = || {
        sh(&format!(
            "conntrack -L -p udp --orig-dst {dns} --orig-port-src {src_port} 2>/dev/null"
        ))
        .stdout
    };
    let entry = String::from_utf8_lossy(&listed()).into_owned();
    assert!(entry.contains(&format!("src={b1}")), "{entry}");
    let flow = |endpoint: Ipv4Addr, port: u16| StaleFlow {
        service: Some(dns),
        port,
        endpoint,
    };
    // Other endpoints' and other ports' flows are not this one.
    conntrack::clear(&[flow(bed.pods[1].ip, 53), flow(b1, 54)]).await;
    assert!(
        !listed().is_empty(),
        "an unrelated flow's entry was deleted"
    );
    conntrack::clear(&[flow(b1, 53)]).await;
    assert!(
        listed().is_empty(),
        "{}",
        String::from_utf8_lossy(&listed())
    );
    Ok(())
}
