//! Pod volumes on the real kernel, as the Kubernetes tutorials use them and read back from the
//! containers' own output: Secrets in one projected volume, the downward API following
//! `kubectl label`, a ConfigMap as a directory (refreshed) and as a subPath file (not), the
//! service account token (accepted by the API server), emptyDir on tmpfs with its size limit,
//! hostPath type checks and a missing ConfigMap as kubelet reports them. Secret and token
//! contents are checked to be on tmpfs and gone with the pod. Root; needs `tests/testbed/up`.

mod common;

use anyhow::{Context, Result};
use base64::Engine;
use common::*;
use kube::api::DeleteParams;
use serde_json::json;
use std::time::Duration;

fn pod_uid(p: &k8s_openapi::api::core::v1::Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

fn running(p: &k8s_openapi::api::core::v1::Pod) -> bool {
    phase(p) == "Running"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projected_secrets_and_the_service_account_token_live_on_tmpfs_and_go_with_the_pod(
) -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    let files = c.dir.path().join("files");
    std::fs::create_dir_all(&files)?;
    std::fs::write(files.join("username.txt"), "admin")?;
    std::fs::write(files.join("password.txt"), "1f2d1e2e67df")?;
    let from = |f: &str| format!("--from-file={}", files.join(f).display());
    c.kubectl(
        33,
        &["create", "secret", "generic", "user", &from("username.txt")],
        None,
    )?;
    c.kubectl(
        27,
        &["create", "secret", "generic", "pass", &from("password.txt")],
        None,
    )?;
    let manifest = r#"
apiVersion: v1
kind: Pod
metadata:
  name: test-projected-volume
spec:
  nodeName: NODE
  terminationGracePeriodSeconds: 1
  containers:
  - name: test-projected-volume
    image: IMAGE
    command: ["sh", "-c", "cat /project-volume/username.txt; echo; cat /project-volume/password.txt; echo; echo token=$(cat /var/run/secrets/kubernetes.io/serviceaccount/token); echo ns=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace); head -1 /var/run/secrets/kubernetes.io/serviceaccount/ca.crt; touch /project-volume/x 2>/dev/null || echo read-only; sleep 86400"]
    volumeMounts:
    - name: all-in-one
      mountPath: "/project-volume"
      readOnly: true
  volumes:
  - name: all-in-one
    projected:
      sources:
      - secret:
          name: user
      - secret:
          name: pass
"#
    .replace("NODE", &c.node)
    .replace("IMAGE", busybox());
    c.kubectl(33, &["apply", "-f", "-"], Some(&manifest))?;
    let p = c
        .wait_pod(
            "test-projected-volume",
            Duration::from_secs(60),
            "Running",
            running,
        )
        .await?;
    let uid = pod_uid(&p);
    let log = c
        .wait_log(
            "test-projected-volume",
            "test-projected-volume",
            Duration::from_secs(20),
            |l| l.contains("read-only"),
        )
        .await?;
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(&lines[..2], ["admin", "1f2d1e2e67df"], "{log}");
    assert!(log.contains("ns=default"), "{log}");
    assert!(log.contains("-----BEGIN CERTIFICATE-----"), "{log}");

    // The token: a JWT for the pod's namespace, service account and pod, which the API server
    // accepts.
    let token = log
        .lines()
        .find_map(|l| l.strip_prefix("token="))
        .context("token line")?
        .to_string();
    let claims = token.split('.').nth(1).context("JWT")?;
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims)?)?;
    assert_eq!(claims["sub"], "system:serviceaccount:default:default");
    assert_eq!(claims["kubernetes.io"]["namespace"], "default");
    assert_eq!(claims["kubernetes.io"]["pod"]["uid"], uid.as_str());
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        3607
    );
    let port = c.server.as_ref().unwrap().addr.port();
    let out = sh(&format!(
        "curl -sk -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {token}' https://127.0.0.1:{port}/api"
    ));
    assert_eq!(out, "200", "the API server accepts the pod's token");
    let out = sh(&format!(
        "curl -sk -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {token}x' https://127.0.0.1:{port}/api"
    ));
    assert_eq!(out, "401");

    // Both projected volumes are tmpfs mounts of the node, not files on its disk.
    let dir = c.pod_dir(&uid);
    let mounts = mounts_below(&dir);
    let projected: Vec<_> = mounts
        .iter()
        .filter(|(p, _, _)| p.to_string_lossy().contains("kubernetes.io~projected"))
        .collect();
    assert_eq!(projected.len(), 2, "{mounts:?}");
    assert!(
        projected.iter().all(|(_, fs, _)| fs == "tmpfs"),
        "{mounts:?}"
    );
    assert!(projected.iter().any(|(p, _, _)| p.ends_with("all-in-one")));
    let data = dir.join("volumes/kubernetes.io~projected/all-in-one");
    assert_eq!(
        std::fs::read_link(data.join("username.txt"))?,
        std::path::Path::new("..data/username.txt")
    );

    // Deleted: nothing mounted or written of it remains.
    c.pods()
        .delete("test-projected-volume", &DeleteParams::default())
        .await?;
    c.wait_gone("test-projected-volume", Duration::from_secs(30))
        .await?;
    c.wait_no_leftovers(&uid).await?;
    assert!(mounts_below(&dir).is_empty());
    assert!(!dir.exists());

    // A pod deleted while the agent is down loses its mounts at the agent's next start.
    c.create_pod(json!({
        "metadata": {"name": "orphan"},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [
            {"name": "c", "image": busybox(), "command": ["sleep", "3600"]}]}
    }))
    .await?;
    let p = c
        .wait_pod("orphan", Duration::from_secs(60), "Running", running)
        .await?;
    let uid = pod_uid(&p);
    assert_eq!(mounts_below(&c.pod_dir(&uid)).len(), 1, "the token volume");
    c.kill_agent().await;
    c.pods()
        .delete(
            "orphan",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await?;
    c.wait_gone("orphan", Duration::from_secs(10)).await?;
    c.start_agent().await?;
    c.wait_no_leftovers(&uid).await?;
    assert!(mounts_below(&c.pod_dir(&uid)).is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downward_api_labels_change_in_the_running_container() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    let manifest = r#"
apiVersion: v1
kind: Pod
metadata:
  name: kubernetes-downwardapi-volume-example
  labels:
    zone: us-est-coast
    cluster: test-cluster1
    rack: rack-22
  annotations:
    build: two
    builder: john-doe
spec:
  nodeName: NODE
  terminationGracePeriodSeconds: 1
  containers:
    - name: client-container
      image: IMAGE
      command: ["sh", "-c"]
      args:
      - while true; do
          echo -en '\n\n'; cat /etc/podinfo/labels; echo;
          cat /etc/podinfo/annotations; echo; echo cpu=$(cat /etc/podinfo/cpu_limit);
          sleep 1;
        done;
      resources:
        limits:
          cpu: 250m
          memory: 32Mi
      volumeMounts:
        - name: podinfo
          mountPath: /etc/podinfo
  volumes:
    - name: podinfo
      downwardAPI:
        items:
          - path: "labels"
            fieldRef:
              fieldPath: metadata.labels
          - path: "annotations"
            fieldRef:
              fieldPath: metadata.annotations
          - path: "cpu_limit"
            resourceFieldRef:
              containerName: client-container
              resource: limits.cpu
              divisor: 1m
"#
    .replace("NODE", &c.node)
    .replace("IMAGE", busybox());
    c.kubectl(27, &["apply", "-f", "-"], Some(&manifest))?;
    let name = "kubernetes-downwardapi-volume-example";
    let p = c
        .wait_pod(name, Duration::from_secs(60), "Running", running)
        .await?;
    let log = c
        .wait_log(name, "client-container", Duration::from_secs(20), |l| {
            l.contains("cpu=250")
        })
        .await?;
    assert!(
        log.contains("cluster=\"test-cluster1\"\nrack=\"rack-22\"\nzone=\"us-est-coast\""),
        "{log}"
    );
    assert!(log.contains("build=\"two\"\nbuilder=\"john-doe\""), "{log}");
    let dir = c.pod_dir(&pod_uid(&p));
    assert!(mounts_below(&dir)
        .iter()
        .any(|(p, fs, _)| fs == "tmpfs" && p.ends_with("kubernetes.io~downward-api/podinfo")));

    c.kubectl(33, &["label", "pod", name, "tier=frontend"], None)?;
    c.wait_log(name, "client-container", Duration::from_secs(20), |l| {
        l.contains("tier=\"frontend\"")
    })
    .await?;
    c.kubectl(
        27,
        &["annotate", "pod", name, "builder=jane-doe", "--overwrite"],
        None,
    )?;
    c.wait_log(name, "client-container", Duration::from_secs(20), |l| {
        l.contains("builder=\"jane-doe\"")
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_map_as_directory_is_refreshed_and_as_sub_path_is_not() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.cfg.sync_frequency = Duration::from_secs(2);
    c.start_agent().await?;
    let cm = |conf: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: nginx-conf\ndata:\n  nginx.conf: |\n    worker_processes {conf};\n  mime.types: |\n    types {{ text/html html; }}\n"
        )
    };
    c.kubectl(33, &["apply", "-f", "-"], Some(&cm("1")))?;
    c.kubectl(
        33,
        &[
            "create",
            "secret",
            "generic",
            "tls",
            "--from-literal=tls.key=KEY",
            "--from-literal=tls.crt=CRT",
        ],
        None,
    )?;
    c.create_pod(json!({
        "metadata": {"name": "nginx"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "nginx", "image": busybox(),
                "command": ["sh", "-c", "stat -L -c '%a %n' /etc/tls/* /etc/nginx/conf.d/*; while true; do echo dir: $(cat /etc/nginx/conf.d/nginx.conf); echo file: $(cat /etc/nginx/nginx.conf); sleep 1; done"],
                "volumeMounts": [
                    {"name": "conf", "mountPath": "/etc/nginx/conf.d"},
                    {"name": "conf", "mountPath": "/etc/nginx/nginx.conf", "subPath": "nginx.conf"},
                    {"name": "tls", "mountPath": "/etc/tls"}
                ]}],
            "volumes": [
                {"name": "conf", "configMap": {"name": "nginx-conf"}},
                {"name": "tls", "secret": {"secretName": "tls", "defaultMode": 0o400,
                    "items": [{"key": "tls.key", "path": "tls.key", "mode": 0o600}, {"key": "tls.crt", "path": "tls.crt"}]}}
            ]
        }
    }))
    .await?;
    c.wait_pod("nginx", Duration::from_secs(60), "Running", running)
        .await?;
    let log = c
        .wait_log("nginx", "nginx", Duration::from_secs(20), |l| {
            l.contains("file: worker_processes 1;")
        })
        .await?;
    assert!(log.contains("600 /etc/tls/tls.key"), "{log}");
    assert!(log.contains("400 /etc/tls/tls.crt"), "{log}");
    assert!(log.contains("644 /etc/nginx/conf.d/mime.types"), "{log}");
    assert!(log.contains("dir: worker_processes 1;"), "{log}");
    // The secret is on a tmpfs; the config map on the node's disk, as kubelet keeps them.
    let p = c.pods().get("nginx").await?;
    let mounts = mounts_below(&c.pod_dir(&pod_uid(&p)));
    assert!(
        mounts
            .iter()
            .any(|(m, fs, _)| fs == "tmpfs" && m.ends_with("kubernetes.io~secret/tls")),
        "{mounts:?}"
    );
    assert!(!mounts
        .iter()
        .any(|(m, _, _)| m.ends_with("kubernetes.io~configmap/conf")));

    c.kubectl(33, &["apply", "-f", "-"], Some(&cm("4")))?;
    let log = c
        .wait_log("nginx", "nginx", Duration::from_secs(30), |l| {
            l.contains("dir: worker_processes 4;")
        })
        .await?;
    let last_file = log
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("file: "))
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        last_file, "worker_processes 1;",
        "subPath mounts keep their content"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_path_checks_empty_dir_on_tmpfs_and_mount_failures() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    let host = c.dir.path().join("host");
    std::fs::create_dir_all(&host)?;
    let file = host.join("a-file");
    std::fs::write(&file, "x")?;
    let made = host.join("made/by/kubelet");

    c.create_pod(json!({
        "metadata": {"name": "wrong-type"},
        "spec": {"terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": busybox(), "command": ["sleep", "3600"],
                "volumeMounts": [{"name": "host", "mountPath": "/host"}]}],
            "volumes": [{"name": "host", "hostPath": {"path": file, "type": "Directory"}}]}
    }))
    .await?;
    c.create_pod(json!({
        "metadata": {"name": "no-config"},
        "spec": {"terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": busybox(), "command": ["sh", "-c", "cat /cfg/k; echo; sleep 3600"],
                "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]}],
            "volumes": [{"name": "cfg", "configMap": {"name": "arrives-later"}}]}
    }))
    .await?;
    c.create_pod(json!({
        "metadata": {"name": "scratch"},
        "spec": {"terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": busybox(),
                "command": ["sh", "-c", "echo hi > /made/out; echo per-pod > /logs/f; dd if=/dev/zero of=/cache/big bs=1M count=20 2>/dev/null || echo cache-full; echo done; sleep 3600"],
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "volumeMounts": [
                    {"name": "made", "mountPath": "/made"},
                    {"name": "cache", "mountPath": "/cache"},
                    {"name": "work", "mountPath": "/logs", "subPathExpr": "$(POD_NAME)"}
                ]}],
            "volumes": [
                {"name": "made", "hostPath": {"path": made, "type": "DirectoryOrCreate"}},
                {"name": "cache", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                {"name": "work", "emptyDir": {}}
            ]}
    }))
    .await?;

    let msg = format!(
        "MountVolume.SetUp failed for volume \"host\" : hostPath type check failed: {} is not a directory",
        file.display()
    );
    let mut found = false;
    for _ in 0..100 {
        if c.events("wrong-type")
            .await?
            .iter()
            .any(|(r, m)| r == "FailedMount" && *m == msg)
        {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(found, "{:?}", c.events("wrong-type").await?);
    c.wait_pod(
        "wrong-type",
        Duration::from_secs(20),
        "Pending in ContainerCreating",
        |p| phase(p) == "Pending" && waiting_reason(p).as_deref() == Some("ContainerCreating"),
    )
    .await?;
    let events = c.wait_events("no-config", &["FailedMount"]).await?;
    assert!(!events.iter().any(|r| r == "Started"));
    let failed = c.events("no-config").await?;
    assert!(
        failed.iter().any(|(r, m)| r == "FailedMount"
            && m == "MountVolume.SetUp failed for volume \"cfg\" : configmap \"arrives-later\" not found"),
        "{failed:?}"
    );

    let p = c
        .wait_pod("scratch", Duration::from_secs(60), "Running", running)
        .await?;
    c.wait_log("scratch", "c", Duration::from_secs(20), |l| {
        l.contains("done")
    })
    .await?;
    let log = c.log("scratch", "c").await?;
    assert!(log.contains("cache-full"), "16Mi limit holds: {log}");
    assert_eq!(std::fs::read_to_string(made.join("out"))?, "hi\n");
    let dir = c.pod_dir(&pod_uid(&p));
    let work = dir.join("volumes/kubernetes.io~empty-dir/work/scratch/f");
    assert_eq!(std::fs::read_to_string(work)?, "per-pod\n");
    let mounts = mounts_below(&dir);
    let cache = mounts
        .iter()
        .find(|(p, _, _)| p.ends_with("kubernetes.io~empty-dir/cache"))
        .context("cache is a mount")?;
    assert_eq!(cache.1, "tmpfs");
    assert!(cache.2.contains("size=16384k"), "{cache:?}");

    // The config map appears: the pod starts with it.
    c.kubectl(
        27,
        &[
            "create",
            "configmap",
            "arrives-later",
            "--from-literal=k=v1",
        ],
        None,
    )?;
    c.wait_pod("no-config", Duration::from_secs(30), "Running", running)
        .await?;
    c.wait_log("no-config", "c", Duration::from_secs(20), |l| {
        l.contains("v1")
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_propagation_bidirectional_host_to_container_and_none() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    let wait_marker = "while [ ! -e MNT/marker ]; do sleep 0.2; done";
    // Each watcher says it runs before the mount is made: a mount that exists when a container
    // starts is in its recursive bind whatever the propagation.
    let watcher = |mnt: &str, me: &str| {
        format!(
            "touch {mnt}/ready-{me}; {}; cat {mnt}/inner/f 2>/dev/null || echo not-propagated; sleep 3600",
            wait_marker.replace("MNT", mnt)
        )
    };
    c.create_pod(json!({
        "metadata": {"name": "propagation"},
        "spec": {"terminationGracePeriodSeconds": 1,
            "containers": [
                {"name": "bi", "image": busybox(), "securityContext": {"privileged": true},
                 "command": ["sh", "-c", "while [ ! -e /share/ready-h2c ] || [ ! -e /share/ready-none ]; do sleep 0.2; done; mkdir -p /share/inner && mount -t tmpfs tmpfs /share/inner && echo from-container > /share/inner/f && touch /share/marker; sleep 3600"],
                 "volumeMounts": [{"name": "share", "mountPath": "/share", "mountPropagation": "Bidirectional"}]},
                {"name": "h2c", "image": busybox(), "command": ["sh", "-c", watcher("/seen", "h2c")],
                 "volumeMounts": [{"name": "share", "mountPath": "/seen", "mountPropagation": "HostToContainer"}]},
                {"name": "none", "image": busybox(), "command": ["sh", "-c", watcher("/none", "none")],
                 "volumeMounts": [{"name": "share", "mountPath": "/none", "mountPropagation": "None"}]}
            ],
            "volumes": [{"name": "share", "emptyDir": {}}]}
    }))
    .await?;
    let p = c
        .wait_pod("propagation", Duration::from_secs(60), "Running", running)
        .await?;
    let h2c = c
        .wait_log("propagation", "h2c", Duration::from_secs(20), |l| {
            l.contains("from-container") || l.contains("not-propagated")
        })
        .await?;
    assert!(h2c.contains("from-container"), "HostToContainer: {h2c}");
    let none = c
        .wait_log("propagation", "none", Duration::from_secs(20), |l| {
            l.contains("from-container") || l.contains("not-propagated")
        })
        .await?;
    assert!(none.contains("not-propagated"), "None: {none}");
    // The container's mount reached the node, below the volume.
    let dir = c.pod_dir(&pod_uid(&p));
    let inner = mounts_below(&dir)
        .into_iter()
        .find(|(m, _, _)| m.ends_with("kubernetes.io~empty-dir/share/inner"));
    assert_eq!(inner.map(|m| m.1).as_deref(), Some("tmpfs"));

    // Bidirectional needs a privileged container.
    c.create_pod(json!({
        "metadata": {"name": "bi-unprivileged"},
        "spec": {"terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": busybox(), "command": ["sleep", "3600"],
                "volumeMounts": [{"name": "share", "mountPath": "/share", "mountPropagation": "Bidirectional"}]}],
            "volumes": [{"name": "share", "emptyDir": {}}]}
    }))
    .await?;
    let bad = c
        .wait_pod(
            "bi-unprivileged",
            Duration::from_secs(30),
            "CreateContainerConfigError",
            |p| waiting_reason(p).as_deref() == Some("CreateContainerConfigError"),
        )
        .await?;
    let msg = container(&bad).state.unwrap().waiting.unwrap().message;
    assert_eq!(
        msg.as_deref(),
        Some("Bidirectional mount propagation is available only to privileged containers")
    );

    for name in ["propagation", "bi-unprivileged"] {
        c.pods().delete(name, &DeleteParams::default()).await?;
        c.wait_gone(name, Duration::from_secs(30)).await?;
    }
    assert!(mounts_below(&dir).is_empty(), "{:?}", mounts_below(&dir));
    Ok(())
}

/// The distinct `<prefix>` values of the log's lines, in order of first appearance.
fn distinct(log: &str, prefix: &str) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for v in log.lines().filter_map(|l| l.strip_prefix(prefix)) {
        if !v.is_empty() && !seen.iter().any(|s| s == v) {
            seen.push(v.to_string());
        }
    }
    seen
}

fn jwt_claims(token: &str) -> Result<serde_json::Value> {
    let claims = token.split('.').nth(1).context("JWT")?;
    Ok(serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims)?,
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_are_rotated_in_the_running_container_before_they_expire(
) -> Result<()> {
    // Tokens live 20 s here, so 80% of their life passes in 16 s.
    let mut c = Cluster::with_server(|s| {
        s.service_account_max_token_expiration = Some(Duration::from_secs(20))
    })
    .await?;
    c.start_agent().await?;
    c.create_pod(json!({
        "metadata": {"name": "rotated"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "reader",
                "image": busybox(),
                "command": ["sh", "-c", "while true; do echo sa=$(cat /var/run/secrets/kubernetes.io/serviceaccount/token); echo vault=$(cat /tokens/vault); sleep 1; done"],
                "volumeMounts": [{"name": "vault", "mountPath": "/tokens"}],
            }],
            "volumes": [{"name": "vault", "projected": {"sources": [{"serviceAccountToken": {
                "path": "vault", "audience": "vault", "expirationSeconds": 600}}]}}],
        }
    }))
    .await?;
    c.wait_pod("rotated", Duration::from_secs(60), "Running", running)
        .await?;
    // Two tokens of each kind seen by the same container: the first was replaced in place.
    let log = c
        .wait_log("rotated", "reader", Duration::from_secs(45), |l| {
            distinct(l, "sa=").len() >= 2 && distinct(l, "vault=").len() >= 2
        })
        .await?;
    let port = c.server.as_ref().unwrap().addr.port();
    let status = |token: &str| {
        sh(&format!(
            "curl -sk -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {token}' https://127.0.0.1:{port}/api"
        ))
    };
    for prefix in ["sa=", "vault="] {
        let tokens = distinct(&log, prefix);
        let (first, second) = (jwt_claims(&tokens[0])?, jwt_claims(&tokens[1])?);
        // The server granted 20 s of the 3607 or 600 asked for, and the agent renewed the
        // token after 80% of that, before it expired.
        for claims in [&first, &second] {
            assert_eq!(
                claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
                20,
                "{claims}"
            );
        }
        let renewed_after = second["iat"].as_i64().unwrap() - first["iat"].as_i64().unwrap();
        assert!((15..20).contains(&renewed_after), "{first} then {second}");
        if prefix == "vault=" {
            assert_eq!(second["aud"], json!(["vault"]));
        }
    }
    // The token in the file now is accepted; the first one expired and is refused.
    let first = distinct(&log, "sa=")[0].clone();
    let exp = jwt_claims(&first)?["exp"].as_i64().unwrap();
    let wait = exp + 1 - chrono::Utc::now().timestamp();
    if wait > 0 {
        tokio::time::sleep(Duration::from_secs(wait as u64)).await;
    }
    let log = c.log("rotated", "reader").await?;
    let current = distinct(&log, "sa=").pop().context("a token")?;
    assert_eq!(status(&current), "200", "the current token is accepted");
    assert_eq!(status(&first), "401", "the first token expired");
    Ok(())
}
