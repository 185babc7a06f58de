//! The per-incarnation series the rules read, derived from snapshots. Everything here is reset when the
//! target restarts.
use std::collections::{BTreeMap, HashMap};

use monitor_ebpf::tcp_state::{CLOSE_WAIT, ESTABLISHED};

use super::{
    AnalysisConfig, End, Side, SideInEffect,
    climb::Climb,
    series::{Series, Steps},
};
use crate::{
    sample::{LedgerRow, OTHER_CLIENTKEY, OTHER_REMOTE, ScrapeOutcome, Snapshot},
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
    /// Connections of this row opened more than the idle horizon ago and still open (a lower bound).
    pub old_open: Option<f64>,
    /// How that count has moved: a bounded set's step or a leak's climb.
    pub climb: Climb,
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
    /// Tunneled connections opened more than the idle horizon ago and still open, over all rows (for
    /// the evidence: the rule judges each row on its own).
    pub old_open: Series,
    /// When the first snapshot of this incarnation was taken.
    watching_since: Option<f64>,
    /// Connections peer servers hold through this one (their callers are on the peers).
    pub peer_live: Series,
    /// The side whose sockets backed tunneled connections at the last kernel sample.
    pub side_in_effect: Option<SideInEffect>,
    /// Idle ages of the sockets the target dialed, per remote (kernel tcp_info, refreshed with each full
    /// procfs pass), and per remote how its count of sockets idle past the horizon has moved.
    pub dialed_idle: Vec<crate::sample::RemoteIdle>,
    pub dialed_idle_horizon_s: f64,
    pub dialed_climb: BTreeMap<String, Climb>,
    /// Requests the target dialed that have waited longer than `unanswered_after_s` for the first byte
    /// of an answer, over every remote (refreshed with each full procfs pass).
    pub unanswered: Series,
    /// Kernel connections seen while the app had none live: sockets that are not tunneled connections
    /// (the agent's websocket, scrapes). Subtracted before comparing.
    kernel_offset: Option<f64>,
    pub remotedialer_present: bool,
    /// The target is starting (see `AnalysisConfig::startup_s`): younger than the longest start-up, and
    /// its task level has not settled yet.
    pub starting: bool,
    /// Its task level settled once in this incarnation (or it was past start-up when first seen).
    settled: bool,
    /// The tasks and connections opened when first seen: what the start-up grew from.
    start_levels: Option<(f64, f64)>,
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
        // How every count of old connections (a ledger row's, a target's idle sockets) is told a bounded
        // set or a climb (see [`Climb::observe`]).
        let (fill_s, slack) = (cfg.idle_fill_s, cfg.idle_tolerance);
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
                    history.climb.observe(t, old, fill_s, slack);
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
            }
            self.opened_total += raw_added;
            self.app_live_by_key = by_key;
            // Kept one idle horizon back too: the heap rule sets its growth against the connections'.
            self.app_live.push(t, total, long);
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
            // `_other` sums the remotes past the grouping cap, a different set as remotes come and go:
            // it is never judged as one target.
            let judged = p.dialed_idle.iter().filter(|g| g.remote != OTHER_REMOTE);
            let mut seen = std::collections::BTreeSet::new();
            for g in judged {
                seen.insert(g.remote.as_str());
                self.dialed_climb
                    .entry(g.remote.clone())
                    .or_default()
                    .observe(t, g.idle_over_horizon as f64, fill_s, slack);
            }
            // A remote gone from the reading holds no socket idle: its set drained.
            for (remote, climb) in self.dialed_climb.iter_mut() {
                if !seen.contains(remote.as_str()) {
                    climb.observe(t, 0.0, fill_s, slack);
                }
            }
            self.dialed_climb
                .retain(|_, c| c.level() != Some(0.0) || c.since().is_some());
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
            // Judged over the idle horizon (see `rules::heap_growth`).
            self.heap.push(t, h, long);
        }
        self.update_start_up(s, cfg, t);
    }

    /// Whether the target is still starting. An age nobody knows is no start-up: judged as always.
    fn update_start_up(&mut self, s: &Snapshot, cfg: &AnalysisConfig, t: f64) {
        if self.settled {
            self.starting = false;
            return;
        }
        // No reading of the process yet (not started, or not found): nothing is known of its age.
        let Some(p) = &s.proc else { return };
        let young = p.age_s.is_some_and(|age| age < cfg.startup_s);
        let flat = self.tasks.span(t) >= cfg.min_span_s
            && Self::growth(&self.tasks, t, cfg.window_s)
                .is_some_and(|g| g.abs() <= self.task_min_growth(cfg) / 2.0);
        self.settled = !young || flat;
        self.starting = !self.settled;
        if let (None, Some(tasks)) = (self.start_levels, self.tasks.last()) {
            self.start_levels = Some((tasks, self.opened_total));
        }
    }

    /// The task growth worth a verdict at the current level (see `AnalysisConfig::task_rel_growth`).
    pub fn task_min_growth(&self, cfg: &AnalysisConfig) -> f64 {
        let level = self.tasks.last().unwrap_or(0.0);
        cfg.task_min_growth.max(cfg.task_rel_growth * level)
    }

    /// While the target starts, its growth is the start-up unless the connections it opened since it
    /// was first seen account for at least half of the tasks it gained: a leak of the connections'
    /// tasks shows with the first requests, while controllers and caches starting open none. Judged
    /// over the whole start-up, not the window, so that the tail of a ramp leaving the window does not
    /// read as growth a little traffic explains.
    pub fn start_up_explains(&self, cfg: &AnalysisConfig) -> bool {
        let (Some((tasks0, opened0)), Some(tasks)) = (self.start_levels, self.tasks.last()) else {
            return false;
        };
        self.starting
            && cfg.tasks_per_connection * (self.opened_total - opened0) < (tasks - tasks0) / 2.0
    }

    /// The ledger rows whose old connections climbed more than `tolerance` beyond their fill (see
    /// [`Climb`]), by name: who the idle rule names, in an order that does not change from tick to tick.
    pub fn climbing_rows(&self, tolerance: f64) -> Vec<&RowState> {
        self.rows
            .iter()
            .filter(|r| r.history.climb.beyond_fill() > tolerance)
            .collect()
    }

    /// Old tunneled connections beyond their rows' fills, over every row: the idle rule's number.
    pub fn idle_beyond_fill(&self) -> Option<f64> {
        self.old_open.last()?;
        Some(
            self.rows
                .iter()
                .map(|r| r.history.climb.beyond_fill())
                .sum(),
        )
    }

    /// Dialed sockets idle past the horizon beyond their target's fill (see [`Climb`]), per remote, by
    /// remote; `_other` is never among them.
    pub fn dialed_climbing(&self, tolerance: f64) -> Vec<(&crate::sample::RemoteIdle, f64)> {
        self.dialed_idle
            .iter()
            .filter_map(|g| {
                let climb = self.dialed_climb.get(&g.remote)?.beyond_fill();
                (climb > tolerance).then_some((g, climb))
            })
            .collect()
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
