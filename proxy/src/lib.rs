//! oxlet's kube-proxy: Services and EndpointSlices programmed into one nftables table.

pub mod layout;
pub mod model;
pub mod ruleset;
