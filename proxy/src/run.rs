//! The watch loop: reflectors on Services and EndpointSlices; every burst of changes becomes one
//! level-triggered sync of the whole desired table (only the difference reaches the kernel).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Api;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::host::{self, NodePortAddresses};
use crate::layout::Layout;
use crate::metrics::{self, Metrics};
use crate::sync::Syncer;
use crate::Error;
use crate::{conntrack, model};

#[derive(Debug, Clone)]
pub struct Config {
    /// nft table (family ip) the proxy owns.
    pub table: String,
    pub service_cidr: Ipv4Net,
    pub cluster_cidr: Ipv4Net,
    pub nodeport_addresses: NodePortAddresses,
    /// This node's name: endpoints with this `nodeName` are local.
    pub node_name: String,
    /// Changes within this period after the first one are applied together.
    pub min_sync_period: Duration,
    /// Also without changes, the whole table is rewritten this often: repairs what others changed.
    pub full_sync_period: Duration,
    /// Without changes, a sync still runs this often (level-triggered, so usually a no-op);
    /// /healthz fails when changes have waited twice as long.
    pub sync_period: Duration,
    /// Load br_netfilter and set bridge-nf-call-iptables=1.
    pub bridge_netfilter: bool,
    /// Where /metrics is served (kube-proxy's --metrics-bind-address); None: nowhere.
    pub metrics_bind_address: Option<SocketAddr>,
    /// Where /healthz is served (kube-proxy's --healthz-bind-address); None: nowhere.
    pub healthz_bind_address: Option<SocketAddr>,
}

impl Config {
    pub fn new(node_name: impl Into<String>) -> Config {
        Config {
            table: "oxlet-proxy".into(),
            service_cidr: "10.96.0.0/12".parse().expect("valid"),
            cluster_cidr: "10.244.0.0/16".parse().expect("valid"),
            nodeport_addresses: NodePortAddresses::Primary,
            node_name: node_name.into(),
            min_sync_period: Duration::from_millis(100),
            full_sync_period: Duration::from_secs(3600),
            sync_period: Duration::from_secs(30),
            bridge_netfilter: true,
            metrics_bind_address: Some(SocketAddr::from(([127, 0, 0, 1], 10249))),
            healthz_bind_address: Some(SocketAddr::from(([0, 0, 0, 0], 10256))),
        }
    }
}

/// Aborts the task when dropped, so the watches stop with `run`'s future.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The IPv4 InternalIPs of Node `name` that are this machine's own (upstream's "primary" node
/// IPs); None when the Node cannot be read (not registered yet): the caller falls back.
async fn node_internal_ips(client: &kube::Client, name: &str) -> Option<Vec<Ipv4Addr>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = match tokio::time::timeout(Duration::from_secs(10), nodes.get_opt(name)).await {
        Ok(Ok(Some(n))) => n,
        Ok(Ok(None)) => {
            info!(
                node = name,
                "no Node object yet: NodePorts on the default-route interface's addresses"
            );
            return None;
        }
        Ok(Err(e)) => {
            warn!(node = name, error = %e, "reading the Node");
            return None;
        }
        Err(_) => {
            warn!(node = name, "reading the Node timed out");
            return None;
        }
    };
    let local: Vec<Ipv4Addr> = host::ipv4_addresses()
        .await
        .ok()?
        .into_iter()
        .map(|(_, ip)| ip)
        .collect();
    let ips: Vec<Ipv4Addr> = node
        .status?
        .addresses?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .filter(|ip: &Ipv4Addr| local.contains(ip) && !ip.is_loopback())
        .collect();
    Some(ips)
}

/// Keeps table `cfg.table` in sync with the cluster's Services and EndpointSlices until the
/// future is dropped or the watches end; the rules stay in place afterwards.
pub async fn run(client: kube::Client, cfg: Config) -> Result<(), Error> {
    if cfg.bridge_netfilter {
        if let Err(e) = host::ensure_bridge_netfilter().await {
            warn!(error = %e, "bridged pod traffic to Services on one bridge will not be proxied");
        }
    }
    let nodeport_ips = match &cfg.nodeport_addresses {
        NodePortAddresses::Primary => match node_internal_ips(&client, &cfg.node_name).await {
            Some(ips) if !ips.is_empty() => ips,
            _ => host::nodeport_ips(&cfg.nodeport_addresses).await?,
        },
        other => host::nodeport_ips(other).await?,
    };
    if nodeport_ips.is_empty() {
        warn!(addresses = ?cfg.nodeport_addresses, "no node address serves NodePorts");
    }
    info!(table = %cfg.table, ?nodeport_ips, "proxy starting");
    let stats = Metrics::new(2 * cfg.sync_period);
    let mut servers = vec![];
    for (addr, what) in [
        (cfg.metrics_bind_address, "metrics"),
        (cfg.healthz_bind_address, "healthz"),
    ] {
        if let Some(addr) = addr {
            let (_, task) = metrics::serve(addr, what, stats.clone()).await?;
            servers.push(AbortOnDrop(task));
        }
    }
    let layout = Layout {
        table: cfg.table.clone(),
        service_cidr: cfg.service_cidr,
        cluster_cidr: cfg.cluster_cidr,
        nodeport_ips,
    };
    let (services, services_w) = reflector::store::<Service>();
    let (slices, slices_w) = reflector::store::<EndpointSlice>();
    let changed = Arc::new(Notify::new());
    let svc_events = reflector(
        services_w,
        watcher(Api::<Service>::all(client.clone()), Default::default()).default_backoff(),
    )
    .map(|e| e.map(|_| ()));
    let slice_events = reflector(
        slices_w,
        watcher(Api::<EndpointSlice>::all(client), Default::default()).default_backoff(),
    )
    .map(|e| e.map(|_| ()));
    let notify = changed.clone();
    let queued = stats.clone();
    let mut watches = AbortOnDrop(tokio::spawn(async move {
        let mut events = std::pin::pin!(stream::select(svc_events, slice_events));
        while let Some(ev) = events.next().await {
            match ev {
                Ok(()) => {
                    queued.queued();
                    notify.notify_one();
                }
                Err(e) => warn!(error = %e, "watch failed; retrying with backoff"),
            }
        }
    }));
    services
        .wait_until_ready()
        .await
        .map_err(|_| Error::WatchEnded)?;
    slices
        .wait_until_ready()
        .await
        .map_err(|_| Error::WatchEnded)?;
    let mut syncer = Syncer::new();
    let mut synced_ports: Vec<model::ServicePort> = vec![];
    let mut next_full = tokio::time::Instant::now() + cfg.full_sync_period;
    loop {
        let started = Instant::now();
        let svcs = services.state();
        let eps = slices.state();
        let ports = model::service_ports(
            svcs.iter().map(AsRef::as_ref),
            eps.iter().map(AsRef::as_ref),
            &cfg.node_name,
        );
        let retry = match syncer.sync_ports(&layout, ports.clone()).await {
            Ok(kind) => {
                tracing::debug!(?kind, service_ports = ports.len(), "sync done");
                stats.synced(started, kind, syncer.written);
                // Only once the rules no longer send new flows there.
                conntrack::clear(&conntrack::stale_flows(&synced_ports, &ports)).await;
                synced_ports = ports;
                false
            }
            Err(e) => {
                stats.sync_failed();
                error!(error = %e, "sync failed; retrying with a full sync");
                true
            }
        };
        if retry {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(cfg.sync_period) => continue,
            _ = tokio::time::sleep_until(next_full) => {
                syncer.forget();
                next_full = tokio::time::Instant::now() + cfg.full_sync_period;
                continue;
            }
            _ = &mut watches.0 => return Err(Error::WatchEnded),
        }
        // Coalesce a burst: whatever else arrives meanwhile is in the stores when we read them.
        tokio::time::sleep(cfg.min_sync_period).await;
    }
}
