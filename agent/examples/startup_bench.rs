//! Pod startup latency as the Kubernetes SLO defines it, side by side with the bare work.
//!
//! oxlet: an API server with its controllers and scheduler in this process, `oxlet agent` as its
//! own process (so its resident memory is its own). For each burst, N pods are created at once;
//! a pod's latency runs from the client's clock just before its create request to the watch event
//! that shows all its containers running (images already present, the scheduler in the path).
//!
//! Reference, in the same run: per pod a network namespace, the reference CNI `bridge` plugin
//! (host-local IPAM) and `runc run -d` of a busybox bundle, N at once; latency from the burst's
//! start to `runc run` returning.
//!
//!   bench/pods [BURST...]       (as root; default bursts 1 30 100; builds and runs this)

use anyhow::{bail, Context, Result};
use futures_util::TryStreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oxlet_tests::testbed::busybox;
const BRIDGE: &str = "oxbench0";
const SUBNET: &str = "10.253.0.0/24";
const REF_BRIDGE: &str = "oxbenchr0";
const REF_SUBNET: &str = "10.253.1.0/24";
const REF_PREFIX: &str = "oxbench-";
const NS: &str = "default";

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Leftovers of an earlier (killed) run: reference containers, namespaces and both bridges.
fn clean_leftovers() {
    for id in sh("runc list -q")
        .lines()
        .filter(|l| l.starts_with(REF_PREFIX))
    {
        sh(&format!("runc delete -f {id} 2>/dev/null"));
    }
    for ns in sh("ip netns list").lines() {
        let name = ns.split_whitespace().next().unwrap_or("");
        if name.starts_with(REF_PREFIX) {
            sh(&format!("ip netns del {name}"));
        }
    }
    sh(&format!(
        "ip link del {BRIDGE} 2>/dev/null; ip link del {REF_BRIDGE} 2>/dev/null"
    ));
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

async fn client_for(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

fn all_running(p: &Pod) -> bool {
    let Some(st) = p.status.as_ref() else {
        return false;
    };
    let want = p.spec.as_ref().map_or(0, |s| s.containers.len());
    let cs = st.container_statuses.as_deref().unwrap_or(&[]);
    cs.len() == want
        && cs
            .iter()
            .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
}

fn pod(name: &str, burst: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"bench": burst}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "c", "image": busybox(), "imagePullPolicy": "IfNotPresent",
                            "command": ["sleep", "3600"]}]
        }
    }))
    .expect("pod")
}

/// Creates `n` pods at once; returns each one's create-to-running latency.
async fn oxlet_burst(client: &kube::Client, n: usize, round: usize) -> Result<Vec<Duration>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let label = format!("r{round}");
    let started: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    let done: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    // The watch runs before the first create so no event is missed.
    let watch = {
        let done = done.clone();
        let stream = watcher::watcher(
            pods.clone(),
            watcher::Config::default().labels(&format!("bench={label}")),
        );
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Ok(Some(ev)) = stream.try_next().await {
                let seen = Instant::now();
                let list: Vec<Pod> = match ev {
                    watcher::Event::Apply(p) | watcher::Event::InitApply(p) => vec![p],
                    _ => vec![],
                };
                let mut d = done.lock().unwrap();
                for p in list.iter().filter(|p| all_running(p)) {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    d.entry(name).or_insert(seen);
                }
                if d.len() >= n {
                    break;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let creates = (0..n).map(|i| {
        let pods = pods.clone();
        let started = started.clone();
        let name = format!("bench-{label}-{i}");
        let p = pod(&name, &label);
        async move {
            started.lock().unwrap().insert(name, Instant::now());
            pods.create(&PostParams::default(), &p).await
        }
    });
    for r in futures_util::future::join_all(creates).await {
        r.context("create pod")?;
    }
    tokio::time::timeout(Duration::from_secs(300), watch)
        .await
        .context("pods not all running after 300 s")??;
    let started = started.lock().unwrap();
    let done = done.lock().unwrap();
    let mut lat: Vec<Duration> = started
        .iter()
        .map(|(name, t0)| done[name].duration_since(*t0))
        .collect();
    lat.sort();
    Ok(lat)
}

async fn delete_all(client: &kube::Client) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let lp = ListParams::default().labels("bench");
    pods.delete_collection(&DeleteParams::default(), &lp)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    // The agent deletes a pod object only after tearing it down (containers, network, cgroup).
    while !pods.list(&lp).await?.items.is_empty() {
        if Instant::now() > deadline {
            bail!("pods not torn down after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

struct Reference {
    dir: PathBuf,
    bundle: PathBuf,
}

impl Reference {
    fn new(dir: &Path) -> Result<Reference> {
        let bundle = dir.join("bundle");
        let rootfs = bundle.join("rootfs");
        for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
            std::fs::create_dir_all(rootfs.join(d))?;
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))?;
        for l in ["sh", "sleep"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(l))?;
        }
        let ok = Command::new("runc")
            .args(["spec", "--bundle"])
            .arg(&bundle)
            .status()?;
        if !ok.success() {
            bail!("runc spec failed");
        }
        Ok(Reference {
            dir: dir.to_path_buf(),
            bundle,
        })
    }

    fn net_conf(&self) -> String {
        serde_json::json!({
            "cniVersion": "1.0.0", "name": "oxbench-ref", "type": "bridge", "bridge": REF_BRIDGE,
            "isGateway": true,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": REF_SUBNET}]],
                     "dataDir": self.dir.join("ipam")}
        })
        .to_string()
    }

    fn cni(&self, cmd: &str, id: &str) -> Result<()> {
        let mut child = Command::new("/usr/lib/cni/bridge")
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", format!("/var/run/netns/{id}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        use std::io::Write;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(self.net_conf().as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("bridge {cmd}: {}", String::from_utf8_lossy(&out.stdout));
        }
        Ok(())
    }

    /// One pod's bare work: namespace, network, container started.
    fn start(&self, id: &str) -> Result<()> {
        let ok = Command::new("ip").args(["netns", "add", id]).status()?;
        if !ok.success() {
            bail!("ip netns add {id}");
        }
        self.cni("ADD", id)?;
        let b = self.dir.join(id);
        std::fs::create_dir_all(&b)?;
        let mut spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.bundle.join("config.json"))?)?;
        spec["root"]["path"] = self.bundle.join("rootfs").to_string_lossy().into();
        spec["process"]["args"] = serde_json::json!(["sleep", "3600"]);
        spec["process"]["terminal"] = false.into();
        spec["linux"]["cgroupsPath"] = format!("/oxbench/{id}").into();
        for ns in spec["linux"]["namespaces"]
            .as_array_mut()
            .context("namespaces")?
        {
            if ns["type"] == "network" {
                ns["path"] = format!("/var/run/netns/{id}").into();
            }
        }
        std::fs::write(b.join("config.json"), serde_json::to_vec(&spec)?)?;
        let ok = Command::new("runc")
            .args(["run", "-d", "--bundle"])
            .arg(&b)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !ok.success() {
            bail!("runc run {id}");
        }
        Ok(())
    }

    fn stop(&self, id: &str) {
        sh(&format!("runc delete -f {id} 2>/dev/null"));
        let _ = self.cni("DEL", id);
        sh(&format!("ip netns del {id} 2>/dev/null"));
        let _ = std::fs::remove_dir_all(self.dir.join(id));
    }

    fn burst(&self, n: usize, round: usize) -> Result<Vec<Duration>> {
        let ids: Vec<String> = (0..n).map(|i| format!("{REF_PREFIX}{round}-{i}")).collect();
        let t0 = Instant::now();
        let lat: Vec<Result<Duration>> = std::thread::scope(|s| {
            let hs: Vec<_> = ids
                .iter()
                .map(|id| s.spawn(move || self.start(id).map(|_| t0.elapsed())))
                .collect();
            hs.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        std::thread::scope(|s| {
            for id in &ids {
                s.spawn(move || self.stop(id));
            }
        });
        let mut lat = lat.into_iter().collect::<Result<Vec<_>>>()?;
        lat.sort();
        Ok(lat)
    }
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process by pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let bursts: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().context("burst sizes are numbers"))
        .collect::<Result<_>>()?;
    let bursts = if bursts.is_empty() {
        vec![1, 30, 100]
    } else {
        bursts
    };
    let bin = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .context("target dir")?
        .to_path_buf();
    for b in ["oxlet", "oxlet-shim", "oxlet-bridge"] {
        if !bin.join(b).is_file() {
            bail!(
                "{} missing: cargo build --release --bins",
                bin.join(b).display()
            );
        }
    }
    clean_leftovers();
    let dir = tempfile::Builder::new()
        .prefix("oxlet-podbench-")
        .tempdir()?;
    let mut scfg = control::Config::new(dir.path().join("control"));
    scfg.listen = "127.0.0.1:0".parse()?;
    scfg.kubeconfig = dir.path().join("admin.kubeconfig");
    let server = control::start(scfg).await?;
    let admin = client_for(&server.kubeconfig).await?;
    let node = format!("bench-{}", std::process::id());
    let node_kc = dir.path().join("node.kubeconfig");
    control::certs::Pki::new(&dir.path().join("control")).write_node_kubeconfig(
        &node,
        &format!("https://127.0.0.1:{}", server.addr.port()),
        &node_kc,
    )?;
    let net_d = dir.path().join("net.d");
    std::fs::create_dir_all(&net_d)?;
    std::fs::write(
        net_d.join("10-bench.conflist"),
        serde_json::json!({"cniVersion": "1.1.0", "name": "oxbench", "plugins": [{
            "type": "oxlet-bridge", "bridge": BRIDGE, "isGateway": true,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                     "dataDir": dir.path().join("ipam")}}]})
        .to_string(),
    )?;
    let agent = Agent(
        Command::new(bin.join("oxlet"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("agent")
            .arg("--kubeconfig")
            .arg(&node_kc)
            .args(["--node-name", &node])
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .arg("--log-dir")
            .arg(dir.path().join("logs"))
            .arg("--cni-conf-dir")
            .arg(&net_d)
            .arg("--cni-cache-dir")
            .arg(dir.path().join("cni-cache"))
            .arg("--cni-bin-dir")
            .arg(format!("{},/usr/lib/cni", bin.display()))
            .spawn()
            .context("start oxlet agent")?,
    );
    let nodes: Api<Node> = Api::all(admin.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = nodes.get_opt(&node).await?.is_some_and(|n| {
            n.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if ready {
            break;
        }
        if Instant::now() > deadline {
            bail!("node {node} not Ready after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Warm-up: pulls the image, so the bursts measure startup with images present.
    oxlet_burst(&admin, 1, 0).await?;
    delete_all(&admin).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_kib(agent.0.id());
    let reference = Reference::new(&dir.path().join("ref"))?;
    println!(
        "{:>6} {:>12} {:>12} {:>12} {:>12} {:>9} {:>9}",
        "burst", "oxlet p50", "oxlet p99", "ref p50", "ref p99", "p50 x", "p99 x"
    );
    let mut rss_full = None;
    for (round, &n) in bursts.iter().enumerate() {
        let ox = oxlet_burst(&admin, n, round + 1).await?;
        if n == 100 {
            rss_full = Some(rss_kib(agent.0.id()));
        }
        delete_all(&admin).await?;
        let rf = tokio::task::block_in_place(|| reference.burst(n, round + 1))?;
        let (o50, o99, r50, r99) = (
            percentile(&ox, 0.5),
            percentile(&ox, 0.99),
            percentile(&rf, 0.5),
            percentile(&rf, 0.99),
        );
        println!(
            "{n:>6} {:>10.1}ms {:>10.1}ms {:>10.1}ms {:>10.1}ms {:>9.2} {:>9.2}",
            ms(o50),
            ms(o99),
            ms(r50),
            ms(r99),
            ms(o50) / ms(r50),
            ms(o99) / ms(r99)
        );
    }
    println!(
        "agent RSS: {:.1} MiB at 0 pods{}",
        rss_idle as f64 / 1024.0,
        rss_full.map_or(String::new(), |r| format!(
            ", {:.1} MiB at 100 pods",
            r as f64 / 1024.0
        ))
    );
    drop(agent);
    drop(server);
    clean_leftovers();
    sh("rmdir /sys/fs/cgroup/*/oxbench 2>/dev/null; rmdir /sys/fs/cgroup/unified/oxbench 2>/dev/null");
    Ok(())
}
