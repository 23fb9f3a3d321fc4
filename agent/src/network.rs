//! The node's pod network configuration: when the CNI config dir has none, a default
//! `oxlet-bridge` list for the node's pod CIDR, with the plugin installed where the CNI client
//! looks for it.

use crate::{Config, Error, Result};
use cni::client::NetworkConfigList;
use std::os::unix::fs::PermissionsExt;

/// The file name of the default configuration.
pub const DEFAULT_CONF: &str = "10-oxlet.conflist";
pub const BRIDGE: &str = "oxlet0";

/// The default network: `oxlet-bridge` with host-local addresses of `cidr`, whose leases are
/// kept below the agent's CNI cache dir (`<cache>/networks/oxlet`).
pub fn default_config(cidr: &str, cache_dir: &std::path::Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "oxlet",
        "plugins": [{
            "type": "oxlet-bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "isDefaultGateway": true,
            "ipMasq": true,
            "hairpinMode": true,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": cidr}]],
                "dataDir": cache_dir.join("networks").to_string_lossy()}
        }]
    })
}

/// Whether no valid CNI configuration exists yet (the default one would be written).
pub fn needs_default_config(cfg: &Config) -> bool {
    NetworkConfigList::load_first(&cfg.cni_conf_dir).is_err()
}

/// Writes the default configuration and installs `oxlet-bridge` when the config dir has no
/// valid configuration and a pod CIDR is known; otherwise leaves everything as it is.
pub fn ensure_default_config(cfg: &Config, pod_cidr: Option<&str>) -> Result<()> {
    if NetworkConfigList::load_first(&cfg.cni_conf_dir).is_ok() {
        return Ok(());
    }
    let Some(cidr) = pod_cidr else {
        tracing::warn!(dir = %cfg.cni_conf_dir.display(), "no CNI configuration and no pod CIDR: pods cannot get a network");
        return Ok(());
    };
    let dir = &cfg.cni_conf_dir;
    std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    let path = dir.join(DEFAULT_CONF);
    let text = serde_json::to_vec_pretty(&default_config(cidr, &cfg.cni_cache_dir))
        .expect("config serializes");
    std::fs::write(&path, text).map_err(Error::io(format!("write {}", path.display())))?;
    tracing::info!(path = %path.display(), cidr, "wrote default CNI configuration");
    let installed = cfg
        .cni_bin_dirs
        .iter()
        .any(|d| d.join("oxlet-bridge").is_file());
    if let (false, Some(src), Some(bin)) = (installed, &cfg.bridge_plugin, cfg.cni_bin_dirs.first())
    {
        std::fs::create_dir_all(bin).map_err(Error::io(format!("create {}", bin.display())))?;
        let to = bin.join("oxlet-bridge");
        let tmp = bin.join(".oxlet-bridge.tmp");
        std::fs::copy(src, &tmp)
            .and_then(|_| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)))
            .and_then(|_| std::fs::rename(&tmp, &to))
            .map_err(Error::io(format!(
                "install {} as {}",
                src.display(),
                to.display()
            )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_default_only_when_there_is_none() {
        let d = tempfile::tempdir().unwrap();
        let plugin = d.path().join("plugin");
        std::fs::write(&plugin, "#!/bin/sh\n").unwrap();
        let mut cfg = Config::new("n");
        cfg.cni_conf_dir = d.path().join("net.d");
        cfg.cni_bin_dirs = vec![d.path().join("bin")];
        cfg.bridge_plugin = Some(plugin);
        ensure_default_config(&cfg, None).unwrap();
        assert!(!cfg.cni_conf_dir.exists());
        ensure_default_config(&cfg, Some("10.88.0.0/24")).unwrap();
        let net = NetworkConfigList::load_first(&cfg.cni_conf_dir).unwrap();
        assert_eq!(net.plugins[0]["type"], "oxlet-bridge");
        assert_eq!(
            net.plugins[0]["ipam"]["ranges"][0][0]["subnet"],
            "10.88.0.0/24"
        );
        assert!(d.path().join("bin/oxlet-bridge").is_file());
        std::fs::write(
            cfg.cni_conf_dir.join("00-mine.conf"),
            r#"{"cniVersion":"1.0.0","name":"mine","type":"bridge"}"#,
        )
        .unwrap();
        ensure_default_config(&cfg, Some("10.99.0.0/24")).unwrap();
        assert_eq!(
            NetworkConfigList::load_first(&cfg.cni_conf_dir)
                .unwrap()
                .name,
            "mine"
        );
    }
}
