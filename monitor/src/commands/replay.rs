//! `leakwatch replay`: runs a recording (`--record`) through the analysis again, offline. For tuning
//! thresholds on a real night's data, and for explaining after the fact why a verdict fired.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::Args;

use crate::{
    analysis::{AnalysisConfig, Analyzer, Side},
    config::SideArg,
    outputs::record::read_recording,
    verdict::VerdictChange,
};

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// A recording written by `watch --record` / `check --record` (one JSON snapshot per line).
    pub recording: PathBuf,
    /// TOML file with an [analysis] table of thresholds to try (same keys as the sidecar's config file).
    #[arg(long, value_parser = crate::cli::existing_file)]
    pub config: Option<PathBuf>,
    /// Which side of the tunnel was recorded.
    #[arg(long, value_enum, default_value = "auto")]
    pub side: SideArg,
    /// Print the verdict changes as JSON lines.
    #[arg(long)]
    pub json: bool,
}

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
    let mut analyzer = Analyzer::new(cfg);
    let mut raised = 0;
    for s in &snaps {
        for change in analyzer.observe(s) {
            if matches!(change, VerdictChange::Raised(_)) {
                raised += 1;
            }
            if args.json {
                println!("{}", serde_json::to_string(&change)?);
            } else {
                println!("{}", describe(s.t, &change));
            }
        }
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
