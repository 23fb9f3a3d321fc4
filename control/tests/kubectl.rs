//! The real kubectl (1.27, 1.30, 1.33) against the API server.

mod common;

use anyhow::Result;
use common::{fails, ok, TestServer};

const WEB: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: nginx
        image: nginx:1.25
        ports:
        - containerPort: 80
        env:
        - {name: A, value: '1'}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
  - port: 80
";

/// Column headers of the first line of `kubectl get` output.
fn headers(out: &str) -> Vec<String> {
    out.lines()
        .next()
        .unwrap_or("")
        .split("  ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

async fn apply_get_delete(v: u32) -> Result<()> {
    let ts = TestServer::start().await?;
    let k = |args: &[&str]| ts.kubectl(v, args);
    let out = ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], WEB));
    assert!(out.contains("deployment.apps/web created"), "{out}");
    assert!(out.contains("service/web created"), "{out}");
    let out = ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], WEB));
    assert!(out.contains("deployment.apps/web unchanged"), "{out}");
    let changed = WEB
        .replace("nginx:1.25", "nginx:1.26")
        .replace("{name: A, value: '1'}", "{name: B, value: '2'}");
    let out = ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], &changed));
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(k(&["get", "deploy", "web", "-o", "json"])))?;
    assert_eq!(
        json["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.26"
    );
    // The env entry dropped from the configuration is removed by the strategic merge patch.
    assert_eq!(
        json["spec"]["template"]["spec"]["containers"][0]["env"],
        serde_json::json!([{"name": "B", "value": "2"}])
    );
    assert_eq!(json["metadata"]["generation"], 2);

    // Tables with the real columns.
    let out = ok(k(&["get", "deploy", "-o", "wide"]));
    assert_eq!(
        headers(&out),
        [
            "NAME",
            "READY",
            "UP-TO-DATE",
            "AVAILABLE",
            "AGE",
            "CONTAINERS",
            "IMAGES",
            "SELECTOR"
        ]
    );
    assert!(out.contains("nginx:1.26"), "{out}");
    let out = ok(k(&["get", "svc"]));
    assert_eq!(
        headers(&out),
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    assert!(out.contains("80/TCP"), "{out}");
    let out = ok(k(&["get", "all", "-A"]));
    assert!(
        out.contains("deployment.apps/web") && out.contains("service/kubernetes"),
        "{out}"
    );
    let out = ok(k(&["get", "ns", "--show-labels"]));
    assert_eq!(headers(&out), ["NAME", "STATUS", "AGE", "LABELS"]);
    let out = ok(k(&[
        "get",
        "deploy",
        "-l",
        "app=web",
        "--sort-by=.metadata.name",
        "-o",
        "name",
    ]));
    assert_eq!(out.trim(), "deployment.apps/web");

    // Secrets and config maps (protobuf bodies from 1.32 on).
    ok(k(&[
        "create",
        "secret",
        "generic",
        "s1",
        "--from-literal=user=admin",
    ]));
    ok(k(&["create", "configmap", "c1", "--from-literal=k=v"]));
    let err = fails(k(&["create", "configmap", "c1", "--from-literal=k=v"]));
    assert!(
        err.contains("AlreadyExists") || err.contains("already exists"),
        "{err}"
    );
    let out = ok(k(&[
        "get",
        "secret",
        "s1",
        "-o",
        "jsonpath={.type} {.data.user}",
    ]));
    assert_eq!(out, "Opaque YWRtaW4=");
    let out = ok(k(&["get", "secrets"]));
    assert_eq!(headers(&out), ["NAME", "TYPE", "DATA", "AGE"]);

    // Scale, patch, label.
    ok(k(&["scale", "deploy", "web", "--replicas=4"]));
    ok(k(&[
        "patch",
        "deploy",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"paused":true}}"#,
    ]));
    ok(k(&[
        "patch",
        "deploy",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/revisionHistoryLimit","value":3}]"#,
    ]));
    ok(k(&["label", "deploy", "web", "tier=front"]));
    let out = ok(k(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas} {.spec.paused} {.spec.revisionHistoryLimit} {.metadata.labels.tier}"]));
    assert_eq!(out, "4 true 3 front");

    // Server-side apply creates and updates.
    let ssa = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  a: '1'\n";
    let out = ok(ts.kubectl_stdin(v, &["apply", "--server-side", "-f", "-"], ssa));
    assert!(out.contains("configmap/ssa serverside-applied"), "{out}");
    ok(ts.kubectl_stdin(
        v,
        &["apply", "--server-side", "-f", "-"],
        &ssa.replace("'1'", "'2'"),
    ));
    assert_eq!(
        ok(k(&["get", "cm", "ssa", "-o", "jsonpath={.data.a}"])),
        "2"
    );
    let two_keys = ssa.replace("  a: '1'\n", "  a: '1'\n  b: '2'\n");
    ok(ts.kubectl_stdin(v, &["apply", "--server-side", "-f", "-"], &two_keys));
    ok(ts.kubectl_stdin(v, &["apply", "--server-side", "-f", "-"], ssa));
    // `b`, applied before and now left out, is removed.
    assert_eq!(
        ok(k(&["get", "cm", "ssa", "-o", "jsonpath={.data}"])),
        r#"{"a":"1"}"#
    );

    // Errors.
    let err = fails(k(&["get", "pod", "nothing"]));
    assert!(err.contains("pods \"nothing\" not found"), "{err}");
    let bad = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\nspec:\n  containers:\n  - name: Bad_Name\n    image: ''\n";
    let err = fails(ts.kubectl_stdin(v, &["apply", "-f", "-"], bad));
    assert!(
        err.contains("is invalid") && err.contains("spec.containers[0].image: Required value"),
        "{err}"
    );

    // Unknown fields: refused under kubectl's default strict validation, dropped without it.
    let typo = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: typo\ndatta:\n  a: b\n";
    let err = fails(ts.kubectl_stdin(v, &["apply", "-f", "-"], typo));
    assert!(
        err.contains(r#"strict decoding error: unknown field "datta""#),
        "{err}"
    );
    ok(ts.kubectl_stdin(v, &["apply", "--validate=false", "-f", "-"], typo));
    let cm: serde_json::Value = serde_json::from_str(&ok(k(&["get", "cm", "typo", "-o", "json"])))?;
    assert!(cm.get("datta").is_none(), "{cm}");

    // Delete waits for the objects to be gone.
    let out = ok(ts.kubectl_stdin(v, &["delete", "-f", "-"], WEB));
    assert!(out.contains("deployment.apps \"web\" deleted"), "{out}");
    let err = fails(k(&["get", "deploy", "web"]));
    assert!(err.contains("not found"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_27() -> Result<()> {
    apply_get_delete(27).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_30() -> Result<()> {
    apply_get_delete(30).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_1_33() -> Result<()> {
    apply_get_delete(33).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_pods_table_and_describe() -> Result<()> {
    let ts = TestServer::start().await?;
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  nodeName: node-1\n  containers:\n  - name: c\n    image: busybox:1.36\n";
    ok(ts.kubectl_stdin(33, &["apply", "-f", "-"], pod));
    let out = ok(ts.kubectl(33, &["get", "pods", "-o", "wide"]));
    assert_eq!(
        headers(&out),
        [
            "NAME",
            "READY",
            "STATUS",
            "RESTARTS",
            "AGE",
            "IP",
            "NODE",
            "NOMINATED NODE",
            "READINESS GATES"
        ]
    );
    assert!(
        out.contains("0/1") && out.contains("Pending") && out.contains("node-1"),
        "{out}"
    );
    let out = ok(ts.kubectl(33, &["describe", "pod", "p"]));
    assert!(out.contains("busybox:1.36"), "{out}");
    let out = ok(ts.kubectl(
        30,
        &[
            "get",
            "pods",
            "--field-selector",
            "spec.nodeName=node-1",
            "-o",
            "name",
        ],
    ));
    assert_eq!(out.trim(), "pod/p");
    // The pod is on a node, so delete marks it; --grace-period=0 --force removes it.
    ok(ts.kubectl(33, &["delete", "pod", "p", "--grace-period=0", "--force"]));
    let out = ok(ts.kubectl(33, &["get", "pods"]));
    assert!(!out.contains("node-1"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_watch_shows_new_objects() -> Result<()> {
    use std::process::{Command, Stdio};
    let ts = TestServer::start().await?;
    ok(ts.kubectl(33, &["create", "configmap", "before"]));
    let mut child = Command::new(common::kubectl_path(33))
        .arg("--kubeconfig")
        .arg(&ts.kubeconfig)
        .args(["get", "configmaps", "-w"])
        .env("HOME", ts.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    ok(ts.kubectl(30, &["create", "configmap", "during", "--from-literal=a=b"]));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    child.kill()?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(headers(lines[0]), ["NAME", "DATA", "AGE"], "{text}");
    assert!(lines.iter().any(|l| l.starts_with("before ")), "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("during ") && l.contains(" 1 ")),
        "{text}"
    );
    Ok(())
}

/// `kubectl create <kind>`, `run` and `expose`: kubectl 1.32+ sends their bodies as protobuf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_generators() -> Result<()> {
    let ts = TestServer::start().await?;
    for v in common::KUBECTL_VERSIONS {
        let ns = format!("gen{v}");
        let k = |args: &[&str]| {
            let mut a = vec!["-n", ns.as_str()];
            a.extend_from_slice(args);
            ts.kubectl(*v, &a)
        };
        ok(ts.kubectl(*v, &["create", "namespace", &ns]));
        ok(k(&["create", "serviceaccount", "bot"]));
        let token = ok(k(&["create", "token", "bot", "--duration=20m"]));
        assert_eq!(token.trim().split('.').count(), 3, "a JWT: {token}");
        ok(k(&[
            "create",
            "deployment",
            "web",
            "--image=nginx:1.25",
            "--replicas=2",
            "--port=80",
        ]));
        ok(k(&["create", "service", "nodeport", "np", "--tcp=80:http"]));
        ok(k(&[
            "run",
            "p",
            "--image=busybox:1.36",
            "--env=A=B",
            "--labels=x=y",
            "--restart=Never",
            "--",
            "sleep",
            "9",
        ]));
        ok(k(&[
            "expose",
            "deployment",
            "web",
            "--port=8080",
            "--target-port=80",
            "--name=exposed",
        ]));
        let out = ok(k(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].ports[0].containerPort} {.spec.template.spec.restartPolicy}"]));
        assert_eq!(out, "2 80 Always", "kubectl 1.{v}");
        let out = ok(k(&[
            "get",
            "svc",
            "np",
            "-o",
            "jsonpath={.spec.type} {.spec.ports[0].targetPort}",
        ]));
        assert_eq!(out, "NodePort http", "kubectl 1.{v}");
        let out = ok(k(&[
            "get",
            "svc",
            "exposed",
            "-o",
            "jsonpath={.spec.selector.app} {.spec.ports[0].port}",
        ]));
        assert_eq!(out, "web 8080", "kubectl 1.{v}");
        let out = ok(k(&["get", "pod", "p", "-o", "jsonpath={.spec.restartPolicy} {.spec.containers[0].args} {.spec.containers[0].env[0].value} {.metadata.labels.x}"]));
        assert_eq!(out, r#"Never ["sleep","9"] B y"#, "kubectl 1.{v}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_auth_whoami_and_can_i() -> Result<()> {
    let ts = TestServer::start().await?;
    for v in [30, 33] {
        let out = ok(ts.kubectl(v, &["auth", "whoami"]));
        assert!(
            out.contains("kubernetes-admin") && out.contains("system:masters"),
            "{out}"
        );
        assert_eq!(
            ok(ts.kubectl(v, &["auth", "can-i", "create", "pods"])).trim(),
            "yes"
        );
    }
    // The node credentials name the node's user and group.
    let node_kc = ts.dir.path().join("data/node.kubeconfig");
    let out = ok(common::kubectl(&node_kc, 33, &["auth", "whoami"], None));
    assert!(
        out.contains("system:node:") && out.contains("system:nodes"),
        "{out}"
    );
    Ok(())
}
