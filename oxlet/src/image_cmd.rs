//! `oxlet image pull|list|remove|import`.

use anyhow::{Context, Result};
use clap::Subcommand;
use runtime::image::{DockerConfig, ImageStore, Progress, PullOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Pull an image from a registry.
    Pull {
        /// A registry (host or host:port) to reach over plain HTTP; loopback always is.
        #[arg(long = "insecure", value_name = "REG")]
        insecure: Vec<String>,
        /// Credentials in Docker config JSON format (what imagePullSecrets hold).
        #[arg(long, value_name = "FILE")]
        auth_file: Option<PathBuf>,
        /// Image reference, e.g. busybox or 127.0.0.1:5000/test/busybox:latest.
        reference: String,
    },
    /// List stored images.
    #[command(alias = "ls")]
    List,
    /// Remove an image's tag and the content no other image or container uses.
    #[command(alias = "rm")]
    Remove { reference: String },
    /// Import an OCI archive or a `docker save` tarball.
    Import { file: PathBuf },
}

pub fn run(data_dir: &Path, cmd: ImageCommand) -> Result<()> {
    let store = ImageStore::open(data_dir.join("images"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start async runtime")?;
    match cmd {
        ImageCommand::Pull {
            insecure,
            auth_file,
            reference,
        } => {
            let auth = match auth_file {
                Some(p) => {
                    let data =
                        std::fs::read(&p).with_context(|| format!("read {}", p.display()))?;
                    DockerConfig::from_json(&data)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("auth file {}", p.display()))?
                }
                None => DockerConfig::default(),
            };
            let opts = PullOptions {
                auth,
                insecure_registries: insecure,
                progress: Some(progress_printer(std::io::stderr().is_terminal())),
            };
            let img = rt.block_on(store.pull(&reference, &opts))?;
            println!("{} {}", img.reference, img.digest);
        }
        ImageCommand::List => {
            let images = store.list()?;
            let rows: Vec<[String; 3]> = images
                .iter()
                .map(|i| [i.reference.clone(), i.digest.clone(), human_size(i.size)])
                .collect();
            print_table(["REFERENCE", "DIGEST", "SIZE"], &rows);
        }
        ImageCommand::Remove { reference } => {
            store.remove(&reference)?;
            println!("removed {reference}");
        }
        ImageCommand::Import { file } => {
            for img in rt.block_on(store.import(&file))? {
                println!("{} {}", img.reference, img.digest);
            }
        }
    }
    Ok(())
}

/// Progress on stderr: on a terminal, a status line with the bytes so far of every layer being
/// downloaded (layers download in parallel) and a line per finished layer; otherwise (logs,
/// pipes) only the line per finished layer.
fn progress_printer(tty: bool) -> runtime::image::ProgressFn {
    // Active downloads in start order: (short digest, downloaded, size).
    let active: Arc<Mutex<Vec<(String, u64, u64)>>> = Arc::default();
    Arc::new(move |p: &Progress| {
        let mut active = active.lock().unwrap_or_else(|e| e.into_inner());
        let mut err = std::io::stderr().lock();
        match p {
            Progress::LayerStart { digest, size } => {
                active.push((short(digest).to_string(), 0, *size));
            }
            Progress::LayerBytes {
                digest, downloaded, ..
            } => {
                if let Some(a) = active.iter_mut().find(|a| a.0 == short(digest)) {
                    a.1 = *downloaded;
                }
            }
            Progress::LayerDone {
                digest,
                size,
                cached,
            } => {
                active.retain(|a| a.0 != short(digest));
                let what = if *cached {
                    "already present"
                } else {
                    "downloaded"
                };
                if tty {
                    let _ = write!(err, "\r\x1b[K");
                }
                let _ = writeln!(err, "{}: {what} ({})", short(digest), human_size(*size));
            }
        }
        if tty {
            let status: Vec<String> = active
                .iter()
                .map(|(d, got, size)| format!("{d}: {} / {}", human_size(*got), human_size(*size)))
                .collect();
            // \r + erase line: redraw the one status line in place.
            let _ = write!(err, "\r\x1b[K{}", status.join("  "));
        }
        let _ = err.flush();
    })
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(3 << 20), "3.0 MiB");
        assert_eq!(short("sha256:0123456789abcdef"), "0123456789ab");
    }
}
