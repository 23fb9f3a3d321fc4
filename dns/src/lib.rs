//! Cluster DNS (the job of CoreDNS's kubernetes plugin): an authoritative server for the
//! cluster domain, answered from watches of Services, EndpointSlices, Pods and Namespaces,
//! that forwards every other name to the node's upstream resolvers.
//!
//! `zone` answers names of the cluster domain and reverse names; `forward` relays the rest,
//! with a loop guard; `handler` is the hickory request handler joining both; `upstream` reads
//! the node's resolver configuration; `kube_dns` keeps the `kube-dns` Service pointing here.

pub mod cluster;
pub mod forward;
mod handler;
pub mod kube_dns;
pub mod upstream;
pub mod zone;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::proto::rr::Name;
use hickory_server::Server;
use tracing::info;

/// CoreDNS's default TTL for cluster records, in seconds.
pub const DEFAULT_TTL: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("read {path}: {source}")]
    ResolvConf {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse {path}: {source}")]
    ResolvConfSyntax {
        path: std::path::PathBuf,
        #[source]
        source: resolv_conf::ParseError,
    },
    #[error("invalid cluster domain {domain:?}: {source}")]
    Domain {
        domain: String,
        #[source]
        source: hickory_server::proto::ProtoError,
    },
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the watches of the cluster ended")]
    WatchEnded,
    #[error("the DNS server stopped: {0}")]
    Server(#[from] hickory_server::net::NetError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the server is told; `Config::new` gives CoreDNS's defaults for a cluster.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses served over UDP and TCP. Port 0 takes a free port (the UDP one, for TCP too).
    pub listen: Vec<SocketAddr>,
    /// The cluster domain (`cluster.local`).
    pub domain: String,
    /// Where names outside the cluster go, in order of preference.
    pub upstreams: Vec<SocketAddr>,
    /// Addresses that lead back to this server besides `listen` (the cluster DNS Service IP):
    /// never forwarded to.
    pub own_addresses: Vec<IpAddr>,
    /// TTL of cluster records.
    pub ttl: u32,
    /// How long an upstream may take to answer.
    pub upstream_timeout: Duration,
}

impl Config {
    /// Serves `listen` for `cluster.local`, forwarding to the node's resolvers.
    pub fn new(listen: Vec<SocketAddr>) -> Self {
        Self {
            listen,
            domain: "cluster.local".into(),
            upstreams: upstream::nameservers_or_none(&upstream::host_resolv_conf()),
            own_addresses: Vec::new(),
            ttl: DEFAULT_TTL,
            upstream_timeout: Duration::from_secs(2),
        }
    }
}

/// A server that is listening.
pub struct Running {
    /// The UDP and TCP addresses it listens on (the same ones).
    pub addrs: Vec<SocketAddr>,
    server: Server<handler::Handler>,
    _watches: AbortOnDrop,
}

impl Running {
    /// Serves until the server fails.
    pub async fn wait(mut self) -> Result<()> {
        self.server.block_until_done().await?;
        Ok(())
    }

    /// Stops listening.
    pub async fn stop(mut self) {
        let _ = self.server.shutdown_gracefully().await;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts watching the cluster and listening; answers wait for the first full view of the
/// cluster (at most a few seconds) rather than give wrong NXDOMAINs.
pub async fn start(client: kube::Client, cfg: Config) -> Result<Running> {
    let domain = cfg.domain.trim_end_matches('.').to_ascii_lowercase();
    let zone = Name::from_ascii(format!("{domain}.")).map_err(|source| Error::Domain {
        domain: cfg.domain.clone(),
        source,
    })?;
    let (cluster, watches) = cluster::Cluster::watch(client);
    let watches = AbortOnDrop(tokio::spawn(watches));
    let mut sockets = Vec::new();
    for addr in &cfg.listen {
        let udp = tokio::net::UdpSocket::bind(addr)
            .await
            .map_err(|source| Error::Bind {
                addr: *addr,
                source,
            })?;
        let bound = udp.local_addr().map_err(|source| Error::Bind {
            addr: *addr,
            source,
        })?;
        let tcp = tokio::net::TcpListener::bind(bound)
            .await
            .map_err(|source| Error::Bind {
                addr: bound,
                source,
            })?;
        sockets.push((bound, udp, tcp));
    }
    let addrs: Vec<SocketAddr> = sockets.iter().map(|(a, _, _)| *a).collect();
    let forwarder = Arc::new(forward::Forwarder::new(
        &cfg.upstreams,
        &addrs,
        &cfg.own_addresses,
        cfg.upstream_timeout,
    ));
    let handler = handler::Handler {
        zone: zone::Zone::new(zone, cfg.ttl),
        cluster,
        forwarder: forwarder.clone(),
    };
    let mut server = Server::new(handler);
    for (_, udp, tcp) in sockets {
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(10), 64);
    }
    info!(?addrs, domain, upstreams = ?forwarder.upstreams(), "cluster DNS listening");
    Ok(Running {
        addrs,
        server,
        _watches: watches,
    })
}

/// Serves the cluster domain on `cfg.listen` until the server fails.
pub async fn run(client: kube::Client, cfg: Config) -> Result<()> {
    start(client, cfg).await?.wait().await
}
