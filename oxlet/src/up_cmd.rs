//! `oxlet up`: the single-node cluster in one process. The control plane (API server,
//! controllers, scheduler), the node agent and the node's kube-proxy, each speaking the
//! Kubernetes API through an in-process client under its own identity.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use control::certs::Identity;

#[derive(Args)]
pub struct UpArgs {
    /// HTTPS port of the API server.
    #[arg(long, default_value_t = 6443)]
    port: u16,
    /// Where to write the admin kubeconfig.
    #[arg(long, default_value = "/etc/oxlet/admin.kubeconfig")]
    kubeconfig: PathBuf,
    /// Pod addresses: each node gets a range of it as spec.podCIDR.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: ipnet::Ipv4Net,
    /// Prefix length of each node's pod range.
    #[arg(long, default_value_t = 24)]
    node_cidr_mask_size: u8,
    /// How long a node may go without renewing its Lease before it is Ready=Unknown
    /// (e.g. 50s, 2m).
    #[arg(long, default_value = "50s", value_parser = parse_duration)]
    node_monitor_grace_period: Duration,
    /// This node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// Node addresses that serve NodePorts: `primary` or comma-separated CIDRs.
    #[arg(long, default_value = "primary")]
    nodeport_addresses: String,
    /// Run without the node's kube-proxy (no nftables rules for Services).
    #[arg(long)]
    no_proxy: bool,
    /// Run without the node agent (the control plane schedules, nothing runs pods here).
    #[arg(long)]
    no_agent: bool,
    #[command(flatten)]
    dirs: crate::node_dirs::NodeDirs,
    /// The cluster DNS address: the kube-dns Service's ClusterIP, pods' nameserver.
    #[arg(long, default_value = "10.96.0.10")]
    cluster_dns: IpAddr,
    /// The cluster domain served by the cluster DNS and searched by pods.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// The node's resolver configuration: the cluster DNS forwards other names to its
    /// nameservers, and pods with dnsPolicy Default get it (default: /etc/resolv.conf, or
    /// systemd-resolved's upstream list when it names only the local stub).
    #[arg(long)]
    resolv_conf: Option<PathBuf>,
    /// Run without the cluster DNS (pods get the node's resolvers).
    #[arg(long)]
    no_dns: bool,
    /// Audiences a service account token must name to be accepted by the API server,
    /// comma-separated (default: the issuer, https://kubernetes.default.svc.cluster.local).
    #[arg(long, value_delimiter = ',')]
    api_audiences: Vec<String>,
    /// The longest validity of a service account token the API server issues (e.g. 1h); a
    /// longer request gets this much. Unlike kube-apiserver, values under an hour are taken.
    #[arg(long, value_parser = parse_duration)]
    service_account_max_token_expiration: Option<Duration>,
    /// A YAML or TOML file whose keys are these flags' long names (`cluster-cidr: ...`,
    /// `no-dns: true`); flags on the command line win over it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// First remove everything an earlier `oxlet up` made here, as `oxlet uninstall` does, then
    /// start a new cluster.
    #[arg(long)]
    reset: bool,
    /// Also put the admin credentials into a kubeconfig as context `oxlet`, made current
    /// (FILE defaults to the first of $KUBECONFIG, else ~/.kube/config).
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    merge_kubeconfig: Option<Option<PathBuf>>,
}

/// Waits until Node `name` reports Ready=True from a heartbeat of this run; false if the API
/// is gone.
async fn wait_node_ready(client: kube::Client, name: &str) -> bool {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    loop {
        match nodes.get_opt(name).await {
            Ok(Some(n)) => {
                // A Ready condition from before this start (a resumed cluster) does not count.
                let ready = n
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| {
                        c.type_ == "Ready"
                            && c.status == "True"
                            && c.last_heartbeat_time
                                .as_ref()
                                .is_some_and(|t| t.0.as_second() >= since)
                    });
                if ready {
                    return true;
                }
            }
            Ok(None) => {}
            Err(kube::Error::Api(_)) => {}
            Err(_) => return false,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `50s`, `2m`, `1h` or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 50s or 2m"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (s, m or h)")),
    };
    Ok(Duration::from_secs(secs))
}

pub fn run(data_dir: &Path, args: UpArgs) -> Result<()> {
    let started = Instant::now();
    if let Some(file) = &args.config {
        eprintln!("settings from {}", file.display());
    }
    if args.reset {
        let un =
            crate::uninstall_cmd::UninstallArgs::new(args.kubeconfig.clone(), args.dirs.clone());
        crate::uninstall_cmd::run(data_dir, un).context("--reset")?;
    }
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(async move {
        let mut cfg = control::Config::new(data_dir);
        cfg.listen = std::net::SocketAddr::from(([0, 0, 0, 0], args.port));
        cfg.kubeconfig = args.kubeconfig;
        cfg.controller_cfg.cluster_cidr =
            (args.cluster_cidr.network(), args.cluster_cidr.prefix_len());
        cfg.controller_cfg.node_cidr_mask = args.node_cidr_mask_size;
        cfg.controller_cfg.node_monitor_grace_period = args.node_monitor_grace_period;
        cfg.api_audiences = args.api_audiences.clone();
        cfg.service_account_max_token_expiration = args.service_account_max_token_expiration;
        let node = match args.node_name {
            Some(n) => n,
            None => nix::unistd::gethostname()?.to_string_lossy().to_lowercase(),
        };
        let server = control::start(cfg)
            .await
            .context("starting the control plane")?;
        eprintln!(
            "oxlet control plane (API server, controllers, scheduler) on https://{}\n\
             kubeconfig: {} (e.g. kubectl --kubeconfig {} get nodes)",
            server.addr,
            server.kubeconfig.display(),
            server.kubeconfig.display()
        );
        if let Some(into) = &args.merge_kubeconfig {
            let into = into
                .clone()
                .unwrap_or_else(crate::kube_context::default_path);
            crate::kube_context::merge(&server.kubeconfig, &into, "oxlet")?;
            eprintln!("context oxlet (current) in {}", into.display());
        }
        let mut parts = tokio::task::JoinSet::new();
        let resolv_conf = args
            .resolv_conf
            .clone()
            .unwrap_or_else(agent::dns_config::host_resolv_conf);
        if !args.no_dns {
            let mut dcfg = dns::Config::new(Vec::new());
            dcfg.domain = args.cluster_domain.clone();
            dcfg.upstreams = dns::upstream::nameservers_or_none(&resolv_conf);
            let kcfg = dns::kube_dns::Config {
                node_name: node.clone(),
                service_ip: args.cluster_dns,
                port: 53,
                fallback_address: control::namespaces::advertise_address(server.addr)
                    .map(IpAddr::V4),
                dns: dcfg,
                resync: Duration::from_secs(10),
            };
            let id = Identity {
                user: "system:serviceaccount:kube-system:coredns".into(),
                groups: vec![
                    "system:serviceaccounts".into(),
                    "system:serviceaccounts:kube-system".into(),
                    "system:authenticated".into(),
                ],
            };
            let client = server.client(id);
            parts.spawn(async move {
                if let Err(e) = dns::kube_dns::run(client, kcfg).await {
                    tracing::error!("cluster DNS stopped: {e}");
                }
            });
            eprintln!(
                "cluster DNS: {} (Service kube-system/kube-dns), domain {}",
                args.cluster_dns, args.cluster_domain
            );
        }
        if !args.no_proxy {
            let mut pcfg = proxy::Config::new(node.clone());
            pcfg.cluster_cidr = args.cluster_cidr;
            pcfg.nodeport_addresses = args.nodeport_addresses.parse()?;
            let client = server.client(Identity::component("system:kube-proxy"));
            parts.spawn(async move {
                if let Err(e) = proxy::run(client, pcfg).await {
                    tracing::error!("kube-proxy stopped: {e}");
                }
            });
            eprintln!("kube-proxy: nftables table ip oxlet-proxy");
        }
        if !args.no_agent {
            let mut acfg = agent::Config::new(node.clone());
            acfg.data_dir = data_dir.to_path_buf();
            args.dirs.apply(&mut acfg);
            if !args.no_dns {
                acfg.cluster_dns = vec![args.cluster_dns];
            }
            acfg.cluster_domain = args.cluster_domain;
            acfg.resolv_conf = resolv_conf;
            acfg.shim = crate::agent_cmd::sibling("oxlet-shim")
                .filter(|p| p.is_file())
                .context("oxlet-shim is not next to oxlet")?;
            acfg.bridge_plugin = crate::agent_cmd::sibling("oxlet-bridge").filter(|p| p.is_file());
            let ca = control::certs::Pki::new(data_dir).ca_pem()?;
            acfg.client_ca = agent::kubelet_api::pem_to_der(ca.as_bytes());
            let id = Identity {
                user: format!("{}{node}", control::certs::NODE_USER_PREFIX),
                groups: vec!["system:nodes".into(), "system:authenticated".into()],
            };
            let client = server.client(id);
            parts.spawn(async move {
                if let Err(e) = agent::run(client, acfg).await {
                    tracing::error!("node agent stopped: {e}");
                }
            });
            eprintln!("node agent: node {node}");
            let client = server.client(Identity::component("system:kube-controller-manager"));
            let name = node.clone();
            parts.spawn(async move {
                if wait_node_ready(client, &name).await {
                    eprintln!(
                        "node {name} Ready, {:.1} s after start",
                        started.elapsed().as_secs_f64()
                    );
                }
            });
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        // Pods keep running (as when kubelet stops) and the proxy's rules stay in place, as
        // kube-proxy's do; a later `oxlet up` adopts them.
        parts.abort_all();
        server.stop();
        Ok(())
    });
    // Blocking work in flight (a container stop waiting out its grace period) is left to the
    // next start, as when kubelet stops; waiting for it would hold the exit for up to that long.
    rt.shutdown_timeout(Duration::from_millis(500));
    result
}
