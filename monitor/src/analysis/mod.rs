//! Pure analysis: series of [`crate::sample::Snapshot`]s in, [`crate::verdict::Verdict`]s out. No I/O, so
//! recorded series replay into it in unit tests exactly as they would live.
//!
//! Per tick: [`signals`] turns the snapshot into per-incarnation series (app ledger, kernel sockets, fds,
//! tasks, heap); each function in [`rules`] (and the [`quiescence`] state machine) looks at them and says
//! what holds right now; [`conditions`] debounces those findings into raised and cleared verdicts.
pub mod climb;
mod conditions;
mod config;
pub mod evidence;
pub mod help;
pub mod quiescence;
mod rules;
pub mod series;
pub mod signals;
pub mod trend;

use std::collections::BTreeMap;

pub use config::{AnalysisConfig, End, Side, SideInEffect};

use self::{conditions::Conditions, quiescence::Quiescence, signals::Signals};
use crate::{
    sample::{OTHER_CLIENTKEY, Snapshot, TargetId},
    verdict::{Scope, Source, Verdict, VerdictChange, VerdictKind},
};

/// Numbers the analysis derives that are worth exporting (the cross-check at a glance).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Derived {
    /// Which side's sockets back tunneled connections now: `server` (callers) or `agent` (targets);
    /// with `--side auto`, whichever the kernel shows more of, marked `(auto)`. `None` before the first
    /// kernel sample.
    pub side: Option<SideInEffect>,
    /// Live connections of the [`CLIENTKEYS_EXPORTED`] clientkeys holding the most, the rest summed into
    /// [`OTHER_CLIENTKEY`]: what is exported per clientkey stays bounded on an install of thousands of
    /// clusters.
    pub app_live_by_clientkey: BTreeMap<String, f64>,
    /// App-live connections minus the kernel connections that could back them (callers on a server,
    /// targets on an agent): idle pooled connections and leaks alike, an at-a-glance gauge.
    pub unbacked_connections: Option<f64>,
    /// Tunneled connections idle past the idle horizon beyond what their rows' bounded sets hold, summed
    /// over rows (the idle rule's number; it judges each row on its own).
    pub idle_beyond_horizon: Option<f64>,
    /// Requests the target dialed that have waited past `unanswered_after_s` for a first byte of answer
    /// (the unanswered rule's number); `None` where sock_diag is not measured.
    pub unanswered_requests: Option<f64>,
    pub fd_exhaustion_seconds: Option<f64>,
}

/// How many clientkeys get their own live-connection figure in [`Derived`] (and so their own series of
/// `leakwatch_app_live_connections`); docs/metrics.md says the same.
pub const CLIENTKEYS_EXPORTED: usize = 100;

/// The `n` clientkeys with the most live connections (ties by name), the others summed into
/// [`OTHER_CLIENTKEY`] with the rows the scraper already summed there.
fn top_clientkeys(by_key: &BTreeMap<String, f64>, n: usize) -> BTreeMap<String, f64> {
    let mut keys: Vec<(&String, f64)> = by_key
        .iter()
        .filter(|(k, _)| k.as_str() != OTHER_CLIENTKEY)
        .map(|(k, v)| (k, *v))
        .collect();
    let other = by_key.get(OTHER_CLIENTKEY).copied();
    if keys.len() <= n {
        return by_key.clone();
    }
    let most_first =
        |a: &(&String, f64), b: &(&String, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(b.0));
    keys.select_nth_unstable_by(n, most_first);
    let rest: f64 = keys[n..].iter().map(|(_, v)| v).sum();
    let mut out: BTreeMap<String, f64> =
        keys[..n].iter().map(|(k, v)| ((*k).clone(), *v)).collect();
    out.insert(OTHER_CLIENTKEY.to_string(), other.unwrap_or(0.0) + rest);
    out
}

/// Tells the debouncer whether a growth verdict's level is still up (see [`conditions::HoldCheck`]).
struct Held<'a> {
    signals: &'a Signals,
    cfg: &'a AnalysisConfig,
    t: f64,
    stale_after: f64,
}

impl conditions::HoldCheck for Held<'_> {
    fn level(&self, scope: Scope) -> Option<(f64, f64)> {
        rules::held_level(self.signals, self.cfg, scope, self.t, self.stale_after)
    }
}

pub struct Analyzer {
    cfg: AnalysisConfig,
    signals: Signals,
    conditions: Conditions,
    quiescence: Quiescence,
    target: Option<TargetId>,
    derived: Derived,
    evidence: evidence::GoroutineEvidence,
    /// The target's start-up ended with the last snapshot.
    start_up_ended: bool,
}

impl Analyzer {
    pub fn new(cfg: AnalysisConfig) -> Self {
        Self {
            cfg,
            signals: Signals::default(),
            conditions: Conditions::default(),
            quiescence: Quiescence::default(),
            target: None,
            derived: Derived::default(),
            evidence: evidence::GoroutineEvidence::default(),
            start_up_ended: false,
        }
    }

    /// The series the analysis keeps, for commands that judge them themselves (`verify`).
    pub fn signals(&self) -> &Signals {
        &self.signals
    }

    pub fn config(&self) -> &AnalysisConfig {
        &self.cfg
    }

    /// How far back series are kept: the trend window plus room for the edges of the growth medians.
    fn horizon(&self) -> f64 {
        self.cfg.window_s + self.cfg.quiet_s.max(10.0)
    }

    /// Feeds one snapshot; returns the verdicts raised or cleared by it.
    pub fn observe(&mut self, snap: &Snapshot) -> Vec<VerdictChange> {
        let t = snap.t;
        let mut changes = Vec::new();
        if let Some(id) = &snap.target {
            match &self.target {
                Some(old) if old != id => {
                    // A new incarnation: its counters restart from zero and its levels from its own start-up.
                    // Comparing across the restart would read the reset as a leak or a recovery.
                    changes.extend(self.conditions.reset(t));
                    changes.push(VerdictChange::TargetRestarted {
                        at: t,
                        old_pid: old.pid,
                        new_pid: id.pid,
                    });
                    self.signals.clear();
                    self.quiescence.reset();
                    // A new process: its goroutines are another baseline's.
                    self.evidence = evidence::GoroutineEvidence::default();
                    self.target = Some(id.clone());
                }
                Some(_) => {}
                None => self.target = Some(id.clone()),
            }
        }
        let was_starting = self.signals.starting;
        self.signals.update(snap, &self.cfg, self.horizon());
        self.start_up_ended = was_starting && !self.signals.starting;
        let silent: BTreeMap<Scope, String> = Scope::ALL
            .iter()
            .filter_map(|&scope| Some((scope, self.silent(scope, t)?)))
            .collect();
        changes.extend(
            self.conditions
                .expire(t, &|scope| silent.get(&scope).cloned()),
        );
        let mut findings = self.findings(t);
        // One freshness rule for every rule: a finding whose every source has gone silent is no finding.
        findings.retain(|f| self.silent(f.verdict.scope, t).is_none());
        let hold = Held {
            signals: &self.signals,
            cfg: &self.cfg,
            t,
            stale_after: self.stale_after(),
        };
        changes.extend(self.conditions.update(
            t,
            findings,
            self.cfg.clear_after_ticks,
            self.cfg.clear_after_s,
            &hold,
        ));
        self.derived = Derived {
            side: self.signals.side_in_effect,
            app_live_by_clientkey: top_clientkeys(
                &self.signals.app_live_by_key,
                CLIENTKEYS_EXPORTED,
            ),
            unbacked_connections: self.signals.unbacked.last_fresh(t, self.stale_after()),
            idle_beyond_horizon: self.signals.idle_beyond_fill(),
            unanswered_requests: rules::unanswered_level(&self.signals, &self.cfg, t),
            fd_exhaustion_seconds: rules::fd_forecast(&self.signals, &self.cfg, t),
        };
        changes
    }

    /// A value older than this is not evidence of anything now (scrape gap, target gone).
    fn stale_after(&self) -> f64 {
        self.cfg.unbacked_min_s.max(5.0)
    }

    /// How long a source may be silent before what rests on it alone is void: a sock_diag reading comes
    /// with the full procfs pass (every 5-15 s), every other source every tick.
    fn freshness_bound(&self, source: Source) -> f64 {
        match source {
            Source::SockDiag => self.cfg.sockdiag_stale_s,
            Source::App | Source::Kernel | Source::Procfs => self.stale_after(),
        }
    }

    /// Why findings of `scope` stand on nothing now, if they do: every source they read has been silent
    /// for longer than its bound.
    fn silent(&self, scope: Scope, t: f64) -> Option<String> {
        let mut said = Vec::new();
        // Tasks are read from one source at a time: the app's goroutines, or procfs' threads.
        let tasks = [self.signals.tasks_source.source()];
        let sources = match scope {
            Scope::Tasks => &tasks[..],
            _ => scope.sources(),
        };
        for &source in sources {
            match self.signals.silent_for(source, t) {
                Some(s) if s > self.freshness_bound(source) => {
                    said.push(format!("{} silent for {s:.0}s", source.as_str()))
                }
                // Fresh, or never heard from in this incarnation: a source that never answered
                // contributed nothing, so the others decide.
                Some(_) => return None,
                None => {}
            }
        }
        (!said.is_empty()).then(|| format!("its evidence went stale ({})", said.join(", ")))
    }

    fn findings(&mut self, t: f64) -> Vec<conditions::Finding> {
        let (s, cfg) = (&self.signals, &self.cfg);
        let mut out: Vec<_> = [
            rules::bookkeeping(s, cfg, t, self.stale_after()),
            rules::idle_connections(s, cfg, t),
            rules::idle_sockets(s, cfg),
            rules::unanswered_requests(s, cfg, t),
            rules::close_wait(s, cfg, t),
            rules::fd_growth(s, cfg, t),
            rules::task_growth(s, cfg, t),
            rules::fd_exhaustion(s, cfg, t),
        ]
        .into_iter()
        .flatten()
        .collect();
        // A ledger that is not decremented also looks like old connections that never close; their
        // "age" is the ledger's mistake, not connections held idle. One verdict says what is wrong.
        let ledger_lies = out
            .iter()
            .any(|f| f.verdict.kind == VerdictKind::BookkeepingLeak)
            || self.conditions.holding(VerdictKind::BookkeepingLeak);
        if ledger_lies {
            out.retain(|f| {
                !(f.verdict.kind == VerdictKind::IdleConnectionLeak
                    && f.verdict.scope == Scope::LedgerIdle)
            });
        }
        const HEAP_HOLDERS: [VerdictKind; 3] = [
            VerdictKind::TaskGrowth,
            VerdictKind::BookkeepingLeak,
            VerdictKind::IdleConnectionLeak,
        ];
        let correlated = out.iter().any(|f| HEAP_HOLDERS.contains(&f.verdict.kind))
            || HEAP_HOLDERS.iter().any(|k| self.conditions.holding(*k));
        out.extend(rules::heap_growth(s, cfg, t, correlated));
        out.extend(self.quiescence.update(&self.signals, &self.cfg, t));
        out
    }

    /// Verdicts active now, with the goroutine evidence they have.
    pub fn active(&self) -> Vec<Verdict> {
        let mut active = self.conditions.active();
        for v in &mut active {
            self.evidence.attach(v);
        }
        active
    }

    /// What the goroutine profiles should be asked after a tick that made `changes`.
    pub fn evidence_wanted(&self, changes: &[VerdictChange]) -> crate::sample::EvidenceWanted {
        crate::sample::EvidenceWanted {
            new_baseline: self.start_up_ended,
            ..self.evidence.wanted(
                changes,
                &self.conditions.active(),
                self.cfg.idle_horizon_s(),
            )
        }
    }

    /// Takes this tick's goroutine reading and puts it into the verdicts `changes` raised.
    pub fn add_evidence(
        &mut self,
        reading: &crate::sample::GoroutineReading,
        changes: &mut [VerdictChange],
    ) {
        self.evidence.take(reading, changes);
    }

    /// One recorded snapshot, judged as `watch` judged it: the analysis, then the goroutine reading the
    /// snapshot carries (read because that tick's verdicts asked for it).
    pub fn replay(&mut self, snap: &Snapshot) -> Vec<VerdictChange> {
        let mut changes = self.observe(snap);
        if let Some(r) = &snap.goroutines {
            self.add_evidence(r, &mut changes);
        }
        changes
    }

    /// The goroutine stacks that grew most (the last reading), for /status.
    pub fn stack_growth(&self) -> &[(String, i64)] {
        self.evidence.growth()
    }

    pub fn derived(&self) -> &Derived {
        &self.derived
    }

    /// The quiescence recipe's phase (`idle`, `loaded`, `settling`, `stuck`), for /status.
    pub fn load_phase(&self) -> &'static str {
        self.quiescence.phase_name()
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fleet_tests;
