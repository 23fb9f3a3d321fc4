//! Probes and lifecycle hooks on the real kernel: liveness restarts, readiness in the Service's
//! EndpointSlice, startup probes holding the others back, tcpSocket and grpc probes, postStart
//! and preStop hooks, grace periods and termination messages. Root; needs `tests/testbed/up`.

mod common;

use anyhow::{bail, Context, Result};
use common::*;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn uid(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

fn status_of(p: &Pod, name: &str) -> k8s_openapi::api::core::v1::ContainerStatus {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|v| v.iter().find(|c| c.name == name).cloned())
        .unwrap_or_default()
}

/// Runs `cmd` in the pod's running container `name` through the runtime, as `kubectl exec`
/// would; its stdout.
fn exec(c: &Cluster, p: &Pod, name: &str, cmd: &[&str]) -> Result<String> {
    let rt = runtime::cri::Runtime::new(runtime::cri::Config {
        data_dir: c.cfg.data_dir.clone(),
        run_dir: c.cfg.run_dir.clone(),
        shim: c.cfg.shim.clone(),
        log_max_size: 1 << 20,
        log_max_files: 1,
    });
    let id = status_of(p, name)
        .container_id
        .context("container id")?
        .trim_start_matches("oxlet://")
        .to_string();
    let args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
    let out = runtime::container::exec(rt.paths(), &id, &args, Some(Duration::from_secs(10)))?;
    anyhow::ensure!(
        out.exit_code == 0,
        "{cmd:?} exited {}: {}",
        out.exit_code,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn wait_event(c: &Cluster, pod: &str, reason: &str, text: &str) -> Result<String> {
    let deadline = Instant::now() + T;
    loop {
        let evs = c.events(pod).await?;
        if let Some((_, m)) = evs.iter().find(|(r, m)| r == reason && m.contains(text)) {
            return Ok(m.clone());
        }
        if Instant::now() > deadline {
            bail!("pod {pod}: no {reason} event with {text:?} in {evs:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_exec_probe_restarts_the_container_and_the_pod_stays_running() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.cfg.backoff_base = Duration::from_secs(1);
    c.start_agent().await?;
    // The tutorial's liveness-exec pod, its 30 s shortened to 3 s.
    c.create_pod(json!({
        "metadata": {"name": "liveness-exec", "labels": {"test": "liveness"}},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "liveness",
                "image": busybox(),
                "args": ["/bin/sh", "-c", "touch /tmp/healthy; sleep 3; rm -f /tmp/healthy; sleep 600"],
                "livenessProbe": {
                    "exec": {"command": ["cat", "/tmp/healthy"]},
                    "initialDelaySeconds": 1,
                    "periodSeconds": 1,
                }
            }]
        }
    }))
    .await?;
    let p = c
        .wait_pod("liveness-exec", T, "a restart", |p| {
            container(p).restart_count >= 1
                && container(p).state.is_some_and(|s| s.running.is_some())
        })
        .await?;
    assert_eq!(phase(&p), "Running");
    let cs = container(&p);
    let last = cs
        .last_state
        .unwrap()
        .terminated
        .expect("lastState terminated");
    assert_eq!(
        (last.exit_code, last.reason.as_deref()),
        (137, Some("Error"))
    );
    let unhealthy = wait_event(&c, "liveness-exec", "Unhealthy", "Liveness probe failed:").await?;
    assert!(
        unhealthy.contains("cat: can't open '/tmp/healthy': No such file or directory"),
        "{unhealthy}"
    );
    wait_event(
        &c,
        "liveness-exec",
        "Killing",
        "Container liveness failed liveness probe, will be restarted",
    )
    .await?;
    // The new attempt passes its probe for 3 s, then fails again: the count keeps going up.
    c.wait_pod("liveness-exec", T, "a second restart", |p| {
        container(p).restart_count >= 2 && phase(p) == "Running"
    })
    .await?;
    Ok(())
}

fn ready_endpoints(slices: &[EndpointSlice]) -> Vec<(String, Option<bool>)> {
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .map(|e| {
            (
                e.addresses.first().cloned().unwrap_or_default(),
                e.conditions.as_ref().and_then(|c| c.ready),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_readiness_probe_takes_the_pod_out_of_its_service_endpoints_and_back() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    let app = format!("ready-{}", c.x);
    let svcs: Api<Service> = Api::namespaced(c.admin.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": "http"}]}
    }))?;
    svcs.create(&PostParams::default(), &svc).await?;
    c.create_pod(json!({
        "metadata": {"name": "web", "labels": {"app": app}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "httpd",
                "image": busybox(),
                "command": ["sh", "-c", "mkdir -p /www && echo ok > /www/healthz && exec httpd -f -p 8080 -h /www"],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {
                    "httpGet": {"path": "/healthz", "port": "http", "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                    "periodSeconds": 1,
                    "failureThreshold": 1,
                }
            }]
        }
    }))
    .await?;
    let ready = |want: &'static str| {
        move |p: &Pod| phase(p) == "Running" && condition(p, "Ready").as_deref() == Some(want)
    };
    let p = c.wait_pod("web", T, "Ready", ready("True")).await?;
    assert_eq!(condition(&p, "ContainersReady").as_deref(), Some("True"));
    assert!(container(&p).ready);
    let ip = p
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .context("pod IP")?;
    let slices: Api<EndpointSlice> = Api::namespaced(c.admin.clone(), "default");
    let lp = ListParams::default().labels("kubernetes.io/service-name=web");
    let wait_slice = |want: bool| {
        let (slices, lp, ip) = (slices.clone(), lp.clone(), ip.clone());
        async move {
            let deadline = Instant::now() + T;
            loop {
                let got = ready_endpoints(&slices.list(&lp).await?.items);
                if got.contains(&(ip.clone(), Some(want))) {
                    return Ok::<_, anyhow::Error>(got);
                }
                if Instant::now() > deadline {
                    bail!("endpoint {ip} never ready={want}: {got:?}");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    wait_slice(true).await?;

    exec(&c, &p, "httpd", &["rm", "/www/healthz"])?;
    let p = c.wait_pod("web", T, "not Ready", ready("False")).await?;
    assert!(!container(&p).ready);
    assert_eq!(condition(&p, "ContainersReady").as_deref(), Some("False"));
    assert_eq!(container(&p).restart_count, 0);
    wait_slice(false).await?;
    wait_event(
        &c,
        "web",
        "Unhealthy",
        "Readiness probe failed: HTTP probe failed with statuscode: 404",
    )
    .await?;

    exec(&c, &p, "httpd", &["sh", "-c", "echo ok > /www/healthz"])?;
    c.wait_pod("web", T, "Ready again", ready("True")).await?;
    wait_slice(true).await?;
    svcs.delete("web", &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_probe_holds_liveness_back_and_a_failed_one_kills() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    // Liveness would kill at its first failure; it must not run before /tmp/up exists.
    c.create_pod(json!({
        "metadata": {"name": "slow"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": busybox(),
                "command": ["sh", "-c", "sleep 4; touch /tmp/up; sleep 600"],
                // The probes name the file through `$(UP)`, expanded from the static env.
                "env": [{"name": "UP", "value": "/tmp/up"}],
                "startupProbe": {"exec": {"command": ["cat", "$(UP)"]}, "periodSeconds": 1, "failureThreshold": 30},
                "livenessProbe": {"exec": {"command": ["cat", "$(UP)"]}, "periodSeconds": 1, "failureThreshold": 1},
            }]
        }
    }))
    .await?;
    c.create_pod(json!({
        "metadata": {"name": "never"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "restartPolicy": "Never",
            "containers": [{
                "name": "app",
                "image": busybox(),
                "command": ["sleep", "600"],
                "startupProbe": {"tcpSocket": {"port": 9999}, "periodSeconds": 1, "failureThreshold": 2},
            }]
        }
    }))
    .await?;
    let p = c
        .wait_pod("slow", T, "running, not started", |p| {
            container(p).state.is_some_and(|s| s.running.is_some())
        })
        .await?;
    assert_eq!(container(&p).started, Some(false));
    assert!(!container(&p).ready);
    let p = c
        .wait_pod("slow", T, "started and ready", |p| {
            container(p).started == Some(true) && container(p).ready
        })
        .await?;
    assert_eq!(container(&p).restart_count, 0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = c.pods().get("slow").await?;
    assert_eq!(container(&p).restart_count, 0);
    assert_eq!(condition(&p, "Ready").as_deref(), Some("True"));
    let evs = c.events("slow").await?;
    assert!(
        !evs.iter()
            .any(|(_, m)| m.starts_with("Liveness probe failed")),
        "{evs:?}"
    );
    assert!(
        evs.iter().any(|(r, m)| r == "Unhealthy"
            && m.starts_with("Startup probe failed: cat: can't open '/tmp/up'")),
        "{evs:?}"
    );

    let p = c
        .wait_pod("never", T, "killed by its startup probe", |p| {
            container(p).state.is_some_and(|s| s.terminated.is_some())
        })
        .await?;
    assert_eq!(phase(&p), "Failed");
    let ip = p
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default();
    wait_event(
        &c,
        "never",
        "Unhealthy",
        &format!("Startup probe failed: dial tcp {ip}:9999: connect: connection refused"),
    )
    .await?;
    // restartPolicy Never: kubelet does not promise a restart.
    let killing = wait_event(&c, "never", "Killing", "failed startup probe").await?;
    assert_eq!(killing, "Container app failed startup probe");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_socket_readiness_per_container() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    c.create_pod(json!({
        "metadata": {"name": "tcp"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "open",
                    "image": busybox(),
                    "command": ["sh", "-c", "mkdir -p /www && exec httpd -f -p 8080 -h /www"],
                    "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                },
                {
                    "name": "closed",
                    "image": busybox(),
                    "command": ["sleep", "600"],
                    "readinessProbe": {"tcpSocket": {"port": 9999}, "periodSeconds": 1},
                },
            ]
        }
    }))
    .await?;
    let p = c
        .wait_pod("tcp", T, "open ready", |p| status_of(p, "open").ready)
        .await?;
    assert!(!status_of(&p, "closed").ready);
    assert_eq!(condition(&p, "Ready").as_deref(), Some("False"));
    let cond = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|v| v.iter().find(|c| c.type_ == "Ready").cloned())
        .unwrap();
    assert_eq!(
        cond.message.as_deref(),
        Some("containers with unready status: [closed]")
    );
    wait_event(&c, "tcp", "Unhealthy", ":9999: connect: connection refused").await?;
    Ok(())
}

/// Records the paths of the requests it is sent, in order.
async fn recorder(
    addr: std::net::IpAddr,
) -> Result<(
    u16,
    std::sync::Arc<std::sync::Mutex<Vec<(String, Instant)>>>,
)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind((addr, 0)).await?;
    let port = l.local_addr()?.port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = s2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
                let ua = req
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("user-agent:"))
                    .unwrap_or("")
                    .to_ascii_lowercase();
                seen.lock()
                    .unwrap()
                    .push((format!("{path} {ua}"), Instant::now()));
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    Ok((port, seen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_run_and_grace_periods_are_honoured() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.cfg.backoff_base = Duration::from_secs(1);
    c.start_agent().await?;
    // sh as PID 1 ignores SIGTERM: only SIGKILL at the end of the grace period stops these.
    let stubborn = |name: &str, grace: i64, pre_stop: serde_json::Value| {
        json!({
            "metadata": {"name": name},
            "spec": {
                "terminationGracePeriodSeconds": grace,
                "containers": [{
                    "name": "app",
                    "image": busybox(),
                    "command": ["sh", "-c", "while true; do sleep 0.2; done"],
                    "lifecycle": {"preStop": pre_stop},
                }]
            }
        })
    };
    c.create_pod(stubborn(
        "grace-spec",
        3,
        json!({"exec": {"command": ["sleep", "1"]}}),
    ))
    .await?;
    c.create_pod(stubborn(
        "grace-override",
        60,
        json!({"sleep": {"seconds": 1}}),
    ))
    .await?;
    c.create_pod(json!({
        "metadata": {"name": "bad-hook"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": busybox(),
                "command": ["sleep", "600"],
                "lifecycle": {"postStart": {"exec": {"command": ["sh", "-c", "echo nope; exit 3"]}}},
            }]
        }
    }))
    .await?;
    let running = |p: &Pod| phase(p) == "Running" && container(p).ready;
    c.wait_pod("grace-spec", T, "Running", running).await?;
    c.wait_pod("grace-override", T, "Running", running).await?;

    // The pod network is up: the test listens on its gateway, this node's address there.
    let gw: std::net::IpAddr = format!("10.244.{}.1", c.x).parse()?;
    let (port, seen) = recorder(gw).await?;
    c.create_pod(json!({
        "metadata": {"name": "hooks"},
        "spec": {
            "terminationGracePeriodSeconds": 10,
            "containers": [{
                "name": "app",
                "image": busybox(),
                "command": ["sh", "-c", format!("trap 'wget -q -O- http://{gw}:{port}/term; exit 0' TERM; while true; do sleep 0.2; done")],
                "lifecycle": {
                    "postStart": {"exec": {"command": ["sh", "-c", "echo from-post-start > /tmp/hook"]}},
                    "preStop": {"httpGet": {"host": gw.to_string(), "port": port, "path": "/prestop"}},
                },
            }]
        }
    }))
    .await?;
    let p = c.wait_pod("hooks", T, "Running", running).await?;
    assert_eq!(
        exec(&c, &p, "app", &["cat", "/tmp/hook"])?,
        "from-post-start\n"
    );
    c.pods().delete("hooks", &DeleteParams::default()).await?;
    c.wait_gone("hooks", T).await?;
    let seen = seen.lock().unwrap().clone();
    let paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert_eq!(paths[0], "/prestop user-agent: kube-lifecycle/1.33");
    assert!(paths[1].starts_with("/term "), "{paths:?}");

    let began = Instant::now();
    c.pods()
        .delete("grace-spec", &DeleteParams::default())
        .await?;
    c.wait_gone("grace-spec", T).await?;
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(15),
        "{took:?}"
    );
    let began = Instant::now();
    c.pods()
        .delete("grace-override", &DeleteParams::default().grace_period(2))
        .await?;
    c.wait_gone("grace-override", T).await?;
    let took = began.elapsed();
    // The preStop sleep (1 s) and then the rest of the grace period, at least 2 s.
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(12),
        "{took:?}"
    );

    let msg = wait_event(&c, "bad-hook", "FailedPostStartHook", "Exec lifecycle hook").await?;
    let p = c.pods().get("bad-hook").await?;
    assert_eq!(
        msg,
        format!(
            "Exec lifecycle hook ([sh -c echo nope; exit 3]) for Container \"app\" in Pod \"bad-hook_default({})\" failed - error: command 'sh -c echo nope; exit 3' exited with 3: nope\n, message: \"nope\\n\"",
            uid(&p)
        )
    );
    wait_event(&c, "bad-hook", "Killing", "FailedPostStartHook").await?;
    c.wait_pod("bad-hook", T, "restarted", |p| {
        container(p).restart_count >= 1
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn termination_messages_from_the_file_or_the_log() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    let ct = |name: &str, script: &str, extra: serde_json::Value| {
        let mut v = json!({"name": name, "image": busybox(), "command": ["sh", "-c", script]});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    c.create_pod(json!({
        "metadata": {"name": "msgs"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                ct("file", "printf 'bye from file' > /dev/termination-log; exit 3", json!({})),
                ct("fallback", "echo line1; sleep 1; echo oops >&2; exit 2", json!({"terminationMessagePolicy": "FallbackToLogsOnError"})),
                ct("fallback-ok", "echo fine", json!({"terminationMessagePolicy": "FallbackToLogsOnError"})),
                ct("custom", "printf custom > /tmp/msg", json!({
                    "terminationMessagePath": "/tmp/msg",
                    "securityContext": {"runAsUser": 1000},
                })),
                ct("long", "head -c 6000 /dev/zero | tr '\\0' x > /dev/termination-log; exit 1", json!({})),
            ]
        }
    }))
    .await?;
    let p = c
        .wait_pod("msgs", T, "Failed", |p| phase(p) == "Failed")
        .await?;
    let msg = |name: &str| {
        status_of(&p, name)
            .state
            .and_then(|s| s.terminated)
            .and_then(|t| t.message)
    };
    assert_eq!(msg("file").as_deref(), Some("bye from file"));
    assert_eq!(msg("fallback").as_deref(), Some("line1\noops\n"));
    assert_eq!(msg("fallback-ok"), None);
    assert_eq!(msg("custom").as_deref(), Some("custom"));
    assert_eq!(msg("long").map(|m| m.len()), Some(4096));
    Ok(())
}

/// A gRPC health server in this process.
async fn health_server(
    addr: std::net::SocketAddr,
) -> Result<(std::net::SocketAddr, tonic_health::server::HealthReporter)> {
    let (reporter, service) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    Ok((local, reporter))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_prober_speaks_the_health_protocol() -> Result<()> {
    use agent::probe::{grpc, Outcome};
    let (addr, reporter) = health_server("127.0.0.1:0".parse()?).await?;
    let a = addr.to_string();
    let t = Duration::from_secs(1);
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    assert_eq!(grpc::check(&a, "", t).await, Outcome::Success);
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    assert_eq!(
        grpc::check(&a, "", t).await,
        Outcome::Failure("service unhealthy (responded with \"NOT_SERVING\")".into())
    );
    match grpc::check(&a, "no.such.Service", t).await {
        Outcome::Failure(m) => assert!(
            m.starts_with("error: health rpc probe failed: rpc error: code = NotFound"),
            "{m}"
        ),
        o => panic!("{o:?}"),
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    match grpc::check(&closed.to_string(), "", t).await {
        Outcome::Failure(m) => assert!(m.starts_with("timeout: failed to connect service"), "{m}"),
        o => panic!("{o:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_readiness_probe_of_a_host_network_pod() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    // A hostNetwork pod's address is the node's: the probe reaches the server of this test
    // there, as it would reach a gRPC server the pod ran.
    let node_ip = agent::node::internal_ip(&c.cfg);
    let (addr, reporter) = health_server(std::net::SocketAddr::new(node_ip, 0)).await?;
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    c.create_pod(json!({
        "metadata": {"name": "grpc"},
        "spec": {
            "hostNetwork": true,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": busybox(),
                "command": ["sleep", "600"],
                "readinessProbe": {"grpc": {"port": addr.port()}, "periodSeconds": 1, "failureThreshold": 1},
            }]
        }
    }))
    .await?;
    c.wait_pod("grpc", T, "Ready", |p| {
        condition(p, "Ready").as_deref() == Some("True")
    })
    .await?;
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    c.wait_pod("grpc", T, "not Ready", |p| {
        condition(p, "Ready").as_deref() == Some("False")
    })
    .await?;
    wait_event(
        &c,
        "grpc",
        "Unhealthy",
        "Readiness probe failed: service unhealthy (responded with \"NOT_SERVING\")",
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_go_on_after_an_agent_restart() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    c.create_pod(json!({
        "metadata": {"name": "adopted"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": busybox(),
                "command": ["sh", "-c", "touch /tmp/ok; sleep 600"],
                "startupProbe": {"exec": {"command": ["cat", "/tmp/ok"]}, "periodSeconds": 1},
                "readinessProbe": {"exec": {"command": ["cat", "/tmp/ok"]}, "periodSeconds": 1, "failureThreshold": 1},
                "livenessProbe": {"exec": {"command": ["cat", "/tmp/ok"]}, "periodSeconds": 1, "failureThreshold": 2},
            }]
        }
    }))
    .await?;
    let before = c
        .wait_pod("adopted", T, "Ready", |p| {
            condition(p, "Ready").as_deref() == Some("True")
        })
        .await?;
    c.kill_agent().await;
    c.start_agent().await?;
    // The adopted container keeps what was reported: never unready or unstarted.
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        let p = c.pods().get("adopted").await?;
        let cs = container(&p);
        assert!(cs.ready && cs.started == Some(true), "{cs:?}");
        assert_eq!(cs.container_id, container(&before).container_id);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...and its probes run again: readiness, then liveness, act on the removed file.
    exec(&c, &before, "app", &["rm", "/tmp/ok"])?;
    c.wait_pod("adopted", T, "not Ready", |p| {
        condition(p, "Ready").as_deref() == Some("False")
    })
    .await?;
    c.wait_pod("adopted", T, "restarted by liveness", |p| {
        container(p).restart_count >= 1
    })
    .await?;
    wait_event(
        &c,
        "adopted",
        "Killing",
        "Container app failed liveness probe, will be restarted",
    )
    .await?;
    Ok(())
}
