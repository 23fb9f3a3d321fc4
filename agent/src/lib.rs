//! The node agent (kubelet's job): registers the Node and keeps its status and Lease fresh,
//! runs the pods bound to this node through `runtime::cri` and `cni::client`, reports their
//! status as kubelet does, and serves the kubelet API (`kubelet_api`: logs, exec, attach,
//! port-forward, stats) that the API server forwards to.

pub mod dns_config;
pub mod env;
pub mod events;
pub mod fieldpath;
pub mod image_gc;
pub mod kubelet_api;
pub mod lifecycle;
pub mod network;
pub mod node;
pub mod objects;
pub mod pod_runtime;
pub mod pod_worker;
pub mod pods;
pub mod probe;
pub mod security;
pub mod static_pods;
pub mod status;
pub mod volumes;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Runtime(#[from] runtime::cri::Error),
    #[error(transparent)]
    Sandbox(#[from] runtime::sandbox::Error),
    #[error(transparent)]
    Cgroup(#[from] runtime::cgroup::Error),
    #[error(transparent)]
    Image(#[from] runtime::image::Error),
    #[error(transparent)]
    Cni(#[from] cni::client::ClientError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    KubeletApi(#[from] kubelet_api::Error),
    #[error("blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the agent is told; `Config::new` gives kubelet's defaults and the standard paths.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    /// Images, container bundles and pod records.
    pub data_dir: PathBuf,
    /// Volatile state (libcontainer, sandbox namespaces); tmpfs in production.
    pub run_dir: PathBuf,
    /// The `oxlet-shim` executable.
    pub shim: PathBuf,
    /// Container logs, `<ns>_<pod>_<uid>/<container>/<restart>.log` below it.
    pub log_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub cni_cache_dir: PathBuf,
    /// The `oxlet-bridge` plugin to install into the first bin dir with a default config.
    pub bridge_plugin: Option<PathBuf>,
    /// Pod range for the default CNI config when the Node has no `spec.podCIDR`.
    pub pod_cidr: Option<String>,
    /// The node's InternalIP; found from the default route's interface when unset.
    pub node_ip: Option<std::net::IpAddr>,
    /// First CrashLoopBackOff and image pull back-off delay (kubelet: 10 s), doubling.
    pub backoff_base: Duration,
    /// Back-off cap (kubelet: 300 s).
    pub backoff_max: Duration,
    /// How often node status is computed (kubelet: 10 s) and the Lease renewed.
    pub node_status_interval: Duration,
    /// How often unchanged node status is still reported (kubelet: 5 min).
    pub node_status_report_interval: Duration,
    /// How often a pod worker re-reads its containers' state from the runtime.
    pub pod_resync: Duration,
    /// How often the contents of configMap, secret, downwardAPI and projected volumes are
    /// brought up to date with their objects (kubelet's --sync-frequency: 1 min).
    pub sync_frequency: Duration,
    /// How long to wait for the Node's spec.podCIDR when no CNI configuration exists and no
    /// pod range was given.
    pub pod_cidr_wait: Duration,
    /// Registries to pull from over plain HTTP besides loopback.
    pub insecure_registries: Vec<String>,
    /// Resources kept from pods (kubelet's system-reserved plus kube-reserved): cpu, memory,
    /// ephemeral-storage.
    pub reserved:
        std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    /// The cluster DNS servers ClusterFirst pods use (kubelet's --cluster-dns); none gives them
    /// the node's resolvers.
    pub cluster_dns: Vec<std::net::IpAddr>,
    /// The cluster domain searched by ClusterFirst pods (kubelet's --cluster-domain).
    pub cluster_domain: String,
    /// The node's resolver configuration, the base of pods' (kubelet's --resolv-conf).
    pub resolv_conf: PathBuf,
    /// Port of the kubelet API (HTTPS on every address), reported in the Node's daemonEndpoints.
    pub kubelet_port: u16,
    /// DER certificates of the CA whose client certificates the kubelet API accepts (the
    /// cluster CA); empty refuses every request with 401.
    pub client_ca: Vec<Vec<u8>>,
    /// Image garbage collection thresholds and minimum age (kubelet's 85 %, 80 %, 2 min).
    pub image_gc: runtime::image::gc::Policy,
    /// How often image garbage collection runs (kubelet: 5 min).
    pub image_gc_period: Duration,
    /// The directory of static pod manifests (kubelet's --pod-manifest-path).
    pub pod_manifest_path: Option<PathBuf>,
    /// How often the manifest directory is read and mirror pods checked (kubelet: 20 s).
    pub file_check_frequency: Duration,
}

impl Config {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            data_dir: PathBuf::from("/var/lib/oxlet"),
            run_dir: PathBuf::from("/run/oxlet"),
            shim: PathBuf::from("/usr/local/bin/oxlet-shim"),
            log_dir: PathBuf::from("/var/log/pods"),
            cni_conf_dir: PathBuf::from(cni::client::DEFAULT_CONF_DIR),
            cni_bin_dirs: vec![
                PathBuf::from(cni::client::DEFAULT_PLUGIN_DIR),
                PathBuf::from("/usr/lib/cni"),
            ],
            cni_cache_dir: PathBuf::from(cni::client::DEFAULT_CACHE_DIR),
            bridge_plugin: None,
            pod_cidr: None,
            node_ip: None,
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            node_status_interval: Duration::from_secs(10),
            node_status_report_interval: Duration::from_secs(300),
            pod_resync: Duration::from_secs(1),
            sync_frequency: Duration::from_secs(60),
            pod_cidr_wait: Duration::from_secs(30),
            insecure_registries: Vec::new(),
            reserved: Default::default(),
            cluster_dns: Vec::new(),
            cluster_domain: "cluster.local".into(),
            resolv_conf: dns_config::host_resolv_conf(),
            kubelet_port: node::KUBELET_PORT as u16,
            client_ca: Vec::new(),
            image_gc: Default::default(),
            image_gc_period: Duration::from_secs(300),
            pod_manifest_path: None,
            file_check_frequency: Duration::from_secs(20),
        }
    }
}

/// Registers the node, then runs node status, the Lease and the pods until an error the agent
/// cannot retry (the watches and heartbeats retry by themselves).
pub async fn run(client: kube::Client, cfg: Config) -> Result<()> {
    let mut delay = Duration::from_millis(200);
    let (node, registered) = loop {
        match node::register(&client, &cfg).await {
            Ok(r) => break r,
            Err(e) => {
                tracing::warn!(error = %e, "register node; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(7));
            }
        }
    };
    let mut pod_cidr = node
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidr.clone())
        .or_else(|| cfg.pod_cidr.clone());
    if pod_cidr.is_none() && network::needs_default_config(&cfg) {
        // As kubelet: the range comes from the Node once node IPAM has given it one.
        pod_cidr = node::wait_for_pod_cidr(&client, &cfg.node_name, cfg.pod_cidr_wait).await;
    }
    network::ensure_default_config(&cfg, pod_cidr.as_deref())?;
    let host_ip = node::internal_ip(&cfg);
    let ctx = Arc::new(pod_runtime::PodRuntime::new(&cfg, host_ip)?);
    let heartbeat = node::heartbeat(client.clone(), cfg.clone(), registered);
    let _heartbeat = AbortOnDrop(tokio::spawn(heartbeat));
    let _image_gc = AbortOnDrop(tokio::spawn(image_gc::run(ctx.clone())));
    let api = ctx.clone();
    let _kubelet_api = AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = kubelet_api::serve(api).await {
            tracing::error!(error = %e, "kubelet API stopped");
        }
    }));
    pods::run(client, cfg, ctx).await
}

/// Stops a background task when the future that started it is dropped (an aborted agent).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
