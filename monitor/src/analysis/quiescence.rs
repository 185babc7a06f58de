//! The fix's verification recipe, run continuously: remember the levels before a burst of load, notice when
//! the load ends, and after a settle time check that tasks, fds, CLOSE_WAIT sockets and heap came back to
//! where they were. A level that stays up after the load is gone is held by nothing legitimate, except
//! connections still open: a watch, an exec session or `logs -f` is load that has not ended, and a
//! pooled connection is the idle rule's to judge, row by row. So each connection open beyond the
//! baseline's allows its tasks and its socket, and tolerances grow with the process: a Rancher with
//! thousands of goroutines moves by more than a handful on its own.
use std::collections::BTreeMap;

use super::{AnalysisConfig, conditions::Finding, signals::Signals};
use crate::verdict::{Scope, Severity, Verdict, VerdictKind};

/// The levels the recipe compares, each the median of the last few seconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Levels {
    pub app_live: Option<f64>,
    /// Kernel connections that back tunneled ones (callers on a server, targets on an agent).
    pub kernel_conn: Option<f64>,
    pub tasks: Option<f64>,
    pub fds: Option<f64>,
    pub close_wait: Option<f64>,
    pub heap: Option<f64>,
}

impl Levels {
    /// Each level, read from its series by `read`: the set of levels is defined here once.
    fn each(s: &Signals, read: impl Fn(&super::series::Series) -> Option<f64>) -> Self {
        Self {
            app_live: read(&s.app_live),
            kernel_conn: read(&s.kernel_conn),
            tasks: read(&s.tasks),
            fds: read(&s.fds),
            close_wait: read(&s.close_wait),
            heap: read(&s.heap),
        }
    }

    /// Medians over `[now - secs, now]`: one odd sample does not move a baseline.
    pub fn measure(s: &Signals, now: f64, secs: f64) -> Self {
        Self::each(s, |series| series.median_between(now - secs, now))
    }

    /// The latest value of each level, if taken within `max_age` seconds of `now`: a one-tick gap (a
    /// failed scrape) does not blank a level.
    pub fn latest(s: &Signals, now: f64, max_age: f64) -> Self {
        Self::each(s, |series| series.last_fresh(now, max_age))
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Phase {
    /// No load: the baseline follows the levels.
    Idle,
    /// Load is running; `baseline` was measured just before it began.
    Loaded { began: f64 },
    /// Load ended at `ended`; levels have until `ended + effective_settle_s` to come back.
    Settling { ended: f64 },
    /// The settle time passed and some level did not come back; checked again every tick.
    Stuck { ended: f64 },
}

#[derive(Clone, Debug)]
pub struct Quiescence {
    phase: Phase,
    baseline: Option<Levels>,
    /// Last time the open rate was above the burst threshold.
    last_busy: Option<f64>,
}

impl Default for Quiescence {
    fn default() -> Self {
        Self {
            phase: Phase::Idle,
            baseline: None,
            last_busy: None,
        }
    }
}

/// One level after the load compared with its pre-load baseline. Shared by the continuous check here and
/// by `leakwatch verify`.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub name: &'static str,
    pub baseline: Option<f64>,
    pub now: Option<f64>,
    /// How far above the baseline the level may stay.
    pub tolerance: Option<f64>,
}

impl Comparison {
    /// The level it has to come back under.
    pub fn limit(&self) -> Option<f64> {
        Some(self.baseline? + self.tolerance?)
    }

    /// `Some(true)` when the level stayed above its limit; `None` when either side is unknown.
    pub fn exceeded(&self) -> Option<bool> {
        Some(self.now? > self.limit()?)
    }
}

/// The heap tolerated over a baseline: a fraction of it, but never less than half the heap growth the
/// heap rule ignores (small heaps move by whole MiB on their own).
pub fn heap_tolerance(baseline: f64, cfg: &AnalysisConfig) -> f64 {
    (baseline * cfg.settle_heap_tolerance_ratio).max(cfg.heap_min_growth_bytes / 2.0)
}

/// Who compares the levels: the recipe run continuously, which allows what connections still open
/// hold, or `verify`, which drove the load itself and wants every level back as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judge {
    Continuous,
    Verify,
}

/// How far a level rose over its baseline; 0 where either side is unknown.
fn rise(base: Option<f64>, now: Option<f64>) -> f64 {
    match (base, now) {
        (Some(b), Some(n)) => (n - b).max(0.0),
        _ => 0.0,
    }
}

/// Every level compared with its baseline, with the tolerances of `cfg`. [`Judge::Continuous`]: each
/// connection still open beyond the baseline's (the ledger's or the kernel's, whichever grew more)
/// allows its tasks, each kernel one its socket, tolerances are relative to the process's size too, and
/// the ledger is not compared (the idle rule judges each row's old connections). [`Judge::Verify`]:
/// levels must come back as they were.
pub fn compare(base: &Levels, now: &Levels, cfg: &AnalysisConfig, judge: Judge) -> [Comparison; 5] {
    let c = |name, baseline, now, tolerance| Comparison {
        name,
        baseline,
        now,
        tolerance,
    };
    let continuous = judge == Judge::Continuous;
    let (open, kernel_open) = if continuous {
        let kernel = rise(base.kernel_conn, now.kernel_conn);
        (rise(base.app_live, now.app_live).max(kernel), kernel)
    } else {
        (0.0, 0.0)
    };
    let relative = |abs: f64, level: Option<f64>| match (continuous, level) {
        (true, Some(l)) => abs.max(cfg.settle_rel_tolerance * l),
        _ => abs,
    };
    [
        c(
            "app.live_connections",
            base.app_live,
            now.app_live,
            (!continuous).then_some(cfg.settle_tasks_tolerance),
        ),
        c(
            "tasks",
            base.tasks,
            now.tasks,
            Some(
                relative(cfg.settle_tasks_tolerance, base.tasks) + cfg.tasks_per_connection * open,
            ),
        ),
        c(
            "procfs.open_fds",
            base.fds,
            now.fds,
            Some(relative(cfg.settle_fds_tolerance, base.fds) + kernel_open),
        ),
        c(
            "kernel.close_wait_sockets",
            base.close_wait,
            now.close_wait,
            Some(cfg.settle_fds_tolerance),
        ),
        c(
            "app.heap_inuse_bytes",
            base.heap,
            now.heap,
            base.heap.map(|b| heap_tolerance(b, cfg)),
        ),
    ]
}

/// One level that did not return: (name, baseline, now, tolerance).
type Excess = (&'static str, f64, f64, f64);

fn excesses(base: &Levels, now: &Levels, cfg: &AnalysisConfig) -> Vec<Excess> {
    compare(base, now, cfg, Judge::Continuous)
        .into_iter()
        .filter(|c| c.exceeded() == Some(true))
        .filter_map(|c| Some((c.name, c.baseline?, c.now?, c.tolerance?)))
        .collect()
}

impl Quiescence {
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Idle => "idle",
            Phase::Loaded { .. } => "loaded",
            Phase::Settling { .. } => "settling",
            Phase::Stuck { .. } => "stuck",
        }
    }

    /// Advances the state machine to `t` and returns a finding while levels stay above their pre-load
    /// baseline past the settle time.
    pub fn update(&mut self, s: &Signals, cfg: &AnalysisConfig, t: f64) -> Option<Finding> {
        let busy = s
            .open_rate(t, cfg.quiet_s.max(2.0))
            .is_some_and(|r| r > cfg.burst_rate);
        if busy {
            self.last_busy = Some(t);
        }
        let quiet_for = self.last_busy.map(|b| t - b).unwrap_or(f64::INFINITY);
        match self.phase.clone() {
            Phase::Idle => {
                if s.starting {
                    // Levels still rising with the start-up are no "before" to return to.
                    self.baseline = None;
                }
                if busy {
                    // The baseline is what was measured while idle, before the rate crossed the threshold.
                    self.phase = Phase::Loaded { began: t };
                } else if s.tasks.span(t) >= cfg.quiet_s && !s.starting {
                    self.baseline = Some(Levels::measure(s, t, cfg.quiet_s));
                }
                None
            }
            Phase::Loaded { .. } => {
                if quiet_for >= cfg.quiet_s {
                    self.phase = Phase::Settling {
                        ended: t - quiet_for,
                    };
                }
                None
            }
            Phase::Settling { ended } | Phase::Stuck { ended } => {
                if busy {
                    self.phase = Phase::Loaded { began: t };
                    return None;
                }
                if t - ended < cfg.effective_settle_s() {
                    return None;
                }
                let Some(base) = self.baseline.clone() else {
                    // Load was running when the watch began: there is no "before" to return to. The levels
                    // after this quiet period become the baseline for the next burst.
                    self.phase = Phase::Idle;
                    return None;
                };
                let now = Levels::measure(s, t, cfg.quiet_s);
                let over = excesses(&base, &now, cfg);
                if over.is_empty() {
                    self.phase = Phase::Idle;
                    return None;
                }
                self.phase = Phase::Stuck { ended };
                Some(self.finding(&over, t - ended))
            }
        }
    }

    fn finding(&self, over: &[Excess], settled_for: f64) -> Finding {
        let mut evidence = BTreeMap::new();
        for (name, b, n, _) in over {
            evidence.insert(format!("{name}.baseline"), *b);
            evidence.insert(format!("{name}.now"), *n);
        }
        evidence.insert("quiescence.seconds_since_load_ended".into(), settled_for);
        let what: Vec<String> = over
            .iter()
            .map(|(name, b, n, tol)| format!("{name} {b:.0} -> {n:.0} (tolerance +{tol:.0})"))
            .collect();
        let severity = if over
            .iter()
            .any(|(n, ..)| *n == "app.live_connections" || *n == "tasks")
        {
            Severity::Critical
        } else {
            Severity::Warning
        };
        Finding {
            verdict: Verdict {
                kind: VerdictKind::QuiescenceFailure,
                scope: Scope::Recipe,
                severity,
                since: 0.0,
                // What did not return; the numbers are in the evidence.
                subject: over
                    .iter()
                    .map(|(name, ..)| *name)
                    .collect::<Vec<_>>()
                    .join(", "),
                evidence,
                explanation: format!(
                    "load ended {settled_for:.0}s ago but levels did not return to their pre-load baseline: {}",
                    what.join(", ")
                ),
            },
            // The settle time already elapsed: no further waiting.
            min_duration: 0.0,
            baseline: None,
        }
    }
}
