//! `ipMasq` through nftables: one table per network (`inet oxlet-cni-<network>`) holding a set of
//! pod addresses per family and one masquerade rule per family, applied with `nft -f -` in one
//! transaction. Pods are set elements, so ADD and DEL only touch elements.

use crate::ipam::IpNet;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("cannot run nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft failed: {stderr}\n--- transaction ---\n{script}")]
    Failed { stderr: String, script: String },
}

pub type Result<T, E = MasqError> = std::result::Result<T, E>;

/// The table that holds a network's masquerade rules.
pub fn table_name(network: &str) -> String {
    let clean: String = network
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(200)
        .collect();
    format!("oxlet-cni-{clean}")
}

fn elements(ips: &[IpAddr], v4: bool) -> Option<String> {
    let v: Vec<String> = ips
        .iter()
        .filter(|i| i.is_ipv4() == v4)
        .map(|i| i.to_string())
        .collect();
    (!v.is_empty()).then(|| v.join(", "))
}

fn declare(table: &str) -> String {
    format!(
        "table inet {table} {{\n\
         \tset pods4 {{ type ipv4_addr; }}\n\
         \tset pods6 {{ type ipv6_addr; }}\n\
         \tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         }}\n"
    )
}

/// ADD: ensure the table, rewrite the network's rules (subnets may have changed) and add the pods.
pub fn render_add(network: &str, subnets: &[IpNet], ips: &[IpAddr]) -> String {
    let t = table_name(network);
    let mut s = declare(&t);
    s += &format!("flush chain inet {t} postrouting\n");
    for (v4, fam, set, mcast) in [
        (true, "ip", "pods4", "224.0.0.0/4"),
        (false, "ip6", "pods6", "ff00::/8"),
    ] {
        let nets: Vec<String> = subnets
            .iter()
            .filter(|n| n.addr.is_ipv4() == v4)
            .map(|n| n.network().to_string())
            .collect();
        if nets.is_empty() {
            continue;
        }
        s += &format!(
            "add rule inet {t} postrouting {fam} saddr @{set} {fam} daddr != {{ {} }} {fam} daddr != {mcast} masquerade\n",
            nets.join(", ")
        );
    }
    for (v4, set) in [(true, "pods4"), (false, "pods6")] {
        if let Some(e) = elements(ips, v4) {
            s += &format!("add element inet {t} {set} {{ {e} }}\n");
        }
    }
    s
}

/// DEL/GC: remove the pods (tolerating absent ones), or the whole table when the network is empty.
pub fn render_del(network: &str, ips: &[IpAddr], drop_table: bool) -> String {
    let t = table_name(network);
    let mut s = declare(&t);
    if drop_table {
        s += &format!("delete table inet {t}\n");
        return s;
    }
    for (v4, set) in [(true, "pods4"), (false, "pods6")] {
        if let Some(e) = elements(ips, v4) {
            // `add` then `delete` in one transaction: idempotent on nft 1.0.6 (no `destroy`).
            s += &format!(
                "add element inet {t} {set} {{ {e} }}\ndelete element inet {t} {set} {{ {e} }}\n"
            );
        }
    }
    s
}

/// A running `nft -f -`, started so netlink work can proceed meanwhile.
pub struct Pending {
    child: Child,
    script: String,
}

/// Starts `nft -f -` with the script on its stdin.
pub fn spawn(script: String) -> Result<Pending> {
    let start = |bin: &str| {
        let mut c = Command::new(bin);
        c.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Dies with the plugin: a killed ADD leaves no transaction to land after its DEL.
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        c.spawn()
    };
    // Runtimes may call plugins with a bare environment: fall back to the usual place.
    let mut child = match start("nft") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => start("/usr/sbin/nft"),
        r => r,
    }
    .map_err(MasqError::Spawn)?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(script.as_bytes())
        .map_err(MasqError::Spawn)?;
    drop(stdin);
    Ok(Pending { child, script })
}

impl Pending {
    pub fn wait(self) -> Result<()> {
        let out = self.child.wait_with_output().map_err(MasqError::Spawn)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(MasqError::Failed {
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                script: self.script,
            })
        }
    }
}

/// Runs a script to completion.
pub fn apply(script: String) -> Result<()> {
    spawn(script)?.wait()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_golden() {
        let s = render_add(
            "my net",
            &[IpNet::parse("10.1.0.0/24").unwrap()],
            &["10.1.0.2".parse().unwrap()],
        );
        assert_eq!(
            s,
            "table inet oxlet-cni-my_net {\n\tset pods4 { type ipv4_addr; }\n\tset pods6 { type ipv6_addr; }\n\
             \tchain postrouting { type nat hook postrouting priority srcnat; policy accept; }\n}\n\
             flush chain inet oxlet-cni-my_net postrouting\n\
             add rule inet oxlet-cni-my_net postrouting ip saddr @pods4 ip daddr != { 10.1.0.0/24 } ip daddr != 224.0.0.0/4 masquerade\n\
             add element inet oxlet-cni-my_net pods4 { 10.1.0.2 }\n"
        );
    }

    #[test]
    fn del_golden() {
        let s = render_del("n", &["10.1.0.2".parse().unwrap()], false);
        assert!(s.ends_with("add element inet oxlet-cni-n pods4 { 10.1.0.2 }\ndelete element inet oxlet-cni-n pods4 { 10.1.0.2 }\n"));
        assert!(render_del("n", &[], true).ends_with("delete table inet oxlet-cni-n\n"));
    }
}
