//! `leakwatch verify`: the recipe that verified the remotedialer leak fix, automated. Measure a baseline,
//! drive many requests through the tunnel, then check that the add/remove ledger converges, and that
//! tasks, fds, heap and CLOSE_WAIT sockets return to baseline within a settle time.
use std::{ops::ControlFlow, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::{sync::Semaphore, time::Instant};

use super::Prepared;
use crate::{
    analysis::{
        AnalysisConfig,
        quiescence::{self, Levels},
    },
    args::VerifyArgs,
    engine::Engine,
    sample::{ScrapeOutcome, Snapshot},
};

/// The remotedialer ledger's cumulative (added, removed) over all rows: verify's own criterion, which
/// the continuous quiescence check has no "before" for.
fn ledger_totals(s: Option<&Snapshot>) -> Option<(f64, f64)> {
    match &s?.app {
        ScrapeOutcome::Ok(app) if app.remotedialer_present => Some((
            app.ledger.iter().map(|r| r.added).sum(),
            app.ledger.iter().map(|r| r.removed).sum(),
        )),
        _ => None,
    }
}

/// The baseline: the analysis' medians over the `secs` before the engine's last tick.
fn baseline_levels(engine: &Engine, secs: f64) -> Levels {
    match &engine.last {
        Some(s) => Levels::measure(engine.analyzer.signals(), s.t, secs),
        None => Levels::default(),
    }
}

/// The levels now: the analysis' latest values, no older than `max_age` seconds.
fn latest_levels(engine: &Engine, max_age: f64) -> Levels {
    match &engine.last {
        Some(s) => Levels::latest(engine.analyzer.signals(), s.t, max_age),
        None => Levels::default(),
    }
}

/// Where verify stands at one instant: the analysis' levels plus the ledger.
#[derive(Clone, Debug, Default)]
struct Point {
    levels: Levels,
    ledger: Option<(f64, f64)>,
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

/// verify's name for each level the analysis compares; the app's live connections are judged by the
/// ledger criterion instead.
fn criterion_name(level: &str) -> Option<&'static str> {
    match level {
        "tasks" => Some("tasks back to baseline"),
        "procfs.open_fds" => Some("fds back to baseline"),
        "kernel.close_wait_sockets" => Some("CLOSE_WAIT sockets back to baseline"),
        "app.heap_inuse_bytes" => Some("heap back to baseline"),
        _ => None,
    }
}

fn criteria(base: &Point, now: &Point, cfg: &AnalysisConfig) -> Vec<Criterion> {
    let ledger = match (base.ledger, now.ledger) {
        (Some((a0, r0)), Some((a1, r1))) => {
            let (da, dr) = (a1 - a0, r1 - r0);
            Criterion {
                name: "add and remove grew together",
                pass: Some(da > 0.0 && (da - dr).abs() <= cfg.settle_tasks_tolerance),
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
    let levels = quiescence::compare(&base.levels, &now.levels, cfg, quiescence::Judge::Verify)
        .into_iter()
        .filter_map(|c| {
            Some(Criterion {
                name: criterion_name(c.name)?,
                pass: c.exceeded().map(|over| !over),
                baseline: c.baseline,
                after: c.now,
                detail: format!("tolerance +{}", c.tolerance.unwrap_or(0.0)),
                limit: c.limit(),
            })
        });
    std::iter::once(ledger).chain(levels).collect()
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

pub async fn run(args: VerifyArgs, mut prepared: Prepared) -> Result<ExitCode> {
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
    // verify's tolerances are the analysis' settle tolerances for this run: one rule for both.
    // Given on the command line, they override `[analysis] settle_*` of the config file; not given, the
    // file's (or the defaults) stand.
    let analysis = &mut prepared.cfg.analysis;
    if let Some(t) = args.tolerance {
        analysis.settle_tasks_tolerance = t;
        analysis.settle_fds_tolerance = t;
    }
    if let Some(r) = args.heap_tolerance {
        analysis.settle_heap_tolerance_ratio = r;
    }
    let settle = args
        .settle
        .unwrap_or_else(|| Duration::from_secs_f64(prepared.cfg.analysis.idle_horizon_s()));
    // A level missing from the last tick (a failed scrape) is judged on the tick before.
    let max_age = prepared.cfg.interval.as_secs_f64() * 2.5;
    let mut engine = Engine::build(prepared)?;
    let cfg = engine.analyzer.config().clone();
    eprintln!("verify: measuring the baseline for {:?}", args.baseline);
    engine
        .run_until(tokio::time::sleep(args.baseline), |_| {
            ControlFlow::Continue(())
        })
        .await;
    let base = Point {
        levels: baseline_levels(&engine, args.baseline.as_secs_f64()),
        ledger: ledger_totals(engine.last.as_ref()),
    };
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
    let deadline = Instant::now() + args.max_load_time;
    let load_or_deadline = async {
        tokio::select! {
            r = load => r,
            _ = tokio::time::sleep_until(deadline) => {
                eprintln!("verify: the load did not finish within {:?}; judging what it did", args.max_load_time);
                Ok((0, args.requests))
            }
        }
    };
    let (ok, failed) = engine
        .run_until(load_or_deadline, |_| ControlFlow::Continue(()))
        .await
        .expect("the load phase ends only when the load does")?;
    eprintln!(
        "verify: load done ({ok} ok, {failed} failed); waiting up to {settle:?} for the tunnel to drain"
    );
    let load_ended_t = Some(engine.collector.elapsed());

    let load_ended = Instant::now();
    let end = load_ended + settle;
    let mut results = Vec::new();
    // Judged after every tick, the first right away; stops once every level is back or the settle time
    // is up.
    engine
        .run_until(std::future::pending::<()>(), |engine| {
            let now = Point {
                levels: latest_levels(engine, max_age),
                ledger: ledger_totals(engine.last.as_ref()),
            };
            results = criteria(&base, &now, &cfg);
            if results.iter().all(|c| c.pass != Some(false)) || Instant::now() >= end {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await;
    let drained_after = load_ended.elapsed();
    let load_criterion = load_went_through(ok, args.requests, args.min_success_ratio);
    results.insert(0, load_criterion);
    let outcome = Outcome::of(&results);
    let passed = outcome == Outcome::Pass;
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
                "outcome": outcome,
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
            outcome.word(),
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
    if outcome == Outcome::Inconclusive {
        let unjudged: Vec<&str> = results
            .iter()
            .filter(|c| c.pass.is_none())
            .map(|c| c.name)
            .collect();
        eprintln!(
            "verify: inconclusive: could not judge {}",
            unjudged.join(", ")
        );
    }
    Ok(ExitCode::from(outcome.exit_code()))
}

/// What the recipe concludes. A criterion it could not judge (n/a) is not a pass: a verify that never
/// saw the ledger, or the heap, proves nothing about them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Outcome {
    Pass,
    Fail,
    Inconclusive,
}

impl Outcome {
    fn of(results: &[Criterion]) -> Self {
        if results.iter().any(|c| c.pass == Some(false)) {
            Self::Fail
        } else if results.iter().any(|c| c.pass.is_none()) {
            Self::Inconclusive
        } else {
            Self::Pass
        }
    }

    fn word(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Inconclusive => "INCONCLUSIVE",
        }
    }

    fn exit_code(self) -> u8 {
        match self {
            Self::Pass => 0,
            Self::Fail => 1,
            Self::Inconclusive => crate::engine::EXIT_INCONCLUSIVE,
        }
    }
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
    use super::*;

    #[test]
    fn criteria_are_the_analysis_comparisons_under_verify_names() {
        let cfg = AnalysisConfig::default();
        let base = Point {
            levels: Levels {
                app_live: Some(0.0),
                kernel_conn: Some(2.0),
                tasks: Some(10.0),
                fds: Some(20.0),
                close_wait: Some(0.0),
                heap: Some(100.0 * 1048576.0),
            },
            ledger: Some((0.0, 0.0)),
        };
        let mut now = base.clone();
        now.levels.tasks = Some(16.0);
        now.levels.heap = Some(120.0 * 1048576.0);
        now.ledger = Some((50.0, 50.0));
        let c = criteria(&base, &now, &cfg);
        let names: Vec<_> = c.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "add and remove grew together",
                "tasks back to baseline",
                "fds back to baseline",
                "CLOSE_WAIT sockets back to baseline",
                "heap back to baseline",
            ]
        );
        let pass: Vec<_> = c.iter().map(|c| c.pass).collect();
        assert_eq!(
            pass,
            [Some(true), Some(false), Some(true), Some(true), Some(true)]
        );
        // One heap rule: the analysis' tolerance, drawn as the report's limit.
        let heap_tol = quiescence::heap_tolerance(100.0 * 1048576.0, &cfg);
        assert_eq!(c[4].limit, Some(100.0 * 1048576.0 + heap_tol));
        assert_eq!(c[4].detail, format!("tolerance +{heap_tol}"));
    }

    fn criterion(pass: Option<bool>) -> Criterion {
        Criterion {
            name: "x",
            pass,
            baseline: None,
            after: None,
            detail: String::new(),
            limit: None,
        }
    }

    #[test]
    fn a_criterion_not_judged_is_not_a_pass() {
        let run =
            |p: &[Option<bool>]| Outcome::of(&p.iter().map(|&p| criterion(p)).collect::<Vec<_>>());
        assert_eq!(run(&[Some(true), Some(true)]), Outcome::Pass);
        assert_eq!(run(&[Some(true), None]), Outcome::Inconclusive);
        assert_eq!(
            run(&[None, Some(false)]),
            Outcome::Fail,
            "a failure is a failure"
        );
        assert_eq!(
            Outcome::Inconclusive.exit_code(),
            crate::engine::EXIT_INCONCLUSIVE
        );
        // The report's and the JSON's pass flag follow the outcome.
        assert_ne!(run(&[None]), Outcome::Pass);
    }

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
