//! Prometheus exposition: remotedialer's `session_server_*` counters (only when enabled, as
//! remotedialer registers them only with `CATTLE_PROMETHEUS_METRICS=true`), plus always-present
//! runtime gauges (see [`crate::runtime_stats`]) and reftunnel's own diagnostics.

use prometheus::{
    CounterVec, Encoder, Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::{runtime_stats, tasks};

/// The ten counters of remotedialer's `metrics/session_manager.go`, with its names, help texts
/// and labels: seven per session, three per peer.
struct SessionCounters {
    add_ws: CounterVec,
    remove_ws: CounterVec,
    add_conn: CounterVec,
    remove_conn: CounterVec,
    transmit: CounterVec,
    transmit_error: CounterVec,
    receive: CounterVec,
    peer_attempt: CounterVec,
    peer_connected: CounterVec,
    /// Registered as in Go, where nothing ever increments it: it never has a series.
    peer_disconnected: CounterVec,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<CounterVec> {
    CounterVec::new(Opts::new(name, help).subsystem("session_server"), labels)
}

impl SessionCounters {
    fn new() -> prometheus::Result<Self> {
        Ok(Self {
            add_ws: counter(
                "total_add_websocket_session",
                "Total count of added websocket sessions",
                &["clientkey", "peer"],
            )?,
            remove_ws: counter(
                "total_remove_websocket_session",
                "Total count of removed websocket sessions",
                &["clientkey", "peer"],
            )?,
            add_conn: counter(
                "total_add_connections",
                "Total count of added connections",
                &["clientkey", "proto", "addr"],
            )?,
            remove_conn: counter(
                "total_remove_connections",
                "Total count of removed connections",
                &["clientkey", "proto", "addr"],
            )?,
            transmit: counter(
                "total_transmit_bytes",
                "Total bytes transmitted",
                &["clientkey"],
            )?,
            transmit_error: counter(
                "total_transmit_error_bytes",
                "Total error bytes transmitted",
                &["clientkey"],
            )?,
            receive: counter(
                "total_receive_bytes",
                "Total bytes received",
                &["clientkey"],
            )?,
            peer_attempt: counter(
                "total_peer_ws_attempt",
                "Total count of attempts to establish websocket session to other rancher-server",
                &["peer"],
            )?,
            peer_connected: counter(
                "total_peer_ws_connected",
                "Total count of connected websocket sessions to other rancher-server",
                &["peer"],
            )?,
            peer_disconnected: counter(
                "total_peer_ws_disconnected",
                "Total count of disconnected websocket sessions from other rancher-server",
                &["peer"],
            )?,
        })
    }

    fn register(&self, r: &Registry) -> prometheus::Result<()> {
        for c in [
            &self.add_ws,
            &self.remove_ws,
            &self.add_conn,
            &self.remove_conn,
            &self.transmit,
            &self.transmit_error,
            &self.receive,
            &self.peer_attempt,
            &self.peer_connected,
            &self.peer_disconnected,
        ] {
            r.register(Box::new(c.clone()))?;
        }
        Ok(())
    }
}

/// Session-level accounting; every method is a no-op when remotedialer metrics are off.
pub struct TunnelMetrics {
    session: Option<SessionCounters>,
    leaks: IntCounterVec,
}

fn peer_label(peer: bool) -> &'static str {
    if peer { "true" } else { "false" }
}

impl TunnelMetrics {
    pub fn add_ws(&self, clientkey: &str, peer: bool) {
        if let Some(c) = &self.session {
            c.add_ws
                .with_label_values(&[clientkey, peer_label(peer)])
                .inc();
        }
    }
    pub fn remove_ws(&self, clientkey: &str, peer: bool) {
        if let Some(c) = &self.session {
            c.remove_ws
                .with_label_values(&[clientkey, peer_label(peer)])
                .inc();
        }
    }
    pub fn add_conn(&self, clientkey: &str, proto: &str, addr: &str) {
        if let Some(c) = &self.session {
            c.add_conn
                .with_label_values(&[clientkey, proto, addr])
                .inc();
        }
    }
    pub fn remove_conn(&self, clientkey: &str, proto: &str, addr: &str) {
        if let Some(c) = &self.session {
            c.remove_conn
                .with_label_values(&[clientkey, proto, addr])
                .inc();
        }
    }
    pub fn transmit(&self, clientkey: &str, n: usize) {
        if let Some(c) = &self.session {
            c.transmit.with_label_values(&[clientkey]).inc_by(n as f64);
        }
    }
    pub fn transmit_error(&self, clientkey: &str, n: usize) {
        if let Some(c) = &self.session {
            c.transmit_error
                .with_label_values(&[clientkey])
                .inc_by(n as f64);
        }
    }
    pub fn receive(&self, clientkey: &str, n: usize) {
        if let Some(c) = &self.session {
            c.receive.with_label_values(&[clientkey]).inc_by(n as f64);
        }
    }
    /// A dial of a peer's websocket is about to start (`IncSMTotalAddPeerAttempt`).
    pub fn peer_attempt(&self, peer: &str) {
        if let Some(c) = &self.session {
            c.peer_attempt.with_label_values(&[peer]).inc();
        }
    }
    /// A peer's websocket was dialed successfully (`IncSMTotalPeerConnected`).
    pub fn peer_connected(&self, peer: &str) {
        if let Some(c) = &self.session {
            c.peer_connected.with_label_values(&[peer]).inc();
        }
    }
    /// Counts a leak that actually happened (not merely one that was scheduled).
    pub fn leak(&self, mode: &str) {
        self.leaks.with_label_values(&[mode]).inc();
    }
}

struct RuntimeGauges {
    alive_tasks: IntGauge,
    goroutines: IntGauge,
    heap: Gauge,
    heap_go: Gauge,
    threads: IntGauge,
    open_fds: IntGauge,
    max_fds: IntGauge,
    rss: IntGauge,
    tasks_by_kind: IntGaugeVec,
    held_sockets: IntGauge,
}

/// Everything one process exports on `/metrics`.
pub struct MetricsHub {
    registry: Registry,
    pub tunnel: TunnelMetrics,
    rt: RuntimeGauges,
    /// Live tunneled connections in session maps (server) — set by the owner before rendering.
    pub live_connections: IntGauge,
    pub live_sessions: IntGauge,
    /// Unrelated series appended to every page, written once (see [`Self::with_extra_series`]).
    extra: String,
}

/// Series per extra family: a big Rancher's /metrics of 50,000 series has about a hundred families.
const EXTRA_FAMILY_SERIES: usize = 500;

/// `n` series that are none of the tunnel's business, as a big exporter has beside it: histogram
/// buckets of made-up families `reftunnel_extra_<f>_seconds`, about 70 bytes a line.
fn extra_series(n: usize) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(n * 72);
    for f in 0..n.div_ceil(EXTRA_FAMILY_SERIES) {
        let _ = write!(
            s,
            "# HELP reftunnel_extra_{f}_seconds Unrelated series for measuring scrapers (--extra-series).\n# TYPE reftunnel_extra_{f}_seconds histogram\n"
        );
        for i in 0..EXTRA_FAMILY_SERIES.min(n - f * EXTRA_FAMILY_SERIES) {
            let _ = writeln!(
                s,
                "reftunnel_extra_{f}_seconds_bucket{{resource=\"r{}\",verb=\"GET\",le=\"{i}\"}} {}",
                i % 37,
                i * 3
            );
        }
    }
    s
}

impl MetricsHub {
    pub fn new(remotedialer_metrics: bool) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let session = if remotedialer_metrics {
            let c = SessionCounters::new()?;
            c.register(&registry)?;
            Some(c)
        } else {
            None
        };
        let leaks = IntCounterVec::new(
            Opts::new(
                "reftunnel_leaks_injected_total",
                "Connections that took a deliberate leak path (--leak), by mode",
            ),
            &["mode"],
        )?;
        let int = |name: &str, help: &str| IntGauge::new(name, help);
        let rt = RuntimeGauges {
            alive_tasks: int(
                "reftunnel_tokio_alive_tasks",
                "Alive tokio tasks (RuntimeMetrics::num_alive_tasks)",
            )?,
            goroutines: int(
                "go_goroutines",
                "Alias of reftunnel_tokio_alive_tasks: the Rust analogue of Go's goroutine count",
            )?,
            heap: Gauge::new(
                "reftunnel_heap_allocated_bytes",
                "Bytes allocated by the application (jemalloc stats.allocated)",
            )?,
            heap_go: Gauge::new(
                "go_memstats_heap_inuse_bytes",
                "Alias of reftunnel_heap_allocated_bytes (jemalloc stats.allocated), the analogue of Go's heap in use",
            )?,
            threads: int(
                "go_threads",
                "OS threads of the process (/proc/self/status)",
            )?,
            open_fds: int("process_open_fds", "Number of open file descriptors.")?,
            max_fds: int(
                "process_max_fds",
                "Maximum number of open file descriptors.",
            )?,
            rss: int(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            )?,
            tasks_by_kind: IntGaugeVec::new(
                Opts::new(
                    "reftunnel_tasks",
                    "Live tasks by the code path that spawned them (see /debug/tasks)",
                ),
                &["kind"],
            )?,
            held_sockets: int(
                "reftunnel_leaked_sockets",
                "Backend sockets held open by the no-close leak mode",
            )?,
        };
        let live_connections = int(
            "reftunnel_session_connections",
            "Tunneled connections currently in session maps",
        )?;
        let live_sessions = int("reftunnel_sessions", "Websocket sessions currently up")?;
        registry.register(Box::new(leaks.clone()))?;
        for g in [
            &rt.alive_tasks,
            &rt.goroutines,
            &rt.threads,
            &rt.open_fds,
            &rt.max_fds,
            &rt.rss,
            &rt.held_sockets,
            &live_connections,
            &live_sessions,
        ] {
            registry.register(Box::new(g.clone()))?;
        }
        registry.register(Box::new(rt.heap.clone()))?;
        registry.register(Box::new(rt.heap_go.clone()))?;
        registry.register(Box::new(rt.tasks_by_kind.clone()))?;
        Ok(Self {
            registry,
            tunnel: TunnelMetrics { session, leaks },
            rt,
            live_connections,
            live_sessions,
            extra: String::new(),
        })
    }

    /// Appends `n` unrelated series to every page (`server --extra-series`); the tunnel's own series
    /// are unchanged.
    pub fn with_extra_series(mut self, n: usize) -> Self {
        self.extra = extra_series(n);
        self
    }

    /// Refreshes the sampled gauges and renders the Prometheus text format.
    pub fn render(&self) -> String {
        let st = runtime_stats::collect();
        let set = |g: &IntGauge, v: Option<u64>| {
            if let Some(v) = v {
                g.set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        };
        set(&self.rt.alive_tasks, st.alive_tasks.map(|v| v as u64));
        set(&self.rt.goroutines, st.alive_tasks.map(|v| v as u64));
        if let Some(h) = st.heap_allocated {
            self.rt.heap.set(h as f64);
            self.rt.heap_go.set(h as f64);
        }
        set(&self.rt.threads, st.threads);
        set(&self.rt.open_fds, st.open_fds);
        set(&self.rt.max_fds, st.max_fds);
        set(&self.rt.rss, st.rss_bytes);
        self.rt.held_sockets.set(crate::leak::held_sockets() as i64);
        for (kind, c) in tasks::snapshot() {
            self.rt.tasks_by_kind.with_label_values(&[kind]).set(c.live);
        }
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail short of a collector bug; an empty page is the fallback.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf.extend_from_slice(self.extra.as_bytes());
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// A listener that only serves `/metrics` and `/debug/tasks` (the agent's optional endpoint).
pub async fn serve_metrics(listener: tokio::net::TcpListener, hub: std::sync::Arc<MetricsHub>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let hub = hub.clone();
        tasks::spawn("metrics.conn", async move {
            let Ok((req, _)) = crate::http::read_request(&mut sock).await else {
                return;
            };
            let _ = match req.path.split('?').next().unwrap_or("") {
                "/metrics" => {
                    let body = hub.render();
                    crate::http::respond(
                        &mut sock,
                        200,
                        "text/plain; version=0.0.4",
                        body.as_bytes(),
                    )
                    .await
                }
                "/debug/tasks" => {
                    crate::http::respond(&mut sock, 200, "text/plain", tasks::render().as_bytes())
                        .await
                }
                "/debug/pprof/goroutine" => {
                    let query = req.path.split_once('?').map_or("", |(_, q)| q);
                    let dump = tasks::render_goroutine_endpoint(query);
                    crate::http::respond(&mut sock, 200, "text/plain", dump.as_bytes()).await
                }
                _ => crate::http::respond(&mut sock, 404, "text/plain", b"not found\n").await,
            };
        });
    }
}
