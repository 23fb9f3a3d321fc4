//! Mount table reads and the tmpfs mounts of memory-backed volumes (blocking syscalls).

use std::io;
use std::path::{Path, PathBuf};

/// `\040`-style escapes of /proc/self/mountinfo undone.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `(mount point, file system type)` of every mount this process sees.
pub fn mounts() -> io::Result<Vec<(PathBuf, String)>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some((
                PathBuf::from(unescape(f.get(4)?)),
                f.get(sep + 1)?.to_string(),
            ))
        })
        .collect())
}

/// The path with symlinks resolved when it exists (the mount table shows resolved paths).
pub fn resolved(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

pub fn is_mount_point(p: &Path) -> io::Result<bool> {
    let p = resolved(p);
    Ok(mounts()?.iter().any(|(m, _)| *m == p))
}

/// Mounts a tmpfs of at most `size` bytes on `dir` unless something is mounted there already.
pub fn ensure_tmpfs(dir: &Path, size: Option<u64>) -> io::Result<()> {
    if is_mount_point(dir)? {
        return Ok(());
    }
    let opts = size.map(|s| format!("size={s}"));
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        opts.as_deref(),
    )
    .map_err(io::Error::from)
}

/// Makes `dir` (created when missing) a shared mount of its own: bound onto itself unless it
/// is a mount point already, then marked shared, so mounts below it propagate to and from the
/// containers' copies.
pub fn ensure_shared(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    if !is_mount_point(dir)? {
        rbind(dir, dir)?;
    }
    set_propagation(dir, nix::mount::MsFlags::MS_SHARED)
}

/// Binds `from` (with what is mounted below it) onto `to` as a private mount, unless `to` is
/// a mount point already.
pub fn ensure_private_copy(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    if is_mount_point(to)? {
        return Ok(());
    }
    rbind(from, to)?;
    set_propagation(to, nix::mount::MsFlags::MS_PRIVATE)
}

/// A recursive bind mount of `from` onto `to`.
fn rbind(from: &Path, to: &Path) -> io::Result<()> {
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some(from),
        to,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// Sets the propagation type `kind` (shared, private, ...) on `dir` and every mount below it.
fn set_propagation(dir: &Path, kind: nix::mount::MsFlags) -> io::Result<()> {
    nix::mount::mount(
        None::<&str>,
        dir,
        None::<&str>,
        kind | nix::mount::MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// Unmounts everything mounted at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) -> io::Result<()> {
    let dir = resolved(dir);
    let mut below: Vec<PathBuf> = mounts()?
        .into_iter()
        .map(|(m, _)| m)
        .filter(|m| m.starts_with(&dir))
        .collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    below.dedup();
    for m in below {
        match nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(io::Error::other(format!("unmount {}: {e}", m.display()))),
        }
    }
    Ok(())
}

/// Whether anything is still mounted at or below `dir`.
pub fn anything_below(dir: &Path) -> io::Result<bool> {
    let dir = resolved(dir);
    Ok(mounts()?.iter().any(|(m, _)| m.starts_with(&dir)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes() {
        assert_eq!(super::unescape("/a\\040b"), "/a b");
        assert_eq!(super::unescape("/plain"), "/plain");
        assert_eq!(super::unescape("/x\\"), "/x\\");
    }
}
