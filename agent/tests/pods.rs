//! The agent on the real kernel against the real API server, as a node: registration, pods
//! from Pending to Running with a reachable IP, kubelet's phases and reasons, deletion that
//! leaves nothing behind. Root; needs `tests/testbed/up`.

mod common;

use anyhow::Result;
use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams};
use serde_json::json;
use std::io::{Read, Write};
use std::time::Duration;

fn pod(name: &str, policy: &str, image: &str, script: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": policy,
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "c", "image": image, "command": ["sh", "-c", script]}]
        }
    })
}

/// GET / from `ip:port` after checking that the route to `ip` goes over `bridge`.
fn http_get(ip: &str, port: u16, bridge: &str) -> Result<String> {
    let route = sh(&format!("ip route get {ip}"));
    anyhow::ensure!(
        route.contains(&format!("dev {bridge} ")),
        "route to {ip} is not over {bridge}: {route}"
    );
    let addr = std::net::SocketAddr::new(ip.parse()?, port);
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_registers_and_a_pod_runs_with_a_reachable_ip_then_is_deleted_cleanly() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;

    let nodes: Api<Node> = Api::all(c.admin.clone());
    let deadline = std::time::Instant::now() + patience(Duration::from_secs(20));
    // Settled: Ready, its pod range assigned and no not-ready taint, so that only the agent
    // could still write to it (the node controllers react to a new node with writes of theirs).
    let node = loop {
        if let Some(n) = nodes.get_opt(&c.node).await? {
            let conditions = n.status.iter().flat_map(|s| s.conditions.iter().flatten());
            let ready = { conditions }.any(|c| c.type_ == "Ready" && c.status == "True");
            let spec = n.spec.clone().unwrap_or_default();
            if ready && spec.pod_cidr.is_some() && spec.taints.unwrap_or_default().is_empty() {
                break n;
            }
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "node not registered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let labels = node.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels["kubernetes.io/hostname"], c.node);
    assert_eq!(labels["kubernetes.io/os"], "linux");
    let status = node.status.unwrap();
    let ready = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref()),
        ("True", Some("KubeletReady"))
    );
    assert_eq!(
        status.node_info.unwrap().container_runtime_version,
        format!("oxlet://{}", env!("CARGO_PKG_VERSION"))
    );
    assert!(status.capacity.unwrap().contains_key("ephemeral-storage"));
    let leases: Api<Lease> = Api::namespaced(c.admin.clone(), "kube-node-lease");
    let mut lease = None;
    for _ in 0..50 * slowdown() {
        lease = leases.get_opt(&c.node).await?;
        if lease.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let spec = lease.expect("node lease").spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some(c.node.as_str()));
    assert_eq!(spec.lease_duration_seconds, Some(40));
    // Status is computed every second here but written only when it changed.
    let before = nodes.get(&c.node).await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = nodes.get(&c.node).await?;
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version,
        "the node was written:\nbefore {}\nafter {}",
        serde_json::to_string(&before)?,
        serde_json::to_string(&after)?
    );

    let script =
        "mkdir -p /www && echo hello-from-oxlet > /www/index.html && exec httpd -f -p 8080 -h /www";
    let created = c
        .create_pod(pod("web", "Always", busybox(), script))
        .await?;
    assert_eq!(phase(&created), "Pending");
    let p = c
        .wait_pod("web", Duration::from_secs(60), "Running and Ready", |p| {
            phase(p) == "Running" && condition(p, "Ready").as_deref() == Some("True")
        })
        .await?;
    let st = p.status.clone().unwrap();
    let ip = st.pod_ip.clone().expect("podIP");
    assert!(ip.starts_with(&format!("10.244.{}.", c.x)), "{ip}");
    assert_eq!(st.pod_ips.unwrap()[0].ip, ip);
    assert!(st.host_ip.is_some() && st.start_time.is_some());
    assert_eq!(st.qos_class.as_deref(), Some("BestEffort"));
    for cond in [
        "PodScheduled",
        "PodReadyToStartContainers",
        "Initialized",
        "ContainersReady",
    ] {
        assert_eq!(condition(&p, cond).as_deref(), Some("True"), "{cond}");
    }
    let cs = container(&p);
    assert!(cs.container_id.as_deref().unwrap().starts_with("oxlet://"));
    assert!(cs.state.unwrap().running.is_some());
    assert!(cs.image_id.contains("@sha256:"), "{}", cs.image_id);
    assert_eq!((cs.ready, cs.restart_count), (true, 0));

    let mut body = String::new();
    for _ in 0..50 * slowdown() {
        match http_get(&ip, 8080, &c.bridge()) {
            Ok(b) => {
                body = b;
                break;
            }
            Err(e) if e.to_string().contains("route") => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    assert!(body.contains("hello-from-oxlet"), "{body}");

    let events = c.event_reasons("web").await?;
    assert_eq!(events, ["Pulling", "Pulled", "Created", "Started"]);

    let uid = p.metadata.uid.clone().unwrap();
    assert_eq!(c.bridge_ports().len(), 1);
    c.pods().delete("web", &DeleteParams::default()).await?;
    c.wait_gone("web", Duration::from_secs(30)).await?;
    c.wait_events("web", &["Killing"]).await?;
    let ctx = agent::pod_runtime::PodRuntime::new(&c.cfg, "127.0.0.1".parse()?)?;
    assert_eq!(ctx.local_pods(), Vec::<String>::new());
    assert!(c.bridge_ports().is_empty(), "{:?}", c.bridge_ports());
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    assert!(
        !mounts.contains(c.dir.path().to_str().unwrap()),
        "mounts left"
    );
    assert!(
        !runtime::cgroup::controller_dir("memory", &format!("kubepods/besteffort/pod{uid}"))
            .exists()
    );
    assert!(
        !runtime::cgroup::controller_dir("cpu", &format!("kubepods/besteffort/pod{uid}")).exists()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_pods_succeed_or_fail_with_kubelet_reasons() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    c.create_pod(pod("ok", "Never", busybox(), "echo done"))
        .await?;
    c.create_pod(pod("bad", "Never", busybox(), "exit 1"))
        .await?;
    let ok = c
        .wait_pod("ok", Duration::from_secs(60), "Succeeded", |p| {
            phase(p) == "Succeeded"
        })
        .await?;
    let t = container(&ok).state.unwrap().terminated.unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));
    assert!(t.started_at.is_some() && t.finished_at.is_some());
    assert_eq!(condition(&ok, "Ready").as_deref(), Some("False"));
    let bad = c
        .wait_pod("bad", Duration::from_secs(60), "Failed", |p| {
            phase(p) == "Failed"
        })
        .await?;
    let t = container(&bad).state.unwrap().terminated.unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (1, Some("Error")));
    assert_eq!(container(&bad).restart_count, 0);
    // Finished pods give their network back; the objects stay for their status.
    let deadline = std::time::Instant::now() + patience(Duration::from_secs(10));
    while !c.bridge_ports().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            c.bridge_ports()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ok = c.pods().get("ok").await?;
    assert_eq!(phase(&ok), "Succeeded");
    assert!(ok.status.unwrap().pod_ip.is_some());
    c.pods().delete("ok", &DeleteParams::default()).await?;
    c.wait_gone("ok", Duration::from_secs(20)).await?;
    // A finished pod is deleted at once by the API server; the agent cleans up after it.
    c.wait_no_leftovers(&ok.metadata.uid.clone().unwrap())
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_errors_show_kubelet_reasons() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.cfg.backoff_base = Duration::from_secs(30);
    c.start_agent().await?;
    c.create_pod(pod(
        "missing",
        "Always",
        &image("test/does-not-exist:latest"),
        "true",
    ))
    .await?;
    c.create_pod(pod(
        "invalid",
        "Always",
        &image("Test/UPPER:latest"),
        "true",
    ))
    .await?;
    let mut seen = Vec::new();
    c.wait_pod(
        "missing",
        Duration::from_secs(30),
        "ErrImagePull then ImagePullBackOff",
        |p| {
            if let Some(r) = waiting_reason(p) {
                if seen.last() != Some(&r) {
                    seen.push(r);
                }
            }
            seen.contains(&"ImagePullBackOff".to_string())
        },
    )
    .await?;
    // The watch may start after the first report; what it saw is in kubelet's order.
    assert!(
        seen == ["ErrImagePull", "ImagePullBackOff"] || seen == ["ImagePullBackOff"],
        "{seen:?}"
    );
    let p = c.pods().get("missing").await?;
    assert_eq!(phase(&p), "Pending");
    let msg = container(&p)
        .state
        .unwrap()
        .waiting
        .unwrap()
        .message
        .unwrap();
    assert!(msg.contains("ErrImagePull"), "{msg}");
    c.wait_events("missing", &["Pulling", "Failed", "BackOff"])
        .await?;
    let errors: Vec<String> = c
        .events("missing")
        .await?
        .into_iter()
        .filter(|(r, m)| r == "Failed" && m.starts_with("Error: "))
        .map(|(_, m)| m)
        .collect();
    assert_eq!(errors, ["Error: ErrImagePull", "Error: ImagePullBackOff"]);
    let invalid = c
        .wait_pod(
            "invalid",
            Duration::from_secs(30),
            "InvalidImageName",
            |p| waiting_reason(p).as_deref() == Some("InvalidImageName"),
        )
        .await?;
    let msg = container(&invalid)
        .state
        .unwrap()
        .waiting
        .unwrap()
        .message
        .unwrap();
    assert!(msg.contains("lowercase"), "{msg}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_container_backs_off_with_increasing_restart_count() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.cfg.backoff_base = Duration::from_secs(1);
    c.start_agent().await?;
    c.create_pod(pod("crash", "Always", busybox(), "exit 3"))
        .await?;
    let mut saw_backoff = false;
    let p = c
        .wait_pod("crash", Duration::from_secs(60), "3 restarts", |p| {
            saw_backoff |= waiting_reason(p).as_deref() == Some("CrashLoopBackOff");
            container(p).restart_count >= 3
        })
        .await?;
    assert!(saw_backoff, "no CrashLoopBackOff seen");
    c.wait_events("crash", &["Started", "BackOff"]).await?;
    assert_eq!(phase(&p), "Running");
    let last = container(&p).last_state.unwrap().terminated.unwrap();
    assert_eq!((last.exit_code, last.reason.as_deref()), (3, Some("Error")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_containers_run_in_order_before_app_containers() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    let with_init = |name: &str, policy: &str, second: &str| {
        json!({
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": policy,
                "terminationGracePeriodSeconds": 1,
                "initContainers": [
                    {"name": "first", "image": busybox(), "command": ["sh", "-c", "sleep 2"]},
                    {"name": "second", "image": busybox(), "command": ["sh", "-c", second]}
                ],
                "containers": [{"name": "app", "image": busybox(), "command": ["sleep", "3600"]}]
            }
        })
    };
    c.create_pod(with_init("ok", "Always", "exit 0")).await?;
    c.create_pod(with_init("bad", "Never", "exit 7")).await?;
    let init_statuses = |p: &k8s_openapi::api::core::v1::Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.init_container_statuses.clone())
            .unwrap_or_default()
    };
    let mut saw_initializing = false;
    let ok = c
        .wait_pod("ok", Duration::from_secs(60), "Running", |p| {
            saw_initializing |= condition(p, "Initialized").as_deref() == Some("False")
                && waiting_reason(p).as_deref() == Some("PodInitializing");
            phase(p) == "Running"
        })
        .await?;
    assert!(
        saw_initializing,
        "app container never shown as PodInitializing"
    );
    assert_eq!(condition(&ok, "Initialized").as_deref(), Some("True"));
    let inits = init_statuses(&ok);
    assert_eq!(inits.len(), 2);
    let ended: Vec<_> = inits
        .iter()
        .map(|s| s.state.clone().unwrap().terminated.unwrap())
        .collect();
    assert!(ended
        .iter()
        .all(|t| t.exit_code == 0 && t.reason.as_deref() == Some("Completed")));
    assert!(ended[0].finished_at <= ended[1].started_at, "{ended:?}");

    let bad = c
        .wait_pod("bad", Duration::from_secs(60), "Failed", |p| {
            phase(p) == "Failed"
        })
        .await?;
    let t = init_statuses(&bad)[1]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (7, Some("Error")));
    assert_eq!(waiting_reason(&bad).as_deref(), Some("PodInitializing"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_start_before_later_init_containers_restart_and_end_with_the_pod() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    // The sidecar marks itself up in a shared volume after a second; its startup probe holds
    // the next init container back until then, which checks the mark.
    let pod = |name: &str, policy: &str, side: &str, app: &str| {
        json!({
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": policy,
                "terminationGracePeriodSeconds": 1,
                "volumes": [{"name": "shared", "emptyDir": {}}],
                "initContainers": [
                    {"name": "side", "image": busybox(), "restartPolicy": "Always",
                     "command": ["sh", "-c", side],
                     "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
                     "startupProbe": {"exec": {"command": ["test", "-f", "/shared/up"]}, "periodSeconds": 1}},
                    {"name": "check", "image": busybox(), "command": ["test", "-f", "/shared/up"],
                     "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]}
                ],
                "containers": [{"name": "app", "image": busybox(), "command": ["sh", "-c", app]}]
            }
        })
    };
    // A job-like pod: done when its app container is, though the sidecar never ends.
    c.create_pod(pod(
        "job",
        "Never",
        "sleep 1; touch /shared/up; exec sleep 3600",
        "sleep 2",
    ))
    .await?;
    // A sidecar that exits every few seconds is restarted beside a running app container.
    c.create_pod(pod(
        "flaky",
        "Always",
        "sleep 1; touch /shared/up; sleep 2; exit 3",
        "sleep 3600",
    ))
    .await?;
    let inits = |p: &k8s_openapi::api::core::v1::Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.init_container_statuses.clone())
            .unwrap_or_default()
    };
    let job = c
        .wait_pod("job", Duration::from_secs(60), "Succeeded", |p| {
            phase(p) == "Succeeded"
        })
        .await?;
    let check = inits(&job)[1].state.clone().unwrap().terminated.unwrap();
    assert_eq!(
        check.exit_code, 0,
        "the init container after the sidecar saw it started"
    );
    assert_eq!(
        container(&job).state.unwrap().terminated.unwrap().exit_code,
        0
    );

    let flaky = c
        .wait_pod(
            "flaky",
            Duration::from_secs(60),
            "a restarted sidecar",
            |p| phase(p) == "Running" && inits(p).first().is_some_and(|s| s.restart_count >= 1),
        )
        .await?;
    assert_eq!(condition(&flaky, "Initialized").as_deref(), Some("True"));
    assert_eq!(
        container(&flaky).restart_count,
        0,
        "the app container kept running"
    );
    assert!(container(&flaky).state.unwrap().running.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pull_secrets_authenticate_to_the_registry() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(c.admin.clone(), "default");
    let cfg =
        json!({"auths": {auth_registry(): {"username": "oxlet", "password": "oxlet-secret"}}});
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "regcred"},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": cfg.to_string()}
    }))?;
    secrets.create(&Default::default(), &secret).await?;
    let private = &format!("{}/test/busybox:latest", auth_registry());
    let mut with = pod("with", "Always", private, "sleep 3600");
    with["spec"]["imagePullSecrets"] = json!([{"name": "regcred"}]);
    c.create_pod(with).await?;
    c.create_pod(pod("without", "Always", private, "sleep 3600"))
        .await?;
    c.wait_pod("with", Duration::from_secs(60), "Running", |p| {
        phase(p) == "Running"
    })
    .await?;
    let without = c
        .wait_pod(
            "without",
            Duration::from_secs(30),
            "an image pull error",
            |p| {
                matches!(
                    waiting_reason(p).as_deref(),
                    Some("ErrImagePull" | "ImagePullBackOff")
                )
            },
        )
        .await?;
    let msg = container(&without)
        .state
        .unwrap()
        .waiting
        .unwrap()
        .message
        .unwrap();
    assert!(
        msg.contains("401") || msg.to_lowercase().contains("unauthorized"),
        "{msg}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_run_on_the_reference_bridge_plugin_too() -> Result<()> {
    let mut c = Cluster::with_plugin("bridge", "1.0.0").await?;
    c.start_agent().await?;
    let script =
        "mkdir -p /www && echo via-reference > /www/index.html && exec httpd -f -p 8080 -h /www";
    c.create_pod(pod("ref", "Always", busybox(), script))
        .await?;
    let p = c
        .wait_pod("ref", Duration::from_secs(60), "Running", |p| {
            phase(p) == "Running"
        })
        .await?;
    let ip = p.status.clone().unwrap().pod_ip.expect("podIP");
    let mut body = String::new();
    for _ in 0..50 {
        match http_get(&ip, 8080, &c.bridge()) {
            Ok(b) => {
                body = b;
                break;
            }
            Err(e) if e.to_string().contains("route") => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    assert!(body.contains("via-reference"), "{body}");
    c.pods().delete("ref", &DeleteParams::default()).await?;
    c.wait_gone("ref", Duration::from_secs(30)).await?;
    c.wait_no_leftovers(p.metadata.uid.as_deref().unwrap())
        .await?;
    assert!(c.bridge_ports().is_empty(), "{:?}", c.bridge_ports());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_network_pods_get_the_node_ip_and_no_pod_network() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    let mut spec = pod("host", "Always", busybox(), "sleep 3600");
    spec["spec"]["hostNetwork"] = json!(true);
    c.create_pod(spec).await?;
    let p = c
        .wait_pod("host", Duration::from_secs(60), "Running", |p| {
            phase(p) == "Running"
        })
        .await?;
    let st = p.status.clone().unwrap();
    assert!(st.pod_ip.is_some());
    assert_eq!(st.pod_ip, st.host_ip);
    assert!(c.bridge_ports().is_empty(), "{:?}", c.bridge_ports());
    c.pods().delete("host", &DeleteParams::default()).await?;
    c.wait_gone("host", Duration::from_secs(30)).await?;
    c.wait_no_leftovers(p.metadata.uid.as_deref().unwrap())
        .await?;
    Ok(())
}
