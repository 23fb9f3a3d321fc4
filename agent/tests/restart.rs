//! A restarted agent adopts the running pods (same container, no restart) and removes what
//! is left of pods deleted while it was down. Root; needs `tests/testbed/up`.

mod common;

use anyhow::Result;
use common::*;
use kube::api::DeleteParams;
use serde_json::json;
use std::time::Duration;

fn sleeper(name: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": busybox(), "command": ["sleep", "3600"]}]
        }
    })
}

fn running(p: &k8s_openapi::api::core::v1::Pod) -> bool {
    phase(p) == "Running" && condition(p, "Ready").as_deref() == Some("True")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_adopts_running_pods_and_cleans_up_deleted_ones() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    c.create_pod(sleeper("keep")).await?;
    let gone = c.create_pod(sleeper("gone")).await?;
    let t = Duration::from_secs(60);
    let before = c.wait_pod("keep", t, "Running", running).await?;
    c.wait_pod("gone", t, "Running", running).await?;
    let gone_uid = gone.metadata.uid.clone().unwrap();

    c.kill_agent().await;
    c.pods()
        .delete("gone", &DeleteParams::default().grace_period(0))
        .await?;
    c.wait_gone("gone", Duration::from_secs(10)).await?;
    c.start_agent().await?;
    c.create_pod(sleeper("after")).await?;
    c.wait_pod("after", t, "Running", running).await?;

    c.wait_no_leftovers(&gone_uid).await?;
    assert_eq!(c.bridge_ports().len(), 2, "{:?}", c.bridge_ports());
    assert!(!runtime::cgroup::controller_dir(
        "memory",
        &format!("kubepods/besteffort/pod{gone_uid}")
    )
    .exists());

    let after = c.pods().get("keep").await?;
    assert!(running(&after));
    let (b, a) = (container(&before), container(&after));
    assert_eq!(a.container_id, b.container_id);
    assert_eq!(a.restart_count, 0);
    assert_eq!(
        a.state.unwrap().running.unwrap().started_at,
        b.state.unwrap().running.unwrap().started_at
    );
    assert_eq!(after.status.unwrap().pod_ip, before.status.unwrap().pod_ip);
    Ok(())
}
