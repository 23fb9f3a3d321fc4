//! Resources and securityContext on the real kernel: users and groups, runAsNonRoot, a
//! read-only root, capabilities, privileged, seccomp profiles, sysctls, hostPID, cgroup limits
//! and the OOM killer. Root; needs `tests/testbed/up`.

mod common;

use anyhow::{Context, Result};
use common::*;
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn status_of(p: &Pod, name: &str) -> k8s_openapi::api::core::v1::ContainerStatus {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|v| v.iter().find(|c| c.name == name).cloned())
        .unwrap_or_default()
}

/// What container `name` of pod `p` wrote (its first attempt's log).
fn log(c: &Cluster, p: &Pod, name: &str) -> Result<String> {
    let dir = format!(
        "default_{}_{}",
        p.metadata.name.as_deref().unwrap_or(""),
        p.metadata.uid.as_deref().unwrap_or("")
    );
    let path = c.cfg.log_dir.join(dir).join(name).join("0.log");
    runtime::log::read_text(&path).with_context(|| format!("read {}", path.display()))
}

fn ct(name: &str, script: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut v = json!({"name": name, "image": busybox(), "command": ["sh", "-c", script]});
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    v
}

/// Runs the pod to its end (restartPolicy Never) and returns it.
async fn run_pod(c: &Cluster, spec: serde_json::Value) -> Result<Pod> {
    let p = c.create_pod(spec).await?;
    let name = p.metadata.name.clone().unwrap();
    c.wait_pod(&name, T, "Succeeded or Failed", |p| {
        matches!(phase(p), "Succeeded" | "Failed")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_groups_and_run_as_non_root() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    let p = run_pod(
        &c,
        json!({
            "metadata": {"name": "ids"},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {"runAsUser": 1000, "runAsGroup": 3000, "supplementalGroups": [4000], "fsGroup": 2000},
                "containers": [
                    ct("pod-level", "id", json!({})),
                    ct("own", "id", json!({"securityContext": {"runAsUser": 1001, "runAsGroup": 1002}})),
                ]
            }
        }),
    )
    .await?;
    assert_eq!(phase(&p), "Succeeded");
    let id = log(&c, &p, "pod-level")?;
    assert!(
        id.starts_with("uid=1000") && id.contains(" gid=3000"),
        "{id}"
    );
    let groups = id.split("groups=").nth(1).unwrap_or_default();
    assert!(groups.contains("2000") && groups.contains("4000"), "{id}");
    let own = log(&c, &p, "own")?;
    assert!(
        own.starts_with("uid=1001") && own.contains(" gid=1002"),
        "{own}"
    );

    // busybox has no USER: it runs as root, which runAsNonRoot refuses.
    c.create_pod(json!({
        "metadata": {"name": "nonroot"},
        "spec": {
            "securityContext": {"runAsNonRoot": true},
            "containers": [ct("c", "id", json!({}))]
        }
    }))
    .await?;
    let p = c
        .wait_pod("nonroot", T, "CreateContainerConfigError", |p| {
            waiting_reason(p).as_deref() == Some("CreateContainerConfigError")
        })
        .await?;
    let msg = container(&p)
        .state
        .unwrap()
        .waiting
        .unwrap()
        .message
        .unwrap();
    assert_eq!(
        msg,
        format!(
            "container has runAsNonRoot and image will run as root (pod: \"nonroot_default({})\", container: c)",
            p.metadata.uid.as_deref().unwrap()
        )
    );
    let evs = c.events("nonroot").await?;
    assert!(
        evs.iter()
            .any(|(r, m)| r == "Failed" && *m == format!("Error: {msg}")),
        "{evs:?}"
    );
    // The same pod with a non-root user runs.
    run_pod(
        &c,
        json!({
            "metadata": {"name": "nonroot-ok"},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65534},
                "containers": [ct("c", "id -u", json!({}))]
            }
        }),
    )
    .await
    .map(|p| assert_eq!(phase(&p), "Succeeded"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_group_owns_the_volumes_and_is_among_the_container_groups() -> Result<()> {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use kube::api::{Api, PostParams};
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    let cms: Api<ConfigMap> = Api::namespaced(c.admin.clone(), "default");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "fsg-cm"}, "data": {"key": "from-cm"}}),
        )?,
    )
    .await?;
    let secrets: Api<Secret> = Api::namespaced(c.admin.clone(), "default");
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "fsg-secret"}, "stringData": {"key": "from-secret"}}),
            )?,
        )
        .await?;
    // Owner-only secret files are still readable by the (non-root) user through the group.
    let script = "id; for f in /scratch /cm/key /sec/key /info/labels /proj/key; do stat -L -c \"$f %g %a\" $f; done; \
                  touch /scratch/new && stat -c \"new %g\" /scratch/new; cat /sec/key; echo";
    let p = run_pod(
        &c,
        json!({
            "metadata": {"name": "fsg", "labels": {"app": "fsg"}},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {"runAsUser": 1000, "runAsGroup": 3000, "fsGroup": 2345},
                "containers": [ct("c", script, json!({"volumeMounts": [
                    {"name": "scratch", "mountPath": "/scratch"},
                    {"name": "cm", "mountPath": "/cm"},
                    {"name": "sec", "mountPath": "/sec"},
                    {"name": "info", "mountPath": "/info"},
                    {"name": "proj", "mountPath": "/proj"}
                ]}))],
                "volumes": [
                    {"name": "scratch", "emptyDir": {}},
                    {"name": "cm", "configMap": {"name": "fsg-cm"}},
                    {"name": "sec", "secret": {"secretName": "fsg-secret", "defaultMode": 256}},
                    {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
                    {"name": "proj", "projected": {"sources": [{"configMap": {"name": "fsg-cm"}}]}}
                ]
            }
        }),
    )
    .await?;
    let out = log(&c, &p, "c")?;
    assert_eq!(phase(&p), "Succeeded", "{out}");
    let groups = out.split("groups=").nth(1).unwrap_or_default();
    assert!(groups.contains("2345"), "{out}");
    assert!(out.contains("/scratch 2345 2777"), "{out}");
    assert!(out.contains("/cm/key 2345 644"), "{out}");
    assert!(out.contains("/sec/key 2345 440"), "{out}");
    assert!(out.contains("/info/labels 2345 644"), "{out}");
    assert!(out.contains("/proj/key 2345 644"), "{out}");
    assert!(
        out.contains("new 2345"),
        "new files inherit the group: {out}"
    );
    assert!(out.contains("from-secret"), "{out}");
    Ok(())
}

/// Bits of the effective capability set in /proc/self/status output.
fn cap_eff(out: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_filesystem_capabilities_privileged_and_seccomp() -> Result<()> {
    let mut c = Cluster::new().await?;
    let seccomp = c.cfg.data_dir.join("seccomp/profiles");
    std::fs::create_dir_all(&seccomp)?;
    std::fs::write(
        seccomp.join("no-mkdir.json"),
        serde_json::to_vec(&json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
        }))?,
    )?;
    c.start_agent().await?;
    let sc = |v: serde_json::Value| json!({ "securityContext": v });
    let p = run_pod(
        &c,
        json!({
            "metadata": {"name": "sec"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    ct("ro", "touch /probe 2>&1; mkdir -p /tmp/x 2>&1; echo written > /dev/termination-log && echo ok", sc(json!({"readOnlyRootFilesystem": true}))),
                    ct("default", "grep CapEff /proc/self/status", json!({})),
                    ct("drop-all", "grep CapEff /proc/self/status", sc(json!({"capabilities": {"drop": ["ALL"]}}))),
                    ct("add-admin", "grep CapEff /proc/self/status; ip link set lo mtu 1400 && echo added", sc(json!({"capabilities": {"add": ["NET_ADMIN"], "drop": ["KILL"]}}))),
                    ct("privileged", "grep CapEff /proc/self/status; ls /dev/kmsg; grep Seccomp: /proc/self/status", sc(json!({"privileged": true}))),
                    ct("localhost", "mkdir /tmp/y 2>&1; grep Seccomp: /proc/self/status", sc(json!({"seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/no-mkdir.json"}}))),
                    ct("runtime-default", "grep Seccomp: /proc/self/status; unshare -U true 2>&1; echo rc=$?", sc(json!({"seccompProfile": {"type": "RuntimeDefault"}}))),
                    ct("unconfined", "grep Seccomp: /proc/self/status", json!({})),
                    ct("no-escalation", "grep NoNewPrivs /proc/self/status", sc(json!({"allowPrivilegeEscalation": false}))),
                ]
            }
        }),
    )
    .await?;
    let ro = log(&c, &p, "ro")?;
    assert!(ro.contains("touch: /probe: Read-only file system"), "{ro}");
    assert!(ro.trim_end().ends_with("ok"), "{ro}");
    let default = cap_eff(&log(&c, &p, "default")?);
    assert_eq!(default.count_ones(), 14, "{default:x}");
    assert_eq!(cap_eff(&log(&c, &p, "drop-all")?), 0);
    let add = log(&c, &p, "add-admin")?;
    let eff = cap_eff(&add);
    assert!(eff & (1 << 12) != 0 && eff & (1 << 5) == 0, "{add}");
    assert!(add.contains("added"), "{add}");
    let privileged = log(&c, &p, "privileged")?;
    let all = std::fs::read_to_string("/proc/self/status")?;
    assert_eq!(cap_eff(&privileged), cap_eff(&all), "{privileged}");
    assert!(
        privileged.contains("/dev/kmsg") && privileged.contains("Seccomp:\t0"),
        "{privileged}"
    );
    let local = log(&c, &p, "localhost")?;
    assert!(
        local.contains("Operation not permitted") && local.contains("Seccomp:\t2"),
        "{local}"
    );
    let rd = log(&c, &p, "runtime-default")?;
    assert!(rd.contains("Seccomp:\t2") && rd.contains("rc=1"), "{rd}");
    assert!(log(&c, &p, "unconfined")?.contains("Seccomp:\t0"));
    assert!(log(&c, &p, "no-escalation")?.contains("NoNewPrivs:\t1"));

    // A profile that is not there is the runtime's CreateContainerError.
    c.create_pod(json!({
        "metadata": {"name": "missing-profile"},
        "spec": {
            "securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/none.json"}},
            "containers": [ct("c", "true", json!({}))]
        }
    }))
    .await?;
    let p = c
        .wait_pod("missing-profile", T, "CreateContainerError", |p| {
            waiting_reason(p).as_deref() == Some("CreateContainerError")
        })
        .await?;
    let msg = container(&p)
        .state
        .unwrap()
        .waiting
        .unwrap()
        .message
        .unwrap();
    assert!(
        msg.contains("cannot load seccomp profile") && msg.contains("none.json"),
        "{msg}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sysctls_host_pid_and_cgroup_limits() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    let p = run_pod(
        &c,
        json!({
            "metadata": {"name": "kernel"},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {"sysctls": [
                    {"name": "net.ipv4.ip_unprivileged_port_start", "value": "100"},
                    {"name": "kernel.shm_rmid_forced", "value": "1"},
                ]},
                "containers": [ct(
                    "c",
                    "cat /proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/shm_rmid_forced; \
                     cat /sys/fs/cgroup/memory/memory.limit_in_bytes; \
                     cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us /sys/fs/cgroup/cpu/cpu.shares",
                    json!({"resources": {"requests": {"cpu": "250m", "memory": "32Mi"}, "limits": {"cpu": "500m", "memory": "64Mi"}}}),
                )]
            }
        }),
    )
    .await?;
    let out = log(&c, &p, "c")?;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["100", "1", "67108864", "50000", "100000", "256"],
        "{out}"
    );
    assert_eq!(
        p.status.as_ref().and_then(|s| s.qos_class.as_deref()),
        Some("Burstable")
    );

    c.create_pod(json!({
        "metadata": {"name": "unsafe-sysctl"},
        "spec": {
            "securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]},
            "containers": [ct("c", "true", json!({}))]
        }
    }))
    .await?;
    let p = c
        .wait_pod("unsafe-sysctl", T, "rejected", |p| phase(p) == "Failed")
        .await?;
    let st = p.status.unwrap();
    assert_eq!(st.reason.as_deref(), Some("SysctlForbidden"));
    assert_eq!(
        st.message.as_deref(),
        Some("Pod was rejected: Pod forbidden sysctl: \"kernel.msgmax\" not allowlisted")
    );

    let host_init = std::fs::read_to_string("/proc/1/comm")?;
    let p = run_pod(
        &c,
        json!({
            "metadata": {"name": "pids"},
            "spec": {
                "restartPolicy": "Never",
                "hostPID": true,
                "containers": [ct("host", "cat /proc/1/comm; true", json!({}))]
            }
        }),
    )
    .await?;
    assert_eq!(log(&c, &p, "host")?, host_init);
    let p = run_pod(
        &c,
        json!({
            "metadata": {"name": "own-pids"},
            "spec": {"restartPolicy": "Never", "containers": [ct("own", "cat /proc/1/comm; true", json!({}))]}
        }),
    )
    .await?;
    assert_eq!(log(&c, &p, "own")?, "sh\n");

    // shareProcessNamespace: one PID namespace for the pod, its PID 1 a holder process.
    c.create_pod(json!({
        "metadata": {"name": "shared-pids"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "shareProcessNamespace": true,
            "containers": [
                ct("a", "exec sleep 600", json!({})),
                ct("b", "sleep 1; ps -o pid,args; echo pid1=$(tr '\\0' ' ' < /proc/1/cmdline); sleep 600", json!({})),
            ]
        }
    }))
    .await?;
    let p = c
        .wait_pod("shared-pids", T, "Running", |p| {
            phase(p) == "Running" && condition(p, "Ready").as_deref() == Some("True")
        })
        .await?;
    let uid = p.metadata.uid.clone().unwrap();
    let deadline = std::time::Instant::now() + T;
    let out = loop {
        let out = log(&c, &p, "b").unwrap_or_default();
        if out.contains("pid1=") || std::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(out.contains("sleep 600"), "{out}");
    let pid1 = out
        .lines()
        .find(|l| l.starts_with("pid1="))
        .unwrap_or_default();
    assert!(pid1.trim_end().ends_with("oxlet-shim pause"), "{out}");
    let holder: i32 =
        std::fs::read_to_string(c.cfg.run_dir.join(format!("sandboxes/{uid}/pid-holder")))?
            .trim()
            .parse()?;
    c.pods()
        .delete("shared-pids", &kube::api::DeleteParams::default())
        .await?;
    c.wait_gone("shared-pids", T).await?;
    c.wait_no_leftovers(&uid).await?;
    // Gone, or a zombie waiting for its reaper.
    let stat = std::fs::read_to_string(format!("/proc/{holder}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z')),
        "{stat}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_over_its_memory_limit_is_oom_killed_and_restarted() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.cfg.backoff_base = Duration::from_secs(1);
    c.start_agent().await?;
    c.create_pod(json!({
        "metadata": {"name": "memory-demo"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "memory-demo-ctr",
                "image": busybox(),
                "command": ["tail", "/dev/zero"],
                "resources": {"limits": {"memory": "20Mi"}, "requests": {"memory": "10Mi"}},
            }]
        }
    }))
    .await?;
    let p = c
        .wait_pod("memory-demo", T, "an OOMKilled restart", |p| {
            let cs = status_of(p, "memory-demo-ctr");
            cs.restart_count >= 1
                && cs
                    .last_state
                    .and_then(|s| s.terminated)
                    .is_some_and(|t| t.reason.as_deref() == Some("OOMKilled"))
        })
        .await?;
    assert_eq!(phase(&p), "Running");
    let last = status_of(&p, "memory-demo-ctr")
        .last_state
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(last.exit_code, 137);
    Ok(())
}
