//! oxlet's embedded Kubernetes-compatible control plane.

pub mod certs;
pub mod defaults;
pub mod namespaces;
pub mod registry;
pub mod resources;
pub mod select;
pub mod services;
pub mod status;
pub mod store;
pub mod validate;
