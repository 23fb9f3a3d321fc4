//! `oxlet proxy`: the node's kube-proxy (nftables table `ip oxlet-proxy`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct ProxyArgs {
    /// Kubeconfig of the API server to watch.
    #[arg(long, required_unless_present = "cleanup")]
    kubeconfig: Option<PathBuf>,
    /// The Service network; traffic to its unallocated addresses is dropped.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: String,
    /// The pod network; traffic from elsewhere to a ClusterIP is masqueraded.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: String,
    /// Node addresses that serve NodePorts: `primary` (those of the default-route interface)
    /// or comma-separated CIDRs. 127.0.0.1 never does.
    #[arg(long, default_value = "primary")]
    nodeport_addresses: String,
    /// This node's name (default: the host name).
    #[arg(long)]
    hostname_override: Option<String>,
    /// Where /metrics (Prometheus text) is served; empty: nowhere.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: String,
    /// Where /healthz is served; empty: nowhere.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: String,
    /// Remove the proxy's nftables table and exit.
    #[arg(long)]
    cleanup: bool,
    /// The nftables table (family ip) to own.
    #[arg(long, default_value = "oxlet-proxy", hide = true)]
    table: String,
}

/// `ip:port`, or empty for none.
fn bind_address(s: &str) -> Result<Option<std::net::SocketAddr>> {
    if s.is_empty() {
        return Ok(None);
    }
    Ok(Some(s.parse().with_context(|| {
        format!("{s:?} is not an address:port such as 127.0.0.1:10249")
    })?))
}

pub fn run(args: ProxyArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        if args.cleanup {
            proxy::cleanup(&args.table)
                .await
                .with_context(|| format!("removing table ip {}", args.table))?;
            eprintln!("removed table ip {}", args.table);
            return Ok(());
        }
        let node = match args.hostname_override {
            Some(n) => n,
            None => nix::unistd::gethostname()?.to_string_lossy().to_lowercase(),
        };
        let mut cfg = proxy::Config::new(node);
        cfg.table = args.table;
        cfg.service_cidr = args.service_cidr.parse().context("--service-cidr")?;
        cfg.cluster_cidr = args.cluster_cidr.parse().context("--cluster-cidr")?;
        cfg.nodeport_addresses = args.nodeport_addresses.parse()?;
        cfg.metrics_bind_address =
            bind_address(&args.metrics_bind_address).context("--metrics-bind-address")?;
        cfg.healthz_bind_address =
            bind_address(&args.healthz_bind_address).context("--healthz-bind-address")?;
        let kubeconfig = args.kubeconfig.expect("clap requires it without --cleanup");
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig)
            .with_context(|| format!("reading {}", kubeconfig.display()))?;
        let client = kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
        )?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = proxy::run(client, cfg) => r?,
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!(
            "proxy stopped; its rules stay in place (oxlet proxy --cleanup removes them)"
        );
        Ok(())
    })
}
