//! `leakwatch check`: watch for a fixed time, then exit 0 (no leak) or 1 (with a report).
use std::{ops::ControlFlow, process::ExitCode};

use anyhow::Result;
use tokio::time::Instant;

use super::Prepared;
use crate::{
    args::CheckArgs,
    engine::{EXIT_INCONCLUSIVE, Engine, RunStats},
    outputs::http,
    verdict::{Raised, Verdict},
};

pub async fn run(args: CheckArgs, prepared: Prepared) -> Result<ExitCode> {
    let listeners = prepared.cfg.listeners.clone();
    let metrics = prepared.cfg.metrics_url.is_some();
    let mut engine = Engine::build(prepared)?;
    if args.serve {
        http::serve(&listeners, engine.shared.clone()).await?;
    }
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    eprintln!(
        "leakwatch check: watching for {:?} (mode {})",
        args.duration,
        crate::engine::mode_name(engine.collector.mode())
    );
    let end = Instant::now() + args.duration;
    let stop = async {
        tokio::select! {
            _ = tokio::time::sleep_until(end) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    engine.run_until(stop, |_| ControlFlow::Continue(())).await;
    let (cpu_s, peak_rss) = crate::system::own_usage().unwrap_or((f64::NAN, 0));
    let unjudged = engine
        .stats
        .unjudged(&engine.collector.describe_target(), metrics);
    let report = Report {
        unjudged,
        leakwatch_cpu_percent: cpu_s / args.duration.as_secs_f64().max(1e-3) * 100.0,
        leakwatch_peak_rss_mib: peak_rss as f64 / 1048576.0,
        started_unix,
        mode: crate::engine::mode_name(engine.collector.mode()),
        verdicts: engine.raised.clone(),
        active_at_end: engine.active(),
        run: engine.stats.clone(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    if !report.verdicts.is_empty() {
        return Ok(ExitCode::from(1));
    }
    // No verdict means "no leak" only if the run looked at what it judges.
    if let Some(why) = &report.unjudged {
        // The text report says it already; a JSON report gets the one line on stderr too.
        if args.json {
            eprintln!("leakwatch check: inconclusive: {why}");
        }
        return Ok(ExitCode::from(EXIT_INCONCLUSIVE));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize)]
struct Report {
    /// leakwatch's own cost over the check: CPU as % of one core, and peak resident memory.
    leakwatch_cpu_percent: f64,
    leakwatch_peak_rss_mib: f64,
    started_unix: f64,
    mode: String,
    verdicts: Vec<Raised>,
    active_at_end: Vec<Verdict>,
    /// Ticks, scrapes and target restarts seen: what the verdicts (or their absence) rest on.
    run: RunStats,
    /// Set when the run could not judge (target never sampled, metrics never read): no verdict then
    /// is no evidence of health.
    unjudged: Option<String>,
}

impl Report {
    fn cost_line(&self) -> String {
        format!(
            "seen: {} ticks, {} scrapes ok, {} failed, {} target restarts\nleakwatch's own cost: {:.2}% of one core, peak RSS {:.1} MiB\n",
            self.run.ticks,
            self.run.scrapes_ok,
            self.run.scrapes_failed,
            self.run.target_restarts,
            self.leakwatch_cpu_percent,
            self.leakwatch_peak_rss_mib
        )
    }

    fn render(&self) -> String {
        if self.verdicts.is_empty() {
            let head = match &self.unjudged {
                Some(why) => format!("leakwatch check: inconclusive: {why}"),
                None => "leakwatch check: no leak found".into(),
            };
            return format!("{head}\n{}", self.cost_line());
        }
        let mut out = format!(
            "leakwatch check: {} verdict(s) raised\n",
            self.verdicts.len()
        );
        for r in &self.verdicts {
            let v = &r.verdict;
            out += &format!(
                "- [{}] {} raised at t={:.0}s (condition since t={:.0}s) {}: {}\n",
                v.severity.as_str(),
                v.kind.as_str(),
                r.raised_t,
                v.since,
                v.subject,
                v.explanation
            );
            for (k, val) in &v.evidence {
                out += &format!("    {k} = {val}\n");
            }
        }
        out += &format!("still active at the end: {}\n", self.active_at_end.len());
        out += &self.cost_line();
        out
    }
}
