//! Image garbage collection with thresholds forced low enough to run on this disk: an image
//! no container uses any more is removed, the image of a running pod stays. Root; needs
//! `tests/testbed/up`.

mod common;

use anyhow::Result;
use common::*;
use kube::api::DeleteParams;
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_images_are_collected_above_the_high_threshold_and_used_ones_stay() -> Result<()> {
    let mut c = Cluster::new().await?;
    // Usage is above 1 % on any disk: every run collects, down to 0 % (never reached).
    c.cfg.image_gc = runtime::image::gc::Policy {
        high_threshold_percent: 1,
        low_threshold_percent: 0,
        min_age: Duration::ZERO,
    };
    c.cfg.image_gc_period = Duration::from_millis(500);
    c.start_agent().await?;
    let store = runtime::image::ImageStore::open(c.cfg.data_dir.join("images"))?;

    c.create_pod(json!({
        "metadata": {"name": "keeps-busybox"},
        "spec": {"terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": busybox(), "command": ["sleep", "3600"]}]}
    }))
    .await?;
    c.create_pod(json!({
        "metadata": {"name": "used-layers"},
        "spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": layers(), "command": ["true"]}]}
    }))
    .await?;
    c.wait_pod("keeps-busybox", Duration::from_secs(60), "Running", |p| {
        phase(p) == "Running"
    })
    .await?;
    c.wait_pod("used-layers", Duration::from_secs(60), "Succeeded", |p| {
        phase(p) == "Succeeded"
    })
    .await?;
    // Its exited container still uses the image.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        store.get(layers())?.is_some(),
        "an exited container's image stays"
    );

    c.pods()
        .delete("used-layers", &DeleteParams::default())
        .await?;
    c.wait_gone("used-layers", Duration::from_secs(30)).await?;
    let deadline = Instant::now() + patience(Duration::from_secs(20));
    while store.get(layers())?.is_some() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the unused image was not collected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        store.get(busybox())?.is_some(),
        "the running pod's image stays"
    );
    // The running pod is untouched.
    let p = c.pods().get("keeps-busybox").await?;
    assert_eq!(phase(&p), "Running");
    assert_eq!(container(&p).restart_count, 0);
    Ok(())
}
