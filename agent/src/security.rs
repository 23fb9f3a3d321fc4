//! The security checks kubelet makes before it runs a pod or a container: runAsNonRoot against
//! the effective user, the allowed sysctls, and the group ownership fsGroup gives volumes.

use k8s_openapi::api::core::v1::{Container, Pod};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Sysctls kubelet allows without `--allowed-unsafe-sysctls` (its safe set), by name.
pub const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

/// kubelet's admission of a pod's sysctls: the message of its SysctlForbidden rejection.
pub fn forbidden_sysctl(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let sysctls = spec.security_context.as_ref()?.sysctls.as_ref()?;
    for s in sysctls {
        let name = s.name.replace('/', ".");
        if !SAFE_SYSCTLS.contains(&name.as_str()) {
            return Some(format!(
                "Pod forbidden sysctl: {:?} not allowlisted",
                s.name
            ));
        }
        if name.starts_with("net.") && spec.host_network == Some(true) {
            return Some(format!(
                "Pod forbidden sysctl: {:?} not allowed with host net enabled",
                s.name
            ));
        }
        if name.starts_with("kernel.shm") && spec.host_ipc == Some(true) {
            return Some(format!(
                "Pod forbidden sysctl: {:?} not allowed with host ipc enabled",
                s.name
            ));
        }
    }
    None
}

/// The image's user: a uid when numeric, else its name (the group part dropped).
fn image_user(user: &str) -> (Option<i64>, String) {
    let u = user.split(':').next().unwrap_or("");
    match u.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        // No user at all is root.
        Err(_) if u.is_empty() => (Some(0), String::new()),
        Err(_) => (None, u.to_string()),
    }
}

/// A container that runAsNonRoot forbids, worded as kubelet's CreateContainerConfigError message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NonRootError {
    #[error("container's runAsUser breaks non-root policy (pod: {pod:?}, container: {container})")]
    RunAsRoot { pod: String, container: String },
    #[error("container has runAsNonRoot and image has non-numeric user ({user}), cannot verify user is non-root (pod: {pod:?}, container: {container})")]
    NonNumericUser {
        user: String,
        pod: String,
        container: String,
    },
    #[error("container has runAsNonRoot and image will run as root (pod: {pod:?}, container: {container})")]
    ImageRoot { pod: String, container: String },
    #[error("container has runAsNonRoot and image has an invalid user id ({uid}). (Must be 1-({max})): must be between 0 and 2147483647, inclusive (pod: {pod:?}, container: {container})", max = i32::MAX)]
    InvalidUid {
        uid: i64,
        pod: String,
        container: String,
    },
}

/// kubelet's runAsNonRoot check against the effective securityContext and the image's `User`.
pub fn verify_run_as_non_root(
    pod: &Pod,
    c: &Container,
    image_user_field: &str,
) -> Result<(), NonRootError> {
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = c.security_context.as_ref();
    let non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or(psc.and_then(|p| p.run_as_non_root));
    if non_root != Some(true) {
        return Ok(());
    }
    let pod = crate::status::pod_ref(pod);
    let container = c.name.clone();
    if let Some(uid) = sc
        .and_then(|s| s.run_as_user)
        .or(psc.and_then(|p| p.run_as_user))
    {
        if uid == 0 {
            return Err(NonRootError::RunAsRoot { pod, container });
        }
        return Ok(());
    }
    match image_user(image_user_field) {
        (None, user) => Err(NonRootError::NonNumericUser {
            user,
            pod,
            container,
        }),
        (Some(0), _) => Err(NonRootError::ImageRoot { pod, container }),
        (Some(uid), _) if uid < 0 || uid > i32::MAX as i64 => Err(NonRootError::InvalidUid {
            uid,
            pod,
            container,
        }),
        _ => Ok(()),
    }
}

/// The pod's fsGroup, the group its volumes are handed to.
pub fn fs_group(pod: &Pod) -> Option<u32> {
    let g = pod.spec.as_ref()?.security_context.as_ref()?.fs_group?;
    u32::try_from(g).ok()
}

/// Whether a volume root already looks handed to `gid` (kubelet's fsGroupChangePolicy
/// OnRootMismatch test): group `gid`, the group bits kubelet sets, set-group-id.
pub fn root_matches(dir: &Path, gid: u32, read_only: bool) -> bool {
    let Ok(md) = std::fs::metadata(dir) else {
        return false;
    };
    let want = (if read_only { 0o440 } else { 0o660 }) | 0o110;
    md.is_dir() && md.gid() == gid && md.mode() & want == want && md.mode() & 0o2000 != 0
}

/// The pod's fsGroupChangePolicy (Always when unset).
pub fn fs_group_change_policy(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()?
        .security_context
        .as_ref()?
        .fs_group_change_policy
        .clone()
}

/// Applies fsGroup `gid` to a volume directory (blocking): every time, or with
/// fsGroupChangePolicy OnRootMismatch only when the root does not look done already.
pub fn apply_fs_group(
    dir: &Path,
    gid: Option<u32>,
    policy: Option<&str>,
    read_only: bool,
) -> std::io::Result<()> {
    let Some(gid) = gid else {
        return Ok(());
    };
    if policy == Some("OnRootMismatch") && root_matches(dir, gid, read_only) {
        return Ok(());
    }
    set_volume_ownership(dir, gid, read_only)
}

/// Gives a volume's files to `gid` as kubelet's SetVolumeOwnership does: group `gid`, group
/// read-write (read-only with `read_only`), set-group-id directories so new files inherit the
/// group (blocking). Symlinks are left alone.
pub fn set_volume_ownership(dir: &Path, gid: u32, read_only: bool) -> std::io::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p)?;
        if md.file_type().is_symlink() {
            continue;
        }
        std::os::unix::fs::lchown(&p, None, Some(gid))?;
        let mut mode = md.mode() & 0o7777;
        mode |= if read_only { 0o440 } else { 0o660 };
        if md.is_dir() {
            mode |= 0o2000 | 0o110;
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSecurityContext, PodSpec, SecurityContext, Sysctl};

    fn pod(psc: PodSecurityContext) -> Pod {
        Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some("u1".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                security_context: Some(psc),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn run_as_non_root_messages() {
        let p = pod(PodSecurityContext {
            run_as_non_root: Some(true),
            ..Default::default()
        });
        let c = Container {
            name: "c".into(),
            ..Default::default()
        };
        assert_eq!(
            verify_run_as_non_root(&p, &c, "").unwrap_err().to_string(),
            "container has runAsNonRoot and image will run as root (pod: \"p_ns(u1)\", container: c)"
        );
        assert!(verify_run_as_non_root(&p, &c, "nobody")
            .unwrap_err()
            .to_string()
            .contains("image has non-numeric user (nobody)"));
        assert!(verify_run_as_non_root(&p, &c, "1000:1000").is_ok());
        let root = Container {
            security_context: Some(SecurityContext {
                run_as_user: Some(0),
                ..Default::default()
            }),
            ..c.clone()
        };
        assert!(verify_run_as_non_root(&p, &root, "1000")
            .unwrap_err()
            .to_string()
            .starts_with("container's runAsUser breaks non-root policy"));
        let user = Container {
            security_context: Some(SecurityContext {
                run_as_user: Some(1000),
                ..Default::default()
            }),
            ..c.clone()
        };
        assert!(verify_run_as_non_root(&p, &user, "").is_ok());
        assert!(verify_run_as_non_root(&pod(Default::default()), &c, "").is_ok());
    }

    #[test]
    fn safe_sysctls_only() {
        let with = |name: &str| {
            pod(PodSecurityContext {
                sysctls: Some(vec![Sysctl {
                    name: name.into(),
                    value: "1".into(),
                }]),
                ..Default::default()
            })
        };
        assert_eq!(forbidden_sysctl(&with("net.ipv4.tcp_syncookies")), None);
        assert_eq!(
            forbidden_sysctl(&with("kernel.msgmax")).as_deref(),
            Some("Pod forbidden sysctl: \"kernel.msgmax\" not allowlisted")
        );
    }

    #[test]
    fn volume_ownership() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/f"), "x").unwrap();
        std::fs::set_permissions(d.path().join("sub/f"), PermissionsExt::from_mode(0o600)).unwrap();
        set_volume_ownership(d.path(), 4321, false).unwrap();
        let f = std::fs::metadata(d.path().join("sub/f")).unwrap();
        assert_eq!((f.gid(), f.mode() & 0o777), (4321, 0o660));
        let s = std::fs::metadata(d.path().join("sub")).unwrap();
        assert_eq!(s.mode() & 0o2000, 0o2000);
        assert!(root_matches(d.path(), 4321, false));
        assert!(!root_matches(d.path(), 4322, false));
    }

    #[test]
    fn on_root_mismatch_skips_a_root_already_handed_over() {
        let d = tempfile::tempdir().unwrap();
        let on_mismatch = Some("OnRootMismatch");
        apply_fs_group(d.path(), Some(4321), on_mismatch, false).unwrap();
        // A file added later is left as it is while the root matches.
        std::fs::write(d.path().join("late"), "x").unwrap();
        std::os::unix::fs::lchown(d.path().join("late"), None, Some(0)).unwrap();
        apply_fs_group(d.path(), Some(4321), on_mismatch, false).unwrap();
        assert_eq!(std::fs::metadata(d.path().join("late")).unwrap().gid(), 0);
        apply_fs_group(d.path(), Some(4321), None, false).unwrap();
        assert_eq!(
            std::fs::metadata(d.path().join("late")).unwrap().gid(),
            4321
        );
    }
}
