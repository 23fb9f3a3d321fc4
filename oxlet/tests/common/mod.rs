//! What the `oxlet up` tests share: kubectl 1.33 against the cluster, waiting, free ports.
#![allow(dead_code)]

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

/// `oxlet uninstall` of what a test's `oxlet up` or `oxlet agent` made below `dir`, laid out as
/// the tests lay it out (data, run, logs, net.d, cni-bin, cni-cache, admin.kubeconfig).
pub fn uninstall(dir: &Path, extra: &[&str]) -> Output {
    let bins = Path::new(env!("CARGO_BIN_EXE_oxlet"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    Command::new(env!("CARGO_BIN_EXE_oxlet"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["uninstall", "--kubeconfig"])
        .arg(dir.join("admin.kubeconfig"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--log-dir")
        .arg(dir.join("logs"))
        .arg("--cni-conf-dir")
        .arg(dir.join("net.d"))
        .arg("--cni-bin-dir")
        .arg(format!(
            "{},{},/usr/lib/cni",
            dir.join("cni-bin").display(),
            bins.display()
        ))
        .arg("--cni-cache-dir")
        .arg(dir.join("cni-cache"))
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
