//! Small HTTP target for the tunnel. Every response carries `Content-Length` and
//! `Connection: close`, and the backend closes its side right after it: one request is one TCP
//! connection, which is what makes per-connection leaks visible.
//!
//! Paths: `/` (short text), `/bytes/<n>` (n bytes, at most 1 GiB), `/slow/<ms>` (answers after
//! the delay, at most 60 s), `/healthz`.

use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::{http, say, tasks};

pub const MAX_BYTES: u64 = 1 << 30;
pub const MAX_SLOW_MS: u64 = 60_000;
const GREETING: &[u8] = b"hello from reftunnel backend\n";

pub async fn run(listen: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    say!("backend listening on {}", listener.local_addr()?);
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
    let req = match http::read_request(&mut sock).await {
        Ok((r, _)) => r,
        Err(e) => {
            let _ = http::respond(&mut sock, 400, "text/plain", e.to_string().as_bytes()).await;
            return;
        }
    };
    if req.method != "GET" && req.method != "HEAD" {
        let _ = http::respond(&mut sock, 405, "text/plain", b"GET only\n").await;
        return;
    }
    let path = req.path.split('?').next().unwrap_or("/");
    let r = if let Some(n) = path.strip_prefix("/bytes/") {
        match n.parse::<u64>() {
            Ok(n) if n <= MAX_BYTES => send_bytes(&mut sock, n).await,
            _ => http::respond(&mut sock, 400, "text/plain", b"bad length\n").await,
        }
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        match ms.parse::<u64>() {
            Ok(ms) if ms <= MAX_SLOW_MS => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                http::respond(&mut sock, 200, "text/plain", GREETING).await
            }
            _ => http::respond(&mut sock, 400, "text/plain", b"bad delay\n").await,
        }
    } else if path == "/" || path == "/healthz" {
        http::respond(&mut sock, 200, "text/plain", GREETING).await
    } else {
        http::respond(&mut sock, 404, "text/plain", b"not found\n").await
    };
    if let Err(e) = r {
        tracing::debug!("backend write: {e}");
    }
}

async fn send_bytes(sock: &mut TcpStream, n: u64) -> std::io::Result<()> {
    static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];
    sock.write_all(http::response_head(200, "application/octet-stream", n).as_bytes())
        .await?;
    let mut left = n;
    while left > 0 {
        let k = left.min(CHUNK.len() as u64) as usize;
        sock.write_all(&CHUNK[..k]).await?;
        left -= k as u64;
    }
    sock.shutdown().await
}
