//! Static pods from the manifest directory: run by the agent, mirrored in the API (annotated,
//! owned by the Node, recreated when deleted), restarted when their file changes, stopped with
//! their mirror gone when the file goes; a node may create mirror pods only. Root; needs
//! `tests/testbed/up`.

mod common;

use anyhow::{Context, Result};
use common::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use std::time::{Duration, Instant};

fn manifest(marker: &str) -> String {
    let busybox = busybox();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: static-web\n  labels:\n    app: static\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: {busybox}\n    command: [sh, -c, 'echo {marker}; sleep 3600']\n"
    )
}

fn mirror_hash(p: &Pod) -> String {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("kubernetes.io/config.mirror"))
        .cloned()
        .unwrap_or_default()
}

/// Waits until the static pod's log (below its own UID, the config hash) shows `text`.
async fn wait_static_log(c: &Cluster, name: &str, hash: &str, text: &str) -> Result<()> {
    let path = c
        .cfg
        .log_dir
        .join(format!("default_{name}_{hash}"))
        .join("c/0.log");
    let deadline = Instant::now() + patience(Duration::from_secs(20));
    loop {
        let log = runtime::log::read_text(&path).unwrap_or_default();
        if log.contains(text) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} lacks {text:?}: {log}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn container_id(p: &Pod) -> String {
    container(p).container_id.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_pods_run_from_files_with_mirror_pods_in_the_api() -> Result<()> {
    let mut c = Cluster::new().await?;
    let dir = c.dir.path().join("manifests");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("web.yaml"), manifest("first"))?;
    std::fs::write(dir.join(".hidden.yaml"), "not: a pod")?;
    c.cfg.pod_manifest_path = Some(dir.clone());
    c.cfg.file_check_frequency = Duration::from_millis(300);
    c.start_agent().await?;
    let name = format!("static-web-{}", c.node);

    let p = c
        .wait_pod(&name, Duration::from_secs(60), "mirror Running", |p| {
            phase(p) == "Running" && !container_id(p).is_empty()
        })
        .await?;
    let ann = p.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(ann["kubernetes.io/config.source"], "file");
    let hash = mirror_hash(&p);
    assert_eq!(hash.len(), 32, "{ann:?}");
    assert_ne!(p.metadata.uid.as_deref(), Some(hash.as_str()));
    let owner = &p.metadata.owner_references.clone().context("owner")?[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Node", c.node.as_str())
    );
    wait_static_log(&c, &name, &hash, "first").await?;
    let first_container = container_id(&p);

    // A deleted mirror comes back; the static pod keeps running as it was.
    c.pods().delete(&name, &DeleteParams::default()).await?;
    let back = c
        .wait_pod(&name, Duration::from_secs(30), "a new mirror", |m| {
            m.metadata.uid != p.metadata.uid && phase(m) == "Running"
        })
        .await?;
    assert_eq!(mirror_hash(&back), hash);
    assert_eq!(container_id(&back), first_container);
    assert_eq!(container(&back).restart_count, 0);

    // A changed file is a new pod: the old one stops, the new one runs.
    std::fs::write(dir.join("web.yaml"), manifest("second"))?;
    let changed = c
        .wait_pod(&name, Duration::from_secs(60), "the changed pod", |m| {
            mirror_hash(m) != hash && phase(m) == "Running" && !container_id(m).is_empty()
        })
        .await?;
    assert_ne!(container_id(&changed), first_container);
    wait_static_log(&c, &name, &mirror_hash(&changed), "second").await?;
    let ctx = agent::pod_runtime::PodRuntime::new(&c.cfg, "127.0.0.1".parse()?)?;
    let deadline = Instant::now() + patience(Duration::from_secs(20));
    while ctx.local_pods().contains(&hash) {
        anyhow::ensure!(Instant::now() < deadline, "the old static pod still runs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The node may create mirror pods of its own only.
    let node_pods: Api<Pod> = Api::namespaced(c.node_client().await?, "default");
    let plain: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "not-a-mirror"},
        "spec": {"nodeName": c.node, "containers": [{"name": "c", "image": busybox()}]}
    }))?;
    match node_pods.create(&PostParams::default(), &plain).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403);
            assert!(
                e.message.contains("can only create mirror pods"),
                "{}",
                e.message
            );
        }
        other => anyhow::bail!("a node created a plain pod: {other:?}"),
    }

    // The file goes: the pod stops and its mirror is deleted.
    std::fs::remove_file(dir.join("web.yaml"))?;
    c.wait_gone(&name, Duration::from_secs(30)).await?;
    let deadline = Instant::now() + patience(Duration::from_secs(20));
    while !ctx.local_pods().is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "static pod leftovers: {:?}",
            ctx.local_pods()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
