//! hostPath volumes: a path of the node, checked against the volume's `type` (and made for
//! DirectoryOrCreate and FileOrCreate), with kubelet's messages.

use super::VolumeError;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

fn fail(path: &str, what: &'static str) -> VolumeError {
    VolumeError::HostPathType {
        path: path.to_string(),
        what,
    }
}

/// Checks (and for the `...OrCreate` types makes) `path` as `type_` says (blocking).
pub fn check(path: &str, type_: Option<&str>) -> Result<(), VolumeError> {
    let meta = || std::fs::metadata(path).ok();
    let io = |what: &str| {
        let what = format!("{what} {path}");
        move |source| VolumeError::Io { what, source }
    };
    match type_.unwrap_or("") {
        "" => Ok(()),
        "DirectoryOrCreate" if meta().is_none() => {
            std::fs::create_dir_all(path).map_err(io("create"))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
                .map_err(io("chmod"))
        }
        "DirectoryOrCreate" | "Directory" => match meta() {
            Some(m) if m.is_dir() => Ok(()),
            _ => Err(fail(path, "a directory")),
        },
        "FileOrCreate" if meta().is_none() => {
            if let Some(parent) = Path::new(path).parent() {
                std::fs::create_dir_all(parent).map_err(io("create the directory of"))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io("create"))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
                .map_err(io("chmod"))
        }
        "FileOrCreate" | "File" => match meta() {
            Some(m) if m.is_file() => Ok(()),
            _ => Err(fail(path, "a file")),
        },
        "Socket" => match meta() {
            Some(m) if m.file_type().is_socket() => Ok(()),
            _ => Err(fail(path, "a socket file")),
        },
        "CharDevice" => match meta() {
            Some(m) if m.file_type().is_char_device() => Ok(()),
            _ => Err(fail(path, "a character device")),
        },
        "BlockDevice" => match meta() {
            Some(m) if m.file_type().is_block_device() => Ok(()),
            _ => Err(fail(path, "a block device")),
        },
        other => Err(VolumeError::HostPathTypeInvalid(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_checks_with_kubelet_messages() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        let file = format!("{d}/f");
        std::fs::write(&file, "").unwrap();
        assert!(check(&d, Some("Directory")).is_ok());
        assert_eq!(
            check(&file, Some("Directory")).unwrap_err().to_string(),
            format!("hostPath type check failed: {file} is not a directory")
        );
        assert_eq!(
            check(&d, Some("File")).unwrap_err().to_string(),
            format!("hostPath type check failed: {d} is not a file")
        );
        assert_eq!(
            check(&d, Some("Socket")).unwrap_err().to_string(),
            format!("hostPath type check failed: {d} is not a socket file")
        );
        assert!(check("/dev/null", Some("CharDevice")).is_ok());
        assert_eq!(
            check(&d, Some("Bogus")).unwrap_err().to_string(),
            "Bogus is an invalid volume type"
        );
        let made = format!("{d}/new/dir");
        check(&made, Some("DirectoryOrCreate")).unwrap();
        assert!(Path::new(&made).is_dir());
        let made = format!("{d}/other/file");
        check(&made, Some("FileOrCreate")).unwrap();
        assert!(Path::new(&made).is_file());
        assert!(check(&made, Some("DirectoryOrCreate")).is_err());
        assert!(check(&format!("{d}/missing"), None).is_ok());
    }
}
