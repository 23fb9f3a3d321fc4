//! Container lifecycle on youki's `libcontainer`: create (through a detached `oxlet-shim` that
//! supervises the container, copies its output into the CRI log and records how it exited),
//! start, stop, delete, state, exec, and a foreground `run` for `oxlet run`.
//!
//! All state is files, so a restarted caller finds its containers again: `<containers>/<id>/`
//! holds the bundle (`config.json`, `rootfs`), `meta.json` and, once the process ended,
//! `exit.json`; libcontainer keeps its own state under `<state_root>/<id>`.

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("container {0} not found")]
    NotFound(String),
    #[error("container {0} already exists")]
    AlreadyExists(String),
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("invalid container id {0:?}")]
    InvalidId(String),
    #[error("container {id}: {source}")]
    Libcontainer {
        id: String,
        #[source]
        source: Box<libcontainer::error::LibcontainerError>,
    },
    #[error("container {id}: shim: {message}")]
    Shim { id: String, message: String },
    #[error("container {id}: {source}")]
    Cgroup {
        id: String,
        #[source]
        source: crate::cgroup::Error,
    },
    #[error("container {id}: {what}: {source}")]
    Io {
        id: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("container {id}: {what}: {source}")]
    Sys {
        id: String,
        what: String,
        #[source]
        source: nix::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where containers live; shared by the runtime and its shims.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `<containers>/<id>` is a container's bundle and record.
    pub containers: PathBuf,
    /// libcontainer's root (`with_root_path`): on tmpfs, since it describes live processes.
    pub state_root: PathBuf,
    /// The `oxlet-shim` executable.
    pub shim: PathBuf,
}

impl Paths {
    pub fn dir(&self, id: &str) -> PathBuf {
        self.containers.join(id)
    }
}

/// How a container's process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    pub finished_at: String,
}

impl ExitInfo {
    /// The reason kubelet reports for a terminated container.
    pub fn reason(&self) -> &'static str {
        if self.oom_killed {
            "OOMKilled"
        } else if self.exit_code == 0 {
            "Completed"
        } else {
            "Error"
        }
    }
}

/// What the shim reports when the container's process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Created, waiting to be started.
    Created,
    Running {
        pid: i32,
    },
    Exited(ExitInfo),
}

/// Validates ids used as directory names: no path separators or traversal.
pub fn valid_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    ok.then_some(())
        .ok_or_else(|| Error::InvalidId(id.to_string()))
}

fn io_err(id: &str, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let (id, what) = (id.to_string(), what.into());
    move |source| Error::Io { id, what, source }
}

fn lc_err(id: &str) -> impl FnOnce(libcontainer::error::LibcontainerError) -> Error {
    let id = id.to_string();
    move |source| Error::Libcontainer {
        id,
        source: Box::new(source),
    }
}

/// Options the shim needs besides the bundle.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub path: PathBuf,
    pub max_size: u64,
    pub max_files: usize,
}

/// The container process's standard input, as the pod spec's `stdin`, `stdinOnce` and `tty`
/// ask for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessIo {
    /// Kept open by the shim (the process waits for input) and handed to attachers.
    pub stdin: bool,
    /// Closed after the first attach session that had it ends.
    pub stdin_once: bool,
    /// A terminal (the config.json's `process.terminal`) whose master the shim holds.
    pub tty: bool,
}

impl ProcessIo {
    /// As `oxlet-shim create` takes them.
    fn flags(self) -> impl Iterator<Item = &'static str> {
        [
            (self.stdin, "--stdin"),
            (self.stdin_once, "--stdin-once"),
            (self.tty, "--tty"),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .flat_map(|(_, flag)| [flag, "1"])
    }
}

/// The socket in a bundle where the shim hands out the container's stdin (see `attach_stdin`).
pub const ATTACH_SOCKET: &str = "attach.sock";

/// `dir/name` in a form short enough for a unix socket address (108 bytes), through the
/// caller's descriptor `dir_fd` of `dir`.
pub fn short_socket_path(dir_fd: &std::fs::File, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{name}", dir_fd.as_raw_fd()))
}

/// The container's stdin (a pipe's write end, or a terminal's master) from its shim, with the
/// connection whose close ends this attach session; `None` when the container has no stdin or
/// no longer runs.
pub fn attach_stdin(paths: &Paths, id: &str) -> Result<Option<(UnixStream, OwnedFd)>> {
    valid_id(id)?;
    let dir = match std::fs::File::open(paths.dir(id)) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(id, "bundle")(e)),
    };
    let conn = match UnixStream::connect(short_socket_path(&dir, ATTACH_SOCKET)) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io_err(id, "attach socket")(e)),
    };
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io_err(id, "attach socket"))?;
    let fd = crate::shim::recv_fd(&conn).map_err(io_err(id, "stdin from the shim"))?;
    Ok(Some((conn, fd)))
}

/// Creates the container from the bundle at `paths.dir(id)` (its `config.json` written by the
/// caller) through a detached shim. Returns once the container's init waits to be started.
pub fn create(paths: &Paths, id: &str, log: &LogOptions, io: ProcessIo) -> Result<()> {
    valid_id(id)?;
    if paths.state_root.join(id).exists() {
        return Err(Error::AlreadyExists(id.to_string()));
    }
    std::fs::create_dir_all(&paths.state_root).map_err(io_err(id, "state root"))?;
    let dir = paths.dir(id);
    let shim_log = std::fs::File::create(dir.join("shim.log")).map_err(io_err(id, "shim log"))?;
    // Not the caller's working directory, which a concurrent `start` may change for a moment.
    let mut child = Command::new(&paths.shim)
        .current_dir("/")
        .arg("create")
        .arg("--id")
        .arg(id)
        .arg("--bundle")
        .arg(&dir)
        .arg("--root")
        .arg(&paths.state_root)
        .arg("--log")
        .arg(&log.path)
        .arg("--log-max-size")
        .arg(log.max_size.to_string())
        .arg("--log-max-files")
        .arg(log.max_files.to_string())
        .args(io.flags())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(shim_log)
        .spawn()
        .map_err(io_err(id, format!("spawn {}", paths.shim.display())))?;
    let stdout = child.stdout.take().expect("piped");
    // The shim forks away at once, so this wait only reaps the first process.
    let _ = child.wait();
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(io_err(id, "shim report"))?;
    match line.trim().split_once(' ') {
        Some(("ok", _pid)) => Ok(()),
        Some(("error", msg)) => Err(Error::Shim {
            id: id.into(),
            message: msg.to_string(),
        }),
        _ => {
            let log = std::fs::read_to_string(dir.join("shim.log")).unwrap_or_default();
            Err(Error::Shim {
                id: id.into(),
                message: format!("no report; shim log: {}", log.trim()),
            })
        }
    }
}

/// libcontainer's `start` chdirs into the container's state dir to reach its notify socket and
/// back; the working directory is per process, so concurrent starts must not interleave.
static START: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Starts a created container's process.
pub fn start(paths: &Paths, id: &str) -> Result<()> {
    let mut c = load(paths, id)?;
    {
        let _one = START.lock().unwrap_or_else(|e| e.into_inner());
        c.start().map_err(lc_err(id))?;
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    std::fs::write(paths.dir(id).join("started_at"), now).map_err(io_err(id, "started_at"))
}

fn load(paths: &Paths, id: &str) -> Result<Container> {
    valid_id(id)?;
    let root = paths.state_root.join(id);
    if !has_state(&root) {
        return Err(Error::NotFound(id.to_string()));
    }
    let mut c = Container::load(root).map_err(lc_err(id))?;
    c.refresh_status().map_err(lc_err(id))?;
    Ok(c)
}

/// The container's cgroup (relative to the cgroup root) as its bundle's config.json names it.
pub fn cgroups_path(bundle: &Path) -> Option<String> {
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).ok()?).ok()?;
    spec["linux"]["cgroupsPath"]
        .as_str()
        .map(|s| s.trim_start_matches('/').to_string())
}

/// CPU and memory usage of a container from its cgroup (zeros once the cgroup is gone).
pub fn usage(paths: &Paths, id: &str) -> Result<crate::cgroup::Usage> {
    valid_id(id)?;
    let cgroup = cgroups_path(&paths.dir(id)).ok_or_else(|| Error::NotFound(id.to_string()))?;
    Ok(crate::cgroup::usage(&cgroup))
}

/// The exit record the shim wrote, if the process ended.
pub fn exit_info(paths: &Paths, id: &str) -> Option<ExitInfo> {
    let data = std::fs::read(paths.dir(id).join("exit.json")).ok()?;
    serde_json::from_slice(&data).ok()
}

/// The time `start` recorded, RFC 3339.
pub fn started_at(paths: &Paths, id: &str) -> Option<String> {
    std::fs::read_to_string(paths.dir(id).join("started_at")).ok()
}

pub fn state(paths: &Paths, id: &str) -> Result<State> {
    valid_id(id)?;
    if let Some(exit) = exit_info(paths, id) {
        return Ok(State::Exited(exit));
    }
    if !paths.dir(id).exists() {
        return Err(Error::NotFound(id.to_string()));
    }
    match load(paths, id) {
        Ok(c) => Ok(match c.status() {
            ContainerStatus::Created | ContainerStatus::Creating => State::Created,
            ContainerStatus::Running | ContainerStatus::Paused => State::Running {
                pid: c.pid().map(|p| p.as_raw()).unwrap_or(0),
            },
            // No pid yet: libcontainer's state of a container still being built.
            ContainerStatus::Stopped if c.pid().is_none() && never_started(paths, id) => {
                State::Created
            }
            ContainerStatus::Stopped => State::Exited(stopped_exit(paths, id)),
        }),
        // No state and never started: its shim is building it, or was killed before it
        // could (its caller killed mid-create). Created, so the caller makes it again.
        Err(Error::NotFound(_)) if never_started(paths, id) => Ok(State::Created),
        // It ran, but nothing of it is left (the machine rebooted, or the shim was killed).
        Err(Error::NotFound(_)) => Ok(State::Exited(lost_exit())),
        Err(e) => Err(e),
    }
}

fn never_started(paths: &Paths, id: &str) -> bool {
    !paths.dir(id).join("started_at").exists()
}

/// Whether libcontainer's state of a container is there to read. libcontainer truncates
/// state.json before it writes it, so a caller killed in between (during `start`) leaves it
/// empty: nothing then says what runs, and the container counts as having no state.
fn has_state(root: &Path) -> bool {
    std::fs::metadata(root.join("state.json")).is_ok_and(|m| m.len() > 0)
}

/// True while container `id` has no process it knows of: no libcontainer state, or one without
/// a pid.
fn building(paths: &Paths, id: &str) -> bool {
    let root = paths.state_root.join(id);
    if !has_state(&root) {
        return true;
    }
    Container::load(root).is_ok_and(|c| c.pid().is_none())
}

/// The exit of a container whose process is gone: its shim's record, or, when the shim was
/// killed before writing one, a lost exit.
fn stopped_exit(paths: &Paths, id: &str) -> ExitInfo {
    wait_exit_info(paths, id, Duration::from_secs(2)).unwrap_or_else(lost_exit)
}

/// What is reported for a process whose end nobody recorded: exit code 255, as the CRI runtimes
/// report a container lost across a reboot.
fn lost_exit() -> ExitInfo {
    ExitInfo {
        exit_code: 255,
        signal: None,
        oom_killed: false,
        finished_at: now(),
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn wait_exit_info(paths: &Paths, id: &str, timeout: Duration) -> Option<ExitInfo> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(e) = exit_info(paths, id) {
            return Some(e);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the container's process has ended and the shim recorded it.
pub fn wait(paths: &Paths, id: &str, timeout: Duration) -> Option<ExitInfo> {
    wait_exit_info(paths, id, timeout)
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILLs every process of the container, as kubelet
/// does. Returns how the process ended; stopping an exited container is a no-op.
pub fn stop(paths: &Paths, id: &str, grace: Duration) -> Result<ExitInfo> {
    if let Some(e) = exit_info(paths, id) {
        return Ok(e);
    }
    let mut c = match load(paths, id) {
        Ok(c) if c.pid().is_some() => c,
        // No state, or one without a process: whatever of it may still run (a shim still
        // building it, a process whose start was cut short) is ended through its command
        // line and cgroup.
        Ok(_) | Err(Error::NotFound(_)) => {
            kill_building_shim(paths, id);
            return Ok(exit_info(paths, id).unwrap_or_else(lost_exit));
        }
        Err(e) => return Err(e),
    };
    if c.status() == ContainerStatus::Stopped {
        return Ok(stopped_exit(paths, id));
    }
    if c.status() == ContainerStatus::Created {
        // Never started: killing the waiting init ends it.
        let _ = c.kill(Signal::SIGKILL, true);
    } else if c.can_kill() {
        let _ = c.kill(Signal::SIGTERM, false);
        if let Some(e) = wait_exit_info(paths, id, grace) {
            return Ok(e);
        }
        let _ = load(paths, id).map(|mut c| c.kill(Signal::SIGKILL, true));
    }
    wait_exit_info(paths, id, Duration::from_secs(10)).ok_or_else(|| Error::Shim {
        id: id.into(),
        message: "process did not report its exit after SIGKILL".into(),
    })
}

/// Deletes the container: kills what still runs, removes libcontainer's state and the
/// container's cgroup. The bundle directory is the caller's (it owns the rootfs mount).
/// Idempotent.
pub fn delete(paths: &Paths, id: &str) -> Result<()> {
    valid_id(id)?;
    let root = paths.state_root.join(id);
    let exited = exit_info(paths, id).is_some();
    let building = !exited && building(paths, id);
    if building {
        kill_building_shim(paths, id);
    }
    if has_state(&root) {
        if !building && !exited && paths.dir(id).exists() {
            stop(paths, id, Duration::ZERO)?;
        }
        let mut c = Container::load(root.clone()).map_err(lc_err(id))?;
        if !delete_stopped(&mut c, id)? {
            c.delete(true).map_err(lc_err(id))?;
        }
    }
    match std::fs::remove_dir_all(&root) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(id, "remove state")(e)),
    }
}

/// Kills whatever still builds container `id` (its caller was killed during `create`): the
/// shim and the container's init waiting for its start, which leads a session of its own so
/// the shim's process group does not hold it. With no process recorded in any state, nothing
/// else would ever end them. They are found by their command line: until the container
/// starts, the init is a clone of the shim. Then the container's cgroup goes too.
fn kill_building_shim(paths: &Paths, id: &str) {
    let root = paths.state_root.display().to_string();
    let ours = || -> Vec<Pid> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                    let flag = |k: &[u8], v: &[u8]| args.windows(2).any(|w| w[0] == k && w[1] == v);
                    args.first().is_some_and(|a| a.ends_with(b"oxlet-shim"))
                        && args.get(1) == Some(&&b"create"[..])
                        && flag(b"--id", id.as_bytes())
                        && flag(b"--root", root.as_bytes())
                })
            })
            .map(Pid::from_raw)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = ours();
        if pids.is_empty() || Instant::now() >= deadline {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(cgroup) = cgroups_path(&paths.dir(id)) {
        if let Err(e) = crate::cgroup::remove_cgroup(&cgroup) {
            tracing::warn!(container = id, error = %e, "remove the cgroup of a container never started");
        }
    }
}

/// Deletes a stopped container that has no poststop hooks and no Intel RDT group by removing
/// its cgroup and state directory; false leaves the rest to libcontainer's delete. libcontainer's
/// v1 cgroup manager re-reads mountinfo and /proc/self/cgroup through pathrs for each of its
/// twelve controllers (about 600 syscalls, a fifth of `oxlet run`); one mounts read does here.
fn delete_stopped(c: &mut Container, id: &str) -> Result<bool> {
    c.refresh_status().map_err(lc_err(id))?;
    if c.status() != ContainerStatus::Stopped || c.intel_rdt_dir().is_some() {
        return Ok(false);
    }
    let Ok(config) = libcontainer::config::YoukiConfig::load(&c.root) else {
        return Ok(false);
    };
    let has_poststop = config
        .hooks
        .as_ref()
        .and_then(|h| h.poststop().as_ref())
        .is_some_and(|hooks| !hooks.is_empty());
    if has_poststop {
        return Ok(false);
    }
    // libcgroups joins the path below each hierarchy's root, leading slash or not.
    let cgroup = config.cgroup_path.to_string_lossy();
    crate::cgroup::remove_cgroup(cgroup.trim_start_matches('/')).map_err(|source| {
        Error::Cgroup {
            id: id.into(),
            source,
        }
    })?;
    match std::fs::remove_dir_all(&c.root) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(io_err(id, "remove state")(e)),
    }
}

/// Ids of the containers recorded under `paths.containers`.
pub fn list(paths: &Paths) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(&paths.containers)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("config.json").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    ids.sort();
    ids
}

/// A command that runs `args` inside the running container through the shim; the caller picks
/// its stdio and gets the process's exit code as the command's (128+N for signal N).
pub fn exec_command(
    paths: &Paths,
    id: &str,
    args: &[String],
    timeout: Option<Duration>,
) -> Command {
    let mut cmd = Command::new(&paths.shim);
    cmd.arg("exec")
        .arg("--id")
        .arg(id)
        .arg("--root")
        .arg(&paths.state_root);
    if let Some(t) = timeout {
        cmd.arg("--timeout-ms").arg(t.as_millis().to_string());
    }
    cmd.arg("--").args(args);
    cmd
}

/// Like `exec_command`, on a terminal made inside the container (its devpts), as runc's
/// `exec -t`: the pty master is sent over the unix socket at `console_socket`, where the caller
/// listens, and the process's stdio is the terminal.
pub fn exec_tty_command(
    paths: &Paths,
    id: &str,
    args: &[String],
    console_socket: &Path,
) -> Command {
    let mut cmd = Command::new(&paths.shim);
    cmd.arg("exec")
        .arg("--id")
        .arg(id)
        .arg("--root")
        .arg(&paths.state_root)
        .arg("--bundle")
        .arg(paths.dir(id))
        .arg("--console-socket")
        .arg(console_socket)
        .arg("--")
        .args(args);
    cmd
}

/// Output of a finished exec.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `args` in the container and collects its output (exec probes, tests).
pub fn exec(
    paths: &Paths,
    id: &str,
    args: &[String],
    timeout: Option<Duration>,
) -> Result<ExecOutput> {
    if !matches!(state(paths, id)?, State::Running { .. }) {
        return Err(Error::NotRunning(id.into()));
    }
    let out = exec_command(paths, id, args, timeout)
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(id, "exec"))?;
    Ok(ExecOutput {
        exit_code: out.status.code().unwrap_or(255),
        stdout: out.stdout,
        stderr: out.stderr,
    })
}

/// Exit code of a wait status the way shells report it.
pub fn exit_code(status: WaitStatus) -> Option<(i32, Option<i32>)> {
    match status {
        WaitStatus::Exited(_, code) => Some((code, None)),
        WaitStatus::Signaled(_, sig, _) => Some((128 + sig as i32, Some(sig as i32))),
        _ => None,
    }
}

/// Creates, starts and waits for a container in this process, then deletes it (`oxlet run`).
/// Its output goes to `output` (stdout, stderr), or to this process's own stdio when `None`.
/// Returns the exit code. Call it from a process with a single thread: libcontainer forks.
pub fn run_foreground(
    state_root: &Path,
    id: &str,
    bundle: &Path,
    output: Option<(OwnedFd, OwnedFd)>,
) -> Result<i32> {
    valid_id(id)?;
    std::fs::create_dir_all(state_root).map_err(io_err(id, "state root"))?;
    let mut builder = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(state_root)
        .map_err(lc_err(id))?;
    if let Some((stdout, stderr)) = output.or_else(own_output) {
        builder = builder.with_stdout(stdout).with_stderr(stderr);
    }
    let mut c = builder
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(lc_err(id))?;
    let result = (|| {
        forward_signals_to_child();
        c.start().map_err(lc_err(id))?;
        let pid = c.pid().ok_or_else(|| Error::Shim {
            id: id.into(),
            message: "no pid".into(),
        })?;
        wait_for(pid).map_err(|source| Error::Sys {
            id: id.into(),
            what: "waitpid".into(),
            source,
        })
    })();
    let deleted = match delete_stopped(&mut c, id) {
        Ok(true) => Ok(()),
        Ok(false) => c.delete(true).map_err(lc_err(id)),
        Err(e) => Err(e),
    };
    let code = result?;
    deleted?;
    Ok(code.0)
}

static PENDING_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn remember_signal(sig: libc::c_int) {
    PENDING_SIGNAL.store(sig, std::sync::atomic::Ordering::SeqCst);
}

/// Ctrl-C, SIGTERM and SIGHUP no longer end this process but interrupt `wait_for`, which passes
/// them on to the container, so `oxlet run` stops its container and still cleans up.
fn forward_signals_to_child() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    // No SA_RESTART: waitpid must return EINTR to forward the signal.
    let action = SigAction::new(
        SigHandler::Handler(remember_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores the signal number in an atomic (async-signal-safe).
        let _ = unsafe { sigaction(sig, &action) };
    }
}

/// Our stdout and stderr, with /dev/null swapped for /dev/zero: libcontainer re-opens a /dev/null
/// stdio fd inside the container read-only, so writes to it would fail with EBADF; writes to
/// /dev/zero are discarded just the same (null(4)). `None` when neither is /dev/null.
fn own_output() -> Option<(OwnedFd, OwnedFd)> {
    let is_null = |fd: i32| {
        nix::sys::stat::fstat(fd).is_ok_and(|st| {
            st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3)
        })
    };
    if !is_null(1) && !is_null(2) {
        return None;
    }
    let pick = |fd: i32| -> Option<OwnedFd> {
        if is_null(fd) {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/zero")
                .ok()
                .map(OwnedFd::from)
        } else {
            // SAFETY: fd is one of this process's standard streams, open for its whole life.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
                .try_clone_to_owned()
                .ok()
        }
    };
    Some((pick(1)?, pick(2)?))
}

/// Waits for `pid`, reaping other children met on the way (the caller may be a subreaper).
pub fn wait_for(pid: Pid) -> nix::Result<(i32, Option<i32>)> {
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(status) if status.pid() == Some(pid) => {
                if let Some(code) = exit_code(status) {
                    return Ok(code);
                }
            }
            Ok(_) => {}
            Err(nix::Error::EINTR) => {
                let sig = PENDING_SIGNAL.swap(0, std::sync::atomic::Ordering::SeqCst);
                if let Ok(sig) = Signal::try_from(sig) {
                    let _ = nix::sys::signal::kill(pid, sig);
                }
            }
            Err(nix::Error::ECHILD) => return Ok((255, None)),
            Err(e) => return Err(e),
        }
    }
}
