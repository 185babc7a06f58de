//! Verdict changes as log lines: one line each, with the evidence as structured fields.
use tracing::{info, warn};

use crate::verdict::{Severity, VerdictChange};

/// A watch-relative time (seconds since the watch began) as a wall-clock timestamp: on-call engineers
/// correlate logs by time, not by how long a sidecar has been up.
fn timestamp(t: f64, unix_offset: f64) -> String {
    let unix = (t + unix_offset).max(0.0);
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(unix),
    )
    .to_string()
}

/// Logs one verdict change; `unix_offset` turns the watch-relative times into Unix time.
pub fn log_change(change: &VerdictChange, unix_offset: f64) {
    match change {
        VerdictChange::Raised(v) => {
            let evidence = serde_json::to_string(&v.evidence).unwrap_or_default();
            let since = timestamp(v.since, unix_offset);
            if v.severity == Severity::Critical {
                warn!(kind = v.kind.as_str(), severity = "critical", subject = %v.subject, %since, %evidence, "LEAK: {}", v.explanation);
            } else {
                warn!(kind = v.kind.as_str(), severity = "warning", subject = %v.subject, %since, %evidence, "leak suspected: {}", v.explanation);
            }
        }
        VerdictChange::Escalated(v) => {
            let evidence = serde_json::to_string(&v.evidence).unwrap_or_default();
            warn!(kind = v.kind.as_str(), severity = v.severity.as_str(), subject = %v.subject, %evidence, "escalated to {}: {}", v.severity.as_str(), v.explanation);
        }
        VerdictChange::Cleared {
            kind,
            subject,
            at,
            reason,
        } => {
            let at = timestamp(*at, unix_offset);
            match reason {
                Some(why) => info!(kind = kind.as_str(), %subject, %at, "cleared: {why}"),
                None => info!(kind = kind.as_str(), %subject, %at, "cleared"),
            }
        }
        VerdictChange::TargetRestarted {
            at,
            old_pid,
            new_pid,
        } => {
            let at = timestamp(*at, unix_offset);
            info!(
                %at,
                old_pid, new_pid, "target restarted: baselines reset, not read as a leak"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn watch_relative_times_are_logged_as_wall_clock() {
        assert_eq!(super::timestamp(10.0, 1.7e9), "2023-11-14T22:13:30Z");
    }
}
