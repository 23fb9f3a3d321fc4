//! What the `oxlet up` tests share: kubectl 1.33 against the cluster, waiting, free ports.
#![allow(dead_code)]

#[allow(unused_imports)]
pub use oxlet_tests::testbed::{busybox, registry};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn kubectl(kc: &Path, args: &[&str], stdin: Option<&str>) -> Output {
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
pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "kubectl failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The node directory flags of a test's `oxlet up`, `agent` or `uninstall` below `dir`, laid
/// out as the tests lay it out (run, logs, net.d, cni-cache), and `--cni-bin-dir` with `bins`.
pub fn dir_flags(dir: &Path, bins: &str) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = Vec::new();
    for (flag, sub) in [
        ("--run-dir", "run"),
        ("--log-dir", "logs"),
        ("--cni-conf-dir", "net.d"),
        ("--cni-cache-dir", "cni-cache"),
    ] {
        v.push(flag.into());
        v.push(dir.join(sub).into());
    }
    v.push("--cni-bin-dir".into());
    v.push(bins.into());
    v
}

/// The directory of the oxlet binaries under test.
pub fn bin_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_BIN_EXE_oxlet"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

/// `oxlet uninstall` of what a test's `oxlet up` or `oxlet agent` made below `dir`, laid out as
/// the tests lay it out (data, run, logs, net.d, cni-bin, cni-cache, admin.kubeconfig).
pub fn uninstall(dir: &Path, extra: &[&str]) -> Output {
    let bins = format!(
        "{},{},/usr/lib/cni",
        dir.join("cni-bin").display(),
        bin_dir().display()
    );
    Command::new(env!("CARGO_BIN_EXE_oxlet"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["uninstall", "--kubeconfig"])
        .arg(dir.join("admin.kubeconfig"))
        .args(dir_flags(dir, &bins))
        .args(extra)
        .output()
        .expect("oxlet uninstall runs")
}

/// Removes what killed earlier runs left in their temporary directories named `prefix*`
/// (a directory whose oxlet still runs is left: uninstall refuses it).
pub fn sweep(prefix: &str, extra: &[&str]) {
    for e in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with(prefix)
            && uninstall(&e.path(), extra).status.success()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A running `oxlet up` with everything below its temporary directory, laid out as
/// `uninstall` expects; its output (both streams) goes to `up.log` there. Dropping it kills it and removes
/// what it made.
pub struct Cluster {
    pub child: Option<std::process::Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Cluster {
    /// Starts `oxlet up` in a new temporary directory named `prefix*`, after sweeping what
    /// killed runs of the same test left.
    pub fn start(prefix: &str) -> Cluster {
        let mut c = Cluster::new(prefix);
        c.restart();
        c
    }

    /// The directory and port of a cluster not started yet (`restart_with` starts it).
    pub fn new(prefix: &str) -> Cluster {
        sweep(prefix, &[]);
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        Cluster {
            child: None,
            dir,
            port: free_port(),
        }
    }

    pub fn kubeconfig(&self) -> std::path::PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `oxlet up` again on the same directories (after `stop`).
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// `restart` with more flags after the tests' own.
    pub fn restart_with(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "oxlet up already runs");
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("up.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_oxlet"))
            .arg("--data-dir")
            .arg(d.join("data"))
            .args(["up", "--port", &self.port.to_string(), "--kubeconfig"])
            .arg(d.join("admin.kubeconfig"))
            .args(dir_flags(
                d,
                &format!("{},/usr/lib/cni", d.join("cni-bin").display()),
            ))
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("oxlet up starts");
        self.child = Some(child);
    }

    /// Waits for the API server and this node Ready.
    pub fn wait_ready(&self, limit: Duration) {
        let kc = self.kubeconfig();
        until("the node Ready", limit, || {
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
            out.status.success() && String::from_utf8_lossy(&out.stdout) == "True"
        });
    }

    /// SIGTERM, as a user stops it; asserts it exits cleanly within 20 s.
    pub fn stop(&mut self) {
        let child = self.child.as_mut().expect("oxlet up runs");
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
        self.child = None;
        assert!(status.success(), "{status:?}");
    }

    /// The node's InternalIP.
    pub fn node_ip(&self) -> String {
        ok(kubectl(
            &self.kubeconfig(),
            &[
                "get",
                "nodes",
                "-o",
                "jsonpath={.items[0].status.addresses[?(@.type=='InternalIP')].address}",
            ],
            None,
        ))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of oxlet up's output ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        uninstall(self.dir.path(), &[]);
    }
}

/// The proxy's table as `nft list` prints it (empty when there is none).
pub fn proxy_table() -> String {
    let out = Command::new("nft")
        .args(["list", "table", "ip", "oxlet-proxy"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the proxy's table holds `needle` (a map element such as `10.96.0.1 . tcp . 443`).
pub fn proxy_rule(needle: &str) -> bool {
    proxy_table().contains(needle)
}
