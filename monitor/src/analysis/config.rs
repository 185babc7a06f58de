//! Analysis thresholds. Defaults are tuned on the reference tunnel (see the scenario suite): a full leak
//! at 20 requests/s is caught in about 15 s, a 1-in-100 leak at 40 requests/s within a minute, and bursts
//! of hundreds of requests with nothing leaking raise nothing.
use serde::Deserialize;

/// Which side of the tunnel the target is, i.e. which kernel sockets back its tunneled connections.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Deserialize)]
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

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalysisConfig {
    pub side: Side,
    /// Window over which trends are measured, seconds.
    pub window_s: f64,
    /// Data needed in the window before trend rules speak, seconds.
    pub min_span_s: f64,
    /// Bookkeeping: connections the app believes live with no kernel socket behind them, tolerated.
    pub unbacked_abs_tolerance: f64,
    /// ... plus this fraction of the kernel's live connections.
    pub unbacked_rel_tolerance: f64,
    /// How long the divergence must last before it is a verdict, seconds.
    pub unbacked_min_s: f64,
    /// CLOSE_WAIT sockets tolerated (peers closed, the process has not yet).
    pub close_wait_tolerance: f64,
    pub close_wait_min_s: f64,
    /// Socket fds: growth over the window (median of its last seconds minus its first) and slope (per s).
    pub fd_min_growth: f64,
    pub fd_min_slope: f64,
    /// Tasks (goroutines, tokio tasks or threads): growth over the window and slope (per s).
    pub task_min_growth: f64,
    pub task_min_slope: f64,
    /// Tasks allowed per extra live connection before task growth is unexplained by load.
    pub tasks_per_connection: f64,
    /// Heap growth over the window that, with task growth or a bookkeeping leak, is worth a verdict.
    pub heap_min_growth_bytes: f64,
    pub heap_min_growth_ratio: f64,
    /// Quiescence: a connection add rate above this (per s) is load; below it for `quiet_s`, load ended.
    pub burst_rate: f64,
    pub quiet_s: f64,
    /// After load ends, how long levels may take to return to the pre-load baseline, seconds.
    pub settle_s: f64,
    pub settle_tasks_tolerance: f64,
    pub settle_fds_tolerance: f64,
    pub settle_heap_tolerance_ratio: f64,
    /// Fd exhaustion forecast thresholds, seconds until the limit.
    pub fd_forecast_warning_s: f64,
    pub fd_forecast_critical_s: f64,
    /// Ticks a condition must be absent before its verdict clears (no flapping on one quiet sample).
    pub clear_after_ticks: u32,
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
            close_wait_tolerance: 3.0,
            close_wait_min_s: 8.0,
            fd_min_growth: 20.0,
            fd_min_slope: 0.5,
            task_min_growth: 20.0,
            task_min_slope: 0.5,
            tasks_per_connection: 4.0,
            heap_min_growth_bytes: 4.0 * 1048576.0,
            heap_min_growth_ratio: 0.2,
            burst_rate: 1.0,
            quiet_s: 5.0,
            settle_s: 60.0,
            settle_tasks_tolerance: 5.0,
            settle_fds_tolerance: 5.0,
            settle_heap_tolerance_ratio: 0.25,
            fd_forecast_warning_s: 3600.0,
            fd_forecast_critical_s: 600.0,
            clear_after_ticks: 3,
        }
    }
}
