//! Applies a desired `Ruleset` to the kernel through `nft -f -`: the first sync (and any retry)
//! replaces the table in one transaction, later ones send only the difference.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tracing::{debug, warn};

use crate::ruleset::Ruleset;
use crate::Error;

/// What a sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Unchanged,
    Partial,
    Full,
}

/// Keeps what the kernel was last given, to diff the next state against.
#[derive(Debug, Default)]
pub struct Syncer {
    applied: Option<Ruleset>,
}

impl Syncer {
    pub fn new() -> Syncer {
        Syncer::default()
    }

    /// Makes the next sync a full one (the kernel's table may have been changed by others).
    pub fn forget(&mut self) {
        self.applied = None;
    }

    /// Makes the kernel's table equal to `desired` in one transaction. A partial transaction
    /// the kernel refuses is logged and retried as a full one.
    pub async fn sync(&mut self, desired: Ruleset) -> Result<Applied, Error> {
        let partial = match &self.applied {
            Some(old) if old.table == desired.table => match desired.render_diff(old) {
                None => return Ok(Applied::Unchanged),
                Some(text) => Some(text),
            },
            _ => None,
        };
        // Until a sync succeeds the kernel's state is unknown: the next one is full.
        self.applied = None;
        let kind = match partial {
            Some(text) => match apply(&text).await {
                Ok(()) => Applied::Partial,
                Err(Error::Nft { stderr }) => {
                    warn!(table = %desired.table, %stderr, "nft refused a partial sync; retrying with a full sync");
                    apply(&desired.render_full()).await?;
                    Applied::Full
                }
                Err(e) => return Err(e),
            },
            None => {
                apply(&desired.render_full()).await?;
                Applied::Full
            }
        };
        debug!(table = %desired.table, ?kind, "synced");
        self.applied = Some(desired);
        Ok(kind)
    }
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
    apply(&format!("add table ip {table}\ndelete table ip {table}\n")).await
}
