//! Plays the kubelet of one node where no agent runs: registers a Ready node, reports every
//! pod bound to it Running and Ready (after `ready_after`), and finishes graceful deletions.
//! A pod that does not restart always ends after `ready_after`: Failed with exit code 1 when
//! its command mentions `false`, Succeeded otherwise.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Result;
use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use serde_json::json;

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct FakeKubelet {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn node(client: &Client, name: &str, cpu: &str, memory: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        // A restarted kubelet finds its Node.
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        r => {
            r?;
        }
    }
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = json!({"status": {
        "capacity": {"cpu": cpu, "memory": memory, "pods": "2000"},
        "allocatable": {"cpu": cpu, "memory": memory, "pods": "2000"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "kubelet is posting ready status",
            "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Renews the node's Lease every second, as a kubelet does every 10 s.
async fn heartbeat(client: Client, name: String) {
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    loop {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now}});
        if let Err(e) = leases
            .patch(
                &name,
                &PatchParams::apply("fake-kubelet").force(),
                &Patch::Apply(&lease),
            )
            .await
        {
            eprintln!("fake kubelet {name}: lease: {e}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Starts playing the kubelet of a new node `name` (4 cpu, 8Gi) with the admin `client`.
pub async fn start(client: Client, name: &str, ready_after: Duration) -> Result<FakeKubelet> {
    node(&client, name, "4", "8Gi").await?;
    let name = name.to_string();
    let beat = tokio::spawn(heartbeat(client.clone(), name.clone()));
    let task = tokio::spawn(async move {
        let _beat = AbortOnDrop(beat);
        let pods: Api<Pod> = Api::all(client.clone());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={name}"));
        let mut events = watcher(pods, cfg)
            .default_backoff()
            .applied_objects()
            .boxed();
        let mut n: u32 = 0;
        let mut started = HashSet::new();
        while let Some(Ok(p)) = events.next().await {
            let ns = p.namespace().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            if p.metadata.deletion_timestamp.is_some() {
                let _ = api
                    .delete(&p.name_any(), &DeleteParams::default().grace_period(0))
                    .await;
                continue;
            }
            let uid = p.metadata.uid.clone().unwrap_or_default();
            if !started.insert(uid) {
                continue;
            }
            n += 1;
            let ip = format!("10.244.{}.{}", n / 250, n % 250 + 2);
            let (api, pname) = (api.clone(), p.name_any());
            let spec = p.spec.clone().unwrap_or_default();
            let ends = spec
                .restart_policy
                .as_deref()
                .is_some_and(|r| r != "Always");
            let fails = spec.containers.iter().any(|c| {
                c.command
                    .iter()
                    .chain(c.args.iter())
                    .flatten()
                    .any(|a| a.contains("false"))
            });
            let container = spec
                .containers
                .first()
                .map(|c| c.name.clone())
                .unwrap_or_default();
            tokio::spawn(async move {
                let now = k8s_openapi::jiff::Timestamp::now().to_string();
                let running = |ready: &str| {
                    json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                    "hostIP": "127.0.0.1", "startTime": now,
                    "conditions": [{"type": "Ready", "status": ready, "lastTransitionTime": now},
                        {"type": "ContainersReady", "status": ready, "lastTransitionTime": now}]}})
                };
                let _ = api
                    .patch_status(
                        &pname,
                        &PatchParams::default(),
                        &Patch::Merge(running("False")),
                    )
                    .await;
                tokio::time::sleep(ready_after).await;
                let now = k8s_openapi::jiff::Timestamp::now().to_string();
                let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": now}]}});
                let _ = api
                    .patch_status(&pname, &PatchParams::default(), &Patch::Merge(ready))
                    .await;
                if ends {
                    tokio::time::sleep(ready_after).await;
                    let now = k8s_openapi::jiff::Timestamp::now().to_string();
                    let (phase, code, reason) = if fails {
                        ("Failed", 1, "Error")
                    } else {
                        ("Succeeded", 0, "Completed")
                    };
                    let done = json!({"status": {"phase": phase,
                        "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now}],
                        "containerStatuses": [{"name": container, "ready": false, "restartCount": 0,
                            "image": "", "imageID": "",
                            "state": {"terminated": {"exitCode": code, "reason": reason, "finishedAt": now, "startedAt": now}}}]}});
                    let _ = api
                        .patch_status(&pname, &PatchParams::default(), &Patch::Merge(done))
                        .await;
                }
            });
        }
    });
    Ok(FakeKubelet { task })
}
