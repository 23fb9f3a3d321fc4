//! /containerLogs/{ns}/{pod}/{container}: the CRI log files of a container's current or previous
//! attempt as text, with kubelet's options (follow, tailLines, sinceSeconds, sinceTime,
//! timestamps, limitBytes, previous).

use super::{error, flag, param, streaming, Api, Body, LocalPod};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use hyper::{Response, StatusCode};
use runtime::container::State;
use runtime::log::{parse_record, Record};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub follow: bool,
    pub tail_lines: Option<usize>,
    pub since: Option<DateTime<Utc>>,
    pub timestamps: bool,
    pub limit_bytes: Option<usize>,
    pub previous: bool,
}

/// A log request's query that kubelet refuses, in its words.
#[derive(Debug, thiserror::Error)]
enum QueryError {
    #[error("invalid {name} {value:?}: must be an integer")]
    NotInteger { name: String, value: String },
    #[error("tailLines: must be greater than or equal to 0")]
    NegativeTail,
    #[error("limitBytes: must be greater than 0")]
    NoBytes,
    #[error("at most one of sinceTime or sinceSeconds may be specified")]
    TwoSinces,
    #[error("sinceSeconds: must be greater than 0")]
    NoSeconds,
    #[error("invalid sinceTime {value:?}: {source}")]
    SinceTime {
        value: String,
        #[source]
        source: chrono::ParseError,
    },
}

fn options(q: &[(String, String)]) -> Result<Options, QueryError> {
    let num = |name: &str| -> Result<Option<i64>, QueryError> {
        param(q, name)
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse::<i64>().map_err(|_| QueryError::NotInteger {
                    name: name.to_string(),
                    value: v.to_string(),
                })
            })
            .transpose()
    };
    let mut o = Options {
        follow: flag(q, "follow"),
        timestamps: flag(q, "timestamps"),
        previous: flag(q, "previous"),
        ..Default::default()
    };
    if let Some(t) = num("tailLines")? {
        if t < 0 {
            return Err(QueryError::NegativeTail);
        }
        o.tail_lines = Some(t as usize);
    }
    if let Some(b) = num("limitBytes")? {
        if b < 1 {
            return Err(QueryError::NoBytes);
        }
        o.limit_bytes = Some(b as usize);
    }
    let since_seconds = num("sinceSeconds")?;
    let since_time = param(q, "sinceTime").filter(|v| !v.is_empty());
    if since_seconds.is_some() && since_time.is_some() {
        return Err(QueryError::TwoSinces);
    }
    if let Some(s) = since_seconds {
        if s < 1 {
            return Err(QueryError::NoSeconds);
        }
        o.since = Some(Utc::now() - chrono::Duration::seconds(s));
    }
    if let Some(t) = since_time {
        let t = DateTime::parse_from_rfc3339(t).map_err(|source| QueryError::SinceTime {
            value: t.to_string(),
            source,
        })?;
        o.since = Some(t.with_timezone(&Utc));
    }
    Ok(o)
}

/// The log files of attempt `attempt` under `dir`, oldest first (`N.log.K`, ..., `N.log`).
fn files(dir: &Path, attempt: u32) -> Vec<PathBuf> {
    let base = dir.join(format!("{attempt}.log"));
    let mut rotated: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name
                .strip_prefix(&format!("{attempt}.log."))?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    rotated.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    out.push(base);
    out
}

/// Turns records into what the user reads, honouring sinceTime, timestamps and limitBytes.
struct Writer {
    opts: Options,
    written: usize,
    /// Whether the next record starts a line (the previous one was not partial).
    line_start: bool,
}

impl Writer {
    /// The text of `r`, or None when limitBytes is used up.
    fn render(&mut self, r: &Record) -> Option<Vec<u8>> {
        if let Some(since) = self.opts.since {
            let at = DateTime::parse_from_rfc3339(&r.timestamp).map(|t| t.with_timezone(&Utc));
            if at.is_ok_and(|t| t < since) {
                return Some(Vec::new());
            }
        }
        let mut out = Vec::with_capacity(r.message.len() + 40);
        if self.opts.timestamps && self.line_start {
            out.extend_from_slice(r.timestamp.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(&r.message);
        if !r.partial {
            out.push(b'\n');
        }
        self.line_start = !r.partial;
        if let Some(limit) = self.opts.limit_bytes {
            let left = limit.saturating_sub(self.written);
            if left == 0 {
                return None;
            }
            out.truncate(left);
        }
        self.written += out.len();
        Some(out)
    }
}

fn records(data: &[u8]) -> impl Iterator<Item = Record> + '_ {
    data.split(|&b| b == b'\n').filter_map(parse_record)
}

/// Everything already written for the attempt, tail applied (blocking).
fn existing(paths: &[PathBuf], tail: Option<usize>) -> (Vec<Record>, Option<(PathBuf, u64, u64)>) {
    let mut all: Vec<Record> = Vec::new();
    let mut last = None;
    for p in paths {
        let Ok(mut f) = std::fs::File::open(p) else {
            continue;
        };
        let mut data = Vec::new();
        if f.read_to_end(&mut data).is_err() {
            continue;
        }
        // Only whole records; a line still being written is read when following.
        let complete = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        all.extend(records(&data[..complete]));
        if let Ok(m) = f.metadata() {
            last = Some((p.clone(), complete as u64, m.ino()));
        }
    }
    if let Some(n) = tail {
        // Lines, not records: partial records belong to the line their final record ends.
        let mut lines = 0;
        let mut cut = all.len();
        for (i, r) in all.iter().enumerate().rev() {
            if !r.partial {
                if lines == n {
                    break;
                }
                lines += 1;
            }
            cut = i;
        }
        if n == 0 {
            cut = all.len();
        }
        all.drain(..cut);
    }
    (all, last)
}

pub(super) async fn serve(
    api: &Api,
    ns: &str,
    pod: &str,
    container: &str,
    q: &[(String, String)],
) -> Response<Body> {
    let opts = match options(q) {
        Ok(o) => o,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let Some(LocalPod { uid, pod: obj }) = api.find_pod(ns, pod) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("pod {:?} does not exist", format!("{ns}/{pod}")),
        );
    };
    let in_spec = obj.as_ref().is_none_or(|p| {
        p.spec.as_ref().is_some_and(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .any(|c| c.name == container)
        })
    });
    if !in_spec {
        return error(
            StatusCode::BAD_REQUEST,
            format!("container {container:?} in pod {pod:?} is not available"),
        );
    }
    let ctx = api.ctx.clone();
    let attempts = {
        let (ctx, uid) = (ctx.clone(), uid.clone());
        tokio::task::spawn_blocking(move || ctx.attempts(&uid))
            .await
            .unwrap_or_default()
            .remove(container)
            .unwrap_or_default()
    };
    let chosen = if opts.previous {
        match attempts.get(1) {
            Some(a) => a.clone(),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("previous terminated container {container:?} in pod {pod:?} not found"),
                )
            }
        }
    } else {
        match attempts.first() {
            Some(a) => a.clone(),
            None => {
                let reason = obj
                    .as_ref()
                    .and_then(|p| p.status.as_ref())
                    .and_then(|s| {
                        s.container_statuses
                            .iter()
                            .chain(s.init_container_statuses.iter())
                            .flatten()
                            .find(|c| c.name == container)
                    })
                    .and_then(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())
                    .unwrap_or_else(|| "ContainerCreating".into());
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("container {container:?} in pod {pod:?} is waiting to start: {reason}"),
                );
            }
        }
    };
    let (attempt, id) = chosen;
    let (pns, pname) = obj
        .as_ref()
        .map(|p| {
            (
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            )
        })
        .unwrap_or_else(|| (ns.to_string(), pod.to_string()));
    let dir = ctx.log_dir(&pns, &pname, &uid).join(container);
    let follow = opts.follow && !opts.previous;
    let (tx, resp) = streaming("text/plain");
    let rt = ctx.rt.clone();
    std::thread::spawn(move || {
        let mut w = Writer {
            opts: opts.clone(),
            written: 0,
            line_start: true,
        };
        let (recs, last) = existing(&files(&dir, attempt), opts.tail_lines);
        let mut buf = Vec::new();
        for r in &recs {
            match w.render(r) {
                Some(b) => buf.extend_from_slice(&b),
                None => break,
            }
        }
        if !send(&tx, buf) || !follow {
            return;
        }
        // A client that went away ends the follow as an exited container does.
        let exited = || {
            tx.is_closed()
                || !matches!(
                    rt.container_state(&id),
                    Ok(State::Running { .. } | State::Created)
                )
        };
        follow_file(&dir.join(format!("{attempt}.log")), last, exited, |recs| {
            let mut out = Vec::new();
            for r in &recs {
                match w.render(r) {
                    Some(b) => out.extend_from_slice(&b),
                    None => {
                        send(&tx, out);
                        return false;
                    }
                }
            }
            send(&tx, out) && !tx.is_closed()
        });
    });
    resp
}

fn send(tx: &mpsc::Sender<Bytes>, buf: Vec<u8>) -> bool {
    buf.is_empty() || tx.blocking_send(Bytes::from(buf)).is_ok()
}

/// Passes records appended to `path` (re-opened when rotated) to `emit` until the container
/// has exited and everything it wrote was passed on, or `emit` says stop.
pub(super) fn follow_file(
    path: &Path,
    start: Option<(PathBuf, u64, u64)>,
    exited: impl Fn() -> bool,
    mut emit: impl FnMut(Vec<Record>) -> bool,
) {
    let (mut offset, mut ino) = match start {
        Some((p, off, ino)) if p == path => (off, ino),
        _ => (0, 0),
    };
    let mut pending: Vec<u8> = Vec::new();
    loop {
        // Checked before reading, so output written before the exit is still read below.
        let done = exited();
        let mut got = false;
        if let Ok(mut f) = std::fs::File::open(path) {
            let meta = f.metadata().ok();
            let (cur_ino, len) = meta.map_or((0, 0), |m| (m.ino(), m.len()));
            if cur_ino != ino || len < offset {
                // Rotated (or truncated): the new file is read from its start.
                ino = cur_ino;
                offset = 0;
                pending.clear();
            }
            if len > offset && f.seek(SeekFrom::Start(offset)).is_ok() {
                let mut data = Vec::new();
                if let Ok(n) = f.read_to_end(&mut data) {
                    offset += n as u64;
                    pending.extend_from_slice(&data);
                    got = n > 0;
                }
            }
        }
        if let Some(end) = pending.iter().rposition(|&b| b == b'\n') {
            let recs: Vec<Record> = records(&pending[..=end]).collect();
            pending.drain(..=end);
            if !emit(recs) {
                return;
            }
        }
        if done && !got {
            return;
        }
        if !got {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Where a follower starts to see only what is written from now on.
pub(super) fn end_of(path: &Path) -> Option<(PathBuf, u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((path.to_path_buf(), m.len(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ts: &str, msg: &str, partial: bool) -> Record {
        Record {
            timestamp: ts.into(),
            stream: runtime::log::Stream::Stdout,
            partial,
            message: msg.as_bytes().to_vec(),
        }
    }

    #[test]
    fn options_are_checked_as_kubelet_does() {
        let q = |s: &[(&str, &str)]| -> Vec<(String, String)> {
            s.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(options(&q(&[("tailLines", "-1")])).is_err());
        assert!(options(&q(&[
            ("sinceSeconds", "5"),
            ("sinceTime", "2024-01-01T00:00:00Z")
        ]))
        .is_err());
        let o = options(&q(&[
            ("follow", "true"),
            ("tailLines", "3"),
            ("limitBytes", "10"),
        ]))
        .unwrap();
        assert!(o.follow && o.tail_lines == Some(3) && o.limit_bytes == Some(10));
    }

    #[test]
    fn timestamps_since_and_limit() {
        let mut w = Writer {
            opts: Options {
                timestamps: true,
                since: Some("2024-01-01T00:00:01Z".parse().unwrap()),
                limit_bytes: Some(40),
                ..Default::default()
            },
            written: 0,
            line_start: true,
        };
        assert_eq!(
            w.render(&rec("2024-01-01T00:00:00Z", "old", false))
                .unwrap(),
            b""
        );
        let a = w.render(&rec("2024-01-01T00:00:02Z", "par", true)).unwrap();
        let b = w
            .render(&rec("2024-01-01T00:00:02Z", "tial", false))
            .unwrap();
        assert_eq!(a, b"2024-01-01T00:00:02Z par");
        assert_eq!(b, b"tial\n");
        let c = w
            .render(&rec("2024-01-01T00:00:03Z", "more text", false))
            .unwrap();
        assert_eq!(c.len(), 40 - 24 - 5);
        assert!(w.render(&rec("2024-01-01T00:00:04Z", "x", false)).is_none());
    }
}
