//! `leakwatch replay`: runs a recording (`--record`) through the analysis again, offline. For tuning
//! thresholds on a real night's data, and for explaining after the fact why a verdict fired.
use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::{
    analysis::{AnalysisConfig, Analyzer, Side},
    args::{ReplayArgs, SideArg},
    outputs::{history::History, page, record::read_recording},
    verdict::{Raised, VerdictChange},
};

/// Ticks a replay report holds at most (about 15 MiB): a day at one a second. Longer recordings are
/// reported over their last day.
const REPORT_MAX_TICKS: usize = 86_400;

/// Only the [analysis] table of a sidecar config file matters here; other keys are ignored.
#[derive(serde::Deserialize)]
struct ReplayFile {
    #[serde(default)]
    analysis: AnalysisConfig,
}

pub fn run(args: ReplayArgs) -> Result<ExitCode> {
    let mut cfg = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str::<ReplayFile>(&text)
                .with_context(|| format!("invalid config file {}", p.display()))?
                .analysis
        }
        None => AnalysisConfig::default(),
    };
    cfg.side = match args.side {
        SideArg::Server => Side::Server,
        SideArg::Agent => Side::Agent,
        SideArg::Auto => cfg.side,
    };
    let snaps = read_recording(&args.recording)?;
    let side = cfg.side;
    let mut analyzer = Analyzer::new(cfg);
    let mut history = args
        .report
        .as_ref()
        .map(|_| History::with_capacity(snaps.len().min(REPORT_MAX_TICKS)));
    let mut all_raised = Vec::new();
    let mut raised = 0;
    for s in &snaps {
        let changes = analyzer.replay(s);
        if let Some(h) = &mut history {
            h.record(s, analyzer.derived(), analyzer.load_phase(), side, &changes);
        }
        for change in changes {
            if let VerdictChange::Raised(v) = &change {
                raised += 1;
                if history.is_some() {
                    all_raised.push(Raised {
                        verdict: v.clone(),
                        raised_t: s.t,
                        raised_unix: s.unix,
                    });
                }
            }
            if args.json {
                println!("{}", serde_json::to_string(&change)?);
            } else {
                println!("{}", describe(s.t, &change));
            }
        }
    }
    if let (Some(path), Some(history)) = (&args.report, &history) {
        let mode = if snaps.iter().any(|s| s.kernel.is_some()) {
            "ebpf"
        } else {
            "procfs-only"
        };
        let report = page::Report {
            title: format!("leakwatch replay: {}", args.recording.display()),
            target: args.recording.display().to_string(),
            mode: mode.into(),
            side: Some(side),
            passed: None,
            summary: vec![format!(
                "{} snapshots replayed ({} charted), {raised} verdict(s) raised",
                snaps.len(),
                history.ticks().len()
            )],
            raised: all_raised,
            active_at_end: analyzer.active(),
            ..page::Report::default()
        };
        std::fs::write(path, page::report_page(&report, history))
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
        eprintln!("replay: report written to {}", path.display());
    }
    eprintln!(
        "replay: {} snapshots, {raised} verdict(s) raised, {} active at the end",
        snaps.len(),
        analyzer.active().len()
    );
    Ok(if raised == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn describe(t: f64, change: &VerdictChange) -> String {
    match change {
        VerdictChange::Raised(v) => format!(
            "t={t:>7.1}s RAISED  {} [{}] since t={:.1}s {}: {}",
            v.kind.as_str(),
            v.severity.as_str(),
            v.since,
            v.subject,
            v.explanation
        ),
        VerdictChange::Escalated(v) => format!(
            "t={t:>7.1}s ESCALATED {} to {} {}",
            v.kind.as_str(),
            v.severity.as_str(),
            v.subject
        ),
        VerdictChange::Cleared { kind, subject, .. } => {
            format!("t={t:>7.1}s cleared {} {subject}", kind.as_str())
        }
        VerdictChange::TargetRestarted {
            old_pid, new_pid, ..
        } => {
            format!("t={t:>7.1}s target restarted (pid {old_pid} -> {new_pid}); baselines reset")
        }
    }
}
