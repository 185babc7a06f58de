//! One-shot HTTP over a plain TcpStream. The servers under test are all on loopback and close the
//! connection after one exchange, and a test needs to see exactly what came back (a status the
//! tunnel made up, a body cut short): no HTTP client library does less in the way.
use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use crate::{Error, Result};

/// How long [`http_get`] and [`http_post`] wait for an answer.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The status line and headers, up to the blank line.
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `raw` (a whole request, head and body) to `addr` and reads the response to EOF, so the
/// request must ask for `Connection: close` (or be HTTP/1.0).
pub fn http_request(addr: &str, raw: &str, timeout: Duration) -> Result<Response> {
    let io = |source| Error::Http {
        addr: addr.to_string(),
        source,
    };
    let mut s = TcpStream::connect(addr).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.write_all(raw.as_bytes()).map_err(io)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(io)?;
    let bad = || Error::BadResponse {
        addr: addr.to_string(),
        text: String::from_utf8_lossy(&buf).into_owned(),
    };
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?
        + 4;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok(Response {
        status,
        head,
        body: buf[end..].to_vec(),
    })
}

/// The body of `url` (`http://host:port/path`) if it answers 2xx. HTTP/1.0, so that the server
/// sends the body as it is, never chunked: callers parse it as JSON or metrics text.
pub fn http_get(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let raw = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let r = http_request(host, &raw, TIMEOUT).ok()?;
    (200..300).contains(&r.status).then(|| r.body_text())
}

/// A POST of `body` with extra `headers`.
pub fn http_post(addr: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Result<Response> {
    let mut raw = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    http_request(addr, &raw, TIMEOUT)
}
