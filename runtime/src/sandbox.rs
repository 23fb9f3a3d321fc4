//! Pod sandboxes: the network, IPC and UTS namespaces a pod's containers share, bound to files so
//! they outlive every process, plus the pod's /etc/hosts, /etc/hostname, /etc/resolv.conf and
//! /dev/shm.

use crate::spec::{Mount, Namespaces, Ns};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sandbox {id}: {what}: {source}")]
    Sys {
        id: String,
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("sandbox {id}: {path}: {source}")]
    Io {
        id: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid sandbox id {0:?}")]
    InvalidId(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    pub id: String,
    pub hostname: String,
    pub host_network: bool,
    pub host_ipc: bool,
    /// Containers see the host's processes (hostPID).
    pub host_pid: bool,
    /// shareProcessNamespace: the `oxlet-shim` whose `pause` holds one PID namespace for all
    /// containers of the pod; `None` gives each container its own.
    pub pid_holder: Option<PathBuf>,
    /// Content of the pod's /etc/resolv.conf; `None` copies the host's (dnsPolicy Default).
    pub resolv_conf: Option<String>,
    /// Extra /etc/hosts lines (hostAliases), `IP name...`.
    pub host_aliases: Vec<String>,
}

/// A created sandbox. Everything it owns lives under `dir`.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    pub host_network: bool,
    pub host_ipc: bool,
    pub host_pid: bool,
    /// The pod's containers share one PID namespace, bound at `ns/pid`.
    pub shared_pid: bool,
}

impl Sandbox {
    /// The sandbox of `id` under `root`, whether or not it exists.
    pub fn at(root: &Path, id: &str) -> Result<Self> {
        valid_id(id)?;
        let dir = root.join(id);
        let host_network = !dir.join("ns/net").exists();
        let host_ipc = !dir.join("ns/ipc").exists();
        let host_pid = dir.join("host-pid").exists();
        let shared_pid = dir.join("ns/pid").exists();
        Ok(Self {
            id: id.to_string(),
            dir,
            host_network,
            host_ipc,
            host_pid,
            shared_pid,
        })
    }

    /// The path of the pod network namespace (CNI_NETNS), `None` for hostNetwork pods.
    pub fn netns(&self) -> Option<PathBuf> {
        (!self.host_network).then(|| self.dir.join("ns/net"))
    }

    pub fn namespaces(&self) -> Namespaces {
        let ns = |host: bool, name: &str| {
            if host {
                Ns::Host
            } else {
                Ns::Path(self.dir.join("ns").join(name))
            }
        };
        Namespaces {
            network: ns(self.host_network, "net"),
            ipc: ns(self.host_ipc, "ipc"),
            uts: if self.host_network {
                Ns::Host
            } else {
                Ns::Path(self.dir.join("ns/uts"))
            },
            pid: if self.host_pid {
                Ns::Host
            } else if self.shared_pid {
                Ns::Path(self.dir.join("ns/pid"))
            } else {
                Ns::New
            },
        }
    }

    /// Mounts every container of the pod gets: the pod's name files and shared /dev/shm.
    pub fn mounts(&self) -> Vec<Mount> {
        let m = |src: &str, dst: &str, ro: bool| Mount {
            source: self.dir.join(src),
            destination: PathBuf::from(dst),
            read_only: ro,
            propagation: Default::default(),
        };
        let mut v = vec![
            m("hosts", "/etc/hosts", false),
            m("hostname", "/etc/hostname", false),
            m("resolv.conf", "/etc/resolv.conf", false),
        ];
        if !self.host_ipc {
            v.push(m("shm", "/dev/shm", false));
        }
        v
    }

    /// Rewrites /etc/hosts with the pod IP once the network is set up, as kubelet does.
    pub fn write_hosts(
        &self,
        hostname: &str,
        pod_ip: Option<&str>,
        aliases: &[String],
    ) -> Result<()> {
        let mut hosts = String::from(
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
             fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
        );
        if let Some(ip) = pod_ip {
            hosts.push_str(&format!("{ip}\t{hostname}\n"));
        }
        for a in aliases {
            hosts.push_str(a);
            hosts.push('\n');
        }
        self.write("hosts", hosts.as_bytes())
    }

    fn write(&self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, data)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|source| Error::Io {
                id: self.id.clone(),
                path,
                source,
            })
    }
}

fn valid_id(id: &str) -> Result<()> {
    crate::container::valid_id(id).map_err(|_| Error::InvalidId(id.to_string()))
}

/// Creates the sandbox, or returns it if it already exists whole. On failure nothing is left.
pub fn create(root: &Path, cfg: &SandboxConfig) -> Result<Sandbox> {
    valid_id(&cfg.id)?;
    let dir = root.join(&cfg.id);
    if dir.join("ready").exists() {
        return Sandbox::at(root, &cfg.id);
    }
    // A half-made sandbox of a killed earlier attempt is removed first.
    remove(root, &cfg.id)?;
    let sb = Sandbox {
        id: cfg.id.clone(),
        dir: dir.clone(),
        host_network: cfg.host_network,
        host_ipc: cfg.host_ipc,
        host_pid: cfg.host_pid,
        shared_pid: cfg.pid_holder.is_some() && !cfg.host_pid,
    };
    match build(&sb, cfg) {
        Ok(()) => Ok(sb),
        Err(e) => {
            if let Err(cleanup) = remove(root, &cfg.id) {
                tracing::warn!(sandbox = %cfg.id, error = %cleanup, "cleanup after failed create");
            }
            Err(e)
        }
    }
}

fn build(sb: &Sandbox, cfg: &SandboxConfig) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        let id = sb.id.clone();
        move |source| Error::Io { id, path, source }
    };
    let ns_dir = sb.dir.join("ns");
    std::fs::create_dir_all(&ns_dir).map_err(io(&ns_dir))?;
    let mut kinds = Vec::new();
    if !cfg.host_network {
        kinds.push((CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWUTS, "net"));
        kinds.push((CloneFlags::empty(), "uts"));
    }
    if !cfg.host_ipc {
        kinds.push((CloneFlags::CLONE_NEWIPC, "ipc"));
    }
    if !kinds.is_empty() {
        for (_, name) in &kinds {
            let p = ns_dir.join(name);
            std::fs::File::create(&p).map_err(io(&p))?;
        }
        let flags = kinds.iter().fold(CloneFlags::empty(), |a, (f, _)| a | *f);
        let names: Vec<&'static str> = kinds.iter().map(|(_, n)| *n).collect();
        let hostname = cfg.hostname.clone();
        let ns_dir2 = ns_dir.clone();
        // unshare moves only the calling thread: a throwaway thread, never a runtime worker.
        std::thread::spawn(move || -> Result<(), (String, nix::Error)> {
            unshare(flags).map_err(|e| ("unshare".to_string(), e))?;
            if flags.contains(CloneFlags::CLONE_NEWUTS) {
                nix::unistd::sethostname(&hostname).map_err(|e| ("sethostname".to_string(), e))?;
            }
            for name in names {
                let src = format!("/proc/thread-self/ns/{name}");
                mount(
                    Some(src.as_str()),
                    &ns_dir2.join(name),
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| (format!("bind {src}"), e))?;
            }
            Ok(())
        })
        .join()
        .expect("namespace thread panicked")
        .map_err(|(what, source)| Error::Sys {
            id: sb.id.clone(),
            what,
            source,
        })?;
    }
    if !cfg.host_ipc {
        let shm = sb.dir.join("shm");
        std::fs::create_dir_all(&shm).map_err(io(&shm))?;
        mount(
            Some("shm"),
            &shm,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=1777,size=65536k"),
        )
        .map_err(|source| Error::Sys {
            id: sb.id.clone(),
            what: "mount shm".into(),
            source,
        })?;
    }
    let hostname = if cfg.host_network {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    } else {
        cfg.hostname.clone()
    };
    sb.write("hostname", format!("{hostname}\n").as_bytes())?;
    sb.write_hosts(&hostname, None, &cfg.host_aliases)?;
    let resolv = match &cfg.resolv_conf {
        Some(r) => r.clone(),
        None => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    };
    sb.write("resolv.conf", resolv.as_bytes())?;
    if cfg.host_pid {
        sb.write("host-pid", b"")?;
    } else if let Some(shim) = &cfg.pid_holder {
        hold_pid_namespace(sb, shim)?;
    }
    sb.write("ready", b"")
}

/// Starts the process that is PID 1 of the pod's shared PID namespace and binds the namespace
/// to `ns/pid`; its pid is kept in `pid-holder`.
fn hold_pid_namespace(sb: &Sandbox, shim: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let sys = |what: &str| {
        let (id, what) = (sb.id.clone(), what.to_string());
        move |source| Error::Sys { id, what, source }
    };
    let mut cmd = std::process::Command::new(shim);
    cmd.arg("pause")
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: unshare is async-signal-safe; it gives the shim's children a new PID namespace.
    unsafe {
        cmd.pre_exec(|| unshare(CloneFlags::CLONE_NEWPID).map_err(std::io::Error::from));
    }
    let out = cmd.output().map_err(|source| Error::Io {
        id: sb.id.clone(),
        path: shim.to_path_buf(),
        source,
    })?;
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| sys("start pid namespace holder")(nix::Error::ESRCH))?;
    sb.write("pid-holder", pid.to_string().as_bytes())?;
    let target = sb.dir.join("ns/pid");
    std::fs::File::create(&target).map_err(|source| Error::Io {
        id: sb.id.clone(),
        path: target.clone(),
        source,
    })?;
    let src = format!("/proc/{pid}/ns/pid");
    mount(
        Some(src.as_str()),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys(&format!("bind {src}")))
}

/// Kills the PID namespace holder, if it still is the one bound at `ns/pid` (pids get reused).
fn stop_pid_holder(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Some(pid) = std::fs::read_to_string(dir.join("pid-holder"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    let bound = std::fs::metadata(dir.join("ns/pid")).map(|m| m.ino());
    let live = std::fs::metadata(format!("/proc/{pid}/ns/pid")).map(|m| m.ino());
    if matches!((bound, live), (Ok(a), Ok(b)) if a == b) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Removes a sandbox: unbinds its namespaces, unmounts /dev/shm, deletes its files.
/// Idempotent, and tolerant of a half-made sandbox.
pub fn remove(root: &Path, id: &str) -> Result<()> {
    valid_id(id)?;
    let dir = root.join(id);
    if !dir.exists() {
        return Ok(());
    }
    stop_pid_holder(&dir);
    for p in ["ns/net", "ns/ipc", "ns/uts", "ns/pid", "shm"] {
        let path = dir.join(p);
        match umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(source) => {
                return Err(Error::Sys {
                    id: id.into(),
                    what: format!("umount {p}"),
                    source,
                })
            }
        }
    }
    std::fs::remove_dir_all(&dir).map_err(|source| Error::Io {
        id: id.into(),
        path: dir,
        source,
    })
}

/// Ids of the sandboxes present under `root` (for recovery after a restart).
pub fn list(root: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    ids.sort();
    ids
}
