//! Just enough HTTP/1.1 for the tunnel's front door, the backend and the load driver. The
//! server's `pipe` proxy path must be a byte pipe per caller socket (that is what the leak modes
//! act on), so requests are parsed by hand instead of through an HTTP framework; the pooled
//! transports talk to the backend through hyper (`transport.rs`).
//!
//! Keep-alive follows Go's `net/http` server defaults: HTTP/1.1 connections persist unless a
//! side says `Connection: close`, and an idle connection waits for its next request with no
//! timeout (`IdleTimeout` and `ReadTimeout` are zero by default).

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const MAX_HEAD: usize = 16 * 1024;
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEADERS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("connection closed before a complete head")]
    Eof,
    #[error("head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("timed out reading the head")]
    Timeout,
    #[error("malformed head: {0}")]
    Parse(#[from] httparse::Error),
    #[error("malformed head: {0}")]
    Invalid(&'static str),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
    }
}

#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    pub content_length: Option<u64>,
    /// The server will close the connection after this response.
    pub close: bool,
}

/// Reads until the end of the head; returns the bytes read past it too (body or pipelined data).
async fn read_head_bytes<R: AsyncRead + Unpin>(r: &mut R) -> Result<(BytesMut, usize), HeadError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some(end) = find_head_end(&buf) {
            return Ok((buf, end));
        }
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        buf.reserve(1024);
        if r.read_buf(&mut buf).await? == 0 {
            return Err(HeadError::Eof);
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Reads the next request of a persistent connection. `buf` carries bytes read past the previous
/// head (pipelined data) and keeps what is read past this one. Waiting for the first byte has no
/// timeout (an idle keep-alive connection may sit for hours, as with Go's defaults); once a
/// request has begun, the rest of its head must come within [`HEAD_TIMEOUT`]. `Ok(None)`: the
/// peer closed between requests, which is the normal end of a keep-alive connection.
pub async fn read_next_request<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<Request>, HeadError> {
    read_next_request_within(r, buf, None).await
}

/// [`read_next_request`] for a connection's first request, which must begin within `first`:
/// a socket that never sends a request is closed, as before keep-alive existed here.
pub async fn read_first_request<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<Request>, HeadError> {
    read_next_request_within(r, buf, Some(HEAD_TIMEOUT)).await
}

/// The next request on a keep-alive connection: the first one is read as [`read_first_request`] reads it,
/// the later ones as [`read_next_request`]. `first` is set until the first request has been read.
pub async fn read_keep_alive_request<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    first: &mut bool,
) -> Result<Option<Request>, HeadError> {
    if std::mem::take(first) {
        read_first_request(r, buf).await
    } else {
        read_next_request(r, buf).await
    }
}

async fn read_next_request_within<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    first_byte: Option<Duration>,
) -> Result<Option<Request>, HeadError> {
    if buf.is_empty() {
        buf.reserve(1024);
        crate::tasks::wait("IO wait");
        let n = match first_byte {
            Some(t) => tokio::time::timeout(t, r.read_buf(buf))
                .await
                .map_err(|_| HeadError::Timeout)?,
            None => r.read_buf(buf).await,
        };
        crate::tasks::run();
        if n? == 0 {
            return Ok(None);
        }
    }
    let end = tokio::time::timeout(HEAD_TIMEOUT, async {
        loop {
            if let Some(end) = find_head_end(buf) {
                return Ok(end);
            }
            if buf.len() >= MAX_HEAD {
                return Err(HeadError::TooLarge);
            }
            buf.reserve(1024);
            if r.read_buf(buf).await? == 0 {
                return Err(HeadError::Eof);
            }
        }
    })
    .await
    .map_err(|_| HeadError::Timeout)??;
    let head = buf.split_to(end);
    parse_request(&head).map(Some)
}

fn parse_request(head: &[u8]) -> Result<Request, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head)? {
        httparse::Status::Complete(_) => {}
        httparse::Status::Partial => return Err(HeadError::Invalid("partial")),
    }
    Ok(Request {
        method: req.method.ok_or(HeadError::Invalid("method"))?.to_owned(),
        path: req.path.ok_or(HeadError::Invalid("path"))?.to_owned(),
        version: req.version.ok_or(HeadError::Invalid("version"))?,
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect(),
    })
}

/// Whether the connection persists after this request (RFC 9112 9.3, as Go decides it).
pub fn wants_keep_alive(req: &Request) -> bool {
    let has = |token: &str| {
        req.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if req.version >= 1 {
        !has("close")
    } else {
        has("keep-alive")
    }
}

/// The request body's length: `Content-Length`, or 0 when there is none. Chunked request bodies
/// are not supported (nothing here sends them).
pub fn request_body_len(req: &Request) -> Result<u64, HeadError> {
    if req.header("Transfer-Encoding").is_some() {
        return Err(HeadError::Invalid(
            "chunked request bodies are not supported",
        ));
    }
    match req.header("Content-Length") {
        None => Ok(0),
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| HeadError::Invalid("content-length")),
    }
}

pub async fn read_request<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(Request, BytesMut), HeadError> {
    let (mut buf, end) = tokio::time::timeout(HEAD_TIMEOUT, read_head_bytes(r))
        .await
        .map_err(|_| HeadError::Timeout)??;
    let parsed = parse_request(&buf[..end])?;
    let rest = buf.split_off(end);
    Ok((parsed, rest))
}

pub async fn read_response_head<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(ResponseHead, BytesMut), HeadError> {
    let (mut buf, end) = read_head_bytes(r).await?;
    let head = parse_response(&buf[..end])?;
    let rest = buf.split_off(end);
    Ok((head, rest))
}

/// Reads a response head on a persistent connection: `buf` holds bytes already read and keeps
/// what is read past the head (the start of the body).
pub async fn read_response_head_buf<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<ResponseHead, HeadError> {
    loop {
        if let Some(end) = find_head_end(buf) {
            let head = buf.split_to(end);
            return parse_response(&head);
        }
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        buf.reserve(1024);
        if r.read_buf(buf).await? == 0 {
            return Err(HeadError::Eof);
        }
    }
}

fn parse_response(raw: &[u8]) -> Result<ResponseHead, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(raw)? {
        httparse::Status::Complete(_) => {}
        httparse::Status::Partial => return Err(HeadError::Invalid("partial")),
    }
    let content_length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(HeadError::Invalid("content-length"))
        })
        .transpose()?;
    let close = resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
        || resp.version == Some(0);
    Ok(ResponseHead {
        status: resp.code.ok_or(HeadError::Invalid("status"))?,
        content_length,
        close,
    })
}

pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "",
    }
}

pub fn response_head(status: u16, content_type: &str, len: u64) -> String {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
        reason(status)
    )
}

/// A head for a response after which the connection stays open (HTTP/1.1's default, so no
/// `Connection` header, as Go's server writes it).
pub fn response_head_keep_alive(status: u16, content_type: &str, len: u64) -> String {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n\r\n",
        reason(status)
    )
}

/// Writes a complete response; with `keep` the connection stays open for the next request,
/// otherwise it is a `Connection: close` response and our side shuts down.
pub async fn respond_maybe_keep<W: AsyncWrite + Unpin>(
    w: &mut W,
    keep: bool,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    if !keep {
        return respond(w, status, content_type, body).await;
    }
    let mut out = response_head_keep_alive(status, content_type, body.len() as u64).into_bytes();
    out.extend_from_slice(body);
    w.write_all(&out).await?;
    w.flush().await
}

/// Writes a complete `Connection: close` response and shuts our side down.
pub async fn respond<W: AsyncWrite + Unpin>(
    w: &mut W,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    w.write_all(response_head(status, content_type, body.len() as u64).as_bytes())
        .await?;
    w.write_all(body).await?;
    w.shutdown().await
}
