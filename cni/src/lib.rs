//! oxlet's CNI: the `oxlet-bridge` plugin (spec 1.0/1.1, built-in host-local IPAM, nftables
//! masquerade, hostPorts) and the client the agent uses to run any CNI plugin chain.

pub mod client;
pub mod config;
pub mod exec;
pub mod hostport;
pub mod ipam;
pub mod link;
pub mod masq;
pub mod ns;
pub mod plugin;
pub mod types;

pub use types::{CniError, CniResult};
