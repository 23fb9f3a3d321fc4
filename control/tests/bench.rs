//! A small benchmark through the real HTTPS path with kube-rs: writes (each one fsynced),
//! concurrent writes, a 1000-item list, and watch delivery. Bounded in size and time; prints
//! its numbers (`cargo test -p oxlet-control --test bench -- --nocapture`).

mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::TryStreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

fn cm(name: &str) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"bench": "yes"}}, "data": {"k": "v"}}),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_writes_lists_watches() -> Result<()> {
    let ts = common::TestServer::start().await?;
    let client = ts.client().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");

    let n = 200;
    let t = Instant::now();
    for i in 0..n {
        cms.create(&PostParams::default(), &cm(&format!("seq-{i}")))
            .await?;
    }
    let seq = t.elapsed();

    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let cms = cms.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                cms.create(&PostParams::default(), &cm(&format!("par-{w}-{i}")))
                    .await?;
            }
            Ok::<_, kube::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let par = t.elapsed();

    let t = Instant::now();
    let list = cms.list(&ListParams::default().labels("bench=yes")).await?;
    let list_time = t.elapsed();
    assert_eq!(list.items.len(), n + 800);
    let t = Instant::now();
    let sel = cms
        .list(&ListParams::default().labels("bench=yes").limit(100))
        .await?;
    let page_time = t.elapsed();
    assert_eq!(sel.items.len(), 100);

    let rv = list.metadata.resource_version.unwrap();
    let mut w = Box::pin(cms.watch(&WatchParams::default(), &rv).await?);
    let mut lat = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        cms.create(&PostParams::default(), &cm(&format!("watch-{i}")))
            .await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), w.try_next())
                .await??
                .unwrap()
            {
                WatchEvent::Added(c)
                    if c.metadata.name.as_deref() == Some(&format!("watch-{i}")) =>
                {
                    break
                }
                _ => {}
            }
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    eprintln!(
        "bench: {n} sequential creates {:.0}/s; 800 creates from 8 clients {:.0}/s; list of {} {:?}; \
         selector page of 100 {:?}; create-to-watch-event p50 {:?} max {:?}",
        n as f64 / seq.as_secs_f64(),
        800.0 / par.as_secs_f64(),
        list.items.len(),
        list_time,
        page_time,
        lat[lat.len() / 2],
        lat[lat.len() - 1],
    );
    Ok(())
}
