//! `leakwatch verify`: the recipe that verified the remotedialer leak fix, automated. Measure a baseline,
//! drive many requests through the tunnel, then check that the add/remove ledger converges, and that
//! tasks, fds, heap and CLOSE_WAIT sockets return to baseline within a settle time.
use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Args;
use monitor_ebpf::tcp_state::CLOSE_WAIT;
use serde::Serialize;
use tokio::{sync::Semaphore, time::Instant};

use super::{Prepared, watch::build_engine};
use crate::{
    cli::parse_duration,
    config::SidecarArgs,
    engine::Engine,
    sample::{ScrapeOutcome, Snapshot},
};

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub sidecar: SidecarArgs,
    /// URL to request through the tunnel (e.g. the tunnel server's proxy path to a downstream API).
    #[arg(long)]
    pub load_url: String,
    /// Number of requests to drive.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub requests: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub concurrency: u64,
    /// How long to measure the baseline before the load.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub baseline: Duration,
    /// How long the tunnel may take to return to baseline after the load. Default: the idle horizon
    /// (`--idle-timeout`, 90s, plus a 15s margin), because a healthy keep-alive transport holds its idle
    /// tunneled connections, and their goroutines and memory, for up to its idle timeout after the load.
    #[arg(long, value_parser = parse_duration)]
    pub settle: Option<Duration>,
    /// Upper bound on the load phase; requests still running then count as failed and the criteria are
    /// judged as they stand.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub max_load_time: Duration,
    /// Timeout of each request of the load.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Fail unless at least this fraction of the requests succeeded: a recipe whose load never went
    /// through the tunnel proves nothing.
    #[arg(long, default_value_t = 0.9)]
    pub min_success_ratio: f64,
    /// Extra tasks/goroutines, fds and CLOSE_WAIT sockets tolerated over the baseline.
    #[arg(long, default_value_t = 5.0)]
    pub tolerance: f64,
    /// Extra heap tolerated over the baseline, as a fraction (0.25 = 25%), on top of 2 MiB.
    #[arg(long, default_value_t = 0.25)]
    pub heap_tolerance: f64,
    #[arg(long)]
    pub json: bool,
    /// Also write the run as one self-contained HTML file: charts over time with the baseline, load and
    /// settle window shaded, verdicts and each criterion marked.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

/// The numbers the recipe compares, at one instant.
#[derive(Clone, Debug, Default, Serialize)]
struct Levels {
    added: Option<f64>,
    removed: Option<f64>,
    tasks: Option<f64>,
    fds: Option<f64>,
    heap: Option<f64>,
    close_wait: Option<f64>,
}

fn levels(s: &Snapshot) -> Levels {
    let mut l = Levels::default();
    if let ScrapeOutcome::Ok(app) = &s.app {
        if app.remotedialer_present {
            l.added = Some(app.ledger.iter().map(|r| r.added).sum());
            l.removed = Some(app.ledger.iter().map(|r| r.removed).sum());
        }
        l.tasks = app.goroutines;
        l.heap = app.heap_inuse_bytes;
    }
    if let Some(p) = &s.proc {
        l.tasks = l.tasks.or(Some(p.threads as f64));
        l.fds = Some(p.open_fds as f64);
        l.close_wait = Some(p.tcp_in_state(CLOSE_WAIT) as f64);
    }
    if let Some(k) = &s.kernel {
        l.close_wait = Some(k.in_state(CLOSE_WAIT) as f64);
    }
    l
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn baseline_of(samples: &[Levels]) -> Levels {
    let col = |f: fn(&Levels) -> Option<f64>| median(samples.iter().filter_map(f).collect());
    Levels {
        added: samples.last().and_then(|l| l.added),
        removed: samples.last().and_then(|l| l.removed),
        tasks: col(|l| l.tasks),
        fds: col(|l| l.fds),
        heap: col(|l| l.heap),
        close_wait: col(|l| l.close_wait),
    }
}

#[derive(Debug, Serialize)]
struct Criterion {
    name: &'static str,
    pass: Option<bool>,
    baseline: Option<f64>,
    after: Option<f64>,
    detail: String,
    /// The level it had to come back under, drawn on the report's chart.
    #[serde(skip)]
    limit: Option<f64>,
}

fn criteria(base: &Levels, now: &Levels, args: &VerifyArgs) -> Vec<Criterion> {
    let back = |name, b: Option<f64>, a: Option<f64>, tol: f64| {
        let pass = b.zip(a).map(|(b, a)| a <= b + tol);
        Criterion {
            name,
            pass,
            baseline: b,
            after: a,
            detail: format!("tolerance +{tol}"),
            limit: b.map(|b| b + tol),
        }
    };
    let ledger = match (base.added, base.removed, now.added, now.removed) {
        (Some(a0), Some(r0), Some(a1), Some(r1)) => {
            let (da, dr) = (a1 - a0, r1 - r0);
            Criterion {
                name: "add and remove grew together",
                pass: Some(da > 0.0 && (da - dr).abs() <= args.tolerance),
                baseline: Some(a0 - r0),
                after: Some(a1 - r1),
                detail: format!("added +{da}, removed +{dr} during the run"),
                limit: None,
            }
        }
        _ => Criterion {
            name: "add and remove grew together",
            pass: None,
            baseline: None,
            after: None,
            detail:
                "no remotedialer ledger in the target's metrics (CATTLE_PROMETHEUS_METRICS=true?)"
                    .into(),
            limit: None,
        },
    };
    let heap_tol = base.heap.map(|h| h * args.heap_tolerance).unwrap_or(0.0) + 2.0 * 1048576.0;
    vec![
        ledger,
        back(
            "tasks back to baseline",
            base.tasks,
            now.tasks,
            args.tolerance,
        ),
        back("fds back to baseline", base.fds, now.fds, args.tolerance),
        back(
            "CLOSE_WAIT sockets back to baseline",
            base.close_wait,
            now.close_wait,
            args.tolerance,
        ),
        back("heap back to baseline", base.heap, now.heap, heap_tol),
    ]
}

async fn tick_for(engine: &mut Engine, interval: Duration, d: Duration, out: &mut Vec<Levels>) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        engine.step().await;
        if let Some(s) = &engine.last {
            out.push(levels(s));
        }
        tokio::time::sleep(interval).await;
    }
}

/// Drives the load with fresh connections (like the curl loops of the original investigation).
async fn drive_load(
    url: &str,
    requests: u64,
    concurrency: u64,
    timeout: Duration,
) -> Result<(u64, u64)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(timeout)
        .build()
        .context("building the HTTP client")?;
    let sem = Arc::new(Semaphore::new(concurrency as usize));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..requests {
        let permit = Arc::clone(&sem).acquire_owned().await?;
        let (client, url) = (client.clone(), url.to_string());
        tasks.spawn(async move {
            let ok = match client.get(&url).send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            drop(permit);
            ok
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        if matches!(r, Ok(true)) {
            ok += 1
        } else {
            failed += 1
        }
    }
    Ok((ok, failed))
}

pub async fn run(args: VerifyArgs, prepared: Prepared) -> Result<ExitCode> {
    if prepared.cfg.metrics_url.is_none() {
        bail!(
            "verify needs --metrics-url: the recipe compares the tunnel's own counters with the kernel"
        );
    }
    if !(0.0..=1.0).contains(&args.min_success_ratio) {
        bail!(
            "--min-success-ratio must be between 0 and 1, got {}",
            args.min_success_ratio
        );
    }
    let interval = prepared.cfg.interval;
    let settle = args
        .settle
        .unwrap_or_else(|| Duration::from_secs_f64(prepared.cfg.analysis.idle_horizon_s()));
    let mut engine = build_engine(prepared)?;
    let mut samples = Vec::new();
    eprintln!("verify: measuring the baseline for {:?}", args.baseline);
    tick_for(&mut engine, interval, args.baseline, &mut samples).await;
    let base = baseline_of(&samples);
    let load_began = Some(engine.collector.elapsed());

    eprintln!(
        "verify: driving {} requests ({} at a time) to {}",
        args.requests, args.concurrency, args.load_url
    );
    let load = drive_load(
        &args.load_url,
        args.requests,
        args.concurrency,
        args.request_timeout,
    );
    tokio::pin!(load);
    let deadline = Instant::now() + args.max_load_time;
    let (ok, failed) = loop {
        tokio::select! {
            r = &mut load => break r?,
            _ = tokio::time::sleep(interval) => { engine.step().await; }
            _ = tokio::time::sleep_until(deadline) => {
                eprintln!("verify: the load did not finish within {:?}; judging what it did", args.max_load_time);
                break (0, args.requests);
            }
        }
    };
    eprintln!(
        "verify: load done ({ok} ok, {failed} failed); waiting up to {settle:?} for the tunnel to drain"
    );
    let load_ended_t = Some(engine.collector.elapsed());

    let load_ended = Instant::now();
    let end = load_ended + settle;
    let mut results;
    loop {
        engine.step().await;
        let now = engine.last.as_ref().map(levels).unwrap_or_default();
        results = criteria(&base, &now, &args);
        if results.iter().all(|c| c.pass != Some(false)) || Instant::now() >= end {
            break;
        }
        tokio::time::sleep(interval).await;
    }
    let drained_after = load_ended.elapsed();
    let load_criterion = load_went_through(ok, args.requests, args.min_success_ratio);
    results.insert(0, load_criterion);
    let passed = results.iter().all(|c| c.pass != Some(false));
    let drained = results.iter().skip(1).all(|c| c.pass != Some(false));
    if let Some(path) = &args.report {
        let summary = format!(
            "{} requests through {} ({ok} ok, {failed} failed), {} at a time; baseline {:?}, settle up to {settle:?}",
            args.requests, args.load_url, args.concurrency, args.baseline
        );
        let phases = [load_began, load_ended_t];
        write_report(path, &engine, &results, passed, phases, summary)?;
        eprintln!("verify: report written to {}", path.display());
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "passed": passed,
                "requests_ok": ok,
                "requests_failed": failed,
                "settle_s": settle.as_secs_f64(),
                "drained_after_s": drained.then_some(drained_after.as_secs_f64()),
                "criteria": results
            })
        );
    } else {
        println!(
            "verify: {} ({ok} requests ok, {failed} failed; {})",
            if passed { "PASS" } else { "FAIL" },
            if drained {
                format!(
                    "back to baseline {:.0}s after the load ended",
                    drained_after.as_secs_f64()
                )
            } else {
                format!(
                    "not back to baseline {:.0}s after the load ended",
                    settle.as_secs_f64()
                )
            }
        );
        for c in &results {
            let mark = match c.pass {
                Some(true) => "pass",
                Some(false) => "FAIL",
                None => "n/a ",
            };
            println!(
                "  [{mark}] {:<38} baseline={:<12} after={:<12} {}",
                c.name,
                fmt(c.baseline),
                fmt(c.after),
                c.detail
            );
        }
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The recipe proves something only if its load went through the tunnel.
fn load_went_through(ok: u64, requests: u64, min_ratio: f64) -> Criterion {
    let ratio = ok as f64 / requests.max(1) as f64;
    Criterion {
        name: "the load went through the tunnel",
        pass: Some(ok > 0 && ratio >= min_ratio),
        baseline: None,
        after: Some(ok as f64),
        detail: format!(
            "{ok} of {requests} requests succeeded (at least {:.0}% required)",
            min_ratio * 100.0
        ),
        limit: None,
    }
}

fn fmt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into())
}

/// The run as an HTML page: the engine's history with verify's own phases shaded and its criteria drawn.
fn write_report(
    path: &std::path::Path,
    engine: &Engine,
    results: &[Criterion],
    passed: bool,
    [load_began, load_ended]: [Option<f64>; 2],
    summary: String,
) -> Result<()> {
    use crate::outputs::{charts, page};
    let history = engine
        .shared
        .history
        .lock()
        .map_err(|_| anyhow::anyhow!("the history lock was poisoned"))?;
    let first = history.ticks().next().map(|t| t.t);
    let end = engine.last.as_ref().map(|s| s.t);
    let span = |from: Option<f64>, to: Option<f64>, label: &str, color| {
        Some(charts::Span {
            from: from?,
            to: to?,
            label: label.into(),
            color,
        })
    };
    let spans = [
        span(first, load_began, "baseline", charts::GREY),
        span(load_began, load_ended, "load", charts::ORANGE),
        span(load_ended, end, "settle window", charts::BLUE),
    ];
    let chart_of = |name: &str| match name {
        n if n.starts_with("tasks") => Some("tasks"),
        n if n.starts_with("fds") => Some("fds"),
        n if n.starts_with("CLOSE_WAIT") => Some("close_wait"),
        n if n.starts_with("heap") => Some("heap"),
        _ => None,
    };
    let target = engine
        .shared
        .status
        .read()
        .map(|s| s.target.clone())
        .unwrap_or_default();
    let report = page::Report {
        title: format!("leakwatch verify: {target}"),
        target,
        mode: crate::engine::mode_name(engine.collector.mode()),
        side: Some(engine.analyzer.config().side),
        passed: Some(passed),
        summary: vec![summary],
        criteria: results
            .iter()
            .map(|c| page::CriterionRow {
                name: c.name.into(),
                pass: c.pass,
                baseline: c.baseline,
                after: c.after,
                detail: c.detail.clone(),
                chart: chart_of(c.name),
                threshold: c.limit,
            })
            .collect(),
        checked_at: end,
        spans: spans.into_iter().flatten().collect(),
        raised: engine.raised.clone(),
        active_at_end: engine.active(),
    };
    std::fs::write(path, page::report_page(&report, &history))
        .with_context(|| format!("cannot write the report to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::load_went_through;

    #[test]
    fn a_load_that_never_went_through_fails_the_recipe() {
        assert_eq!(load_went_through(0, 40, 0.9).pass, Some(false));
        assert_eq!(load_went_through(30, 40, 0.9).pass, Some(false));
        assert_eq!(load_went_through(40, 40, 0.9).pass, Some(true));
        assert_eq!(
            load_went_through(0, 40, 0.0).pass,
            Some(false),
            "zero is never enough"
        );
    }
}
