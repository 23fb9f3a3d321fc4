//! `oxlet agent` as a user starts it: registers its node with a node identity, writes the
//! default CNI configuration for `--pod-cidr` and installs oxlet-bridge, stops on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_registers_the_node_and_writes_a_default_network() {
    let dir = tempfile::tempdir().unwrap();
    let mut scfg = control::Config::new(dir.path().join("control"));
    scfg.listen = "127.0.0.1:0".parse().unwrap();
    scfg.kubeconfig = dir.path().join("admin.kubeconfig");
    // No node IPAM: the pod range comes from --pod-cidr, as on a cluster that gives none.
    scfg.controllers = false;
    let server = control::start(scfg).await.unwrap();
    let kubeconfig = dir.path().join("node.kubeconfig");
    control::certs::Pki::new(&dir.path().join("control"))
        .write_node_kubeconfig(
            "oxlet-cmd-node",
            &format!("https://127.0.0.1:{}", server.addr.port()),
            &kubeconfig,
        )
        .unwrap();
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_oxlet"));
    let bridge = exe.parent().unwrap().join("oxlet-bridge");
    assert!(
        bridge.is_file(),
        "{} missing: cargo build -p oxlet-cni --bins",
        bridge.display()
    );
    let p = |s: &str| dir.path().join(s);
    let mut child = Command::new(&exe)
        .arg("--data-dir")
        .arg(p("data"))
        .arg("agent")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "--node-name",
            "oxlet-cmd-node",
            "--pod-cidr",
            "10.245.7.0/24",
            "--reserved",
            "cpu=100m",
            "--sync-frequency-seconds",
            "5",
        ])
        .arg("--run-dir")
        .arg(p("run"))
        .arg("--log-dir")
        .arg(p("logs"))
        .arg("--cni-conf-dir")
        .arg(p("net.d"))
        .arg("--cni-bin-dir")
        .arg(p("bin"))
        .arg("--cni-cache-dir")
        .arg(p("cache"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut allocatable_cpu = serde_json::Value::Null;
    let ready = loop {
        let node =
            server
                .registry
                .get(control::resources::get("", "nodes"), None, "oxlet-cmd-node");
        if let Ok(n) = &node {
            allocatable_cpu = n["status"]["allocatable"]["cpu"].clone();
        }
        let ready = node.ok().and_then(|n| {
            n["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready")
                .map(|c| c["status"].clone())
        });
        if ready.is_some() || Instant::now() > deadline {
            break ready;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // SAFETY: signalling the child this test spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    server.stop();
    assert_eq!(ready, Some(serde_json::json!("True")));
    let cpus = std::thread::available_parallelism().unwrap().get() * 1000 - 100;
    assert_eq!(allocatable_cpu, serde_json::json!(format!("{cpus}m")));
    assert!(status.success(), "{status}");
    let conf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p("net.d/10-oxlet.conflist")).unwrap()).unwrap();
    assert_eq!(conf["plugins"][0]["type"], "oxlet-bridge");
    assert_eq!(
        conf["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
        "10.245.7.0/24"
    );
    assert!(p("bin/oxlet-bridge").is_file());
}
