//! Pooled HTTP transports over tunneled connections: the server-side patterns of Rancher's
//! proxy, which is where the v2.10.3 leak really was (see reftunnel/README.md).
//!
//! A [`Transport`] is the analogue of a Go `http.Transport` whose `DialContext` is the tunnel's
//! dialer: requests go through hyper's HTTP/1 client connection over a tunneled connection
//! ([`TunnelIo`]), and after a response the connection goes back to the transport's idle pool,
//! most recently used first, as Go does. Each live pooled connection holds two registered tasks,
//! like Go's `persistConn.readLoop` / `writeLoop` goroutines:
//!
//! * `server.pool_conn` drives hyper's connection (all reads and writes on the tunnel); while the
//!   connection is idle in the pool it waits in `sync.Cond.Wait`, where Go's readLoop waits
//!   inside remotedialer's `readBuffer.Read`;
//! * `server.pool_idle_timer` waits in `select` for the connection's next use, its idle timeout
//!   (Go's `idleTimer`), or its end, and closes it when the timeout fires.
//!
//! A pooled connection keeps its transport alive (as a Go persistConn references its Transport),
//! so a transport built for one request and then dropped by its caller still holds its idle
//! connection: forever without an idle timeout (v2.10.3), or until the timeout (v2.10.5).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::pipe::CHUNK;
use crate::session::{CloseReason, Origin, TunnelConn};
use crate::tasks::{self, TaskRef};

/// Go's `http.DefaultTransport` IdleConnTimeout, which the v2.10.5 fix inherited.
pub const GO_IDLE_CONN_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a connection may take, after its response body was read, to be ready for the next
/// request before it is given up instead of pooled.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// How the server's `/proxy/` path reaches the backend (`--proxy-transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyTransport {
    /// One caller socket = one tunneled connection, piped byte for byte.
    Pipe,
    /// One pool per clientkey and backend address (Go pools per host) whose idle connections
    /// close after `idle_timeout`, or never with `None`: Go's zero `&http.Transport{}`, whose
    /// `IdleConnTimeout` of 0 means no limit.
    Shared { idle_timeout: Option<Duration> },
    /// A new pool per request, never closed, no idle timeout: Rancher v2.10.3.
    PerRequest,
    /// A new pool per request whose idle connections close after `idle_timeout`: v2.10.5.
    PerRequestIdle { idle_timeout: Duration },
}

#[derive(Debug, thiserror::Error)]
pub enum ParseTransportError {
    #[error(
        "unknown transport {0:?}: expected pipe, shared[=<dur>|never], per-request or per-request-idle[=<dur>]"
    )]
    Unknown(String),
    #[error("bad duration in {0:?}: {1}")]
    Duration(String, humantime::DurationError),
    #[error("{0:?}: the idle timeout must be above zero (use per-request for no timeout)")]
    Zero(String),
    #[error(
        "bad --proxy-transport-for {0:?}: expected <clientkey>=<transport>, e.g. c-bug=per-request"
    )]
    Override(String),
}

impl FromStr for ProxyTransport {
    type Err = ParseTransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, dur) = match s.split_once('=') {
            Some((n, d)) => (n, Some(d)),
            None => (s, None),
        };
        let idle = || -> Result<Duration, ParseTransportError> {
            let Some(d) = dur else {
                return Ok(GO_IDLE_CONN_TIMEOUT);
            };
            let d = humantime::parse_duration(d.trim())
                .map_err(|e| ParseTransportError::Duration(s.to_owned(), e))?;
            if d.is_zero() {
                return Err(ParseTransportError::Zero(s.to_owned()));
            }
            Ok(d)
        };
        match (name.trim(), dur) {
            ("pipe", None) => Ok(Self::Pipe),
            ("per-request", None) => Ok(Self::PerRequest),
            // Go's zero IdleConnTimeout means "no limit"; `never` says so without the zero.
            ("shared", Some(d)) if matches!(d.trim(), "never" | "0" | "0s") => {
                Ok(Self::Shared { idle_timeout: None })
            }
            ("shared", _) => Ok(Self::Shared {
                idle_timeout: Some(idle()?),
            }),
            ("per-request-idle", _) => Ok(Self::PerRequestIdle {
                idle_timeout: idle()?,
            }),
            _ => Err(ParseTransportError::Unknown(s.to_owned())),
        }
    }
}

impl std::fmt::Display for ProxyTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pipe => write!(f, "pipe"),
            Self::PerRequest => write!(f, "per-request"),
            Self::Shared {
                idle_timeout: Some(t),
            } => write!(f, "shared={}", humantime::format_duration(*t)),
            Self::Shared { idle_timeout: None } => write!(f, "shared=never"),
            Self::PerRequestIdle { idle_timeout } => {
                write!(
                    f,
                    "per-request-idle={}",
                    humantime::format_duration(*idle_timeout)
                )
            }
        }
    }
}

impl ProxyTransport {
    pub fn pooled(&self) -> bool {
        !matches!(self, Self::Pipe)
    }
}

/// `--proxy-transport-for <clientkey>=<transport>`: one clientkey served by another transport than
/// the server's default, so that one process can serve many clusters with the fix and one with the
/// bug, as a real Rancher would if one code path alone still built a transport per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportOverride {
    pub clientkey: String,
    pub transport: ProxyTransport,
}

impl FromStr for TransportOverride {
    type Err = ParseTransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The transport may carry its own `=` (per-request-idle=90s): split at the first one.
        let Some((key, transport)) = s.split_once('=') else {
            return Err(ParseTransportError::Override(s.to_owned()));
        };
        let key = key.trim();
        if key.is_empty() || key.contains('/') || transport.trim().is_empty() {
            return Err(ParseTransportError::Override(s.to_owned()));
        }
        Ok(Self {
            clientkey: key.to_owned(),
            transport: transport.parse()?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// No agent session for the clientkey (remotedialer: "failed to find Session for client").
    #[error("failed to find Session for client {0}")]
    NoSession(String),
    #[error("dial through tunnel: {0}")]
    Dial(String),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
}

type DialFuture = Pin<Box<dyn Future<Output = Result<TunnelConn, TransportError>> + Send>>;
/// Opens one tunneled connection to the backend through the clientkey's session (the session's
/// own dial path, so remotedialer's add/remove counters see it as they would in Go).
pub type Dialer = Arc<dyn Fn() -> DialFuture + Send + Sync>;

pub type ReqBody = Full<Bytes>;

/// What a pooled connection is doing; the idle timer runs while it is `Idle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Busy,
    Idle(Instant),
}

struct ConnShared {
    key: u64,
    phase: watch::Sender<Phase>,
    read_task: TaskRef,
    timer_task: TaskRef,
}

impl ConnShared {
    fn set_idle(&self) {
        self.read_task.wait("sync.Cond.Wait");
        self.timer_task.wait("select");
        self.phase.send_replace(Phase::Idle(Instant::now()));
    }

    fn set_busy(&self) {
        self.read_task.run();
        self.timer_task.run();
        self.phase.send_replace(Phase::Busy);
    }
}

struct IdleConn {
    send: SendRequest<ReqBody>,
    shared: Arc<ConnShared>,
}

struct Pool {
    dial: Dialer,
    idle_timeout: Option<Duration>,
    /// Most recently used last; checkout takes from the end (Go's LIFO idle list).
    idle: Mutex<Vec<IdleConn>>,
}

impl Pool {
    fn idle(&self) -> MutexGuard<'_, Vec<IdleConn>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets an idle connection; dropping its `SendRequest` makes hyper close it. False if it
    /// was not idle (checked out meanwhile, or already gone).
    fn remove_idle(&self, key: u64) -> bool {
        let gone = {
            let mut idle = self.idle();
            idle.iter()
                .position(|c| c.shared.key == key)
                .map(|i| idle.remove(i))
        };
        gone.is_some()
    }
}

/// A Go `http.Transport` over the tunnel. Cloning shares the pool.
#[derive(Clone)]
pub struct Transport(Arc<Pool>);

/// A request to send; kept as parts so that a request that met a dead pooled connection can be
/// sent again on a fresh one, as Go retries requests that were never written.
#[derive(Clone)]
pub struct ProxyRequest {
    pub method: http::Method,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl ProxyRequest {
    fn build(&self) -> Result<http::Request<ReqBody>, http::Error> {
        let mut b = http::Request::builder()
            .method(self.method.clone())
            .uri(self.path.as_str());
        if let Some(h) = b.headers_mut() {
            h.extend(self.headers.clone());
        }
        b.body(Full::new(self.body.clone()))
    }
}

/// A connection checked out of the pool for one request. [`Checkout::release`] returns it after
/// the response body has been read; dropping it instead closes the connection.
pub struct Checkout {
    send: SendRequest<ReqBody>,
    shared: Arc<ConnShared>,
    pool: Arc<Pool>,
    /// Whether this connection came from the idle pool (false: dialed for this request).
    pub reused: bool,
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Frames of the pooled connection's tasks in the goroutine dump (innermost first): where the
/// corresponding Go goroutines of an idle persistConn over a remotedialer connection block.
const READ_LOOP_FRAMES: &[&str] = &[
    "sync.(*Cond).Wait",
    "github.com/rancher/remotedialer.(*readBuffer).Read",
    "github.com/rancher/remotedialer.(*connection).Read",
    "net/http.(*persistConn).Read",
    "bufio.(*Reader).Peek",
    "net/http.(*persistConn).readLoop",
];
const WRITE_LOOP_FRAMES: &[&str] = &["net/http.(*persistConn).writeLoop"];

impl Transport {
    pub fn new(dial: Dialer, idle_timeout: Option<Duration>) -> Self {
        Transport(Arc::new(Pool {
            dial,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
        }))
    }

    /// Idle connections in this pool now.
    pub fn idle_count(&self) -> usize {
        self.0.idle().len()
    }

    /// Sends `req` on an idle connection or a new one; the caller reads the body, then calls
    /// [`Checkout::release`].
    pub async fn round_trip(
        &self,
        req: &ProxyRequest,
    ) -> Result<(http::Response<Incoming>, Checkout), TransportError> {
        if let Some(mut co) = self.checkout_idle() {
            let built = req
                .build()
                .map_err(|e| TransportError::Dial(e.to_string()))?;
            match co.send.try_send_request(built).await {
                Ok(resp) => return Ok((resp, co)),
                // The idle connection died before the request was written (the agent or the
                // backend closed it): Go retries such a request on a new connection.
                Err(e) if e.message().is_some() => drop(co),
                Err(e) => return Err(e.into_error().into()),
            }
        }
        let mut co = self.dial_new().await?;
        let built = req
            .build()
            .map_err(|e| TransportError::Dial(e.to_string()))?;
        let resp = co.send.send_request(built).await?;
        Ok((resp, co))
    }

    fn checkout_idle(&self) -> Option<Checkout> {
        let mut idle = self.0.idle();
        while let Some(c) = idle.pop() {
            if c.send.is_closed() || !c.send.is_ready() {
                continue;
            }
            c.shared.set_busy();
            return Some(Checkout {
                send: c.send,
                shared: c.shared,
                pool: self.0.clone(),
                reused: true,
            });
        }
        None
    }

    async fn dial_new(&self) -> Result<Checkout, TransportError> {
        let tc = (self.0.dial)().await?;
        let io = TokioIo::new(TunnelIo::new(tc.clone()));
        let (send, conn) = match http1::handshake::<_, ReqBody>(io).await {
            Ok(x) => x,
            Err(e) => {
                tc.close(CloseReason::Error(e.to_string()), Origin::Local)
                    .await;
                return Err(e.into());
            }
        };
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let (read_handle, read_task) =
            tasks::spawn_with_frames("server.pool_conn", READ_LOOP_FRAMES, async move {
                let reason = match conn.await {
                    Ok(()) => CloseReason::Eof,
                    Err(e) => CloseReason::Error(e.to_string()),
                };
                // Idempotent if the agent closed it first; otherwise this is what sends
                // Error(EOF) and counts the connection removed.
                tc.close(reason, Origin::Local).await;
                drop(done_tx);
            });
        let (phase, phase_rx) = watch::channel(Phase::Busy);
        // The timer task needs its own TaskRef in `shared`, so it starts on a gate.
        let (gate_tx, gate_rx) = oneshot::channel::<Arc<ConnShared>>();
        let pool = self.0.clone();
        let (_, timer_task) =
            tasks::spawn_with_frames("server.pool_idle_timer", WRITE_LOOP_FRAMES, async move {
                let Ok(shared) = gate_rx.await else { return };
                idle_timer(pool, shared, phase_rx, done_rx).await;
            });
        let shared = Arc::new(ConnShared {
            key: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
            phase,
            read_task,
            timer_task,
        });
        if gate_tx.send(shared.clone()).is_err() {
            read_handle.abort();
        }
        Ok(Checkout {
            send,
            shared,
            pool: self.0.clone(),
            reused: false,
        })
    }
}

/// Go's per-connection idle timer and close watch: closes the connection once it has been idle
/// for the pool's timeout, and forgets it when it ends for any other reason.
async fn idle_timer(
    pool: Arc<Pool>,
    shared: Arc<ConnShared>,
    mut phase: watch::Receiver<Phase>,
    mut done: oneshot::Receiver<()>,
) {
    loop {
        let expiry = match (*phase.borrow_and_update(), pool.idle_timeout) {
            (Phase::Idle(since), Some(t)) => Some(since + t),
            _ => None,
        };
        let fired = async {
            match expiry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut done => break,
            r = phase.changed() => if r.is_err() { break },
            _ = fired => {
                if pool.remove_idle(shared.key) {
                    tracing::debug!(conn = shared.key, "idle timeout: closing pooled connection");
                    // Dropping its SendRequest ends hyper's connection; wait for that.
                    let _ = (&mut done).await;
                    break;
                }
            }
        }
    }
    pool.remove_idle(shared.key);
}

impl Checkout {
    /// Returns the connection to the idle pool once hyper has it ready for another request
    /// (the response body must have been read to its end); otherwise it closes.
    pub async fn release(mut self) {
        match tokio::time::timeout(READY_TIMEOUT, self.send.ready()).await {
            Ok(Ok(())) => {
                self.shared.set_idle();
                self.pool.idle().push(IdleConn {
                    send: self.send,
                    shared: self.shared,
                });
            }
            _ => tracing::debug!(conn = self.shared.key, "not reusable; closing"),
        }
    }
}

type ReadFut = Pin<Box<dyn Future<Output = Result<Option<Bytes>, String>> + Send>>;
type WriteFut = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A tunneled connection as a byte stream (tokio's `AsyncRead`/`AsyncWrite`), for hyper through
/// `TokioIo`. There is no half-close on a tunneled connection; shutting down is a no-op and the
/// connection's owner closes it once hyper is done with it.
pub struct TunnelIo {
    conn: TunnelConn,
    reading: Option<ReadFut>,
    leftover: Bytes,
    eof: bool,
    /// A write in flight and its length. `poll_write` callers (hyper) offer the same bytes again
    /// after `Pending`, so the bytes captured here are the ones that get acknowledged.
    writing: Option<(WriteFut, usize)>,
}

impl TunnelIo {
    pub fn new(conn: TunnelConn) -> Self {
        Self {
            conn,
            reading: None,
            leftover: Bytes::new(),
            eof: false,
            writing: None,
        }
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.leftover.is_empty() {
                let n = this.leftover.len().min(buf.remaining());
                buf.put_slice(&this.leftover.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let conn = &this.conn;
            let fut = this.reading.get_or_insert_with(|| {
                let c = conn.clone();
                Box::pin(async move { c.read().await })
            });
            match fut.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => {
                    this.reading = None;
                    match r {
                        Ok(Some(b)) => this.leftover = b,
                        Ok(None) => this.eof = true,
                        Err(e) => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::ConnectionReset,
                                e,
                            )));
                        }
                    }
                }
            }
        }
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let conn = &this.conn;
        let (fut, n) = this.writing.get_or_insert_with(|| {
            let n = data.len().min(CHUNK);
            let c = conn.clone();
            let b = Bytes::copy_from_slice(&data[..n]);
            (Box::pin(async move { c.write(b).await }), n)
        });
        let n = *n;
        match fut.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                this.writing = None;
                Poll::Ready(
                    r.map(|()| n)
                        .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e)),
                )
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written frames are already queued to the session's writer.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_flag_values() {
        let p = |s: &str| s.parse::<ProxyTransport>();
        assert_eq!(p("pipe").unwrap(), ProxyTransport::Pipe);
        assert_eq!(p("per-request").unwrap(), ProxyTransport::PerRequest);
        assert_eq!(
            p("shared").unwrap(),
            ProxyTransport::Shared {
                idle_timeout: Some(GO_IDLE_CONN_TIMEOUT)
            }
        );
        assert_eq!(
            p("shared=30s").unwrap(),
            ProxyTransport::Shared {
                idle_timeout: Some(Duration::from_secs(30))
            }
        );
        for never in ["shared=never", "shared=0s", "shared=0"] {
            assert_eq!(
                p(never).unwrap(),
                ProxyTransport::Shared { idle_timeout: None },
                "{never}"
            );
        }
        assert_eq!(p("shared=never").unwrap().to_string(), "shared=never");
        assert_eq!(
            p("per-request-idle").unwrap(),
            ProxyTransport::PerRequestIdle {
                idle_timeout: Duration::from_secs(90)
            }
        );
        assert_eq!(
            p("per-request-idle=2s").unwrap().to_string(),
            "per-request-idle=2s"
        );
        for bad in [
            "",
            "pooled",
            "per-request=5s",
            "pipe=1s",
            "shared=x",
            "per-request-idle=0s",
            "per-request-idle=never",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn transport_override_values() {
        let o = |s: &str| s.parse::<TransportOverride>();
        assert_eq!(
            o("c-bug=per-request").unwrap(),
            TransportOverride {
                clientkey: "c-bug".into(),
                transport: ProxyTransport::PerRequest
            }
        );
        assert_eq!(
            o("c-7=per-request-idle=30s").unwrap().transport,
            ProxyTransport::PerRequestIdle {
                idle_timeout: Duration::from_secs(30)
            }
        );
        assert_eq!(
            o("c=shared=never").unwrap().transport,
            ProxyTransport::Shared { idle_timeout: None }
        );
        for bad in ["", "c-bug", "=per-request", "c-bug=", "a/b=pipe", "c=bogus"] {
            assert!(o(bad).is_err(), "{bad}");
        }
        assert!(
            o("c-bug")
                .unwrap_err()
                .to_string()
                .contains("<clientkey>=<transport>"),
            "the error says what is expected"
        );
    }
}
