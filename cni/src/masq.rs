//! `ipMasq` through nftables: one table per network (`inet oxlet-cni-<network>`) with one
//! masquerade rule per family for traffic from the network's subnets to anywhere else, written
//! with `nft -f -` in one transaction. The rule set belongs to the network, not to pods: the
//! first ADD of a network creates it, the DEL (or GC) that frees the network's last IP removes
//! it, and every other ADD/DEL leaves nftables alone. Whether the table exists is asked over
//! nf_tables netlink (a read of ~0.1 ms, where starting `nft` costs milliseconds).

use crate::ipam::IpNet;
use std::io::Write;
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

/// The network's table, chain and rules (idempotent: the chain is flushed and refilled).
pub fn render_add(network: &str, subnets: &[IpNet]) -> String {
    let t = table_name(network);
    let mut s = format!("table inet {t} {{\n\tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n}}\n");
    s += &format!("flush chain inet {t} postrouting\n");
    for (v4, fam, mcast) in [(true, "ip", "224.0.0.0/4"), (false, "ip6", "ff00::/8")] {
        let mut nets: Vec<String> = subnets
            .iter()
            .filter(|n| n.addr.is_ipv4() == v4)
            .map(|n| n.network().to_string())
            .collect();
        nets.sort();
        nets.dedup();
        if nets.is_empty() {
            continue;
        }
        let set = nets.join(", ");
        s += &format!("add rule inet {t} postrouting {fam} saddr {{ {set} }} {fam} daddr != {{ {set} }} {fam} daddr != {mcast} masquerade\n");
    }
    s
}

/// Removes the network's table (idempotent: declared first, so deleting never fails on absence).
pub fn render_drop(network: &str) -> String {
    let t = table_name(network);
    format!("table inet {t}\ndelete table inet {t}\n")
}

/// Whether the network's table exists, asked with one nf_tables GETTABLE request.
pub fn table_exists(network: &str) -> std::io::Result<bool> {
    nft_netlink::get_table(libc::NFPROTO_INET as u8, &table_name(network))
}

pub(crate) mod nft_netlink {
    use std::io;

    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_GETTABLE: u16 = 1;
    const NFT_MSG_GETCHAIN: u16 = 4;
    const NFTA_TABLE_NAME: u16 = 1;
    const NFTA_CHAIN_TABLE: u16 = 1;
    const NFTA_CHAIN_NAME: u16 = 3;

    fn align4(n: usize) -> usize {
        (n + 3) & !3
    }

    /// Sends GETTABLE for `name` in `family`; true on a table reply, false on ENOENT.
    pub fn get_table(family: u8, name: &str) -> io::Result<bool> {
        get(family, NFT_MSG_GETTABLE, &[(NFTA_TABLE_NAME, name)])
    }

    /// Sends GETCHAIN for `chain` of `table` in `family`; true on a chain reply, false on
    /// ENOENT (no such table or chain).
    pub fn get_chain(family: u8, table: &str, chain: &str) -> io::Result<bool> {
        get(
            family,
            NFT_MSG_GETCHAIN,
            &[(NFTA_CHAIN_TABLE, table), (NFTA_CHAIN_NAME, chain)],
        )
    }

    fn get(family: u8, msg: u16, attrs: &[(u16, &str)]) -> io::Result<bool> {
        // SAFETY: plain socket syscalls on a descriptor owned here and closed on every path.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let r = exchange(fd, family, msg, attrs);
            libc::close(fd);
            r
        }
    }

    unsafe fn exchange(fd: i32, family: u8, msg: u16, attrs: &[(u16, &str)]) -> io::Result<bool> {
        let mut m = vec![0u8; 20];
        m[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
        m[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
        m[8..12].copy_from_slice(&1u32.to_ne_bytes());
        m[16] = family; // nfgenmsg: family, version 0, res_id 0
        for (kind, value) in attrs {
            let attr_len = 4 + value.len() + 1;
            m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
            m.extend_from_slice(&kind.to_ne_bytes());
            m.extend_from_slice(value.as_bytes());
            m.resize(m.len() + align4(attr_len) - attr_len + 1, 0);
        }
        let len = m.len();
        m[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        if libc::send(fd, m.as_ptr().cast(), m.len(), 0) < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 8192];
        loop {
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut off = 0usize;
            let n = n as usize;
            let mut found = false;
            while off + 16 <= n {
                let mlen = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
                let mtype = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
                if mlen < 16 || off + mlen > n {
                    break;
                }
                if mtype == libc::NLMSG_ERROR as u16 {
                    let err = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap());
                    return match -err {
                        0 => Ok(found),
                        libc::ENOENT => Ok(false),
                        e => Err(io::Error::from_raw_os_error(e)),
                    };
                }
                if mtype >> 8 == NFNL_SUBSYS_NFTABLES {
                    found = true;
                }
                off += align4(mlen);
            }
            if found {
                return Ok(true);
            }
        }
    }
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

/// Runs `nft` with `args` and returns what it prints.
pub fn output(args: &[&str]) -> Result<String> {
    let run = |bin: &str| Command::new(bin).args(args).stdin(Stdio::null()).output();
    let out = match run("nft") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => run("/usr/sbin/nft"),
        r => r,
    }
    .map_err(MasqError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(MasqError::Failed {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            script: format!("nft {}", args.join(" ")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_golden() {
        let s = render_add(
            "my net",
            &[
                IpNet::parse("10.1.0.0/24").unwrap(),
                IpNet::parse("10.2.0.0/24").unwrap(),
            ],
        );
        assert_eq!(
            s,
            "table inet oxlet-cni-my_net {\n\tchain postrouting { type nat hook postrouting priority srcnat; policy accept; }\n}\n\
             flush chain inet oxlet-cni-my_net postrouting\n\
             add rule inet oxlet-cni-my_net postrouting ip saddr { 10.1.0.0/24, 10.2.0.0/24 } ip daddr != { 10.1.0.0/24, 10.2.0.0/24 } ip daddr != 224.0.0.0/4 masquerade\n"
        );
    }

    #[test]
    fn table_exists_over_netlink() {
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let net = format!("unit-{}", std::process::id());
        assert!(!table_exists(&net).unwrap());
        apply(render_add(
            &net,
            &[IpNet::parse("10.243.126.0/24").unwrap()],
        ))
        .unwrap();
        assert!(table_exists(&net).unwrap());
        apply(render_drop(&net)).unwrap();
        apply(render_drop(&net)).unwrap();
        assert!(!table_exists(&net).unwrap());
    }

    #[test]
    fn drop_golden() {
        assert_eq!(
            render_drop("n"),
            "table inet oxlet-cni-n\ndelete table inet oxlet-cni-n\n"
        );
    }
}
