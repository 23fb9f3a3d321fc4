//! The body of `oxlet-shim`, the small process that owns one container while it lives, so the
//! caller (agent) can restart without losing the container, its output or its exit status.
//!
//! `oxlet-shim create --id ID --bundle DIR --root STATE --log FILE [--log-max-size N]
//! [--log-max-files N]`: forks away from the caller, builds the container with libcontainer,
//! reports `ok <pid>` or `error <message>` on stdout, then copies the container's stdout and
//! stderr into the CRI log and, when the process ends, writes `DIR/exit.json`.
//!
//! `oxlet-shim exec --id ID --root STATE [--timeout-ms N] -- CMD...`: runs CMD in the container
//! with this process's stdio and exits with its exit code. With `--bundle DIR --console-socket
//! PATH`, CMD runs as the container's process does (user, env, cwd) on a terminal made inside
//! the container, whose master libcontainer sends to the socket at PATH.
//!
//! `oxlet-shim pause`, started with a new PID namespace for its children: forks the process that
//! is PID 1 of that namespace (a pod's shared process namespace), reports its pid on stdout and
//! exits; the child reaps orphans until it is killed.

use crate::container::{short_socket_path, wait_for, ExitInfo, ATTACH_SOCKET};
use crate::log::{copy_stream, CriLog, Stream};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::unistd::{fork, setsid, ForkResult};
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn flags(args: &[String]) -> (HashMap<String, String>, Vec<String>) {
    let mut map = HashMap::new();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            rest.extend(it.cloned());
            break;
        }
        if let Some(name) = a.strip_prefix("--") {
            map.insert(name.to_string(), it.next().cloned().unwrap_or_default());
        }
    }
    (map, rest)
}

/// Entry point of the `oxlet-shim` binary; returns the process exit code.
pub fn main(args: Vec<String>) -> i32 {
    let Some(verb) = args.first() else {
        eprintln!("usage: oxlet-shim create|exec ...");
        return 2;
    };
    let (f, rest) = flags(&args[1..]);
    if verb == "create" || verb == "pause" {
        // A shim outlives whoever started it: descriptors it inherited by accident (a lock
        // file its starter's starter held) must not stay open for the container's life.
        // SAFETY: nothing of this process is open above stderr yet.
        unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    }
    match verb.as_str() {
        "create" => create(&f),
        "exec" => exec(&f, rest),
        "pause" => pause(),
        other => {
            eprintln!("oxlet-shim: unknown verb {other}");
            2
        }
    }
}

fn pause() -> i32 {
    // SAFETY: the child only makes syscalls before it loops; no locks are taken.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            println!("{child}");
            0
        }
        Ok(ForkResult::Child) => {
            let _ = setsid();
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                for fd in 0..3 {
                    // SAFETY: dup2 onto the standard descriptors of this process.
                    unsafe { libc::dup2(null.as_raw_fd(), fd) };
                }
            }
            loop {
                match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(-1), None) {
                    Ok(_) | Err(nix::Error::EINTR) => {}
                    // SAFETY: pause only sleeps until a signal (a new orphan's SIGCHLD).
                    Err(_) => unsafe {
                        libc::pause();
                    },
                }
            }
        }
        Err(e) => {
            eprintln!("oxlet-shim pause: fork: {e}");
            1
        }
    }
}

fn get(f: &HashMap<String, String>, k: &str) -> Result<String, String> {
    f.get(k).cloned().ok_or_else(|| format!("missing --{k}"))
}

fn create(f: &HashMap<String, String>) -> i32 {
    // Fork away so the caller only reaps this first process and the container outlives it.
    // SAFETY: the shim is single-threaded here; the child only continues this function.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => return 0,
        Ok(ForkResult::Child) => {}
        Err(e) => {
            println!("error fork: {e}");
            return 1;
        }
    }
    let _ = setsid();
    // Orphans inside the container come back to us to be reaped.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    match supervise(f) {
        Ok(()) => 0,
        Err(e) => {
            report(&format!("error {}", e.replace('\n', " ")));
            1
        }
    }
}

fn report(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    // Closing our stdout tells the caller the report is complete.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: both descriptors are open; dup2 replaces fd 1 atomically.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

fn supervise(f: &HashMap<String, String>) -> Result<(), String> {
    let id = get(f, "id")?;
    let bundle = PathBuf::from(get(f, "bundle")?);
    let root = PathBuf::from(get(f, "root")?);
    let log_path = PathBuf::from(get(f, "log")?);
    let max_size = f
        .get("log-max-size")
        .and_then(|v| v.parse().ok())
        .unwrap_or(crate::log::DEFAULT_MAX_SIZE);
    let max_files = f
        .get("log-max-files")
        .and_then(|v| v.parse().ok())
        .unwrap_or(crate::log::DEFAULT_MAX_FILES);
    let log = CriLog::open(&log_path, max_size, max_files)
        .map_err(|e| format!("log {}: {e}", log_path.display()))?;
    let log = Arc::new(Mutex::new(log));
    let on = |k: &str| f.get(k).is_some_and(|v| v == "1");
    let (stdin, stdin_once, tty) = (on("stdin"), on("stdin-once"), on("tty"));
    let bundle_fd =
        std::fs::File::open(&bundle).map_err(|e| format!("bundle {}: {e}", bundle.display()))?;
    // On a terminal the process's stdio is the terminal, whose master libcontainer sends over
    // this socket; otherwise pipes.
    let console = if tty {
        let path = short_socket_path(&bundle_fd, CONSOLE_SOCKET);
        let _ = std::fs::remove_file(&path);
        Some(UnixListener::bind(&path).map_err(|e| format!("console socket: {e}"))?)
    } else {
        None
    };
    let pipe = || nix::unistd::pipe().map_err(|e| format!("pipe: {e}"));
    let mut outputs = Vec::new();
    let mut pipes = None;
    let mut stdin_w = None;
    if console.is_none() {
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        outputs = vec![(out_r, Stream::Stdout), (err_r, Stream::Stderr)];
        let stdin_r = if stdin {
            let (r, w) = pipe()?;
            stdin_w = Some(w);
            Some(r)
        } else {
            None
        };
        pipes = Some((stdin_r, out_w, err_w));
    }
    let built = ContainerBuilder::new(id.clone(), SyscallType::default())
        .with_root_path(&root)
        .and_then(|b| {
            let b = match pipes {
                None => b.with_console_socket(Some(bundle.join(CONSOLE_SOCKET))),
                Some((stdin_r, out_w, err_w)) => {
                    let b = b.with_stdout(out_w).with_stderr(err_w);
                    match stdin_r {
                        Some(r) => b.with_stdin(r),
                        None => b,
                    }
                }
            };
            b.as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
        });
    let container = match built {
        Ok(c) => c,
        Err(e) => {
            // libcontainer can leave its state dir behind when create fails half-way.
            if let Ok(mut c) = libcontainer::container::Container::load(root.join(&id)) {
                let _ = c.delete(true);
            }
            let _ = std::fs::remove_dir_all(root.join(&id));
            return Err(format!("{e}"));
        }
    };
    let pid = container.pid().ok_or("container has no pid")?;
    let cgroup = crate::container::cgroups_path(&bundle);
    if let Some(console) = console {
        let _ = std::fs::remove_file(short_socket_path(&bundle_fd, CONSOLE_SOCKET));
        let master = receive_master(&console)?;
        if stdin {
            let dup = master
                .try_clone()
                .map_err(|e| format!("terminal master: {e}"))?;
            // A terminal's input is never closed: that would hang up its output too.
            serve_stdin(&bundle_fd, dup, false)?;
        }
        outputs = vec![(master, Stream::Stdout)];
    } else if let Some(w) = stdin_w {
        serve_stdin(&bundle_fd, w, stdin_once)?;
    }
    let copiers: Vec<_> = outputs
        .into_iter()
        .map(|(fd, stream)| {
            let log = log.clone();
            std::thread::spawn(move || {
                let file = std::fs::File::from(fd);
                // A prompt without a newline must reach attached terminals at once.
                match copy_stream(file, stream, log, tty) {
                    // A terminal's master reads EIO once no process holds the terminal.
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
                    Err(e) => tracing::warn!(error = %e, "log copy"),
                    Ok(()) => {}
                }
            })
        })
        .collect();
    report(&format!("ok {pid}"));
    let (code, signal) = wait_for(pid).map_err(|e| format!("waitpid: {e}"))?;
    let oom_killed = cgroup
        .as_deref()
        .is_some_and(|p| crate::cgroup::usage(p).oom_kills > 0);
    // Output still buffered in the pipes belongs before the exit record; a daemon left holding
    // the pipe must not keep the record from being written.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    for c in copiers {
        while !c.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let info = ExitInfo {
        exit_code: code,
        signal,
        oom_killed: oom_killed && (signal == Some(libc::SIGKILL) || code == 137),
        finished_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
    };
    let tmp = bundle.join(".exit.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&info).expect("serializable"))
        .and_then(|_| std::fs::rename(&tmp, bundle.join("exit.json")))
        .map_err(|e| format!("exit record: {e}"))?;
    Ok(())
}

const CONSOLE_SOCKET: &str = "console.sock";

/// The terminal master libcontainer sent over the console socket while it built the container.
fn receive_master(console: &UnixListener) -> Result<OwnedFd, String> {
    console
        .set_nonblocking(true)
        .map_err(|e| format!("console socket: {e}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let conn = loop {
        match console.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return Err("no terminal from the container".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("console socket: {e}")),
        }
    };
    conn.set_nonblocking(false)
        .and_then(|_| conn.set_read_timeout(Some(Duration::from_secs(10))))
        .map_err(|e| format!("console socket: {e}"))?;
    recv_fd(&conn).map_err(|e| format!("terminal master: {e}"))
}

/// Hands `fd` (the container's stdin) to each client of the bundle's attach socket, one at a
/// time; with `once`, closes it after the first client is done, so the process reads EOF.
fn serve_stdin(bundle_fd: &std::fs::File, fd: OwnedFd, once: bool) -> Result<(), String> {
    let path = short_socket_path(bundle_fd, ATTACH_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| format!("attach socket: {e}"))?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            if send_fd(&conn, &fd).is_err() {
                continue;
            }
            // The client closes the connection when its session ends.
            let mut b = [0u8; 64];
            while matches!(std::io::Read::read(&mut conn, &mut b), Ok(n) if n > 0) {}
            if once {
                break;
            }
        }
        drop(fd);
    });
    Ok(())
}

fn send_fd(sock: &UnixStream, fd: &OwnedFd) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let fds = [fd.as_raw_fd()];
    let iov = [std::io::IoSlice::new(b"fd")];
    sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Receives one descriptor sent with SCM_RIGHTS over `sock` (blocking, within its timeout).
pub fn recv_fd(sock: &UnixStream) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!(std::os::fd::RawFd);
    let msg = recvmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor for us; nothing else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(std::io::Error::other("no descriptor received"))
}

/// The container's own process (user, env, cwd, capabilities) running `cmd` on a terminal,
/// written for libcontainer's `with_process` next to the container's state.
fn tty_process(bundle: &Path, state: &Path, cmd: Vec<String>) -> Result<PathBuf, String> {
    let spec = libcontainer::oci_spec::runtime::Spec::load(bundle.join("config.json"))
        .map_err(|e| format!("container spec: {e}"))?;
    let mut p = spec.process().clone().unwrap_or_default();
    p.set_args(Some(cmd));
    p.set_terminal(Some(true));
    let path = state.join(format!("exec-{}.json", std::process::id()));
    let json = serde_json::to_vec(&p).map_err(|e| e.to_string())?;
    std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

fn exec(f: &HashMap<String, String>, cmd: Vec<String>) -> i32 {
    let run = || -> Result<i32, String> {
        let id = get(f, "id")?;
        let root = PathBuf::from(get(f, "root")?);
        if cmd.is_empty() {
            return Err("no command".into());
        }
        let dup = |fd: i32| -> Result<OwnedFd, String> {
            // SAFETY: dup of one of this process's standard streams.
            let n = unsafe { libc::dup(fd) };
            if n < 0 {
                return Err(format!("dup {fd}: {}", std::io::Error::last_os_error()));
            }
            // SAFETY: n is a fresh descriptor from dup, owned by nothing else.
            Ok(unsafe { OwnedFd::from_raw_fd(n) })
        };
        let builder = ContainerBuilder::new(id.clone(), SyscallType::default())
            .with_root_path(&root)
            .map_err(|e| e.to_string())?;
        let pid = if let Some(socket) = f.get("console-socket") {
            let bundle = PathBuf::from(get(f, "bundle")?);
            let process = tty_process(&bundle, &root.join(&id), cmd)?;
            let built = builder
                .with_console_socket(Some(socket))
                .as_tenant()
                .with_process(Some(&process))
                .with_detach(true)
                .build();
            let _ = std::fs::remove_file(&process);
            // libcontainer links the socket into the container's state dir and leaves the link.
            for e in std::fs::read_dir(root.join(&id))
                .into_iter()
                .flatten()
                .flatten()
            {
                let ours = std::fs::read_link(e.path()).is_ok_and(|t| t == Path::new(socket));
                if ours && e.file_name().to_string_lossy().starts_with("tenant-tty-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            built
        } else {
            builder
                .with_stdin(dup(0)?)
                .with_stdout(dup(1)?)
                .with_stderr(dup(2)?)
                .as_tenant()
                .with_container_args(cmd)
                .with_detach(true)
                .build()
        }
        .map_err(|e| e.to_string())?;
        if let Some(ms) = f.get("timeout-ms").and_then(|v| v.parse::<u64>().ok()) {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(ms));
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            });
        }
        let (code, _) = wait_for(pid).map_err(|e| format!("waitpid: {e}"))?;
        Ok(code)
    };
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("oxlet-shim exec: {e}");
            126
        }
    }
}
