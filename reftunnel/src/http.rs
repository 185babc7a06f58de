//! Just enough HTTP/1.1 for the tunnel's front door, the backend and the load driver. The
//! server's proxy path must be a byte pipe per caller socket (that is what the leak modes act
//! on), so requests are parsed by hand instead of through an HTTP framework.

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

pub async fn read_request<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(Request, BytesMut), HeadError> {
    let (mut buf, end) = tokio::time::timeout(HEAD_TIMEOUT, read_head_bytes(r))
        .await
        .map_err(|_| HeadError::Timeout)??;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..end])? {
        httparse::Status::Complete(_) => {}
        httparse::Status::Partial => return Err(HeadError::Invalid("partial")),
    }
    let parsed = Request {
        method: req.method.ok_or(HeadError::Invalid("method"))?.to_owned(),
        path: req.path.ok_or(HeadError::Invalid("path"))?.to_owned(),
        version: req.version.ok_or(HeadError::Invalid("version"))?,
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect(),
    };
    let rest = buf.split_off(end);
    Ok((parsed, rest))
}

pub async fn read_response_head<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(ResponseHead, BytesMut), HeadError> {
    let (mut buf, end) = read_head_bytes(r).await?;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&buf[..end])? {
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
    let head = ResponseHead {
        status: resp.code.ok_or(HeadError::Invalid("status"))?,
        content_length,
    };
    let rest = buf.split_off(end);
    Ok((head, rest))
}

pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
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
