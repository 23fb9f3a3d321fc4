//! oxlet's embedded Kubernetes-compatible control plane: an HTTPS API server with the core,
//! apps, discovery and coordination resources over an SQLite revision log.

use std::path::PathBuf;

pub mod admission;
pub mod apply;
pub mod auth;
pub mod authz;
pub mod certs;
pub mod controllers;
pub mod defaults;
pub mod discovery;
pub mod field_validation;
pub mod gc;
pub mod http;
pub mod kubelet;
pub mod namespaces;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod rbac_bootstrap;
pub mod registry;
pub mod resources;
pub mod rest;
pub mod scheduler;
pub mod select;
pub mod server;
pub mod services;
pub mod status;
pub mod store;
pub mod table;
pub mod tokens;
pub mod validate;
pub mod watch;
pub mod watch_cache;

pub use server::{start, up, Config, Server};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    #[error("bootstrap: {0}")]
    Api(#[from] status::ApiError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}
