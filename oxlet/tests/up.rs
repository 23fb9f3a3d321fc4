//! `oxlet up` as a user runs it: the control plane, the node agent and the node's kube-proxy in
//! one process, driven by the real kubectl: a Deployment and its Service answer on the
//! Service's ClusterIP from this machine.
//!
//! Ignored in the parallel run and run alone by `scripts/test`: its kube-proxy owns the
//! `oxlet-proxy` table and drops traffic to unallocated addresses of 10.96.0.0/12, where other
//! tests put their own services.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const PREFIX: &str = "oxlet-up-test-";

/// Whether any cgroup at or below `dir` holds a process.
fn has_processes(dir: &Path) -> bool {
    let here = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    !here.trim().is_empty()
        || std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().is_dir() && has_processes(&e.path()))
}

#[test]
#[ignore = "run alone by scripts/test (owns the oxlet-proxy table and 10.96.0.0/12)"]
fn up_runs_a_deployment_behind_a_service_until_sigterm() {
    let mut up = Cluster::start(PREFIX);
    let (kc, port) = (up.kubeconfig(), up.port);
    let d = up.path().to_path_buf();
    until("the API server", Duration::from_secs(30), || {
        kc.exists()
            && kubectl(&kc, &["get", "--raw", "/readyz"], None)
                .status
                .success()
    });

    // The kubernetes Service points at this server, and the proxy's rule for it exists.
    until("the kubernetes endpoints", Duration::from_secs(10), || {
        let out = String::from_utf8_lossy(
            &kubectl(&kc, &["get", "endpoints", "kubernetes"], None).stdout,
        )
        .into_owned();
        out.contains(&format!(":{port}"))
    });
    until(
        "the rule for 10.96.0.1:443",
        Duration::from_secs(20),
        || proxy_rule("10.96.0.1 . tcp . 443"),
    );
    // Only now, with the rule in place, is the ClusterIP used (it never leaves the machine).
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "5", "https://10.96.0.1/version"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"gitVersion\""),
        "{out:?}"
    );

    // The node registers itself and gets a pod range, which its CNI configuration uses.
    until("the node Ready", Duration::from_secs(30), || {
        let out = kubectl(
            &kc,
            &[
                "get",
                "nodes",
                "-o",
                "jsonpath={.items[0].status.conditions[?(@.type=='Ready')].status}",
            ],
            None,
        );
        String::from_utf8_lossy(&out.stdout) == "True"
    });
    let cidr = ok(kubectl(
        &kc,
        &["get", "nodes", "-o", "jsonpath={.items[0].spec.podCIDR}"],
        None,
    ));
    assert_eq!(cidr, "10.244.0.0/24");
    let conf = std::fs::read_to_string(up.path().join("net.d/10-oxlet.conflist")).unwrap();
    assert!(
        conf.contains("10.244.0.0/24") && conf.contains("oxlet-bridge"),
        "{conf}"
    );

    // A Deployment and its Service: two pods run, and the ClusterIP reaches both.
    let web = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: BUSYBOX
        command: [sh, -c, 'mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www']
        ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"
    .replace("BUSYBOX", busybox());
    ok(kubectl(&kc, &["apply", "-f", "-"], Some(&web)));
    let out = ok(kubectl(
        &kc,
        &["rollout", "status", "deploy/web", "--timeout=120s"],
        None,
    ));
    assert!(out.contains("successfully rolled out"), "{out}");
    let names = ok(kubectl(
        &kc,
        &[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
        None,
    ));
    let names: Vec<&str> = names.split_whitespace().collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let ip = ok(kubectl(
        &kc,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
        None,
    ));
    until(
        "the rule for the web Service with two endpoints",
        Duration::from_secs(20),
        || {
            let text = proxy_table();
            text.contains(&format!("{ip} . tcp . 80")) && text.matches(" : 10.244.").count() >= 2
        },
    );
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "5", &format!("http://{ip}/")])
            .output()
            .unwrap();
        seen.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
        if seen.len() == 2 {
            break;
        }
    }
    let mut want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    want.sort();
    let mut got: Vec<String> = seen.into_iter().collect();
    got.sort();
    assert_eq!(got, want, "both pods answer on the ClusterIP");

    // `oxlet status` finds every part healthy.
    let oxlet_status = || {
        Command::new(env!("CARGO_BIN_EXE_oxlet"))
            .args(["status", "--kubeconfig"])
            .arg(&kc)
            .arg("--cni-conf-dir")
            .arg(d.join("net.d"))
            .arg("--cni-bin-dir")
            .arg(format!("{},/usr/lib/cni", d.join("cni-bin").display()))
            .output()
            .unwrap()
    };
    let out = oxlet_status();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for part in ["api", "controllers", "agent", "proxy", "dns", "cni"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(part) && l.contains(" ok ")),
            "{part} not ok:\n{text}"
        );
    }
    ok(kubectl(&kc, &["delete", "-f", "-"], Some(&web)));
    until("the pods gone", Duration::from_secs(60), || {
        let out = kubectl(&kc, &["get", "pods", "-o", "name"], None);
        out.status.success() && out.stdout.is_empty()
    });

    // A pod that is still running when oxlet up stops.
    ok(kubectl(
        &kc,
        &[
            "create",
            "deployment",
            "keep",
            &format!("--image={}", busybox()),
            "--",
            "sleep",
            "3600",
        ],
        None,
    ));
    ok(kubectl(
        &kc,
        &["rollout", "status", "deploy/keep", "--timeout=120s"],
        None,
    ));
    let uid = ok(kubectl(
        &kc,
        &[
            "get",
            "pods",
            "-l",
            "app=keep",
            "-o",
            "jsonpath={.items[0].metadata.uid}",
        ],
        None,
    ));
    let pod_cgroup =
        runtime::cgroup::controller_dir("memory", &format!("kubepods/besteffort/pod{uid}"));

    // SIGTERM: it stops, and the proxy's rules stay for traffic already flowing.
    up.stop();
    let listed = Command::new("nft")
        .args(["list", "table", "ip", "oxlet-proxy"])
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "the rules stay after oxlet up stops"
    );
    // Stopped, `oxlet status` says so and fails.
    let out = oxlet_status();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("api") && l.contains("unhealthy")),
        "{text}"
    );
    // Pods keep running, as when kubelet stops.
    assert!(has_processes(&pod_cgroup), "the pod's container still runs");

    // `oxlet uninstall` removes everything oxlet up made.
    let out = uninstall(&d, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("removed pod {uid}")), "{text}");
    assert!(
        !pod_cgroup.exists(),
        "pod cgroup {} left",
        pod_cgroup.display()
    );
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    let tables = String::from_utf8_lossy(&tables.stdout).into_owned();
    assert!(
        !tables.contains("oxlet-proxy") && !tables.contains("oxlet-cni-oxlet"),
        "{tables}"
    );
    let link = Command::new("ip")
        .args(["link", "show", "oxlet0"])
        .output()
        .unwrap();
    assert!(!link.status.success(), "bridge oxlet0 left");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&d.display().to_string()), "{mounts}");
    for gone in [
        "data",
        "run",
        "admin.kubeconfig",
        "net.d/10-oxlet.conflist",
        "cni-bin/oxlet-bridge",
    ] {
        assert!(!d.join(gone).exists(), "{gone} left");
    }
}
