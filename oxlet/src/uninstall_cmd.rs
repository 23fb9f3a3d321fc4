//! `oxlet uninstall`: removes what `oxlet up` and `oxlet agent` made on this machine (pods with
//! their containers, networks and cgroups, the proxy's and the CNI network's nftables tables, the
//! bridge, the default CNI configuration, data, state, logs and the admin kubeconfig).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args)]
pub struct UninstallArgs {
    /// The admin kubeconfig `oxlet up` wrote.
    #[arg(long, default_value = "/etc/oxlet/admin.kubeconfig")]
    kubeconfig: PathBuf,
    #[command(flatten)]
    dirs: crate::node_dirs::NodeDirs,
    /// The proxy's nftables table.
    #[arg(long, default_value = "oxlet-proxy", hide = true)]
    proxy_table: String,
}

impl UninstallArgs {
    /// What `oxlet up --reset` removes: the same kubeconfig and directories it runs with.
    pub fn new(kubeconfig: PathBuf, dirs: crate::node_dirs::NodeDirs) -> Self {
        UninstallArgs {
            kubeconfig,
            dirs,
            proxy_table: "oxlet-proxy".into(),
        }
    }
}

/// Running `oxlet up`, `oxlet agent` and `oxlet proxy` processes: pid, arguments.
fn running_oxlets() -> Vec<(i32, Vec<String>)> {
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_oxlet = args
            .first()
            .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == "oxlet"));
        if pid != me
            && is_oxlet
            && args
                .iter()
                .any(|a| a == "up" || a == "agent" || a == "proxy")
        {
            found.push((pid, args));
        }
    }
    found
}

/// The data dir a running oxlet was given.
fn data_dir_of(args: &[String]) -> PathBuf {
    args.iter()
        .position(|a| a == "--data-dir")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--data-dir=").map(str::to_string))
        })
        .unwrap_or_else(|| "/var/lib/oxlet".into())
        .into()
}

fn remove_dir(path: &Path, removed: &mut Vec<String>) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {
            removed.push(path.display().to_string());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove {}", path.display())),
    }
}

fn remove_file(path: &Path, removed: &mut Vec<String>) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            removed.push(path.display().to_string());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove {}", path.display())),
    }
}

/// Unmounts what is left below `dir` (sandboxes or volumes whose record was lost), deepest first.
fn unmount_below(dir: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    let mut below: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in below {
        nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("unmount {m}"))?;
    }
    Ok(())
}

pub fn run(data_dir: &Path, args: UninstallArgs) -> Result<()> {
    let others = running_oxlets();
    if let Some((pid, args)) = others.iter().find(|(_, a)| data_dir_of(a) == data_dir) {
        bail!("stop it first: pid {pid} runs `{}`", args.join(" "));
    }
    let mut removed = Vec::new();

    // Pods: containers (SIGKILL), network attachments (CNI DEL frees IPs and veths), sandboxes,
    // cgroups (with the QoS levels no pod uses), logs and records, as the agent removes a pod.
    let mut acfg = agent::Config::new("uninstall");
    acfg.data_dir = data_dir.to_path_buf();
    args.dirs.clone().apply(&mut acfg);
    let (run_dir, log_dir, cni) = (args.dirs.run_dir, args.dirs.log_dir, args.dirs.cni);
    if data_dir.exists() || run_dir.exists() {
        let pods = agent::pod_runtime::PodRuntime::new(&acfg, [127, 0, 0, 1].into())
            .context("open the agent's pod state")?;
        for uid in pods.local_pods() {
            pods.teardown_regardless_of_network(&uid)
                .with_context(|| format!("remove pod {uid}"))?;
            removed.push(format!("pod {uid}"));
        }
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The proxy's table and the default network are the machine's, shared with any other
    // oxlet running here (on another data dir); they stay while one runs.
    if let Some((pid, a)) = others.first() {
        println!(
            "kept the proxy's nftables table and the default CNI network: pid {pid} runs `{}`",
            a.join(" ")
        );
    } else {
        rt.block_on(async {
            proxy::cleanup(&args.proxy_table)
                .await
                .context("remove the proxy's nftables table")?;
            removed.push(format!("nftables table ip {}", args.proxy_table));
            // The default network (agent::network) is oxlet's own; another configuration is the
            // user's and stays, with its plugins.
            let conf = cni.cni_conf_dir.join(agent::network::DEFAULT_CONF);
            let ours = std::fs::read_to_string(&conf).is_ok_and(|t| {
                t.contains("\"oxlet-bridge\"") && t.contains(agent::network::BRIDGE)
            });
            if ours {
                let (conn, handle, _) = rtnetlink::new_connection().context("netlink")?;
                tokio::spawn(conn);
                if cni::link::del_by_name(&handle, agent::network::BRIDGE).await? {
                    removed.push(format!("bridge {}", agent::network::BRIDGE));
                }
                cni::masq::apply(cni::masq::render_drop("oxlet"))
                    .context("remove the CNI network's nftables table")?;
                removed.push(format!(
                    "nftables table inet {}",
                    cni::masq::table_name("oxlet")
                ));
                if cni::hostport::table_exists("oxlet").unwrap_or(true) {
                    cni::masq::apply(cni::hostport::render_drop("oxlet"))
                        .context("remove the CNI network's hostPort table")?;
                    removed.push(format!(
                        "nftables table inet {}",
                        cni::hostport::table_name("oxlet")
                    ));
                }
                remove_file(&conf, &mut removed)?;
                if let Some(bin) = cni.cni_bin_dir.first() {
                    remove_file(&bin.join("oxlet-bridge"), &mut removed)?;
                }
                remove_dir(&cni.cni_cache_dir.join("networks/oxlet"), &mut removed)?;
            }
            anyhow::Ok(())
        })?;
    }

    unmount_below(&run_dir)?;
    remove_dir(&run_dir, &mut removed)?;
    unmount_below(data_dir)?;
    remove_dir(data_dir, &mut removed)?;
    // The log dir may hold other kubelets' pods; it goes only when oxlet's left it empty.
    if std::fs::remove_dir(&log_dir).is_ok() {
        removed.push(log_dir.display().to_string());
    }
    remove_file(&args.kubeconfig, &mut removed)?;
    if let Some(dir) = args.kubeconfig.parent() {
        if std::fs::remove_dir(dir).is_ok() {
            removed.push(dir.display().to_string());
        }
    }
    for r in &removed {
        println!("removed {r}");
    }
    if removed.is_empty() {
        println!("nothing of oxlet's found");
    }
    Ok(())
}
