//! The syncer on the real kernel: partial transactions leave exactly what a full one would,
//! a refused partial one is retried in full, and clients see no failure while it syncs.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use common::*;
use proxy::layout::{self, Layout};
use proxy::model::{Endpoint, Protocol, ServicePort, ServicePortName};
use proxy::ruleset::Ruleset;
use proxy::sync::{Applied, Backend, Syncer};
use serde_json::Value;

fn layout(bed: &Bed) -> Layout {
    Layout {
        table: bed.table.clone(),
        service_cidr: bed.service_cidr().parse().unwrap(),
        cluster_cidr: bed.cluster_cidr().parse().unwrap(),
        nodeport_ips: vec![bed.node_ip()],
    }
}

fn port(bed: &Bed, name: &str, ip: u8, eps: &[(Ipv4Addr, bool)]) -> ServicePort {
    ServicePort {
        id: ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port: "http".into(),
            protocol: Protocol::Tcp,
        },
        cluster_ip: bed.service_ip(ip),
        port: 80,
        node_port: None,
        external_ips: vec![],
        affinity_timeout: None,
        external_local: false,
        internal_local: false,
        endpoints: eps
            .iter()
            .map(|(ip, local)| Endpoint {
                ip: *ip,
                port: 8080,
                local: *local,
            })
            .collect(),
    }
}

/// The kernel's table, independent of handles and of the order things were added in.
fn kernel_state(table: &str) -> BTreeMap<String, Value> {
    let out = sh_ok(&format!("nft -j list table ip {table}"));
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut state = BTreeMap::new();
    let mut rules: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for item in v["nftables"].as_array().unwrap() {
        let Some((kind, body)) = item.as_object().unwrap().iter().next() else {
            continue;
        };
        let mut body = body.clone();
        if let Some(o) = body.as_object_mut() {
            o.remove("handle");
        }
        match kind.as_str() {
            "rule" => rules
                .entry(body["chain"].as_str().unwrap().to_string())
                .or_default()
                .push(body["expr"].clone()),
            "set" | "map" | "chain" => {
                if let Some(elem) = body.get_mut("elem").and_then(Value::as_array_mut) {
                    elem.sort_by_key(|e| e.to_string());
                }
                state.insert(format!("{kind} {}", body["name"]), body);
            }
            _ => {}
        }
    }
    for (chain, r) in rules {
        state.insert(format!("rules {chain}"), Value::Array(r));
    }
    state
}

/// A varied state: one of three services gets affinity, one NodePort and external IPs with a
/// Local policy, one has no endpoints.
fn state_a(bed: &Bed) -> Ruleset {
    layout::build(&layout(bed), &ports_a(bed))
}

fn ports_a(bed: &Bed) -> Vec<ServicePort> {
    let (b1, b2) = (bed.pods[0].ip, bed.pods[1].ip);
    let mut web = port(bed, "web", 1, &[(b1, true), (b2, false)]);
    web.node_port = Some(bed.node_port(1));
    web.external_ips = vec![bed.service_ip(14)];
    web.external_local = true;
    let mut sticky = port(bed, "sticky", 2, &[(b1, false), (b2, false)]);
    sticky.affinity_timeout = Some(30);
    let empty = port(bed, "empty", 3, &[]);
    vec![web, sticky, empty]
}

/// state_a changed: web loses an endpoint, sticky is gone, empty gets one, a new one appears.
fn state_b(bed: &Bed) -> Ruleset {
    layout::build(&layout(bed), &ports_b(bed))
}

fn ports_b(bed: &Bed) -> Vec<ServicePort> {
    let (b1, b2) = (bed.pods[0].ip, bed.pods[1].ip);
    let mut web = port(bed, "web", 1, &[(b1, true)]);
    web.node_port = Some(bed.node_port(1));
    let empty = port(bed, "empty", 3, &[(b2, false)]);
    let new = port(bed, "new", 4, &[(b1, false), (b2, false)]);
    vec![web, empty, new]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_syncs_leave_what_a_full_sync_would() -> Result<()> {
    let bed = Bed::new(2).await?;
    let mut syncer = Syncer::new();
    assert_eq!(syncer.sync(state_a(&bed)).await?, Applied::Full);
    let full_a = kernel_state(&bed.table);
    assert_eq!(syncer.sync(state_a(&bed)).await?, Applied::Unchanged);
    assert_eq!(syncer.sync(state_b(&bed)).await?, Applied::Partial);
    let partial_b = kernel_state(&bed.table);
    assert_eq!(syncer.sync(state_a(&bed)).await?, Applied::Partial);
    assert_eq!(kernel_state(&bed.table), full_a);
    assert_eq!(Syncer::new().sync(state_b(&bed)).await?, Applied::Full);
    assert_eq!(partial_b, kernel_state(&bed.table));
    assert!(partial_b.keys().any(|k| k.contains("default/new/")));
    assert!(!partial_b.keys().any(|k| k.contains("default/sticky/")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_service_syncs_leave_what_a_full_sync_would() -> Result<()> {
    let bed = Bed::new(2).await?;
    let lay = layout(&bed);
    let mut syncer = Syncer::new();
    assert_eq!(syncer.sync_ports(&lay, ports_a(&bed)).await?, Applied::Full);
    let full_a = kernel_state(&bed.table);
    assert_eq!(Syncer::new().sync(state_a(&bed)).await?, Applied::Full);
    assert_eq!(kernel_state(&bed.table), full_a);
    // The table is back to what `syncer` wrote; it goes on from there.
    assert_eq!(
        syncer.sync_ports(&lay, ports_a(&bed)).await?,
        Applied::Unchanged
    );
    assert_eq!(
        syncer.sync_ports(&lay, ports_b(&bed)).await?,
        Applied::Partial
    );
    let partial_b = kernel_state(&bed.table);
    assert_eq!(
        syncer.sync_ports(&lay, ports_a(&bed)).await?,
        Applied::Partial
    );
    assert_eq!(kernel_state(&bed.table), full_a);
    // New endpoints replace a map's elements and write no rule: the kernel re-validates the
    // table's chain graph for a rule, not for data elements.
    let mut moved = ports_a(&bed);
    moved[0].endpoints.reverse();
    assert_eq!(syncer.sync_ports(&lay, moved).await?, Applied::Partial);
    assert_eq!(syncer.written.rules, 0, "{:?}", syncer.written);
    assert!(syncer.written.elements >= 2, "{:?}", syncer.written);
    assert_eq!(
        syncer.sync_ports(&lay, ports_a(&bed)).await?,
        Applied::Partial
    );
    assert_eq!(kernel_state(&bed.table), full_a);
    assert_eq!(Syncer::new().sync(state_b(&bed)).await?, Applied::Full);
    assert_eq!(partial_b, kernel_state(&bed.table));
    // Refused (an element it deletes is gone): retried in full.
    let mut syncer = Syncer::new();
    syncer.sync_ports(&lay, ports_a(&bed)).await?;
    sh_ok(&format!(
        "nft delete element ip {} service-ips '{{ {} . tcp . 80 }}'",
        bed.table,
        bed.service_ip(2)
    ));
    assert_eq!(syncer.sync_ports(&lay, ports_b(&bed)).await?, Applied::Full);
    assert_eq!(partial_b, kernel_state(&bed.table));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_partial_sync_is_retried_in_full() -> Result<()> {
    let bed = Bed::new(2).await?;
    let mut syncer = Syncer::new();
    syncer.sync(state_a(&bed)).await?;
    // Someone removed an element the next diff deletes: nft refuses that transaction.
    sh_ok(&format!(
        "nft delete element ip {} service-ips '{{ {} . tcp . 80 }}'",
        bed.table,
        bed.service_ip(2)
    ));
    assert_eq!(syncer.sync(state_b(&bed)).await?, Applied::Full);
    let after = kernel_state(&bed.table);
    assert_eq!(Syncer::new().sync(state_b(&bed)).await?, Applied::Full);
    assert_eq!(after, kernel_state(&bed.table));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sees_no_failure_across_300_syncs() -> Result<()> {
    let bed = Bed::new(2).await?;
    let (b1, b2) = (bed.pods[0].ip, bed.pods[1].ip);
    let web = port(&bed, "web", 1, &[(b1, false), (b2, false)]);
    let lay = layout(&bed);
    let mut syncer = Syncer::new();
    syncer
        .sync(layout::build(&lay, std::slice::from_ref(&web)))
        .await?;
    bed.wait_element(
        "service-ips",
        &format!("{} . tcp . 80 : goto service-", bed.service_ip(1)),
    )
    .await?;

    let stop = Arc::new(AtomicBool::new(false));
    let ip = bed.service_ip(1);
    let client = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut ok, mut failed) = (0, vec![]);
            while !stop.load(Ordering::Relaxed) {
                match get(ip, 80).await {
                    Ok(b) if b == "b1" || b == "b2" => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        }
    });
    // Every sync rewrites other services' chains and elements, and every tenth one web's too.
    for i in 0..300u32 {
        let mut ports = vec![web.clone()];
        if i % 10 == 5 {
            ports[0].endpoints.reverse();
            ports[0].affinity_timeout = Some(1);
        }
        let other = [(b1, false), (b2, false)];
        ports.push(port(
            &bed,
            "churn",
            2 + (i % 5) as u8,
            &other[..1 + (i % 2) as usize],
        ));
        let kind = syncer.sync(layout::build(&lay, &ports)).await?;
        assert_eq!(kind, Applied::Partial, "sync {i}");
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = client.await?;
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok >= 50, "only {ok} requests during the syncs");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sees_no_failure_across_a_proxy_restart() -> Result<()> {
    let bed = Bed::new(2).await?;
    let client = bed.client().await?;
    let ip = bed.service_ip(1);
    create_service(
        &client,
        serde_json::json!({"metadata": {"name": "web"}, "spec": {"clusterIP": ip.to_string(),
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
    )
    .await?;
    let eps: Vec<Value> = bed
        .pods
        .iter()
        .map(|p| serde_json::json!({"addresses": [p.ip.to_string()]}))
        .collect();
    create_slice(
        &client,
        serde_json::json!({"metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": eps}),
    )
    .await?;
    let proxy = bed.start_proxy().await?;
    bed.wait_element("service-ips", &format!("{ip} . tcp . 80 : goto service-"))
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let looper = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut ok, mut failed) = (0, vec![]);
            while !stop.load(Ordering::Relaxed) {
                match get(ip, 80).await {
                    Ok(b) if b == "b1" || b == "b2" => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        }
    });
    // Each start replaces the whole table in one transaction, leftovers included.
    let mut proxy = Some(proxy);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(proxy.take());
        sh_ok(&format!("nft add chain ip {} restart-marker", bed.table));
        proxy = Some(bed.start_proxy().await?);
        wait_for(Duration::from_secs(10), || {
            !bed.table_text().contains("restart-marker")
        })
        .await?;
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = looper.await?;
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok >= 50, "only {ok} requests");
    Ok(())
}

/// `nft list table` text with each set's elements sorted: the kernel lists hash set elements in
/// an order of its own, which differs between two loads of the same elements.
fn listing(table: &str) -> String {
    let text = sh_ok(&format!("nft list table ip {table}"));
    let mut out = String::new();
    let mut elements: Option<String> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(acc) = elements.as_mut() {
            acc.push(' ');
            acc.push_str(t);
        } else if let Some(rest) = t.strip_prefix("elements = {") {
            elements = Some(rest.to_string());
        } else {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let acc = elements.as_ref().unwrap();
        if let Some(body) = acc.trim_end().strip_suffix('}') {
            let mut items: Vec<String> = body
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            items.sort();
            out.push_str(&format!("\t\telements = {{ {} }}\n", items.join(", ")));
            elements = None;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netlink_writes_the_table_nft_writes() -> Result<()> {
    let bed = Bed::new(2).await?;
    for state in [state_a(&bed), state_b(&bed)] {
        Syncer::with_backend(Backend::Nft)
            .sync(state.clone())
            .await?;
        let by_nft = listing(&bed.table);
        proxy::cleanup(&bed.table).await?;
        assert!(bed.table_text().is_empty());
        Syncer::with_backend(Backend::Netlink).sync(state).await?;
        assert_eq!(listing(&bed.table), by_nft);
    }
    // A partial netlink transaction leaves what nft's full load of the same state does (chains
    // it adds are listed after the older ones, so the comparison ignores the order).
    let mut syncer = Syncer::with_backend(Backend::Netlink);
    syncer.sync(state_a(&bed)).await?;
    assert_eq!(syncer.sync(state_b(&bed)).await?, Applied::Partial);
    let partial = kernel_state(&bed.table);
    let text = listing(&bed.table);
    Syncer::with_backend(Backend::Nft)
        .sync(state_b(&bed))
        .await?;
    assert_eq!(partial, kernel_state(&bed.table));
    assert!(
        text.contains("dnat ip to numgen random mod 65536 map @endpoints-"),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_transaction_names_its_element_and_changes_nothing() -> Result<()> {
    let bed = Bed::new(2).await?;
    let (a, b) = (state_a(&bed), state_b(&bed));
    Syncer::new().sync(a.clone()).await?;
    // Someone removed an element the next diff deletes: the kernel refuses that step.
    let gone = format!("{} . tcp . 80", bed.service_ip(2));
    sh_ok(&format!(
        "nft delete element ip {} service-ips '{{ {gone} }}'",
        bed.table
    ));
    let before = listing(&bed.table);
    let err = proxy::netlink::apply(&bed.table, &b.diff_ops(&a), false).unwrap_err();
    match &err {
        proxy::Error::Refused { what, source } => {
            assert_eq!(
                what,
                &format!("delete element ip {} service-ips {{ {gone} }}", bed.table)
            );
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT), "{err}");
        }
        other => panic!("not a refusal: {other:?}"),
    }
    // The steps before and after the refused one did not happen either.
    assert_eq!(listing(&bed.table), before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_rule_is_named() -> Result<()> {
    let bed = Bed::new(0).await?;
    let mut r = proxy::ruleset::Ruleset::new(bed.table.clone());
    // A jump to a chain that does not exist.
    r.chains.insert(
        "c".into(),
        proxy::ruleset::Chain {
            base: None,
            rules: vec![proxy::ruleset::Rule::verdict(
                vec![],
                proxy::ruleset::Verdict::Jump("missing".into()),
            )],
        },
    );
    let err = Syncer::new().sync(r).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "the kernel refused `add rule ip {} c jump missing`: No such file or directory (os error 2)",
            bed.table
        )
    );
    assert!(bed.table_text().is_empty(), "{}", bed.table_text());
    Ok(())
}
