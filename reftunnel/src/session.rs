//! One websocket session and the tunneled connections multiplexed over it — the same model as
//! remotedialer's `Session` + `connection` + `readBuffer` + `backPressure`, used by both ends.
//!
//! * Incoming `Data` is appended to the connection's unbounded read buffer so that one slow
//!   consumer never stalls the session's read loop. Past 2 MiB buffered a `Pause` is sent to the
//!   peer; once drained below 256 KiB a `Resume` follows (remotedialer's MaxBuffer, MaxBuffer/8).
//! * A received `Pause` makes writers of that connection wait until `Resume` (or close).
//! * Closing a connection locally sends `Error("EOF")` (or the error text) to the peer; a
//!   received `Error` closes it without echoing. Each connection is counted as removed once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::frame::{self, Body, EOF_TEXT, Frame, FrameError};
use crate::leak::{LeakMode, LeakPolicy};
use crate::metrics::MetricsHub;

/// remotedialer's MaxBuffer.
pub const PAUSE_ABOVE: usize = 1 << 21;
pub const RESUME_BELOW: usize = PAUSE_ABOVE / 8;
/// Stand-in for the per-connection allocations Go keeps (readBuffer, backPressure, ...): a
/// connection that is never removed keeps this much heap alive.
pub const CONN_BALLAST: usize = 16 * 1024;
/// remotedialer's PingWaitDuration: a session with no inbound traffic (pings included) for this
/// long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// remotedialer's PingWriteInterval.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
const OUTBOUND_QUEUE: usize = 256;

pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(frame::MAX_MESSAGE))
        .max_frame_size(Some(frame::MAX_MESSAGE))
}

static MESSAGE_ID: AtomicI64 = AtomicI64::new(0);

/// Message ids only appear in logs; remotedialer starts them at a random value, so do we.
pub(crate) fn next_message_id() -> i64 {
    let id = MESSAGE_ID.fetch_add(1, Ordering::Relaxed);
    if id == 0 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as i64 * 7919)
            .unwrap_or(1);
        MESSAGE_ID.store(seed + 1, Ordering::Relaxed);
        return seed;
    }
    id
}

pub fn random_key() -> i64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    (t ^ (next_message_id().wrapping_mul(0x9e37_79b9))) & i64::MAX
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    Eof,
    Error(String),
}

impl CloseReason {
    fn from_text(s: &str) -> Self {
        if s == EOF_TEXT {
            CloseReason::Eof
        } else {
            CloseReason::Error(s.to_owned())
        }
    }

    fn text(&self) -> &str {
        match self {
            CloseReason::Eof => EOF_TEXT,
            CloseReason::Error(s) => s,
        }
    }
}

/// Who is closing a connection decides whether the peer is told and whether leak paths apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This side's pipe ended: tell the peer.
    Local,
    /// The peer sent `Error`.
    Peer,
    /// SyncConnections listed it as gone: no message (remotedialer's doTunnelClose).
    Sync,
}

#[derive(Default)]
struct ConnState {
    buf: VecDeque<Bytes>,
    buffered: usize,
    closed: Option<CloseReason>,
    counted_removed: bool,
    /// A leak path kept this connection; later cleanups leave it alone.
    leaked: bool,
    we_paused: bool,
    peer_paused: bool,
}

pub struct Conn {
    pub id: i64,
    pub proto: String,
    pub address: String,
    pub leak: Option<LeakMode>,
    state: Mutex<ConnState>,
    readable: Notify,
    writable: Notify,
    _ballast: Box<[u8]>,
}

impl Conn {
    fn new(id: i64, proto: String, address: String, leak: Option<LeakMode>) -> Arc<Self> {
        Arc::new(Self {
            id,
            proto,
            address,
            leak,
            state: Mutex::new(ConnState::default()),
            readable: Notify::new(),
            writable: Notify::new(),
            _ballast: vec![1u8; CONN_BALLAST].into_boxed_slice(),
        })
    }

    fn state(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns true if this call closed it.
    fn mark_closed(&self, reason: CloseReason) -> bool {
        let first = {
            let mut st = self.state();
            if st.closed.is_some() {
                false
            } else {
                st.closed = Some(reason);
                true
            }
        };
        self.readable.notify_one();
        self.writable.notify_one();
        first
    }
}

/// Something that accepts peer `Connect` requests (the agent). Servers have none: remotedialer's
/// server-side ClientConnectAuthorizer is normally nil, so Connect from an agent is refused.
pub trait ConnectHandler: Send + Sync {
    fn on_connect(&self, conn: TunnelConn);
}

pub struct Session {
    pub client_key: String,
    pub session_key: i64,
    out: mpsc::Sender<Message>,
    conns: Mutex<HashMap<i64, Arc<Conn>>>,
    next_conn_id: AtomicI64,
    hub: Arc<MetricsHub>,
    leak: Arc<LeakPolicy>,
    handler: Option<Arc<dyn ConnectHandler>>,
    stop: watch::Sender<bool>,
    closed: AtomicBool,
    /// remotedialer's `remoteClientKeys`: the clients a peer announced with AddClient, each with
    /// the session keys it holds for it. Only server-side sessions keep it (Go's client sessions
    /// have a nil map and ignore AddClient); it is what `getDialer` searches for a client that is
    /// not connected here.
    remote_clients: Option<Mutex<HashMap<String, HashSet<i64>>>>,
}

/// A tunneled connection as seen by its owner (a pipe task).
#[derive(Clone)]
pub struct TunnelConn {
    pub session: Arc<Session>,
    pub conn: Arc<Conn>,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    #[error("websocket closed by peer")]
    Closed,
    #[error("no message for {0:?}")]
    Idle(Duration),
    #[error("websocket error: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("wrong websocket message type (text)")]
    WrongMessageType,
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("session writer is gone")]
    WriterGone,
    #[error("invalid remote Session {0}")]
    InvalidRemoteSession(String),
    #[error("session closed locally")]
    ClosedLocally,
}

/// Go's `parseAddress` for AddClient/RemoveClient payloads: `clientKey/sessionKey`.
fn parse_remote_client(address: &str) -> Result<(&str, i64), SessionEnd> {
    let bad = || SessionEnd::InvalidRemoteSession(address.to_owned());
    let (key, session) = address.split_once('/').ok_or_else(bad)?;
    let session = session.parse::<i64>().map_err(|_| bad())?;
    Ok((key, session))
}

impl Session {
    /// Splits the websocket, starts the writer task and returns the session plus the read half
    /// that [`Session::serve`] consumes.
    pub fn start<S>(
        ws: WebSocketStream<S>,
        client_key: String,
        hub: Arc<MetricsHub>,
        leak: Arc<LeakPolicy>,
        handler: Option<Arc<dyn ConnectHandler>>,
    ) -> (Arc<Self>, SplitStream<WebSocketStream<S>>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sink, stream) = ws.split();
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let (stop, stop_rx) = watch::channel(false);
        crate::tasks::spawn("session.writer", write_loop(sink, rx, stop_rx));
        // Server-side sessions (no Connect handler) learn their peer's clients.
        let remote_clients = handler.is_none().then(|| Mutex::new(HashMap::new()));
        let s = Arc::new(Self {
            client_key,
            session_key: random_key(),
            out: tx,
            conns: Mutex::new(HashMap::new()),
            next_conn_id: AtomicI64::new(1),
            hub,
            leak,
            handler,
            stop,
            closed: AtomicBool::new(false),
            remote_clients,
        });
        (s, stream)
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<i64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn connection_count(&self) -> usize {
        self.conns().len()
    }

    pub fn active_ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.conns().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Whether the peer announced `client` (remotedialer's `getSessionKeys` being non-empty).
    pub fn has_remote_client(&self, client: &str) -> bool {
        self.remote_clients.as_ref().is_some_and(|m| {
            m.lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(client)
                .is_some_and(|keys| !keys.is_empty())
        })
    }

    /// The clients the peer announced, sorted.
    pub fn remote_clients(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .remote_clients
            .as_ref()
            .map(|m| {
                m.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .keys()
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn add_remote_client(&self, address: &str) -> Result<(), SessionEnd> {
        // Go returns before parsing when the session keeps no map.
        let Some(m) = &self.remote_clients else {
            return Ok(());
        };
        let (key, session) = parse_remote_client(address)?;
        m.lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_owned())
            .or_default()
            .insert(session);
        Ok(())
    }

    fn remove_remote_client(&self, address: &str) -> Result<(), SessionEnd> {
        // Go parses first, whatever the session.
        let (key, session) = parse_remote_client(address)?;
        if let Some(m) = &self.remote_clients {
            let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(keys) = m.get_mut(key) {
                keys.remove(&session);
                if keys.is_empty() {
                    m.remove(key);
                }
            }
        }
        Ok(())
    }

    pub fn record_leak(&self, mode: LeakMode) {
        self.hub.tunnel.leak(mode.name());
    }

    pub async fn send_frame(&self, f: Frame) -> Result<usize, SessionEnd> {
        let bytes = f.encode()?;
        let n = bytes.len();
        self.out
            .send(Message::Binary(bytes))
            .await
            .map_err(|_| SessionEnd::WriterGone)?;
        Ok(n)
    }

    pub async fn send_raw(&self, m: Message) -> Result<(), SessionEnd> {
        self.out.send(m).await.map_err(|_| SessionEnd::WriterGone)
    }

    fn register(&self, conn: &Arc<Conn>) {
        self.conns().insert(conn.id, conn.clone());
        self.hub
            .tunnel
            .add_conn(&self.client_key, &conn.proto, &conn.address);
    }

    /// Server side: asks the peer to dial `proto`/`address` and returns the tunneled connection
    /// at once (like remotedialer, without waiting for the peer's dial; a failed dial arrives as
    /// an `Error`).
    pub async fn dial(
        self: &Arc<Self>,
        proto: &str,
        address: &str,
    ) -> Result<TunnelConn, SessionEnd> {
        let id = self.next_conn_id.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = Conn::new(id, proto.to_owned(), address.to_owned(), self.leak.pick());
        self.register(&conn);
        let tc = TunnelConn {
            session: self.clone(),
            conn,
        };
        let connect = Frame::new(
            next_message_id(),
            id,
            Body::Connect {
                proto: proto.to_owned(),
                address: address.to_owned(),
            },
        );
        if let Err(e) = self.send_frame(connect).await {
            tc.close(CloseReason::Error(e.to_string()), Origin::Local)
                .await;
            return Err(e);
        }
        Ok(tc)
    }

    /// The single place where connections end; leak modes hook in here.
    async fn close_conn(&self, conn: &Arc<Conn>, reason: CloseReason, origin: Origin) {
        let text = reason.text().to_owned();
        let first = conn.mark_closed(reason);
        let (leaked_before, keep) = {
            let mut st = conn.state();
            let before = st.leaked;
            let keep = match conn.leak {
                Some(LeakMode::SkipRemove) => true,
                // The pipe that owns it hangs and will never close it, so nothing removes it.
                Some(LeakMode::StuckPipe) => origin == Origin::Peer || st.leaked,
                _ => false,
            };
            if keep {
                st.leaked = true;
            }
            (before, keep)
        };
        if keep {
            if !leaked_before {
                self.hub
                    .tunnel
                    .leak(conn.leak.map(LeakMode::name).unwrap_or(""));
            }
        } else {
            self.conns().remove(&conn.id);
            let count = {
                let mut st = conn.state();
                !std::mem::replace(&mut st.counted_removed, true)
            };
            if count {
                self.hub
                    .tunnel
                    .remove_conn(&self.client_key, &conn.proto, &conn.address);
            }
        }
        if first && origin == Origin::Local {
            let f = Frame::new(next_message_id(), conn.id, Body::Error(text));
            if let Ok(n) = self.send_frame(f).await {
                self.hub.tunnel.transmit_error(&self.client_key, n);
            }
        }
    }

    /// Reads frames until the websocket ends, then closes every connection.
    pub async fn serve<S>(
        self: &Arc<Self>,
        mut stream: SplitStream<WebSocketStream<S>>,
    ) -> SessionEnd
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut stop = self.stop.subscribe();
        let end = loop {
            let next = tokio::select! {
                n = tokio::time::timeout(IDLE_TIMEOUT, stream.next()) => n,
                // Session::shutdown from elsewhere (a closed peer, a debug close).
                _ = stop.wait_for(|s| *s) => break SessionEnd::ClosedLocally,
            };
            let next = match next {
                Err(_) => break SessionEnd::Idle(IDLE_TIMEOUT),
                Ok(None) => break SessionEnd::Closed,
                Ok(Some(Err(e))) => break SessionEnd::Ws(e),
                Ok(Some(Ok(m))) => m,
            };
            match next {
                Message::Binary(b) => {
                    if let Err(e) = self.handle(&b).await {
                        break e;
                    }
                }
                Message::Text(_) => break SessionEnd::WrongMessageType,
                Message::Close(_) => break SessionEnd::Closed,
                // Pings are answered by tungstenite itself; any inbound traffic counts as alive.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        };
        self.shutdown().await;
        end
    }

    async fn handle(self: &Arc<Self>, raw: &Bytes) -> Result<(), SessionEnd> {
        let f = match Frame::decode(raw) {
            Ok(f) => f,
            Err(FrameError::UnknownType(t)) => {
                // Go ignores message types it does not know; a newer peer should not kill us.
                tracing::debug!(t, "ignoring unknown message type");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let existing = || self.conns().get(&f.conn_id).cloned();
        match f.body {
            Body::Data(data) => match existing() {
                Some(c) => {
                    if self.offer(&c, data) {
                        self.send_frame(Frame::new(next_message_id(), c.id, Body::Pause))
                            .await?;
                    }
                }
                None => {
                    let msg = format!(
                        "connection not found {}/{}/{}",
                        self.client_key, self.session_key, f.conn_id
                    );
                    self.send_frame(Frame::new(next_message_id(), f.conn_id, Body::Error(msg)))
                        .await?;
                }
            },
            Body::Connect { proto, address } => self.on_connect(f.conn_id, proto, address).await?,
            Body::Error(text) => {
                if let Some(c) = existing() {
                    self.close_conn(&c, CloseReason::from_text(&text), Origin::Peer)
                        .await;
                }
            }
            Body::Pause => {
                if let Some(c) = existing() {
                    c.state().peer_paused = true;
                }
            }
            Body::Resume => {
                if let Some(c) = existing() {
                    c.state().peer_paused = false;
                    c.writable.notify_one();
                }
            }
            Body::SyncConnections(ids) => self.sync_connections(ids).await,
            // A peer announcing which clients it can reach (peering, see server.rs).
            Body::AddClient(k) => self.add_remote_client(&k)?,
            Body::RemoveClient(k) => self.remove_remote_client(&k)?,
        }
        Ok(())
    }

    async fn on_connect(
        self: &Arc<Self>,
        id: i64,
        proto: String,
        address: String,
    ) -> Result<(), SessionEnd> {
        let Some(handler) = self.handler.clone() else {
            let f = Frame::new(
                next_message_id(),
                id,
                Body::Error("connect not allowed".into()),
            );
            self.send_frame(f).await?;
            return Ok(());
        };
        if self.conns().contains_key(&id) {
            let f = Frame::new(
                next_message_id(),
                id,
                Body::Error("connection id in use".into()),
            );
            self.send_frame(f).await?;
            return Ok(());
        }
        let conn = Conn::new(id, proto, address, self.leak.pick());
        self.register(&conn);
        handler.on_connect(TunnelConn {
            session: self.clone(),
            conn,
        });
        Ok(())
    }

    /// Returns whether a Pause must be sent.
    fn offer(&self, c: &Arc<Conn>, data: Bytes) -> bool {
        let pause = {
            let mut st = c.state();
            if st.closed.is_some() {
                return false;
            }
            st.buffered += data.len();
            st.buf.push_back(data);
            if st.buffered > PAUSE_ABOVE && !st.we_paused {
                st.we_paused = true;
                true
            } else {
                false
            }
        };
        c.readable.notify_one();
        pause
    }

    /// remotedialer's compareAndCloseStaleConnections: whatever the peer no longer has is closed
    /// here without telling it.
    async fn sync_connections(&self, mut peer_ids: Vec<i64>) {
        peer_ids.sort_unstable();
        let stale: Vec<Arc<Conn>> = self
            .conns()
            .values()
            .filter(|c| peer_ids.binary_search(&c.id).is_err())
            .cloned()
            .collect();
        for c in stale {
            if c.state().leaked {
                continue;
            }
            self.close_conn(
                &c,
                CloseReason::Error("sync from client".into()),
                Origin::Sync,
            )
            .await;
        }
    }

    pub async fn send_sync(&self) -> Result<(), SessionEnd> {
        let ids = self.active_ids();
        self.send_frame(Frame::new(next_message_id(), 0, Body::SyncConnections(ids)))
            .await
            .map(|_| ())
    }

    /// Ends the session: every connection closes ("tunnel disconnect") and is counted removed,
    /// the map is emptied and the writer stops. Idempotent.
    pub async fn shutdown(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let all: Vec<Arc<Conn>> = self.conns().drain().map(|(_, c)| c).collect();
        for c in all {
            c.mark_closed(CloseReason::Error("tunnel disconnect".into()));
            let count = {
                let mut st = c.state();
                !st.leaked && !std::mem::replace(&mut st.counted_removed, true)
            };
            if count {
                self.hub
                    .tunnel
                    .remove_conn(&self.client_key, &c.proto, &c.address);
            }
        }
        let _ = self.stop.send(true);
    }
}

impl TunnelConn {
    pub fn id(&self) -> i64 {
        self.conn.id
    }

    /// Next chunk from the peer; `Ok(None)` on graceful close (`EOF`).
    pub async fn read(&self) -> Result<Option<Bytes>, String> {
        loop {
            let got = {
                let mut st = self.conn.state();
                if let Some(b) = st.buf.pop_front() {
                    st.buffered -= b.len();
                    let resume = st.we_paused && st.buffered < RESUME_BELOW;
                    if resume {
                        st.we_paused = false;
                    }
                    Some(Ok((b, resume)))
                } else {
                    st.closed.as_ref().map(|r| Err(r.clone()))
                }
            };
            match got {
                Some(Ok((b, resume))) => {
                    self.session
                        .hub
                        .tunnel
                        .receive(&self.session.client_key, b.len());
                    if resume {
                        let f = Frame::new(next_message_id(), self.conn.id, Body::Resume);
                        // A gone writer surfaces on the next read as a close.
                        let _ = self.session.send_frame(f).await;
                    }
                    return Ok(Some(b));
                }
                Some(Err(CloseReason::Eof)) => return Ok(None),
                Some(Err(CloseReason::Error(e))) => return Err(e),
                None => self.conn.readable.notified().await,
            }
        }
    }

    /// Sends one chunk to the peer, waiting while the peer has paused this connection.
    pub async fn write(&self, data: Bytes) -> Result<(), String> {
        loop {
            {
                let st = self.conn.state();
                if let Some(r) = &st.closed {
                    return Err(format!("io: read/write on closed pipe ({})", r.text()));
                }
                if !st.peer_paused {
                    break;
                }
            }
            self.conn.writable.notified().await;
        }
        let f = Frame::new(next_message_id(), self.conn.id, Body::Data(data));
        let n = self
            .session
            .send_frame(f)
            .await
            .map_err(|e| e.to_string())?;
        self.session
            .hub
            .tunnel
            .transmit(&self.session.client_key, n);
        Ok(())
    }

    /// Whether the peer has asked us to stop sending (Pause without Resume yet).
    pub fn peer_paused(&self) -> bool {
        self.conn.state().peer_paused
    }

    pub async fn close(&self, reason: CloseReason, origin: Origin) {
        self.session.close_conn(&self.conn, reason, origin).await;
    }
}

async fn write_loop<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    mut rx: mpsc::Receiver<Message>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(first) = first else { break };
        if sink.feed(first).await.is_err() {
            return;
        }
        // Batch whatever is already queued into one flush.
        while let Ok(m) = rx.try_recv() {
            if sink.feed(m).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::Role;

    struct Grab(mpsc::UnboundedSender<TunnelConn>);

    impl ConnectHandler for Grab {
        fn on_connect(&self, conn: TunnelConn) {
            let _ = self.0.send(conn);
        }
    }

    /// Server and agent sessions over an in-memory websocket; the agent accepts Connects only
    /// when `accept` is set.
    async fn pair(
        hub: Arc<MetricsHub>,
        accept: bool,
    ) -> (Arc<Session>, mpsc::UnboundedReceiver<TunnelConn>) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let ws_s = WebSocketStream::from_raw_socket(a, Role::Server, Some(ws_config())).await;
        let ws_a = WebSocketStream::from_raw_socket(b, Role::Client, Some(ws_config())).await;
        let (tx, rx) = mpsc::unbounded_channel();
        let off = Arc::new(LeakPolicy::off());
        let handler: Option<Arc<dyn ConnectHandler>> = if accept {
            Some(Arc::new(Grab(tx)))
        } else {
            None
        };
        let (server, s_stream) =
            Session::start(ws_s, "downstream-1".into(), hub.clone(), off.clone(), None);
        let (agent, a_stream) = Session::start(ws_a, "client".into(), hub, off, handler);
        let s2 = server.clone();
        tokio::spawn(async move { s2.serve(s_stream).await });
        tokio::spawn(async move { agent.serve(a_stream).await });
        (server, rx)
    }

    async fn within<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("timed out")
    }

    #[tokio::test]
    async fn pause_and_resume_follow_buffer_levels() {
        let hub = Arc::new(MetricsHub::new(true).expect("hub"));
        let (server, mut accepted) = pair(hub.clone(), true).await;
        let sconn = server.dial("tcp", "127.0.0.1:1").await.expect("dial");
        let aconn = within(accepted.recv())
            .await
            .expect("connect reached the agent");
        const CHUNK: usize = 32 * 1024;
        const CHUNKS: usize = 200; // 6.4 MB: well past the 2 MiB pause threshold
        let writer_conn = aconn.clone();
        let writer = tokio::spawn(async move {
            for _ in 0..CHUNKS {
                writer_conn.write(Bytes::from(vec![7u8; CHUNK])).await?;
            }
            Ok::<_, String>(())
        });
        // Nobody reads on the server side: the agent must be paused and the writer blocked.
        let paused = async {
            while !aconn.peer_paused() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), paused)
            .await
            .expect("agent was never paused");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!writer.is_finished(), "writer ignored Pause");
        // Draining resumes the writer and every byte arrives, in order and intact.
        let mut got = 0usize;
        while got < CHUNK * CHUNKS {
            let b = tokio::time::timeout(Duration::from_secs(10), sconn.read())
                .await
                .expect("read stalled")
                .expect("read ok")
                .expect("not EOF");
            assert!(b.iter().all(|&x| x == 7));
            got += b.len();
        }
        within(writer).await.expect("join").expect("writes ok");
        // The final Resume may still be in flight.
        within(async {
            while aconn.peer_paused() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        // Close from the agent: the server sees EOF after the data, and both sides count it.
        aconn.close(CloseReason::Eof, Origin::Local).await;
        let end = tokio::time::timeout(Duration::from_secs(5), sconn.read())
            .await
            .expect("close reached the server");
        assert_eq!(end, Ok(None));
        assert_eq!(server.connection_count(), 0);
        let text = hub.render();
        assert!(text.contains("session_server_total_remove_connections{addr=\"127.0.0.1:1\",clientkey=\"downstream-1\",proto=\"tcp\"} 1"), "{text}");
    }

    #[tokio::test]
    async fn server_sessions_learn_announced_clients_and_end_on_bad_ones() {
        let hub = Arc::new(MetricsHub::new(false).expect("hub"));
        let (a, b) = tokio::io::duplex(64 * 1024);
        let ws_s = WebSocketStream::from_raw_socket(a, Role::Server, Some(ws_config())).await;
        let ws_c = WebSocketStream::from_raw_socket(b, Role::Client, Some(ws_config())).await;
        let off = Arc::new(LeakPolicy::off());
        let (tx, _rx) = mpsc::unbounded_channel();
        let (server, s_stream) =
            Session::start(ws_s, "server-a".into(), hub.clone(), off.clone(), None);
        let (client, c_stream) =
            Session::start(ws_c, "client".into(), hub, off, Some(Arc::new(Grab(tx))));
        let s2 = server.clone();
        let served = tokio::spawn(async move { s2.serve(s_stream).await });
        let c2 = client.clone();
        tokio::spawn(async move { c2.serve(c_stream).await });
        let announce = |b: Body| client.send_frame(Frame::new(next_message_id(), 0, b));
        announce(Body::AddClient("c1/7".into()))
            .await
            .expect("send");
        announce(Body::AddClient("c1/8".into()))
            .await
            .expect("send");
        within(async {
            while !server.has_remote_client("c1") {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert_eq!(server.remote_clients(), vec!["c1".to_owned()]);
        // A client session keeps no such map (Go's nil remoteClientKeys).
        assert!(!client.has_remote_client("c1"));
        announce(Body::RemoveClient("c1/7".into()))
            .await
            .expect("send");
        announce(Body::RemoveClient("c1/8".into()))
            .await
            .expect("send");
        within(async {
            while server.has_remote_client("c1") {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        // parseAddress fails: the session ends, as newServerMessage errors do in Go.
        announce(Body::AddClient("no-session-key".into()))
            .await
            .expect("send");
        let end = within(served).await.expect("join");
        assert!(
            matches!(&end, SessionEnd::InvalidRemoteSession(a) if a == "no-session-key"),
            "{end}"
        );
    }

    #[tokio::test]
    async fn connect_without_handler_is_refused_per_connection() {
        let hub = Arc::new(MetricsHub::new(false).expect("hub"));
        let (server, _accepted) = pair(hub.clone(), false).await;
        let refused = server.dial("tcp", "127.0.0.1:1").await.expect("sent");
        assert_eq!(
            within(refused.read()).await,
            Err("connect not allowed".to_owned())
        );
        assert_eq!(server.connection_count(), 0);
        // The session survives the refusal.
        let again = server.dial("tcp", "127.0.0.1:1").await.expect("sent");
        assert!(within(again.read()).await.is_err());
    }

    #[tokio::test]
    async fn data_for_unknown_connection_gets_an_error() {
        let hub = Arc::new(MetricsHub::new(false).expect("hub"));
        let (server, mut accepted) = pair(hub, true).await;
        let sconn = server.dial("tcp", "127.0.0.1:1").await.expect("dial");
        let aconn = within(accepted.recv()).await.expect("agent side");
        sconn
            .write(Bytes::from_static(b"ping"))
            .await
            .expect("write");
        let got = within(aconn.read()).await.expect("read").expect("data");
        assert_eq!(&got[..], b"ping");
        // The agent forgets the connection without telling the server (as after a restart);
        // the server's next write is answered with "connection not found".
        aconn.session.conns().remove(&aconn.id());
        sconn
            .write(Bytes::from_static(b"again"))
            .await
            .expect("write");
        let r = within(sconn.read()).await;
        assert!(
            matches!(&r, Err(e) if e.starts_with("connection not found client/")),
            "{r:?}"
        );
    }
}
