//! Goroutine evidence on verdicts: which stacks grew (a task-growth verdict, the seed's pprof step) and
//! how long the connection goroutines have been blocked (a server's idle-connection verdict: Go prints
//! `[select, 12 minutes]`). The analysis says what it wants ([`wanted`]); the collector reads the profiles
//! into the snapshot ([`crate::sample::GoroutineReading`]); the analysis attaches them here. A recording
//! carries the readings, so `replay` attaches what `watch` attached.
use crate::{
    sample::{AgeReading, EvidenceWanted, GoroutineReading, StackGrowth},
    verdict::{Scope, Verdict, VerdictChange, VerdictKind},
};

/// The server-side idle-connection verdict (from the ledger), as opposed to the agent's (from sockets).
fn is_ledger_idle(v: &Verdict) -> bool {
    v.kind == VerdictKind::IdleConnectionLeak && v.scope == Scope::LedgerIdle
}

/// The readings last taken in this incarnation of the target.
#[derive(Clone, Debug, Default)]
pub struct GoroutineEvidence {
    growth: Option<StackGrowth>,
    ages: Option<AgeReading>,
}

impl GoroutineEvidence {
    /// What to read after a tick whose changes are `changes`, with `active` the verdicts active now.
    /// `horizon_s` is the idle horizon: Go rounds ages down to whole minutes, so only goroutines blocked
    /// `ceil(horizon / 60)` minutes or more are certainly past it.
    pub fn wanted(
        &self,
        changes: &[VerdictChange],
        active: &[Verdict],
        horizon_s: f64,
    ) -> EvidenceWanted {
        let raised = |want: &dyn Fn(&Verdict) -> bool| {
            changes
                .iter()
                .any(|c| matches!(c, VerdictChange::Raised(v) if want(v)))
        };
        let unconfirmed =
            self.ages.as_ref().is_some_and(|a| !a.confirmed()) && active.iter().any(is_ledger_idle);
        EvidenceWanted {
            stacks: raised(&|v| v.kind == VerdictKind::TaskGrowth),
            ages_min_minutes: (raised(&is_ledger_idle) || unconfirmed)
                .then(|| (horizon_s / 60.0).ceil().max(0.0) as u64),
            new_baseline: false,
        }
    }

    /// Keeps what `reading` holds and puts it into the verdicts raised by this tick.
    pub fn take(&mut self, reading: &GoroutineReading, changes: &mut [VerdictChange]) {
        if let Some(g) = &reading.growth {
            self.growth = Some(g.clone());
        }
        if let Some(a) = &reading.ages {
            self.ages = Some(a.clone());
        }
        for c in changes.iter_mut() {
            if let VerdictChange::Raised(v) = c {
                self.attach(v);
            }
        }
    }

    /// Puts the evidence into `v` if it is of a kind the evidence speaks for. The readings stay part of a
    /// verdict while it is active (the rules re-derive verdicts every tick and know nothing of profiles).
    pub fn attach(&self, v: &mut Verdict) {
        if v.kind == VerdictKind::TaskGrowth {
            if let Some(g) = &self.growth {
                attach_stacks(v, g);
            }
        } else if is_ledger_idle(v) {
            if let Some(a) = &self.ages {
                attach_blocked(v, a);
            }
        }
    }

    /// The stacks that grew most, for /status.
    pub fn growth(&self) -> &[(String, i64)] {
        self.growth.as_ref().map_or(&[], |g| &g.top)
    }
}

/// Puts the goroutine-age evidence into an idle-connection verdict: the connection goroutines Go reports
/// blocked for longer than the horizon confirm it. A dump that shows none does not clear it: the
/// connections left behind first may simply not be old enough yet, so it is looked at again while the
/// verdict holds, and the verdict says what the last look found, or why there was no look (a dump skipped
/// because it would stall the target, or refused, or cut short).
fn attach_blocked(v: &mut Verdict, r: &AgeReading) {
    if v.evidence.contains_key("pprof.dump_min_minutes") {
        return;
    }
    v.evidence
        .insert("pprof.dump_min_minutes".into(), r.min_minutes as f64);
    if !r.read {
        v.explanation += &format!(
            "; not confirmed by the goroutine dump: {}",
            r.note.as_deref().unwrap_or("no dump")
        );
        return;
    }
    v.evidence.insert(
        "pprof.connection_goroutines_blocked_beyond_horizon".into(),
        r.total as f64,
    );
    for (stack, n) in r.per_stack.iter().take(3) {
        v.evidence
            .insert(format!("pprof.blocked_beyond_horizon[{stack}]"), *n as f64);
    }
    v.explanation += &match r.per_stack.first() {
        Some((stack, _)) => format!(
            "; confirmed by the goroutine dump: {} connection goroutines blocked for {}+ minutes (most: {stack})",
            r.total, r.min_minutes
        ),
        None => format!(
            "; not yet confirmed by the goroutine dump: no connection goroutine blocked for {}+ minutes so far",
            r.min_minutes
        ),
    };
    if let Some(note) = &r.note {
        v.explanation += &format!(" ({note})");
    }
}

/// Puts the goroutine stacks that grew (most grown first) into a task-growth verdict, or why they could
/// not be read.
fn attach_stacks(v: &mut Verdict, g: &StackGrowth) {
    for (stack, grown) in &g.top {
        v.evidence
            .insert(format!("pprof.goroutines_grown[{stack}]"), *grown as f64);
    }
    if let Some((stack, grown)) = g.top.first() {
        let said = format!("; most grown stack: {stack} (+{grown})");
        if !v.explanation.contains(&said) {
            v.explanation += &said;
        }
    } else if let Some(note) = &g.note {
        if !v.explanation.contains(note.as_str()) {
            v.explanation += &format!("; {note}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::verdict::Severity;

    fn verdict(kind: VerdictKind, scope: Scope) -> Verdict {
        Verdict {
            kind,
            scope,
            severity: Severity::Warning,
            since: 0.0,
            subject: "s".into(),
            evidence: BTreeMap::new(),
            explanation: "e".into(),
        }
    }

    #[test]
    fn raised_verdicts_ask_for_their_evidence_and_get_it() {
        let mut ev = GoroutineEvidence::default();
        let tasks = verdict(VerdictKind::TaskGrowth, Scope::Tasks);
        let idle = verdict(VerdictKind::IdleConnectionLeak, Scope::LedgerIdle);
        let agent_idle = verdict(VerdictKind::IdleConnectionLeak, Scope::SocketIdle);
        let mut changes = vec![
            VerdictChange::Raised(tasks.clone()),
            VerdictChange::Raised(idle.clone()),
            VerdictChange::Raised(agent_idle.clone()),
        ];
        let want = ev.wanted(&changes, &[], 105.0);
        assert_eq!(
            want,
            EvidenceWanted {
                stacks: true,
                ages_min_minutes: Some(2),
                new_baseline: false,
            }
        );
        let reading = GoroutineReading {
            growth: Some(StackGrowth {
                top: vec![("pipe <- conn".into(), 40)],
                note: None,
            }),
            ages: Some(AgeReading {
                min_minutes: 2,
                read: false,
                note: Some("skipped".into()),
                ..AgeReading::default()
            }),
        };
        ev.take(&reading, &mut changes);
        let VerdictChange::Raised(t) = &changes[0] else {
            unreachable!()
        };
        assert_eq!(t.evidence["pprof.goroutines_grown[pipe <- conn]"], 40.0);
        let VerdictChange::Raised(i) = &changes[1] else {
            unreachable!()
        };
        assert!(
            i.explanation
                .contains("not confirmed by the goroutine dump: skipped")
        );
        let VerdictChange::Raised(a) = &changes[2] else {
            unreachable!()
        };
        assert_eq!(
            a, &agent_idle,
            "the agent's idle verdict has no goroutine dump to speak for it"
        );
        // Unconfirmed and still active: asked again (the profiler decides when); nothing raised, nothing else.
        let again = ev.wanted(&[], &[idle], 105.0);
        assert_eq!(
            again,
            EvidenceWanted {
                stacks: false,
                ages_min_minutes: Some(2),
                new_baseline: false,
            }
        );
        assert_eq!(ev.wanted(&[], &[tasks], 105.0), EvidenceWanted::default());
    }
}
