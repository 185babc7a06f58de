//! Background noise as on a real Rancher server: many accepted sockets that are not callers of
//! tunneled connections (UI sessions, kubectl clients with keep-alive). `count` keep-alive
//! connections to the server, each sending one request now and then so that it stays open and
//! visibly alive, until SIGTERM or SIGINT. Loopback targets only.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::bail;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::http;
use crate::load::{Target, parse_target};
use crate::say;

#[derive(Debug, Clone)]
pub struct IdleClientsConfig {
    pub url: String,
    /// Path requested on each connection, e.g. `/healthz`.
    pub path: String,
    pub count: usize,
    /// Time between two requests on one connection.
    pub period: Duration,
}

/// Up to this many of the connections open at once, so that a large count does not look like
/// a SYN flood to the listener's backlog.
const OPEN_AT_ONCE: usize = 16;
const RETRY: Duration = Duration::from_secs(1);

pub async fn run(cfg: IdleClientsConfig) -> anyhow::Result<()> {
    if cfg.count == 0 {
        bail!("--count must be at least 1");
    }
    if cfg.period < Duration::from_millis(100) {
        bail!("--period must be at least 100ms");
    }
    if !cfg.path.starts_with('/') {
        bail!("--path must start with /");
    }
    let mut target = parse_target(&cfg.url).await?;
    target.path = cfg.path.clone();
    let target = Arc::new(target);
    let up = Arc::new(AtomicUsize::new(0));
    let all_up = Arc::new(Notify::new());
    let gate = Arc::new(tokio::sync::Semaphore::new(OPEN_AT_ONCE));
    for _ in 0..cfg.count {
        let (t, up, all_up, gate) = (target.clone(), up.clone(), all_up.clone(), gate.clone());
        let (count, period) = (cfg.count, cfg.period);
        crate::tasks::spawn("idle_client.conn", async move {
            let mut first = true;
            loop {
                let permit = gate.acquire().await;
                let conn = open(&t).await;
                drop(permit);
                match conn {
                    Ok(c) => {
                        if first {
                            first = false;
                            if up.fetch_add(1, Ordering::AcqRel) + 1 == count {
                                all_up.notify_one();
                            }
                        }
                        let e = hold(&t, c, period).await;
                        tracing::debug!("idle client connection ended: {e}");
                    }
                    Err(e) => tracing::debug!("idle client: {e}"),
                }
                tokio::time::sleep(RETRY).await;
            }
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = all_up.notified() => say!("idle-clients holding {} connections", cfg.count),
        _ = term.recv() => return Ok(()),
        _ = tokio::signal::ctrl_c() => return Ok(()),
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

struct Conn {
    sock: TcpStream,
    buf: BytesMut,
}

/// Connects and completes a first request, so "up" means a served keep-alive connection.
async fn open(t: &Target) -> anyhow::Result<Conn> {
    let sock = TcpStream::connect(t.addr).await?;
    let _ = sock.set_nodelay(true);
    let mut c = Conn {
        sock,
        buf: BytesMut::new(),
    };
    request(t, &mut c).await?;
    Ok(c)
}

async fn hold(t: &Target, mut c: Conn, period: Duration) -> anyhow::Error {
    loop {
        tokio::time::sleep(period).await;
        if let Err(e) = request(t, &mut c).await {
            return e;
        }
    }
}

async fn request(t: &Target, c: &mut Conn) -> anyhow::Result<()> {
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: reftunnel-idle-client\r\n\r\n",
        t.path, t.host_header
    );
    c.sock.write_all(req.as_bytes()).await?;
    let head = tokio::time::timeout(
        http::HEAD_TIMEOUT,
        http::read_response_head_buf(&mut c.sock, &mut c.buf),
    )
    .await??;
    if head.close {
        bail!("server closes the connection (is --caller-keep-alive off?)");
    }
    let Some(want) = head.content_length else {
        bail!("response without Content-Length cannot be kept alive");
    };
    let mut left = want;
    let take = (c.buf.len() as u64).min(left) as usize;
    let _ = c.buf.split_to(take);
    left -= take as u64;
    let mut scratch = [0u8; 4096];
    while left > 0 {
        let n = c.sock.read(&mut scratch).await?;
        if n == 0 {
            bail!("short body");
        }
        let used = (n as u64).min(left) as usize;
        c.buf.extend_from_slice(&scratch[used..n]);
        left -= used as u64;
    }
    Ok(())
}
