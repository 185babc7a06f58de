//! Tunnel server: accepts agents on `/connect`, proxies `/proxy/<clientid>/<path>` through them
//! to the backend, serves `/metrics` and `/debug/tasks`, all on one listener.
//!
//! The proxy path is either a byte pipe per caller socket (`pipe`, where the leak modes act) or
//! a pooling HTTP client over tunneled connections (`transport.rs`), in the patterns Rancher's
//! proxy used before and after its v2.10.3 leak was fixed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::http::{self, Request};
use crate::leak::{LeakMode, LeakPolicy};
use crate::metrics::MetricsHub;
use crate::peer::{PeerSpec, Peers};
use crate::pipe::{self, PipeEnd};
use crate::session::{CloseReason, Origin, Session, ws_config};
use crate::session_manager::{Route, SessionManager};
use crate::transport::{
    ProxyRequest, ProxyTransport, Transport, TransportError, TransportOverride,
};
use crate::{controllers, say, tasks};

/// remotedialer's header names (peer.go).
pub const TOKEN_HEADER: &str = "X-API-Tunnel-Token";
pub const ID_HEADER: &str = "X-API-Tunnel-ID";

pub struct ServerConfig {
    pub listen: String,
    pub token: String,
    pub backend: String,
    pub remotedialer_metrics: bool,
    pub leak: Option<LeakMode>,
    pub leak_every: u64,
    pub transport: ProxyTransport,
    /// Clientkeys served by another transport than `transport` (exact match).
    pub transport_for: Vec<TransportOverride>,
    /// Serve further requests on a caller's connection (HTTP keep-alive) for every path but the
    /// piped proxy. Off keeps the one-request-per-socket behaviour of the `pipe` transport.
    pub caller_keep_alive: bool,
    /// This server's identity towards its peers (remotedialer's `PeerID`/`PeerToken`); peering
    /// is off unless both are set.
    pub peer_id: String,
    pub peer_token: String,
    /// Peers to keep a session to from the start (`AddPeer`); more can be added at run time
    /// with `POST /peers`.
    pub peers: Vec<PeerSpec>,
    /// Delay before redialing a peer after a failure or a lost session (remotedialer: 5 s).
    pub peer_reconnect_delay: std::time::Duration,
    /// Unrelated series exported beside the tunnel's (see [`MetricsHub::with_extra_series`]).
    pub extra_series: usize,
    /// Long-lived tasks that are not connections: a start-up ramp and a leak that begins later.
    pub controllers: controllers::ControllersConfig,
}

struct State {
    token: String,
    backend: String,
    hub: Arc<MetricsHub>,
    leak: Arc<LeakPolicy>,
    sessions: Arc<SessionManager>,
    peers: Peers,
    transport: ProxyTransport,
    overrides: HashMap<String, ProxyTransport>,
    caller_keep_alive: bool,
    /// The `shared` transport's pools, one per clientkey and backend address.
    shared: Mutex<HashMap<(String, String), Transport>>,
}

/// What `/proxy/<clientid>/[@<host:port>/]<rest>` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyPath {
    pub client: String,
    /// The backend the agent dials; `None`: the server's `--backend`.
    pub addr: Option<String>,
    /// The path sent to the backend, with its query.
    pub path: String,
}

/// Parses the part of a request path after `/proxy/`. The optional `@<host:port>` segment picks the
/// backend, so that one clientkey has ledger rows for several addrs, as a cluster's agent dials
/// the kube-apiserver, its steve and pods.
pub fn parse_proxy_path(tail: &str) -> Result<ProxyPath, String> {
    let (client, rest) = match tail.split_once('/') {
        Some((c, r)) => (c, Some(r)),
        None => (tail, None),
    };
    if client.is_empty() {
        return Err("no clientid in /proxy/<clientid>/...".into());
    }
    let (addr, path) = match rest {
        Some(r) if r.starts_with('@') => {
            let (a, p) = r[1..].split_once('/').unwrap_or((&r[1..], ""));
            if !valid_host_port(a) {
                return Err(format!(
                    "bad backend {a:?} in /proxy/<clientid>/@<host:port>/...: expected host:port"
                ));
            }
            (Some(a.to_owned()), format!("/{p}"))
        }
        Some(r) => (None, format!("/{r}")),
        None => (None, "/".to_owned()),
    };
    Ok(ProxyPath {
        client: client.to_owned(),
        addr,
        path,
    })
}

fn valid_host_port(a: &str) -> bool {
    let Some((host, port)) = a.rsplit_once(':') else {
        return false;
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner.strip_suffix(']').is_some_and(|h| !h.is_empty())
    } else {
        !host.is_empty() && !host.contains([':', '?', '#', '@'])
    };
    host_ok && port.parse::<u16>().is_ok_and(|p| p != 0)
}

impl State {
    /// How `client`'s requests reach the backend: its `--proxy-transport-for`, else the default.
    fn transport_kind(&self, client: &str) -> ProxyTransport {
        self.overrides
            .get(client)
            .copied()
            .unwrap_or(self.transport)
    }

    /// The transport for one request: the clientkey's shared pool for that backend, or a new pool
    /// for this request only (which its connections keep alive after the request, see
    /// transport.rs).
    fn transport_for(self: &Arc<Self>, client: &str, addr: &str) -> Transport {
        let new = |idle| Transport::new(self.dialer(client, addr), idle);
        match self.transport_kind(client) {
            ProxyTransport::Shared { idle_timeout } => self
                .shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry((client.to_owned(), addr.to_owned()))
                .or_insert_with(|| new(idle_timeout))
                .clone(),
            ProxyTransport::PerRequestIdle { idle_timeout } => new(Some(idle_timeout)),
            ProxyTransport::PerRequest | ProxyTransport::Pipe => new(None),
        }
    }

    /// Dials through whichever session of `client` is current at dial time, so a pool outlives
    /// an agent's reconnect.
    fn dialer(self: &Arc<Self>, client: &str, addr: &str) -> crate::transport::Dialer {
        let state = Arc::downgrade(self);
        let client = client.to_owned();
        let addr = addr.to_owned();
        Arc::new(move || {
            let state = state.clone();
            let client = client.clone();
            let addr = addr.clone();
            Box::pin(async move {
                let state = state
                    .upgrade()
                    .ok_or_else(|| TransportError::NoSession(client.clone()))?;
                state
                    .route(&client)
                    .ok_or(TransportError::NoSession(client))?
                    .dial("tcp", &addr)
                    .await
                    .map_err(|e| TransportError::Dial(e.to_string()))
            })
        })
    }
}

impl Route {
    /// Dials through the route's session: `proto` to the client's own session, `client::proto`
    /// through a peer's (remotedialer's `toDialer`).
    async fn dial(
        &self,
        proto: &str,
        address: &str,
    ) -> Result<crate::session::TunnelConn, crate::session::SessionEnd> {
        self.session.dial(&self.proto(proto), address).await
    }
}

impl State {
    /// remotedialer's `getDialer`: the client's own session first, then a peer that has it.
    fn route(&self, client: &str) -> Option<Route> {
        self.sessions.route(client)
    }
}

pub async fn run(cfg: ServerConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let hub =
        Arc::new(MetricsHub::new(cfg.remotedialer_metrics)?.with_extra_series(cfg.extra_series));
    let sessions = Arc::new(SessionManager::new(hub.clone()));
    let peers = Peers::new(
        cfg.peer_id,
        cfg.peer_token,
        cfg.peer_reconnect_delay,
        sessions.clone(),
        hub.clone(),
    );
    if !cfg.peers.is_empty() && !peers.enabled() {
        anyhow::bail!("--peers needs --peer-id and --peer-token");
    }
    let state = Arc::new(State {
        token: cfg.token,
        backend: cfg.backend,
        hub,
        leak: Arc::new(LeakPolicy::new(cfg.leak, cfg.leak_every)),
        sessions,
        peers,
        transport: cfg.transport,
        overrides: cfg
            .transport_for
            .into_iter()
            .map(|o| (o.clientkey, o.transport))
            .collect(),
        caller_keep_alive: cfg.caller_keep_alive,
        shared: Mutex::new(HashMap::new()),
    });
    say!("server listening on {addr}");
    controllers::start(cfg.controllers);
    for p in cfg.peers {
        state.peers.add(p);
    }
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        tasks::spawn("server.conn", handle(state.clone(), sock, peer));
    }
}

async fn handle(state: Arc<State>, mut sock: TcpStream, peer: SocketAddr) {
    let mut buf = BytesMut::new();
    let mut first = true;
    loop {
        let next = http::read_keep_alive_request(&mut sock, &mut buf, &mut first).await;
        let req = match next {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(%peer, "bad request: {e}");
                let _ = http::respond(&mut sock, 400, "text/plain", e.to_string().as_bytes()).await;
                return;
            }
        };
        let keep = state.caller_keep_alive && http::wants_keep_alive(&req);
        let path = req.path.split('?').next().unwrap_or("").to_owned();
        let r = match path.as_str() {
            "/connect" => return accept_agent(state, sock, req, buf).await,
            p if p.starts_with("/proxy/") => {
                let client = p["/proxy/".len()..].split('/').next().unwrap_or("");
                if !state.transport_kind(client).pooled() {
                    return proxy(state, sock, req, buf).await;
                }
                match proxy_pooled(&state, &mut sock, &mut buf, &req, keep).await {
                    Ok(true) => continue,
                    Ok(false) => {
                        pipe::shutdown(&mut sock).await;
                        return;
                    }
                    Err(e) => Err(e),
                }
            }
            "/metrics" => {
                refresh_gauges(&state);
                let body = state.hub.render();
                http::respond_maybe_keep(
                    &mut sock,
                    keep,
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    body.as_bytes(),
                )
                .await
            }
            "/debug/tasks" => {
                let body = tasks::render();
                http::respond_maybe_keep(&mut sock, keep, 200, "text/plain", body.as_bytes()).await
            }
            "/debug/pprof/goroutine" => {
                let query = req.path.split_once('?').map_or("", |(_, q)| q);
                let dump = tasks::render_goroutine_endpoint(query);
                http::respond_maybe_keep(&mut sock, keep, 200, "text/plain", dump.as_bytes()).await
            }
            "/healthz" => {
                http::respond_maybe_keep(&mut sock, keep, 200, "text/plain", b"ok\n").await
            }
            "/peers" => match peers_endpoint(&state, &mut sock, &mut buf, &req).await {
                Ok((status, body)) => {
                    http::respond_maybe_keep(&mut sock, keep, status, "text/plain", body.as_bytes())
                        .await
                }
                Err(e) => Err(e),
            },
            p if p.starts_with("/debug/sessions/") && req.method == "DELETE" => {
                let key = p.trim_start_matches("/debug/sessions/");
                let all = state.sessions.sessions_of(key);
                for s in &all {
                    s.shutdown().await;
                }
                let body = format!("closed {} session(s) of {key}\n", all.len());
                http::respond_maybe_keep(&mut sock, keep, 200, "text/plain", body.as_bytes()).await
            }
            _ => http::respond_maybe_keep(&mut sock, keep, 404, "text/plain", b"not found\n").await,
        };
        if let Err(e) = r {
            tracing::debug!(%peer, "response: {e}");
            return;
        }
        if !keep {
            return;
        }
    }
}

fn refresh_gauges(state: &State) {
    let (sessions, conns) = state.sessions.totals();
    state.hub.live_sessions.set(sessions as i64);
    state.hub.live_connections.set(conns as i64);
}

/// `GET /peers`: this server's peers and what their sessions announced. `POST /peers` with body
/// `id:token:url` adds a peer (remotedialer's `AddPeer`, which Rancher calls as replicas come and
/// go); `POST /peers` with body `-id` removes one (`RemovePeer`). Changes need this server's peer
/// token in `X-API-Tunnel-Token`.
async fn peers_endpoint(
    state: &Arc<State>,
    sock: &mut TcpStream,
    buf: &mut BytesMut,
    req: &Request,
) -> std::io::Result<(u16, String)> {
    if req.method == "GET" {
        let mut out = String::new();
        for (id, url) in state.peers.list() {
            out.push_str(&format!("peer {id} {url}\n"));
        }
        for (id, key, clients) in state.sessions.peer_sessions() {
            out.push_str(&format!(
                "session {id} {key} clients {}\n",
                clients.join(",")
            ));
        }
        return Ok((200, out));
    }
    if req.method != "POST" {
        return Ok((405, "GET or POST\n".into()));
    }
    let body = match read_body(sock, buf, req).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err((status, msg)) => return Ok((status, msg)),
    };
    if !state.peers.enabled() {
        return Ok((409, "peering is off: --peer-id and --peer-token\n".into()));
    }
    let given = req.header(TOKEN_HEADER).unwrap_or("");
    if !token_ok(given, state.peers.own_token()) {
        return Ok((401, "failed authentication\n".into()));
    }
    if let Some(id) = body.strip_prefix('-') {
        return Ok(if state.peers.remove(id) {
            (200, format!("removed peer {id}\n"))
        } else {
            (404, format!("no peer {id}\n"))
        });
    }
    match body.parse::<PeerSpec>() {
        Ok(spec) => {
            let id = spec.id.clone();
            state.peers.add(spec);
            Ok((200, format!("added peer {id}\n")))
        }
        Err(e) => Ok((400, format!("{e}\n"))),
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from response timing.
pub(crate) fn token_ok(given: &str, want: &str) -> bool {
    let (a, b) = (given.as_bytes(), want.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Server.ServeHTTP`: a peer's websocket (its peer id and token, if it is one of our peers) or
/// an agent's (the authorizer: a client id and `--token`).
async fn accept_agent(state: Arc<State>, mut sock: TcpStream, req: Request, rest: BytesMut) {
    let id = req.header(ID_HEADER).unwrap_or("").to_owned();
    let token = req.header(TOKEN_HEADER).unwrap_or("");
    let peer = state.peers.authenticate(&id, token);
    if !peer && (id.is_empty() || !token_ok(token, &state.token)) {
        tracing::info!(client = %id, "refused agent: failed authentication");
        let _ = http::respond(&mut sock, 401, "text/plain", b"failed authentication").await;
        return;
    }
    let upgrade = req
        .header("Upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.header("Sec-WebSocket-Key").filter(|_| upgrade) else {
        let _ = http::respond(&mut sock, 400, "text/plain", b"websocket upgrade required").await;
        return;
    };
    let accept = derive_accept_key(key.as_bytes());
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if sock.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let ws =
        WebSocketStream::from_partially_read(sock, rest.to_vec(), Role::Server, Some(ws_config()))
            .await;
    let (session, stream) =
        Session::start(ws, id.clone(), state.hub.clone(), state.leak.clone(), None);
    state.sessions.add(&session, peer);
    let who = if peer { "peer" } else { "agent" };
    say!("{who} {id} connected (session {})", session.session_key);
    let end = session.serve(stream).await;
    state.sessions.remove(&session);
    say!("{who} {id} disconnected: {end}");
}

/// `/proxy/<clientid>/<rest>`: one caller socket = one tunneled connection to the backend, piped
/// byte for byte after the request line is rewritten to `/<rest>`.
async fn proxy(state: Arc<State>, mut sock: TcpStream, req: Request, rest: BytesMut) {
    let tail = req.path.strip_prefix("/proxy/").unwrap_or("");
    let target = match parse_proxy_path(tail) {
        Ok(t) => t,
        Err(e) => {
            let _ = http::respond(&mut sock, 400, "text/plain", format!("{e}\n").as_bytes()).await;
            return;
        }
    };
    let client = target.client.as_str();
    let path = target.path;
    let addr = target.addr.as_deref().unwrap_or(&state.backend);
    let Some(route) = state.route(client) else {
        let msg = format!("failed to find Session for client {client}\n");
        let _ = http::respond(&mut sock, 503, "text/plain", msg.as_bytes()).await;
        return;
    };
    let conn = match route.dial("tcp", addr).await {
        Ok(c) => c,
        Err(e) => {
            let _ = http::respond(&mut sock, 502, "text/plain", e.to_string().as_bytes()).await;
            return;
        }
    };
    let mut head = format!("{} {} HTTP/1.{}\r\n", req.method, path, req.version);
    for (name, value) in &req.headers {
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        head.push_str(name);
        head.push_str(": ");
        head.push_str(&String::from_utf8_lossy(value));
        head.push_str("\r\n");
    }
    // One caller connection carries one request; the backend closes after answering.
    head.push_str("Connection: close\r\n\r\n");
    let mut first = BytesMut::from(head.as_bytes());
    first.extend_from_slice(&rest);
    if let Err(e) = conn.write(first.freeze()).await {
        conn.close(CloseReason::Error(e.clone()), Origin::Local)
            .await;
        let _ = http::respond(&mut sock, 502, "text/plain", e.as_bytes()).await;
        return;
    }
    let stuck = conn.conn.leak == Some(LeakMode::StuckPipe);
    // hold-abandoned: a caller that leaves does not end the pipe; it waits for the target, however
    // long the target hangs, then closes normally.
    let hold = stuck || conn.conn.leak == Some(LeakMode::HoldAbandoned);
    let res = pipe::pipe(&mut sock, &conn, hold).await;
    if stuck && res.end.tunnel_side() {
        // Leak: the far side is done, but this task never finishes and never closes the
        // caller's socket; the caller's FIN leaves it in CLOSE_WAIT.
        tracing::debug!(conn = conn.id(), "stuck-pipe: holding caller socket");
        tasks::wait("select");
        let _held = (sock, conn);
        std::future::pending::<()>().await;
        return;
    }
    match &res.end {
        PipeEnd::TunnelError(e) if res.to_socket == 0 => {
            // Nothing reached the caller yet (typically the agent's dial failed): answer properly.
            let _ = http::respond(&mut sock, 502, "text/plain", e.as_bytes()).await;
        }
        _ => pipe::shutdown(&mut sock).await,
    }
    let reason = match res.end {
        PipeEnd::SocketError(e) => CloseReason::Error(e.to_string()),
        _ => CloseReason::Eof,
    };
    conn.close(reason, Origin::Local).await;
}

/// Largest request body forwarded by the pooled transports (they buffer it to be able to retry).
const MAX_PROXY_BODY: u64 = 8 << 20;

/// Headers that belong to one hop, not to the message (RFC 9110 7.6.1, Go's hopHeaders).
fn hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// `/proxy/<clientid>/<rest>` through a pooling HTTP client (`shared`, `per-request`,
/// `per-request-idle`). Returns whether the caller's connection can carry another request.
async fn proxy_pooled(
    state: &Arc<State>,
    sock: &mut TcpStream,
    buf: &mut BytesMut,
    req: &Request,
    keep: bool,
) -> std::io::Result<bool> {
    let tail = req.path.strip_prefix("/proxy/").unwrap_or("");
    let target = match parse_proxy_path(tail) {
        Ok(t) => t,
        Err(e) => {
            http::respond(sock, 400, "text/plain", format!("{e}\n").as_bytes()).await?;
            return Ok(false);
        }
    };
    let client = target.client;
    let path = target.path;
    let addr = target.addr.unwrap_or_else(|| state.backend.clone());
    let body = match read_body(sock, buf, req).await {
        Ok(b) => b,
        Err((status, msg)) => {
            http::respond(sock, status, "text/plain", msg.as_bytes()).await?;
            return Ok(false);
        }
    };
    if state.route(&client).is_none() {
        // Before any pool exists: a clientid from the URL must not create state.
        let msg = format!("failed to find Session for client {client}\n");
        http::respond_maybe_keep(sock, keep, 503, "text/plain", msg.as_bytes()).await?;
        return Ok(keep);
    }
    let Ok(method) = ::http::Method::from_bytes(req.method.as_bytes()) else {
        http::respond(sock, 400, "text/plain", b"bad method\n").await?;
        return Ok(false);
    };
    let mut headers = ::http::HeaderMap::new();
    for (name, value) in &req.headers {
        if hop_by_hop(name) {
            continue;
        }
        // A header hyper would refuse is dropped rather than failing the request.
        if let (Ok(n), Ok(v)) = (
            ::http::HeaderName::from_bytes(name.as_bytes()),
            ::http::HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
    }
    if !headers.contains_key(::http::header::HOST) {
        if let Ok(v) = ::http::HeaderValue::from_str(&addr) {
            headers.insert(::http::header::HOST, v);
        }
    }
    let preq = ProxyRequest {
        method: method.clone(),
        path,
        headers,
        body,
    };
    let transport = state.transport_for(&client, &addr);
    let (resp, checkout) = match transport.round_trip(&preq).await {
        Ok(x) => x,
        Err(e) => {
            let status = if matches!(e, TransportError::NoSession(_)) {
                503
            } else {
                502
            };
            let msg = format!("{e}\n");
            http::respond_maybe_keep(sock, keep, status, "text/plain", msg.as_bytes()).await?;
            return Ok(keep);
        }
    };
    // The per-request transport handle goes away here; its connection keeps its pool alive.
    drop(transport);
    match relay_response(
        sock,
        resp,
        method == ::http::Method::HEAD,
        req.version,
        keep,
    )
    .await
    {
        Ok(keep_caller) => {
            checkout.release().await;
            Ok(keep_caller)
        }
        // The pooled connection (with an unread body, perhaps) is dropped, which closes it.
        Err(e) => Err(e),
    }
}

async fn read_body(
    sock: &mut TcpStream,
    buf: &mut BytesMut,
    req: &Request,
) -> Result<bytes::Bytes, (u16, String)> {
    use tokio::io::AsyncReadExt;
    let len = match http::request_body_len(req) {
        Ok(n) if n <= MAX_PROXY_BODY => n as usize,
        Ok(_) => return Err((413, "request body too large\n".into())),
        Err(e) => return Err((501, format!("{e}\n"))),
    };
    while buf.len() < len {
        buf.reserve(len - buf.len());
        match tokio::time::timeout(http::HEAD_TIMEOUT, sock.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Err((400, "short request body\n".into())),
        }
    }
    Ok(buf.split_to(len).freeze())
}

/// Writes the backend's response to the caller: its head without hop-by-hop headers, then the
/// body as it arrives (`Content-Length` kept; re-chunked when the backend gave no length).
/// Returns whether the caller's connection stays open.
async fn relay_response(
    sock: &mut TcpStream,
    resp: ::http::Response<hyper::body::Incoming>,
    head_only: bool,
    version: u8,
    keep: bool,
) -> std::io::Result<bool> {
    use http_body_util::BodyExt;
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let no_body = head_only
        || status.is_informational()
        || status == ::http::StatusCode::NO_CONTENT
        || status == ::http::StatusCode::NOT_MODIFIED;
    let has_len = parts.headers.contains_key(::http::header::CONTENT_LENGTH);
    let chunked = !no_body && !has_len && version >= 1;
    // Without a length or chunking, only closing the connection ends the body.
    let keep = keep && (no_body || has_len || chunked);
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in &parts.headers {
        if hop_by_hop(name.as_str()) {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if chunked {
        head.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if !keep {
        head.extend_from_slice(b"Connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
    sock.write_all(&head).await?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(std::io::Error::other)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() || no_body {
            continue;
        }
        if chunked {
            sock.write_all(format!("{:x}\r\n", data.len()).as_bytes())
                .await?;
            sock.write_all(&data).await?;
            sock.write_all(b"\r\n").await?;
        } else {
            sock.write_all(&data).await?;
        }
    }
    if chunked {
        sock.write_all(b"0\r\n\r\n").await?;
    }
    sock.flush().await?;
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_paths_name_the_client_and_optionally_the_backend() {
        let p = |s: &str| parse_proxy_path(s);
        assert_eq!(
            p("c-1/v1/pods?watch=1").unwrap(),
            ProxyPath {
                client: "c-1".into(),
                addr: None,
                path: "/v1/pods?watch=1".into()
            }
        );
        assert_eq!(p("c-1").unwrap().path, "/");
        assert_eq!(
            p("c-1/@127.0.0.1:6080/watch/5").unwrap(),
            ProxyPath {
                client: "c-1".into(),
                addr: Some("127.0.0.1:6080".into()),
                path: "/watch/5".into()
            }
        );
        assert_eq!(p("c-1/@[::1]:80").unwrap().path, "/");
        assert_eq!(
            p("c-1/@[::1]:80").unwrap().addr.as_deref(),
            Some("[::1]:80")
        );
        // A literal `@` later in the path is the backend's business.
        assert_eq!(p("c-1/a/@b").unwrap().addr, None);
        for bad in [
            "",
            "/x",
            "c/@",
            "c/@host",
            "c/@host:",
            "c/@:80",
            "c/@h:0",
            "c/@h:99999",
        ] {
            let e = p(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }
}
