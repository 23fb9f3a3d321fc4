//! The server side of SPDY/3.1 as Kubernetes clients speak it (moby/spdystream): streams opened
//! by the client with SYN_STREAM, data frames with FIN, PING echoed, header blocks compressed
//! with zlib and the protocol's preset dictionary. No maintained Rust crate implements SPDY, so
//! the framing lives here. Flow control is not enforced: spdystream neither sends nor honours
//! WINDOW_UPDATE.

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::collections::HashMap;
use std::sync::OnceLock;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const FLAG_FIN: u8 = 0x01;
/// Longest frame accepted from a client; spdystream sends at most 32 KiB of data at once.
const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("spdy connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("spdy header block: {0}")]
    Headers(String),
    #[error("spdy: frame of {0} bytes is too large")]
    TooLarge(usize),
}

/// The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00, 2.6.10.1): the
/// length-prefixed words, then the literal tail.
fn dictionary() -> &'static [u8] {
    static DICT: OnceLock<Vec<u8>> = OnceLock::new();
    DICT.get_or_init(|| {
        const WORDS: &[&str] = &[
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &str = "100101201202205206300302303304305306307402405406407408409410411412413\
            414415416417502504505203 Non-Authoritative Information204 No Content301 Moved \
            Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal \
            Server Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul \
            Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,\
            text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,\
            text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8\
            charset=iso-8859-1,utf-,*,enq=0.";
        let mut d = Vec::with_capacity(1423);
        for w in WORDS {
            d.extend_from_slice(&(w.len() as u32).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(TAIL.as_bytes());
        d
    })
}

/// Header names and values of a stream (names lower case, as SPDY/3 requires).
pub type Headers = Vec<(String, String)>;

/// One direction of header compression: a single zlib stream for the whole connection.
struct Deflater(Compress);

impl Deflater {
    fn new() -> Self {
        let mut c = Compress::new(Compression::default(), true);
        c.set_dictionary(dictionary())
            .expect("zlib accepts a dictionary");
        Self(c)
    }

    fn block(&mut self, headers: &Headers) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (k, v) in headers {
            for s in [k.as_bytes(), v.as_bytes()] {
                raw.extend_from_slice(&(s.len() as u32).to_be_bytes());
                raw.extend_from_slice(s);
            }
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = &raw[..];
        loop {
            out.reserve(256);
            let before = self.0.total_in();
            self.0
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .expect("deflate of memory cannot fail");
            input = &input[(self.0.total_in() - before) as usize..];
            // A sync flush is complete once output space remains.
            if input.is_empty() && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

struct Inflater(Decompress);

impl Inflater {
    fn new() -> Self {
        Self(Decompress::new(true))
    }

    fn block(&mut self, data: &[u8]) -> Result<Headers, Error> {
        let bad = |m: String| Error::Headers(m);
        let mut out = Vec::with_capacity(data.len() * 4 + 256);
        let mut input = data;
        while !input.is_empty() {
            out.reserve(1024);
            let before = self.0.total_in();
            match self
                .0
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
            {
                Ok(Status::Ok | Status::BufError) => {}
                Ok(Status::StreamEnd) => break,
                Err(e) if e.needs_dictionary().is_some() => {
                    self.0
                        .set_dictionary(dictionary())
                        .map_err(|e| bad(e.to_string()))?;
                }
                Err(e) => return Err(bad(e.to_string())),
            }
            input = &input[(self.0.total_in() - before) as usize..];
        }
        // Output may still be pending in the inflater after all input was taken.
        loop {
            out.reserve(1024);
            let len = out.len();
            self.0
                .decompress_vec(&[], &mut out, FlushDecompress::Sync)
                .map_err(|e| bad(e.to_string()))?;
            if out.len() == len {
                break;
            }
        }
        parse_block(&out).ok_or_else(|| bad("malformed name/value block".into()))
    }
}

fn parse_block(b: &[u8]) -> Option<Headers> {
    let n = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let mut out = Vec::with_capacity(n.min(64));
    let mut p = 4;
    for _ in 0..n {
        let mut take = || -> Option<String> {
            let len = u32::from_be_bytes(b.get(p..p + 4)?.try_into().ok()?) as usize;
            let s = b.get(p + 4..p + 4 + len)?;
            p += 4 + len;
            Some(String::from_utf8_lossy(s).into_owned())
        };
        let k = take()?;
        let v = take()?;
        // Several values of one name are separated by NUL.
        for v in v.split('\0') {
            out.push((k.to_ascii_lowercase(), v.to_string()));
        }
    }
    Some(out)
}

fn control_frame(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + body.len());
    f.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    f.extend_from_slice(&kind.to_be_bytes());
    f.push(flags);
    f.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(body);
    f
}

fn data_frame(stream: u32, fin: bool, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + data.len());
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.push(if fin { FLAG_FIN } else { 0 });
    f.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(data);
    f
}

enum Out {
    Reply(u32),
    Data { stream: u32, fin: bool, data: Bytes },
    Ping(Vec<u8>),
    Reset(u32),
    GoAway,
}

/// Writes frames to a stream opened by the client.
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    tx: mpsc::Sender<Out>,
}

impl StreamWriter {
    /// Sends `data`, in frames of at most 32 KiB; false once the connection is gone.
    pub async fn write(&self, data: Bytes) -> bool {
        let mut rest = data;
        while !rest.is_empty() {
            let chunk = rest.split_to(rest.len().min(32 << 10));
            let out = Out::Data {
                stream: self.id,
                fin: false,
                data: chunk,
            };
            if self.tx.send(out).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Half-closes the stream from this side (an empty frame with FIN).
    pub async fn close(&self) {
        let _ = self
            .tx
            .send(Out::Data {
                stream: self.id,
                fin: true,
                data: Bytes::new(),
            })
            .await;
    }

    pub async fn reset(&self) {
        let _ = self.tx.send(Out::Reset(self.id)).await;
    }
}

/// A stream the client opened: its headers, what it sends (ends at its FIN) and a writer.
pub struct Stream {
    pub id: u32,
    pub headers: Headers,
    pub data: mpsc::Receiver<Bytes>,
    pub writer: StreamWriter,
}

impl Stream {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A SPDY connection: the streams the client opens arrive on `incoming`, in order.
pub struct Connection {
    pub incoming: mpsc::Receiver<Stream>,
    tx: mpsc::Sender<Out>,
}

impl Connection {
    /// Runs the connection over `io` until the client goes away or `close` is called.
    pub fn serve<T>(io: T) -> Connection
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let (tx, rx) = mpsc::channel::<Out>(64);
        let (new_tx, incoming) = mpsc::channel(16);
        tokio::spawn(write_loop(wr, rx));
        let reader_tx = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = read_loop(rd, reader_tx, new_tx).await {
                tracing::debug!(error = %e, "spdy connection ended");
            }
        });
        Connection { incoming, tx }
    }

    /// Sends GOAWAY; the connection closes once every writer is gone.
    pub async fn close(self) {
        let _ = self.tx.send(Out::GoAway).await;
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Out>) {
    let mut deflate = Deflater::new();
    let mut last_stream = 0u32;
    while let Some(out) = rx.recv().await {
        let frame = match out {
            Out::Reply(id) => {
                last_stream = last_stream.max(id);
                let mut body = id.to_be_bytes().to_vec();
                body.extend(deflate.block(&Vec::new()));
                control_frame(SYN_REPLY, 0, &body)
            }
            Out::Data { stream, fin, data } => data_frame(stream, fin, &data),
            Out::Ping(id) => control_frame(PING, 0, &id),
            Out::Reset(id) => {
                let mut body = id.to_be_bytes().to_vec();
                body.extend_from_slice(&5u32.to_be_bytes()); // CANCEL
                control_frame(RST_STREAM, 0, &body)
            }
            Out::GoAway => {
                let mut body = last_stream.to_be_bytes().to_vec();
                body.extend_from_slice(&0u32.to_be_bytes());
                let f = control_frame(GOAWAY, 0, &body);
                let _ = wr.write_all(&f).await;
                break;
            }
        };
        if wr.write_all(&frame).await.is_err() {
            return;
        }
        // Batch what is queued already before flushing.
        if rx.is_empty() && wr.flush().await.is_err() {
            return;
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    tx: mpsc::Sender<Out>,
    new_streams: mpsc::Sender<Stream>,
) -> Result<(), Error> {
    let mut inflate = Inflater::new();
    let mut streams: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    let mut head = [0u8; 8];
    loop {
        match rd.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let flags = head[4];
        let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        if len > MAX_FRAME {
            return Err(Error::TooLarge(len));
        }
        let mut body = vec![0u8; len];
        rd.read_exact(&mut body).await?;
        if head[0] & 0x80 == 0 {
            let id = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) & 0x7fff_ffff;
            if let Some(s) = streams.get(&id) {
                if !body.is_empty() && s.send(Bytes::from(body)).await.is_err() {
                    // The handler stopped reading: the stream's input is no longer wanted.
                    streams.remove(&id);
                }
            }
            if flags & FLAG_FIN != 0 {
                streams.remove(&id);
            }
            continue;
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let stream_id = || {
            body.get(..4)
                .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) & 0x7fff_ffff)
        };
        match kind {
            SYN_STREAM if body.len() >= 10 => {
                let id = stream_id().expect("length checked");
                let headers = inflate.block(&body[10..])?;
                let (dtx, drx) = mpsc::channel(16);
                if flags & FLAG_FIN == 0 {
                    streams.insert(id, dtx);
                }
                if tx.send(Out::Reply(id)).await.is_err() {
                    return Ok(());
                }
                let stream = Stream {
                    id,
                    headers,
                    data: drx,
                    writer: StreamWriter { id, tx: tx.clone() },
                };
                if new_streams.send(stream).await.is_err() {
                    return Ok(());
                }
            }
            HEADERS if body.len() >= 4 => {
                // Keeps the shared decompression context in step; the headers add nothing.
                inflate.block(&body[4..])?;
                if flags & FLAG_FIN != 0 {
                    streams.remove(&stream_id().expect("length checked"));
                }
            }
            RST_STREAM => {
                if let Some(id) = stream_id() {
                    streams.remove(&id);
                }
            }
            PING => {
                let _ = tx.send(Out::Ping(body)).await;
            }
            GOAWAY => return Ok(()),
            // SETTINGS, WINDOW_UPDATE and anything else: nothing to do.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_is_the_spdy3_one() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert_eq!(&d[..11], b"\0\0\0\x07options");
        assert!(d.ends_with(b",*,enq=0."));
    }

    #[test]
    fn header_blocks_round_trip_across_one_zlib_stream() {
        let mut d = Deflater::new();
        let mut i = Inflater::new();
        let a: Headers = vec![
            ("streamtype".into(), "error".into()),
            ("port".into(), "80".into()),
        ];
        let b: Headers = vec![("streamtype".into(), "data".into())];
        let ba = d.block(&a);
        let bb = d.block(&b);
        assert_eq!(i.block(&ba).unwrap(), a);
        assert_eq!(i.block(&bb).unwrap(), b);
    }
}
