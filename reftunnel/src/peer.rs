//! Peering between servers, as remotedialer's `peer.go` does it (Rancher HA).
//!
//! * Every server has a peer id and a peer token (`Server.PeerID`, `Server.PeerToken`) and a list
//!   of peers (`AddPeer(url, id, token)`). For each peer it keeps one websocket open to the peer's
//!   `/connect`, sending its own id and token in `X-API-Tunnel-ID` / `X-API-Tunnel-Token`, and
//!   redials 5 s after a failure or a loss (`--peer-reconnect-delay`).
//! * The peer accepts it as a *peer* session (`total_add_websocket_session{peer="true"}`) only if
//!   the id is one of its own peers and the token is the one it has for that peer; otherwise the
//!   request falls through to the agents' authentication.
//! * The dialing server runs a *client* session (client key `client`) on that websocket and
//!   registers it as a listener of its session manager: it announces every session it holds with
//!   `AddClient("<clientkey>/<sessionkey>")` and every removal with `RemoveClient`.
//! * The accepting server records the announced clients on the peer's session. When it has no
//!   session of its own for a client, it dials through a peer session that announced it, with
//!   proto `<clientkey>::<proto>` (`toDialer` with a prefix).
//! * The announcing server receives that `Connect`, splits the proto at `::` and dials
//!   `<proto>`/`<address>` through its own session of `<clientkey>` (an ordinary Connect for the
//!   agent), then pipes the two tunneled connections together (`clientDial` + `pipe`).
//!
//! So a request arriving at B for an agent held by A goes over the websocket that **A** opened to
//! B; the one B opened to A serves the opposite direction. Peering is mutual in practice: A only
//! accepts B's websocket as a peer if B is one of A's peers.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::watch;

use crate::leak::LeakPolicy;
use crate::metrics::MetricsHub;
use crate::server::token_ok;
use crate::session::{CloseReason, ConnectHandler, Origin, Session, TunnelConn};
use crate::session_manager::SessionManager;
use crate::{say, tasks};

/// remotedialer's SyncConnectionsInterval (the peer's client session sends it, as an agent does).
const SYNC_INTERVAL: Duration = Duration::from_secs(60);

/// One peer: `id:token:url`, the format of remotedialer's example server (`-peers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub id: String,
    /// The token this peer sends when it dials us.
    pub token: String,
    /// The peer's websocket endpoint, e.g. `ws://10.0.0.2:8443/connect`.
    pub url: String,
}

impl FromStr for PeerSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.trim().splitn(3, ':');
        let (Some(id), Some(token), Some(url)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("expected id:token:url, got {s:?}"));
        };
        if id.is_empty() || token.is_empty() {
            return Err(format!("empty peer id or token in {s:?}"));
        }
        if !url.starts_with("ws://") {
            return Err(format!(
                "peer url must be ws://HOST:PORT/connect (no TLS here), got {url:?}"
            ));
        }
        Ok(Self {
            id: id.to_owned(),
            token: token.to_owned(),
            url: url.to_owned(),
        })
    }
}

struct PeerEntry {
    spec: PeerSpec,
    cancel: watch::Sender<bool>,
}

/// The server's peers (`Server.peers`) and its own peer identity.
pub struct Peers {
    own_id: String,
    own_token: String,
    reconnect_delay: Duration,
    sessions: Arc<SessionManager>,
    hub: Arc<MetricsHub>,
    map: Mutex<HashMap<String, PeerEntry>>,
}

impl Peers {
    pub fn new(
        own_id: String,
        own_token: String,
        reconnect_delay: Duration,
        sessions: Arc<SessionManager>,
        hub: Arc<MetricsHub>,
    ) -> Self {
        Self {
            own_id,
            own_token,
            reconnect_delay,
            sessions,
            hub,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, PeerEntry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Peering needs both a peer id and a peer token (Go's AddPeer returns otherwise).
    pub fn enabled(&self) -> bool {
        !self.own_id.is_empty() && !self.own_token.is_empty()
    }

    pub fn own_token(&self) -> &str {
        &self.own_token
    }

    /// `AddPeer`: starts keeping a session to the peer; the same spec again is a no-op, a changed
    /// one replaces the old session. Returns false when peering is off.
    pub fn add(&self, spec: PeerSpec) -> bool {
        if !self.enabled() {
            return false;
        }
        let mut m = self.lock();
        if let Some(old) = m.get(&spec.id) {
            if old.spec == spec {
                return true;
            }
            let _ = old.cancel.send(true);
        }
        tracing::info!(url = %spec.url, id = %spec.id, "adding peer");
        let (cancel, cancelled) = watch::channel(false);
        tasks::spawn(
            "server.peer",
            keep_peer_session(
                spec.clone(),
                self.own_id.clone(),
                self.own_token.clone(),
                self.reconnect_delay,
                self.sessions.clone(),
                self.hub.clone(),
                cancelled,
            ),
        );
        m.insert(spec.id.clone(), PeerEntry { spec, cancel });
        true
    }

    /// `RemovePeer`: stops the session to the peer and forgets it (its websocket to us is no
    /// longer accepted as a peer's).
    pub fn remove(&self, id: &str) -> bool {
        match self.lock().remove(id) {
            Some(p) => {
                tracing::info!(id, "removing peer");
                let _ = p.cancel.send(true);
                true
            }
            None => false,
        }
    }

    /// Go's peer authentication: the id is one of our peers and the token is that peer's.
    pub fn authenticate(&self, id: &str, token: &str) -> bool {
        if id.is_empty() || token.is_empty() {
            return false;
        }
        self.lock()
            .get(id)
            .is_some_and(|p| token_ok(token, &p.spec.token))
    }

    /// `id url` per configured peer, sorted.
    pub fn list(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self
            .lock()
            .values()
            .map(|p| (p.spec.id.clone(), p.spec.url.clone()))
            .collect();
        v.sort();
        v
    }
}

/// Sleeps `d`; true if the peer was removed meanwhile.
async fn sleep_or_cancelled(d: Duration, cancelled: &mut watch::Receiver<bool>) -> bool {
    let slept = tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = cancelled.wait_for(|c| *c) => false,
    };
    !slept || *cancelled.borrow()
}

/// `peer.start`: dial, serve as a client session announcing our sessions, redial after a delay.
async fn keep_peer_session(
    spec: PeerSpec,
    own_id: String,
    own_token: String,
    delay: Duration,
    sessions: Arc<SessionManager>,
    hub: Arc<MetricsHub>,
    mut cancelled: watch::Receiver<bool>,
) {
    let handler: Arc<dyn ConnectHandler> = Arc::new(PeerDialer {
        sessions: Arc::downgrade(&sessions),
    });
    let leak = Arc::new(LeakPolicy::off());
    loop {
        if *cancelled.borrow() {
            return;
        }
        hub.tunnel.peer_attempt(&spec.id);
        let ws = match dial(&spec.url, &own_id, &own_token).await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::error!(
                    "Failed to connect to peer {} [local ID={own_id}]: {e:#}",
                    spec.url
                );
                say!("peer {} connect failed: {e:#}", spec.id);
                if sleep_or_cancelled(delay, &mut cancelled).await {
                    return;
                }
                continue;
            }
        };
        hub.tunnel.peer_connected(&spec.id);
        // NewClientSession: client key "client", every Connect allowed, dialed by PeerDialer.
        let (session, stream) = Session::start(
            ws,
            "client".to_owned(),
            hub.clone(),
            leak.clone(),
            Some(handler.clone()),
        );
        let mut announcements = sessions.add_listener(&session);
        let announcer = {
            let session = session.clone();
            tasks::spawn("server.peer_notify", async move {
                tasks::wait("chan receive");
                while let Some(f) = announcements.recv().await {
                    tasks::run();
                    if session.send_frame(f).await.is_err() {
                        return;
                    }
                    tasks::wait("chan receive");
                }
            })
        };
        let keepalive = tasks::spawn(
            "server.peer_keepalive",
            crate::agent::keepalive(session.clone(), SYNC_INTERVAL),
        );
        say!("peer {} connected to {}", spec.id, spec.url);
        let end = tokio::select! {
            end = session.serve(stream) => end.to_string(),
            _ = cancelled.wait_for(|c| *c) => "peer removed".to_owned(),
        };
        sessions.remove_listener(&session);
        session.shutdown().await;
        announcer.abort();
        keepalive.abort();
        say!("peer {} disconnected: {end}", spec.id);
        tracing::info!("peer session to {} ended: {end}", spec.id);
        if sleep_or_cancelled(delay, &mut cancelled).await {
            return;
        }
    }
}

async fn dial(
    url: &str,
    own_id: &str,
    own_token: &str,
) -> anyhow::Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
> {
    crate::agent::dial_session(url, own_id, own_token, "peer").await
}

/// The peer session's dialer: `<clientkey>::<proto>` is dialed as `<proto>` through this
/// server's route to `<clientkey>` (its own session of that client, or another peer's).
struct PeerDialer {
    sessions: Weak<SessionManager>,
}

/// Frames of the two tasks of a peered connection in the goroutine dump (innermost first): Go's
/// `clientDial` goroutine, copying the far connection into the peer's, and the goroutine `pipe`
/// starts for the other direction; both block in remotedialer's `readBuffer.Read`.
const CLIENT_DIAL_FRAMES: &[&str] = &[
    "sync.(*Cond).Wait",
    "github.com/rancher/remotedialer.(*readBuffer).Read",
    "github.com/rancher/remotedialer.(*connection).Read",
    "io.copyBuffer",
    "io.Copy",
    "github.com/rancher/remotedialer.pipe",
    "github.com/rancher/remotedialer.clientDial",
];
const PIPE_COPY_FRAMES: &[&str] = &[
    "sync.(*Cond).Wait",
    "github.com/rancher/remotedialer.(*readBuffer).Read",
    "github.com/rancher/remotedialer.(*connection).Read",
    "io.copyBuffer",
    "io.Copy",
    "github.com/rancher/remotedialer.pipe.func2",
];

impl ConnectHandler for PeerDialer {
    fn on_connect(&self, conn: TunnelConn) {
        let sessions = self.sessions.clone();
        tasks::spawn_with_frames(
            "server.peer_pipe",
            CLIENT_DIAL_FRAMES,
            peer_dial(sessions, conn),
        );
    }
}

async fn peer_dial(sessions: Weak<SessionManager>, conn: TunnelConn) {
    let network = conn.conn.proto.clone();
    let address = conn.conn.address.clone();
    let Some((client, proto)) = network.split_once("::") else {
        let e = format!("invalid clientKey/proto: {network}");
        return conn.close(CloseReason::Error(e), Origin::Local).await;
    };
    let Some(route) = sessions.upgrade().and_then(|s| s.route(client)) else {
        let e = format!("failed to find Session for client {client}");
        return conn.close(CloseReason::Error(e), Origin::Local).await;
    };
    let far = match route.session.dial(&route.proto(proto), &address).await {
        Ok(c) => c,
        Err(e) => {
            return conn
                .close(CloseReason::Error(e.to_string()), Origin::Local)
                .await;
        }
    };
    // Go's pipe: one goroutine per direction; the first to end closes both connections (no
    // half-close in remotedialer), which ends the other.
    let other = {
        let (conn, far) = (conn.clone(), far.clone());
        tasks::spawn_with_frames("server.peer_pipe_copy", PIPE_COPY_FRAMES, async move {
            let end = copy(&conn, &far).await;
            close_pipe(&conn, &far, end).await;
        })
        .0
    };
    let end = copy(&far, &conn).await;
    close_pipe(&conn, &far, end).await;
    let _ = other.await;
}

/// Go's `closePipe`: the far connection gets EOF (`server.Close()`), the peer's the reason.
/// Closing an already closed connection again neither counts nor sends anything.
async fn close_pipe(peer: &TunnelConn, far: &TunnelConn, end: CloseReason) {
    tasks::run();
    far.close(CloseReason::Eof, Origin::Local).await;
    peer.close(end, Origin::Local).await;
}

/// Copies `from` into `to` until `from` ends or a write fails.
async fn copy(from: &TunnelConn, to: &TunnelConn) -> CloseReason {
    loop {
        tasks::wait("sync.Cond.Wait");
        match from.read().await {
            Ok(Some(data)) => {
                tasks::run();
                if let Err(e) = to.write(data).await {
                    return CloseReason::Error(e);
                }
            }
            Ok(None) => return CloseReason::Eof,
            Err(e) => return CloseReason::Error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_specs_parse_like_the_example_server() {
        let p: PeerSpec = "a:tok:ws://127.0.0.1:8123/connect".parse().expect("parse");
        assert_eq!(p.id, "a");
        assert_eq!(p.token, "tok");
        assert_eq!(p.url, "ws://127.0.0.1:8123/connect");
        assert!("a:tok".parse::<PeerSpec>().is_err());
        assert!(":tok:ws://x/connect".parse::<PeerSpec>().is_err());
        assert!("a:tok:http://x/connect".parse::<PeerSpec>().is_err());
    }
}
