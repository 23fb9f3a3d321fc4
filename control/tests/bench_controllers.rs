//! How fast the controllers and the scheduler turn a Deployment into bound pods (no kubelet
//! needed for binding), and how fast a rollout replaces them (a fake kubelet reports the new
//! pods ready at once). Prints its numbers:
//! `OXLET_BENCH_REPLICAS=1000 cargo test --release -p oxlet-control --test bench_controllers -- --nocapture`
//! (CI runs it with 200 replicas as a correctness check; times are not asserted).

mod common;
#[path = "common/fake_kubelet.rs"]
mod fake_kubelet;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::json;

fn deployment(name: &str, replicas: i32, image: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": image}]}}}
    }))
    .unwrap()
}

/// Waits until `n` distinct pods labelled `app=<app>` whose image is `image` are bound; the
/// times until all existed and until all were bound.
async fn bound(
    pods: Api<Pod>,
    app: &str,
    image: &str,
    n: usize,
    limit: Duration,
) -> Result<(Duration, Duration)> {
    let t = Instant::now();
    let mut seen = HashSet::new();
    let mut created = HashSet::new();
    let mut all_created = None;
    let mut stream = watcher(
        pods,
        watcher::Config::default().labels(&format!("app={app}")),
    )
    .default_backoff()
    .applied_objects()
    .boxed();
    while seen.len() < n {
        let Ok(next) = tokio::time::timeout(limit.saturating_sub(t.elapsed()), stream.next()).await
        else {
            bail!("only {} of {n} pods bound in {limit:?}", seen.len());
        };
        let p = next.expect("the watch goes on")?;
        let spec = p.spec.as_ref().unwrap();
        if spec.containers[0].image.as_deref() == Some(image) {
            created.insert(p.metadata.uid.clone().unwrap());
            if created.len() == n && all_created.is_none() {
                all_created = Some(t.elapsed());
            }
            if spec.node_name.is_some() {
                seen.insert(p.metadata.uid.clone().unwrap());
            }
        }
    }
    Ok((all_created.unwrap_or(t.elapsed()), t.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_deployment_to_bound_pods() -> Result<()> {
    let n: i32 = std::env::var("OXLET_BENCH_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let ts = common::TestServer::start_with_controllers().await?;
    let admin = ts.client().await?;
    fake_kubelet::node(&admin, "bench-node", "1000", "10Ti").await?;
    let deploys: Api<Deployment> = Api::namespaced(admin.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");

    let t = Instant::now();
    let watch = tokio::spawn(bound(
        pods.clone(),
        "big",
        "img:v1",
        n as usize,
        Duration::from_secs(120),
    ));
    deploys
        .create(&PostParams::default(), &deployment("big", n, "img:v1"))
        .await?;
    let (created, _) = watch.await??;
    let create = t.elapsed();

    // A rollout of 100 replicas that a fake kubelet reports ready at once.
    let _kubelet = fake_kubelet::start(admin.clone(), "bench-kubelet", Duration::ZERO).await?;
    let roll = 100;
    let mut d = deployment("roll", roll, "img:v1");
    d.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .node_selector = Some(
        [(
            "kubernetes.io/hostname".to_string(),
            "bench-kubelet".to_string(),
        )]
        .into(),
    );
    deploys.create(&PostParams::default(), &d).await?;
    bound(
        pods.clone(),
        "roll",
        "img:v1",
        roll as usize,
        Duration::from_secs(120),
    )
    .await?;
    let t = Instant::now();
    let watch = tokio::spawn(bound(
        pods.clone(),
        "roll",
        "img:v2",
        roll as usize,
        Duration::from_secs(120),
    ));
    let patch =
        json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "img:v2"}]}}}});
    deploys
        .patch("roll", &PatchParams::default(), &Patch::Strategic(&patch))
        .await?;
    let (_, new_bound) = watch.await??;
    loop {
        let s = deploys.get("roll").await?.status.unwrap_or_default();
        if s.updated_replicas == Some(roll)
            && s.available_replicas == Some(roll)
            && s.replicas == Some(roll)
        {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("rollout did not complete: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rolled = t.elapsed();
    println!(
        "deployment of {n} replicas: all pods created in {:.3} s, all bound in {:.3} s ({:.0} pods/s)",
        created.as_secs_f64(),
        create.as_secs_f64(),
        n as f64 / create.as_secs_f64()
    );
    println!(
        "rollout of {roll} replicas: all new pods bound in {:.3} s, rollout complete in {:.3} s",
        new_bound.as_secs_f64(),
        rolled.as_secs_f64()
    );
    Ok(())
}
