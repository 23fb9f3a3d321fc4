//! In-process `host-local` IPAM with the reference plugin's on-disk layout.
//!
//! `<dataDir>/<network>/` holds one file per allocated IP (named by the IP, holding
//! `containerID\r\nifname`), `last_reserved_ip.<range set index>` and `lock` (flock), so a node can
//! switch between this and the reference `host-local` without losing allocations.

use crate::config::{HostLocalConf, RangeConf};
use fs2::FileExt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";
const LINE_BREAK: &str = "\r\n";

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("invalid IPAM configuration: {0}")]
    Config(String),
    #[error("no IP addresses available in range set {0}")]
    Exhausted(String),
    #[error("IPAM store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = IpamError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IpamError + '_ {
    move |source| IpamError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An address with a prefix length: `10.0.0.2/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn parse(s: &str) -> Option<Self> {
        let (a, p) = s.split_once('/')?;
        let addr: IpAddr = a.parse().ok()?;
        let prefix: u8 = p.parse().ok()?;
        (prefix <= bits(addr)).then_some(Self { addr, prefix })
    }
    pub fn network(&self) -> Self {
        let n = to_u128(self.addr) & mask(self.addr, self.prefix);
        Self {
            addr: from_u128(n, self.addr),
            prefix: self.prefix,
        }
    }
    pub fn last(&self) -> IpAddr {
        let n = to_u128(self.addr) | !mask(self.addr, self.prefix) & host_max(self.addr);
        from_u128(n, self.addr)
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4()
            && (to_u128(ip) & mask(ip, self.prefix)) == (to_u128(self.addr) & mask(ip, self.prefix))
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn bits(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        32
    } else {
        128
    }
}
fn host_max(a: IpAddr) -> u128 {
    if a.is_ipv4() {
        u32::MAX as u128
    } else {
        u128::MAX
    }
}
fn mask(a: IpAddr, prefix: u8) -> u128 {
    let b = bits(a) as u32;
    if prefix == 0 {
        0
    } else {
        (host_max(a) >> (b - prefix as u32) << (b - prefix as u32)) & host_max(a)
    }
}
fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u32::from(v) as u128,
        IpAddr::V6(v) => u128::from(v),
    }
}
fn from_u128(n: u128, like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// One range with its defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNet,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: IpAddr,
}

impl Range {
    pub fn from_conf(c: &RangeConf) -> Result<Self> {
        let subnet = IpNet::parse(&c.subnet)
            .ok_or_else(|| IpamError::Config(format!("subnet {:?} is not a CIDR", c.subnet)))?
            .network();
        let net = to_u128(subnet.addr);
        let last = to_u128(subnet.last());
        let v4 = subnet.addr.is_ipv4();
        if last - net < 2 {
            return Err(IpamError::Config(format!("subnet {subnet} is too small")));
        }
        let start = c.range_start.unwrap_or(from_u128(net + 1, subnet.addr));
        let end = c
            .range_end
            .unwrap_or(from_u128(if v4 { last - 1 } else { last }, subnet.addr));
        let gateway = c.gateway.unwrap_or(from_u128(net + 1, subnet.addr));
        for (what, ip) in [("rangeStart", start), ("rangeEnd", end)] {
            if !subnet.contains(ip) {
                return Err(IpamError::Config(format!(
                    "{what} {ip} is not in subnet {subnet}"
                )));
            }
        }
        if to_u128(start) > to_u128(end) {
            return Err(IpamError::Config(format!(
                "rangeStart {start} is after rangeEnd {end}"
            )));
        }
        Ok(Self {
            subnet,
            start,
            end,
            gateway,
        })
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.start.is_ipv4()
            && to_u128(ip) >= to_u128(self.start)
            && to_u128(ip) <= to_u128(self.end)
    }
}

/// The ranges of a configuration, one `Vec<Range>` per range set.
pub fn range_sets(conf: &HostLocalConf) -> Result<Vec<Vec<Range>>> {
    conf.ranges
        .iter()
        .map(|set| set.iter().map(Range::from_conf).collect())
        .collect()
}

/// One allocated address and the range it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: IpNet,
    pub gateway: IpAddr,
}

/// The locked allocation directory of one network; the flock is held until drop.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

impl Store {
    /// Opens (creating) `<data_dir>/<network>` and takes its lock.
    pub fn open(data_dir: &Path, network: &str) -> Result<Self> {
        if network.is_empty() || network.contains('/') || network == "." || network == ".." {
            return Err(IpamError::Config(format!(
                "network name {network:?} cannot name a directory"
            )));
        }
        let dir = data_dir.join(network);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let lp = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lp)
            .map_err(io(&lp))?;
        lock.lock_exclusive().map_err(io(&lp))?;
        // Scratch files of a plugin killed while it held the lock.
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(".reserve-") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(Self { dir, _lock: lock })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every allocation: IP, container id, interface name (empty for the old one-line format).
    pub fn allocations(&self) -> Result<Vec<(IpAddr, String, String)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let e = e.map_err(io(&self.dir))?;
            let Some(ip) = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let Ok(text) = fs::read_to_string(e.path()) else {
                continue;
            };
            let mut lines = text.lines().map(str::trim);
            let id = lines.next().unwrap_or("").to_string();
            let ifname = lines.next().unwrap_or("").to_string();
            out.push((ip, id, ifname));
        }
        Ok(out)
    }

    fn ip_path(&self, ip: IpAddr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    /// Creates the file for `ip`; false when it is taken already. The file appears with its
    /// content (written aside, then hard-linked): a plugin killed midway leaves no empty file.
    pub fn reserve(&self, ip: IpAddr, id: &str, ifname: &str, set: usize) -> Result<bool> {
        let p = self.ip_path(ip);
        let tmp = self.dir.join(format!(".reserve-{}", std::process::id()));
        let text = format!("{}{LINE_BREAK}{ifname}", id.trim());
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io(&tmp))?;
        drop(f);
        let linked = fs::hard_link(&tmp, &p);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io(&p)(e)),
        }
        let lp = self.dir.join(format!("last_reserved_ip.{set}"));
        write_in_place(&lp, ip.to_string().as_bytes()).map_err(io(&lp))?;
        Ok(true)
    }

    pub fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("last_reserved_ip.{set}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Removes the files of these IPs.
    pub fn release(&self, ips: &[IpAddr]) -> Result<()> {
        for ip in ips {
            let p = self.ip_path(*ip);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&p)(e)),
            }
        }
        Ok(())
    }

    /// The IPs held by this attachment (old one-line files match on the id alone).
    pub fn find(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        Ok(self
            .allocations()?
            .into_iter()
            .filter(|(_, i, n)| i == id.trim() && (n.is_empty() || n == ifname))
            .map(|(ip, _, _)| ip)
            .collect())
    }

    /// Frees what the attachment holds and returns the freed IPs.
    pub fn release_attachment(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        let ips = self.find(id, ifname)?;
        self.release(&ips)?;
        Ok(ips)
    }

    /// Allocates one address per range set for the attachment, reusing what it already holds.
    pub fn allocate(&self, sets: &[Vec<Range>], id: &str, ifname: &str) -> Result<Vec<Allocation>> {
        let held = self.find(id, ifname)?;
        let mut out = Vec::new();
        let mut fresh = Vec::new();
        for (i, set) in sets.iter().enumerate() {
            if let Some((ip, r)) = held
                .iter()
                .find_map(|ip| set.iter().find(|r| r.contains(*ip)).map(|r| (*ip, r)))
            {
                out.push(Allocation {
                    ip: IpNet {
                        addr: ip,
                        prefix: r.subnet.prefix,
                    },
                    gateway: r.gateway,
                });
                continue;
            }
            match self.allocate_in_set(set, i, id, ifname) {
                Ok(a) => {
                    fresh.push(a.ip.addr);
                    out.push(a);
                }
                Err(e) => {
                    let _ = self.release(&fresh);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn allocate_in_set(
        &self,
        set: &[Range],
        idx: usize,
        id: &str,
        ifname: &str,
    ) -> Result<Allocation> {
        // Start right after the last reserved address (round-robin), as the reference does.
        let (mut ri, mut cur) = (0usize, None::<u128>);
        if let Some(last) = self.last_reserved(idx) {
            if let Some(p) = set.iter().position(|r| r.contains(last)) {
                ri = p;
                cur = Some(to_u128(last));
            }
        }
        let total: u128 = set
            .iter()
            .map(|r| to_u128(r.end) - to_u128(r.start) + 1)
            .sum();
        let mut tried: u128 = 0;
        while tried < total {
            let r = &set[ri];
            let next = match cur {
                Some(c) if c < to_u128(r.end) => c + 1,
                Some(_) => {
                    ri = (ri + 1) % set.len();
                    cur = None;
                    continue;
                }
                None => to_u128(set[ri].start),
            };
            cur = Some(next);
            tried += 1;
            let ip = from_u128(next, r.start);
            if ip == r.gateway || ip == r.subnet.addr || (ip.is_ipv4() && ip == r.subnet.last()) {
                continue;
            }
            if self.reserve(ip, id, ifname, idx)? {
                return Ok(Allocation {
                    ip: IpNet {
                        addr: ip,
                        prefix: r.subnet.prefix,
                    },
                    gateway: r.gateway,
                });
            }
        }
        let names: Vec<String> = set.iter().map(|r| r.subnet.to_string()).collect();
        Err(IpamError::Exhausted(names.join(",")))
    }

    /// Whether every range set still has a free address.
    pub fn has_free(&self, sets: &[Vec<Range>]) -> Result<bool> {
        let used: Vec<IpAddr> = self
            .allocations()?
            .into_iter()
            .map(|(ip, _, _)| ip)
            .collect();
        Ok(sets.iter().all(|set| {
            set.iter().any(|r| {
                let size = to_u128(r.end) - to_u128(r.start) + 1;
                let taken = used.iter().filter(|ip| r.contains(**ip)).count() as u128;
                let reserved = [r.gateway, r.subnet.addr, r.subnet.last()]
                    .iter()
                    .filter(|ip| r.contains(**ip))
                    .count() as u128;
                taken + reserved < size
            })
        }))
    }
}

/// Overwrites a small file without truncating it to zero first: ext4 (`auto_da_alloc`) flushes a
/// file truncated to zero on close, which cost milliseconds per ADD.
fn write_in_place(p: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(p)?;
    f.write_all_at(data, 0)?;
    f.set_len(data.len() as u64)
}

/// The store directory's parent: `dataDir` or the reference default.
pub fn data_dir(conf: &HostLocalConf) -> PathBuf {
    PathBuf::from(conf.data_dir.as_deref().unwrap_or(DEFAULT_DATA_DIR))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(subnet: &str) -> Vec<Vec<Range>> {
        vec![vec![Range::from_conf(&RangeConf {
            subnet: subnet.into(),
            range_start: None,
            range_end: None,
            gateway: None,
        })
        .unwrap()]]
    }

    #[test]
    fn ipnet() {
        let n = IpNet::parse("10.1.2.3/24").unwrap();
        assert_eq!(n.network().to_string(), "10.1.2.0/24");
        assert_eq!(n.last().to_string(), "10.1.2.255");
        assert!(n.contains("10.1.2.200".parse().unwrap()));
        assert!(!n.contains("10.1.3.1".parse().unwrap()));
        assert_eq!(
            IpNet::parse("fd00::1/64").unwrap().network().to_string(),
            "fd00::/64"
        );
    }

    #[test]
    fn allocate_reuse_release_and_layout() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path(), "net").unwrap();
        let sets = sets("10.9.0.0/29");
        let a = s.allocate(&sets, "c1", "eth0").unwrap();
        assert_eq!(a[0].ip.to_string(), "10.9.0.2/29");
        assert_eq!(a[0].gateway.to_string(), "10.9.0.1");
        assert_eq!(
            s.allocate(&sets, "c1", "eth0").unwrap(),
            a,
            "same attachment, same IP"
        );
        assert_eq!(
            fs::read_to_string(d.path().join("net/10.9.0.2")).unwrap(),
            "c1\r\neth0"
        );
        assert_eq!(
            fs::read_to_string(d.path().join("net/last_reserved_ip.0")).unwrap(),
            "10.9.0.2"
        );
        for i in 2..=5 {
            s.allocate(&sets, &format!("c{i}"), "eth0").unwrap();
        }
        assert!(!s.has_free(&sets).unwrap());
        assert!(matches!(
            s.allocate(&sets, "c9", "eth0"),
            Err(IpamError::Exhausted(_))
        ));
        assert_eq!(s.release_attachment("c1", "eth0").unwrap().len(), 1);
        assert!(s.release_attachment("c1", "eth0").unwrap().is_empty());
        // Round-robin: after .6 comes .2 again.
        assert_eq!(
            s.allocate(&sets, "c9", "eth0").unwrap()[0]
                .ip
                .addr
                .to_string(),
            "10.9.0.2"
        );
    }

    #[test]
    fn several_ranges_in_a_set() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path(), "net").unwrap();
        let set = vec![
            Range::from_conf(&RangeConf {
                subnet: "10.9.1.0/24".into(),
                range_start: Some("10.9.1.10".parse().unwrap()),
                range_end: Some("10.9.1.10".parse().unwrap()),
                gateway: None,
            })
            .unwrap(),
            Range::from_conf(&RangeConf {
                subnet: "10.9.2.0/24".into(),
                range_start: None,
                range_end: None,
                gateway: None,
            })
            .unwrap(),
        ];
        let a = s.allocate(std::slice::from_ref(&set), "a", "eth0").unwrap();
        let b = s.allocate(&[set], "b", "eth0").unwrap();
        assert_eq!(a[0].ip.addr.to_string(), "10.9.1.10");
        assert_eq!(b[0].ip.addr.to_string(), "10.9.2.2");
    }

    #[test]
    fn reads_old_one_line_files() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path(), "net").unwrap();
        fs::write(d.path().join("net/10.9.0.7"), "old-container").unwrap();
        assert_eq!(
            s.release_attachment("old-container", "eth0").unwrap().len(),
            1
        );
    }
}
