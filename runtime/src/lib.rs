//! oxlet's container runtime: images, pod sandboxes, containers, cgroups and logs, on the real kernel.
//!
//! Blocking kernel work (libcontainer, mounts, unpacking) is synchronous here; async callers go
//! through `tokio::task::spawn_blocking`.

pub mod image;

pub use libcontainer::oci_spec;
