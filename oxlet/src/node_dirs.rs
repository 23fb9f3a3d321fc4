//! The directories every node command (`up`, `agent`, `uninstall`, `status`) takes, with
//! kubelet's and containerd's defaults, so each names them and defaults them the same way.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Clone)]
pub struct CniDirs {
    /// CNI configuration; the default oxlet-bridge one (from the Node's pod range) is written
    /// here when it holds none.
    #[arg(long, default_value = cni::client::DEFAULT_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
    /// Where CNI plugins are looked for, in order (comma-separated); the first gets
    /// oxlet-bridge when the default configuration is written.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "/opt/cni/bin,/usr/lib/cni"
    )]
    pub cni_bin_dir: Vec<PathBuf>,
    /// CNI results cache and host-local IPAM state.
    #[arg(long, default_value = cni::client::DEFAULT_CACHE_DIR)]
    pub cni_cache_dir: PathBuf,
}

#[derive(Args, Clone)]
pub struct NodeDirs {
    /// The agent's volatile state: libcontainer, sandbox namespaces.
    #[arg(long, default_value = "/run/oxlet")]
    pub run_dir: PathBuf,
    /// Container logs.
    #[arg(long, default_value = "/var/log/pods")]
    pub log_dir: PathBuf,
    /// Static pods: a directory of pod manifests (YAML or JSON, one pod per file) the agent
    /// runs itself, with their mirror pods in the API (kubelet's --pod-manifest-path).
    #[arg(long)]
    pub pod_manifest_path: Option<PathBuf>,
    #[command(flatten)]
    pub cni: CniDirs,
}

impl NodeDirs {
    /// Points the agent's configuration at these directories.
    pub fn apply(self, cfg: &mut agent::Config) {
        cfg.run_dir = self.run_dir;
        cfg.log_dir = self.log_dir;
        cfg.pod_manifest_path = self.pod_manifest_path;
        cfg.cni_conf_dir = self.cni.cni_conf_dir;
        cfg.cni_bin_dirs = self.cni.cni_bin_dir;
        cfg.cni_cache_dir = self.cni.cni_cache_dir;
    }
}
