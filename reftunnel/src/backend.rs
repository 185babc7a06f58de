//! The HTTP target behind the tunnel, behaving as a Go `http.Server` with its defaults: HTTP/1.1
//! connections persist (keep-alive) with no idle timeout, and a request with `Connection: close`
//! (or an HTTP/1.0 request without `Connection: keep-alive`) gets a `Connection: close` response
//! after which the backend closes its side. Every response carries `Content-Length`.
//!
//! Persistence matters: the v2.10.3 leak was idle keep-alive connections to a target that never
//! closes them, so an agent's sockets to the backend pile up ESTABLISHED only if the backend,
//! like Go's, keeps them.
//!
//! Paths: `/` (short text), `/bytes/<n>` (n bytes, at most 1 GiB), `/slow/<ms>` (sends nothing,
//! not even the head, until the delay ends, at most 10 min), `/watch/<secs>` (a Kubernetes watch:
//! the head at once, chunked, then one event line every `secs` seconds until the caller leaves),
//! `/healthz`.

use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::{http, say, tasks};

pub const MAX_BYTES: u64 = 1 << 30;
pub const MAX_SLOW_MS: u64 = 600_000;
pub const MAX_WATCH_PERIOD_S: u64 = 3600;
/// Request bodies are read and discarded; more than this ends the connection.
const MAX_REQUEST_BODY: u64 = 1 << 20;
const GREETING: &[u8] = b"hello from reftunnel backend\n";

/// Serves on `count` listeners: `listen` itself, or with `count` above 1, `count` ports of its
/// host picked by the kernel (the port must be 0), each printed as `backend listening on <ADDR>`.
pub async fn run(listen: &str, count: u64) -> anyhow::Result<()> {
    if count == 0 {
        anyhow::bail!("--count must be at least 1");
    }
    if count > 1 && !listen.ends_with(":0") {
        anyhow::bail!(
            "--count {count} needs port 0 in --listen (got {listen}): the ports are picked by the kernel"
        );
    }
    let mut listeners = Vec::new();
    for _ in 0..count {
        let l = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        say!("backend listening on {}", l.local_addr()?);
        listeners.push(l);
    }
    let mut all = tokio::task::JoinSet::new();
    for l in listeners {
        all.spawn(accept_loop(l));
    }
    while all.join_next().await.is_some() {}
    Ok(())
}

async fn accept_loop(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                tasks::spawn("backend.conn", serve(sock));
            }
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve(mut sock: TcpStream) {
    let _ = sock.set_nodelay(true);
    let mut buf = BytesMut::new();
    let mut first = true;
    loop {
        let next = http::read_keep_alive_request(&mut sock, &mut buf, &mut first).await;
        let req = match next {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                let _ = http::respond(&mut sock, 400, "text/plain", e.to_string().as_bytes()).await;
                return;
            }
        };
        let keep = http::wants_keep_alive(&req);
        match serve_one(&mut sock, &mut buf, &req, keep).await {
            Ok(true) if keep => continue,
            Ok(_) => return,
            Err(e) => {
                tracing::debug!("backend write: {e}");
                return;
            }
        }
    }
}

/// Answers one request; `Ok(false)` when the connection cannot go on (a body we would not read).
async fn serve_one(
    sock: &mut TcpStream,
    buf: &mut BytesMut,
    req: &http::Request,
    keep: bool,
) -> std::io::Result<bool> {
    let body_len = match http::request_body_len(req) {
        Ok(n) if n <= MAX_REQUEST_BODY => n,
        Ok(_) => {
            http::respond(sock, 413, "text/plain", b"body too large\n").await?;
            return Ok(false);
        }
        Err(e) => {
            http::respond(sock, 400, "text/plain", e.to_string().as_bytes()).await?;
            return Ok(false);
        }
    };
    if !discard_body(sock, buf, body_len).await? {
        return Ok(false);
    }
    if req.method != "GET" && req.method != "HEAD" {
        http::respond_maybe_keep(sock, keep, 405, "text/plain", b"GET only\n").await?;
        return Ok(true);
    }
    let path = req.path.split('?').next().unwrap_or("/");
    let head_only = req.method == "HEAD";
    let (status, body): (u16, &[u8]) = if let Some(n) = path.strip_prefix("/bytes/") {
        match n.parse::<u64>() {
            Ok(n) if n <= MAX_BYTES => {
                send_bytes(sock, n, keep, head_only).await?;
                return Ok(true);
            }
            _ => (400, b"bad length\n"),
        }
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        match ms.parse::<u64>() {
            Ok(ms) if ms <= MAX_SLOW_MS => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                (200, GREETING)
            }
            _ => (400, b"bad delay\n"),
        }
    } else if let Some(secs) = path.strip_prefix("/watch/") {
        match secs.parse::<u64>() {
            Ok(s) if (1..=MAX_WATCH_PERIOD_S).contains(&s) => {
                return watch(sock, Duration::from_secs(s), keep, head_only).await;
            }
            _ => (400, b"bad watch period\n"),
        }
    } else if path == "/" || path == "/healthz" {
        (200, GREETING)
    } else {
        (404, b"not found\n")
    };
    if head_only {
        // A HEAD response announces the length but carries no body.
        let h = if keep {
            http::response_head_keep_alive(status, "text/plain", body.len() as u64)
        } else {
            http::response_head(status, "text/plain", body.len() as u64)
        };
        sock.write_all(h.as_bytes()).await?;
        if !keep {
            sock.shutdown().await?;
        }
    } else {
        http::respond_maybe_keep(sock, keep, status, "text/plain", body).await?;
    }
    Ok(true)
}

/// A Kubernetes watch as the apiserver answers one: the head at once (chunked, no length), then an
/// event every `period` until writing fails because the caller went away. Ends the connection
/// only then, so `Ok(false)`.
async fn watch(
    sock: &mut TcpStream,
    period: Duration,
    keep: bool,
    head_only: bool,
) -> std::io::Result<bool> {
    let mut head = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
    );
    if !keep {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    sock.write_all(head.as_bytes()).await?;
    sock.flush().await?;
    if head_only {
        return Ok(true);
    }
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    for n in 1u64.. {
        tick.tick().await;
        let line = format!("{{\"type\":\"BOOKMARK\",\"n\":{n}}}\n");
        let chunk = format!("{:x}\r\n{line}\r\n", line.len());
        sock.write_all(chunk.as_bytes()).await?;
        sock.flush().await?;
    }
    Ok(false)
}

/// Reads and drops `n` body bytes, first from what was read past the head.
async fn discard_body(sock: &mut TcpStream, buf: &mut BytesMut, n: u64) -> std::io::Result<bool> {
    use tokio::io::AsyncReadExt;
    let mut left = n;
    let take = (buf.len() as u64).min(left) as usize;
    let _ = buf.split_to(take);
    left -= take as u64;
    let mut scratch = [0u8; 8192];
    while left > 0 {
        let k = sock.read(&mut scratch).await?;
        if k == 0 {
            return Ok(false);
        }
        // Pipelined bytes past the body belong to the next request.
        let used = (k as u64).min(left) as usize;
        buf.extend_from_slice(&scratch[used..k]);
        left -= used as u64;
    }
    Ok(true)
}

async fn send_bytes(
    sock: &mut TcpStream,
    n: u64,
    keep: bool,
    head_only: bool,
) -> std::io::Result<()> {
    static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];
    let head = if keep {
        http::response_head_keep_alive(200, "application/octet-stream", n)
    } else {
        http::response_head(200, "application/octet-stream", n)
    };
    sock.write_all(head.as_bytes()).await?;
    let mut left = if head_only { 0 } else { n };
    while left > 0 {
        let k = left.min(CHUNK.len() as u64) as usize;
        sock.write_all(&CHUNK[..k]).await?;
        left -= k as u64;
    }
    if keep {
        sock.flush().await
    } else {
        sock.shutdown().await
    }
}
