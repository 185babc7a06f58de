//! `leakwatch watch`: the sidecar. Runs until SIGTERM/SIGINT.
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use super::{Prepared, collector_options};
use crate::{
    analysis::Analyzer,
    collect::Collector,
    config::SidecarArgs,
    engine::Engine,
    outputs::{http, record::Recorder},
    sources::{
        goroutines::GoroutineProfiler,
        scrape::{ScrapeConfig, Scraper},
    },
    target::{TargetSelector, TargetTracker},
};

#[derive(Args, Debug)]
pub struct WatchArgs {
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

/// A forgotten `--record` must not fill the disk: about three days at one snapshot a second.
const RECORD_MAX_BYTES: u64 = 256 << 20;

/// Builds every source and the analyzer from a prepared configuration.
pub fn build_engine(prepared: Prepared) -> Result<Engine> {
    let Prepared { cfg, kernel } = prepared;
    let cfg = &cfg;
    let scraper = match &cfg.metrics_url {
        Some(url) => Some(Scraper::new(ScrapeConfig {
            url: url.clone(),
            timeout: cfg.scrape_timeout,
            bearer_token_file: cfg.bearer_token_file.clone(),
            ca_file: cfg.ca_file.clone(),
            names: cfg.metric_names.clone(),
            ..ScrapeConfig::default()
        })?),
        None => None,
    };
    let collector = Collector::with_kernel(collector_options(cfg), scraper, kernel);
    // The `target` label of every series: the process name, so that dashboards read "rancher", not a
    // pattern or a pid that changes with every restart.
    let name = cfg.name.clone().unwrap_or_else(|| {
        TargetTracker::new(cfg.selector.clone())
            .process_name()
            .unwrap_or_else(|| match &cfg.selector {
                TargetSelector::Pid(p) => format!("pid-{p}"),
                TargetSelector::Match(re) => re.as_str().to_string(),
            })
    });
    let stale_after = (cfg.interval * 5).max(Duration::from_secs(10));
    let mut engine = Engine::new(
        collector,
        Analyzer::new(cfg.analysis.clone()),
        &name,
        stale_after,
    );
    engine.size_history(cfg.interval);
    engine.profiler = cfg.pprof_url.clone().map(GoroutineProfiler::new);
    if let Some(path) = &cfg.record {
        engine.recorder = Some(Recorder::create(path, RECORD_MAX_BYTES)?);
    }
    Ok(engine)
}

pub async fn run(prepared: Prepared) -> Result<()> {
    let (listen, interval) = (prepared.cfg.listen, prepared.cfg.interval);
    let mut engine = build_engine(prepared)?;
    let addr = http::serve(listen, engine.shared.clone()).await?;
    info!(
        mode = %crate::engine::mode_name(engine.collector.mode()),
        "leakwatch watching; live page on http://{addr}/ (and /metrics, /status, /healthz)"
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => { engine.step().await; }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    // Dropping the engine detaches the probes; nothing is pinned, so nothing outlives us in the kernel.
    info!("leakwatch stopping: probes detached");
    Ok(())
}
