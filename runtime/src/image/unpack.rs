//! Unpacking one layer tar into a snapshot dir, overlayfs style.
//!
//! We walk the tar entries ourselves instead of `tar::Archive::unpack` because layers need
//! overlayfs whiteouts (a `.wh.NAME` entry becomes a 0/0 character device, `.wh..wh..opq` the
//! `trusted.overlay.opaque=y` xattr on its dir) and because a layer is untrusted input: no entry
//! may land outside the snapshot, whether through `..`, an absolute path or a symlink in a parent.

use super::media::{sniff_compression, Compression};
use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use tracing::warn;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Unpacks the layer blob at `blob` into the new dir `dest` and checks that the uncompressed
/// stream hashes to `diff_id`. `compression` of `None` means: sniff the magic bytes.
pub(crate) fn unpack_layer(
    blob: &Path,
    compression: Option<Compression>,
    dest: &Path,
    diff_id: &str,
) -> Result<(), String> {
    let f = File::open(blob).map_err(|e| format!("open {}: {e}", blob.display()))?;
    let mut br = BufReader::with_capacity(256 * 1024, f);
    let comp = match compression {
        Some(c) => c,
        None => sniff_compression(br.fill_buf().map_err(|e| e.to_string())?),
    };
    let decoded: Box<dyn Read> = match comp {
        Compression::None => Box::new(br),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(br)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(br).map_err(|e| format!("zstd: {e}"))?,
        ),
    };
    let mut hashing = HashingReader {
        inner: decoded,
        hasher: Sha256::new(),
    };
    unpack_tar(&mut hashing, dest)?;
    // The diff id covers the whole stream, including padding after the end-of-archive blocks.
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| format!("read layer: {e}"))?;
    let got = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
    if got != diff_id {
        return Err(format!(
            "diff id mismatch: config says {diff_id}, layer is {got}"
        ));
    }
    Ok(())
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks an uncompressed layer tar into `dest`, which must not exist yet.
pub(crate) fn unpack_tar(reader: impl Read, dest: &Path) -> Result<(), String> {
    fs::create_dir(dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    let mut archive = tar::Archive::new(reader);
    // Directory times are set last: creating entries inside a dir changes its mtime.
    let mut dir_times: Vec<(PathBuf, u64)> = Vec::new();
    let entries = archive.entries().map_err(|e| format!("read tar: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("read tar: {e}"))?;
        let raw = entry
            .path()
            .map_err(|e| format!("entry name: {e}"))?
            .into_owned();
        let ctx = |e: String| format!("{}: {e}", raw.display());
        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::XGlobalHeader) {
            continue;
        }
        let rel = sanitize(&raw).map_err(ctx)?;
        let xattrs = pax_xattrs(&mut entry).map_err(ctx)?;
        let header = entry.header().clone();
        let mode = header.mode().map_err(|e| ctx(e.to_string()))? & 0o7777;
        let uid = header.uid().map_err(|e| ctx(e.to_string()))? as u32;
        let gid = header.gid().map_err(|e| ctx(e.to_string()))? as u32;
        let mtime = header.mtime().unwrap_or(0);

        let Some(name) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            // The layer's root itself (`./`): only its metadata matters.
            if kind.is_dir() {
                set_meta(dest, uid, gid, Some(mode), &xattrs).map_err(ctx)?;
                dir_times.push((dest.to_path_buf(), mtime));
            }
            continue;
        };
        let parent = ensure_parent(dest, rel.parent().unwrap_or(Path::new(""))).map_err(ctx)?;

        if name == OPAQUE_MARKER {
            set_xattr(&parent, OPAQUE_XATTR, b"y").map_err(ctx)?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.starts_with(WHITEOUT_PREFIX) {
                // Other AUFS metadata (.wh..wh.plnk and friends) has no overlayfs meaning.
                continue;
            }
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                // `.wh..` would otherwise delete the parent's parent.
                return Err(ctx("whiteout of an invalid name".into()));
            }
            let target = parent.join(hidden);
            remove_existing(&target).map_err(ctx)?;
            mknod(&target, SFlag::S_IFCHR, Mode::empty(), 0)
                .map_err(|e| ctx(format!("whiteout mknod: {e}")))?;
            continue;
        }

        let target = parent.join(&name);
        match kind {
            tar::EntryType::Directory => {
                let is_dir = fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir());
                if !is_dir {
                    remove_existing(&target).map_err(ctx)?;
                    fs::create_dir(&target).map_err(|e| ctx(e.to_string()))?;
                }
                set_meta(&target, uid, gid, Some(mode), &xattrs).map_err(ctx)?;
                dir_times.push((target, mtime));
                continue;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_existing(&target).map_err(ctx)?;
                // O_EXCL|O_NOFOLLOW: never write through something that appeared at the path.
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(|e| ctx(e.to_string()))?;
                io::copy(&mut entry, &mut f).map_err(|e| ctx(e.to_string()))?;
                drop(f);
                set_meta(&target, uid, gid, Some(mode), &xattrs).map_err(ctx)?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| ctx(e.to_string()))?
                    .ok_or_else(|| ctx("symlink without target".into()))?;
                remove_existing(&target).map_err(ctx)?;
                // The target is kept verbatim (absolute ones too): it is resolved inside the
                // container's root at run time, and we never follow links while unpacking.
                std::os::unix::fs::symlink(&link, &target).map_err(|e| ctx(e.to_string()))?;
                set_meta(&target, uid, gid, None, &xattrs).map_err(ctx)?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(|e| ctx(e.to_string()))?
                    .ok_or_else(|| ctx("hard link without target".into()))?;
                let src_rel = sanitize(&link).map_err(ctx)?;
                let src = resolve_existing(dest, &src_rel).map_err(ctx)?;
                if src == target {
                    continue;
                }
                remove_existing(&target).map_err(ctx)?;
                // linkat without AT_SYMLINK_FOLLOW: links the entry itself, even a symlink.
                fs::hard_link(&src, &target).map_err(|e| ctx(format!("hard link: {e}")))?;
                continue; // same inode: its metadata came with the original entry
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let flag = match kind {
                    tar::EntryType::Char => SFlag::S_IFCHR,
                    tar::EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                remove_existing(&target).map_err(ctx)?;
                mknod(
                    &target,
                    flag,
                    Mode::from_bits_truncate(mode),
                    libc::makedev(major, minor),
                )
                .map_err(|e| ctx(format!("mknod: {e}")))?;
                set_meta(&target, uid, gid, Some(mode), &xattrs).map_err(ctx)?;
            }
            other => return Err(ctx(format!("unsupported tar entry type {other:?}"))),
        }
        set_mtime(&target, mtime).map_err(ctx)?;
    }
    for (dir, mtime) in dir_times.iter().rev() {
        set_mtime(dir, *mtime).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Turns a tar path into a clean relative path: leading `/` and `.` dropped, `..` resolved
/// lexically and refused when it would climb above the layer root.
pub(crate) fn sanitize(path: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return Err("path escapes the layer root (..)".into());
                }
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(out)
}

/// Returns `dest/rel`, creating missing directories; refuses to pass through a symlink or a
/// non-directory, so a link planted by an earlier entry cannot redirect later writes.
fn ensure_parent(dest: &Path, rel: &Path) -> Result<PathBuf, String> {
    let mut cur = dest.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "parent {} is a symbolic link; refusing to write through it",
                    cur.strip_prefix(dest).unwrap_or(&cur).display()
                ))
            }
            Ok(_) => {
                return Err(format!(
                    "parent {} is not a directory",
                    cur.strip_prefix(dest).unwrap_or(&cur).display()
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(|e| e.to_string())?;
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))
                    .map_err(|e| e.to_string())?;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(cur)
}

/// `dest/rel` for a hard link source: it must exist in this layer, reached through real dirs.
fn resolve_existing(dest: &Path, rel: &Path) -> Result<PathBuf, String> {
    let mut cur = dest.to_path_buf();
    let n = rel.components().count();
    for (i, c) in rel.components().enumerate() {
        cur.push(c);
        let m = fs::symlink_metadata(&cur)
            .map_err(|_| format!("hard link target {} is not in this layer", rel.display()))?;
        if i + 1 < n && !m.is_dir() {
            return Err(format!(
                "hard link target {} passes through a non-directory",
                rel.display()
            ));
        }
        if i + 1 == n && m.is_dir() {
            return Err(format!("hard link target {} is a directory", rel.display()));
        }
    }
    if n == 0 {
        return Err("hard link to the layer root".into());
    }
    Ok(cur)
}

/// Removes whatever a later entry replaces (tar semantics: the last entry for a path wins).
fn remove_existing(path: &Path) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(|e| e.to_string()),
        Ok(_) => fs::remove_file(path).map_err(|e| e.to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

fn pax_xattrs<R: Read>(entry: &mut tar::Entry<R>) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions().map_err(|e| e.to_string())? {
        for ext in exts {
            let ext = ext.map_err(|e| e.to_string())?;
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                out.push((name.to_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

/// Owner, then mode (chown clears setuid/setgid, so the order matters), then xattrs.
fn set_meta(
    path: &Path,
    uid: u32,
    gid: u32,
    mode: Option<u32>,
    xattrs: &[(String, Vec<u8>)],
) -> Result<(), String> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| format!("chown: {e}"))?;
    if let Some(mode) = mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod: {e}"))?;
    }
    for (name, value) in xattrs {
        if name.starts_with("trusted.overlay.") {
            // An image must not forge overlayfs metadata (redirects, opaque flags) directly.
            warn!(path = %path.display(), xattr = %name, "ignoring overlay xattr from layer");
            continue;
        }
        if let Err(e) = set_xattr(path, name, value) {
            // Some filesystems refuse some namespaces; the file is still usable without it.
            warn!(path = %path.display(), xattr = %name, "cannot set xattr: {e}");
        }
    }
    Ok(())
}

pub(crate) fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<(), String> {
    let p = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let n = CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(format!("setxattr {name}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

fn set_mtime(path: &Path, mtime: u64) -> Result<(), String> {
    let t = TimeSpec::new(mtime as i64, 0);
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink)
        .map_err(|e| format!("set mtime: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    }

    /// Writes raw names (bypassing the tar crate's own `..` checks, as an attacker would).
    fn raw_entry(
        b: &mut tar::Builder<Vec<u8>>,
        name: &str,
        kind: tar::EntryType,
        link: &str,
        data: &[u8],
    ) {
        let mut h = header(kind, data.len() as u64, 0o644);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    #[test]
    fn sanitize_paths() {
        assert_eq!(sanitize(Path::new("./a/b")).unwrap(), Path::new("a/b"));
        assert_eq!(
            sanitize(Path::new("/etc/passwd")).unwrap(),
            Path::new("etc/passwd")
        );
        assert_eq!(sanitize(Path::new("a/../b")).unwrap(), Path::new("b"));
        assert!(sanitize(Path::new("../evil")).is_err());
        assert!(sanitize(Path::new("a/../../evil")).is_err());
    }

    #[test]
    fn dotdot_entry_is_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        raw_entry(&mut b, "../evil", tar::EntryType::Regular, "", b"pwned");
        let data = b.into_inner().unwrap();
        let dest = tmp.path().join("snap");
        let err = unpack_tar(&data[..], &dest).unwrap_err();
        assert!(err.contains("escapes"), "{err}");
        assert!(!tmp.path().join("evil").exists());
    }

    #[test]
    fn write_through_absolute_symlink_is_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        raw_entry(
            &mut b,
            "link",
            tar::EntryType::Symlink,
            outside.to_str().unwrap(),
            b"",
        );
        raw_entry(&mut b, "link/evil", tar::EntryType::Regular, "", b"pwned");
        let data = b.into_inner().unwrap();
        let dest = tmp.path().join("snap");
        let err = unpack_tar(&data[..], &dest).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(!outside.join("evil").exists());
        // A hard link may not point outside either.
        let mut b = tar::Builder::new(Vec::new());
        raw_entry(&mut b, "h", tar::EntryType::Link, "../../etc/passwd", b"");
        let data = b.into_inner().unwrap();
        assert!(unpack_tar(&data[..], &tmp.path().join("snap2")).is_err());
    }

    #[test]
    fn whiteout_of_dot_or_dotdot_is_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        for (i, name) in ["a/.wh..", "a/.wh...", "a/.wh."].iter().enumerate() {
            let mut b = tar::Builder::new(Vec::new());
            raw_entry(&mut b, "a/keep", tar::EntryType::Regular, "", b"k");
            raw_entry(&mut b, name, tar::EntryType::Regular, "", b"");
            let data = b.into_inner().unwrap();
            let dest = tmp.path().join(format!("snap{i}"));
            let err = unpack_tar(&data[..], &dest).unwrap_err();
            assert!(err.contains("invalid name"), "{name}: {err}");
            assert!(dest.join("a/keep").is_file(), "{name} deleted a sibling");
        }
    }

    #[test]
    fn whiteouts_become_overlay_form() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        raw_entry(&mut b, "d/", tar::EntryType::Directory, "", b"");
        raw_entry(&mut b, "d/.wh.gone", tar::EntryType::Regular, "", b"");
        raw_entry(&mut b, "o/.wh..wh..opq", tar::EntryType::Regular, "", b"");
        raw_entry(&mut b, "o/new", tar::EntryType::Regular, "", b"n");
        let data = b.into_inner().unwrap();
        let dest = tmp.path().join("snap");
        unpack_tar(&data[..], &dest).unwrap();
        let m = fs::symlink_metadata(dest.join("d/gone")).unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), 0);
        assert!(!dest.join("d/.wh.gone").exists());
        assert!(!dest.join("o/.wh..wh..opq").exists());
        assert_eq!(fs::read(dest.join("o/new")).unwrap(), b"n");
        let mut buf = [0u8; 8];
        let p = CString::new(dest.join("o").as_os_str().as_bytes()).unwrap();
        let n = CString::new(OPAQUE_XATTR).unwrap();
        let len =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(&buf[..len as usize], b"y");
    }
}
