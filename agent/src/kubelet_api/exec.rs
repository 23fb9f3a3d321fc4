//! /exec and /attach over WebSocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`) or SPDY/3.1
//! (`v4.channel.k8s.io`): stdin, stdout, stderr, the error channel carrying the final
//! metav1.Status (with the exit code as kubectl reads it) and terminal resizes.

use super::spdy;
use super::upgrade::{self, Kind};
use super::{error, flag, logs, query, Api, Body, LocalPod};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use runtime::container::State;
use serde_json::json;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const WS_PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
const SPDY_PROTOCOLS: &[&str] = &["v4.channel.k8s.io"];
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
/// v5: a client message `[255, channel]` closes that channel (stdin's end of input).
const CLOSE: u8 = 255;
/// How long a SPDY client has to open its streams (kubelet's streamCreationTimeout).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct Options {
    command: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

/// One output channel of a session, whatever the transport.
#[derive(Clone)]
enum Out {
    Ws(u8, mpsc::Sender<WsOut>),
    Spdy(spdy::StreamWriter),
}

enum WsOut {
    Data(u8, Bytes),
    Close,
}

impl Out {
    async fn write(&self, b: Bytes) -> bool {
        match self {
            Out::Ws(ch, tx) => tx.send(WsOut::Data(*ch, b)).await.is_ok(),
            Out::Spdy(w) => w.write(b).await,
        }
    }

    async fn close(&self) {
        if let Out::Spdy(w) = self {
            w.close().await;
        }
    }
}

/// The streams of a session once the client has opened them.
struct Session {
    stdin: Option<mpsc::Receiver<Bytes>>,
    resize: Option<mpsc::Receiver<(u16, u16)>>,
    stdout: Option<Out>,
    stderr: Option<Out>,
    status: Out,
}

/// How the command or attach ended, as the error channel reports it.
enum Outcome {
    Exited(i32),
    Failed(String),
}

fn status_json(outcome: &Outcome, command: &[String]) -> Bytes {
    let v = match outcome {
        Outcome::Exited(0) => json!({"metadata": {}, "status": "Success"}),
        Outcome::Exited(code) => json!({
            "metadata": {},
            "status": "Failure",
            "message": format!(
                "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
                command.join(" ")
            ),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Outcome::Failed(msg) => json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("Internal error occurred: {msg}"),
            "reason": "InternalError",
            "details": {"causes": [{"message": msg}]},
            "code": 500,
        }),
    };
    Bytes::from(serde_json::to_vec(&v).expect("serializable"))
}

pub(super) async fn serve(
    api: Arc<Api>,
    mut req: Request<Incoming>,
    ns: &str,
    pod: &str,
    container: &str,
    attach: bool,
) -> Response<Body> {
    let q = query(req.uri());
    let opts = Options {
        command: q
            .iter()
            .filter(|(k, _)| k == "command")
            .map(|(_, v)| v.clone())
            .collect(),
        stdin: flag(&q, "stdin") || flag(&q, "input"),
        stdout: flag(&q, "stdout") || flag(&q, "output"),
        stderr: flag(&q, "stderr") || flag(&q, "error"),
        tty: flag(&q, "tty"),
    };
    if !opts.stdin && !opts.stdout && !opts.stderr {
        return error(
            StatusCode::BAD_REQUEST,
            "you must specify at least 1 of stdin, stdout, stderr",
        );
    }
    if !attach && opts.command.is_empty() {
        return error(StatusCode::BAD_REQUEST, "you must specify a command");
    }
    let Some(LocalPod { uid, pod: obj }) = api.find_pod(ns, pod) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("pod {:?} does not exist", format!("{ns}/{pod}")),
        );
    };
    let ctx = api.ctx.clone();
    let current = {
        let (ctx, uid, c) = (ctx.clone(), uid.clone(), container.to_string());
        tokio::task::spawn_blocking(move || {
            let (attempt, id) = ctx.attempts(&uid).remove(&c)?.into_iter().next()?;
            let running = matches!(ctx.rt.container_state(&id), Ok(State::Running { .. }));
            Some((attempt, id, running))
        })
        .await
        .ok()
        .flatten()
    };
    let Some((attempt, id, running)) = current else {
        return error(
            StatusCode::NOT_FOUND,
            format!("container not found ({container:?})"),
        );
    };
    if !running {
        return error(
            StatusCode::BAD_REQUEST,
            format!("container {container:?} in pod {pod:?} is not running"),
        );
    }
    let kind = match upgrade::negotiate(&req, WS_PROTOCOLS, SPDY_PROTOCOLS) {
        Ok(k) => k,
        Err((code, msg)) => return error(code, msg),
    };
    let resp = upgrade::switching(&req, &kind);
    api.count_session(if attach { "attach" } else { "exec" }, &kind);
    let log = obj.map(|p| {
        let m = &p.metadata;
        ctx.log_dir(
            m.namespace.as_deref().unwrap_or(ns),
            m.name.as_deref().unwrap_or(pod),
            &uid,
        )
        .join(container)
        .join(format!("{attempt}.log"))
    });
    let log = log.unwrap_or_else(|| {
        ctx.log_dir(ns, pod, &uid)
            .join(container)
            .join(format!("{attempt}.log"))
    });
    upgrade::on_upgrade(&mut req, move |io| async move {
        let session = match kind {
            Kind::WebSocket(p) => ws_session(io, p == "v5.channel.k8s.io", &opts).await,
            Kind::Spdy(_) => match spdy_session(io, &opts).await {
                Some(s) => s,
                None => return,
            },
        };
        let status = session.status.clone();
        let outcome = if attach {
            run_attach(&ctx, &id, log, opts.tty, session).await
        } else {
            run_exec(&ctx, &id, &opts, session).await
        };
        status.write(status_json(&outcome, &opts.command)).await;
        status.close().await;
        if let Out::Ws(_, tx) = &status {
            let _ = tx.send(WsOut::Close).await;
        }
    });
    resp
}

/// The channels of a WebSocket session; writing and reading run as tasks of their own.
async fn ws_session(io: upgrade::Io, v5: bool, opts: &Options) -> Session {
    let ws = upgrade::websocket(io).await;
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<WsOut>(32);
    // An empty frame on the first output channel tells the client the streams are ready.
    let first = if opts.stdout {
        STDOUT
    } else if opts.stderr {
        STDERR
    } else {
        ERROR
    };
    tokio::spawn(async move {
        if sink.send(Message::binary(vec![first])).await.is_err() {
            return;
        }
        while let Some(out) = rx.recv().await {
            let r = match out {
                WsOut::Data(ch, b) => {
                    let mut m = Vec::with_capacity(b.len() + 1);
                    m.push(ch);
                    m.extend_from_slice(&b);
                    sink.send(Message::binary(m)).await
                }
                WsOut::Close => {
                    let _ = sink.send(Message::Close(Some(normal_close()))).await;
                    let _ = sink.close().await;
                    return;
                }
            };
            if r.is_err() {
                return;
            }
        }
    });
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let (resize_tx, resize_rx) = mpsc::channel::<(u16, u16)>(4);
    tokio::spawn(async move {
        let mut stdin = Some(stdin_tx);
        while let Some(Ok(msg)) = stream.next().await {
            let data = match msg {
                Message::Binary(d) => d,
                Message::Close(_) => break,
                _ => continue,
            };
            let Some((&ch, rest)) = data.split_first() else {
                continue;
            };
            match ch {
                STDIN => {
                    if let Some(tx) = &stdin {
                        if !rest.is_empty() && tx.send(Bytes::copy_from_slice(rest)).await.is_err()
                        {
                            stdin = None;
                        }
                    }
                }
                RESIZE => {
                    if let Some(size) = parse_resize(rest) {
                        let _ = resize_tx.try_send(size);
                    }
                }
                CLOSE if v5 && rest.first() == Some(&STDIN) => stdin = None,
                _ => {}
            }
        }
    });
    Session {
        stdin: opts.stdin.then_some(stdin_rx),
        resize: opts.tty.then_some(resize_rx),
        stdout: opts.stdout.then(|| Out::Ws(STDOUT, tx.clone())),
        stderr: (opts.stderr && !opts.tty).then(|| Out::Ws(STDERR, tx.clone())),
        status: Out::Ws(ERROR, tx),
    }
}

/// A close frame with code 1000: client-go reads only that as the end of the streams.
pub(super) fn normal_close() -> tokio_tungstenite::tungstenite::protocol::CloseFrame {
    tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "".into(),
    }
}

fn parse_resize(b: &[u8]) -> Option<(u16, u16)> {
    let v: serde_json::Value = serde_json::from_slice(b).ok()?;
    Some((
        v.get("Width")?.as_u64()? as u16,
        v.get("Height")?.as_u64()? as u16,
    ))
}

/// Waits until the SPDY client has opened the streams the options call for.
async fn spdy_session(io: upgrade::Io, opts: &Options) -> Option<Session> {
    let mut conn = spdy::Connection::serve(io);
    let mut s = Session {
        stdin: None,
        resize: None,
        stdout: None,
        stderr: None,
        status: Out::Ws(ERROR, mpsc::channel(1).0),
    };
    let mut have_error = false;
    let complete = |s: &Session, have_error: bool| {
        have_error
            && (!opts.stdin || s.stdin.is_some())
            && (!opts.stdout || s.stdout.is_some())
            && (!opts.stderr || opts.tty || s.stderr.is_some())
            && (!opts.tty || s.resize.is_some())
    };
    let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
    while !complete(&s, have_error) {
        let stream = match tokio::time::timeout_at(deadline, conn.incoming.recv()).await {
            Ok(Some(st)) => st,
            Ok(None) => return None,
            Err(_) => {
                tracing::debug!("exec: streams not opened in time");
                conn.close().await;
                return None;
            }
        };
        match stream.header("streamtype").unwrap_or("") {
            "error" => {
                have_error = true;
                s.status = Out::Spdy(stream.writer);
            }
            "stdin" => s.stdin = Some(stream.data),
            "stdout" => s.stdout = Some(Out::Spdy(stream.writer)),
            "stderr" => s.stderr = Some(Out::Spdy(stream.writer)),
            "resize" => {
                let (tx, rx) = mpsc::channel(4);
                let mut data = stream.data;
                tokio::spawn(async move {
                    // A JSON object per size change, possibly split across frames.
                    let mut buf = Vec::new();
                    while let Some(b) = data.recv().await {
                        buf.extend_from_slice(&b);
                        let mut de = serde_json::Deserializer::from_slice(&buf)
                            .into_iter::<serde_json::Value>();
                        let mut used = 0;
                        while let Some(Ok(v)) = de.next() {
                            used = de.byte_offset();
                            let w = v.get("Width").and_then(|x| x.as_u64()).unwrap_or(0);
                            let h = v.get("Height").and_then(|x| x.as_u64()).unwrap_or(0);
                            let _ = tx.try_send((w as u16, h as u16));
                        }
                        buf.drain(..used);
                    }
                });
                s.resize = Some(rx);
            }
            other => tracing::debug!(stream = other, "exec: unexpected stream type"),
        }
    }
    // Keeps the connection's streams flowing; GOAWAY follows when the session ends.
    tokio::spawn(async move { while conn.incoming.recv().await.is_some() {} });
    Some(s)
}

/// Copies a reader to an output channel until EOF, then half-closes the channel.
async fn pump(mut r: impl tokio::io::AsyncRead + Unpin, out: Option<Out>) {
    let mut buf = vec![0u8; 32 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(o) = &out {
                    if !o.write(Bytes::copy_from_slice(&buf[..n])).await {
                        break;
                    }
                }
            }
        }
    }
    if let Some(o) = out {
        o.close().await;
    }
}

async fn run_exec(
    ctx: &crate::pod_runtime::PodRuntime,
    id: &str,
    opts: &Options,
    s: Session,
) -> Outcome {
    if opts.tty {
        return run_tty(ctx, id, opts, s).await;
    }
    let cmd = match ctx.rt.exec_command(id, &opts.command) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true)
        .stdin(if s.stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        // Always pipes: libcontainer re-opens a /dev/null stdio read-only, failing writes.
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("start exec: {e}")),
    };
    let feeder = match (child.stdin.take(), s.stdin) {
        (Some(mut w), Some(mut rx)) => Some(tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if w.write_all(&b).await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
        })),
        _ => None,
    };
    let out = tokio::spawn(pump(child.stdout.take().expect("piped"), s.stdout));
    let err = tokio::spawn(pump(child.stderr.take().expect("piped"), s.stderr));
    let status = child.wait().await;
    // A process left in the background may hold the pipes open: output is not awaited forever.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = out.await;
        let _ = err.await;
    })
    .await;
    if let Some(f) = feeder {
        f.abort();
    }
    match status {
        Ok(st) => Outcome::Exited(exit_code(st)),
        Err(e) => Outcome::Failed(format!("wait for exec: {e}")),
    }
}

fn exit_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// Receives the pty master libcontainer sends over the console socket (blocking).
fn recv_master(sock: std::os::unix::net::UnixStream) -> std::io::Result<OwnedFd> {
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    runtime::shim::recv_fd(&sock)
}

/// Runs the command on a terminal made inside the container: its master comes back over a
/// console socket; the terminal's output goes to the stdout channel, stdin is typed into it
/// and resizes set its window size.
async fn run_tty(
    ctx: &crate::pod_runtime::PodRuntime,
    id: &str,
    opts: &Options,
    s: Session,
) -> Outcome {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let sock = ctx
        .cfg
        .run_dir
        .join(format!("exec-tty-{}-{n}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let listener = match tokio::net::UnixListener::bind(&sock) {
        Ok(l) => l,
        Err(e) => return Outcome::Failed(format!("console socket {}: {e}", sock.display())),
    };
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(sock.clone());
    let cmd = match ctx.rt.exec_tty_command(id, &opts.command, &sock) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("start exec: {e}")),
    };
    let accepted = tokio::select! {
        a = tokio::time::timeout(Duration::from_secs(30), listener.accept()) => a,
        _ = child.wait() => {
            let mut msg = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut msg).await;
            }
            return Outcome::Failed(msg.trim().to_string());
        }
    };
    let master = match accepted {
        Ok(Ok((stream, _))) => match stream.into_std() {
            Ok(std) => tokio::task::spawn_blocking(move || recv_master(std))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r),
            Err(e) => Err(e),
        },
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::other(
            "no terminal from the runtime in 30 s",
        )),
    };
    let master = match master {
        Ok(m) => Arc::new(m),
        Err(e) => return Outcome::Failed(format!("exec terminal: {e}")),
    };
    // The terminal's output, read on a thread of its own (EIO once every slave is closed).
    let (otx, mut orx) = mpsc::channel::<Bytes>(16);
    let reader_fd = master.try_clone();
    std::thread::spawn(move || {
        let Ok(fd) = reader_fd else { return };
        let mut f = std::fs::File::from(fd);
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match std::io::Read::read(&mut f, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if otx
                        .blocking_send(Bytes::copy_from_slice(&buf[..n]))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    let stdout = s.stdout.clone();
    let forward = tokio::spawn(async move {
        while let Some(b) = orx.recv().await {
            if let Some(o) = &stdout {
                if !o.write(b).await {
                    break;
                }
            }
        }
        if let Some(o) = stdout {
            o.close().await;
        }
    });
    if let Some(mut rx) = s.stdin {
        let fd = master.try_clone();
        std::thread::spawn(move || {
            let Ok(fd) = fd else { return };
            let mut f = std::fs::File::from(fd);
            while let Some(b) = rx.blocking_recv() {
                if std::io::Write::write_all(&mut f, &b).is_err() {
                    break;
                }
            }
        });
    }
    let resizer = s.resize.map(|mut rx| {
        let m = master.clone();
        tokio::spawn(async move {
            while let Some((w, h)) = rx.recv().await {
                set_size(&m, w, h);
            }
        })
    });
    let status = child.wait().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), forward).await;
    if let Some(r) = resizer {
        r.abort();
    }
    match status {
        Ok(st) => Outcome::Exited(exit_code(st)),
        Err(e) => Outcome::Failed(format!("wait for exec: {e}")),
    }
}

fn set_size(master: &OwnedFd, cols: u16, rows: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer; the fd is an open pty master.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// Attach: the container's output as it writes it (from its log) until it exits; the
/// client's stdin goes to the container's when the container has one (`stdin: true`), else
/// it is dropped, as kubelet does.
async fn run_attach(
    ctx: &crate::pod_runtime::PodRuntime,
    id: &str,
    log: std::path::PathBuf,
    tty: bool,
    s: Session,
) -> Outcome {
    if let Some(rx) = s.stdin {
        let (rt, cid) = (ctx.rt.clone(), id.to_string());
        let stdin = tokio::task::spawn_blocking(move || rt.attach_stdin(&cid)).await;
        match stdin {
            Ok(Ok(Some((conn, fd)))) => {
                tokio::spawn(feed_stdin(rx, conn, fd, s.resize));
            }
            other => {
                if let Ok(Err(e)) = other {
                    tracing::warn!(container = id, error = %e, "attach: container stdin");
                }
                let mut rx = rx;
                tokio::spawn(async move { while rx.recv().await.is_some() {} });
            }
        }
    }
    let (tx, mut rx) = mpsc::channel::<(runtime::log::Stream, Bytes)>(16);
    let rt = ctx.rt.clone();
    let id = id.to_string();
    let start = logs::end_of(&log);
    std::thread::spawn(move || {
        let exited =
            || tx.is_closed() || !matches!(rt.container_state(&id), Ok(State::Running { .. }));
        logs::follow_file(&log, start, exited, |recs| {
            for r in recs {
                let mut m = r.message;
                if !r.partial {
                    m.push(b'\n');
                }
                if tx.blocking_send((r.stream, Bytes::from(m))).is_err() {
                    return false;
                }
            }
            true
        });
    });
    while let Some((stream, b)) = rx.recv().await {
        let out = match stream {
            runtime::log::Stream::Stderr if !tty => s.stderr.as_ref(),
            _ => s.stdout.as_ref(),
        };
        if let Some(o) = out {
            if !o.write(b).await {
                break;
            }
        }
    }
    for o in [s.stdout, s.stderr].into_iter().flatten() {
        o.close().await;
    }
    Outcome::Exited(0)
}

/// Writes what the client types to the container's stdin (and, on a terminal, applies its
/// window sizes) until the client closes its stdin; the session's connection to the shim
/// closes on return, so the shim closes a `stdinOnce` stdin.
async fn feed_stdin(
    mut rx: mpsc::Receiver<Bytes>,
    _session: std::os::unix::net::UnixStream,
    fd: OwnedFd,
    resize: Option<mpsc::Receiver<(u16, u16)>>,
) {
    let resizer = match (resize, fd.try_clone()) {
        (Some(mut sizes), Ok(master)) => Some(tokio::spawn(async move {
            while let Some((cols, rows)) = sizes.recv().await {
                set_size(&master, cols, rows);
            }
        })),
        _ => None,
    };
    let mut w = tokio::fs::File::from_std(std::fs::File::from(fd));
    while let Some(b) = rx.recv().await {
        if w.write_all(&b).await.is_err() {
            break;
        }
    }
    let _ = w.flush().await;
    if let Some(r) = resizer {
        r.abort();
    }
}
