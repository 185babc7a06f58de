//! The live page (`/`), /metrics, /status and /healthz. Served on loopback by default: the status document names sockets and
//! peers of the watched process.
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

pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/healthz", get(healthz))
        .with_state(shared)
}

/// Binds first (so a bad address fails start-up with a clear error), then serves in the background.
pub async fn serve(addr: SocketAddr, shared: Shared) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(shared)).await {
            tracing::error!("HTTP server stopped: {e}");
        }
    });
    Ok(local)
}
