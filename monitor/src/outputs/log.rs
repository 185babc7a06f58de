//! Verdict changes as log lines: one line each, with the evidence as structured fields.
use tracing::{info, warn};

use crate::verdict::{Severity, VerdictChange};

pub fn log_change(change: &VerdictChange) {
    match change {
        VerdictChange::Raised(v) => {
            let evidence = serde_json::to_string(&v.evidence).unwrap_or_default();
            if v.severity == Severity::Critical {
                warn!(kind = v.kind.as_str(), severity = "critical", subject = %v.subject, since = v.since, %evidence, "LEAK: {}", v.explanation);
            } else {
                warn!(kind = v.kind.as_str(), severity = "warning", subject = %v.subject, since = v.since, %evidence, "leak suspected: {}", v.explanation);
            }
        }
        VerdictChange::Escalated(v) => {
            let evidence = serde_json::to_string(&v.evidence).unwrap_or_default();
            warn!(kind = v.kind.as_str(), severity = v.severity.as_str(), subject = %v.subject, %evidence, "escalated to {}: {}", v.severity.as_str(), v.explanation);
        }
        VerdictChange::Cleared { kind, subject, at } => {
            info!(kind = kind.as_str(), %subject, at, "cleared");
        }
        VerdictChange::TargetRestarted {
            at,
            old_pid,
            new_pid,
        } => {
            info!(
                at,
                old_pid, new_pid, "target restarted: baselines reset, not read as a leak"
            );
        }
    }
}
