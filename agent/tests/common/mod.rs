//! Test harness: the real API server in-process, an agent with a node identity and its own
//! directories, and a claimed pod subnet `10.244.X.0/24` on bridge `oxab<X>`; everything is
//! removed on drop, and leftovers of a killed earlier run on the next claim of X.
#![allow(dead_code)]

use agent::pod_runtime::PodRuntime;
use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::runtime::watcher::{self, Event};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const CLAIMS: &str = "/run/oxlet-agent-tests";
#[allow(unused_imports)]
pub use oxlet_tests::testbed::{auth_registry, busybox, image, layers};

pub fn sh(cmd: &str) -> String {
    let o = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("sh runs");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// `target/debug`, where the workspace's binaries are built.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(Path::parent).expect("target/debug");
    for bin in ["oxlet-shim", "oxlet-bridge"] {
        assert!(
            dir.join(bin).is_file(),
            "{} missing: build it first (cargo build -p oxlet-runtime -p oxlet-cni --bins)",
            dir.join(bin).display()
        );
    }
    dir.to_path_buf()
}

/// Claims a free X in 1..=200 (a dead run's claim is taken over).
fn claim() -> u8 {
    fs::create_dir_all(CLAIMS).unwrap();
    let start = (std::process::id() as usize * 13 + rand::random::<usize>()) % 200;
    for i in 0..200 {
        let x = (1 + (start + i) % 200) as u8;
        let path = Path::new(CLAIMS).join(x.to_string());
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                write!(f, "{}", std::process::id()).unwrap();
                return x;
            }
            Err(_) => {
                let pid: i32 = fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                if pid != 0 && !pid_alive(pid) {
                    fs::write(&path, std::process::id().to_string()).unwrap();
                    return x;
                }
            }
        }
    }
    panic!("no free test subnet in 10.244.1-200.0/24");
}

/// A TCP port free on every address right now.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("0.0.0.0:0")?
        .local_addr()?
        .port())
}

pub struct Cluster {
    pub server: Option<control::Server>,
    pub dir: tempfile::TempDir,
    pub admin: kube::Client,
    pub x: u8,
    pub node: String,
    pub cfg: agent::Config,
    agent: Option<tokio::task::JoinHandle<agent::Result<()>>>,
}

/// Timeouts are safety nets, not measurements: under the cgroup v2 VM's emulation, which sets
/// `OXLET_TEST_SLOWDOWN`, they stretch by that factor.
pub fn slowdown() -> u32 {
    std::env::var("OXLET_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u32)
        .max(1)
}

pub fn patience(d: Duration) -> Duration {
    d * slowdown()
}

pub async fn client_for(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

impl Cluster {
    /// A server and an agent configuration (not started) for a fresh node, pods networked by
    /// oxlet-bridge.
    pub async fn new() -> Result<Cluster> {
        Self::with_plugin("oxlet-bridge", "1.1.0").await
    }

    /// Like `new`, with the bridge plugin of type `plugin` (`bridge` is the reference one from
    /// /usr/lib/cni) speaking CNI `version`.
    pub async fn with_plugin(plugin: &str, version: &str) -> Result<Cluster> {
        Self::build(plugin, version, |_| {}).await
    }

    /// Like `new`, with the API server's configuration changed by `server`.
    pub async fn with_server(server: impl FnOnce(&mut control::Config)) -> Result<Cluster> {
        Self::build("oxlet-bridge", "1.1.0", server).await
    }

    async fn build(
        plugin: &str,
        version: &str,
        server: impl FnOnce(&mut control::Config),
    ) -> Result<Cluster> {
        let x = claim();
        let dir = tempfile::Builder::new().prefix("oxlet-agent-").tempdir()?;
        let mut scfg = control::Config::new(dir.path().join("control"));
        scfg.listen = "127.0.0.1:0".parse()?;
        scfg.kubeconfig = dir.path().join("admin.kubeconfig");
        server(&mut scfg);
        let server = control::start(scfg).await?;
        let admin = client_for(&server.kubeconfig).await?;
        let node = format!("node-{x}");
        let bins = bin_dir();
        let mut cfg = agent::Config::new(&node);
        cfg.data_dir = dir.path().join("data");
        cfg.run_dir = dir.path().join("run");
        cfg.log_dir = dir.path().join("logs");
        cfg.shim = bins.join("oxlet-shim");
        cfg.cni_conf_dir = dir.path().join("net.d");
        cfg.cni_cache_dir = dir.path().join("cni-cache");
        cfg.cni_bin_dirs = vec![bins.clone(), PathBuf::from("/usr/lib/cni")];
        cfg.node_status_interval = Duration::from_secs(1);
        cfg.pod_resync = Duration::from_millis(300);
        // The API server reaches this agent's kubelet API at the port its Node reports.
        cfg.kubelet_port = free_port()?;
        let ca = fs::read(dir.path().join("control/pki/ca.crt"))?;
        cfg.client_ca = agent::kubelet_api::pem_to_der(&ca);
        let c = Cluster {
            server: Some(server),
            dir,
            admin,
            x,
            node,
            cfg,
            agent: None,
        };
        c.cleanup_network();
        fs::create_dir_all(&c.cfg.cni_conf_dir)?;
        let mut conf = serde_json::json!({
            "cniVersion": version,
            "name": format!("oxat-{x}"),
            "plugins": [{
                "type": plugin,
                "bridge": c.bridge(),
                "isGateway": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": c.subnet()}]],
                    "dataDir": c.dir.path().join("ipam"),
                }
            }]
        });
        if plugin == "oxlet-bridge" {
            // As the agent's default configuration: hostPorts through the plugin.
            conf["plugins"][0]["capabilities"] = serde_json::json!({"portMappings": true});
        }
        fs::write(
            c.cfg.cni_conf_dir.join("10-test.conflist"),
            serde_json::to_vec(&conf)?,
        )?;
        Ok(c)
    }

    /// The admin kubeconfig of the API server.
    pub fn kubeconfig(&self) -> PathBuf {
        self.server.as_ref().expect("running").kubeconfig.clone()
    }

    /// The API server's PKI directory (ca.crt, kubelet-client.crt/.key, ...).
    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("control/pki")
    }

    pub fn bridge(&self) -> String {
        format!("oxab{}", self.x)
    }

    pub fn subnet(&self) -> String {
        format!("10.244.{}.0/24", self.x)
    }

    /// A client with this node's identity (`system:node:<node>`).
    pub async fn node_client(&self) -> Result<kube::Client> {
        let pki = control::certs::Pki::new(&self.dir.path().join("control"));
        let to = self.dir.path().join("node.kubeconfig");
        let addr = self.server.as_ref().expect("running").addr;
        pki.write_node_kubeconfig(
            &self.node,
            &format!("https://127.0.0.1:{}", addr.port()),
            &to,
        )?;
        client_for(&to).await
    }

    /// Starts the agent (again), in-process, as `oxlet up` would.
    pub async fn start_agent(&mut self) -> Result<()> {
        let client = self.node_client().await?;
        self.agent = Some(tokio::spawn(agent::run(client, self.cfg.clone())));
        Ok(())
    }

    /// Drops the agent as a kill would: its tasks stop, containers keep running.
    pub async fn kill_agent(&mut self) {
        if let Some(h) = self.agent.take() {
            h.abort();
            let _ = h.await;
        }
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.admin.clone(), "default")
    }

    pub async fn create_pod(&self, pod: serde_json::Value) -> Result<Pod> {
        let mut pod: Pod = serde_json::from_value(pod)?;
        pod.spec.as_mut().context("spec")?.node_name = Some(self.node.clone());
        Ok(self.pods().create(&PostParams::default(), &pod).await?)
    }

    /// Watches the pod (every status the agent reports) until `done` holds; fails with its
    /// last status after `timeout`.
    pub async fn wait_pod(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Pod) -> bool,
    ) -> Result<Pod> {
        let wc = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = std::pin::pin!(watcher::watcher(self.pods(), wc));
        let mut last: Option<Pod> = None;
        let found = tokio::time::timeout(patience(timeout), async {
            while let Some(ev) = events.next().await {
                if let Event::Apply(p) | Event::InitApply(p) = ev? {
                    if done(&p) {
                        return Ok(p);
                    }
                    last = Some(p);
                }
            }
            bail!("watch of pod {name} ended")
        })
        .await;
        match found {
            Ok(r) => r,
            Err(_) => bail!(
                "pod {name}: timed out waiting for {what}; status: {}",
                serde_json::to_string_pretty(&last.and_then(|p| p.status))?
            ),
        }
    }

    pub async fn wait_gone(&self, name: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + patience(timeout);
        while self.pods().get_opt(name).await?.is_some() {
            if Instant::now() > deadline {
                bail!("pod {name} still exists after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Waits until the runtime holds nothing of pod `uid` (containers, sandbox, record).
    pub async fn wait_no_leftovers(&self, uid: &str) -> Result<()> {
        let ctx = PodRuntime::new(&self.cfg, std::net::IpAddr::from([127, 0, 0, 1]))?;
        let deadline = Instant::now() + patience(Duration::from_secs(20));
        while ctx.local_pods().iter().any(|u| u == uid) {
            if Instant::now() > deadline {
                bail!("leftovers of pod {uid} remain");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Host ends of veths on the test bridge.
    pub fn bridge_ports(&self) -> Vec<String> {
        sh(&format!(
            "ip -o link show master {} 2>/dev/null",
            self.bridge()
        ))
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|s| s.split('@').next().unwrap_or(s).to_string())
        .collect()
    }

    fn cleanup_network(&self) {
        let br = self.bridge();
        sh(&format!(
            "for l in $(ip -o link show master {br} 2>/dev/null | awk -F': ' '{{print $2}}' | cut -d@ -f1); do ip link del $l; done; ip link del {br} 2>/dev/null; nft delete table inet oxlet-hostport-oxat-{x} 2>/dev/null; true",
            x = self.x
        ));
    }
}

impl Cluster {
    /// Reasons of the events recorded about pod `name`, oldest first.
    pub async fn event_reasons(&self, name: &str) -> Result<Vec<String>> {
        Ok(self
            .events(name)
            .await?
            .into_iter()
            .map(|(r, _)| r)
            .collect())
    }

    /// (reason, message) of the events recorded about pod `name`, oldest first.
    pub async fn events(&self, name: &str) -> Result<Vec<(String, String)>> {
        let api: Api<k8s_openapi::api::core::v1::Event> =
            Api::namespaced(self.admin.clone(), "default");
        let mut evs: Vec<_> = api
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(name))
            .collect();
        evs.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        Ok(evs
            .into_iter()
            .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
            .collect())
    }

    /// Waits until the pod's events include every reason of `want`.
    pub async fn wait_events(&self, name: &str, want: &[&str]) -> Result<Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.event_reasons(name).await?;
            if want.iter().all(|w| got.iter().any(|g| g == w)) {
                return Ok(got);
            }
            if Instant::now() > deadline {
                bail!("pod {name}: events {got:?} lack some of {want:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

pub fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

pub fn condition(p: &Pod, ty: &str) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == ty)
        .map(|c| c.status.clone())
}

pub fn container(p: &Pod) -> k8s_openapi::api::core::v1::ContainerStatus {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first().cloned())
        .unwrap_or_default()
}

pub fn waiting_reason(p: &Pod) -> Option<String> {
    container(p).state?.waiting?.reason
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(h) = self.agent.take() {
            h.abort();
        }
        if let Ok(ctx) = PodRuntime::new(&self.cfg, std::net::IpAddr::from([127, 0, 0, 1])) {
            for uid in ctx.local_pods() {
                if let Err(e) = ctx.teardown(&uid) {
                    eprintln!("cleanup pod {uid}: {e}");
                }
            }
        }
        self.cleanup_network();
        if let Some(s) = self.server.take() {
            s.stop();
        }
        let _ = fs::remove_file(Path::new(CLAIMS).join(self.x.to_string()));
    }
}

/// The real kubectl of minor version `minor` (27..=33).
pub fn kubectl_bin(minor: u32) -> PathBuf {
    PathBuf::from(format!("/usr/lib/google-cloud-sdk/bin/kubectl.1.{minor}"))
}

impl Cluster {
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// Runs kubectl 1.`minor` as the admin with `stdin`; its stdout, or an error with stderr.
    pub fn kubectl(&self, minor: u32, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let o = self.kubectl_output(minor, args, stdin)?;
        if !o.status.success() {
            bail!(
                "kubectl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    pub fn kubectl_output(
        &self,
        minor: u32,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<std::process::Output> {
        let mut cmd = Command::new(kubectl_bin(minor));
        cmd.arg("--kubeconfig")
            .arg(self.admin_kubeconfig())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().context("kubectl runs")?;
        {
            let mut input = child.stdin.take().context("stdin")?;
            if let Some(s) = stdin {
                input.write_all(s.as_bytes())?;
            }
        }
        Ok(child.wait_with_output()?)
    }

    /// The messages of the CRI log of `container` of pod `name` (newest attempt), one per line.
    pub async fn log(&self, name: &str, container: &str) -> Result<String> {
        let pod = self.pods().get(name).await?;
        let uid = pod.metadata.uid.unwrap_or_default();
        let dir = self
            .cfg
            .log_dir
            .join(format!("default_{name}_{uid}"))
            .join(container);
        let newest = fs::read_dir(&dir)
            .with_context(|| format!("read {}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .max_by_key(|p| {
                p.file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.parse::<u32>().ok())
                    .unwrap_or(0)
            })
            .context("no log file")?;
        let text = fs::read_to_string(&newest)?;
        // `<time> <stream> <P|F> <message>`
        Ok(text
            .lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Waits until the container's log satisfies `done`; returns the log.
    pub async fn wait_log(
        &self,
        name: &str,
        container: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log(name, container).await.unwrap_or_default();
            if done(&log) {
                return Ok(log);
            }
            if Instant::now() > deadline {
                bail!("pod {name}: log of {container} never matched; it is:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// The pod's directory below the agent's data dir.
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.cfg.data_dir.join("pods").join(uid)
    }
}

/// `(mount point, fs type, super options)` of the node's mounts at or below `dir`.
pub fn mounts_below(dir: &Path) -> Vec<(PathBuf, String, String)> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let point = PathBuf::from(f.get(4)?.replace("\\040", " "));
            Some((
                point,
                f.get(sep + 1)?.to_string(),
                f.get(sep + 3)?.to_string(),
            ))
        })
        .filter(|(p, _, _)| p.starts_with(&dir))
        .collect()
}
