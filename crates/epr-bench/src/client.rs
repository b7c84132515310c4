//! Minimal HTTP/1.1 keep-alive client over a raw `TcpStream`.
//!
//! Why not reqwest/hyper: the bench shares a 2-core box with the server, so
//! every client cycle is stolen from the thing being measured. This client
//! does one `write_all` per request, reuses one read buffer per connection
//! and never copies a Content-Length body (it is split off the buffer).

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use std::io::Write;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound on response headers; anything larger is a broken server.
const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// How the body of a response is delimited.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    /// No length and not chunked: the body runs until the server closes.
    UntilClose,
}

#[derive(Debug)]
struct Head {
    status: u16,
    head_len: usize,
    framing: Framing,
    close: bool,
}

/// Parses the status line and headers if the buffer holds all of them.
fn parse_head(buf: &[u8]) -> Result<Option<Head>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            bail!("response headers exceed {MAX_HEAD} bytes");
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).context("non-UTF-8 response headers")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("bad status line: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    let mut close = version == "HTTP/1.0";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().context("bad Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    // RFC 9112 §6.3: 1xx/204/304 never carry a body; chunked overrides length.
    let framing = if status < 200 || status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    Ok(Some(Head {
        status,
        head_len: end + 4,
        framing,
        close,
    }))
}

/// Decodes a complete chunked body starting at `buf[0]`; returns the body and
/// the number of bytes consumed, or `None` if more data is needed. Re-parses
/// from the start on every call: fine, since the EPR server does not chunk.
fn decode_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(nl) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[pos..pos + nl]).context("bad chunk size line")?;
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {line:?}"))?;
        pos += nl + 2;
        if size == 0 {
            // Skip optional trailers up to the terminating empty line.
            loop {
                let Some(nl) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                pos += nl + 2;
                if nl == 0 {
                    return Ok(Some((body, pos)));
                }
            }
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            bail!("chunk not terminated by CRLF");
        }
        pos += size + 2;
    }
}

/// Takes one complete response off the front of `buf`, if there is one.
/// `eof` says the peer has closed, which completes an `UntilClose` body.
/// The bool in the result says the server wants the connection closed.
fn take_response(buf: &mut BytesMut, eof: bool) -> Result<Option<(Response, bool)>> {
    let Some(head) = parse_head(buf)? else {
        return Ok(None);
    };
    let rest = &buf[head.head_len..];
    let (body, consumed) = match head.framing {
        Framing::Length(n) if rest.len() >= n => (None, n),
        Framing::Length(_) => return Ok(None),
        Framing::Chunked => match decode_chunked(rest)? {
            Some((body, used)) => (Some(Bytes::from(body)), used),
            None => return Ok(None),
        },
        Framing::UntilClose if eof => (None, rest.len()),
        Framing::UntilClose => return Ok(None),
    };
    buf.advance(head.head_len);
    let raw = buf.split_to(consumed).freeze();
    let body = body.unwrap_or(raw);
    let close = head.close || head.framing == Framing::UntilClose;
    Ok(Some((
        Response {
            status: head.status,
            body,
        },
        close,
    )))
}

/// One keep-alive connection; reconnects transparently when the server
/// closed it (idle timeout, `Connection: close`, or after an I/O error).
pub struct Conn {
    addr: String,
    stream: Option<TcpStream>,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
}

impl Conn {
    pub fn new(addr: &str) -> Self {
        Self {
            addr: addr.to_owned(),
            stream: None,
            rbuf: BytesMut::with_capacity(16 * 1024),
            wbuf: Vec::with_capacity(1024),
        }
    }

    async fn connect(&mut self) -> Result<()> {
        let s = TcpStream::connect(&self.addr)
            .await
            .with_context(|| format!("connect {}", self.addr))?;
        // Small request/response pairs: Nagle would add delayed-ACK stalls.
        s.set_nodelay(true)?;
        self.stream = Some(s);
        self.rbuf.clear();
        Ok(())
    }

    /// Sends one request and reads the full response. `body` is sent as JSON.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response> {
        self.request_with_headers(method, path, body, "").await
    }

    /// Like [`Conn::request`], with `headers` (complete `Name: value\r\n` lines, or
    /// empty) added to the request head.
    pub async fn request_with_headers(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &str,
    ) -> Result<Response> {
        self.wbuf.clear();
        write!(
            self.wbuf,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{headers}",
            self.addr
        )?;
        if let Some(b) = body {
            write!(
                self.wbuf,
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                b.len()
            )?;
            self.wbuf.extend_from_slice(b);
        } else {
            self.wbuf.extend_from_slice(b"\r\n");
        }
        let reused = self.stream.is_some();
        match self.round_trip().await {
            Ok(r) => Ok(r),
            // A kept-alive connection the server already closed fails on the
            // first use; retry once on a fresh one before calling it an error.
            Err(_) if reused => {
                self.stream = None;
                self.round_trip().await
            }
            Err(e) => Err(e),
        }
    }

    async fn round_trip(&mut self) -> Result<Response> {
        if self.stream.is_none() {
            self.connect().await?;
        }
        let res = self.exchange().await;
        if !matches!(res, Ok((_, false))) {
            self.stream = None;
        }
        res.map(|(r, _)| r)
    }

    async fn exchange(&mut self) -> Result<(Response, bool)> {
        let stream = self.stream.as_mut().expect("connected");
        stream.write_all(&self.wbuf).await?;
        let mut eof = false;
        loop {
            if let Some(r) = take_response(&mut self.rbuf, eof)? {
                return Ok(r);
            }
            if eof {
                bail!(
                    "connection closed mid-response ({} bytes buffered)",
                    self.rbuf.len()
                );
            }
            self.rbuf.reserve(8 * 1024);
            eof = stream.read_buf(&mut self.rbuf).await? == 0;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn feed(chunks: &[&[u8]]) -> Vec<(u16, Vec<u8>)> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for c in chunks {
            buf.extend_from_slice(c);
            while let Some((r, _)) = take_response(&mut buf, false).unwrap() {
                out.push((r.status, r.body.to_vec()));
            }
        }
        assert!(buf.is_empty(), "leftover bytes: {buf:?}");
        out
    }

    #[test]
    fn parses_split_and_pipelined_responses() {
        let got = feed(&[
            b"HTTP/1.1 201 Created\r\nconte",
            b"nt-length: 7\r\n\r\n{\"a\"",
            b":1}HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno",
        ]);
        assert_eq!(
            got,
            vec![
                (201, b"{\"a\":1}".to_vec()),
                (204, vec![]),
                (404, b"no".to_vec())
            ]
        );
    }

    #[test]
    fn parses_chunked_body() {
        let got = feed(&[
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab",
            b"cd\r\n2;x=y\r\nef\r\n0\r\n\r\n",
        ]);
        assert_eq!(got, vec![(200, b"abcdef".to_vec())]);
    }

    #[test]
    fn rejects_garbage() {
        let mut buf = BytesMut::from(&b"SSH-2.0-OpenSSH\r\n\r\n"[..]);
        assert!(take_response(&mut buf, false).is_err());
    }

    /// A tiny in-test HTTP/1.1 responder: echoes POST/GET request bodies with
    /// 200 (201 for POST), answers PUT with a bodyless 204, splits every
    /// response over two writes, and closes a connection after
    /// `per_conn` responses (so keep-alive reuse and reconnects both happen).
    pub(crate) async fn spawn_responder(per_conn: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                // Without this, Nagle holds the second half of each split
                // response until the client's delayed ACK (~40 ms).
                s.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 4096];
                    for _ in 0..per_conn {
                        // Read one request: headers plus Content-Length body.
                        let (head_end, len) = loop {
                            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head = String::from_utf8_lossy(&buf[..p]).to_lowercase();
                                let len = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length:"))
                                    .map_or(0, |v| v.trim().parse().unwrap());
                                if buf.len() >= p + 4 + len {
                                    break (p + 4, len);
                                }
                            }
                            match s.read(&mut tmp).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                            }
                        };
                        let req: Vec<u8> = buf.drain(..head_end + len).collect();
                        let resp = if req.starts_with(b"PUT ") {
                            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()
                        } else {
                            let status = if req.starts_with(b"POST ") {
                                "201 Created"
                            } else {
                                "200 OK"
                            };
                            let body = &req[head_end..];
                            let mut r = format!(
                                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            r.extend_from_slice(body);
                            r
                        };
                        let (a, b) = resp.split_at(resp.len() / 2);
                        if s.write_all(a).await.is_err() {
                            return;
                        }
                        tokio::task::yield_now().await;
                        if s.write_all(b).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn keep_alive_and_reconnect() {
        let addr = spawn_responder(3).await;
        let mut c = Conn::new(&addr);
        for i in 0..10 {
            let body = format!("{{\"n\":{i}}}");
            let r = c
                .request("POST", "/echo", Some(body.as_bytes()))
                .await
                .unwrap();
            assert_eq!((r.status, &r.body[..]), (201, body.as_bytes()));
            let r = c
                .request("PUT", "/x/metadata/temp", Some(b"1"))
                .await
                .unwrap();
            assert!(r.is_success() && r.body.is_empty());
        }
    }
}
