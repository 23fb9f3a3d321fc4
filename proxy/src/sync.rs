//! Applies a desired `Ruleset` to the kernel: the first sync (and any retry) replaces the table
//! in one transaction, later ones send only the difference. Transactions go through nf_tables
//! netlink (`crate::netlink`), or through `nft -f -` where asked.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tracing::{debug, warn};

use crate::layout::{self, Layout};
use crate::model::ServicePort;
use crate::netlink;
use crate::ruleset::{KeyType, Op, Ruleset, Set};
use crate::Error;

/// What a sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Unchanged,
    Partial,
    Full,
}

/// How transactions reach the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Backend {
    /// nf_tables netlink, from this process.
    #[default]
    Netlink,
    /// The `nft` binary, one `nft -f -` per transaction.
    Nft,
}

/// What the last successful transaction wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    pub rules: usize,
    pub elements: usize,
}

impl Written {
    fn of(ops: &[Op<'_>]) -> Written {
        let mut w = Written::default();
        for op in ops {
            match op {
                Op::AddRule(..) => w.rules += 1,
                Op::AddElement(..) | Op::DeleteElement(..) | Op::AddRange(..) => w.elements += 1,
                _ => {}
            }
        }
        w
    }
}

/// A Service, by namespace and name.
type ServiceKey = (String, String);

/// What the kernel was given, in parts: the fixed table and each Service's share of it, and
/// how many Services have each endpoint address (its hairpin element stays while any has).
#[derive(Debug, Clone)]
struct Parts {
    fixed: Ruleset,
    services: BTreeMap<ServiceKey, (Vec<ServicePort>, Ruleset)>,
    hairpin: BTreeMap<Ipv4Addr, usize>,
}

impl Parts {
    fn build(layout: &Layout, ports: BTreeMap<ServiceKey, Vec<ServicePort>>) -> Parts {
        let mut hairpin = BTreeMap::new();
        let services = ports
            .into_iter()
            .map(|(k, p)| {
                for ip in layout::endpoint_ips(&p) {
                    *hairpin.entry(ip).or_default() += 1;
                }
                let r = layout::build_services(layout, &p);
                (k, (p, r))
            })
            .collect();
        Parts {
            fixed: layout::build_fixed(layout),
            services,
            hairpin,
        }
    }

    fn whole(&self) -> Ruleset {
        let mut r = self.fixed.clone();
        for (_, part) in self.services.values() {
            r.merge(part.clone());
        }
        if let Some(set) = r.sets.get_mut(layout::HAIRPIN_ENDPOINTS) {
            set.elements
                .extend(self.hairpin.keys().map(|ip| layout::hairpin_key(*ip)));
        }
        r
    }

    /// Counts a Service's endpoints going from `old` to `new`, collecting the hairpin set's
    /// elements that go (no Service has the address any more) and that come.
    fn recount(
        &mut self,
        old: &[ServicePort],
        new: &[ServicePort],
        gone: &mut Set,
        added: &mut Set,
    ) {
        let (before, after) = (layout::endpoint_ips(old), layout::endpoint_ips(new));
        for ip in before.difference(&after) {
            if let Some(n) = self.hairpin.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    self.hairpin.remove(ip);
                    gone.elements.insert(layout::hairpin_key(*ip));
                }
            }
        }
        for ip in after.difference(&before) {
            let n = self.hairpin.entry(*ip).or_default();
            *n += 1;
            if *n == 1 {
                added.elements.insert(layout::hairpin_key(*ip));
            }
        }
    }
}

fn by_service(ports: Vec<ServicePort>) -> BTreeMap<ServiceKey, Vec<ServicePort>> {
    let mut out: BTreeMap<ServiceKey, Vec<ServicePort>> = BTreeMap::new();
    for p in ports {
        out.entry((p.id.namespace.clone(), p.id.name.clone()))
            .or_default()
            .push(p);
    }
    out
}

/// Keeps what the kernel was last given, to diff the next state against.
#[derive(Debug, Default)]
pub struct Syncer {
    applied: Option<Ruleset>,
    parts: Option<Parts>,
    backend: Backend,
    /// What the last transaction that succeeded wrote.
    pub written: Written,
}

impl Syncer {
    pub fn new() -> Syncer {
        Syncer::default()
    }

    pub fn with_backend(backend: Backend) -> Syncer {
        Syncer {
            backend,
            ..Syncer::default()
        }
    }

    /// Makes the next sync a full one (the kernel's table may have been changed by others).
    pub fn forget(&mut self) {
        self.applied = None;
        self.parts = None;
    }

    /// Makes the kernel's table the layout of these Service ports in one transaction, building
    /// and diffing only the Services whose ports changed since the last sync (the rest of the
    /// table is neither rebuilt nor compared). A refused partial transaction is logged with
    /// the step it refused and retried as a full one.
    pub async fn sync_ports(
        &mut self,
        layout: &Layout,
        ports: Vec<ServicePort>,
    ) -> Result<Applied, Error> {
        self.applied = None;
        let ports = by_service(ports);
        let old = self
            .parts
            .take()
            .filter(|p| p.fixed == layout::build_fixed(layout));
        let Some(mut parts) = old else {
            let parts = Parts::build(layout, ports);
            let (desired, kind, written) = self.apply(None, parts.whole()).await?;
            debug!(table = %desired.table, ?kind, ?written, "synced");
            self.parts = Some(parts);
            self.written = written;
            return Ok(kind);
        };
        // Per changed Service: (its part before, its part now); None for an absent Service.
        let mut changed: Vec<(ServiceKey, Ruleset, Ruleset)> = vec![];
        let empty = || layout::build_services(layout, &[]);
        let mut hairpin_gone = Set::new(KeyType::AddrAddr);
        let mut hairpin_added = Set::new(KeyType::AddrAddr);
        for (key, p) in &ports {
            let (old_ports, old_part) = match parts.services.get(key) {
                Some((old_ports, _)) if old_ports == p => continue,
                Some((old_ports, old_part)) => (old_ports.clone(), old_part.clone()),
                None => (vec![], empty()),
            };
            parts.recount(&old_ports, p, &mut hairpin_gone, &mut hairpin_added);
            changed.push((key.clone(), old_part, layout::build_services(layout, p)));
        }
        let removed: Vec<(ServiceKey, Vec<ServicePort>, Ruleset)> = parts
            .services
            .iter()
            .filter(|(key, _)| !ports.contains_key(*key))
            .map(|(key, (p, part))| (key.clone(), p.clone(), part.clone()))
            .collect();
        for (key, old_ports, old_part) in removed {
            parts.recount(&old_ports, &[], &mut hairpin_gone, &mut hairpin_added);
            changed.push((key, old_part, empty()));
        }
        if hairpin_gone != hairpin_added {
            let with = |set: Set| {
                let mut r = Ruleset::new(layout.table.clone());
                r.sets.insert(layout::HAIRPIN_ENDPOINTS.into(), set);
                r
            };
            // Keyed apart from every Service (names are never empty).
            changed.push((
                (String::new(), String::new()),
                with(hairpin_gone),
                with(hairpin_added),
            ));
        }
        if changed.is_empty() {
            self.parts = Some(parts);
            return Ok(Applied::Unchanged);
        }
        let table = layout.table.clone();
        let result = match self.backend {
            Backend::Netlink => {
                let (changed, r) = tokio::task::spawn_blocking(move || {
                    let ops = part_ops(&changed);
                    let r = netlink::apply(&table, &ops, false).map(|()| Written::of(&ops));
                    (changed, r)
                })
                .await
                .map_err(|e| Error::Netlink(std::io::Error::other(e)))?;
                (changed, r)
            }
            Backend::Nft => {
                let ops = part_ops(&changed);
                let text: String = ops.iter().map(|o| o.render(&table) + "\n").collect();
                let w = Written::of(&ops);
                let r = apply(&text).await.map(|()| w);
                (changed, r)
            }
        };
        let (changed, r) = result;
        for (key, _, new) in changed {
            if key.1.is_empty() {
                continue;
            }
            match ports.get(&key) {
                Some(p) => {
                    parts.services.insert(key, (p.clone(), new));
                }
                None => {
                    parts.services.remove(&key);
                }
            }
        }
        match r {
            Ok(written) => {
                self.parts = Some(parts);
                self.written = written;
                Ok(Applied::Partial)
            }
            Err(e @ (Error::Refused { .. } | Error::Nft { .. })) => {
                warn!(table = %layout.table, error = %e, "the kernel refused a partial sync; retrying with a full sync");
                let (_, kind, written) = self.apply(None, parts.whole()).await?;
                self.parts = Some(parts);
                self.written = written;
                Ok(kind)
            }
            Err(e) => Err(e),
        }
    }

    async fn apply(
        &self,
        old: Option<Ruleset>,
        desired: Ruleset,
    ) -> Result<(Ruleset, Applied, Written), Error> {
        match self.backend {
            Backend::Netlink => tokio::task::spawn_blocking(move || sync_netlink(old, desired))
                .await
                .map_err(|e| Error::Netlink(std::io::Error::other(e)))?,
            Backend::Nft => sync_nft(old, desired).await,
        }
    }

    /// Makes the kernel's table equal to `desired` in one transaction. A partial transaction
    /// the kernel refuses is logged with the step it refused and retried as a full one.
    pub async fn sync(&mut self, desired: Ruleset) -> Result<Applied, Error> {
        // Until a sync succeeds the kernel's state is unknown: the next one is full.
        let old = self.applied.take().filter(|o| o.table == desired.table);
        if old.as_ref() == Some(&desired) {
            self.applied = old;
            return Ok(Applied::Unchanged);
        }
        let (desired, kind, written) = match self.backend {
            Backend::Netlink => tokio::task::spawn_blocking(move || sync_netlink(old, desired))
                .await
                .map_err(|e| Error::Netlink(std::io::Error::other(e)))??,
            Backend::Nft => sync_nft(old, desired).await?,
        };
        debug!(table = %desired.table, ?kind, ?written, "synced");
        self.applied = Some(desired);
        self.written = written;
        Ok(kind)
    }
}

/// The steps that turn each changed Service's old part into its new one, in one transaction.
fn part_ops(changed: &[(ServiceKey, Ruleset, Ruleset)]) -> Vec<Op<'_>> {
    let mut ops = vec![Op::AddTable];
    for (_, old, new) in changed {
        ops.extend(new.diff_ops(old).into_iter().filter(|o| *o != Op::AddTable));
    }
    ops
}

fn sync_netlink(
    old: Option<Ruleset>,
    desired: Ruleset,
) -> Result<(Ruleset, Applied, Written), Error> {
    let t = &desired.table;
    if let Some(old) = &old {
        let ops = desired.diff_ops(old);
        match netlink::apply(t, &ops, false) {
            Ok(()) => {
                let w = Written::of(&ops);
                return Ok((desired, Applied::Partial, w));
            }
            Err(e @ Error::Refused { .. }) => {
                warn!(table = %t, error = %e, "the kernel refused a partial sync; retrying with a full sync");
            }
            Err(e) => return Err(e),
        }
    }
    let ops = desired.full_ops();
    netlink::apply(t, &ops, true)?;
    let w = Written::of(&ops);
    Ok((desired, Applied::Full, w))
}

async fn sync_nft(
    old: Option<Ruleset>,
    desired: Ruleset,
) -> Result<(Ruleset, Applied, Written), Error> {
    if let Some(old) = &old {
        let ops = desired.diff_ops(old);
        let text: String = ops
            .iter()
            .map(|o| o.render(&desired.table) + "\n")
            .collect();
        match apply(&text).await {
            Ok(()) => {
                let w = Written::of(&ops);
                return Ok((desired, Applied::Partial, w));
            }
            Err(Error::Nft { stderr }) => {
                warn!(table = %desired.table, %stderr, "nft refused a partial sync; retrying with a full sync");
            }
            Err(e) => return Err(e),
        }
    }
    apply(&desired.render_full()).await?;
    let w = Written::of(&desired.full_ops());
    Ok((desired, Applied::Full, w))
}

/// Runs one `nft -f -` transaction; nft's message names the line it refused.
pub async fn apply(text: &str) -> Result<(), Error> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::Spawn { cmd: "nft", source })?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let write = stdin.write_all(text.as_bytes()).await;
    drop(stdin);
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| Error::Spawn { cmd: "nft", source })?;
    if !out.status.success() {
        return Err(Error::Nft {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    write.map_err(|source| Error::Spawn { cmd: "nft", source })
}

/// Removes table `ip <table>` if it exists (what `oxlet proxy --cleanup` does).
pub async fn cleanup(table: &str) -> Result<(), Error> {
    let table = table.to_string();
    tokio::task::spawn_blocking(move || {
        netlink::apply(&table, &[Op::AddTable, Op::DeleteTable], false)
    })
    .await
    .map_err(|e| Error::Netlink(std::io::Error::other(e)))?
}
