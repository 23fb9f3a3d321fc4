//! `oxlet agent`: the node agent (kubelet's job) against an API server, until SIGTERM or Ctrl-C.

use anyhow::{Context, Result};
use clap::Args;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args)]
pub struct AgentArgs {
    /// Kubeconfig with this node's identity (`oxlet node-kubeconfig` writes one).
    #[arg(long)]
    kubeconfig: PathBuf,
    /// The Node's name; the host name by default.
    #[arg(long)]
    node_name: Option<String>,
    #[command(flatten)]
    dirs: crate::node_dirs::NodeDirs,
    /// Pod range for the default CNI configuration when the Node has no spec.podCIDR.
    #[arg(long)]
    pod_cidr: Option<String>,
    /// The node's InternalIP; by default the address of the default route's interface.
    #[arg(long)]
    node_ip: Option<IpAddr>,
    /// The oxlet-shim executable; by default the one next to this program.
    #[arg(long)]
    shim: Option<PathBuf>,
    /// First CrashLoopBackOff / image pull back-off delay in seconds, doubling to 300.
    #[arg(long, default_value_t = 10)]
    backoff_seconds: u64,
    /// How often configMap, secret, downwardAPI and projected volume contents are brought up
    /// to date, in seconds (kubelet's --sync-frequency).
    #[arg(long, default_value_t = 60)]
    sync_frequency_seconds: u64,
    /// Resources kept from pods, as kubelet's --system-reserved: cpu=500m,memory=1Gi,...
    #[arg(long, value_delimiter = ',', value_parser = parse_reserved)]
    reserved: Vec<(String, String)>,
    /// Registries (host:port) to pull from over plain HTTP besides loopback.
    #[arg(long)]
    insecure_registry: Vec<String>,
    /// Cluster DNS servers for ClusterFirst pods (comma-separated); without any, pods get the
    /// node's resolvers.
    #[arg(long, value_delimiter = ',')]
    cluster_dns: Vec<IpAddr>,
    /// The cluster domain ClusterFirst pods search.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// The node's resolver configuration, the base of pods' (default: /etc/resolv.conf, or
    /// systemd-resolved's upstream list when it names only the local stub).
    #[arg(long)]
    resolv_conf: Option<PathBuf>,
    /// Port of the kubelet API (logs, exec, port-forward, stats), HTTPS on every address.
    #[arg(long, default_value_t = 10250)]
    kubelet_port: u16,
    /// Disk usage (percent) of the image store's file system at which unused images are
    /// removed; 100 never.
    #[arg(long, default_value_t = 85, value_parser = clap::value_parser!(u8).range(0..=100))]
    image_gc_high_threshold: u8,
    /// Disk usage (percent) image garbage collection brings it down to.
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(0..=100))]
    image_gc_low_threshold: u8,
    /// Seconds an image is kept after it was first seen before it may be collected.
    #[arg(long, default_value_t = 120)]
    minimum_image_ttl_seconds: u64,
}

fn parse_reserved(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not RESOURCE=QUANTITY"))?;
    if !matches!(k, "cpu" | "memory" | "ephemeral-storage") {
        return Err(format!(
            "cannot reserve {k:?}: cpu, memory or ephemeral-storage"
        ));
    }
    let q = k8s_openapi::apimachinery::pkg::api::resource::Quantity(v.to_string());
    let ok = if k == "cpu" {
        runtime::cgroup::cpu_milli(&q).is_ok()
    } else {
        runtime::cgroup::memory_bytes(&q).is_ok()
    };
    if !ok {
        return Err(format!("{v:?} is not a quantity"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// A program installed next to this one (`oxlet-shim`, `oxlet-bridge`).
pub(crate) fn sibling(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.join(name))
}

pub fn run(data_dir: &Path, args: AgentArgs) -> Result<()> {
    let node_name = match args.node_name {
        Some(n) => n,
        None => nix::unistd::gethostname()?
            .into_string()
            .map_err(|h| anyhow::anyhow!("host name {h:?} is not UTF-8"))?
            .to_lowercase(),
    };
    let mut cfg = agent::Config::new(node_name);
    cfg.data_dir = data_dir.to_path_buf();
    args.dirs.apply(&mut cfg);
    cfg.pod_cidr = args.pod_cidr;
    cfg.node_ip = args.node_ip;
    cfg.insecure_registries = args.insecure_registry;
    cfg.cluster_dns = args.cluster_dns;
    cfg.cluster_domain = args.cluster_domain;
    if let Some(r) = args.resolv_conf {
        cfg.resolv_conf = r;
    }
    cfg.reserved = args
        .reserved
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                k8s_openapi::apimachinery::pkg::api::resource::Quantity(v),
            )
        })
        .collect();
    cfg.backoff_base = Duration::from_secs(args.backoff_seconds.max(1));
    cfg.sync_frequency = Duration::from_secs(args.sync_frequency_seconds.max(1));
    cfg.kubelet_port = args.kubelet_port;
    cfg.image_gc = runtime::image::gc::Policy {
        high_threshold_percent: args.image_gc_high_threshold,
        low_threshold_percent: args.image_gc_low_threshold,
        min_age: Duration::from_secs(args.minimum_image_ttl_seconds),
    };
    cfg.image_gc.validate()?;
    cfg.shim = args
        .shim
        .or_else(|| sibling("oxlet-shim"))
        .context("cannot find oxlet-shim; pass --shim")?;
    cfg.bridge_plugin = sibling("oxlet-bridge").filter(|p| p.is_file());
    tokio::runtime::Runtime::new()?.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(&args.kubeconfig)
            .with_context(|| format!("read {}", args.kubeconfig.display()))?;
        let kcfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        // The kubelet API accepts the client certificates of the cluster's CA.
        cfg.client_ca = kcfg.root_cert.clone().unwrap_or_default();
        if cfg.client_ca.is_empty() {
            tracing::warn!("the kubeconfig names no certificate authority: the kubelet API will refuse every request");
        }
        let client = kube::Client::try_from(kcfg)?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = agent::run(client, cfg) => Ok(r?),
            _ = term.recv() => Ok(()),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}
