//! The controllers and the scheduler against the real kubectl (1.27 and 1.33), with a fake
//! kubelet reporting bound pods Running and Ready.

mod common;
#[path = "common/fake_kubelet.rs"]
mod fake_kubelet;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::{ok, TestServer};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

const WEB: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: 127.0.0.1:5000/test/busybox:v1
";

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    loop {
        if f().await? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn rollout(v: u32) -> Result<()> {
    let ts = TestServer::start_with_controllers().await?;
    let admin = ts.client().await?;
    let _kubelet = fake_kubelet::start(admin.clone(), "node-1", Duration::from_millis(200)).await?;
    let out = ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], WEB));
    assert!(out.contains("deployment.apps/web created"), "{out}");
    let out = ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    assert!(out.contains("successfully rolled out"), "{out}");
    let out = ok(ts.kubectl(v, &["get", "deploy", "web"]));
    assert!(
        out.lines().nth(1).unwrap_or("").split_whitespace().nth(1) == Some("3/3"),
        "{out}"
    );
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let list = pods.list(&ListParams::default().labels("app=web")).await?;
    assert_eq!(list.items.len(), 3);
    assert!(list
        .items
        .iter()
        .all(|p| p.spec.as_ref().unwrap().node_name.as_deref() == Some("node-1")));

    // A new image: a second ReplicaSet, revision 2, the old one scaled to 0.
    ok(ts.kubectl(
        v,
        &[
            "set",
            "image",
            "deploy/web",
            "web=127.0.0.1:5000/test/busybox:v2",
        ],
    ));
    let out = ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    assert!(out.contains("successfully rolled out"), "{out}");
    let rss: Api<ReplicaSet> = Api::namespaced(admin.clone(), "default");
    let list = rss.list(&ListParams::default().labels("app=web")).await?;
    assert_eq!(
        list.items.len(),
        2,
        "{:?}",
        list.items
            .iter()
            .map(|r| r.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    let out = ok(ts.kubectl(v, &["rollout", "history", "deploy/web"]));
    assert!(out.contains("1 ") && out.contains("2 "), "{out}");
    let out = ok(ts.kubectl(v, &["rollout", "history", "deploy/web", "--revision=2"]));
    assert!(out.contains("busybox:v2"), "{out}");

    // Undo: the first ReplicaSet is reused and becomes revision 3.
    ok(ts.kubectl(v, &["rollout", "undo", "deploy/web"]));
    let out = ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    assert!(out.contains("successfully rolled out"), "{out}");
    let list = rss.list(&ListParams::default().labels("app=web")).await?;
    assert_eq!(list.items.len(), 2);
    let deploys: Api<Deployment> = Api::namespaced(admin.clone(), "default");
    let d = deploys.get("web").await?;
    assert_eq!(
        d.metadata.annotations.as_ref().unwrap()["deployment.kubernetes.io/revision"],
        "3"
    );
    let image = &d.spec.unwrap().template.spec.unwrap().containers[0].image;
    assert_eq!(image.as_deref(), Some("127.0.0.1:5000/test/busybox:v1"));

    // Scale, then delete: the pods go with it.
    ok(ts.kubectl(v, &["scale", "deploy/web", "--replicas=5"]));
    ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    eventually("5 pods", Duration::from_secs(30), || async {
        Ok(pods
            .list(&ListParams::default().labels("app=web"))
            .await?
            .items
            .len()
            == 5)
    })
    .await?;
    let out = ok(ts.kubectl(v, &["describe", "deploy", "web"]));
    assert!(out.contains("ScalingReplicaSet"), "{out}");
    ok(ts.kubectl(v, &["delete", "deploy", "web"]));
    eventually("no pods", Duration::from_secs(30), || async {
        Ok(pods
            .list(&ListParams::default().labels("app=web"))
            .await?
            .items
            .is_empty())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_rollout_undo_scale_delete_kubectl_1_33() -> Result<()> {
    rollout(33).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_rollout_undo_scale_delete_kubectl_1_27() -> Result<()> {
    rollout(27).await
}

fn replica_sets_of(list: &[ReplicaSet]) -> Vec<(String, i32, String)> {
    let mut v: Vec<(String, i32, String)> = list
        .iter()
        .map(|r| {
            (
                r.metadata.annotations.as_ref().unwrap()["deployment.kubernetes.io/revision"]
                    .clone(),
                r.spec.as_ref().unwrap().replicas.unwrap_or(0),
                r.spec
                    .as_ref()
                    .unwrap()
                    .template
                    .as_ref()
                    .unwrap()
                    .spec
                    .as_ref()
                    .unwrap()
                    .containers[0]
                    .image
                    .clone()
                    .unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_edits_make_one_replica_set_and_history_limit_zero_keeps_none() -> Result<()> {
    let ts = TestServer::start_with_controllers().await?;
    let admin = ts.client().await?;
    let _kubelet = fake_kubelet::start(admin.clone(), "node-1", Duration::from_millis(50)).await?;
    let v = 33;
    ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], WEB));
    ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    ok(ts.kubectl(v, &["rollout", "pause", "deploy/web"]));
    ok(ts.kubectl(
        v,
        &[
            "set",
            "image",
            "deploy/web",
            "web=127.0.0.1:5000/test/busybox:v2",
        ],
    ));
    ok(ts.kubectl(v, &["set", "env", "deploy/web", "A=1"]));
    let rss: Api<ReplicaSet> = Api::namespaced(admin.clone(), "default");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rss.list(&ListParams::default()).await?.items.len(),
        1,
        "paused: no new ReplicaSet"
    );
    let out = ok(ts.kubectl(
        v,
        &[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Progressing')].reason}",
        ],
    ));
    assert_eq!(out, "DeploymentPaused");
    ok(ts.kubectl(v, &["rollout", "resume", "deploy/web"]));
    ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    let list = rss.list(&ListParams::default()).await?.items;
    assert_eq!(
        replica_sets_of(&list),
        vec![
            ("1".into(), 0, "127.0.0.1:5000/test/busybox:v1".into()),
            ("2".into(), 3, "127.0.0.1:5000/test/busybox:v2".into())
        ]
    );

    // revisionHistoryLimit 0: old ReplicaSets go once scaled down.
    ok(ts.kubectl(
        v,
        &[
            "patch",
            "deploy/web",
            "-p",
            r#"{"spec":{"revisionHistoryLimit":0}}"#,
        ],
    ));
    ok(ts.kubectl(
        v,
        &[
            "set",
            "image",
            "deploy/web",
            "web=127.0.0.1:5000/test/busybox:v3",
        ],
    ));
    ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    eventually(
        "only the current ReplicaSet",
        Duration::from_secs(30),
        || async { Ok(rss.list(&ListParams::default()).await?.items.len() == 1) },
    )
    .await?;
    let list = rss.list(&ListParams::default()).await?.items;
    assert_eq!(
        replica_sets_of(&list),
        vec![("3".into(), 3, "127.0.0.1:5000/test/busybox:v3".into())]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_to_revision_reuses_that_replica_set() -> Result<()> {
    let ts = TestServer::start_with_controllers().await?;
    let admin = ts.client().await?;
    let _kubelet = fake_kubelet::start(admin.clone(), "node-1", Duration::from_millis(50)).await?;
    let v = 27;
    ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], WEB));
    ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    for tag in ["v2", "v3"] {
        ok(ts.kubectl(
            v,
            &[
                "set",
                "image",
                "deploy/web",
                &format!("web=127.0.0.1:5000/test/busybox:{tag}"),
            ],
        ));
        ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    }
    ok(ts.kubectl(v, &["rollout", "undo", "deploy/web", "--to-revision=1"]));
    ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    let rss: Api<ReplicaSet> = Api::namespaced(admin.clone(), "default");
    let list = rss.list(&ListParams::default()).await?.items;
    assert_eq!(
        replica_sets_of(&list),
        vec![
            ("2".into(), 0, "127.0.0.1:5000/test/busybox:v2".into()),
            ("3".into(), 0, "127.0.0.1:5000/test/busybox:v3".into()),
            ("4".into(), 3, "127.0.0.1:5000/test/busybox:v1".into()),
        ]
    );
    let out = ok(ts.kubectl(v, &["rollout", "history", "deploy/web"]));
    let revisions: Vec<&str> = out
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(revisions, ["2", "3", "4"], "{out}");
    Ok(())
}

/// Watches the pods of `web` during a rollout of 10 replicas with maxSurge 2 and
/// maxUnavailable 1: never more than 12 pods, never fewer than 9 ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_keeps_within_surge_and_unavailable() -> Result<()> {
    use futures_util::StreamExt;
    use kube::runtime::{watcher, WatchStreamExt};
    let ts = TestServer::start_with_controllers().await?;
    let admin = ts.client().await?;
    let _kubelet = fake_kubelet::start(admin.clone(), "node-1", Duration::from_millis(300)).await?;
    let v = 33;
    let spec = WEB.replace(
        "replicas: 3",
        "replicas: 10\n  strategy:\n    rollingUpdate: {maxSurge: 2, maxUnavailable: 1}",
    );
    ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], &spec));
    ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let mut stream = watcher::watcher(pods, watcher::Config::default().labels("app=web"))
        .default_backoff()
        .boxed();
    let mut seen: std::collections::BTreeMap<String, Pod> = Default::default();
    // Take the initial list first, then change the image.
    while let Some(ev) = stream.next().await {
        match ev? {
            watcher::Event::InitApply(p) => {
                seen.insert(p.metadata.name.clone().unwrap(), p);
            }
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    ok(ts.kubectl(
        v,
        &[
            "set",
            "image",
            "deploy/web",
            "web=127.0.0.1:5000/test/busybox:v2",
        ],
    ));
    let (mut max_pods, mut min_ready) = (0, usize::MAX);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ev = tokio::time::timeout_at(deadline.into(), stream.next()).await?;
        match ev.expect("watch goes on")? {
            watcher::Event::Apply(p) => {
                seen.insert(p.metadata.name.clone().unwrap(), p);
            }
            watcher::Event::Delete(p) => {
                seen.remove(p.metadata.name.as_deref().unwrap());
            }
            _ => continue,
        }
        let live: Vec<&Pod> = seen
            .values()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let ready = live
            .iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        max_pods = max_pods.max(live.len());
        min_ready = min_ready.min(ready);
        let updated = live
            .iter()
            .filter(|p| {
                p.spec.as_ref().unwrap().containers[0].image.as_deref()
                    == Some("127.0.0.1:5000/test/busybox:v2")
            })
            .count();
        if updated == 10 && ready == 10 && live.len() == 10 {
            break;
        }
    }
    assert!(
        max_pods <= 12,
        "at most replicas + maxSurge pods: saw {max_pods}"
    );
    assert!(max_pods > 10, "the rollout surged: saw at most {max_pods}");
    assert!(
        min_ready >= 9,
        "at least replicas - maxUnavailable ready: saw {min_ready}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_fits_nowhere_is_unschedulable_until_a_node_fits() -> Result<()> {
    let ts = TestServer::start_with_controllers().await?;
    let admin = ts.client().await?;
    let _kubelet = fake_kubelet::start(admin.clone(), "node-1", Duration::from_millis(50)).await?;
    let v = 33;
    let pod = "apiVersion: v1
kind: Pod
metadata: {name: big}
spec:
  containers:
  - name: c
    image: 127.0.0.1:5000/test/busybox:v1
    resources: {requests: {memory: 64Gi}}
";
    ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], pod));
    let want = "0/1 nodes are available: 1 Insufficient memory. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.";
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    eventually("PodScheduled=False", Duration::from_secs(20), || async {
        let p = pods.get("big").await?;
        Ok(p.status.and_then(|s| s.conditions).is_some_and(|c| {
            c.iter().any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
                    && c.message.as_deref() == Some(want)
            })
        }))
    })
    .await?;
    let out = ok(ts.kubectl(v, &["describe", "pod", "big"]));
    assert!(
        out.contains("FailedScheduling") && out.contains("Insufficient memory"),
        "{out}"
    );
    let out = ok(ts.kubectl(v, &["get", "pod", "big"]));
    assert!(out.contains("Pending"), "{out}");
    // A node with room arrives: the pod is bound to it.
    fake_kubelet::node(&admin, "node-big", "8", "128Gi").await?;
    eventually("bound to node-big", Duration::from_secs(40), || async {
        let p = pods.get("big").await?;
        Ok(p.spec.and_then(|s| s.node_name).as_deref() == Some("node-big"))
    })
    .await?;
    let out = ok(ts.kubectl(
        v,
        &["get", "events", "--field-selector", "reason=Scheduled"],
    ));
    assert!(
        out.contains("Successfully assigned default/big to node-big"),
        "{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_get_endpoints_of_ready_pods() -> Result<()> {
    let ts = TestServer::start_with_controllers().await?;
    let admin = ts.client().await?;
    let _kubelet = fake_kubelet::start(admin.clone(), "node-1", Duration::from_millis(50)).await?;
    let v = 33;
    let svc = "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
";
    let deploy = WEB.replace(
        "image: 127.0.0.1:5000/test/busybox:v1",
        "image: 127.0.0.1:5000/test/busybox:v1\n        ports: [{name: http, containerPort: 8080}]",
    );
    ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], &format!("{deploy}---\n{svc}")));
    ok(ts.kubectl(v, &["rollout", "status", "deploy/web", "--timeout=60s"]));
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(admin.clone(), "default");
    eventually(
        "3 ready endpoints on port 8080",
        Duration::from_secs(20),
        || async {
            let l = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                .await?;
            Ok(l.items.len() == 1
                && l.items[0]
                    .endpoints
                    .iter()
                    .filter(|e| e.conditions.as_ref().unwrap().ready == Some(true))
                    .count()
                    == 3
                && l.items[0].ports.as_ref().unwrap()[0].port == Some(8080))
        },
    )
    .await?;
    let out = ok(ts.kubectl(v, &["describe", "svc", "web"]));
    let line = out
        .lines()
        .find(|l| l.starts_with("Endpoints:"))
        .unwrap_or("");
    assert_eq!(line.matches(":8080").count(), 3, "{out}");
    // A pod that stops being ready leaves the ready endpoints.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let victim = pods
        .list(&ListParams::default().labels("app=web"))
        .await?
        .items[0]
        .metadata
        .name
        .clone()
        .unwrap();
    let unready =
        serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}});
    pods.patch_status(
        &victim,
        &Default::default(),
        &kube::api::Patch::Merge(&unready),
    )
    .await?;
    eventually("2 ready endpoints", Duration::from_secs(20), || async {
        let l = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
            .await?;
        let eps = &l.items[0].endpoints;
        Ok(eps.len() == 3
            && eps
                .iter()
                .filter(|e| e.conditions.as_ref().unwrap().ready == Some(true))
                .count()
                == 2)
    })
    .await?;
    ok(ts.kubectl(v, &["delete", "svc", "web"]));
    eventually("no slices", Duration::from_secs(20), || async {
        Ok(slices.list(&ListParams::default()).await?.items.is_empty())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_sets_run_one_pod_per_eligible_node() -> Result<()> {
    let ts = TestServer::start_with_controllers().await?;
    let admin = ts.client().await?;
    let _a = fake_kubelet::start(admin.clone(), "node-a", Duration::from_millis(50)).await?;
    let _b = fake_kubelet::start(admin.clone(), "node-b", Duration::from_millis(50)).await?;
    let v = 33;
    let ds = "apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector:
    matchLabels: {app: agent}
  template:
    metadata:
      labels: {app: agent}
    spec:
      containers:
      - name: c
        image: 127.0.0.1:5000/test/busybox:v1
";
    ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], ds));
    let out = ok(ts.kubectl(v, &["rollout", "status", "ds/agent", "--timeout=60s"]));
    assert!(out.contains("successfully rolled out"), "{out}");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let nodes_of = || async {
        let mut n: Vec<String> = pods
            .list(&ListParams::default().labels("app=agent"))
            .await?
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.spec?.node_name)
            .collect();
        n.sort();
        anyhow::Ok(n)
    };
    assert_eq!(nodes_of().await?, ["node-a", "node-b"]);
    let out = ok(ts.kubectl(v, &["get", "ds", "agent"]));
    assert!(
        out.lines()
            .nth(1)
            .unwrap_or("")
            .split_whitespace()
            .take(6)
            .eq(["agent", "2", "2", "2", "2", "2"]),
        "{out}"
    );
    // A nodeSelector only node-b matches: the pod on node-a goes.
    ok(ts.kubectl(v, &["label", "node", "node-b", "role=edge"]));
    ok(ts.kubectl(
        v,
        &[
            "patch",
            "ds/agent",
            "-p",
            r#"{"spec":{"template":{"spec":{"nodeSelector":{"role":"edge"}}}}}"#,
        ],
    ));
    ok(ts.kubectl(v, &["rollout", "status", "ds/agent", "--timeout=60s"]));
    eventually("one pod on node-b", Duration::from_secs(30), || async {
        Ok(nodes_of().await? == ["node-b"])
    })
    .await?;
    Ok(())
}

const JOB: &str = "apiVersion: batch/v1
kind: Job
metadata: {name: NAME}
spec:
  completions: 3
  parallelism: 2
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: c
        image: 127.0.0.1:5000/test/busybox:v1
        command: [CMD]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_complete_or_fail() -> Result<()> {
    let ts = TestServer::start_with_controllers().await?;
    let admin = ts.client().await?;
    let _kubelet = fake_kubelet::start(admin.clone(), "node-1", Duration::from_millis(100)).await?;
    for v in [27, 33] {
        let ok_job = JOB
            .replace("NAME", &format!("ok-{v}"))
            .replace("CMD", "'true'");
        ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], &ok_job));
        let out = ok(ts.kubectl(
            v,
            &[
                "wait",
                "--for=condition=complete",
                &format!("job/ok-{v}"),
                "--timeout=60s",
            ],
        ));
        assert!(out.contains("condition met"), "{out}");
        let out = ok(ts.kubectl(
            v,
            &[
                "get",
                "job",
                &format!("ok-{v}"),
                "-o",
                "jsonpath={.status.succeeded} {.status.active}",
            ],
        ));
        assert_eq!(out, "3 0");
        let bad_job = JOB
            .replace("NAME", &format!("bad-{v}"))
            .replace("CMD", "'false'");
        ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], &bad_job));
        ok(ts.kubectl(
            v,
            &[
                "wait",
                "--for=condition=failed",
                &format!("job/bad-{v}"),
                "--timeout=60s",
            ],
        ));
        let out = ok(ts.kubectl(
            v,
            &[
                "get",
                "job",
                &format!("bad-{v}"),
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Failed')].reason}",
            ],
        ));
        assert_eq!(out, "BackoffLimitExceeded");
    }
    let out = ok(ts.kubectl(33, &["get", "jobs"]));
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok-33") && l.contains("Complete") && l.contains("3/3")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("bad-33") && l.contains("Failed")),
        "{out}"
    );
    let out = ok(ts.kubectl(33, &["describe", "job", "bad-33"]));
    assert!(out.contains("BackoffLimitExceeded"), "{out}");
    // A finished Job with ttlSecondsAfterFinished goes away with its pods.
    let ttl = JOB.replace("NAME", "ttl").replace("CMD", "'true'").replace(
        "backoffLimit: 0",
        "backoffLimit: 0\n  ttlSecondsAfterFinished: 1",
    );
    ok(ts.kubectl_stdin(33, &["apply", "-f", "-"], &ttl));
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(admin.clone(), "default");
    eventually("the ttl job deleted", Duration::from_secs(40), || async {
        Ok(jobs.get_opt("ttl").await?.is_none())
    })
    .await?;
    Ok(())
}

/// A node that stops renewing its Lease becomes Ready=Unknown with the unreachable taints,
/// and its pods are evicted when their tolerations run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_tainted_and_its_pods_evicted() -> Result<()> {
    let ts = TestServer::start_with_config(|c| {
        c.node_monitor_grace_period = Duration::from_secs(3);
        c.node_monitor_period = Duration::from_millis(500);
    })
    .await?;
    let admin = ts.client().await?;
    let kubelet = fake_kubelet::start(admin.clone(), "node-1", Duration::from_millis(50)).await?;
    let v = 33;
    let pod = "apiVersion: v1
kind: Pod
metadata: {name: brief}
spec:
  tolerations:
  - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
  containers:
  - {name: c, image: 127.0.0.1:5000/test/busybox:v1}
";
    ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], pod));
    ok(ts.kubectl(
        v,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/brief",
            "--timeout=30s",
        ],
    ));
    // Healthy for longer than the grace period while the lease is renewed.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(admin.clone());
    let taints = |n: &k8s_openapi::api::core::v1::Node| {
        let mut t: Vec<String> = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|t| format!("{}:{}", t.key, t.effect))
            .collect();
        t.sort();
        t
    };
    assert!(taints(&nodes.get("node-1").await?).is_empty());
    drop(kubelet);
    eventually(
        "Ready=Unknown and unreachable taints",
        Duration::from_secs(20),
        || async {
            let n = nodes.get("node-1").await?;
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready").cloned());
            Ok(ready.is_some_and(|r| {
                r.status == "Unknown" && r.reason.as_deref() == Some("NodeStatusUnknown")
            }) && taints(&n)
                == [
                    "node.kubernetes.io/unreachable:NoExecute",
                    "node.kubernetes.io/unreachable:NoSchedule",
                ])
        },
    )
    .await?;
    let out = ok(ts.kubectl(v, &["get", "nodes"]));
    assert!(out.contains("NotReady"), "{out}");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    eventually("the pod evicted", Duration::from_secs(20), || async {
        Ok(pods
            .get("brief")
            .await?
            .metadata
            .deletion_timestamp
            .is_some())
    })
    .await?;
    // A new pod is not scheduled there any more.
    ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], &pod.replace("brief", "later")));
    eventually("later unschedulable", Duration::from_secs(20), || async {
        let p = pods.get("later").await?;
        Ok(p.status.and_then(|s| s.conditions).is_some_and(|c| {
            c.iter().any(|c| {
                c.type_ == "PodScheduled"
                    && c.message.as_deref().is_some_and(|m| {
                        m.contains("untolerated taint {node.kubernetes.io/unreachable: }")
                    })
            })
        }))
    })
    .await?;
    Ok(())
}
