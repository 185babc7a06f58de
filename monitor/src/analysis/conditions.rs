//! Turns instantaneous findings into verdicts: a finding must persist for its minimum duration before it
//! is raised, and must be absent for a few ticks before it clears, so one odd sample neither pages anyone
//! nor silences a real leak.
use std::collections::BTreeMap;

use crate::verdict::{Scope, Verdict, VerdictChange, VerdictKind};

/// What a rule sees right now.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub verdict: Verdict,
    /// How long the condition must hold before it becomes a verdict.
    pub min_duration: f64,
    /// For growth rules: the level before the growth began. A leak that stops growing is still a leak
    /// until its level comes back, so a raised verdict holds while the level stays above this.
    pub baseline: Option<f64>,
}

#[derive(Debug)]
struct Condition {
    since: f64,
    raised: bool,
    absent_ticks: u32,
    /// When the finding was last present (or held).
    last_present: f64,
    /// The level before the growth, from the first finding of the episode.
    baseline: Option<f64>,
    latest: Verdict,
}

/// How a raised condition whose rule no longer fires is judged: still held (its level has not come
/// back to `baseline`), or gone.
pub trait HoldCheck {
    /// The current level of what `scope` measures and how much above the baseline still counts as held.
    fn level(&self, scope: Scope) -> Option<(f64, f64)>;
}

#[derive(Debug, Default)]
pub struct Conditions {
    by_key: BTreeMap<(VerdictKind, Scope), Condition>,
}

impl Conditions {
    /// Feeds this tick's findings. A raised verdict clears only once its finding has been absent for
    /// `clear_after_ticks` ticks AND `clear_after_s` seconds, and its level (see [`HoldCheck`]) is back:
    /// one quiet sample or a pause in the growth must not end an episode that a re-raise would start
    /// again. Severity only escalates within an episode.
    pub fn update(
        &mut self,
        t: f64,
        findings: Vec<Finding>,
        clear_after_ticks: u32,
        clear_after_s: f64,
        hold: &dyn HoldCheck,
    ) -> Vec<VerdictChange> {
        let mut changes = Vec::new();
        let mut seen = Vec::new();
        for f in findings {
            let key = (f.verdict.kind, f.verdict.scope);
            seen.push(key);
            let c = self.by_key.entry(key).or_insert_with(|| Condition {
                since: t,
                raised: false,
                absent_ticks: 0,
                last_present: t,
                baseline: f.baseline,
                latest: f.verdict.clone(),
            });
            c.absent_ticks = 0;
            c.last_present = t;
            let escalated = c.raised && f.verdict.severity > c.latest.severity;
            let severity = f.verdict.severity.max(if c.raised {
                c.latest.severity
            } else {
                f.verdict.severity
            });
            c.latest = Verdict {
                since: c.since,
                severity,
                ..f.verdict
            };
            if !c.raised && t - c.since >= f.min_duration {
                c.raised = true;
                changes.push(VerdictChange::Raised(c.latest.clone()));
            } else if escalated {
                changes.push(VerdictChange::Escalated(c.latest.clone()));
            }
        }
        let mut gone = Vec::new();
        for (key, c) in self.by_key.iter_mut() {
            if seen.contains(key) {
                continue;
            }
            // A condition that never became a verdict is forgotten at once: its clock must restart.
            if !c.raised {
                gone.push(*key);
                continue;
            }
            let held = match (c.baseline, hold.level(key.1)) {
                (Some(base), Some((level, tolerance))) => level > base + tolerance,
                _ => false,
            };
            if held {
                c.last_present = t;
                c.absent_ticks = 0;
                continue;
            }
            c.absent_ticks += 1;
            if c.absent_ticks >= clear_after_ticks && t - c.last_present >= clear_after_s {
                gone.push(*key);
            }
        }
        for key in gone {
            if let Some(c) = self.by_key.remove(&key) {
                if c.raised {
                    changes.push(VerdictChange::Cleared {
                        kind: key.0,
                        subject: c.latest.subject,
                        at: t,
                        reason: None,
                    });
                }
            }
        }
        changes
    }

    /// Clears everything (target restart), reporting the verdicts that were active.
    pub fn reset(&mut self, t: f64) -> Vec<VerdictChange> {
        let changes = self
            .by_key
            .iter()
            .filter(|(_, c)| c.raised)
            .map(|((kind, _), c)| VerdictChange::Cleared {
                kind: *kind,
                subject: c.latest.subject.clone(),
                at: t,
                reason: Some("the target restarted".into()),
            })
            .collect();
        self.by_key.clear();
        changes
    }

    /// Drops at once every condition whose evidence went silent (`silent` says why, per scope): numbers
    /// nobody can see any more hold nothing, and a raised one is cleared saying so rather than left
    /// standing on the last value a dead source gave.
    pub fn expire(
        &mut self,
        t: f64,
        silent: &dyn Fn(Scope) -> Option<String>,
    ) -> Vec<VerdictChange> {
        let mut changes = Vec::new();
        self.by_key.retain(|(kind, scope), c| {
            let Some(why) = silent(*scope) else {
                return true;
            };
            if c.raised {
                changes.push(VerdictChange::Cleared {
                    kind: *kind,
                    subject: c.latest.subject.clone(),
                    at: t,
                    reason: Some(why),
                });
            }
            false
        });
        changes
    }

    pub fn active(&self) -> Vec<Verdict> {
        self.by_key
            .values()
            .filter(|c| c.raised)
            .map(|c| c.latest.clone())
            .collect()
    }

    /// Kinds whose condition holds now, raised or not yet (for correlated rules).
    pub fn holding(&self, kind: VerdictKind) -> bool {
        self.by_key
            .iter()
            .any(|((k, _), c)| *k == kind && c.absent_ticks == 0)
    }
}
