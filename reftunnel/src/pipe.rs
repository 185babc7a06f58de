//! Byte pipe between a real TCP socket and a tunneled connection (remotedialer's `pipe`): two
//! copy loops, and the first one to finish ends the pipe.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::session::TunnelConn;

/// Go's io.Copy buffer size: also the largest Data frame we send.
pub const CHUNK: usize = 32 * 1024;

#[derive(Debug)]
pub enum PipeEnd {
    /// The socket's peer closed its sending side.
    SocketEof,
    SocketError(std::io::Error),
    /// The tunnel peer closed the connection gracefully.
    TunnelEof,
    TunnelError(String),
}

impl PipeEnd {
    pub fn tunnel_side(&self) -> bool {
        matches!(self, PipeEnd::TunnelEof | PipeEnd::TunnelError(_))
    }
}

pub struct PipeResult {
    pub end: PipeEnd,
    /// Bytes written to the socket (what came through the tunnel).
    pub to_socket: u64,
}

/// With `wait_for_tunnel`, the socket's EOF does not end the pipe: it goes on until the tunnel
/// side ends (or a socket write fails). Used by the stuck-pipe leak so that its symptom does not
/// depend on whether the caller's FIN or the far side's close arrives first.
pub async fn pipe(sock: &mut TcpStream, conn: &TunnelConn, wait_for_tunnel: bool) -> PipeResult {
    // Atomic only because the future must be Send; there is no concurrency here.
    let to_socket = AtomicU64::new(0);
    let (mut rd, mut wr) = sock.split();
    // The pipe task is "blocked" between chunks: its age in the goroutine dump is the time since
    // data last moved either way, as a Go pipe goroutine's would be.
    crate::tasks::wait("select");
    let up = async {
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            buf.reserve(CHUNK);
            match rd.read_buf(&mut buf).await {
                Ok(0) => return PipeEnd::SocketEof,
                Ok(_) => {
                    if let Err(e) = conn.write(buf.split().freeze()).await {
                        return PipeEnd::TunnelError(e);
                    }
                    crate::tasks::wait("select");
                }
                Err(e) => return PipeEnd::SocketError(e),
            }
        }
    };
    let down = async {
        loop {
            match conn.read().await {
                Ok(Some(b)) => {
                    if let Err(e) = wr.write_all(&b).await {
                        return PipeEnd::SocketError(e);
                    }
                    to_socket.fetch_add(b.len() as u64, Ordering::Relaxed);
                    crate::tasks::wait("select");
                }
                Ok(None) => return PipeEnd::TunnelEof,
                Err(e) => return PipeEnd::TunnelError(e),
            }
        }
    };
    tokio::pin!(up, down);
    let mut end = tokio::select! {
        e = &mut up => e,
        e = &mut down => e,
    };
    if wait_for_tunnel && matches!(end, PipeEnd::SocketEof) {
        end = down.await;
    }
    crate::tasks::run();
    PipeResult {
        end,
        to_socket: to_socket.load(Ordering::Relaxed),
    }
}

/// Best-effort graceful close of our sending side (FIN after queued data).
pub async fn shutdown(sock: &mut TcpStream) {
    let _ = sock.shutdown().await;
}
