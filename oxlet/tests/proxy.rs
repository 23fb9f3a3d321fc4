//! `oxlet proxy` as a user runs it: against an in-process API server, in its own nft table.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;

fn oxlet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_oxlet"))
}

fn table_text(table: &str) -> String {
    let out = Command::new("nft")
        .args(["list", "table", "ip", table])
        .output()
        .expect("nft runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kills the proxy and removes its table, whatever the test did.
struct Guard {
    child: Option<Child>,
    table: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &self.table])
            .stderr(Stdio::null())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_programs_the_table_leaves_it_on_exit_and_cleanup_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = control::Config::new(dir.path().join("data"));
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.kubeconfig = dir.path().join("admin.kubeconfig");
    let server = control::start(cfg).await.unwrap();
    let r: u16 = rand_u16();
    let table = format!("oxlet-proxy-cmd-{r}");
    // Only an address of this test's own: no `kubernetes` Service (10.96.0.1), one without
    // endpoints in 10.111.N.0/28 instead.
    let client = {
        let kc = kube::config::Kubeconfig::read_from(&server.kubeconfig).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    };
    let services: kube::Api<Service> = kube::Api::namespaced(client, "default");
    services
        .delete("kubernetes", &Default::default())
        .await
        .unwrap();
    let ip = format!("10.111.{}.1", r % 256);
    let svc: Service = serde_json::from_value(serde_json::json!({"metadata": {"name": "lonely"},
        "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}))
    .unwrap();
    services.create(&Default::default(), &svc).await.unwrap();
    let mut guard = Guard {
        child: None,
        table: table.clone(),
    };
    // Free ports for /metrics and /healthz: the defaults belong to the machine's own proxy.
    let free = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (metrics, healthz) = (free(), free());
    let child = oxlet()
        .args(["proxy", "--kubeconfig"])
        .arg(&server.kubeconfig)
        .args(["--table", &table])
        .args(["--service-cidr", &format!("10.111.{}.0/28", r % 256)])
        .args(["--nodeport-addresses", "127.0.0.0/8"])
        .args(["--hostname-override", "node-a"])
        .args(["--metrics-bind-address", &metrics.to_string()])
        .args(["--healthz-bind-address", &healthz.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .expect("oxlet proxy starts");
    let pid = child.id() as i32;
    guard.child = Some(child);

    // A Service without an EndpointSlice is rejected.
    let t0 = Instant::now();
    while !table_text(&table).contains(&format!("{ip} . tcp . 80 : goto reject-chain")) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no rule for {ip}:\n{}",
            table_text(&table)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(http_get(healthz, "/healthz").starts_with("HTTP/1.1 200"));
    // The sync is counted just after the kernel took it.
    let t0 = Instant::now();
    loop {
        let text = http_get(metrics, "/metrics");
        if text.contains("\nkubeproxy_sync_full_proxy_rules_total 1\n") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SIGTERM: a clean exit that leaves the rules in place.
    // SAFETY: pid is our own child, not yet waited for.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = guard.child.take().unwrap().wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(table_text(&table).contains("chain services"));

    let out = oxlet()
        .args(["proxy", "--cleanup", "--table", &table])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(table_text(&table), "");
    server.stop();
}

/// The whole HTTP answer to GET `path`.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (t.subsec_nanos() ^ std::process::id()) as u16
}
