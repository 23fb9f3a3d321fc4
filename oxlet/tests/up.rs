//! `oxlet up` as a user runs it: the control plane and the node's kube-proxy in one process,
//! driven by the real kubectl.
//!
//! Ignored in the parallel run and run alone by `scripts/test`: its kube-proxy owns the
//! `oxlet-proxy` table and drops traffic to unallocated addresses of 10.96.0.0/12, where other
//! tests put their own services.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Up {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(env!("CARGO_BIN_EXE_oxlet"))
            .args(["proxy", "--cleanup"])
            .output();
    }
}

fn kubectl(kc: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut c = Command::new("/usr/lib/google-cloud-sdk/bin/kubectl.1.33")
        .arg("--kubeconfig")
        .arg(kc)
        .args(args)
        .env("HOME", kc.parent().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    let mut input = c.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    c.wait_with_output().unwrap()
}

#[track_caller]
fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "kubectl failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "run alone by scripts/test (owns the oxlet-proxy table and 10.96.0.0/12)"]
fn up_runs_control_plane_and_proxy_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let kc = dir.path().join("admin.kubeconfig");
    let child = Command::new(env!("CARGO_BIN_EXE_oxlet"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["up", "--port", &port.to_string(), "--kubeconfig"])
        .arg(&kc)
        .stderr(Stdio::piped())
        .spawn()
        .expect("oxlet up starts");
    let mut up = Up {
        child: Some(child),
        dir,
    };
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
        || {
            let out = Command::new("nft")
                .args(["list", "map", "ip", "oxlet-proxy", "service-ips"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains("10.96.0.1 . tcp . 443")
        },
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

    // The controllers and the scheduler run: a Deployment gets its ReplicaSet and pods, which
    // stay Pending with kube-scheduler's reason while no node exists.
    let deploy = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: 127.0.0.1:5000/test/busybox:latest}]
";
    ok(kubectl(&kc, &["apply", "-f", "-"], Some(deploy)));
    until("2 unschedulable pods", Duration::from_secs(30), || {
        let out = kubectl(
            &kc,
            &[
                "get",
                "pods",
                "-l",
                "app=web",
                "-o",
                "jsonpath={.items[*].status.conditions[0].message}",
            ],
            None,
        );
        String::from_utf8_lossy(&out.stdout)
            .matches("0/0 nodes are available")
            .count()
            == 2
    });
    let out = ok(kubectl(
        &kc,
        &["get", "rs", "-l", "app=web", "-o", "name"],
        None,
    ));
    assert_eq!(out.lines().count(), 1, "{out}");

    // SIGTERM: it stops, and the proxy's rules stay for traffic already flowing.
    let mut child = up.child.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "oxlet up did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let listed = Command::new("nft")
        .args(["list", "table", "ip", "oxlet-proxy"])
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "the rules stay after oxlet up stops"
    );
    let _ = &up.dir;
}
