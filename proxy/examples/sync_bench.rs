//! Times the proxy's syncs at scale through nf_tables netlink, side by side with upstream
//! kube-proxy's nftables layout (per-endpoint chains picked by one anonymous
//! `numgen ... vmap` per service) applied with `nft -f`: N services x 2 endpoints, a full sync into an empty table, then one changed
//! service as a partial sync (median of several changes).
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
use proxy::ruleset::{Action, Addr, Chain, Key, Match, Rule, Ruleset, Verdict};
use proxy::sync::{Applied, Backend, Syncer};

/// Changes timed per size; the median is printed.
const CHANGES: u16 = 7;

fn ports(n: usize, change: u16) -> Vec<ServicePort> {
    (0..n)
        .map(|i| {
            let (hi, lo) = ((i / 256) as u8, (i % 256) as u8);
            let second = if i == 0 { 2 + change } else { 2 };
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

/// Rewrites oxlet's nft text into upstream's load balancing: the `numgen ... goto` and final
/// `goto` rules of each service chain become one `numgen random mod N vmap { ... }` rule.
/// Works on both the block syntax of a full load and the commands of a diff.
fn upstream(text: &str) -> String {
    let mut out = String::new();
    let mut targets: Vec<String> = vec![];
    let mut prefix = String::new();
    let flush = |out: &mut String, prefix: &str, targets: &mut Vec<String>| {
        if targets.is_empty() {
            return;
        }
        let elems: Vec<String> = targets
            .iter()
            .enumerate()
            .map(|(k, t)| format!("{k} : goto {t}"))
            .collect();
        out.push_str(&format!(
            "{prefix}numgen random mod {} vmap {{ {} }}\n",
            targets.len(),
            elems.join(", ")
        ));
        targets.clear();
    };
    let mut in_service_block = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("chain ") {
            in_service_block = trimmed.starts_with("chain service-") && trimmed.contains('/');
        }
        // Block syntax: "\t\tnumgen ... goto X" inside a service chain; commands:
        // "add rule ip T service-.../... numgen ... goto X".
        let (head, rest) = match line.split_once(" service-") {
            Some((h, r)) if h.starts_with("add rule ") => {
                let (chain, stmt) = r.split_once(' ').unwrap_or((r, ""));
                (format!("{h} service-{chain} "), stmt.to_string())
            }
            _ if in_service_block => (String::from("\t\t"), trimmed.to_string()),
            _ => (String::new(), String::new()),
        };
        let pick = rest
            .strip_prefix("goto ")
            .or_else(|| rest.split_once(" == 0 goto ").map(|(_, t)| t))
            .filter(|_| {
                !head.is_empty() && (rest.starts_with("goto ") || rest.starts_with("numgen"))
            });
        match pick {
            Some(t) => {
                if prefix != head {
                    flush(&mut out, &prefix, &mut targets);
                    prefix = head;
                }
                targets.push(t.to_string());
            }
            None => {
                flush(&mut out, &prefix, &mut targets);
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    flush(&mut out, &prefix, &mut targets);
    out
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn lay(table: &str) -> Layout {
    Layout {
        table: table.into(),
        service_cidr: "10.100.0.0/16".parse().unwrap(),
        cluster_cidr: "10.101.0.0/16".parse().unwrap(),
        nodeport_ips: vec![],
    }
}

struct Row {
    unchanged: Duration,
    full: Duration,
    change: Duration,
    change_with_build: Duration,
}

/// oxlet's layout through `backend`: the full sync, then CHANGES one-service changes, each
/// timed from handing the Service ports to the syncer (which builds and diffs only the changed
/// Service) to the kernel's answer; and the same changes with the whole table rebuilt and
/// diffed, as a sync of a whole desired `Ruleset` does.
async fn oxlet(n: usize, backend: Backend, table: &str) -> Row {
    proxy::cleanup(table).await.unwrap();
    let l = lay(table);
    let mut s = Syncer::with_backend(backend);
    let a = ports(n, 0);
    let t0 = Instant::now();
    assert_eq!(s.sync_ports(&l, a).await.unwrap(), Applied::Full);
    let full = t0.elapsed();
    let mut changes = vec![];
    for c in 1..=CHANGES {
        let p = ports(n, c);
        let t0 = Instant::now();
        assert_eq!(s.sync_ports(&l, p).await.unwrap(), Applied::Partial);
        changes.push(t0.elapsed());
    }
    // The same ports again: what a sync costs this process when nothing changed.
    let mut same = vec![];
    for _ in 0..CHANGES {
        let p = ports(n, CHANGES);
        let t0 = Instant::now();
        assert_eq!(s.sync_ports(&l, p).await.unwrap(), Applied::Unchanged);
        same.push(t0.elapsed());
    }
    let mut whole = Syncer::with_backend(backend);
    whole.sync(layout::build(&l, &ports(n, 0))).await.unwrap();
    let mut with_build = vec![];
    for c in 1..=CHANGES {
        let p = ports(n, c);
        let t0 = Instant::now();
        let b = layout::build(&l, &p);
        assert_eq!(whole.sync(b).await.unwrap(), Applied::Partial);
        with_build.push(t0.elapsed());
    }
    proxy::cleanup(table).await.unwrap();
    Row {
        full,
        change: median(changes),
        change_with_build: median(with_build),
        unchanged: median(same),
    }
}

/// Upstream's layout of these ports (ClusterIP only, as `ports` makes them): per service a
/// chain that picks an endpoint chain at random, per endpoint a chain that marks hairpin
/// traffic and DNATs. Written with numgen-goto rules that `upstream` folds into vmaps.
fn upstream_layout(l: &Layout, ports: &[ServicePort]) -> Ruleset {
    let mut r = layout::build_fixed(l);
    for sp in ports {
        let svc = layout::service_chain(&sp.id);
        let host = |field, ip: Ipv4Addr| Match::Addr {
            field,
            negate: false,
            net: ip.into(),
        };
        let mut rules = vec![Rule::verdict(
            vec![
                host(Addr::Daddr, sp.cluster_ip),
                Match::Dport(sp.id.protocol, sp.port),
                Match::Addr {
                    field: Addr::Saddr,
                    negate: true,
                    net: l.cluster_cidr.trunc(),
                },
            ],
            Verdict::Jump("mark-for-masquerade".into()),
        )];
        let n = sp.endpoints.len();
        for (k, ep) in sp.endpoints.iter().enumerate() {
            let chain = layout::endpoint_chain(&sp.id, ep);
            let matches = if n - k > 1 {
                vec![Match::NumgenZero((n - k) as u32)]
            } else {
                vec![]
            };
            rules.push(Rule::verdict(matches, Verdict::Goto(chain.clone())));
            let ep_rules = vec![
                Rule::verdict(
                    vec![host(Addr::Saddr, ep.ip)],
                    Verdict::Jump("mark-for-masquerade".into()),
                ),
                Rule::new(
                    vec![Match::L4Proto(sp.id.protocol)],
                    Action::Dnat(ep.ip, ep.port),
                ),
            ];
            r.chains.insert(
                chain,
                Chain {
                    base: None,
                    rules: ep_rules,
                },
            );
        }
        r.chains.insert(svc.clone(), Chain { base: None, rules });
        r.sets
            .get_mut("cluster-ips")
            .unwrap()
            .elements
            .insert(Key::Addr(sp.cluster_ip));
        r.maps.get_mut("service-ips").unwrap().elements.insert(
            Key::AddrProtoPort(sp.cluster_ip, sp.id.protocol, sp.port),
            Verdict::Goto(svc),
        );
    }
    r
}

/// Upstream's layout through `nft -f`: full load, then the same changes as text diffs.
async fn upstream_nft(n: usize, table: &str) -> Row {
    proxy::cleanup(table).await.unwrap();
    let l = lay(table);
    let a = upstream_layout(&l, &ports(n, 0));
    let text = upstream(&a.render_full());
    let t0 = Instant::now();
    proxy::sync::apply(&text).await.unwrap();
    let full = t0.elapsed();
    let mut changes = vec![];
    let mut old = a;
    for c in 1..=CHANGES {
        let b = upstream_layout(&l, &ports(n, c));
        let diff = upstream(&b.render_diff(&old).unwrap());
        let t0 = Instant::now();
        proxy::sync::apply(&diff).await.unwrap();
        changes.push(t0.elapsed());
        old = b;
    }
    proxy::cleanup(table).await.unwrap();
    let change = median(changes);
    Row {
        full,
        change,
        change_with_build: change,
        unchanged: Duration::ZERO,
    }
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
        let l = lay("oxlet-proxy-bench-emit");
        let a = layout::build(&l, &ports(sizes[0], 0));
        let b = layout::build(&l, &ports(sizes[0], 1));
        std::fs::write(format!("{path}.full"), a.render_full()).unwrap();
        std::fs::write(format!("{path}.diff"), b.render_diff(&a).unwrap()).unwrap();
        let (ua, ub) = (
            upstream_layout(&l, &ports(sizes[0], 0)),
            upstream_layout(&l, &ports(sizes[0], 1)),
        );
        std::fs::write(format!("{path}.upstream.full"), upstream(&ua.render_full())).unwrap();
        std::fs::write(
            format!("{path}.upstream.diff"),
            upstream(&ub.render_diff(&ua).unwrap()),
        )
        .unwrap();
        return;
    }
    println!("| services | oxlet full (netlink) | upstream full (nft -f) | ratio | oxlet 1 change (netlink) | upstream 1 change (nft -f) | ratio | oxlet 1 change, whole table rebuilt and diffed | oxlet through nft -f: full / 1 change | oxlet sync without change |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        let o = oxlet(n, Backend::Netlink, &format!("oxlet-proxy-bench-o{pid}")).await;
        let t = oxlet(n, Backend::Nft, &format!("oxlet-proxy-bench-t{pid}")).await;
        let u = upstream_nft(n, &format!("oxlet-proxy-bench-u{pid}")).await;
        println!(
            "| {n} | {} | {} | {:.1}x | {} | {} | {:.1}x | {} | {} / {} | {} |",
            ms(o.full),
            ms(u.full),
            u.full.as_secs_f64() / o.full.as_secs_f64(),
            ms(o.change),
            ms(u.change),
            u.change.as_secs_f64() / o.change.as_secs_f64(),
            ms(o.change_with_build),
            ms(t.full),
            ms(t.change),
            ms(o.unchanged),
        );
    }
}
