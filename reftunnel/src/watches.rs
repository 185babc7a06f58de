//! Long-lived callers as kubectl and the UI hold them on a real Rancher server: `count` watches
//! (a GET whose chunked answer never ends, such as the backend's `/watch/<secs>`), each opened
//! once, read line by line, and held for `hold`; then all callers leave together. Loopback only.
//!
//! A watch is established once its response head (status 200) has arrived; the line
//! `watches established <N>` is printed when all are. A watch that ends or fails before `hold`
//! is over is counted as ended early, and the run fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use bytes::{Buf, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::http;
use crate::load::{Spread, parse_target};
use crate::say;

#[derive(Debug, Clone)]
pub struct WatchesConfig {
    pub url: String,
    pub count: u64,
    pub hold: Duration,
    /// How long a watch may take to get its response head.
    pub timeout: Duration,
    /// Spread the watches over clientkeys and addrs as `load` spreads requests.
    pub clientkeys: u64,
    pub addrs: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WatchesSummary {
    pub count: u64,
    pub held_s: f64,
    /// Event lines read over all watches.
    pub lines: u64,
    pub ended_early: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("bad chunk size line {0:?}")]
    Size(String),
    #[error("chunk not followed by CRLF")]
    Trailer,
}

/// Takes the complete chunks at the front of `buf` and counts the lines in their data; returns
/// that count and whether the last chunk (size 0) was seen. Incomplete chunks stay in `buf`.
pub fn take_chunks(buf: &mut BytesMut) -> Result<(u64, bool), ChunkError> {
    let mut lines = 0u64;
    loop {
        let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
            return Ok((lines, false));
        };
        let size_line = String::from_utf8_lossy(&buf[..eol]).into_owned();
        let hex = size_line.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(hex, 16).map_err(|_| ChunkError::Size(size_line.clone()))?;
        if size == 0 {
            return Ok((lines, true));
        }
        let need = eol + 2 + size + 2;
        if buf.len() < need {
            return Ok((lines, false));
        }
        if &buf[need - 2..need] != b"\r\n" {
            return Err(ChunkError::Trailer);
        }
        lines += buf[eol + 2..eol + 2 + size]
            .iter()
            .filter(|&&b| b == b'\n')
            .count() as u64;
        buf.advance(need);
    }
}

/// Opens one watch and returns once its head has arrived, with the bytes read past it.
async fn open(
    addr: std::net::SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(TcpStream, BytesMut)> {
    let mut sock = TcpStream::connect(addr).await?;
    let _ = sock.set_nodelay(true);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: reftunnel-watches\r\nAccept: application/json\r\n\r\n"
    );
    sock.write_all(req.as_bytes()).await?;
    let mut buf = BytesMut::new();
    let head =
        tokio::time::timeout(timeout, http::read_response_head_buf(&mut sock, &mut buf)).await??;
    if head.status != 200 {
        bail!("status {}", head.status);
    }
    if head.content_length.is_some() {
        bail!("the answer has a length: not a watch");
    }
    Ok((sock, buf))
}

/// Reads the watch until the caller leaves (`Ok`) or it ends first (`Err`).
async fn read_until_end(
    mut sock: TcpStream,
    mut buf: BytesMut,
    lines: &AtomicU64,
) -> anyhow::Result<()> {
    let mut scratch = [0u8; 4096];
    loop {
        let (n, last) = take_chunks(&mut buf)?;
        lines.fetch_add(n, Ordering::Relaxed);
        if last {
            bail!("the watch ended");
        }
        let k = sock.read(&mut scratch).await?;
        if k == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&scratch[..k]);
    }
}

pub async fn run(cfg: WatchesConfig) -> anyhow::Result<WatchesSummary> {
    if cfg.count == 0 {
        bail!("--count must be at least 1");
    }
    if cfg.hold.is_zero() {
        bail!("--hold must be above zero");
    }
    let target = parse_target(&cfg.url).await?;
    let spread = Spread::new(&target.path, cfg.clientkeys, &cfg.addrs)?;
    let lines = Arc::new(AtomicU64::new(0));
    let (up_tx, mut up_rx) = mpsc::channel::<anyhow::Result<()>>(cfg.count as usize);
    let (end_tx, mut end_rx) = mpsc::channel::<String>(cfg.count as usize);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..cfg.count {
        let path = spread
            .as_ref()
            .map_or_else(|| target.path.clone(), |s| s.path(i));
        let (addr, host, timeout) = (target.addr, target.host_header.clone(), cfg.timeout);
        let (up_tx, end_tx, lines) = (up_tx.clone(), end_tx.clone(), lines.clone());
        tasks.spawn(async move {
            match open(addr, &host, &path, timeout).await {
                Ok((sock, buf)) => {
                    let _ = up_tx.send(Ok(())).await;
                    if let Err(e) = read_until_end(sock, buf, &lines).await {
                        let _ = end_tx.send(format!("{path}: {e:#}")).await;
                    }
                }
                Err(e) => {
                    let _ = up_tx.send(Err(e.context(format!("opening {path}")))).await;
                }
            }
        });
    }
    drop((up_tx, end_tx));
    for _ in 0..cfg.count {
        match up_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e),
            None => bail!("a watch task ended before reporting"),
        }
    }
    say!("watches established {}", cfg.count);
    let started = tokio::time::Instant::now();
    let mut ended_early = 0u64;
    let deadline = started + cfg.hold;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            e = end_rx.recv() => match e {
                Some(why) => {
                    ended_early += 1;
                    tracing::warn!("watch ended early: {why}");
                }
                // Every watch is gone: nothing left to hold.
                None => break,
            },
        }
    }
    // The callers leave together: dropping the tasks closes their sockets.
    tasks.shutdown().await;
    Ok(WatchesSummary {
        count: cfg.count,
        held_s: started.elapsed().as_secs_f64(),
        lines: lines.load(Ordering::Relaxed),
        ended_early,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_taken_whole_and_their_lines_counted() {
        let mut b = BytesMut::from(&b"5\r\nab\ncd\r\n3;ext=1\r\nx\ny\r\n4\r\nzz"[..]);
        assert_eq!(take_chunks(&mut b), Ok((2, false)));
        assert_eq!(&b[..], b"4\r\nzz", "the incomplete chunk stays");
        b.extend_from_slice(b"\n\n\r\n0\r\n\r\n");
        assert_eq!(take_chunks(&mut b), Ok((2, true)));
        let mut bad = BytesMut::from(&b"zz\r\n"[..]);
        assert!(matches!(take_chunks(&mut bad), Err(ChunkError::Size(_))));
        let mut bad = BytesMut::from(&b"1\r\nabc"[..]);
        assert_eq!(take_chunks(&mut bad), Err(ChunkError::Trailer));
    }
}
