//! The rules: each reads the signals at time `t` and returns the findings that hold right now.
use std::collections::BTreeMap;

use super::{
    AnalysisConfig,
    conditions::Finding,
    signals::{Signals, TasksSource},
};
use crate::verdict::{Scope, Severity, Verdict, VerdictKind};

fn finding(
    kind: VerdictKind,
    severity: Severity,
    subject: String,
    evidence: BTreeMap<String, f64>,
    explanation: String,
    min_duration: f64,
    scope: Scope,
) -> Finding {
    Finding {
        baseline: None,
        verdict: Verdict {
            kind,
            scope,
            severity,
            since: 0.0,
            subject,
            evidence,
            explanation,
        },
        min_duration,
    }
}

impl Finding {
    fn with_baseline(mut self, level_before_growth: f64) -> Self {
        self.baseline = Some(level_before_growth);
        self
    }
}

/// The level each growth rule's scope measures, and how far above its pre-growth baseline it still
/// counts as held (half the growth that raised it). A stale level holds nothing: numbers nobody can
/// see any more are no evidence.
pub fn held_level(
    s: &Signals,
    cfg: &AnalysisConfig,
    scope: Scope,
    t: f64,
    stale_after: f64,
) -> Option<(f64, f64)> {
    match scope {
        Scope::Ledger => Some((
            s.app_live.last_fresh(t, stale_after)?,
            cfg.unbacked_abs_tolerance,
        )),
        Scope::Fds => Some((s.fds.last_fresh(t, stale_after)?, cfg.fd_min_growth / 2.0)),
        Scope::Tasks => Some((
            s.tasks.last_fresh(t, stale_after)?,
            cfg.task_min_growth / 2.0,
        )),
        _ => None,
    }
}

fn ev(pairs: &[(&str, Option<f64>)]) -> BTreeMap<String, f64> {
    pairs
        .iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect()
}

/// The ledger rows whose live count grew most over the window: who the held connections belong to,
/// each with how many it gained. Rows that did not grow are named by their live count instead, so the
/// subject is never empty while the ledger holds connections.
fn leak_subject(s: &Signals, t: f64, window: f64) -> String {
    let mut grown: Vec<(f64, &String)> = s
        .rows
        .iter()
        .filter_map(|r| Signals::growth(&r.live, t, window).map(|g| (g, &r.key)))
        .filter(|(g, _)| *g > 0.0)
        .collect();
    let label = if grown.is_empty() {
        grown = s
            .rows
            .iter()
            .filter_map(|r| r.live.last().map(|v| (v, &r.key)))
            .filter(|(v, _)| *v > 0.0)
            .collect();
        "live"
    } else {
        "grew by"
    };
    grown.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    grown
        .iter()
        .take(3)
        .map(|(g, k)| format!("{k} ({label} {g:.0})"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The ledger is not decremented: the connections the tunnel counts as live grow, while neither its
/// tasks nor its kernel sockets grow with them. A live tunneled connection holds at least one task
/// (remotedialer: the pipe goroutines; Go's transport: persistConn's read and write loops), so a ledger
/// that grows faster than the tasks counts connections that no longer exist. Pooled idle connections
/// hold tasks, and so never look like this.
pub fn bookkeeping(s: &Signals, cfg: &AnalysisConfig, t: f64, stale_after: f64) -> Option<Finding> {
    // A failed scrape leaves the last value in place; a stale ledger is no evidence of a leak now.
    let app = s.app_live.last_fresh(t, stale_after)?;
    // Threads do not scale with connections; only the app's own task count can back the ledger.
    if s.tasks_source != TasksSource::AppGoroutines || s.app_live.span(t) < cfg.min_span_s {
        return None;
    }
    let live_growth = Signals::growth(&s.app_live, t, cfg.window_s)?;
    let task_growth = Signals::growth(&s.tasks, t, cfg.window_s)?.max(0.0);
    let kernel_growth = Signals::growth(&s.kernel_conn, t, cfg.window_s)
        .unwrap_or(0.0)
        .max(0.0);
    let unbacked = live_growth - task_growth.max(kernel_growth);
    let tolerance = cfg.unbacked_abs_tolerance + cfg.unbacked_rel_tolerance * app;
    if unbacked <= tolerance {
        return None;
    }
    let severity = if unbacked > cfg.critical_factor * tolerance {
        Severity::Critical
    } else {
        Severity::Warning
    };
    Some(finding(
        VerdictKind::BookkeepingLeak,
        severity,
        leak_subject(s, t, cfg.window_s),
        ev(&[
            ("app.live_connections", Some(app)),
            ("app.live_growth_in_window", Some(live_growth)),
            ("tasks.growth_in_window", Some(task_growth)),
            ("kernel.connection_growth_in_window", Some(kernel_growth)),
            ("crosscheck.unbacked_growth_in_window", Some(unbacked)),
            ("app.open_rate_per_s", s.open_rate(t, 10.0)),
        ]),
        format!(
            "the tunnel's ledger of live connections grew by {live_growth:.0} in {:.0}s while its tasks grew by only {task_growth:.0} and its kernel connections by {kernel_growth:.0}: {unbacked:.0} connections are counted live that hold nothing (remove not recorded)",
            cfg.window_s
        ),
        cfg.unbacked_min_s,
        Scope::Ledger,
    )
    .with_baseline(app - live_growth))
}

/// How many rows a per-row verdict names in its subject (all of them are in its evidence).
const ROWS_NAMED: usize = 3;

/// The subject of a per-row verdict: the first rows by name, and how many more. Counts go to the
/// evidence, so the subject changes only when the set of rows does.
fn rows_subject(names: &[String]) -> String {
    let more = names.len().saturating_sub(ROWS_NAMED);
    let mut subject: Vec<String> = names.iter().take(ROWS_NAMED).cloned().collect();
    if more > 0 {
        subject.push(format!("+{more} more"));
    }
    subject.join("; ")
}

/// Tunneled connections that outlived every plausible idle timeout, piling up on a ledger row with the
/// row's own requests: the Rancher v2.10.3 leak (a keep-alive transport per request, never closed).
/// Judged per clientkey/proto/addr: a healthy pool (v2.10.5), one idle connection per addr of a shared
/// transport, and watches all hold old connections too, but as a set that stops growing once it has
/// aged past the horizon (see [`super::climb`]); a leak climbs on. No process-wide count of callers or
/// sockets enters: on a Rancher server most of them belong to other clusters.
pub fn idle_connections(s: &Signals, cfg: &AnalysisConfig, t: f64) -> Option<Finding> {
    let horizon = cfg.idle_horizon_s();
    s.old_open.last_fresh(t, cfg.unbacked_min_s.max(5.0))?;
    let rows = s.climbing_rows(cfg.idle_tolerance);
    let worst = rows.iter().max_by(|a, b| {
        a.history
            .climb
            .beyond_fill()
            .total_cmp(&b.history.climb.beyond_fill())
    })?;
    let total: f64 = rows.iter().map(|r| r.history.climb.beyond_fill()).sum();
    let severity = if rows
        .iter()
        .any(|r| r.history.climb.beyond_fill() > cfg.critical_factor * cfg.idle_tolerance)
    {
        Severity::Critical
    } else {
        Severity::Warning
    };
    let mut evidence = ev(&[
        ("crosscheck.idle_beyond_horizon", Some(total)),
        ("app.connections_older_than_horizon", s.old_open.last()),
        ("app.live_connections", s.app_live.last()),
        ("app.rows_climbing", Some(rows.len() as f64)),
        ("config.idle_horizon_s", Some(horizon)),
        ("config.idle_fill_s", Some(cfg.idle_fill_s)),
    ]);
    for r in &rows {
        let c = &r.history.climb;
        evidence.insert(
            format!("app.idle_beyond_horizon[{}]", r.key),
            c.beyond_fill(),
        );
        if let Some(old) = c.level() {
            evidence.insert(
                format!("app.connections_older_than_horizon[{}]", r.key),
                old,
            );
        }
        if let Some(since) = c.since() {
            evidence.insert(format!("app.climbing_for_s[{}]", r.key), t - since);
        }
    }
    let c = &worst.history.climb;
    let others = match rows.len() {
        1 => String::new(),
        n => format!(" ({} rows climb so, {total:.0} connections in all)", n),
    };
    Some(finding(
        VerdictKind::IdleConnectionLeak,
        severity,
        rows_subject(&rows.iter().map(|r| r.key.clone()).collect::<Vec<_>>()),
        evidence,
        format!(
            "{} tunneled connections to {} have been idle with no caller for more than {horizon:.0}s (opened that long ago, still open), and they keep piling up with the row's requests: {:.0} more than the row held {:.0}s after they began to age past the horizon{others}. A pool or a set of watches stops there; a transport that leaves every request's connection open (the Rancher v2.10.3 leak: no idle timeout, where {:.0}s is the longest a healthy one keeps an idle connection) climbs on",
            c.level().unwrap_or(0.0),
            worst.key,
            c.beyond_fill(),
            cfg.idle_fill_s,
            cfg.idle_timeout_s
        ),
        cfg.idle_min_s,
        Scope::LedgerIdle,
    ))
}

/// How many targets a per-target verdict names (and puts in its evidence).
const TARGETS_NAMED: usize = 3;

/// Evidence for the worst few targets of a per-target socket rule (`kernel.<key>[<target>]`, their
/// ESTABLISHED sockets and the oldest age of `what`), and the subject naming them.
fn per_target(
    evidence: &mut BTreeMap<String, f64>,
    rows: &[(&crate::sample::RemoteIdle, u64)],
    what: &str,
    key: &str,
    oldest_ms: impl Fn(&crate::sample::RemoteIdle) -> u32,
) -> String {
    let mut names = Vec::new();
    for (g, n) in rows.iter().take(TARGETS_NAMED) {
        evidence.insert(format!("kernel.{key}[{}]", g.remote), *n as f64);
        evidence.insert(
            format!("kernel.established[{}]", g.remote),
            g.established as f64,
        );
        evidence.insert(
            format!("kernel.oldest_{what}_s[{}]", g.remote),
            f64::from(oldest_ms(g)) / 1000.0,
        );
        names.push(format!("target={} ({n} {what})", g.remote));
    }
    names.join("; ")
}

/// The agent side of the same leak, from the kernel's own clock: ESTABLISHED sockets the target dialed
/// that carried no data for longer than the idle horizon, piling up per target beyond the set that aged
/// past it together (see [`super::climb`]). A healthy pool closes an idle connection within its idle
/// timeout or reuses it (which resets its idle age); a pool without one keeps a bounded set. The
/// remotes folded into `_other` are never judged as one target.
pub fn idle_sockets(s: &Signals, cfg: &AnalysisConfig) -> Option<Finding> {
    let mut rows = s.dialed_climbing(cfg.idle_tolerance);
    if rows.is_empty() {
        return None;
    }
    let horizon = s.dialed_idle_horizon_s;
    let mut by_name: Vec<String> = rows
        .iter()
        .map(|(g, _)| format!("target={}", g.remote))
        .collect();
    by_name.sort();
    let subject = rows_subject(&by_name);
    rows.sort_by(|a, b| {
        b.1.total_cmp(&a.1)
            .then_with(|| a.0.remote.cmp(&b.0.remote))
    });
    let total: f64 = rows.iter().map(|(_, n)| n).sum();
    let mut evidence = BTreeMap::new();
    for (g, climb) in &rows {
        evidence.insert(format!("kernel.idle_beyond_horizon[{}]", g.remote), *climb);
        evidence.insert(
            format!("kernel.idle_over_horizon[{}]", g.remote),
            g.idle_over_horizon as f64,
        );
        evidence.insert(
            format!("kernel.established[{}]", g.remote),
            g.established as f64,
        );
        evidence.insert(
            format!("kernel.oldest_idle_s[{}]", g.remote),
            f64::from(g.oldest_idle_ms) / 1000.0,
        );
    }
    for (g, _) in rows.iter().take(TARGETS_NAMED) {
        for (label, count) in crate::sample::IDLE_BUCKET_LABELS.iter().zip(g.buckets) {
            evidence.insert(
                format!("kernel.idle_age_{label}[{}]", g.remote),
                count as f64,
            );
        }
    }
    evidence.insert("kernel.idle_beyond_horizon".into(), total);
    evidence.insert("config.idle_horizon_s".into(), horizon);
    let (top, climb) = rows.first()?;
    let ages: Vec<String> = crate::sample::IDLE_BUCKET_LABELS
        .iter()
        .zip(top.buckets)
        .filter(|(_, c)| *c > 0)
        .map(|(l, c)| format!("{c} {}", l.replace('_', " ")))
        .collect();
    let severity = if rows
        .iter()
        .any(|(_, n)| *n > cfg.critical_factor * cfg.idle_tolerance)
    {
        Severity::Critical
    } else {
        Severity::Warning
    };
    Some(finding(
        VerdictKind::IdleConnectionLeak,
        severity,
        subject,
        evidence,
        format!(
            "{} ESTABLISHED sockets to {} have been idle with no data either way for more than {horizon:.0}s (oldest {:.0}s; idle ages: {}), and they keep piling up: {climb:.0} more than the set that aged past the horizon together. A pool without an idle timeout stops there; the tunnel holds a connection for every request nobody uses (the agent side of the Rancher v2.10.3 leak)",
            top.idle_over_horizon,
            top.remote,
            f64::from(top.oldest_idle_ms) / 1000.0,
            ages.join(", ")
        ),
        cfg.idle_min_s,
        Scope::SocketIdle,
    ))
}

/// Requests waiting unanswered now: the last sock_diag reading, while it is recent enough to speak for now
/// (the dump comes with the full procfs pass, every 5-15 s). The rule and the exported gauge read this.
pub fn unanswered_level(s: &Signals, cfg: &AnalysisConfig, t: f64) -> Option<f64> {
    s.unanswered.last_fresh(t, cfg.sockdiag_stale_s)
}

/// Requests piling up that the target never began to answer: ESTABLISHED sockets it dialed that sent data
/// and got not one byte back for longer than `unanswered_after_s`. On an agent this is the leak whose
/// sockets stay ESTABLISHED: each stalled dial holds its pipe goroutines, and no traffic explains them. The
/// agent cannot see whether the callers still wait (a hung target) or left (a server that never closed
/// the tunneled connection); the text names both. Judged on the level, not on growth since the watch began,
/// so that a pile that was there before leakwatch is flagged too.
pub fn unanswered_requests(s: &Signals, cfg: &AnalysisConfig, t: f64) -> Option<Finding> {
    let level = unanswered_level(s, cfg, t)?;
    if level <= cfg.unanswered_tolerance {
        return None;
    }
    let rows = s.unanswered_rows(cfg.unanswered_after_ms());
    let (top, top_n) = rows.first()?;
    let growth = Signals::growth(&s.unanswered, t, cfg.window_s);
    let task_growth = Signals::growth(&s.tasks, t, cfg.window_s);
    let mut evidence = ev(&[
        ("kernel.unanswered_requests", Some(level)),
        ("kernel.unanswered_growth_in_window", growth),
        ("tasks.current", s.tasks.last()),
        ("tasks.growth_in_window", task_growth),
        ("config.unanswered_after_s", Some(cfg.unanswered_after_s)),
    ]);
    let subject = per_target(&mut evidence, &rows, "unanswered", "unanswered", |g| {
        g.oldest_unanswered_ms
    });
    let severity = if level > cfg.critical_factor * cfg.unanswered_tolerance {
        Severity::Critical
    } else {
        Severity::Warning
    };
    let tasks = match task_growth {
        Some(k) if k >= 1.0 => format!(", and {} grew by {k:.0}", s.tasks_source),
        _ => String::new(),
    };
    let piling = match growth {
        Some(g) if g >= 1.0 => format!("; {g:.0} more in the last {:.0}s{tasks}", cfg.window_s),
        _ => String::new(),
    };
    Some(finding(
        VerdictKind::SocketLeak,
        severity,
        subject,
        evidence,
        format!(
            "{top_n} requests to {} have waited more than {:.0}s without one byte of answer (oldest {:.0}s){piling}: \
             the tunnel holds their connections with no traffic to explain them. Either the target hangs and its \
             callers still wait, or the callers left and the close never reached this side (on the server, add \
             and remove counters drift apart)",
            top.remote,
            cfg.unanswered_after_s,
            f64::from(top.oldest_unanswered_ms) / 1000.0,
        ),
        cfg.unanswered_min_s,
        Scope::Unanswered,
    ))
}

/// Sockets left in CLOSE_WAIT: the peer closed, the process never did.
pub fn close_wait(s: &Signals, cfg: &AnalysisConfig, t: f64) -> Option<Finding> {
    let cw = s.close_wait.last()?;
    // Not draining: the lowest count of the last seconds is still over the tolerance. No count in those
    // seconds (the source went quiet) is no evidence, not the last count again.
    let floor = s.close_wait.min_since(t - cfg.close_wait_floor_s)?;
    if floor <= cfg.close_wait_tolerance {
        return None;
    }
    let growth = Signals::growth(&s.close_wait, t, cfg.window_s);
    let severity = if growth.is_some_and(|g| g > cfg.close_wait_tolerance) {
        Severity::Critical
    } else {
        Severity::Warning
    };
    let mut evidence = ev(&[
        ("kernel.close_wait_sockets", Some(cw)),
        ("kernel.close_wait_growth_in_window", growth),
        ("kernel.established_sockets", s.established.last()),
        ("app.live_connections", s.app_live.last()),
        ("procfs.open_fds", s.fds.last()),
    ]);
    for (peer, n) in &s.close_wait_peers {
        evidence.insert(format!("kernel.close_wait_peer[{peer}]"), *n as f64);
    }
    let (subject, whom) = match s.close_wait_peers.first() {
        Some((peer, n)) => (
            format!("state=CLOSE_WAIT peer={peer}"),
            format!("; most from {peer} ({n})"),
        ),
        None => ("state=CLOSE_WAIT".to_string(), String::new()),
    };
    Some(finding(
        VerdictKind::SocketLeak,
        severity,
        subject,
        evidence,
        format!(
            "{cw:.0} sockets sit in CLOSE_WAIT: their peers hung up and the process never closed them{whom}"
        ),
        cfg.close_wait_min_s,
        Scope::CloseWait,
    ))
}

/// Fds that keep growing with no matching growth of established connections.
pub fn fd_growth(s: &Signals, cfg: &AnalysisConfig, t: f64) -> Option<Finding> {
    if s.fds.span(t) < cfg.min_span_s {
        return None;
    }
    let since = t - cfg.window_s;
    let slope = s.fds.slope_since(since)?;
    let growth = Signals::growth(&s.fds, t, cfg.window_s)?;
    let est_growth = Signals::growth(&s.established, t, cfg.window_s)
        .unwrap_or(0.0)
        .max(0.0);
    if slope < cfg.fd_min_slope
        || growth - est_growth < cfg.fd_min_growth
        || s.start_up_explains(cfg)
    {
        return None;
    }
    Some(finding(
        VerdictKind::SocketLeak,
        Severity::Warning,
        "fds".into(),
        ev(&[
            ("procfs.open_fds", s.fds.last()),
            ("procfs.fd_growth_in_window", Some(growth)),
            ("procfs.fd_slope_per_s", Some(slope)),
            ("kernel.established_growth_in_window", Some(est_growth)),
            ("procfs.fd_limit", s.fd_limit),
        ]),
        format!(
            "open fds grew by {growth:.0} in {:.0}s ({slope:.1}/s) while established connections did not",
            cfg.window_s
        ),
        0.0,
        Scope::Fds,
    )
    .with_baseline(s.fds.last()? - growth))
}

/// Tasks that keep rising while live connections do not explain them.
pub fn task_growth(s: &Signals, cfg: &AnalysisConfig, t: f64) -> Option<Finding> {
    if s.tasks.span(t) < cfg.min_span_s {
        return None;
    }
    let slope = s.tasks.slope_since(t - cfg.window_s)?;
    let growth = Signals::growth(&s.tasks, t, cfg.window_s)?;
    // Established sockets justify tasks, and so do tunneled connections the ledger holds (pooled idle
    // connections hold their read/write loops; the idle rule judges whether they are held too long).
    // Connections whose callers left (CLOSE_WAIT) justify nothing.
    let established_growth = Signals::growth(&s.established, t, cfg.window_s).unwrap_or(0.0);
    // Connections peers hold through this server hold tasks here too (a relay pipe each).
    let ledger_raw_growth = Signals::growth(&s.app_live, t, cfg.window_s).unwrap_or(0.0)
        + Signals::growth(&s.peer_live, t, cfg.window_s).unwrap_or(0.0);
    let close_wait_growth = Signals::growth(&s.close_wait, t, cfg.window_s)
        .unwrap_or(0.0)
        .max(0.0);
    let ledger_growth = ledger_raw_growth - close_wait_growth;
    let live_growth = established_growth.max(ledger_growth).max(0.0);
    let unexplained = growth - cfg.tasks_per_connection * live_growth;
    let min_growth = s.task_min_growth(cfg);
    if slope < cfg.task_min_slope || unexplained < min_growth || s.start_up_explains(cfg) {
        return None;
    }
    let severity = if unexplained > cfg.task_critical_factor * min_growth {
        Severity::Critical
    } else {
        Severity::Warning
    };
    Some(
        finding(
            VerdictKind::TaskGrowth,
            severity,
            s.tasks_source.as_str().to_string(),
            ev(&[
                ("tasks.current", s.tasks.last()),
                ("tasks.growth_in_window", Some(growth)),
                ("tasks.slope_per_s", Some(slope)),
                (
                    "kernel.established_growth_in_window",
                    Some(established_growth),
                ),
                (
                    "crosscheck.live_connection_growth_in_window",
                    Some(live_growth),
                ),
                ("kernel.close_wait_sockets", s.close_wait.last()),
                (
                    "kernel.close_wait_growth_in_window",
                    Some(close_wait_growth),
                ),
                ("app.live_connections", s.app_live.last()),
            ]),
            task_growth_text(
                s.tasks_source,
                (growth, slope, cfg.window_s),
                live_growth,
                ledger_raw_growth,
                // Callers that hung up are the cause only where their connections could hold at
                // least half of the growth; a few CLOSE_WAITs beside thousands of new tasks are not.
                if cfg.tasks_per_connection * close_wait_growth >= unexplained / 2.0 {
                    close_wait_growth
                } else {
                    0.0
                },
            ),
            0.0,
            Scope::Tasks,
        )
        .with_baseline(s.tasks.last()? - growth),
    )
}

/// What a task-growth verdict says: the numbers it rests on, and a cause only where they show one. The
/// ledger's connections whose callers hung up (CLOSE_WAIT) are counted out of the live ones, so the text
/// says so when that is why "live connections" stayed flat while the ledger grew.
fn task_growth_text(
    source: TasksSource,
    (growth, slope, window): (f64, f64, f64),
    live_growth: f64,
    ledger_growth: f64,
    close_wait_growth: f64,
) -> String {
    let head = format!(
        "{source} grew by {growth:.0} in {window:.0}s ({slope:.1}/s) while live connections grew by {live_growth:.0}"
    );
    if close_wait_growth >= 1.0 {
        let ledger = if ledger_growth >= 1.0 {
            format!(" (the ledger's grew by {ledger_growth:.0}, ")
        } else {
            " (".to_string()
        };
        format!(
            "{head}{ledger}but {close_wait_growth:.0} of their callers hung up and sit in CLOSE_WAIT): tasks are held for connections whose callers left"
        )
    } else {
        format!("{head}: the growth is not explained by connections")
    }
}

/// Heap growing along with a task, bookkeeping or idle-connection leak. Measured over the idle horizon,
/// not the trend window: a healthy pool keeps each burst's connections, and their buffers, for up to its
/// idle timeout, so the heap a burst lifts stays up that long; only what outgrows that is the leak's.
pub fn heap_growth(s: &Signals, cfg: &AnalysisConfig, t: f64, correlated: bool) -> Option<Finding> {
    if !correlated || s.heap.span(t) < cfg.min_span_s {
        return None;
    }
    let span = cfg.idle_horizon_s().max(cfg.window_s);
    let growth = Signals::growth(&s.heap, t, span)?;
    let first_t = s.heap.since(t - span).first()?.0;
    let first = s.heap.median_between(first_t, first_t + 5.0).unwrap_or(0.0);
    let slope = s.heap.slope_since(t - span)?;
    // What a leak holds raises the heap's floor; a burst of requests only lifts it for a while. The
    // lowest heap of the last third of the span against that of its first third tells them apart.
    let third = (t - first_t) / 3.0;
    let floor_growth =
        s.heap.min_between(t - third, t)? - s.heap.min_between(first_t, first_t + third)?;
    let min_growth = cfg
        .heap_min_growth_bytes
        .max(cfg.heap_min_growth_ratio * first);
    // Connections opened meanwhile hold their buffers (a pool filling as load begins, the leak's own
    // connections): the heap they account for is theirs, not a heap leak's.
    let conn_growth = Signals::growth(&s.app_live, t, span)
        .or_else(|| Signals::growth(&s.kernel_conn, t, span))
        .unwrap_or(0.0)
        .max(0.0);
    let held = cfg.heap_bytes_per_connection * conn_growth;
    if slope <= 0.0 || growth - held < min_growth || floor_growth - held < min_growth {
        return None;
    }
    Some(finding(
        VerdictKind::HeapGrowth,
        Severity::Warning,
        "heap".into(),
        ev(&[
            ("app.heap_inuse_bytes", s.heap.last()),
            ("app.heap_growth_in_window", Some(growth)),
            ("app.heap_floor_growth_in_window", Some(floor_growth)),
            ("app.heap_slope_bytes_per_s", Some(slope)),
            ("crosscheck.connection_growth_in_window", Some(conn_growth)),
            ("config.heap_window_s", Some(t - first_t)),
        ]),
        format!(
            "heap grew by {:.1} MiB in {:.0}s alongside the leak, its floor by {:.1} MiB: more than the {conn_growth:.0} connections opened meanwhile hold ({:.0} KiB each)",
            growth / 1048576.0,
            t - first_t,
            floor_growth / 1048576.0,
            cfg.heap_bytes_per_connection / 1024.0
        ),
        0.0,
        Scope::Heap,
    ))
}

/// Seconds until the fd limit at the current leak rate: only fd growth that established connections do
/// not explain counts (a legitimate ramp of load is capacity planning, not a leak).
pub fn fd_forecast(s: &Signals, cfg: &AnalysisConfig, t: f64) -> Option<f64> {
    let limit = s.fd_limit?;
    if s.fds.span(t) < cfg.min_span_s {
        return None;
    }
    let slope = s.fds.slope_since(t - cfg.window_s)?;
    let growth = Signals::growth(&s.fds, t, cfg.window_s)?;
    let est_growth = Signals::growth(&s.established, t, cfg.window_s)
        .unwrap_or(0.0)
        .max(0.0);
    if slope <= 0.0 || growth - est_growth < cfg.fd_min_growth / 2.0 {
        return None;
    }
    let leak_share = ((growth - est_growth) / growth).clamp(0.0, 1.0);
    Some(((limit - s.fds.last()?) / (slope * leak_share)).max(0.0))
}

pub fn fd_exhaustion(s: &Signals, cfg: &AnalysisConfig, t: f64) -> Option<Finding> {
    let secs = fd_forecast(s, cfg, t)?;
    if secs > cfg.fd_forecast_warning_s {
        return None;
    }
    let severity = if secs <= cfg.fd_forecast_critical_s {
        Severity::Critical
    } else {
        Severity::Warning
    };
    Some(finding(
        VerdictKind::FdExhaustion,
        severity,
        "fds".into(),
        ev(&[
            ("procfs.open_fds", s.fds.last()),
            ("procfs.fd_limit", s.fd_limit),
            ("forecast.seconds_to_limit", Some(secs)),
        ]),
        format!(
            "at the current rate the fd limit ({:.0}) is reached in {:.0} minutes",
            s.fd_limit.unwrap_or(0.0),
            secs / 60.0
        ),
        0.0,
        Scope::FdLimit,
    ))
}
