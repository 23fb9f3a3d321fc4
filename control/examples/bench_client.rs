//! The Rust client of `bench/control`: pods created across 10 nodes while 100 watches of one
//! node's pods measure event latency; lists of 10,000 pods whole and in pages of 500; the
//! server's memory holding them and after deleting them; 10,000 Services created.
//!
//!     bench_client KUBECONFIG SERVER_PID

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

const NODES: usize = 10;
const WATCHERS: usize = 100;
const WATCHED_PODS: usize = 1000;
const PODS: usize = 10_000;
const SERVICES: usize = 10_000;
const NS: &str = "bench";

fn rss_mib(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn pod(i: usize) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": format!("pod-{i}"), "labels": {"bench": "yes"}},
        "spec": {"nodeName": format!("node-{}", i % NODES),
            "containers": [{"name": "c", "image": "registry.invalid/busybox:latest"}]}}))
    .expect("valid pod")
}

fn svc(i: usize) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}")},
        "spec": {"selector": {"app": format!("a{i}")}, "ports": [{"port": 80}]}}))
    .expect("valid service")
}

fn pct(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    xs[((xs.len() as f64 * p) as usize).min(xs.len() - 1)]
}

/// Creates items `range` with `conc` concurrent tasks; returns each create's start time.
async fn create_all<K, F>(
    api: &Api<K>,
    range: std::ops::Range<usize>,
    conc: usize,
    make: F,
) -> Result<HashMap<String, Instant>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    K: Send + Sync + 'static,
    F: Fn(usize) -> K + Send + Sync + Copy + 'static,
{
    let started = Arc::new(Mutex::new(HashMap::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(range.start));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (api, started, next, end) = (api.clone(), started.clone(), next.clone(), range.end);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= end {
                    return Ok::<_, kube::Error>(());
                }
                let obj = make(i);
                let name = obj.meta().name.clone().unwrap_or_default();
                started.lock().unwrap().insert(name, Instant::now());
                api.create(&PostParams::default(), &obj).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(Arc::try_unwrap(started).unwrap().into_inner().unwrap())
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let kubeconfig = args.next().context("KUBECONFIG")?;
    let pid: u32 = args.next().context("SERVER_PID")?.parse()?;
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    let client = kube::Client::try_from(cfg)?;
    let mut rows: Vec<String> = Vec::new();
    let mut mem: Vec<String> = Vec::new();
    let note_mem = |what: &str, mem: &mut Vec<String>| {
        let (rss, hwm) = rss_mib(pid);
        mem.push(format!("| {what} | {rss:.1} | {hwm:.1} |"));
    };
    note_mem("start", &mut mem);

    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);

    // 100 watches of node-0's pods, as agents watch with spec.nodeName.
    let all_pods: Api<Pod> = Api::all(client.clone());
    let seen: Arc<Mutex<Vec<HashMap<String, Instant>>>> =
        Arc::new(Mutex::new(vec![HashMap::new(); WATCHERS]));
    let rv = pods
        .list(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut watchers = Vec::new();
    for i in 0..WATCHERS {
        let wp = WatchParams::default().fields("spec.nodeName=node-0");
        let mut w = all_pods.watch(&wp, &rv).await?.boxed();
        let seen = seen.clone();
        watchers.push(tokio::spawn(async move {
            while let Ok(Some(ev)) = w.try_next().await {
                if let WatchEvent::Added(p) = ev {
                    let name = p.metadata.name.unwrap_or_default();
                    seen.lock().unwrap()[i].insert(name, Instant::now());
                }
            }
        }));
    }
    note_mem("100 watches open", &mut mem);
    let t = Instant::now();
    let started = create_all(&pods, 0..WATCHED_PODS, 16, pod).await?;
    let secs = t.elapsed().as_secs_f64();
    rows.push(format!(
        "| create pods, 16 clients (watched) | {WATCHED_PODS} | {secs:.3} | {:.0} | | |",
        WATCHED_PODS as f64 / secs
    ));
    let want: Vec<String> = (0..WATCHED_PODS)
        .filter(|i| i % NODES == 0)
        .map(|i| format!("pod-{i}"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let done = seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| want.iter().all(|n| s.contains_key(n)));
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut lat = Vec::new();
    let mut complete = 0;
    for s in seen.lock().unwrap().iter() {
        complete += want.iter().all(|n| s.contains_key(n)) as usize;
        for n in &want {
            if let Some(at) = s.get(n) {
                lat.push(at.duration_since(started[n]).as_secs_f64() * 1000.0);
            }
        }
    }
    let n = lat.len();
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    rows.push(format!(
        "| watch events, {WATCHERS} watches of node-0 ({complete} complete) | {n} | | | {p50:.2} | {p99:.2} |"
    ));
    note_mem("100 watches, after the events", &mut mem);
    for w in watchers {
        w.abort();
    }

    let t = Instant::now();
    create_all(&pods, WATCHED_PODS..PODS, 64, pod).await?;
    let secs = t.elapsed().as_secs_f64();
    rows.push(format!(
        "| create pods, 64 clients | {} | {secs:.3} | {:.0} | | |",
        PODS - WATCHED_PODS,
        (PODS - WATCHED_PODS) as f64 / secs
    ));
    note_mem("holding 10,000 pods", &mut mem);

    let t = Instant::now();
    let list = pods.list(&ListParams::default()).await?;
    let secs = t.elapsed().as_secs_f64();
    if list.items.len() != PODS {
        bail!("listed {} pods", list.items.len());
    }
    rows.push(format!(
        "| list 10,000 pods, whole | {PODS} | {secs:.3} | {:.0} | | |",
        PODS as f64 / secs
    ));
    drop(list);
    let t = Instant::now();
    let (mut got, mut pages) = (0, 0);
    let mut lp = ListParams::default().limit(500);
    loop {
        let page = pods.list(&lp).await?;
        got += page.items.len();
        pages += 1;
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    let secs = t.elapsed().as_secs_f64();
    if got != PODS {
        bail!("paged {got} pods");
    }
    rows.push(format!(
        "| list 10,000 pods, {pages} pages of 500 | {got} | {secs:.3} | {:.0} | | |",
        got as f64 / secs
    ));

    let t = Instant::now();
    pods.delete_collection(
        &DeleteParams::default().grace_period(0),
        &ListParams::default(),
    )
    .await?;
    let secs = t.elapsed().as_secs_f64();
    rows.push(format!(
        "| delete 10,000 pods (one deletecollection) | {PODS} | {secs:.3} | {:.0} | | |",
        PODS as f64 / secs
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    note_mem("after deleting the pods", &mut mem);

    let svcs: Api<Service> = Api::namespaced(client.clone(), NS);
    let t = Instant::now();
    let mut marks = Vec::new();
    for k in 0..10 {
        let t = Instant::now();
        create_all(&svcs, k * SERVICES / 10..(k + 1) * SERVICES / 10, 16, svc).await?;
        marks.push(t.elapsed().as_secs_f64());
    }
    let secs = t.elapsed().as_secs_f64();
    rows.push(format!(
        "| create services, 16 clients | {SERVICES} | {secs:.3} | {:.0} | | |",
        SERVICES as f64 / secs
    ));
    rows.push(format!(
        "| services: first 1,000 / last 1,000 | 1000 | {:.3} / {:.3} | {:.0} / {:.0} | | |",
        marks[0],
        marks[9],
        1000.0 / marks[0],
        1000.0 / marks[9]
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    note_mem("holding 10,000 services", &mut mem);

    println!("| phase | objects | seconds | objects/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!();
    println!("| server memory | VmRSS MiB | VmHWM MiB |");
    println!("|---|---|---|");
    for m in mem {
        println!("{m}");
    }
    Ok(())
}
