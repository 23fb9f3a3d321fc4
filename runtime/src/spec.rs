//! The OCI runtime spec of a container, from its Kubernetes spec and its image's config.
//!
//! The spec is written as OCI JSON data and parsed into `oci_spec::runtime::Spec`, so what a
//! container gets reads the same here as in `config.json`.

use crate::cgroup::ContainerResources;
use crate::oci_spec::image::ImageConfiguration;
use crate::oci_spec::runtime::{LinuxSeccomp, Spec};
use k8s_openapi::api::core::v1::{Container, PodSecurityContext, SeccompProfile, SecurityContext};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The container's configuration cannot be turned into a process (kubelet:
    /// CreateContainerConfigError).
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Resources(#[from] crate::cgroup::Error),
    #[error("generated spec is invalid: {0}")]
    Invalid(#[from] serde_json::Error),
    /// A Localhost seccomp profile that cannot be read (kubelet: CreateContainerError).
    #[error("cannot load seccomp profile {path:?}: {source}")]
    Seccomp {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The capabilities containerd gives a container unless told otherwise.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Syscalls the RuntimeDefault profile refuses with EPERM: those a container without
/// CAP_SYS_ADMIN and friends never legitimately needs and that widen kernel attack surface.
const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "sysfs",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// Where a container's namespace of one kind comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Ns {
    /// The host's (hostNetwork, hostIPC, hostPID).
    Host,
    /// A fresh one for this container alone.
    #[default]
    New,
    /// Join the one bound at this path (the pod sandbox's).
    Path(PathBuf),
}

#[derive(Debug, Clone, Default)]
pub struct Namespaces {
    pub network: Ns,
    pub ipc: Ns,
    pub uts: Ns,
    pub pid: Ns,
}

/// A mount handed in by the caller (volumes, /etc/hosts, service account tokens, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: PathBuf,
    pub destination: PathBuf,
    pub read_only: bool,
    pub propagation: Propagation,
}

/// A volumeMount's mountPropagation, as the CRI passes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Propagation {
    /// None: nothing propagates either way (`rprivate`).
    #[default]
    Private,
    /// Mounts made on the host below the source appear in the container (`rslave`).
    HostToContainer,
    /// Mounts propagate both ways (`rshared`; the container's root becomes shared too).
    Bidirectional,
}

/// Everything besides the Kubernetes container that decides its OCI spec.
pub struct SpecInput<'a> {
    pub container: &'a Container,
    pub pod_security: Option<&'a PodSecurityContext>,
    pub image: &'a ImageConfiguration,
    /// The mounted rootfs: user and group names are looked up in its /etc/passwd and /etc/group.
    pub rootfs: &'a Path,
    /// Environment resolved by the caller (valueFrom, envFrom); `None` takes `container.env` values.
    pub env: Option<Vec<(String, String)>>,
    pub mounts: Vec<Mount>,
    pub namespaces: Namespaces,
    /// HOSTNAME in the environment; also set as hostname when the UTS namespace is `Ns::New`.
    pub hostname: Option<String>,
    /// Relative to the cgroup root, e.g. `kubepods/burstable/pod<uid>/<id>`.
    pub cgroups_path: String,
    /// Kubelet's oom_score_adj for the pod's QoS class.
    pub oom_score_adj: Option<i32>,
    /// Use the RuntimeDefault seccomp profile when the pod does not choose one.
    pub default_seccomp: bool,
}

/// The process kubelet would run: Kubernetes `command` replaces the image Entrypoint and drops
/// its Cmd; `args` replaces Cmd.
pub fn process_args(container: &Container, image: &ImageConfiguration) -> Vec<String> {
    let cfg = image.config().as_ref();
    let entrypoint = cfg.and_then(|c| c.entrypoint().clone()).unwrap_or_default();
    let cmd = cfg.and_then(|c| c.cmd().clone()).unwrap_or_default();
    match (&container.command, &container.args) {
        (Some(command), args) if !command.is_empty() => {
            let mut v = command.clone();
            v.extend(args.clone().unwrap_or_default());
            v
        }
        (_, Some(args)) if !args.is_empty() => {
            let mut v = entrypoint;
            v.extend(args.clone());
            v
        }
        _ => {
            let mut v = entrypoint;
            v.extend(cmd);
            v
        }
    }
}

/// Image env first, then the container's (later entries win, as in kubelet), PATH defaulted.
pub fn environment(input: &SpecInput) -> Vec<String> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: String, v: String| {
        if let Some(e) = env.iter_mut().find(|(ek, _)| *ek == k) {
            e.1 = v;
        } else {
            env.push((k, v));
        }
    };
    if !input
        .image
        .config()
        .as_ref()
        .and_then(|c| c.env().as_ref())
        .is_some_and(|e| e.iter().any(|v| v.starts_with("PATH=")))
    {
        set(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    for kv in input
        .image
        .config()
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default()
    {
        let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
        set(k.to_string(), v.to_string());
    }
    if let Some(h) = &input.hostname {
        set("HOSTNAME".into(), h.clone());
    }
    match &input.env {
        Some(resolved) => resolved.iter().for_each(|(k, v)| set(k.clone(), v.clone())),
        None => {
            for e in input.container.env.iter().flatten() {
                set(e.name.clone(), e.value.clone().unwrap_or_default());
            }
        }
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// uid, gid and additional gids: securityContext first, then the image's `User`, names looked
/// up in the rootfs, as the CRI runtimes do.
pub fn resolve_user(input: &SpecInput) -> Result<(u32, u32, Vec<u32>)> {
    let sc = input.container.security_context.as_ref();
    let psc = input.pod_security;
    let image_user = input
        .image
        .config()
        .as_ref()
        .and_then(|c| c.user().clone())
        .unwrap_or_default();
    let (image_uid, image_gid) = match image_user.split_once(':') {
        Some((u, g)) => (u.to_string(), Some(g.to_string())),
        None => (image_user.clone(), None),
    };
    let passwd = std::fs::read_to_string(input.rootfs.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(input.rootfs.join("etc/group")).unwrap_or_default();
    let find = |text: &str, name: &str, col: usize| -> Option<u32> {
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > col && (f[0] == name || f[2] == name)).then(|| f[col].parse().ok())?
        })
    };
    let explicit_uid = sc
        .and_then(|s| s.run_as_user)
        .or(psc.and_then(|p| p.run_as_user));
    let (uid, user_name) = match explicit_uid {
        Some(u) => (u as u32, None),
        None if image_uid.is_empty() => (0, Some("root".to_string())),
        None => match image_uid.parse::<u32>() {
            Ok(u) => (u, None),
            Err(_) => (
                find(&passwd, &image_uid, 2).ok_or_else(|| {
                    Error::Config(format!(
                        "unable to find user {image_uid}: no matching entries in passwd file"
                    ))
                })?,
                Some(image_uid.clone()),
            ),
        },
    };
    let explicit_gid = sc
        .and_then(|s| s.run_as_group)
        .or(psc.and_then(|p| p.run_as_group));
    let gid = match (explicit_gid, &image_gid) {
        (Some(g), _) => g as u32,
        (None, Some(g)) => match g.parse::<u32>() {
            Ok(g) => g,
            Err(_) => find(&group, g, 2).ok_or_else(|| {
                Error::Config(format!(
                    "unable to find group {g}: no matching entries in group file"
                ))
            })?,
        },
        (None, None) => find(&passwd, &uid.to_string(), 3).unwrap_or(0),
    };
    let non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or(psc.and_then(|p| p.run_as_non_root));
    if non_root == Some(true) && uid == 0 {
        return Err(Error::Config(
            "container has runAsNonRoot and image will run as root".into(),
        ));
    }
    let mut extra: Vec<u32> = Vec::new();
    if let Some(name) = user_name.or_else(|| {
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
        })
    }) {
        for l in group.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() > 3 && f[3].split(',').any(|m| m == name) {
                extra.extend(f[2].parse::<u32>().ok());
            }
        }
    }
    if let Some(p) = psc {
        extra.extend(p.supplemental_groups.iter().flatten().map(|g| *g as u32));
        extra.extend(p.fs_group.map(|g| g as u32));
    }
    extra.retain(|g| *g != gid);
    extra.sort_unstable();
    extra.dedup();
    Ok((uid, gid, extra))
}

/// The capability set after `add` and `drop` (names with or without `CAP_`, `ALL` allowed).
pub fn capabilities(sc: Option<&SecurityContext>) -> Result<Vec<String>> {
    let norm = |c: &str| {
        let up = c.to_ascii_uppercase();
        if up == "ALL" || up.starts_with("CAP_") {
            up
        } else {
            format!("CAP_{up}")
        }
    };
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    let add: Vec<String> = caps
        .and_then(|c| c.add.clone())
        .unwrap_or_default()
        .iter()
        .map(|c| norm(c))
        .collect();
    let drop: Vec<String> = caps
        .and_then(|c| c.drop.clone())
        .unwrap_or_default()
        .iter()
        .map(|c| norm(c))
        .collect();
    let all: Vec<String> = caps::all().iter().map(|c| c.to_string()).collect();
    for c in add.iter().chain(drop.iter()) {
        if c != "ALL" && c.parse::<caps::Capability>().is_err() {
            return Err(Error::Config(format!("unknown capability {c}")));
        }
    }
    let mut set: Vec<String> = if add.iter().any(|c| c == "ALL") {
        all
    } else {
        DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect()
    };
    if drop.iter().any(|c| c == "ALL") {
        set.clear();
    }
    for c in add.iter().filter(|c| *c != "ALL") {
        if !set.contains(c) {
            set.push(c.clone());
        }
    }
    set.retain(|c| !drop.contains(c));
    set.sort();
    Ok(set)
}

/// The seccomp profile in force: the container's, else the pod's.
fn effective_seccomp<'a>(
    container: &'a Container,
    pod_security: Option<&'a PodSecurityContext>,
) -> Option<&'a SeccompProfile> {
    container
        .security_context
        .as_ref()
        .and_then(|s| s.seccomp_profile.as_ref())
        .or_else(|| pod_security.and_then(|p| p.seccomp_profile.as_ref()))
}

fn seccomp_profile(input: &SpecInput) -> Option<Value> {
    let on = match effective_seccomp(input.container, input.pod_security).map(|p| p.type_.as_str())
    {
        Some("RuntimeDefault") => true,
        // A Localhost profile is read from the node by `localhost_seccomp`.
        Some("Unconfined" | "Localhost") => false,
        _ => input.default_seccomp,
    };
    if !on {
        return None;
    }
    Some(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM}],
    }))
}

/// The profile of a `Localhost` seccomp profile, read from `<dir>/<localhostProfile>` (kubelet's
/// `<root-dir>/seccomp`); `None` for every other kind and for privileged containers.
pub fn localhost_seccomp(
    container: &Container,
    pod_security: Option<&PodSecurityContext>,
    dir: &Path,
) -> Result<Option<LinuxSeccomp>> {
    let privileged = container
        .security_context
        .as_ref()
        .and_then(|s| s.privileged)
        .unwrap_or(false);
    let Some(p) = effective_seccomp(container, pod_security).filter(|p| p.type_ == "Localhost")
    else {
        return Ok(None);
    };
    if privileged {
        return Ok(None);
    }
    let name = p.localhost_profile.as_deref().unwrap_or_default();
    let rel = Path::new(name);
    if name.is_empty()
        || rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(Error::Config(format!(
            "invalid localhostProfile {name:?}: must be a path below {}",
            dir.display()
        )));
    }
    let path = dir.join(rel);
    let data = std::fs::read(&path).map_err(|source| Error::Seccomp {
        path: path.clone(),
        source: source.into(),
    })?;
    let profile = serde_json::from_slice(&data).map_err(|source| Error::Seccomp {
        path,
        source: source.into(),
    })?;
    Ok(Some(profile))
}

/// Every capability this process has (containerd's "all current capabilities"): a runtime that
/// is itself confined cannot hand out more.
fn privileged_capabilities() -> Vec<String> {
    let mut v: Vec<String> = caps::read(None, caps::CapSet::Effective)
        .map(|set| set.iter().map(|c| c.to_string()).collect())
        .unwrap_or_else(|_| caps::all().iter().map(|c| c.to_string()).collect());
    v.sort();
    v
}

/// The host's device nodes, which a privileged container gets (as containerd gives them).
fn host_devices() -> Vec<Value> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::from("/dev")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = e.path();
            let Ok(md) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let ft = md.file_type();
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            if ft.is_dir() {
                // The container gets its own of these.
                let own = ["pts", "shm", "mqueue", "fd"];
                if !own.iter().any(|o| path == Path::new("/dev").join(o)) {
                    dirs.push(path);
                }
                continue;
            }
            let kind = if ft.is_char_device() {
                "c"
            } else if ft.is_block_device() {
                "b"
            } else {
                continue;
            };
            if path == Path::new("/dev/console") || path == Path::new("/dev/ptmx") {
                continue;
            }
            let rdev = md.rdev();
            out.push(json!({
                "path": path,
                "type": kind,
                "major": libc::major(rdev),
                "minor": libc::minor(rdev),
                "fileMode": md.mode() & 0o777,
                "uid": md.uid(),
                "gid": md.gid(),
            }));
        }
    }
    out
}

fn default_mounts(privileged: bool, host_network: bool) -> Vec<Value> {
    let sys_opts = if privileged {
        json!(["nosuid", "noexec", "nodev"])
    } else {
        json!(["nosuid", "noexec", "nodev", "ro"])
    };
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
    ];
    // sysfs belongs to a network namespace: a host-network container gets the host's, bound.
    if host_network {
        mounts.push(json!({"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}));
    } else {
        mounts.push(
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_opts}),
        );
        mounts.push(json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}));
    }
    mounts
}

/// Builds the container's OCI spec.
pub fn generate(input: &SpecInput) -> Result<Spec> {
    let c = input.container;
    let sc = c.security_context.as_ref();
    let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);
    let args = process_args(c, input.image);
    if args.is_empty() {
        return Err(Error::Config("no command specified".into()));
    }
    let (uid, gid, additional) = resolve_user(input)?;
    let caps = if privileged {
        privileged_capabilities()
    } else {
        capabilities(sc)?
    };
    let cwd = c
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| {
            input
                .image
                .config()
                .as_ref()
                .and_then(|cfg| cfg.working_dir().clone())
        })
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    let no_new_privs = sc.and_then(|s| s.allow_privilege_escalation) == Some(false);
    let res = ContainerResources::from_container(c)?;

    let mut process = json!({
        "terminal": c.tty.unwrap_or(false),
        "user": {"uid": uid, "gid": gid, "additionalGids": additional},
        "args": args,
        "env": environment(input),
        "cwd": cwd,
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
    });
    // libcontainer loads seccomp before dropping capabilities only when this field is absent.
    if no_new_privs {
        process["noNewPrivileges"] = json!(true);
    }
    if let Some(adj) = input.oom_score_adj {
        process["oomScoreAdj"] = json!(adj);
    }

    let mut namespaces = vec![json!({"type": "mount"}), json!({"type": "cgroup"})];
    let ns = |t: &str, n: &Ns| match n {
        Ns::Host => None,
        Ns::New => Some(json!({"type": t})),
        Ns::Path(path) => Some(json!({"type": t, "path": path})),
    };
    namespaces.extend(ns("pid", &input.namespaces.pid));
    namespaces.extend(ns("network", &input.namespaces.network));
    namespaces.extend(ns("ipc", &input.namespaces.ipc));
    namespaces.extend(ns("uts", &input.namespaces.uts));

    let mut resources = json!({
        "cpu": {"shares": res.cpu_shares()},
        "devices": if privileged {
            json!([{"allow": true, "access": "rwm"}])
        } else {
            json!([
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 5, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 7, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 8, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 9, "access": "rwm"},
                {"allow": true, "type": "c", "major": 5, "minor": 0, "access": "rwm"},
                {"allow": true, "type": "c", "major": 5, "minor": 2, "access": "rwm"},
                {"allow": true, "type": "c", "major": 136, "access": "rwm"},
            ])
        },
    });
    if let Some(q) = res.cpu_quota_us() {
        resources["cpu"]["quota"] = json!(q);
        resources["cpu"]["period"] = json!(crate::cgroup::CFS_PERIOD_US);
    }
    if let Some(m) = res.memory_limit {
        resources["memory"] = json!({"limit": m});
    }

    let mut mounts = default_mounts(privileged, input.namespaces.network == Ns::Host);
    for m in &input.mounts {
        let mut opts = vec![
            "rbind",
            match m.propagation {
                Propagation::Private => "rprivate",
                Propagation::HostToContainer => "rslave",
                Propagation::Bidirectional => "rshared",
            },
        ];
        if m.read_only {
            opts.push("ro");
        }
        mounts.push(json!({"destination": m.destination, "type": "bind", "source": m.source, "options": opts}));
    }

    let mut linux = json!({
        "namespaces": namespaces,
        "resources": resources,
        "cgroupsPath": format!("/{}", input.cgroups_path.trim_start_matches('/')),
    });
    let sysctls: serde_json::Map<String, Value> = input
        .pod_security
        .and_then(|p| p.sysctls.as_ref())
        .into_iter()
        .flatten()
        .map(|s| (s.name.replace('/', "."), json!(s.value)))
        .collect();
    if !sysctls.is_empty() {
        linux["sysctl"] = Value::Object(sysctls);
    }
    // Bidirectional mounts stay peers of the host's only if the container's root is shared
    // (libcontainer's default makes it a slave, which HostToContainer needs).
    if input
        .mounts
        .iter()
        .any(|m| m.propagation == Propagation::Bidirectional)
    {
        linux["rootfsPropagation"] = json!("shared");
    }
    if privileged {
        linux["devices"] = json!(host_devices());
    } else {
        linux["maskedPaths"] = json!(MASKED_PATHS);
        linux["readonlyPaths"] = json!(READONLY_PATHS);
        if let Some(profile) = seccomp_profile(input) {
            linux["seccomp"] = profile;
        }
    }

    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": {
            "path": input.rootfs,
            "readonly": sc.and_then(|s| s.read_only_root_filesystem).unwrap_or(false),
        },
        "mounts": mounts,
        "linux": linux,
    });
    if input.namespaces.uts == Ns::New {
        if let Some(h) = &input.hostname {
            spec["hostname"] = json!(h);
        }
    }
    Ok(serde_json::from_value(spec)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Capabilities;

    fn image(json: &str) -> ImageConfiguration {
        serde_json::from_str(json).unwrap()
    }

    fn container(command: Option<&[&str]>, args: Option<&[&str]>) -> Container {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        Container {
            name: "c".into(),
            command: command.map(v),
            args: args.map(v),
            ..Default::default()
        }
    }

    #[test]
    fn entrypoint_and_cmd_rules() {
        let img = image(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{"Entrypoint":["ep"],"Cmd":["cmd"]}}"#,
        );
        assert_eq!(process_args(&container(None, None), &img), ["ep", "cmd"]);
        assert_eq!(
            process_args(&container(None, Some(&["a"])), &img),
            ["ep", "a"]
        );
        assert_eq!(process_args(&container(Some(&["x"]), None), &img), ["x"]);
        assert_eq!(
            process_args(&container(Some(&["x"]), Some(&["y"])), &img),
            ["x", "y"]
        );
    }

    #[test]
    fn capability_add_drop() {
        let sc = |add: &[&str], drop: &[&str]| SecurityContext {
            capabilities: Some(Capabilities {
                add: Some(add.iter().map(|s| s.to_string()).collect()),
                drop: Some(drop.iter().map(|s| s.to_string()).collect()),
            }),
            ..Default::default()
        };
        let c = capabilities(Some(&sc(&["NET_ADMIN"], &["KILL"]))).unwrap();
        assert!(c.contains(&"CAP_NET_ADMIN".to_string()) && !c.contains(&"CAP_KILL".to_string()));
        assert_eq!(
            capabilities(Some(&sc(&["NET_BIND_SERVICE"], &["ALL"]))).unwrap(),
            ["CAP_NET_BIND_SERVICE"]
        );
        assert!(matches!(
            capabilities(Some(&sc(&["BOGUS"], &[]))),
            Err(Error::Config(_))
        ));
        assert_eq!(
            capabilities(None).unwrap().len(),
            DEFAULT_CAPABILITIES.len()
        );
    }

    #[test]
    fn user_from_image_and_context() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\napp:x:1000:1000::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "app:x:1000:\nextra:x:2000:app\n",
        )
        .unwrap();
        let img = image(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{"User":"app"}}"#,
        );
        let c = container(Some(&["sh"]), None);
        let input = SpecInput {
            container: &c,
            pod_security: None,
            image: &img,
            rootfs: dir.path(),
            env: None,
            mounts: vec![],
            namespaces: Namespaces::default(),
            hostname: None,
            cgroups_path: "x".into(),
            oom_score_adj: None,
            default_seccomp: true,
        };
        assert_eq!(resolve_user(&input).unwrap(), (1000, 1000, vec![2000]));
        let psc = PodSecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(true),
            ..Default::default()
        };
        let input = SpecInput {
            pod_security: Some(&psc),
            ..input
        };
        assert!(matches!(resolve_user(&input), Err(Error::Config(_))));
        let spec = generate(&SpecInput {
            pod_security: None,
            ..input
        })
        .unwrap();
        assert!(spec.linux().as_ref().unwrap().seccomp().is_some());
    }
}
