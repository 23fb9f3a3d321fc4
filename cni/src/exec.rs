//! Running a CNI plugin executable: finding it on a path list, the `CNI_*` environment, stdin
//! and stdout, and turning its error JSON back into a [`CniError`].

use crate::types::{code, CniError};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Finds the executable `kind` in `paths` (the first match wins).
pub fn find_plugin(kind: &str, paths: &[PathBuf]) -> Result<PathBuf, CniError> {
    if kind.is_empty() || kind.contains('/') {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("plugin type {kind:?} is not a plugin name"),
        ));
    }
    paths
        .iter()
        .map(|p| p.join(kind))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "failed to find plugin {kind:?} in path [{}]",
                    list.join(":")
                ),
            )
        })
}

/// One invocation's `CNI_*` variables.
#[derive(Debug, Clone, Default)]
pub struct Invocation<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: &'a str,
    pub ifname: &'a str,
    pub args: &'a str,
    pub path: &'a str,
}

/// Runs `plugin` with `stdin`; `Ok(None)` when it printed nothing.
pub fn invoke(
    plugin: &Path,
    inv: &Invocation<'_>,
    stdin: &[u8],
) -> Result<Option<Value>, CniError> {
    let mut cmd = Command::new(plugin);
    cmd.env("CNI_COMMAND", inv.command)
        .env("CNI_PATH", inv.path);
    for (k, v) in [
        ("CNI_CONTAINERID", inv.container_id),
        ("CNI_NETNS", inv.netns),
        ("CNI_IFNAME", inv.ifname),
        ("CNI_ARGS", inv.args),
    ] {
        if v.is_empty() {
            cmd.env_remove(k);
        } else {
            cmd.env(k, v);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            CniError::new(
                code::IO_FAILURE,
                format!("cannot run plugin {}", plugin.display()),
            )
            .with_details(e)
        })?;
    {
        let mut sin = child.stdin.take().expect("piped stdin");
        // A plugin may exit without reading stdin (VERSION): ignore EPIPE.
        let _ = sin.write_all(stdin);
    }
    let out = child.wait_with_output().map_err(|e| {
        CniError::new(
            code::IO_FAILURE,
            format!("waiting for plugin {}", plugin.display()),
        )
        .with_details(e)
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if let Ok(e) = serde_json::from_str::<CniError>(&text) {
            return Err(e);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(CniError::internal(format!(
            "plugin {} failed ({})",
            plugin.display(),
            out.status
        ))
        .with_details(
            format!("{} {}", text.trim(), stderr.trim())
                .trim()
                .to_string(),
        ));
    }
    if text.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&text).map(Some).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            format!("plugin {} printed invalid JSON", plugin.display()),
        )
        .with_details(e)
    })
}
