//! The node's resolvers: /etc/resolv.conf, or systemd-resolved's list of real upstreams when
//! /etc/resolv.conf names only its local stub (127.0.0.53), which pods and this server could
//! not use (the stub answers only on the host's loopback, and it may forward back here).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

pub const ETC_RESOLV_CONF: &str = "/etc/resolv.conf";
pub const SYSTEMD_RESOLV_CONF: &str = "/run/systemd/resolve/resolv.conf";

const STUB: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53));

/// Which file holds the node's resolvers.
pub fn host_resolv_conf() -> PathBuf {
    choose(Path::new(ETC_RESOLV_CONF), Path::new(SYSTEMD_RESOLV_CONF))
}

fn choose(etc: &Path, systemd: &Path) -> PathBuf {
    let only_stub = std::fs::read(etc)
        .ok()
        .and_then(|b| resolv_conf::Config::parse(b).ok())
        .is_some_and(|c| {
            !c.nameservers.is_empty()
                && c.nameservers
                    .iter()
                    .all(|n| IpAddr::from(n.clone()) == STUB)
        });
    if only_stub && systemd.exists() {
        systemd.to_path_buf()
    } else {
        etc.to_path_buf()
    }
}

/// The nameservers of a resolv.conf, on port 53.
pub fn nameservers(path: &Path) -> Result<Vec<SocketAddr>> {
    let bytes = std::fs::read(path).map_err(|source| Error::ResolvConf {
        path: path.to_path_buf(),
        source,
    })?;
    let cfg = resolv_conf::Config::parse(bytes).map_err(|source| Error::ResolvConfSyntax {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(cfg
        .nameservers
        .into_iter()
        .map(|n| SocketAddr::new(IpAddr::from(n), 53))
        .collect())
}

/// The nameservers of a resolv.conf; none (names outside the cluster fail) when it cannot be
/// read, which is said in the log.
pub fn nameservers_or_none(path: &Path) -> Vec<SocketAddr> {
    nameservers(path).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no upstream resolvers: only cluster names resolve");
        Vec::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_resolver_points_to_systemd_list() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("resolv.conf");
        let systemd = dir.path().join("systemd.conf");
        std::fs::write(
            &etc,
            "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n",
        )
        .unwrap();
        assert_eq!(
            choose(&etc, &systemd),
            etc,
            "no systemd list: keep the file"
        );
        std::fs::write(&systemd, "nameserver 192.0.2.53\nnameserver 2001:db8::53\n").unwrap();
        assert_eq!(choose(&etc, &systemd), systemd);
        assert_eq!(
            nameservers(&systemd).unwrap(),
            vec![
                "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
        std::fs::write(&etc, "nameserver 192.0.2.1\n").unwrap();
        assert_eq!(choose(&etc, &systemd), etc);
        assert!(matches!(
            nameservers(&dir.path().join("missing")),
            Err(Error::ResolvConf { .. })
        ));
    }
}
