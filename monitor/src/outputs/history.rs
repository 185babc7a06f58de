//! A compact in-memory history of the quantities the pictures show (the live page of `watch`, the reports of
//! `verify` and `replay`): one fixed-size row per tick in a ring, so memory stays bounded whatever runs for
//! how long. Each value carries the source it came from, because the same chart line can be fed by the
//! kernel in one mode and by procfs in another, and a reader must know which one they are looking at.
use std::{collections::VecDeque, time::Duration};

use monitor_ebpf::tcp_state::{CLOSE_WAIT, ESTABLISHED};

use crate::{
    analysis::{Derived, Side},
    sample::{ScrapeOutcome, Snapshot},
    verdict::{Severity, VerdictChange, VerdictKind},
};

/// How far back the live page looks.
pub const WINDOW: Duration = Duration::from_secs(30 * 60);
/// Cap on rows whatever the interval: at 0.5 s or slower this holds the whole window; faster intervals
/// get a shorter window instead of more memory (about 150 bytes a row, so at most ~0.5 MiB).
pub const MAX_TICKS: usize = 3600;
/// Blocked-age buckets kept per tick (goroutine dumps name a handful: < 1m, 1-10m, ...).
pub const MAX_AGE_BUCKETS: usize = 6;
/// Verdict and restart events kept.
const MAX_EVENTS: usize = 512;

/// Where a value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Ebpf,
    Procfs,
    /// The target's own Prometheus metrics.
    App,
    /// The target's goroutine dump (pprof).
    Pprof,
    /// Computed by leakwatch's analysis from the other sources.
    Derived,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Ebpf => "eBPF",
            Source::Procfs => "procfs",
            Source::App => "app metrics",
            Source::Pprof => "goroutine dump",
            Source::Derived => "leakwatch cross-check",
        }
    }

    /// Stable short name for data attributes.
    pub fn key(self) -> &'static str {
        match self {
            Source::Ebpf => "ebpf",
            Source::Procfs => "procfs",
            Source::App => "app",
            Source::Pprof => "pprof",
            Source::Derived => "derived",
        }
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(c: u8) -> Option<Self> {
        [
            Source::Ebpf,
            Source::Procfs,
            Source::App,
            Source::Pprof,
            Source::Derived,
        ]
        .get((c as usize).checked_sub(1)?)
        .copied()
    }
}

/// The charted quantities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quantity {
    /// remotedialer's add counter, summed over the ledger.
    Added,
    Removed,
    /// add - remove per ledger row (never below zero), summed: what the tunnel believes is open.
    AppLive,
    /// Kernel sockets that back tunneled connections: callers (server) or targets (agent); procfs'
    /// ESTABLISHED sockets in procfs-only mode.
    KernelConn,
    /// App-live connections with no kernel socket behind them (the analysis' cross-check).
    Unbacked,
    /// Tunneled connections idle past the idle horizon that no caller explains (the idle rule's number).
    IdleBeyondHorizon,
    /// Goroutines (app metrics) or threads (procfs).
    Tasks,
    Heap,
    Rss,
    Fds,
    FdLimit,
    CloseWait,
}

impl Quantity {
    pub const ALL: [Quantity; 12] = [
        Quantity::Added,
        Quantity::Removed,
        Quantity::AppLive,
        Quantity::KernelConn,
        Quantity::Unbacked,
        Quantity::IdleBeyondHorizon,
        Quantity::Tasks,
        Quantity::Heap,
        Quantity::Rss,
        Quantity::Fds,
        Quantity::FdLimit,
        Quantity::CloseWait,
    ];
    const N: usize = Self::ALL.len();

    /// Stable name for data attributes and tests.
    pub fn key(self) -> &'static str {
        match self {
            Quantity::Added => "added",
            Quantity::Removed => "removed",
            Quantity::AppLive => "app_live",
            Quantity::KernelConn => "kernel_conn",
            Quantity::Unbacked => "unbacked",
            Quantity::IdleBeyondHorizon => "idle_beyond_horizon",
            Quantity::Tasks => "tasks",
            Quantity::Heap => "heap",
            Quantity::Rss => "rss",
            Quantity::Fds => "fds",
            Quantity::FdLimit => "fd_limit",
            Quantity::CloseWait => "close_wait",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The quiescence recipe's phase at a tick, for shading load phases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Phase {
    #[default]
    Idle,
    Loaded,
    Settling,
    Stuck,
}

impl Phase {
    pub fn from_name(name: &str) -> Self {
        match name {
            "loaded" => Phase::Loaded,
            "settling" => Phase::Settling,
            "stuck" => Phase::Stuck,
            _ => Phase::Idle,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Loaded => "loaded",
            Phase::Settling => "settling",
            Phase::Stuck => "stuck",
        }
    }
}

/// One tick. Missing values are NaN (a scrape gap, the target gone, a source off), which keeps the row
/// fixed-size.
#[derive(Clone, Debug)]
pub struct Tick {
    pub t: f64,
    pub unix: f64,
    values: [f64; Quantity::N],
    sources: [u8; Quantity::N],
    ages: [f32; MAX_AGE_BUCKETS],
    pub phase: Phase,
    /// Counts target restarts: lines break where it changes (counters restart from zero there).
    pub incarnation: u32,
}

impl Tick {
    pub fn get(&self, q: Quantity) -> Option<(f64, Source)> {
        let v = self.values[q.index()];
        let s = Source::from_code(self.sources[q.index()])?;
        v.is_finite().then_some((v, s))
    }

    fn set(&mut self, q: Quantity, v: Option<f64>, s: Source) {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            self.values[q.index()] = v;
            self.sources[q.index()] = s.code();
        }
    }

    pub fn age(&self, bucket: usize) -> Option<f64> {
        self.ages
            .get(bucket)
            .filter(|v| v.is_finite())
            .map(|&v| f64::from(v))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    Raised {
        kind: VerdictKind,
        severity: Severity,
        subject: String,
    },
    /// The verdict became more severe.
    Escalated {
        kind: VerdictKind,
        severity: Severity,
        subject: String,
    },
    Cleared {
        kind: VerdictKind,
        subject: String,
    },
    Restarted {
        old_pid: u32,
        new_pid: u32,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub t: f64,
    pub kind: EventKind,
}

/// The ring of ticks plus the verdict events over the same span.
#[derive(Debug)]
pub struct History {
    ticks: VecDeque<Tick>,
    capacity: usize,
    events: VecDeque<Event>,
    /// Names of the blocked-age buckets, in the order first pushed.
    age_buckets: Vec<String>,
    incarnation: u32,
}

impl Default for History {
    fn default() -> Self {
        Self::for_interval(WINDOW, Duration::from_secs(1))
    }
}

impl History {
    /// A ring holding `capacity` ticks (at least 2).
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(2);
        Self {
            ticks: VecDeque::new(),
            capacity,
            events: VecDeque::new(),
            age_buckets: Vec::new(),
            incarnation: 0,
        }
    }

    /// Enough ticks for `window` at `interval`, within [`MAX_TICKS`].
    pub fn for_interval(window: Duration, interval: Duration) -> Self {
        let per = interval.as_secs_f64().max(1e-3);
        let n = (window.as_secs_f64() / per).ceil();
        Self::with_capacity(if n.is_finite() {
            (n as usize).min(MAX_TICKS)
        } else {
            MAX_TICKS
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn ticks(&self) -> impl ExactSizeIterator<Item = &Tick> + DoubleEndedIterator + Clone {
        self.ticks.iter()
    }

    pub fn last(&self) -> Option<&Tick> {
        self.ticks.back()
    }

    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.events.iter()
    }

    pub fn age_buckets(&self) -> &[String] {
        &self.age_buckets
    }

    /// Appends one tick from a snapshot and what the analysis derived from it, and the verdict changes it
    /// caused.
    pub fn record(
        &mut self,
        snap: &Snapshot,
        derived: &Derived,
        phase: &str,
        side: Side,
        changes: &[VerdictChange],
    ) {
        for c in changes {
            let kind = match c {
                VerdictChange::Raised(v) => EventKind::Raised {
                    kind: v.kind,
                    severity: v.severity,
                    subject: v.subject.clone(),
                },
                VerdictChange::Escalated(v) => EventKind::Escalated {
                    kind: v.kind,
                    severity: v.severity,
                    subject: v.subject.clone(),
                },
                VerdictChange::Cleared { kind, subject, .. } => EventKind::Cleared {
                    kind: *kind,
                    subject: subject.clone(),
                },
                VerdictChange::TargetRestarted {
                    old_pid, new_pid, ..
                } => {
                    self.incarnation = self.incarnation.wrapping_add(1);
                    EventKind::Restarted {
                        old_pid: *old_pid,
                        new_pid: *new_pid,
                    }
                }
            };
            if self.events.len() >= MAX_EVENTS {
                self.events.pop_front();
            }
            self.events.push_back(Event { t: snap.t, kind });
        }
        let mut tick = Tick {
            t: snap.t,
            unix: snap.unix,
            values: [f64::NAN; Quantity::N],
            sources: [0; Quantity::N],
            ages: [f32::NAN; MAX_AGE_BUCKETS],
            phase: Phase::from_name(phase),
            incarnation: self.incarnation,
        };
        fill(&mut tick, snap, derived, side);
        if self.ticks.len() >= self.capacity {
            self.ticks.pop_front();
        }
        self.ticks.push_back(tick);
        // Events older than every tick have nothing left to be drawn against.
        let oldest = self.ticks.front().map(|t| t.t).unwrap_or(f64::NEG_INFINITY);
        while self.events.front().is_some_and(|e| e.t < oldest) {
            self.events.pop_front();
        }
    }

    /// Goroutines per blocked-age bucket (e.g. `("blocked > 10m", 41.0)`), from a parse of the target's
    /// goroutine dump; they belong to the latest tick. The first [`MAX_AGE_BUCKETS`] bucket names seen are
    /// kept; others are dropped rather than growing the row.
    pub fn set_blocked_ages<S: AsRef<str>>(&mut self, buckets: &[(S, f64)]) {
        for (name, count) in buckets {
            let name = name.as_ref();
            let i = match self.age_buckets.iter().position(|b| b == name) {
                Some(i) => i,
                None if self.age_buckets.len() < MAX_AGE_BUCKETS => {
                    self.age_buckets.push(name.to_string());
                    self.age_buckets.len() - 1
                }
                None => continue,
            };
            if let Some(last) = self.ticks.back_mut() {
                last.ages[i] = *count as f32;
            }
        }
    }
}

/// One value per quantity, each from the first source that has it, in the same order of preference as the
/// analysis (so the picture shows what the verdicts were computed from).
fn fill(tick: &mut Tick, snap: &Snapshot, derived: &Derived, side: Side) {
    use Quantity as Q;
    let app = match &snap.app {
        ScrapeOutcome::Ok(a) => Some(a),
        _ => None,
    };
    if let Some(a) = app.filter(|a| a.remotedialer_present) {
        let added = a.ledger.iter().map(|r| r.added).sum();
        let removed = a.ledger.iter().map(|r| r.removed).sum();
        let live = a
            .ledger
            .iter()
            .map(|r| (r.added - r.removed).max(0.0))
            .sum();
        tick.set(Q::Added, Some(added), Source::App);
        tick.set(Q::Removed, Some(removed), Source::App);
        tick.set(Q::AppLive, Some(live), Source::App);
        tick.set(Q::Unbacked, derived.unbacked_connections, Source::Derived);
        tick.set(
            Q::IdleBeyondHorizon,
            derived.idle_beyond_horizon,
            Source::Derived,
        );
    }
    if let Some(k) = &snap.kernel {
        let conn = match side {
            Side::Server => k.accepted_live,
            Side::Agent => k.connected_live,
            Side::Auto => k.accepted_live.max(k.connected_live),
        };
        tick.set(Q::KernelConn, Some(conn as f64), Source::Ebpf);
        tick.set(
            Q::CloseWait,
            Some(k.in_state(CLOSE_WAIT) as f64),
            Source::Ebpf,
        );
    } else if let Some(p) = &snap.proc {
        tick.set(
            Q::KernelConn,
            Some(p.tcp_in_state(ESTABLISHED) as f64),
            Source::Procfs,
        );
        tick.set(
            Q::CloseWait,
            Some(p.tcp_in_state(CLOSE_WAIT) as f64),
            Source::Procfs,
        );
    }
    match (app.and_then(|a| a.goroutines), &snap.proc) {
        (Some(g), _) => tick.set(Q::Tasks, Some(g), Source::App),
        (None, Some(p)) => tick.set(Q::Tasks, Some(p.threads as f64), Source::Procfs),
        _ => {}
    }
    tick.set(Q::Heap, app.and_then(|a| a.heap_inuse_bytes), Source::App);
    if let Some(p) = &snap.proc {
        tick.set(Q::Rss, Some(p.rss_bytes as f64), Source::Procfs);
        tick.set(Q::Fds, Some(p.open_fds as f64), Source::Procfs);
        tick.set(Q::FdLimit, p.fd_limit.map(|l| l as f64), Source::Procfs);
    } else if let Some(a) = app {
        tick.set(Q::Fds, a.open_fds, Source::App);
        tick.set(Q::FdLimit, a.max_fds, Source::App);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        sample::{AppSample, KernelSample, LedgerRow, ProcSample, TargetId},
        verdict::Verdict,
    };

    fn snap(t: f64, added: f64, removed: f64, kernel: bool) -> Snapshot {
        let mut k = KernelSample {
            accepted_live: 3,
            ..KernelSample::default()
        };
        k.sockets_by_state[CLOSE_WAIT as usize] = 2;
        let mut p = ProcSample {
            open_fds: 10,
            fd_limit: Some(1024),
            threads: 7,
            ..ProcSample::default()
        };
        p.tcp_by_state[ESTABLISHED as usize] = 5;
        Snapshot {
            t,
            unix: 1000.0 + t,
            target: Some(TargetId {
                pid: 1,
                start_ticks: 1,
            }),
            kernel: kernel.then_some(k),
            proc: Some(p),
            goroutines: None,
            app: ScrapeOutcome::Ok(AppSample {
                remotedialer_present: true,
                ledger: vec![
                    LedgerRow {
                        added,
                        removed,
                        ..LedgerRow::default()
                    },
                    // A row with more removes than adds (a reset mid-scrape) counts as zero, not negative.
                    LedgerRow {
                        added: 1.0,
                        removed: 2.0,
                        ..LedgerRow::default()
                    },
                ],
                goroutines: Some(12.0),
                ..AppSample::default()
            }),
        }
    }

    #[test]
    fn ring_is_bounded_and_values_carry_their_source() {
        let mut h = History::with_capacity(5);
        for i in 0..12 {
            h.record(
                &snap(i as f64, 10.0 + i as f64, 4.0, i % 2 == 0),
                &Derived::default(),
                "loaded",
                Side::Server,
                &[],
            );
        }
        assert_eq!(h.ticks().len(), 5);
        let last = h.last().unwrap();
        assert_eq!(last.t, 11.0);
        assert_eq!(last.get(Quantity::Added), Some((22.0, Source::App)));
        assert_eq!(last.get(Quantity::AppLive), Some((17.0, Source::App)));
        assert_eq!(last.get(Quantity::Tasks), Some((12.0, Source::App)));
        // Odd ticks had no kernel sample: procfs stands in and says so.
        assert_eq!(last.get(Quantity::KernelConn), Some((5.0, Source::Procfs)));
        let even = h.ticks().nth(3).unwrap();
        assert_eq!(even.get(Quantity::KernelConn), Some((3.0, Source::Ebpf)));
        assert_eq!(even.get(Quantity::CloseWait), Some((2.0, Source::Ebpf)));
        assert_eq!(last.get(Quantity::Heap), None);
        assert_eq!(last.phase, Phase::Loaded);
        assert_eq!(
            History::for_interval(WINDOW, Duration::from_secs(1)).capacity(),
            1800
        );
        assert_eq!(
            History::for_interval(WINDOW, Duration::from_millis(10)).capacity(),
            MAX_TICKS
        );
    }

    #[test]
    fn events_restarts_and_age_buckets() {
        let mut h = History::with_capacity(3);
        let v = Verdict {
            kind: VerdictKind::BookkeepingLeak,
            scope: crate::verdict::Scope::Ledger,
            severity: Severity::Critical,
            since: 0.0,
            subject: "clientkey=c1".into(),
            evidence: Default::default(),
            explanation: String::new(),
        };
        let d = Derived::default();
        h.record(
            &snap(0.0, 1.0, 0.0, true),
            &d,
            "idle",
            Side::Server,
            &[VerdictChange::Raised(v)],
        );
        h.set_blocked_ages(&[("< 1m", 3.0), ("> 10m", 4.0)]);
        h.record(
            &snap(1.0, 1.0, 0.0, true),
            &d,
            "idle",
            Side::Server,
            &[VerdictChange::TargetRestarted {
                at: 1.0,
                old_pid: 1,
                new_pid: 2,
            }],
        );
        assert_eq!(h.events().count(), 2);
        assert_eq!(h.ticks().next().unwrap().incarnation, 0);
        assert_eq!(h.last().unwrap().incarnation, 1);
        assert_eq!(h.age_buckets(), ["< 1m", "> 10m"]);
        assert_eq!(h.ticks().next().unwrap().age(1), Some(4.0));
        assert_eq!(h.last().unwrap().age(1), None);
        for t in 2..6 {
            h.record(
                &snap(t as f64, 1.0, 0.0, true),
                &d,
                "idle",
                Side::Server,
                &[],
            );
        }
        assert_eq!(
            h.events().count(),
            0,
            "events older than every tick are dropped"
        );
        let many: Vec<(String, f64)> = (0..10).map(|i| (format!("b{i}"), 1.0)).collect();
        h.set_blocked_ages(&many);
        assert_eq!(h.age_buckets().len(), MAX_AGE_BUCKETS);
    }
}
