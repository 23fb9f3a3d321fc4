//! `oxlet agent` killed with SIGKILL in the middle of a burst of pod creations, pods deleted
//! while it is down, then started again: the pods that were running keep their containers, the
//! others start, and nothing is left of the deleted ones (containers, shims, sandboxes, network
//! attachments and IP leases, cgroups, records). Root; needs `tests/testbed/up`.

mod common;

use common::{bin_dir, dir_flags, sweep, uninstall};
use std::collections::{HashMap, HashSet};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use oxlet_tests::testbed::busybox;
const PODS: usize = 50;

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Node {
    dir: tempfile::TempDir,
    name: String,
    bridge: String,
    kubeconfig: PathBuf,
    agent: Option<Child>,
}

impl Node {
    fn p(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }

    fn start_agent(&mut self) -> Result<()> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_oxlet"));
        cmd.arg("--data-dir")
            .arg(self.p("data"))
            .arg("agent")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--node-name", &self.name])
            .args(dir_flags(
                self.dir.path(),
                &format!("{},/usr/lib/cni", bin_dir().display()),
            ))
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.p("agent.log"))?,
            );
        // SAFETY: prctl in the forked child before exec; the agent dies with this test.
        let child = unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        }
        .spawn()?;
        self.agent = Some(child);
        Ok(())
    }

    fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The node's pod interfaces, its IP leases, the pods it has records, sandboxes and
    /// shims of.
    fn footprint(&self) -> (usize, usize, HashSet<String>, HashSet<String>, usize) {
        let ports = sh(&format!(
            "ip -o link show master {} 2>/dev/null",
            self.bridge
        ))
        .lines()
        .count();
        let leases = std::fs::read_dir(self.p("ipam/oxkill"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .parse::<std::net::IpAddr>()
                    .is_ok()
            })
            .count();
        let names = |d: &str| -> HashSet<String> {
            std::fs::read_dir(self.p(d))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        };
        let data = self.p("data").display().to_string();
        let shims = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.first().is_some_and(|a| a.ends_with(b"oxlet-shim"))
                    && String::from_utf8_lossy(c).contains(&data)
            })
            .count();
        (
            ports,
            leases,
            names("data/pods"),
            names("run/sandboxes"),
            shims,
        )
    }
}

/// Not the proxy's table: this test runs beside others that own it.
const UNINSTALL: &[&str] = &["--proxy-table", "oxlet-kill-test-none"];
const PREFIX: &str = "oxlet-kill-";

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_agent();
        // What a failed run left (pods, their mounts, networks and cgroups), then the bridge.
        uninstall(self.dir.path(), UNINSTALL);
        sh(&format!("ip link del {} 2>/dev/null", self.bridge));
    }
}

fn running(p: &Pod) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Running")
            && s.container_statuses
                .as_deref()
                .unwrap_or_default()
                .iter()
                .all(|c| c.ready)
    })
}

fn container_of(p: &Pod) -> Option<(String, i32)> {
    let c = p.status.as_ref()?.container_statuses.as_ref()?.first()?;
    Some((c.container_id.clone()?, c.restart_count))
}

async fn wait_for(
    what: &str,
    limit: Duration,
    mut f: impl AsyncFnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !f().await? {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_burst_restarts_without_leaks_or_restarts() -> Result<()> {
    sweep(PREFIX, UNINSTALL);
    let dir = tempfile::Builder::new().prefix(PREFIX).tempdir()?;
    let x = std::process::id() % 250 + 1;
    let mut scfg = control::Config::new(dir.path().join("control"));
    scfg.listen = "127.0.0.1:0".parse()?;
    scfg.kubeconfig = dir.path().join("admin.kubeconfig");
    scfg.controllers = false;
    let server = control::start(scfg).await?;
    let kc = kube::config::Kubeconfig::read_from(&server.kubeconfig)?;
    let admin = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
    )?;
    let mut node = Node {
        name: format!("kill-node-{x}"),
        bridge: format!("oxk{x}"),
        kubeconfig: dir.path().join("node.kubeconfig"),
        agent: None,
        dir,
    };
    control::certs::Pki::new(&node.p("control")).write_node_kubeconfig(
        &node.name,
        &format!("https://127.0.0.1:{}", server.addr.port()),
        &node.kubeconfig,
    )?;
    sh(&format!("ip link del {} 2>/dev/null", node.bridge));
    std::fs::create_dir_all(node.p("net.d"))?;
    std::fs::write(
        node.p("net.d/10-kill.conflist"),
        serde_json::json!({"cniVersion": "1.1.0", "name": "oxkill", "plugins": [{
            "type": "oxlet-bridge", "bridge": node.bridge, "isGateway": true,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("10.246.{x}.0/24")}]],
                     "dataDir": node.p("ipam")}}]})
        .to_string(),
    )?;
    node.start_agent()?;

    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let creates = (0..PODS).map(|i| {
        let pods = pods.clone();
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("p{i}"), "labels": {"burst": "kill"}},
            "spec": {
                "nodeName": node.name,
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "image": busybox(), "command": ["sleep", "3600"]}]
            }
        }))
        .expect("pod");
        async move { pods.create(&PostParams::default(), &p).await }
    });
    for r in futures_util::future::join_all(creates).await {
        r?;
    }
    // Killed once some pods run and others are still being set up.
    let lp = ListParams::default().labels("burst=kill");
    wait_for("10 pods running", Duration::from_secs(120), async || {
        Ok(pods
            .list(&lp)
            .await?
            .items
            .iter()
            .filter(|p| running(p))
            .count()
            >= 10)
    })
    .await?;
    node.kill_agent();
    let before: HashMap<String, (String, i32)> = pods
        .list(&lp)
        .await?
        .items
        .iter()
        .filter(|p| running(p))
        .filter_map(|p| Some((p.metadata.name.clone()?, container_of(p)?)))
        .collect();

    // Half the pods go while the agent is down (the API server removes them at once).
    let mut deleted_uids = Vec::new();
    for i in (0..PODS).step_by(2) {
        let p = pods.get(&format!("p{i}")).await?;
        deleted_uids.push(p.metadata.uid.clone().context("uid")?);
        pods.delete(&format!("p{i}"), &DeleteParams::default().grace_period(0))
            .await?;
    }
    node.start_agent()?;
    let waited = wait_for(
        "the other 25 pods running",
        Duration::from_secs(180),
        async || {
            let items = pods.list(&lp).await?.items;
            Ok(items.len() == PODS / 2 && items.iter().all(running))
        },
    )
    .await
    .with_context(|| {
        let shims = sh("ps -eo pid,ppid,stat,etimes,args | grep [o]xlet-shim | cut -c1-160");
        format!("footprint {:?}\n{shims}", node.footprint())
    });
    if let Err(e) = waited {
        let stuck: Vec<String> = pods
            .list(&lp)
            .await?
            .items
            .iter()
            .filter(|p| !running(p))
            .map(|p| format!("{:?}: {:?}", p.metadata.name, p.status))
            .collect();
        let log = sh(&format!(
            "grep -E 'WARN|ERROR' {} | tail -40",
            node.p("agent.log").display()
        ));
        bail!("{e:#}\nnot running: {stuck:#?}\nagent warnings:\n{log}");
    }
    wait_for(
        "the deleted pods' leftovers removed",
        Duration::from_secs(60),
        async || {
            let (ports, leases, records, sandboxes, shims) = node.footprint();
            Ok(ports == PODS / 2
                && leases == PODS / 2
                && records.len() == PODS / 2
                && sandboxes.len() == PODS / 2
                && shims == PODS / 2)
        },
    )
    .await
    .with_context(|| {
        let shims = sh("ps -eo pid,ppid,stat,etimes,args | grep [o]xlet-shim");
        format!("footprint {:?}\n{shims}", node.footprint())
    })?;
    let (_, _, records, sandboxes, _) = node.footprint();
    for uid in &deleted_uids {
        assert!(
            !records.contains(uid) && !sandboxes.contains(uid),
            "{uid} left"
        );
        assert!(
            !runtime::cgroup::controller_dir("memory", &format!("kubepods/besteffort/pod{uid}"))
                .exists(),
            "cgroup of {uid} left"
        );
    }
    // A pod that ran before the kill runs the same container, never restarted.
    let mut kept = 0;
    for p in pods.list(&lp).await?.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        if let Some(was) = before.get(&name) {
            assert_eq!(container_of(&p).as_ref(), Some(was), "{name}");
            kept += 1;
        }
        assert_eq!(container_of(&p).map(|c| c.1), Some(0), "{name} restarted");
    }
    assert!(
        kept > 0,
        "no pod that ran before the kill survived the deletions"
    );

    // And everything goes when the rest is deleted.
    pods.delete_collection(&DeleteParams::default(), &lp)
        .await?;
    wait_for("all pods gone", Duration::from_secs(120), async || {
        Ok(pods.list(&lp).await?.items.is_empty())
    })
    .await?;
    wait_for("an empty node", Duration::from_secs(60), async || {
        let (ports, leases, records, sandboxes, shims) = node.footprint();
        Ok(ports + leases + records.len() + sandboxes.len() + shims == 0)
    })
    .await
    .with_context(|| format!("footprint {:?}", node.footprint()))?;
    node.kill_agent();
    server.stop();
    Ok(())
}
