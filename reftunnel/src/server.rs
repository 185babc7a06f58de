//! Tunnel server: accepts agents on `/connect`, proxies `/proxy/<clientid>/<path>` through them
//! to the backend, serves `/metrics` and `/debug/tasks`, all on one listener.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

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
use crate::pipe::{self, PipeEnd};
use crate::session::{CloseReason, Origin, Session, ws_config};
use crate::{say, tasks};

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
}

/// Sessions by client key; the first session of a key serves its dials (remotedialer's
/// sessionManager without peers).
#[derive(Default)]
struct Sessions(Mutex<HashMap<String, Vec<Arc<Session>>>>);

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<Arc<Session>>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn add(&self, s: &Arc<Session>) {
        self.lock()
            .entry(s.client_key.clone())
            .or_default()
            .push(s.clone());
    }
    fn remove(&self, s: &Arc<Session>) {
        let mut m = self.lock();
        if let Some(v) = m.get_mut(&s.client_key) {
            v.retain(|x| x.session_key != s.session_key);
            if v.is_empty() {
                m.remove(&s.client_key);
            }
        }
    }
    fn get(&self, key: &str) -> Option<Arc<Session>> {
        self.lock().get(key).and_then(|v| v.first().cloned())
    }
    fn totals(&self) -> (usize, usize) {
        let m = self.lock();
        let sessions = m.values().map(Vec::len).sum();
        let conns = m.values().flatten().map(|s| s.connection_count()).sum();
        (sessions, conns)
    }
}

struct State {
    token: String,
    backend: String,
    hub: Arc<MetricsHub>,
    leak: Arc<LeakPolicy>,
    sessions: Sessions,
}

pub async fn run(cfg: ServerConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(State {
        token: cfg.token,
        backend: cfg.backend,
        hub: Arc::new(MetricsHub::new(cfg.remotedialer_metrics)?),
        leak: Arc::new(LeakPolicy::new(cfg.leak, cfg.leak_every)),
        sessions: Sessions::default(),
    });
    say!("server listening on {addr}");
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
    let (req, rest) = match http::read_request(&mut sock).await {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(%peer, "bad request: {e}");
            let _ = http::respond(&mut sock, 400, "text/plain", e.to_string().as_bytes()).await;
            return;
        }
    };
    let path = req.path.split('?').next().unwrap_or("").to_owned();
    let r = match path.as_str() {
        "/connect" => return accept_agent(state, sock, req, rest).await,
        "/metrics" => {
            refresh_gauges(&state);
            let body = state.hub.render();
            http::respond(
                &mut sock,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                body.as_bytes(),
            )
            .await
        }
        "/debug/tasks" => {
            http::respond(&mut sock, 200, "text/plain", tasks::render().as_bytes()).await
        }
        "/debug/pprof/goroutine" => {
            let dump = tasks::render_goroutine_dump();
            http::respond(&mut sock, 200, "text/plain", dump.as_bytes()).await
        }
        "/healthz" => http::respond(&mut sock, 200, "text/plain", b"ok\n").await,
        p if p.starts_with("/proxy/") => return proxy(state, sock, req, rest).await,
        _ => http::respond(&mut sock, 404, "text/plain", b"not found\n").await,
    };
    if let Err(e) = r {
        tracing::debug!(%peer, "response: {e}");
    }
}

fn refresh_gauges(state: &State) {
    let (sessions, conns) = state.sessions.totals();
    state.hub.live_sessions.set(sessions as i64);
    state.hub.live_connections.set(conns as i64);
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from response timing.
fn token_ok(given: &str, want: &str) -> bool {
    let (a, b) = (given.as_bytes(), want.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn accept_agent(state: Arc<State>, mut sock: TcpStream, req: Request, rest: BytesMut) {
    let id = req.header(ID_HEADER).unwrap_or("").to_owned();
    let token = req.header(TOKEN_HEADER).unwrap_or("");
    if id.is_empty() || !token_ok(token, &state.token) {
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
    state.sessions.add(&session);
    state.hub.tunnel.add_ws(&id, false);
    say!("agent {id} connected (session {})", session.session_key);
    let end = session.serve(stream).await;
    state.sessions.remove(&session);
    state.hub.tunnel.remove_ws(&id, false);
    say!("agent {id} disconnected: {end}");
}

/// `/proxy/<clientid>/<rest>`: one caller socket = one tunneled connection to the backend, piped
/// byte for byte after the request line is rewritten to `/<rest>`.
async fn proxy(state: Arc<State>, mut sock: TcpStream, req: Request, rest: BytesMut) {
    let tail = req.path.strip_prefix("/proxy/").unwrap_or("");
    let (client, path) = match tail.split_once('/') {
        Some((c, p)) => (c, format!("/{p}")),
        None => (tail, "/".to_owned()),
    };
    let Some(session) = state.sessions.get(client) else {
        let msg = format!("failed to find Session for client {client}\n");
        let _ = http::respond(&mut sock, 503, "text/plain", msg.as_bytes()).await;
        return;
    };
    let conn = match session.dial("tcp", &state.backend).await {
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
    let res = pipe::pipe(&mut sock, &conn, stuck).await;
    if stuck && res.end.tunnel_side() {
        // Leak: the far side is done, but this task never finishes and never closes the
        // caller's socket; the caller's FIN leaves it in CLOSE_WAIT.
        tracing::debug!(conn = conn.id(), "stuck-pipe: holding caller socket");
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
