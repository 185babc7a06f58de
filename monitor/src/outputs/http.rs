//! The live page (`/`), /metrics, /status and /healthz.
//!
//! Two audiences, two listeners. Prometheus scrapes `/metrics` and the kubelet probes `/healthz` over the
//! pod network; `/status` and the page name the target's peers, clientkeys and goroutine stacks, which
//! the pod network has no business reading. So `--listen` always serves the first two and serves the
//! private pair only when it is a loopback address; the private pair is otherwise on `--status-listen`
//! (loopback by default: `kubectl port-forward` reaches it), or on `--listen` behind a bearer token
//! (`--status-token-file`, as kube-rbac-proxy users expect) for those who opt in.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use serde::Serialize;
use tokio::net::TcpListener;

use super::{history::History, metrics::LeakwatchMetrics, page};
use crate::{analysis::Side, sample::Snapshot, verdict::Verdict};

/// What /status returns.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StatusDoc {
    pub target: String,
    pub mode: String,
    pub verdicts: Vec<Verdict>,
    pub snapshot: Option<Snapshot>,
    pub restarts: u64,
    pub notes: Vec<String>,
    /// The quiescence recipe's phase: idle, loaded, settling or stuck.
    pub load_phase: String,
    /// Goroutine stacks that grew since the baseline (Go targets serving pprof), most grown first.
    pub goroutine_growth: Vec<(String, i64)>,
    /// The target's longest-held sockets (eBPF socket table), oldest first.
    pub oldest_sockets: Vec<SocketView>,
    /// The cross-check at a glance: the side in effect, unbacked and idle-past-horizon connections, the
    /// fd forecast.
    pub crosscheck: crate::analysis::Derived,
    /// The thresholds in force (defaults, the config file and the command line resolved): what an on-call
    /// engineer needs to read a verdict's numbers, and what the demo quotes.
    pub analysis: crate::analysis::AnalysisConfig,
    /// The target's live TCP sockets per state by name (the snapshot's arrays are indexed by the kernel's
    /// state numbers), from eBPF, or from procfs in procfs-only mode.
    pub sockets_by_state: std::collections::BTreeMap<String, u64>,
}

/// One socket of the target as /status shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SocketView {
    pub state: String,
    pub origin: String,
    pub local: String,
    pub remote: String,
    /// Seconds since the probes first saw it.
    pub age_s: f64,
}

#[derive(Clone)]
pub struct Shared {
    pub metrics: Arc<Mutex<LeakwatchMetrics>>,
    pub status: Arc<RwLock<StatusDoc>>,
    pub last_tick: Arc<Mutex<Instant>>,
    /// /healthz fails when no tick completed for this long (the loop is stuck).
    pub stale_after: Duration,
    /// What the live page draws.
    pub history: Arc<Mutex<History>>,
    /// Names the kernel line of the cross-check (callers on a server, targets on an agent).
    pub side: Side,
}

#[derive(serde::Deserialize)]
struct PageQuery {
    /// How far back the charts look, in minutes (1 to 30; default all the history holds).
    minutes: Option<f64>,
}

/// The page reloads itself this often: often enough to watch a leak grow, rarely enough to cost nothing.
const REFRESH_S: u32 = 5;

async fn index(State(s): State<Shared>, Query(q): Query<PageQuery>) -> impl IntoResponse {
    let doc = s.status.read().map(|d| d.clone()).unwrap_or_default();
    let window = q
        .minutes
        .filter(|m| m.is_finite())
        .unwrap_or(30.0)
        .clamp(1.0, 30.0)
        * 60.0;
    let body = match s.history.lock() {
        Ok(h) => page::live_page(&doc, &h, window, REFRESH_S, s.side),
        Err(_) => "history unavailable\n".to_string(),
    };
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    let body = s.metrics.lock().map(|m| m.encode()).unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn status(State(s): State<Shared>) -> impl IntoResponse {
    let doc = s.status.read().map(|d| d.clone()).unwrap_or_default();
    Json(doc)
}

async fn healthz(State(s): State<Shared>) -> impl IntoResponse {
    let age = s
        .last_tick
        .lock()
        .map(|t| t.elapsed())
        .unwrap_or(Duration::MAX);
    if age <= s.stale_after {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("sampling loop stalled for {:.0}s\n", age.as_secs_f64()),
        )
    }
}

/// What a listener serves besides /metrics and /healthz.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Private {
    /// /status and / as well (a loopback listener, or the status listener).
    Open,
    /// /status and / only to requests that carry `Authorization: Bearer <token>`.
    Token(String),
    /// Not here: a request for them is told where they are.
    Elsewhere,
}

/// Where the two audiences are served (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listeners {
    pub public: SocketAddr,
    pub public_private: Private,
    /// The status listener, when /status and / are not (only) on `public`.
    pub status: Option<SocketAddr>,
}

/// The port of the status listener when `--listen` is not loopback and `--status-listen` is not given.
pub const DEFAULT_STATUS_PORT: u16 = 9478;

impl Listeners {
    /// `listen` and `status_listen` as given; `token` is the bearer token read from its file.
    pub fn plan(
        listen: SocketAddr,
        status_listen: Option<SocketAddr>,
        token: Option<String>,
    ) -> Self {
        let public_private = match token {
            Some(t) => Private::Token(t),
            None if listen.ip().is_loopback() && status_listen.is_none() => Private::Open,
            None => Private::Elsewhere,
        };
        let status = match (&public_private, status_listen) {
            (_, Some(s)) => Some(s),
            (Private::Elsewhere, None) => Some(SocketAddr::from((
                std::net::Ipv4Addr::LOCALHOST,
                DEFAULT_STATUS_PORT,
            ))),
            _ => None,
        };
        Self {
            public: listen,
            public_private,
            status,
        }
    }
}

async fn not_here() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        "/status and / are not served on this address: they are on the status listener \
         (--status-listen, loopback by default), or here with --status-token-file\n",
    )
}

/// Constant-time comparison: the time a wrong token takes must not tell how much of it was right.
fn same_token(given: &[u8], want: &[u8]) -> bool {
    given.len() == want.len()
        && given
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn require_token(
    State(token): State<Arc<String>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if same_token(g.as_bytes(), token.as_bytes()) => next.run(req).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "/status and / need Authorization: Bearer <the token of --status-token-file>\n",
        )
            .into_response(),
    }
}

pub fn router(shared: Shared, private: &Private) -> Router {
    let public = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz));
    let private_routes = || {
        Router::new()
            .route("/", get(index))
            .route("/status", get(status))
    };
    let routes = match private {
        Private::Open => public.merge(private_routes()),
        Private::Token(t) => public.merge(private_routes().layer(
            axum::middleware::from_fn_with_state(Arc::new(t.clone()), require_token),
        )),
        Private::Elsewhere => public
            .route("/", get(not_here))
            .route("/status", get(not_here)),
    };
    routes.with_state(shared)
}

/// Binds first (so a bad address fails start-up with a clear error), then serves in the background.
async fn serve_one(addr: SocketAddr, app: Router) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("HTTP server on {local} stopped: {e}");
        }
    });
    Ok(local)
}

/// The addresses actually bound (port 0 resolved), for the start-up line.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub public: SocketAddr,
    pub status: Option<SocketAddr>,
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(
                f,
                "/metrics and /healthz on http://{}/metrics; live page and /status on http://{s}/",
                self.public
            ),
            None => write!(
                f,
                "live page on http://{}/ (and /metrics, /status, /healthz)",
                self.public
            ),
        }
    }
}

pub async fn serve(plan: &Listeners, shared: Shared) -> anyhow::Result<Bound> {
    let public = serve_one(plan.public, router(shared.clone(), &plan.public_private)).await?;
    let status = match plan.status {
        Some(addr) => Some(serve_one(addr, router(shared, &Private::Open)).await?),
        None => None,
    };
    Ok(Bound { public, status })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn status_stays_on_loopback_unless_opted_in() {
        let lo = Listeners::plan(addr("127.0.0.1:9477"), None, None);
        assert_eq!((lo.public_private, lo.status), (Private::Open, None));
        let pod = Listeners::plan(addr("0.0.0.0:9477"), None, None);
        assert_eq!(pod.public_private, Private::Elsewhere);
        assert_eq!(pod.status, Some(addr("127.0.0.1:9478")));
        let chosen = Listeners::plan(addr("0.0.0.0:9477"), Some(addr("127.0.0.1:7000")), None);
        assert_eq!(chosen.status, Some(addr("127.0.0.1:7000")));
        let token = Listeners::plan(addr("0.0.0.0:9477"), None, Some("t".into()));
        assert_eq!(
            (token.public_private, token.status),
            (Private::Token("t".into()), None)
        );
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"secret", b"secret"));
        assert!(!same_token(b"secre", b"secret"));
        assert!(!same_token(b"secreT", b"secret"));
        assert!(!same_token(b"", b"secret"));
    }
}
