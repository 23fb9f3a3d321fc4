//! Watches under load: a watch resumes from a revision older than a busy stretch of writes as
//! long as the log's retention covers it (410 only after that), and a watcher too slow to
//! keep up is ended with 410 Expired while another one receives everything.

mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

use common::TestServer;

fn cm(name: &str, data: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": {"d": data}})).unwrap()
}

/// Writes `n` updates spread over `objects` config maps from 8 concurrent clients.
async fn churn(
    cms: &Api<ConfigMap>,
    prefix: &str,
    objects: usize,
    n: usize,
    size: usize,
) -> Result<()> {
    for i in 0..objects {
        cms.create(&PostParams::default(), &cm(&format!("{prefix}-{i}"), ""))
            .await?;
    }
    let filler = "x".repeat(size);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (cms, prefix, filler) = (cms.clone(), prefix.to_string(), filler.clone());
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(8) {
                let p = Patch::Merge(json!({"data": {"d": format!("{i}{filler}")}}));
                cms.patch(
                    &format!("{prefix}-{}", i % objects),
                    &PatchParams::default(),
                    &p,
                )
                .await?;
            }
            Ok::<_, kube::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_from_before_a_busy_stretch_within_the_retention() -> Result<()> {
    // Retention scaled down from 5 minutes to 15 s, compaction every 250 ms, so the resume
    // below, 4 s and more than 3,000 revisions old, is well past the compactor's runs.
    let ts = TestServer::start_server_config(|c| {
        c.keep_revisions_for = Duration::from_secs(15);
        c.compact_every = Duration::from_millis(250);
    })
    .await?;
    let cms: Api<ConfigMap> = Api::namespaced(ts.client().await?, "default");
    let start = cms.list(&ListParams::default().limit(1)).await?;
    let from = start.metadata.resource_version.unwrap();
    let t0 = Instant::now();
    churn(&cms, "old", 10, 3000, 16).await?;
    let wait = Duration::from_secs(4).saturating_sub(t0.elapsed());
    tokio::time::sleep(wait).await;
    let mut w = cms.watch(&WatchParams::default(), &from).await?.boxed();
    let (mut added, mut modified) = (0, 0);
    while added + modified < 3010 {
        match tokio::time::timeout(Duration::from_secs(10), w.try_next()).await?? {
            Some(WatchEvent::Added(_)) => added += 1,
            Some(WatchEvent::Modified(_)) => modified += 1,
            Some(WatchEvent::Bookmark(_)) => {}
            other => bail!("after {added} added, {modified} modified: {other:?}"),
        }
    }
    assert_eq!((added, modified), (10, 3000));

    // Once the revision is older than the retention, the resume is answered 410 Expired.
    tokio::time::sleep(Duration::from_secs(16).saturating_sub(t0.elapsed())).await;
    cms.create(&PostParams::default(), &cm("after", "")).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut w = cms.watch(&WatchParams::default(), &from).await?.boxed();
        match tokio::time::timeout(Duration::from_secs(10), w.try_next()).await?? {
            Some(WatchEvent::Error(e)) => {
                assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
                break;
            }
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(250)).await,
            other => bail!("expected 410 once past the retention, got {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_gets_410_while_another_keeps_up() -> Result<()> {
    let ts = TestServer::start().await?;
    let cms: Api<ConfigMap> = Api::namespaced(ts.client().await?, "default");
    let from = cms
        .list(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap();
    // Opened and never read until the writes are over.
    let mut slow = cms.watch(&WatchParams::default(), &from).await?.boxed();
    let fast = {
        let mut w = cms.watch(&WatchParams::default(), &from).await?.boxed();
        tokio::spawn(async move {
            let mut n = 0usize;
            while n < 7010 {
                match tokio::time::timeout(Duration::from_secs(30), w.try_next()).await?? {
                    Some(WatchEvent::Added(_) | WatchEvent::Modified(_)) => n += 1,
                    Some(WatchEvent::Bookmark(_)) => {}
                    other => bail!("fast watcher after {n} events: {other:?}"),
                }
            }
            Ok::<_, anyhow::Error>(n)
        })
    };
    // 7,000 changes of 4 KiB: far more than the watch window and the socket buffers hold.
    churn(&cms, "slow", 10, 7000, 4096).await?;
    assert_eq!(fast.await??, 7010, "the fast watcher saw every change");
    let mut n = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), slow.try_next()).await?? {
            Some(WatchEvent::Added(_) | WatchEvent::Modified(_)) => n += 1,
            Some(WatchEvent::Error(e)) => {
                assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
                assert!(n < 7010, "the slow watcher was ended before the end ({n})");
                break;
            }
            other => bail!("slow watcher after {n} events: {other:?}"),
        }
    }
    Ok(())
}
