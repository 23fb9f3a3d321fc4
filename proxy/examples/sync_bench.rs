//! Times the proxy's nftables syncs at scale against upstream kube-proxy's layout (one anonymous
//! `numgen ... vmap` per service), both applied with `nft -f`: N services x 2 endpoints, a full
//! sync into an empty table, then one changed service as a partial sync.
//!
//!     cargo run --release -p oxlet-proxy --example sync_bench -- 1000 5000 10000
//!
//! `EMIT=/tmp/x sync_bench N` writes the full text (`/tmp/x.full`) and the one-change diff
//! (`/tmp/x.diff`) for N services instead, to time single nft commands by hand.
//!
//! Runs as root; it owns tables `oxlet-proxy-bench-*` (removed at the end) and programs only
//! addresses in 10.100.0.0/16 and 10.101.0.0/16, to which nothing is sent.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use proxy::layout::{self, Layout};
use proxy::model::{Endpoint, Protocol, ServicePort, ServicePortName};
use proxy::ruleset::Ruleset;
use proxy::sync::{Applied, Syncer};

fn ports(n: usize, changed: bool) -> Vec<ServicePort> {
    (0..n)
        .map(|i| {
            let (hi, lo) = ((i / 256) as u8, (i % 256) as u8);
            let second = if changed && i == 0 { 99 } else { 2 };
            ServicePort {
                id: ServicePortName {
                    namespace: "bench".into(),
                    name: format!("svc-{i}"),
                    port: "http".into(),
                    protocol: Protocol::Tcp,
                },
                cluster_ip: Ipv4Addr::new(10, 100, hi, lo),
                port: 80,
                node_port: None,
                external_ips: vec![],
                affinity_timeout: None,
                external_local: false,
                internal_local: false,
                endpoints: [1, second]
                    .iter()
                    .map(|k| Endpoint {
                        ip: Ipv4Addr::new(10, 101, hi, lo),
                        port: 8000 + k,
                        local: false,
                    })
                    .collect(),
            }
        })
        .collect()
}

/// The same state with upstream's load balancing: one anonymous verdict map per service chain.
fn upstream(r: &Ruleset) -> Ruleset {
    let mut r = r.clone();
    for (name, chain) in r.chains.iter_mut() {
        if !name.starts_with("service-") || !name.contains('/') {
            continue;
        }
        let mut targets = vec![];
        chain.rules.retain(|rule| match rule.split_once("goto ") {
            Some((head, t)) if head.is_empty() || head.starts_with("numgen") => {
                targets.push(t.to_string());
                false
            }
            _ => true,
        });
        let elems: Vec<String> = targets
            .iter()
            .enumerate()
            .map(|(k, t)| format!("{k} : goto {t}"))
            .collect();
        chain.rules.push(format!(
            "numgen random mod {} vmap {{ {} }}",
            targets.len(),
            elems.join(", ")
        ));
    }
    r
}

async fn time_sync(s: &mut Syncer, r: Ruleset, want: Applied) -> Duration {
    let t0 = Instant::now();
    let got = s.sync(r).await.expect("nft applies");
    assert_eq!(got, want);
    t0.elapsed()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a number of services"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1000, 5000, 10000]
    } else {
        sizes
    };
    let pid = std::process::id();
    if let Ok(path) = std::env::var("EMIT") {
        let lay = Layout {
            table: "oxlet-proxy-bench-emit".into(),
            service_cidr: "10.100.0.0/16".parse().unwrap(),
            cluster_cidr: "10.101.0.0/16".parse().unwrap(),
            nodeport_ips: vec![],
        };
        let a = layout::build(&lay, &ports(sizes[0], false));
        let b = layout::build(&lay, &ports(sizes[0], true));
        std::fs::write(format!("{path}.full"), a.render_full()).unwrap();
        std::fs::write(format!("{path}.diff"), b.render_diff(&a).unwrap()).unwrap();
        return;
    }
    println!("| services | oxlet full | upstream full | ratio | oxlet 1 change | upstream 1 change | ratio | build+render (oxlet, N) |");
    println!("|---|---|---|---|---|---|---|---|");
    for n in sizes {
        let mut times = vec![];
        for (which, table) in [("oxlet", "o"), ("upstream", "u")] {
            let table = format!("oxlet-proxy-bench-{table}{pid}");
            let lay = Layout {
                table: table.clone(),
                service_cidr: "10.100.0.0/16".parse().unwrap(),
                cluster_cidr: "10.101.0.0/16".parse().unwrap(),
                nodeport_ips: vec![],
            };
            proxy::cleanup(&table).await.unwrap();
            let t0 = Instant::now();
            let mut a = layout::build(&lay, &ports(n, false));
            let _ = a.render_full();
            let build = t0.elapsed();
            let mut b = layout::build(&lay, &ports(n, true));
            if which == "upstream" {
                a = upstream(&a);
                b = upstream(&b);
            }
            let mut s = Syncer::new();
            let full = time_sync(&mut s, a, Applied::Full).await;
            let change = time_sync(&mut s, b, Applied::Partial).await;
            proxy::cleanup(&table).await.unwrap();
            times.push((full, change, build));
        }
        let (o, u) = (times[0], times[1]);
        println!(
            "| {n} | {} | {} | {:.2}x | {} | {} | {:.2}x | {} |",
            ms(o.0),
            ms(u.0),
            u.0.as_secs_f64() / o.0.as_secs_f64(),
            ms(o.1),
            ms(u.1),
            u.1.as_secs_f64() / o.1.as_secs_f64(),
            ms(o.2)
        );
    }
}
