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
            "capabilities": {"portMappings": true},
            "ipam": {"type": "host-local", "ranges": [[{"subnet": cidr}]],
                "dataDir": cache_dir.join("networks").to_string_lossy()}
        }]
    })
}

/// The `portMappings` capability arguments of a pod, as containerd passes them: one per
/// container port with a hostPort, protocol in lower case, hostIP when set.
pub fn port_mappings(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<serde_json::Value> {
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.host_port.is_some_and(|h| h > 0))
        .map(|p| {
            let mut m = serde_json::json!({
                "hostPort": p.host_port,
                "containerPort": p.container_port,
                "protocol": p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase(),
            });
            if let Some(ip) = p.host_ip.as_deref().filter(|ip| !ip.is_empty()) {
                m["hostIP"] = ip.into();
            }
            m
        })
        .collect()
}

/// `(hostIP, protocol, hostPort)` of the pod's container ports with a hostPort.
fn host_ports(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<(String, String, i32)> {
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let hp = p.host_port.filter(|h| *h > 0)?;
            Some((
                p.host_ip.clone().unwrap_or_default(),
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                hp,
            ))
        })
        .collect()
}

/// Whether two pods ask for the same hostPort (same protocol and port; the same hostIP, or
/// either on every address), as the NodePorts filter judges.
pub fn host_ports_conflict(
    a: &k8s_openapi::api::core::v1::PodSpec,
    b: &k8s_openapi::api::core::v1::PodSpec,
) -> bool {
    let any = |ip: &str| ip.is_empty() || ip == "0.0.0.0" || ip == "::";
    let theirs = host_ports(b);
    host_ports(a).iter().any(|x| {
        theirs
            .iter()
            .any(|y| x.1 == y.1 && x.2 == y.2 && (x.0 == y.0 || any(&x.0) || any(&y.0)))
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
    fn host_port_conflicts() {
        let spec = |ports: serde_json::Value| -> k8s_openapi::api::core::v1::PodSpec {
            serde_json::from_value(
                serde_json::json!({"containers": [{"name": "c", "ports": ports}]}),
            )
            .unwrap()
        };
        let web = spec(serde_json::json!([{"containerPort": 80, "hostPort": 8080}]));
        assert!(host_ports_conflict(&web, &web));
        assert!(!host_ports_conflict(
            &web,
            &spec(serde_json::json!([{"containerPort": 80, "hostPort": 8081}]))
        ));
        assert!(!host_ports_conflict(
            &web,
            &spec(serde_json::json!([{"containerPort": 80, "hostPort": 8080, "protocol": "UDP"}]))
        ));
        let local = spec(
            serde_json::json!([{"containerPort": 80, "hostPort": 8080, "hostIP": "127.0.0.1"}]),
        );
        assert!(host_ports_conflict(&web, &local));
        assert!(!host_ports_conflict(
            &local,
            &spec(
                serde_json::json!([{"containerPort": 80, "hostPort": 8080, "hostIP": "10.0.0.1"}])
            )
        ));
        assert!(!host_ports_conflict(
            &web,
            &spec(serde_json::json!([{"containerPort": 80}]))
        ));
    }

    #[test]
    fn port_mappings_of_host_ports() {
        let spec: k8s_openapi::api::core::v1::PodSpec = serde_json::from_value(serde_json::json!({
            "containers": [
                {"name": "a", "ports": [{"containerPort": 80, "hostPort": 8080}, {"containerPort": 81}]},
                {"name": "b", "ports": [{"containerPort": 53, "hostPort": 5353, "protocol": "UDP", "hostIP": "127.0.0.1"}]}
            ]
        }))
        .unwrap();
        assert_eq!(
            port_mappings(&spec),
            vec![
                serde_json::json!({"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}),
                serde_json::json!({"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"}),
            ]
        );
    }

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
        assert_eq!(net.plugins[0]["capabilities"]["portMappings"], true);
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
