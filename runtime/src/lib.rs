//! oxlet's container runtime: images, pod sandboxes, containers, cgroups and logs, on the real kernel.
//!
//! Blocking kernel work (libcontainer, mounts, unpacking) is synchronous here; async callers go
//! through `tokio::task::spawn_blocking`.

pub mod cgroup;
pub mod container;
pub mod cri;
pub mod image;
pub mod log;
pub mod sandbox;
pub mod shim;
pub mod spec;

pub use libcontainer::oci_spec;
