//! The per-incarnation series the rules read, derived from snapshots. Everything here is reset when the
//! target restarts.
use std::collections::{BTreeMap, HashMap};

use monitor_ebpf::tcp_state::{CLOSE_WAIT, ESTABLISHED};

use super::{
    AnalysisConfig, End, Side, SideInEffect,
    series::{Series, Steps},
};
use crate::{
    sample::{LedgerRow, OTHER_CLIENTKEY, ScrapeOutcome, Snapshot},
    verdict::Source,
};

/// One ledger row's counters made reset-safe (a counter reset adds its new value, the way Prometheus'
/// `increase()` reads it), with enough history of `added` to look one idle horizon back.
#[derive(Debug, Default)]
pub struct RowHistory {
    added: f64,
    removed: f64,
    raw_added: f64,
    raw_removed: f64,
    /// Cumulative reset-safe `added` over time.
    added_over_time: Steps,
    seen: bool,
    /// When this row was first seen in this incarnation.
    first_seen: f64,
    last_seen: f64,
    /// Connections of this row opened more than the idle horizon ago and still open (a lower bound),
    /// and the lowest that count has been: what was already there (a pool, a pre-existing leak).
    pub old_open: Option<f64>,
    pub old_open_floor: Option<f64>,
}

fn reset_safe_increase(last_raw: f64, raw: f64) -> f64 {
    if raw >= last_raw { raw - last_raw } else { raw }
}

impl RowHistory {
    fn observe(&mut self, t: f64, row: &LedgerRow, keep: f64) -> f64 {
        let first = !self.seen;
        let increase = if first {
            self.seen = true;
            self.first_seen = t;
            row.added
        } else {
            reset_safe_increase(self.raw_added, row.added)
        };
        self.added += increase;
        self.removed += if first {
            row.removed
        } else {
            reset_safe_increase(self.raw_removed, row.removed)
        };
        self.raw_added = row.added;
        self.raw_removed = row.removed;
        self.last_seen = t;
        self.added_over_time.push(t, self.added, keep);
        increase
    }

    /// Lower bound of the connections opened before `t - horizon` that are still open at `t`: every
    /// removal since could have been of one of them, and none of the newer ones. `None` until the
    /// watch reaches back that far.
    fn old_open_at(&self, t: f64, horizon: f64, watching_since: f64) -> Option<f64> {
        let then = t - horizon;
        if then < watching_since {
            return None;
        }
        // A row first seen after `then` had no connections then: it did not exist in the ledger.
        let added_then = if self.first_seen > then {
            0.0
        } else {
            self.added_over_time.value_at(then)?
        };
        Some((added_then - self.removed).max(0.0))
    }
}

/// How much longer than one idle horizon a row's history of `added` is kept: the look-back lands on a
/// sample even when ticks are late or a scrape or two failed.
const ROW_HISTORY_SLACK_S: f64 = 60.0;

/// The idle-horizon cross-check at one instant; see [`Signals::idle_excess`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IdleExcess {
    pub old_open: f64,
    pub above_floor: f64,
    pub callers_explained: f64,
    pub excess: f64,
}

/// The client key under which a remotedialer server counts the connections a peer server dials through
/// it (Rancher HA: a request that reached another replica for an agent whose websocket this one holds).
pub const PEER_CLIENTKEY: &str = "client";

/// The ledger as this server's own callers see it. A connection a peer dialed through this server is
/// counted twice here: once as `{clientkey="client", proto="<key>::<proto>"}` (the peer's end) and once as
/// an ordinary `{clientkey="<key>", proto="<proto>"}` dial to the agent. Its caller is on the peer, which
/// judges it; here both rows would only look like connections with no caller. So the peer rows are left
/// out and their counts taken off the matching ordinary rows. Returns the rows and the connections
/// peers hold through this server now.
pub fn local_rows(ledger: &[LedgerRow]) -> (std::borrow::Cow<'_, [LedgerRow]>, f64) {
    let is_peer = |r: &LedgerRow| r.clientkey == PEER_CLIENTKEY && r.proto.contains("::");
    if !ledger.iter().any(is_peer) {
        // No peer server dials through this one (no HA): the ledger as it is, not a copy of it.
        return (std::borrow::Cow::Borrowed(ledger), 0.0);
    }
    let mut rows: Vec<LedgerRow> = ledger.iter().filter(|r| !is_peer(r)).cloned().collect();
    // Found by their labels, not by a scan per peer row: an HA install has thousands of each.
    let index: HashMap<(&str, &str, &str), usize> = ledger
        .iter()
        .filter(|r| !is_peer(r))
        .enumerate()
        .map(|(i, r)| ((r.clientkey.as_str(), r.proto.as_str(), r.addr.as_str()), i))
        .collect();
    let mut peer_live = 0.0;
    for p in ledger.iter().filter(|r| is_peer(r)) {
        peer_live += (p.added - p.removed).max(0.0);
        let Some((key, proto)) = p.proto.split_once("::") else {
            continue;
        };
        if let Some(&i) = index.get(&(key, proto, p.addr.as_str())) {
            let local = &mut rows[i];
            local.added = (local.added - p.added).max(0.0);
            local.removed = (local.removed - p.removed).max(0.0);
        }
    }
    (std::borrow::Cow::Owned(rows), peer_live)
}

/// Where the task count comes from: one source per incarnation's series, the app's own count when it
/// reports one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TasksSource {
    #[default]
    ProcfsThreads,
    AppGoroutines,
}

impl TasksSource {
    /// The evidence name, as in `tasks_source` of every verdict's text.
    pub fn as_str(self) -> &'static str {
        match self {
            TasksSource::AppGoroutines => "app.goroutines",
            TasksSource::ProcfsThreads => "procfs.threads",
        }
    }

    pub fn source(self) -> Source {
        match self {
            TasksSource::AppGoroutines => Source::App,
            TasksSource::ProcfsThreads => Source::Procfs,
        }
    }
}

impl std::fmt::Display for TasksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The order of ledger rows (the scraper's): the rows' state is kept in it.
fn row_order(r: &LedgerRow) -> (&str, &str, &str) {
    (&r.clientkey, &r.proto, &r.addr)
}

/// What the analysis keeps of one ledger row from tick to tick.
#[derive(Debug)]
pub struct RowState {
    /// The row's clientkey, proto and addr in one allocation (one memory read per row and tick where
    /// three strings would be three), split by the two lengths.
    labels: String,
    lens: (usize, usize),
    /// `clientkey=.. proto=.. addr=..`, as verdicts name the row.
    pub key: String,
    pub history: RowHistory,
    /// Live connections (add - remove), for naming the subject of a leak.
    pub live: Series,
}

impl RowState {
    fn new(row: &LedgerRow, live: Series) -> Self {
        Self {
            labels: [row.clientkey.as_str(), &row.proto, &row.addr].concat(),
            lens: (row.clientkey.len(), row.proto.len()),
            key: format!(
                "clientkey={} proto={} addr={}",
                row.clientkey, row.proto, row.addr
            ),
            history: RowHistory::default(),
            live,
        }
    }

    fn order(&self) -> (&str, &str, &str) {
        let (ck, rest) = self.labels.split_at(self.lens.0);
        let (proto, addr) = rest.split_at(self.lens.1);
        (ck, proto, addr)
    }
}

#[derive(Debug, Default)]
pub struct Signals {
    /// Connections the app believes live (remotedialer add - remove), summed over clientkeys.
    pub app_live: Series,
    pub app_live_by_key: BTreeMap<String, f64>,
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
    pub tasks_source: TasksSource,
    pub heap: Series,
    /// Cumulative connections opened (reset-safe), for load detection.
    pub opened: Series,
    opened_total: f64,
    /// The ledger's rows (but `_other`) in the ledger's order, with rows gone from it for less than
    /// two idle horizons: for the idle-horizon check and for naming who holds the connections.
    pub rows: Vec<RowState>,
    /// Tunneled connections opened more than the idle horizon ago and still open, over all rows, and
    /// the lowest that total has been in this incarnation.
    pub old_open: Series,
    pub old_open_floor: Option<f64>,
    /// The lowest count of kernel connections (callers/targets) in this incarnation: sockets that were
    /// there before any load (agents' websockets, long-lived clients) explain nothing about new ones.
    pub kernel_conn_floor: Option<f64>,
    /// When the first snapshot of this incarnation was taken.
    watching_since: Option<f64>,
    /// Connections peer servers hold through this one (their callers are on the peers).
    pub peer_live: Series,
    /// The side whose sockets backed tunneled connections at the last kernel sample.
    pub side_in_effect: Option<SideInEffect>,
    /// Idle ages of the sockets the target dialed, per remote (kernel tcp_info, refreshed with each full
    /// procfs pass), and per remote the fewest sockets idle past the horizon seen in this incarnation.
    pub dialed_idle: Vec<crate::sample::RemoteIdle>,
    pub dialed_idle_horizon_s: f64,
    pub dialed_idle_floor: BTreeMap<String, u64>,
    /// Requests the target dialed that have waited longer than `unanswered_after_s` for the first byte
    /// of an answer, over every remote (refreshed with each full procfs pass).
    pub unanswered: Series,
    /// Kernel connections seen while the app had none live: sockets that are not tunneled connections
    /// (the agent's websocket, scrapes). Subtracted before comparing.
    kernel_offset: Option<f64>,
    pub remotedialer_present: bool,
    /// When each source last delivered a reading in this incarnation (see [`Signals::silent_for`]).
    last_heard: BTreeMap<Source, f64>,
}

impl Signals {
    pub fn clear(&mut self) {
        *self = Signals::default();
    }

    /// Seconds since `source` last delivered, or `None` if it never did in this incarnation (a source
    /// that never answered holds nothing either, but there is nothing to clear).
    pub fn silent_for(&self, source: Source, t: f64) -> Option<f64> {
        self.last_heard.get(&source).map(|at| t - at)
    }

    pub fn update(&mut self, s: &Snapshot, cfg: &AnalysisConfig, horizon: f64) {
        let t = s.t;
        let heard = [
            (Source::App, matches!(s.app, ScrapeOutcome::Ok(_))),
            (Source::Kernel, s.kernel.is_some()),
            (Source::Procfs, s.proc.is_some()),
            (
                Source::SockDiag,
                s.proc
                    .as_ref()
                    .is_some_and(|p| p.dialed_idle_horizon_s > 0.0),
            ),
        ];
        for (source, _) in heard.iter().filter(|(_, h)| *h) {
            self.last_heard.insert(*source, t);
        }
        let side = cfg.side;
        let idle_horizon = cfg.idle_horizon_s();
        // Series read one idle horizon back must be kept that long, plus a window to measure their trend.
        let long = horizon.max(idle_horizon + cfg.window_s);
        let watching_since = *self.watching_since.get_or_insert(t);
        let app = match &s.app {
            ScrapeOutcome::Ok(a) => Some(a),
            _ => None,
        };
        let mut app_live = None;
        if let Some(a) = app.filter(|a| a.remotedialer_present) {
            self.remotedialer_present = true;
            let mut total = 0.0;
            let mut raw_added = 0.0;
            let mut old_open_total = 0.0;
            let mut old_open_known = false;
            let (ledger, peer_live) = local_rows(&a.ledger);
            self.peer_live.push(t, peer_live, horizon);
            // Live connections per clientkey, the map of the last tick reused (thousands of clientkeys
            // a tick allocate nothing once known); the ledger is sorted by clientkey, so one look-up
            // per clientkey, not per row.
            let mut by_key = std::mem::take(&mut self.app_live_by_key);
            by_key.values_mut().for_each(|v| *v = -1.0);
            let flush = |by_key: &mut BTreeMap<String, f64>, run: Option<(&str, f64)>| {
                let Some((k, n)) = run else { return };
                match by_key.get_mut(k) {
                    Some(v) if *v < 0.0 => *v = n,
                    Some(v) => *v += n,
                    None => {
                        by_key.insert(k.to_string(), n);
                    }
                }
            };
            let mut run: Option<(&str, f64)> = None;
            for row in ledger.iter() {
                let live = (row.added - row.removed).max(0.0);
                total += live;
                match &mut run {
                    Some((k, n)) if *k == row.clientkey => *n += live,
                    _ => flush(&mut by_key, run.replace((&row.clientkey, live))),
                }
            }
            flush(&mut by_key, run);
            by_key.retain(|_, v| *v >= 0.0);
            // The rows summed past the scraper's cap change as the ledger grows: a row pushed into
            // `_other` brings all its old connections at once. Counted in the totals above, never
            // judged as a row (its "new" connections would read as opened now).
            let mut ledger: Vec<&LedgerRow> = ledger
                .iter()
                .filter(|r| r.clientkey != OTHER_CLIENTKEY)
                .collect();
            if !ledger.is_sorted_by(|a, b| row_order(a) <= row_order(b)) {
                ledger.sort_by(|a, b| row_order(a).cmp(&row_order(b)));
            }
            // The rows' state is kept in the ledger's order and joined with it in one pass: no
            // look-up per row (20,000 hash probes a tick cost more than everything else), and, while
            // the ledger has the same rows as at the last tick, no move either.
            let mut observe = |state: &mut RowState, row: &LedgerRow| {
                state
                    .live
                    .push(t, (row.added - row.removed).max(0.0), horizon);
                let history = &mut state.history;
                let increase = history.observe(t, row, idle_horizon + ROW_HISTORY_SLACK_S);
                // Rows already there when the watch began bring their history, not new connections.
                if history.first_seen < t || history.first_seen > watching_since {
                    raw_added += increase;
                }
                history.old_open = history.old_open_at(t, idle_horizon, watching_since);
                if let Some(old) = history.old_open {
                    history.old_open_floor =
                        Some(history.old_open_floor.map_or(old, |f: f64| f.min(old)));
                    old_open_total += old;
                    old_open_known = true;
                }
            };
            let same_rows = self.rows.len() == ledger.len()
                && self
                    .rows
                    .iter()
                    .zip(&ledger)
                    .all(|(o, r)| o.order() == row_order(r));
            if same_rows {
                for (state, row) in self.rows.iter_mut().zip(&ledger) {
                    observe(state, row);
                }
            } else {
                let mut old = std::mem::take(&mut self.rows).into_iter().peekable();
                let mut rows = Vec::with_capacity(ledger.len());
                let forget = |r: &RowState| t - r.history.last_seen > 2.0 * idle_horizon;
                for row in ledger {
                    while let Some(gone) = old.next_if(|o| o.order() < row_order(row)) {
                        // Rows gone from the ledger for two horizons are forgotten (bounded memory).
                        if !forget(&gone) {
                            rows.push(gone);
                        }
                    }
                    let mut state = match old.next_if(|o| o.order() == row_order(row)) {
                        Some(s) => s,
                        None => {
                            // A row that appears during the watch had no connections before: it gets
                            // the zeros the ledger's total had, or its growth would be measured from
                            // its first, already grown, value.
                            let mut zeros = Series::default();
                            for (at, _) in self.app_live.since(f64::NEG_INFINITY) {
                                zeros.push(at, 0.0, horizon);
                            }
                            RowState::new(row, zeros)
                        }
                    };
                    observe(&mut state, row);
                    rows.push(state);
                }
                rows.extend(old.filter(|o| !forget(o)));
                self.rows = rows;
            }
            if old_open_known {
                self.old_open.push(t, old_open_total, long);
                self.old_open_floor = Some(
                    self.old_open_floor
                        .map_or(old_open_total, |f| f.min(old_open_total)),
                );
            }
            self.opened_total += raw_added;
            self.app_live_by_key = by_key;
            self.app_live.push(t, total, horizon);
            app_live = Some(total);
        }
        if let Some(k) = &s.kernel {
            let end = match side {
                Side::Server => End::Server,
                Side::Agent => End::Agent,
                Side::Auto if k.accepted_live >= k.connected_live => End::Server,
                Side::Auto => End::Agent,
            };
            let conn = match end {
                End::Server => k.accepted_live,
                End::Agent => k.connected_live,
            } as f64;
            self.side_in_effect = Some(SideInEffect {
                end,
                auto: side == Side::Auto,
            });
            self.kernel_conn.push(t, conn, long);
            self.kernel_conn_floor = Some(self.kernel_conn_floor.map_or(conn, |f| f.min(conn)));
            self.established
                .push(t, k.in_state(ESTABLISHED) as f64, horizon);
            self.close_wait
                .push(t, k.in_state(CLOSE_WAIT) as f64, horizon);
            self.close_wait_peers.clone_from(&k.close_wait_peers);
            if !self.remotedialer_present {
                // No ledger: the kernel's count of connections opened is the activity signal.
                self.opened_total = k.opened as f64;
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
        if let Some(p) = s.proc.as_ref().filter(|p| p.dialed_idle_horizon_s > 0.0) {
            for g in &p.dialed_idle {
                let floor = self
                    .dialed_idle_floor
                    .entry(g.remote.clone())
                    .or_insert(g.idle_over_horizon);
                *floor = (*floor).min(g.idle_over_horizon);
            }
            self.dialed_idle.clone_from(&p.dialed_idle);
            self.dialed_idle_horizon_s = p.dialed_idle_horizon_s;
            let after_ms = cfg.unanswered_after_ms();
            let stalled: u64 = p
                .dialed_idle
                .iter()
                .map(|g| g.unanswered_for(after_ms))
                .sum();
            self.unanswered.push(t, stalled as f64, horizon);
        }
        if let Some(p) = &s.proc {
            self.fds.push(t, p.open_fds as f64, horizon);
            self.fd_limit = p.fd_limit.map(|l| l as f64);
        }
        // One source per series: the app's goroutines/tasks when it reports them, else the thread count.
        // A scrape gap is a gap, not a switch of source.
        match (app.and_then(|a| a.goroutines), &s.proc) {
            (Some(g), _) => {
                if self.tasks_source != TasksSource::AppGoroutines {
                    self.tasks.clear();
                }
                self.tasks.push(t, g, horizon);
                self.tasks_source = TasksSource::AppGoroutines;
            }
            (None, Some(p)) if self.tasks_source != TasksSource::AppGoroutines => {
                self.tasks.push(t, p.threads as f64, horizon);
                self.tasks_source = TasksSource::ProcfsThreads;
            }
            _ => {}
        }
        if let Some(h) = app.and_then(|a| a.heap_inuse_bytes) {
            self.heap.push(t, h, horizon);
        }
    }

    /// Connections opened more than the idle horizon ago, still open, and explained neither by what was
    /// already there when the watch began nor by callers/targets the kernel saw meanwhile: the pool of
    /// a healthy transport is at most as large as the most callers it served at once, and drains within
    /// the idle timeout; what is left beyond that was left behind. `None` until the watch reaches one
    /// idle horizon back.
    pub fn idle_excess(&self, t: f64, idle_horizon: f64) -> Option<IdleExcess> {
        let old_open = self.old_open.last_fresh(t, 5.0)?;
        let above_floor = old_open - self.old_open_floor.unwrap_or(0.0);
        let callers_explained = match (
            self.kernel_conn.max_since(t - idle_horizon),
            self.kernel_conn_floor,
        ) {
            (Some(max), Some(floor)) => (max - floor).max(0.0),
            _ => 0.0,
        };
        Some(IdleExcess {
            old_open,
            above_floor,
            callers_explained,
            excess: (above_floor - callers_explained).max(0.0),
        })
    }

    /// Dialed sockets idle past the horizon, per remote, beyond the fewest seen there in this
    /// incarnation (what was already idle when the watch began explains nothing new), most first.
    pub fn dialed_idle_excess(&self) -> Vec<(&crate::sample::RemoteIdle, u64)> {
        let mut rows: Vec<_> = self
            .dialed_idle
            .iter()
            .map(|g| {
                let floor = self.dialed_idle_floor.get(&g.remote).copied().unwrap_or(0);
                (g, g.idle_over_horizon.saturating_sub(floor))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.remote.cmp(&b.0.remote)));
        rows
    }

    /// Remotes with stalled requests (see [`Self::unanswered`]), most first.
    pub fn unanswered_rows(&self, after_ms: u32) -> Vec<(&crate::sample::RemoteIdle, u64)> {
        let mut rows: Vec<_> = self
            .dialed_idle
            .iter()
            .map(|g| (g, g.unanswered_for(after_ms)))
            .filter(|(_, n)| *n > 0)
            .collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.remote.cmp(&b.0.remote)));
        rows
    }

    /// The rows holding the most old connections above their own floor, most first.
    pub fn idle_rows(&self, n: usize) -> Vec<(&str, f64)> {
        let mut rows: Vec<(&str, f64)> = self
            .rows
            .iter()
            .filter_map(|r| {
                let h = &r.history;
                Some((
                    r.key.as_str(),
                    h.old_open? - h.old_open_floor.unwrap_or(0.0),
                ))
            })
            .filter(|(_, n)| *n >= 1.0)
            .collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        rows.truncate(n);
        rows
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
