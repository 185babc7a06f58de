//! The engine: one tick = collect a snapshot, analyse it, publish the result. Shared by `watch`, `check`
//! and `verify`, which differ only in how long they run and what they report: each builds it with
//! [`Engine::build`] and drives it with [`Engine::run_until`].
use std::{
    future::Future,
    ops::ControlFlow,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::time::{Interval, MissedTickBehavior};

use crate::{
    analysis::Analyzer,
    collect::{Collector, CollectorOptions, KernelMode, TargetEvent},
    config::SidecarConfig,
    outputs::{
        history::History,
        http::{Shared, SocketView, StatusDoc},
        log::log_change,
        metrics::LeakwatchMetrics,
        record::Recorder,
    },
    sample::{ScrapeOutcome, Snapshot},
    sources::{
        ebpf::{ProbeOptions, Probes},
        goroutines::GoroutineProfiler,
        scrape::{ScrapeConfig, Scraper},
    },
    target::{TargetSelector, TargetTracker},
    verdict::{Raised, Verdict, VerdictChange},
};

/// What `watch`, `check` and `verify` start from: the resolved configuration and the kernel side,
/// set up before the async runtime exists (see [`crate::commands::prepare`]).
pub struct Prepared {
    pub cfg: SidecarConfig,
    pub kernel: (Option<Probes>, KernelMode),
}

pub fn collector_options(cfg: &SidecarConfig) -> CollectorOptions {
    CollectorOptions {
        selector: cfg.selector.clone(),
        no_ebpf: cfg.no_ebpf,
        probes: ProbeOptions {
            max_sockets: cfg.kernel.max_sockets(),
            follow_forks: cfg.kernel.follow_forks,
            ..ProbeOptions::default()
        },
        bpf_stats: false,
        procfs_scan_interval: cfg.kernel.procfs_scan_interval(),
        idle_horizon: std::time::Duration::from_secs_f64(cfg.analysis.idle_horizon_s()),
    }
}

/// A forgotten `--record` must not fill the disk: about three days at one snapshot a second.
const RECORD_MAX_BYTES: u64 = 256 << 20;

/// Resolves when the process is asked to stop: SIGTERM or SIGINT (ctrl-c).
pub async fn terminated() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// What a run saw, for one-shot reports: proof that the run looked at what it reports on.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RunStats {
    pub ticks: u64,
    /// Ticks that sampled the target's process (procfs): what every kernel-side check rests on.
    pub target_samples: u64,
    pub scrapes_ok: u64,
    pub scrapes_failed: u64,
    /// Target restarts seen (a new pid or start time).
    pub target_restarts: u64,
    /// Why the last scrape failed, for the one-line reason of a run that never scraped.
    pub last_scrape_error: Option<String>,
}

/// The exit code of `check` and `verify` when the run could not judge: the target was never found or
/// never sampled, or the metrics they judge were never read. Distinct from 0 (no leak), 1 (leak or
/// failed criterion) and 2 (bad usage or set-up), so a CI smoke test with a mistyped pattern goes red.
pub const EXIT_INCONCLUSIVE: u8 = 3;

impl RunStats {
    /// Why nothing this run says can be trusted, if so: `target` names the selector, `metrics` whether a
    /// metrics URL was given (its ledger is then part of what is judged).
    pub fn unjudged(&self, target: &str, metrics: bool) -> Option<String> {
        if self.target_samples == 0 {
            return Some(format!(
                "the target was never sampled: no process matched {target} in {} ticks",
                self.ticks
            ));
        }
        if metrics && self.scrapes_ok == 0 {
            return Some(format!(
                "the target's metrics were never read ({} scrapes failed{})",
                self.scrapes_failed,
                self.last_scrape_error
                    .as_deref()
                    .map(|e| format!(", last: {e}"))
                    .unwrap_or_default()
            ));
        }
        None
    }
}

pub struct Engine {
    pub collector: Collector,
    pub analyzer: Analyzer,
    pub shared: Shared,
    target_name: String,
    pub stats: RunStats,
    scrape_failing: bool,
    /// The side last logged (see [`crate::analysis::Derived::side`]).
    side_said: Option<crate::analysis::SideInEffect>,
    /// Every verdict raised during the run, for one-shot reports.
    pub raised: Vec<Raised>,
    pub last: Option<Snapshot>,
    /// `--record`: every snapshot appended to a file for `leakwatch replay`.
    pub recorder: Option<Recorder>,
    /// The sampling period and its ticker, shared by every [`Engine::run_until`] of a run so that
    /// successive phases (verify's baseline, load and settle) keep one cadence.
    interval: Duration,
    ticker: Option<Interval>,
}

impl Engine {
    pub fn new(
        collector: Collector,
        analyzer: Analyzer,
        target_name: &str,
        stale_after: std::time::Duration,
    ) -> Self {
        let status = StatusDoc {
            target: target_name.to_string(),
            mode: mode_name(collector.mode()),
            ..StatusDoc::default()
        };
        let shared = Shared {
            metrics: Arc::new(Mutex::new(LeakwatchMetrics::new(target_name))),
            status: Arc::new(RwLock::new(status)),
            last_tick: Arc::new(Mutex::new(Instant::now())),
            stale_after,
            history: Arc::new(Mutex::new(History::default())),
            side: analyzer.config().side,
        };
        Self {
            collector,
            analyzer,
            shared,
            target_name: target_name.to_string(),
            stats: RunStats::default(),
            scrape_failing: false,
            side_said: None,
            raised: Vec::new(),
            last: None,
            recorder: None,
            interval: Duration::from_secs(1),
            ticker: None,
        }
    }

    /// Builds every source and the analyzer from a prepared configuration.
    pub fn build(prepared: Prepared) -> Result<Self> {
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
        let collector = Collector::with_kernel(collector_options(cfg), scraper, kernel)
            .with_profiler(cfg.pprof_url.clone().map(GoroutineProfiler::new));
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
        let mut engine = Self::new(
            collector,
            Analyzer::new(cfg.analysis.clone()),
            &name,
            stale_after,
        );
        engine.size_history(cfg.interval);
        if let Some(path) = &cfg.record {
            engine.recorder = Some(Recorder::create(path, RECORD_MAX_BYTES)?);
        }
        Ok(engine)
    }

    /// The tick loop of every command: steps once per interval (the first tick at once; a step that
    /// overruns delays the next tick rather than bursting to catch up) until `stop` resolves, which
    /// returns `Some` of its output, or `on_tick`, called after each step, breaks, which returns `None`.
    /// A step under way is finished before `stop` is looked at.
    pub async fn run_until<T>(
        &mut self,
        stop: impl Future<Output = T>,
        mut on_tick: impl FnMut(&Self) -> ControlFlow<()>,
    ) -> Option<T> {
        let interval = self.interval;
        let mut ticker = self.ticker.take().unwrap_or_else(|| {
            let mut t = tokio::time::interval(interval);
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
            t
        });
        tokio::pin!(stop);
        let out = loop {
            tokio::select! {
                v = &mut stop => break Some(v),
                _ = ticker.tick() => {
                    self.step().await;
                    if on_tick(self).is_break() {
                        break None;
                    }
                }
            }
        };
        self.ticker = Some(ticker);
        out
    }

    /// Sets the sampling interval and sizes the history for it (30 min of it, within a fixed cap). Call
    /// before serving: the live page holds the same history.
    pub fn size_history(&mut self, interval: std::time::Duration) {
        self.interval = interval;
        self.shared.history = Arc::new(Mutex::new(History::for_interval(
            crate::outputs::history::WINDOW,
            interval,
        )));
    }

    /// One tick, as the data path reads: the sources give a snapshot, the analysis judges it (and the
    /// goroutine profiles its verdicts ask for are read into the same snapshot), the outputs publish it.
    pub async fn step(&mut self) -> Vec<VerdictChange> {
        let (mut snap, target_events) = self.collector.tick().await;
        self.account(&snap, &target_events);
        let changes = self.analyse(&mut snap).await;
        self.publish(snap, &changes);
        changes
    }

    /// What the run rests on (ticks, samples, scrapes, restarts), and the log lines a change of those
    /// deserves: said when it starts, not every tick.
    fn account(&mut self, snap: &Snapshot, target_events: &[TargetEvent]) {
        self.stats.ticks += 1;
        if snap.proc.is_some() {
            self.stats.target_samples += 1;
        }
        match &snap.app {
            ScrapeOutcome::Ok(_) => {
                if self.scrape_failing {
                    tracing::info!("the tunnel's metrics are readable again");
                }
                self.scrape_failing = false;
                self.stats.scrapes_ok += 1;
            }
            ScrapeOutcome::Failed { reason, .. } => {
                if !self.scrape_failing {
                    tracing::warn!(
                        "cannot read the tunnel's metrics: {reason}; ledger checks pause, kernel checks go on"
                    );
                }
                self.scrape_failing = true;
                self.stats.scrapes_failed += 1;
                self.stats.last_scrape_error = Some(reason.clone());
            }
            ScrapeOutcome::NotConfigured => {}
        }
        for e in target_events {
            if let TargetEvent::Restarted { .. } = e {
                self.stats.target_restarts += 1;
                if let Ok(m) = self.shared.metrics.lock() {
                    m.target_restarted();
                }
            }
        }
    }

    /// The analysis of one snapshot: its verdict changes, with the goroutine evidence they asked for read
    /// into the snapshot (which is recorded so, for `replay`).
    async fn analyse(&mut self, snap: &mut Snapshot) -> Vec<VerdictChange> {
        let mut changes = self.analyzer.observe(snap);
        let wanted = self.analyzer.evidence_wanted(&changes);
        snap.goroutines = self.collector.read_goroutines(&wanted, snap).await;
        if let Some(reading) = &snap.goroutines {
            self.analyzer.add_evidence(reading, &mut changes);
        }
        if let Some(r) = &mut self.recorder {
            r.write(snap);
        }
        changes
    }

    /// The outputs: logs, the run's record of raised verdicts, history, metrics, /status, /healthz.
    fn publish(&mut self, snap: Snapshot, changes: &[VerdictChange]) {
        for c in changes {
            log_change(c, snap.unix - snap.t);
            if let VerdictChange::Raised(v) = c {
                self.raised.push(Raised {
                    verdict: v.clone(),
                    raised_t: snap.t,
                    raised_unix: snap.unix,
                });
                if let Ok(m) = self.shared.metrics.lock() {
                    m.verdict_raised(v.kind);
                }
            }
        }
        if let Ok(mut h) = self.shared.history.lock() {
            h.record(
                &snap,
                self.analyzer.derived(),
                self.analyzer.load_phase(),
                self.analyzer.config().side,
                changes,
            );
            // Dumps are read rarely (per idle verdict): the tasks chart shows each reading.
            if let Some(a) = snap
                .goroutines
                .as_ref()
                .and_then(|g| g.ages.as_ref())
                .filter(|a| a.read)
            {
                h.set_blocked_ages(&[(
                    format!("{}+ min (connection goroutines)", a.min_minutes),
                    a.total as f64,
                )]);
            }
        }
        let active = self.active();
        let derived = self.analyzer.derived().clone();
        if let Some(side) = derived.side.filter(|s| Some(*s) != self.side_said) {
            tracing::info!(
                %side,
                "tunneled connections are backed by the {} sockets",
                match side.end {
                    crate::analysis::End::Server => "callers'",
                    crate::analysis::End::Agent => "targets'",
                }
            );
            self.side_said = Some(side);
        }
        if let Ok(mut m) = self.shared.metrics.lock() {
            if let ScrapeOutcome::Failed { class, .. } = &snap.app {
                m.scrape_failed(class.as_str());
            }
            m.update(
                &snap,
                self.collector.mode(),
                &self.collector.costs,
                &active,
                &derived,
            );
        }
        if let Ok(mut s) = self.shared.status.write() {
            *s = StatusDoc {
                target: self.target_name.clone(),
                mode: mode_name(self.collector.mode()),
                verdicts: active,
                snapshot: Some(snap.clone()),
                restarts: self.stats.target_restarts,
                notes: self.notes(&snap),
                load_phase: self.analyzer.load_phase().to_string(),
                oldest_sockets: self.oldest_sockets(),
                goroutine_growth: self.analyzer.stack_growth().to_vec(),
                sockets_by_state: sockets_by_state(&snap),
                crosscheck: derived,
                analysis: self.analyzer.config().clone(),
            };
        }
        if let Ok(mut t) = self.shared.last_tick.lock() {
            *t = Instant::now();
        }
        self.last = Some(snap);
    }

    /// Verdicts active now, with their evidence.
    pub fn active(&self) -> Vec<Verdict> {
        self.analyzer.active()
    }

    /// The ten longest-held sockets of the target, for /status.
    fn oldest_sockets(&self) -> Vec<SocketView> {
        let table = self.collector.socket_table();
        let Ok(table) = table.lock() else {
            return Vec::new();
        };
        let now = crate::system::monotonic_ns();
        table
            .oldest(10)
            .into_iter()
            .map(|e| SocketView {
                state: monitor_ebpf::tcp_state::name(e.state).to_string(),
                origin: format!("{:?}", e.origin).to_lowercase(),
                local: e.local.to_string(),
                remote: e.remote.to_string(),
                age_s: now.saturating_sub(e.first_seen_ns) as f64 / 1e9,
            })
            .collect()
    }

    fn notes(&self, snap: &Snapshot) -> Vec<String> {
        let mut notes = Vec::new();
        if let KernelMode::ProcfsOnly(reason) = self.collector.mode() {
            notes.push(format!("procfs-only mode: {reason}"));
        }
        match &snap.app {
            // Only a remotedialer server keeps the ledger; a client (the agent) exports none, ever.
            ScrapeOutcome::Ok(app) if !app.remotedialer_present => notes.push(
                if self
                    .analyzer
                    .derived()
                    .side
                    .is_some_and(|s| s.end == crate::analysis::End::Agent)
                {
                    "an agent exports no remotedialer session_server_* metrics (only the server keeps the \
                     ledger); the kernel checks (sockets, idle ages, unanswered requests, tasks) carry the watch"
                } else {
                    "the target exports no remotedialer session_server_* metrics (Rancher registers them only \
                     with CATTLE_PROMETHEUS_METRICS=true); ledger checks are off, kernel checks still run"
                }
                .into(),
            ),
            ScrapeOutcome::Failed { reason, .. } => notes.push(format!("scrape failed: {reason}")),
            _ => {}
        }
        if snap.target.is_none() {
            notes.push("target process not found".into());
        }
        notes
    }
}

/// Live sockets per TCP state by name: eBPF's when the probes run, procfs' otherwise.
fn sockets_by_state(snap: &Snapshot) -> std::collections::BTreeMap<String, u64> {
    let counts = match (&snap.kernel, &snap.proc) {
        (Some(k), _) => k.sockets_by_state,
        (None, Some(p)) => p.tcp_by_state,
        (None, None) => return Default::default(),
    };
    counts
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(state, n)| (monitor_ebpf::tcp_state::name(state as u8).to_string(), *n))
        .collect()
}

pub fn mode_name(mode: &KernelMode) -> String {
    match mode {
        KernelMode::Ebpf => "ebpf".into(),
        KernelMode::ProcfsOnly(_) => "procfs-only".into(),
    }
}
