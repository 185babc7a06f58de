//! Tunnel agent: dials the server's websocket, serves its Connect requests by dialing real TCP
//! targets, and reconnects with a short backoff whenever the session ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::leak::{LeakMode, LeakPolicy};
use crate::metrics::MetricsHub;
use crate::pipe::{self, PipeEnd};
use crate::server::{ID_HEADER, TOKEN_HEADER};
use crate::session::{
    CloseReason, ConnectHandler, Origin, PING_INTERVAL, Session, TunnelConn, ws_config,
};
use crate::{say, tasks};

/// remotedialer's HandshakeTimeOut.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// clientDial's deadline.
const DIAL_TIMEOUT: Duration = Duration::from_secs(60);

pub struct AgentConfig {
    pub server: String,
    pub token: String,
    pub id: String,
    pub leak: Option<LeakMode>,
    pub leak_every: u64,
    pub allow: Vec<String>,
    pub allow_any: bool,
    pub sync_interval: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub metrics_listen: Option<String>,
    pub remotedialer_metrics: bool,
    /// Agents run by this process, `<id>-0` ... `<id>-<count-1>` when more than one.
    pub count: u64,
}

/// Which targets the agent dials for the server: loopback by default (this is a test tool), plus
/// exact `host:port` entries from `--allow`, or anything with `--allow-any`.
struct Dialer {
    allow: Vec<String>,
    allow_any: bool,
}

impl Dialer {
    async fn resolve(&self, proto: &str, address: &str) -> Result<Vec<SocketAddr>, String> {
        if !matches!(proto, "tcp" | "tcp4" | "tcp6") {
            return Err(format!("unsupported network {proto}"));
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(address)
            .await
            .map_err(|e| format!("dial {proto} {address}: {e}"))?
            .filter(|a| match proto {
                "tcp4" => a.is_ipv4(),
                "tcp6" => a.is_ipv6(),
                _ => true,
            })
            .collect();
        if addrs.is_empty() {
            return Err(format!("dial {proto} {address}: no addresses"));
        }
        let listed = self.allow_any || self.allow.iter().any(|a| a == address);
        if !listed && !addrs.iter().all(|a| a.ip().is_loopback()) {
            return Err("connect not allowed".to_owned());
        }
        Ok(addrs)
    }
}

impl ConnectHandler for Dialer {
    fn on_connect(&self, conn: TunnelConn) {
        let dialer = Dialer {
            allow: self.allow.clone(),
            allow_any: self.allow_any,
        };
        tasks::spawn("agent.dial_pipe", async move {
            dial_and_pipe(dialer, conn).await
        });
    }
}

async fn dial_and_pipe(dialer: Dialer, conn: TunnelConn) {
    let proto = conn.conn.proto.clone();
    let address = conn.conn.address.clone();
    let dialed = async {
        let addrs = dialer.resolve(&proto, &address).await?;
        TcpStream::connect(&addrs[..])
            .await
            .map_err(|e| format!("dial {proto} {address}: {e}"))
    };
    let mut sock = match tokio::time::timeout(DIAL_TIMEOUT, dialed).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return conn.close(CloseReason::Error(e), Origin::Local).await,
        Err(_) => {
            let e = format!("dial {proto} {address}: i/o timeout");
            return conn.close(CloseReason::Error(e), Origin::Local).await;
        }
    };
    let _ = sock.set_nodelay(true);
    let res = pipe::pipe(&mut sock, &conn, false).await;
    let reason = match res.end {
        PipeEnd::SocketError(e) => CloseReason::Error(e.to_string()),
        PipeEnd::TunnelError(e) => CloseReason::Error(e),
        PipeEnd::SocketEof | PipeEnd::TunnelEof => CloseReason::Eof,
    };
    // Data frames were queued before this, so the peer sees all data, then EOF.
    conn.close(reason, Origin::Local).await;
    if conn.conn.leak == Some(LeakMode::NoClose) {
        // Leak: the backend socket is never closed. Parked as a std socket so it stays open
        // (and countable) without a task or reactor registration.
        conn.session.record_leak(LeakMode::NoClose);
        match sock.into_std() {
            Ok(s) => crate::leak::hold_socket(s),
            Err(e) => tracing::warn!("no-close: could not hold socket: {e}"),
        }
    }
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    if !(cfg.server.starts_with("ws://") || cfg.server.starts_with("wss://")) {
        bail!("--server must be a ws:// URL, got {}", cfg.server);
    }
    let hub = Arc::new(MetricsHub::new(cfg.remotedialer_metrics)?);
    if let Some(l) = &cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(l)
            .await
            .with_context(|| format!("binding {l}"))?;
        say!("agent metrics listening on {}", listener.local_addr()?);
        tasks::spawn(
            "agent.metrics",
            crate::metrics::serve_metrics(listener, hub.clone()),
        );
    }
    let leak = Arc::new(LeakPolicy::new(cfg.leak, cfg.leak_every));
    let handler: Arc<dyn ConnectHandler> = Arc::new(Dialer {
        allow: cfg.allow.clone(),
        allow_any: cfg.allow_any,
    });
    if cfg.count <= 1 {
        let id = cfg.id.clone();
        return session_loop(&cfg, &id, &hub, &leak, &handler).await;
    }
    // Many agents, one websocket each, as many clusters' agents would hold to one Rancher.
    let cfg = Arc::new(cfg);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..cfg.count {
        let (cfg, hub, leak, handler) = (cfg.clone(), hub.clone(), leak.clone(), handler.clone());
        set.spawn(async move {
            let id = format!("{}-{i}", cfg.id);
            session_loop(&cfg, &id, &hub, &leak, &handler).await
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// One agent: a session, and a new one with a backoff whenever it ends.
async fn session_loop(
    cfg: &AgentConfig,
    id: &str,
    hub: &Arc<MetricsHub>,
    leak: &Arc<LeakPolicy>,
    handler: &Arc<dyn ConnectHandler>,
) -> anyhow::Result<()> {
    let mut backoff = cfg.backoff_min;
    loop {
        match connect_once(cfg, id, hub, leak, handler).await {
            Ok(()) => backoff = cfg.backoff_min,
            Err(e) => {
                tracing::warn!("agent {id}: {e:#}");
                say!("agent {id} connect failed: {e:#}");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(cfg.backoff_max);
    }
}

/// Opens a tunnel websocket to `url`, authenticated as `id` with `token` (remotedialer's headers):
/// what an agent does to its server, and a server to its peer (`who` names the other side in errors).
pub async fn dial_session(
    url: &str,
    id: &str,
    token: &str,
    who: &str,
) -> anyhow::Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
> {
    let mut req = url.into_client_request()?;
    let h = req.headers_mut();
    h.insert(ID_HEADER, HeaderValue::from_str(id)?);
    h.insert(TOKEN_HEADER, HeaderValue::from_str(token)?);
    let connect = tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true);
    let (ws, _resp) = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
        .await
        .context("handshake timed out")?
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) => {
                anyhow::anyhow!("{who} refused the session: HTTP {}", r.status())
            }
            e => anyhow::anyhow!("connecting to {url}: {e}"),
        })?;
    Ok(ws)
}

/// One session; Ok once a session was up (whatever ended it), so the backoff restarts small.
async fn connect_once(
    cfg: &AgentConfig,
    id: &str,
    hub: &Arc<MetricsHub>,
    leak: &Arc<LeakPolicy>,
    handler: &Arc<dyn ConnectHandler>,
) -> anyhow::Result<()> {
    let ws = dial_session(&cfg.server, id, &cfg.token, "server").await?;
    // remotedialer's client session always uses the client key "client".
    let (session, stream) = Session::start(
        ws,
        "client".to_owned(),
        hub.clone(),
        leak.clone(),
        Some(handler.clone()),
    );
    hub.live_sessions.set(1);
    say!("agent {id} connected to {}", cfg.server);
    let keepalive = tasks::spawn(
        "agent.keepalive",
        keepalive(session.clone(), cfg.sync_interval),
    );
    let end = session.serve(stream).await;
    keepalive.abort();
    hub.live_sessions.set(0);
    say!("agent {id} disconnected: {end}");
    Ok(())
}

/// remotedialer's client pings (every 5 s) and SyncConnections (every 60 s by default).
pub(crate) async fn keepalive(session: Arc<Session>, sync_interval: Duration) {
    let mut ping = tokio::time::interval(PING_INTERVAL);
    let sync_on = !sync_interval.is_zero();
    let mut sync = tokio::time::interval(if sync_on {
        sync_interval
    } else {
        Duration::from_secs(3600)
    });
    ping.tick().await;
    sync.tick().await;
    loop {
        tokio::select! {
            _ = ping.tick() => {
                if session.send_raw(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            _ = sync.tick(), if sync_on => {
                if session.send_sync().await.is_err() {
                    return;
                }
            }
        }
    }
}
