//! Test fixtures on the real kernel: a claimed subnet `10.243.X.0/24` with names derived from X
//! (bridge `oxtbX`, netns `oxt-X-N`, network `oxt-X`), removed on drop and on the next claim of
//! X after a killed run. Runs as root.
#![allow(dead_code)]

use cni::client::{Client, NetworkConfigList, RuntimeConf};
use serde_json::{json, Value};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const CLAIMS: &str = "/run/oxlet-cni-tests";

/// Which bridge+IPAM implementation a test drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    Oxlet,
    Reference,
}

pub const BOTH: [Impl; 2] = [Impl::Oxlet, Impl::Reference];

impl Impl {
    pub fn plugin_type(self) -> &'static str {
        match self {
            Impl::Oxlet => "oxlet-bridge",
            Impl::Reference => "bridge",
        }
    }
    pub fn plugin_paths(self) -> Vec<PathBuf> {
        let refdir = PathBuf::from("/usr/lib/cni");
        match self {
            Impl::Oxlet => vec![oxlet_bin().parent().unwrap().to_path_buf(), refdir],
            Impl::Reference => vec![refdir],
        }
    }
    /// The newest spec version the implementation speaks (reference plugins 1.1.1: 1.0.0).
    pub fn version(self) -> &'static str {
        match self {
            Impl::Oxlet => "1.1.0",
            Impl::Reference => "1.0.0",
        }
    }
}

pub fn oxlet_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_oxlet-bridge"))
}

pub fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("sh runs")
}

pub fn sh_ok(cmd: &str) -> String {
    let o = sh(cmd);
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn pid_alive(pid: i32) -> bool {
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// One test's network: claimed subnet, names, temp dirs.
pub struct Fixture {
    pub x: u8,
    pub name: String,
    pub bridge: String,
    pub data: tempfile::TempDir,
    pub cache: tempfile::TempDir,
    netns_seq: std::cell::Cell<u32>,
}

impl Fixture {
    pub fn new() -> Self {
        fs::create_dir_all(CLAIMS).unwrap();
        let start = (std::process::id() as usize * 7 + rand::random::<usize>()) % 120;
        for i in 0..120 {
            let x = (1 + (start + i) % 120) as u8;
            let claim = Path::new(CLAIMS).join(x.to_string());
            let took = match OpenOptions::new().write(true).create_new(true).open(&claim) {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id()).unwrap();
                    true
                }
                Err(_) => {
                    let pid: i32 = fs::read_to_string(&claim)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(0);
                    // A dead (killed) run's claim, or an unwritten one older than a minute.
                    let old = fs::metadata(&claim)
                        .and_then(|m| m.modified())
                        .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60))
                        .unwrap_or(true);
                    if (pid == 0 && old) || (pid != 0 && !pid_alive(pid)) {
                        fs::write(&claim, std::process::id().to_string()).unwrap();
                        true
                    } else {
                        false
                    }
                }
            };
            if took {
                let f = Fixture {
                    x,
                    name: format!("oxt-{x}"),
                    bridge: format!("oxtb{x}"),
                    data: tempfile::tempdir().unwrap(),
                    cache: tempfile::tempdir().unwrap(),
                    netns_seq: std::cell::Cell::new(0),
                };
                f.cleanup();
                return f;
            }
        }
        panic!("no free test subnet in 10.243.1-120.0/24");
    }

    pub fn subnet(&self) -> String {
        format!("10.243.{}.0/24", self.x)
    }
    pub fn gateway(&self) -> String {
        format!("10.243.{}.1", self.x)
    }

    /// A new network namespace `oxt-X-N`; its path.
    pub fn netns(&self) -> String {
        let n = self.netns_seq.get();
        self.netns_seq.set(n + 1);
        let name = format!("oxt-{}-{n}", self.x);
        let _ = sh(&format!("ip netns del {name} 2>/dev/null"));
        sh_ok(&format!("ip netns add {name}"));
        format!("/run/netns/{name}")
    }

    /// The bridge plugin's configuration for `imp`, with `extra` merged in.
    pub fn bridge_conf(&self, imp: Impl, extra: Value) -> Value {
        let mut c = json!({
            "type": imp.plugin_type(),
            "bridge": self.bridge,
            "isGateway": true,
            "isDefaultGateway": true,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.subnet()}]],
                "dataDir": self.data.path(),
            }
        });
        merge(&mut c, extra);
        c
    }

    pub fn list(&self, imp: Impl, plugins: Vec<Value>) -> NetworkConfigList {
        self.list_v(imp.version(), plugins)
    }

    pub fn list_v(&self, version: &str, plugins: Vec<Value>) -> NetworkConfigList {
        let v = json!({"cniVersion": version, "name": self.name, "plugins": plugins});
        NetworkConfigList::parse(v.to_string().as_bytes(), Path::new("test")).unwrap()
    }

    pub fn client(&self, imp: Impl) -> Client {
        Client::new(imp.plugin_paths(), self.cache.path())
    }

    pub fn ip_files(&self) -> Vec<String> {
        let dir = self.data.path().join(&self.name);
        let Ok(rd) = fs::read_dir(dir) else {
            return vec![];
        };
        rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect()
    }

    /// Ports on the bridge (host veths).
    pub fn ports(&self) -> Vec<String> {
        let out = sh(&format!(
            "ip -j link show master {} 2>/dev/null",
            self.bridge
        ));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(json!([]));
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["ifname"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits (netns teardown is asynchronous in the kernel) until `f` holds.
    pub fn eventually(&self, what: &str, f: impl Fn() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "timed out waiting for: {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn masq_table(&self) -> String {
        format!("oxlet-cni-{}", self.name)
    }

    pub fn hostport_table(&self) -> String {
        format!("oxlet-hostport-{}", self.name)
    }

    /// The network's hostPort table as `nft` lists it (empty when there is none).
    pub fn hostport_rules(&self) -> String {
        String::from_utf8_lossy(
            &sh(&format!(
                "nft list table inet {} 2>/dev/null",
                self.hostport_table()
            ))
            .stdout,
        )
        .into_owned()
    }

    pub fn table_exists(&self) -> bool {
        sh(&format!("nft list table inet {}", self.masq_table()))
            .status
            .success()
    }

    fn cleanup(&self) {
        let _ = sh(&format!(
            "for n in $(ip netns list | awk '{{print $1}}' | grep '^oxt-{x}-'); do ip netns del $n; done; \
             for l in $(ip -o link show master {br} 2>/dev/null | awk -F': ' '{{print $2}}' | cut -d@ -f1); do ip link del $l; done; \
             ip link del {br} 2>/dev/null; ip link del oxto{x} 2>/dev/null; nft delete table inet oxlet-cni-{name} 2>/dev/null; nft delete table inet oxlet-hostport-{name} 2>/dev/null; nft delete table ip oxt-hp-{x} 2>/dev/null; true",
            x = self.x,
            br = self.bridge,
            name = self.name
        ));
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.cleanup();
        let _ = fs::remove_file(Path::new(CLAIMS).join(self.x.to_string()));
    }
}

pub fn merge(base: &mut Value, extra: Value) {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        for (k, v) in e {
            match (b.get_mut(&k), v) {
                (Some(bv @ Value::Object(_)), v @ Value::Object(_)) => merge(bv, v),
                (_, v) => {
                    b.insert(k, v);
                }
            }
        }
    }
}

pub fn rt(id: &str, netns: &str) -> RuntimeConf {
    RuntimeConf {
        container_id: id.into(),
        netns: netns.into(),
        ifname: "eth0".into(),
        ..Default::default()
    }
}

/// The pod address (without prefix) of a result.
pub fn pod_ip(r: &cni::CniResult) -> String {
    r.ips[0].address.split('/').next().unwrap().to_string()
}

fn enter(netns: Option<&str>) {
    if let Some(p) = netns {
        let f = File::open(p).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    }
}

/// A TCP echo server (one connection: replies `pong:<what it read>`) in `netns` (None: host).
pub fn serve_once(netns: Option<&str>, addr: &str) -> JoinHandle<()> {
    serve(netns, addr, |mut s, _| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        let _ = s.write_all(format!("pong:{buf}").as_bytes());
    })
}

/// A TCP server (one connection) in `netns` that replies with the peer's address.
pub fn serve_peer(netns: Option<&str>, addr: &str) -> JoinHandle<()> {
    serve(netns, addr, |mut s, peer| {
        let _ = s.write_all(peer.ip().to_string().as_bytes());
    })
}

/// Listens on `addr` in `netns` (None: host) and hands the first connection to `reply`;
/// returns once the listener is bound.
fn serve<F>(netns: Option<&str>, addr: &str, reply: F) -> JoinHandle<()>
where
    F: FnOnce(std::net::TcpStream, SocketAddr) + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let netns = netns.map(String::from);
    let addr: SocketAddr = addr.parse().unwrap();
    let h = std::thread::spawn(move || {
        enter(netns.as_deref());
        let l = TcpListener::bind(addr).unwrap();
        tx.send(()).unwrap();
        let (s, peer) = l.accept().unwrap();
        reply(s, peer);
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("server listening");
    h
}

/// Connects from `netns` (None: host), sends `msg`, returns the reply.
pub fn talk(netns: Option<&str>, addr: &str, msg: &str) -> std::io::Result<String> {
    let netns = netns.map(String::from);
    let addr: SocketAddr = addr.parse().unwrap();
    let msg = msg.to_string();
    std::thread::spawn(move || {
        enter(netns.as_deref());
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(msg.as_bytes())?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .join()
    .unwrap()
}

/// Runs the oxlet-bridge binary directly; returns (exit success, parsed stdout).
pub fn run_plugin(vars: &[(&str, &str)], stdin: &str) -> (bool, Value) {
    run_plugin_in(None, vars, stdin)
}

/// The same, inside the named netns (`ip netns exec`) when given: a node of its own.
pub fn run_plugin_in(node: Option<&str>, vars: &[(&str, &str)], stdin: &str) -> (bool, Value) {
    let mut c = match node {
        Some(n) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", n]).arg(oxlet_bin());
            c
        }
        None => Command::new(oxlet_bin()),
    };
    c.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (k, v) in vars {
        c.env(k, v);
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), v)
}

/// The plugin's stdin for one network: the bridge conf with name and version.
pub fn plugin_stdin(f: &Fixture, version: &str, extra: Value) -> String {
    let mut c = f.bridge_conf(Impl::Oxlet, extra);
    c["name"] = json!(f.name);
    c["cniVersion"] = json!(version);
    c.to_string()
}
