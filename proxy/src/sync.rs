//! Applies a desired `Ruleset` to the kernel: the first sync (and any retry) replaces the table
//! in one transaction, later ones send only the difference. Transactions go through nf_tables
//! netlink (`crate::netlink`), or through `nft -f -` where asked.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tracing::{debug, warn};

use crate::netlink;
use crate::ruleset::{Op, Ruleset};
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
                Op::AddElement(..) | Op::DeleteElement(..) => w.elements += 1,
                _ => {}
            }
        }
        w
    }
}

/// Keeps what the kernel was last given, to diff the next state against.
#[derive(Debug, Default)]
pub struct Syncer {
    applied: Option<Ruleset>,
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
