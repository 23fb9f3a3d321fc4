//! oxlet's kube-proxy: Services and EndpointSlices programmed into one nftables table
//! (`ip oxlet-proxy`), following kube-proxy's nftables mode.
//!
//! `run` watches the API and keeps the table in sync; the rules stay in place when it stops,
//! `cleanup` removes them.

pub mod conntrack;
pub mod host;
pub mod layout;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod ruleset;
mod run;
pub mod sync;

pub use host::NodePortAddresses;
pub use run::{run, Config};
pub use sync::cleanup;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("running {cmd}")]
    Spawn {
        cmd: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel refused `{what}`: {source}")]
    Refused {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nf_tables netlink")]
    Netlink(#[source] std::io::Error),
    #[error("conntrack netlink")]
    Conntrack(#[source] std::io::Error),
    #[error("serving {what} on {addr}")]
    Serve {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("nft refused the transaction: {stderr}")]
    Nft { stderr: String },
    #[error("{cmd} failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("reading the output of `ip -j`")]
    IpJson(#[source] serde_json::Error),
    #[error("invalid --nodeport-addresses value {value:?}")]
    NodePortAddresses {
        value: String,
        #[source]
        source: ipnet::AddrParseError,
    },
    #[error("enabling bridge netfilter ({what})")]
    BridgeNetfilter {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the watches of Services and EndpointSlices ended")]
    WatchEnded,
}
