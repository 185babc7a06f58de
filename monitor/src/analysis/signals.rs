//! The per-incarnation series the rules read, derived from snapshots. Everything here is reset when the
//! target restarts.
use std::collections::{BTreeMap, HashMap};

use monitor_ebpf::tcp_state::{CLOSE_WAIT, ESTABLISHED};

use super::{Side, series::Series};
use crate::sample::{ScrapeOutcome, Snapshot};

#[derive(Debug, Default)]
pub struct Signals {
    /// Connections the app believes live (remotedialer add - remove), summed over clientkeys.
    pub app_live: Series,
    pub app_live_by_key: BTreeMap<String, f64>,
    /// Per (clientkey, addr): live connections, for naming the subject of a leak.
    pub app_live_by_row: BTreeMap<String, Series>,
    /// Kernel connections that back tunneled ones (callers on a server, targets on an agent).
    pub kernel_conn: Series,
    /// App-live connections with no kernel socket behind them.
    pub unbacked: Series,
    /// Sockets still ESTABLISHED: what legitimately justifies tasks.
    pub established: Series,
    pub close_wait: Series,
    /// The latest CLOSE_WAIT sockets per peer (from the kernel side's socket table).
    pub close_wait_peers: Vec<(String, u64)>,
    pub fds: Series,
    pub fd_limit: Option<f64>,
    pub tasks: Series,
    pub tasks_source: &'static str,
    pub heap: Series,
    /// Cumulative connections opened (reset-safe), for load detection.
    pub opened: Series,
    opened_total: f64,
    last_raw: HashMap<String, f64>,
    /// Kernel connections seen while the app had none live: sockets that are not tunneled connections
    /// (the agent's websocket, scrapes). Subtracted before comparing.
    kernel_offset: Option<f64>,
    pub remotedialer_present: bool,
}

impl Signals {
    pub fn clear(&mut self) {
        *self = Signals::default();
    }

    pub fn update(&mut self, s: &Snapshot, side: Side, horizon: f64) {
        let t = s.t;
        let app = match &s.app {
            ScrapeOutcome::Ok(a) => Some(a),
            _ => None,
        };
        let mut app_live = None;
        if let Some(a) = app.filter(|a| a.remotedialer_present) {
            self.remotedialer_present = true;
            let mut by_key: BTreeMap<String, f64> = BTreeMap::new();
            let mut total = 0.0;
            let mut raw_added = 0.0;
            for row in &a.ledger {
                let live = (row.added - row.removed).max(0.0);
                *by_key.entry(row.clientkey.clone()).or_default() += live;
                total += live;
                self.app_live_by_row
                    .entry(format!(
                        "clientkey={} proto={} addr={}",
                        row.clientkey, row.proto, row.addr
                    ))
                    .or_default()
                    .push(t, live, horizon);
                // Reset-safe increase per row, the way Prometheus' increase() treats a counter reset.
                let key = format!("{}\u{0}{}\u{0}{}", row.clientkey, row.proto, row.addr);
                let last = self.last_raw.insert(key, row.added).unwrap_or(row.added);
                raw_added += if row.added >= last {
                    row.added - last
                } else {
                    row.added
                };
            }
            self.opened_total += raw_added;
            self.app_live_by_key = by_key;
            self.app_live.push(t, total, horizon);
            app_live = Some(total);
        }
        if let Some(k) = &s.kernel {
            let conn = match side {
                Side::Server => k.accepted_live,
                Side::Agent => k.connected_live,
                Side::Auto => k.accepted_live.max(k.connected_live),
            } as f64;
            self.kernel_conn.push(t, conn, horizon);
            self.established
                .push(t, k.in_state(ESTABLISHED) as f64, horizon);
            self.close_wait
                .push(t, k.in_state(CLOSE_WAIT) as f64, horizon);
            self.close_wait_peers.clone_from(&k.close_wait_peers);
            if !self.remotedialer_present {
                // No ledger: the kernel's count of sockets opened is the activity signal.
                self.opened_total = k.counters.sock_tracked as f64;
            }
            if let Some(live) = app_live {
                if live == 0.0 {
                    self.kernel_offset = Some(conn);
                }
                let offset = self.kernel_offset.unwrap_or(0.0);
                self.unbacked
                    .push(t, live - (conn - offset).max(0.0), horizon);
            }
        } else if let Some(p) = &s.proc {
            self.established
                .push(t, p.tcp_in_state(ESTABLISHED) as f64, horizon);
            self.close_wait
                .push(t, p.tcp_in_state(CLOSE_WAIT) as f64, horizon);
        }
        if app.is_some() || s.kernel.is_some() {
            self.opened.push(t, self.opened_total, horizon);
        }
        if let Some(p) = &s.proc {
            self.fds.push(t, p.open_fds as f64, horizon);
            self.fd_limit = p.fd_limit.map(|l| l as f64);
        }
        // One source per series: the app's goroutines/tasks when it reports them, else the thread count.
        // A scrape gap is a gap, not a switch of source.
        match (app.and_then(|a| a.goroutines), &s.proc) {
            (Some(g), _) => {
                if self.tasks_source != "app.goroutines" {
                    self.tasks.clear();
                }
                self.tasks.push(t, g, horizon);
                self.tasks_source = "app.goroutines";
            }
            (None, Some(p)) if self.tasks_source != "app.goroutines" => {
                self.tasks.push(t, p.threads as f64, horizon);
                self.tasks_source = "procfs.threads";
            }
            _ => {}
        }
        if let Some(h) = app.and_then(|a| a.heap_inuse_bytes) {
            self.heap.push(t, h, horizon);
        }
    }

    /// Growth of a series over the window: median of its last few seconds minus median of its first few.
    pub fn growth(series: &Series, now: f64, window: f64) -> Option<f64> {
        let start = now - window;
        let edge = (window / 6.0).max(2.0);
        let first_t = series.since(start).first()?.0;
        let head = series.median_between(first_t, first_t + edge)?;
        let tail = series.median_between(now - edge, now)?;
        Some(tail - head)
    }

    /// Connections opened per second over the last `secs`.
    pub fn open_rate(&self, now: f64, secs: f64) -> Option<f64> {
        let pts = self.opened.since(now - secs);
        let (first, last) = (pts.first()?, pts.last()?);
        (last.0 - first.0 > 0.5).then(|| (last.1 - first.1) / (last.0 - first.0))
    }
}
