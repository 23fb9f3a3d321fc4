//! The runtime as the agent uses it, in CRI's terms: pod sandboxes and containers made from a
//! Kubernetes container spec and a pulled image, each call whole or undone.

use crate::container::{self, ExitInfo, LogOptions, Paths, State};
use crate::image::{self, Image};
use crate::sandbox::{self, Sandbox, SandboxConfig};
use crate::spec::{self, Mount, SpecInput};
use k8s_openapi::api::core::v1::{Container, PodSecurityContext};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Image(#[from] image::Error),
    #[error(transparent)]
    Spec(#[from] spec::Error),
    #[error(transparent)]
    Container(#[from] container::Error),
    #[error(transparent)]
    Sandbox(#[from] sandbox::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The waiting reason kubelet shows when creating a container failed this way.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Image(e) => e.reason(),
            Error::Spec(spec::Error::Config(_)) => "CreateContainerConfigError",
            _ => "CreateContainerError",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Directories of one runtime instance.
#[derive(Debug, Clone)]
pub struct Config {
    /// Persistent: images, container bundles.
    pub data_dir: PathBuf,
    /// Volatile (tmpfs): libcontainer state, sandbox namespaces.
    pub run_dir: PathBuf,
    /// The `oxlet-shim` executable.
    pub shim: PathBuf,
    pub log_max_size: u64,
    pub log_max_files: usize,
}

/// What a container is made from.
pub struct ContainerRequest<'a> {
    pub id: &'a str,
    pub sandbox: &'a Sandbox,
    pub container: &'a Container,
    pub pod_security: Option<&'a PodSecurityContext>,
    pub image: &'a Image,
    pub env: Option<Vec<(String, String)>>,
    /// Volumes; the sandbox's own mounts are added here.
    pub mounts: Vec<Mount>,
    pub hostname: String,
    /// The pod cgroup (`cgroup::ensure_pod_cgroup`).
    pub cgroup_parent: &'a str,
    pub log_path: PathBuf,
    pub oom_score_adj: Option<i32>,
}

pub struct Runtime {
    cfg: Config,
    paths: Paths,
}

impl Runtime {
    pub fn new(cfg: Config) -> Self {
        let paths = Paths {
            containers: cfg.data_dir.join("containers"),
            state_root: cfg.run_dir.join("libcontainer"),
            shim: cfg.shim.clone(),
        };
        Self { cfg, paths }
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    fn sandbox_root(&self) -> PathBuf {
        self.cfg.run_dir.join("sandboxes")
    }

    pub fn create_sandbox(&self, cfg: &SandboxConfig) -> Result<Sandbox> {
        Ok(sandbox::create(&self.sandbox_root(), cfg)?)
    }

    pub fn sandbox(&self, id: &str) -> Result<Sandbox> {
        Ok(Sandbox::at(&self.sandbox_root(), id)?)
    }

    pub fn remove_sandbox(&self, id: &str) -> Result<()> {
        Ok(sandbox::remove(&self.sandbox_root(), id)?)
    }

    pub fn list_sandboxes(&self) -> Vec<String> {
        sandbox::list(&self.sandbox_root())
    }

    /// Mounts the rootfs, writes the OCI spec and creates the container (not started). On any
    /// failure everything made so far is removed again.
    pub fn create_container(&self, req: &ContainerRequest) -> Result<()> {
        container::valid_id(req.id)?;
        let dir = self.paths.dir(req.id);
        if dir.exists() {
            return Err(container::Error::AlreadyExists(req.id.to_string()).into());
        }
        let made = self.build_container(req, &dir);
        if made.is_err() {
            self.remove_files(req.id);
        }
        made
    }

    fn build_container(&self, req: &ContainerRequest, dir: &Path) -> Result<()> {
        let rootfs = image::mount_rootfs(req.image, dir)?;
        let mut mounts = req.sandbox.mounts();
        mounts.extend(req.mounts.iter().cloned());
        let spec = spec::generate(&SpecInput {
            container: req.container,
            pod_security: req.pod_security,
            image: &req.image.config,
            rootfs: &rootfs,
            env: req.env.clone(),
            mounts,
            namespaces: req.sandbox.namespaces(),
            hostname: Some(req.hostname.clone()),
            cgroups_path: format!("{}/{}", req.cgroup_parent.trim_end_matches('/'), req.id),
            oom_score_adj: req.oom_score_adj,
            default_seccomp: false,
        })?;
        let localhost = spec::localhost_seccomp(
            req.container,
            req.pod_security,
            &self.cfg.data_dir.join("seccomp"),
        )?;
        let mut spec = spec;
        if let (Some(profile), Some(linux)) = (localhost, spec.linux_mut().as_mut()) {
            linux.set_seccomp(Some(profile));
        }
        spec.save(dir.join("config.json")).map_err(|e| Error::Io {
            what: format!("write {}/config.json: {e}", dir.display()),
            source: std::io::Error::other(e.to_string()),
        })?;
        let log = LogOptions {
            path: req.log_path.clone(),
            max_size: self.cfg.log_max_size,
            max_files: self.cfg.log_max_files,
        };
        let io = container::ProcessIo {
            stdin: req.container.stdin.unwrap_or(false),
            stdin_once: req.container.stdin_once.unwrap_or(false),
            tty: req.container.tty.unwrap_or(false),
        };
        container::create(&self.paths, req.id, &log, io)?;
        Ok(())
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        Ok(container::start(&self.paths, id)?)
    }

    pub fn stop_container(&self, id: &str, grace: Duration) -> Result<ExitInfo> {
        Ok(container::stop(&self.paths, id, grace)?)
    }

    pub fn container_state(&self, id: &str) -> Result<State> {
        Ok(container::state(&self.paths, id)?)
    }

    /// CPU and memory usage of a container, as kubelet's stats report them.
    pub fn container_usage(&self, id: &str) -> Result<crate::cgroup::Usage> {
        Ok(container::usage(&self.paths, id)?)
    }

    /// A command that runs `args` in the namespaces and cgroup of running container `id`
    /// (through `oxlet-shim exec`); the caller picks its stdio, and its exit code is the
    /// process's (128+N for signal N, 126 when the process could not be started).
    pub fn exec_command(&self, id: &str, args: &[String]) -> Result<std::process::Command> {
        match container::state(&self.paths, id)? {
            State::Running { .. } => Ok(container::exec_command(&self.paths, id, args, None)),
            _ => Err(container::Error::NotRunning(id.to_string()).into()),
        }
    }

    /// The stdin of running container `id` from its shim, and the connection whose close ends
    /// the session (see `container::attach_stdin`); `None` without stdin.
    pub fn attach_stdin(&self, id: &str) -> Result<Option<(UnixStream, OwnedFd)>> {
        Ok(container::attach_stdin(&self.paths, id)?)
    }

    /// Like `exec_command` on a terminal: the pty master arrives on the unix socket at
    /// `console_socket` (see `container::exec_tty_command`).
    pub fn exec_tty_command(
        &self,
        id: &str,
        args: &[String],
        console_socket: &Path,
    ) -> Result<std::process::Command> {
        match container::state(&self.paths, id)? {
            State::Running { .. } => Ok(container::exec_tty_command(
                &self.paths,
                id,
                args,
                console_socket,
            )),
            _ => Err(container::Error::NotRunning(id.to_string()).into()),
        }
    }

    pub fn list_containers(&self) -> Vec<String> {
        container::list(&self.paths)
    }

    /// Stops what still runs and removes the container, its cgroup, rootfs mount and files.
    /// Idempotent.
    pub fn remove_container(&self, id: &str) -> Result<()> {
        container::delete(&self.paths, id)?;
        self.remove_files(id);
        let dir = self.paths.dir(id);
        if dir.exists() {
            image::unmount_rootfs(&dir)?;
            std::fs::remove_dir_all(&dir).map_err(|source| Error::Io {
                what: format!("remove {}", dir.display()),
                source,
            })?;
        }
        Ok(())
    }

    fn remove_files(&self, id: &str) {
        let _ = container::delete(&self.paths, id);
        let dir = self.paths.dir(id);
        if let Err(e) = image::unmount_rootfs(&dir) {
            tracing::warn!(container = id, error = %e, "unmount rootfs");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
