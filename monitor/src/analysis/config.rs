//! Analysis thresholds. Defaults are tuned on the reference tunnel (see the scenario suite): a full leak
//! at 20 requests/s is caught in about 15 s, a 1-in-100 leak at 40 requests/s within a minute, and bursts
//! of hundreds of requests with nothing leaking raise nothing.
use serde::Deserialize;

/// Which side of the tunnel the target is, i.e. which kernel sockets back its tunneled connections.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The tunnel server: each tunneled connection serves a caller whose socket it accepted.
    Server,
    /// The agent: each tunneled connection is a socket it connected to a target.
    Agent,
    /// Whichever of accepted or connected sockets is larger.
    #[default]
    Auto,
}

/// One end of the tunnel.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum End {
    Server,
    Agent,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Server => "server",
            End::Agent => "agent",
        }
    }
}

/// The end whose sockets back tunneled connections at the last kernel sample, and whether `--side auto`
/// chose it. Shown as `server` or `server (auto)` (logs, /status); never parsed back.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SideInEffect {
    pub end: End,
    pub auto: bool,
}

impl std::fmt::Display for SideInEffect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.end.as_str())?;
        if self.auto {
            f.write_str(" (auto)")?;
        }
        Ok(())
    }
}

impl serde::Serialize for SideInEffect {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalysisConfig {
    pub side: Side,
    /// Window over which trends are measured, seconds.
    pub window_s: f64,
    /// Data needed in the window before trend rules speak, seconds.
    pub min_span_s: f64,
    /// Bookkeeping: growth of the connections the app believes live that neither its tasks nor its
    /// sockets grew with (a ledger that is not decremented), tolerated over the window.
    pub unbacked_abs_tolerance: f64,
    /// ... plus this fraction of the app's live connections.
    pub unbacked_rel_tolerance: f64,
    /// How long the divergence must last before it is a verdict, seconds.
    pub unbacked_min_s: f64,
    /// The longest idle timeout a healthy HTTP transport of the target may use, seconds. Go's
    /// `http.DefaultTransport` closes an idle pooled connection after 90 s, so a healthy Rancher holds
    /// idle tunneled connections with no caller for up to that long after a burst (v2.10.5). A tunneled
    /// connection opened longer ago than this (plus `idle_margin_s`) that is still open, and that no
    /// caller explains, has outlived every plausible pool: that is the v2.10.3 leak.
    pub idle_timeout_s: f64,
    /// Slack on top of `idle_timeout_s` for timers, scrape intervals and clock skew, seconds.
    pub idle_margin_s: f64,
    /// Old connections one row (ledger clientkey/proto/addr on a server, target on an agent) may add
    /// beyond its fill before the idle rule speaks. Judged per row: a process-wide sum lets unrelated
    /// sockets hide a leak on one cluster and adds bounded pools of many rows up to a "leak".
    pub idle_tolerance: f64,
    /// How long after a row's old connections first rise they may still be filling, seconds: what a
    /// burst opened together ages past the horizon together, so a pool or a set of watches steps up
    /// within this and then stops; a leak goes on climbing after it.
    pub idle_fill_s: f64,
    /// How long the idle-connection excess must last before it is a verdict, seconds.
    pub idle_min_s: f64,
    /// A request the target dialed and never got one byte of answer to, for this long, is stalled, seconds.
    /// Watches and long polls get their response headers at once, but a big LIST or a slow aggregated API
    /// may take 45 s to send its first byte: a target that answers is slow, not leaking, so the default
    /// leaves it a minute. Only a hung target, or a connection whose caller left while the tunnel kept it,
    /// waits that long in silence. Rounded up to the next idle-age bucket bound (10 s, 30 s, 60 s, 90 s, ...).
    pub unanswered_after_s: f64,
    /// Stalled requests tolerated before the unanswered rule speaks.
    pub unanswered_tolerance: f64,
    /// How long they must stay over the tolerance before it is a verdict, seconds.
    pub unanswered_min_s: f64,
    /// CLOSE_WAIT sockets tolerated (peers closed, the process has not yet).
    pub close_wait_tolerance: f64,
    pub close_wait_min_s: f64,
    /// Not draining: the lowest CLOSE_WAIT count over this many last seconds is still over the tolerance.
    pub close_wait_floor_s: f64,
    /// A finding this many times over its tolerance is critical (bookkeeping, idle connections and
    /// sockets, unanswered requests).
    pub critical_factor: f64,
    /// ... and for task growth, this many times `task_min_growth` unexplained.
    pub task_critical_factor: f64,
    /// A sock_diag reading (idle ages, unanswered requests) older than this speaks for nothing now,
    /// seconds. It comes with the full procfs pass, every 5-15 s; this allows a few missed passes.
    pub sockdiag_stale_s: f64,
    /// Socket fds: growth over the window (median of its last seconds minus its first) and slope (per s).
    pub fd_min_growth: f64,
    pub fd_min_slope: f64,
    /// Tasks (goroutines, tokio tasks or threads): growth over the window and slope (per s).
    pub task_min_growth: f64,
    pub task_min_slope: f64,
    /// ... or this fraction of the task level, where that is more: a process of thousands of goroutines
    /// (controllers, informers) moves by more than `task_min_growth` on its own.
    pub task_rel_growth: f64,
    /// The longest a target's start-up may take, seconds. While younger than this and before its task
    /// level first settles (grows by less than half of `task_min_growth` over a window), growth of its
    /// tasks and fds that connections do not account for is the start-up (controllers, caches, agents
    /// joining), not a leak, and the recipe takes no baseline. A leak that begins later, or a level that
    /// never settles, is judged as usual.
    pub startup_s: f64,
    /// Tasks allowed per extra live connection before task growth is unexplained by load.
    pub tasks_per_connection: f64,
    /// Heap growth over the window that, with task growth or a bookkeeping leak, is worth a verdict.
    pub heap_min_growth_bytes: f64,
    pub heap_min_growth_ratio: f64,
    /// Heap a live connection may hold (buffers, its goroutines' state): heap growth up to this much per
    /// connection opened meanwhile is the connections', not a heap leak's.
    pub heap_bytes_per_connection: f64,
    /// Quiescence: a connection add rate above this (per s) is load; below it for `quiet_s`, load ended.
    pub burst_rate: f64,
    pub quiet_s: f64,
    /// After load ends, how long levels may take to return to the pre-load baseline, seconds. Never
    /// shorter than the idle horizon: pooled connections legitimately outlive the load by that much.
    pub settle_s: f64,
    pub settle_tasks_tolerance: f64,
    pub settle_fds_tolerance: f64,
    pub settle_heap_tolerance_ratio: f64,
    /// ... and tasks and fds may stay up by this fraction of their baseline, where that is more than
    /// the absolute tolerances: a process of thousands of goroutines moves by more than a handful.
    pub settle_rel_tolerance: f64,
    /// Fd exhaustion forecast thresholds, seconds until the limit.
    pub fd_forecast_warning_s: f64,
    pub fd_forecast_critical_s: f64,
    /// Ticks a condition must be absent before its verdict clears (no flapping on one quiet sample).
    pub clear_after_ticks: u32,
    /// ... and seconds: at a fast tick, a few ticks are no hysteresis at all.
    pub clear_after_s: f64,
}

impl AnalysisConfig {
    /// How old an open tunneled connection must be before no healthy pool explains it, seconds.
    pub fn idle_horizon_s(&self) -> f64 {
        self.idle_timeout_s + self.idle_margin_s
    }

    /// `unanswered_after_s` in ms, as the kernel's ages are counted.
    pub fn unanswered_after_ms(&self) -> u32 {
        (self.unanswered_after_s * 1000.0).clamp(0.0, f64::from(u32::MAX)) as u32
    }

    /// The settle time the quiescence recipe really waits: pooled connections may stay idle for up to
    /// the idle horizon after the load ends, and so may the tasks and heap they hold.
    pub fn effective_settle_s(&self) -> f64 {
        self.settle_s.max(self.idle_horizon_s())
    }
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        Self {
            side: Side::Auto,
            window_s: 30.0,
            min_span_s: 12.0,
            unbacked_abs_tolerance: 5.0,
            unbacked_rel_tolerance: 0.1,
            unbacked_min_s: 8.0,
            idle_timeout_s: 90.0,
            idle_margin_s: 15.0,
            idle_tolerance: 5.0,
            idle_fill_s: 10.0,
            idle_min_s: 10.0,
            unanswered_after_s: 60.0,
            unanswered_tolerance: 10.0,
            unanswered_min_s: 10.0,
            close_wait_tolerance: 3.0,
            close_wait_min_s: 8.0,
            close_wait_floor_s: 8.0,
            critical_factor: 4.0,
            task_critical_factor: 5.0,
            sockdiag_stale_s: 60.0,
            fd_min_growth: 20.0,
            fd_min_slope: 0.5,
            task_min_growth: 20.0,
            task_min_slope: 0.5,
            task_rel_growth: 0.01,
            startup_s: 180.0,
            tasks_per_connection: 4.0,
            heap_min_growth_bytes: 4.0 * 1048576.0,
            heap_min_growth_ratio: 0.2,
            heap_bytes_per_connection: 64.0 * 1024.0,
            burst_rate: 1.0,
            quiet_s: 5.0,
            settle_s: 60.0,
            settle_tasks_tolerance: 5.0,
            settle_fds_tolerance: 5.0,
            settle_heap_tolerance_ratio: 0.25,
            settle_rel_tolerance: 0.05,
            fd_forecast_warning_s: 3600.0,
            fd_forecast_critical_s: 600.0,
            clear_after_ticks: 3,
            clear_after_s: 15.0,
        }
    }
}
