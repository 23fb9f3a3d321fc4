//! Container logs in the CRI format kubelet reads (`<RFC3339Nano> <stream> <P|F> <msg>`), with
//! size-based rotation (`0.log`, then `0.log.1` newest rotated ... `0.log.<max_files-1>` oldest).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Longest line written whole; longer lines are split into partial (`P`) records, as CRI-O does.
pub const MAX_LINE: usize = 16 * 1024;
pub const DEFAULT_MAX_SIZE: u64 = 10 * 1024 * 1024;
pub const DEFAULT_MAX_FILES: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A CRI log file being appended to.
pub struct CriLog {
    path: PathBuf,
    max_size: u64,
    max_files: usize,
    file: File,
    size: u64,
}

impl CriLog {
    pub fn open(path: &Path, max_size: u64, max_files: usize) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            max_size: max_size.max(1024),
            max_files: max_files.max(1),
            file,
            size,
        })
    }

    /// Appends one record; `partial` marks a piece of a line that continues in the next record.
    pub fn write_record(&mut self, stream: Stream, partial: bool, msg: &[u8]) -> io::Result<()> {
        let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        let tag = if partial { "P" } else { "F" };
        let mut rec = Vec::with_capacity(ts.len() + msg.len() + 12);
        rec.extend_from_slice(format!("{ts} {} {tag} ", stream.as_str()).as_bytes());
        rec.extend_from_slice(msg);
        rec.push(b'\n');
        if self.size > 0 && self.size + rec.len() as u64 > self.max_size {
            self.rotate()?;
        }
        self.file.write_all(&rec)?;
        self.size += rec.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let name = |n: usize| PathBuf::from(format!("{}.{n}", self.path.display()));
        if self.max_files == 1 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        let _ = std::fs::remove_file(name(self.max_files - 1));
        for n in (1..self.max_files - 1).rev() {
            let _ = std::fs::rename(name(n), name(n + 1));
        }
        std::fs::rename(&self.path, name(1))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// Copies a container's output stream into the log until EOF, one record per line; with
/// `eager`, output read without its newline is written at once as a partial record.
pub fn copy_stream(
    mut reader: impl Read,
    stream: Stream,
    log: Arc<Mutex<CriLog>>,
    eager: bool,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        pending.extend_from_slice(&buf[..n]);
        let mut start = 0;
        while let Some(pos) = pending[start..].iter().position(|&b| b == b'\n') {
            let line = &pending[start..start + pos];
            write_line(&log, stream, line)?;
            start += pos + 1;
        }
        pending.drain(..start);
        if eager && !pending.is_empty() {
            for c in pending.chunks(MAX_LINE) {
                lock(&log).write_record(stream, true, c)?;
            }
            pending.clear();
        }
        while pending.len() >= MAX_LINE {
            let rest = pending.split_off(MAX_LINE);
            lock(&log).write_record(stream, true, &pending)?;
            pending = rest;
        }
    }
    if !pending.is_empty() {
        // Output that ends without a newline is still a whole record.
        lock(&log).write_record(stream, false, &pending)?;
    }
    Ok(())
}

fn write_line(log: &Arc<Mutex<CriLog>>, stream: Stream, line: &[u8]) -> io::Result<()> {
    let mut chunks = line.chunks(MAX_LINE).peekable();
    let mut log = lock(log);
    if chunks.peek().is_none() {
        return log.write_record(stream, false, b"");
    }
    while let Some(c) = chunks.next() {
        log.write_record(stream, chunks.peek().is_some(), c)?;
    }
    Ok(())
}

fn lock(log: &Arc<Mutex<CriLog>>) -> std::sync::MutexGuard<'_, CriLog> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// One record parsed back from a CRI log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub timestamp: String,
    pub stream: Stream,
    pub partial: bool,
    pub message: Vec<u8>,
}

pub fn parse_record(line: &[u8]) -> Option<Record> {
    let mut parts = line.splitn(4, |&b| b == b' ');
    let timestamp = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let partial = match parts.next()? {
        b"P" => true,
        b"F" => false,
        _ => return None,
    };
    let message = parts.next().unwrap_or_default().to_vec();
    Some(Record {
        timestamp,
        stream,
        partial,
        message,
    })
}

/// Reads a log file back into the text a user sees (`kubectl logs`): partial records joined.
pub fn read_text(path: &Path) -> io::Result<String> {
    let mut out = Vec::new();
    for line in BufReader::new(File::open(path)?).split(b'\n') {
        if let Some(r) = parse_record(&line?) {
            out.extend_from_slice(&r.message);
            if !r.partial {
                out.push(b'\n');
            }
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_partials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/0.log");
        let log = Arc::new(Mutex::new(CriLog::open(&path, 1 << 20, 3).unwrap()));
        let mut input = b"hello\n\nworld\n".to_vec();
        input.extend_from_slice(&vec![b'x'; MAX_LINE + 10]);
        input.extend_from_slice(b"\ntail");
        copy_stream(&input[..], Stream::Stderr, log, false).unwrap();
        let raw = std::fs::read(&path).unwrap();
        let recs: Vec<Record> = raw
            .split(|&b| b == b'\n')
            .filter_map(parse_record)
            .collect();
        let kinds: Vec<(usize, bool)> = recs.iter().map(|r| (r.message.len(), r.partial)).collect();
        assert_eq!(
            kinds,
            [
                (5, false),
                (0, false),
                (5, false),
                (MAX_LINE, true),
                (10, false),
                (4, false)
            ]
        );
        assert_eq!(recs[0].stream, Stream::Stderr);
        assert!(chrono::DateTime::parse_from_rfc3339(&recs[0].timestamp).is_ok());
        let text = read_text(&path).unwrap();
        assert!(text.starts_with("hello\n\nworld\nxxx") && text.ends_with("x\ntail\n"));
    }

    #[test]
    fn eager_copies_write_a_prompt_before_its_line_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let log = Arc::new(Mutex::new(CriLog::open(&path, 1 << 20, 1).unwrap()));
        // Two reads, as a terminal gives them: a prompt, then the rest of its line.
        let input = std::io::Read::chain(&b"/ # "[..], &b"ls\r\nbin\n"[..]);
        copy_stream(input, Stream::Stdout, log, true).unwrap();
        let raw = std::fs::read(&path).unwrap();
        let recs: Vec<(Vec<u8>, bool)> = raw
            .split(|&b| b == b'\n')
            .filter_map(parse_record)
            .map(|r| (r.message, r.partial))
            .collect();
        assert_eq!(
            recs,
            [
                (b"/ # ".to_vec(), true),
                (b"ls\r".to_vec(), false),
                (b"bin".to_vec(), false)
            ]
        );
        assert_eq!(read_text(&path).unwrap(), "/ # ls\r\nbin\n");
    }

    #[test]
    fn rotation_keeps_max_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let log = Arc::new(Mutex::new(CriLog::open(&path, 1024, 3).unwrap()));
        let input: String = (0..200).map(|i| format!("line {i}\n")).collect();
        copy_stream(input.as_bytes(), Stream::Stdout, log, false).unwrap();
        assert!(path.with_extension("log.1").exists());
        assert!(path.with_extension("log.2").exists());
        assert!(!path.with_extension("log.3").exists());
        assert!(std::fs::metadata(&path).unwrap().len() <= 1024);
        assert!(read_text(&path).unwrap().ends_with("line 199\n"));
    }
}
