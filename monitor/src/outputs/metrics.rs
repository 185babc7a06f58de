//! leakwatch's own Prometheus metrics. Names and labels are a contract (docs/metrics.md) that the
//! dashboard, the alerting rules and their tests rely on.
use std::collections::HashSet;

use monitor_ebpf::{Export, tcp_state};
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::{
    analysis::Derived,
    collect::{KernelMode, SourceCosts},
    sample::{KernelCounters, ScrapeOutcome, Snapshot},
    verdict::{Severity, Verdict, VerdictKind},
};

pub struct LeakwatchMetrics {
    pub registry: Registry,
    target: String,
    up: IntGaugeVec,
    pid: IntGaugeVec,
    restarts: IntCounterVec,
    ebpf_enabled: IntGaugeVec,
    kernel_live: IntGaugeVec,
    kernel_sockets: IntGaugeVec,
    kernel_events: IntCounterVec,
    kernel_lost: IntCounterVec,
    kernel_table_full: IntCounterVec,
    proc_fds: IntGaugeVec,
    proc_max_fds: IntGaugeVec,
    proc_socket_fds: IntGaugeVec,
    proc_tcp: IntGaugeVec,
    proc_threads: IntGaugeVec,
    proc_rss: IntGaugeVec,
    scrape_up: IntGaugeVec,
    scrape_duration: GaugeVec,
    side: IntGaugeVec,
    procfs_disagreement: IntGaugeVec,
    scrape_errors: IntCounterVec,
    rd_present: IntGaugeVec,
    ledger_over_cap: IntGaugeVec,
    app_live: GaugeVec,
    app_goroutines: GaugeVec,
    app_heap: GaugeVec,
    unbacked: GaugeVec,
    idle_beyond_horizon: GaugeVec,
    unanswered: GaugeVec,
    verdict_active: IntGaugeVec,
    verdicts_raised: IntCounterVec,
    forecast: GaugeVec,
    sample_duration: GaugeVec,
    last_kernel: KernelCounters,
    live_clientkeys: HashSet<String>,
}

/// States exported per socket; the rest are too short-lived to be worth a series.
const STATES: [u8; 8] = [
    tcp_state::ESTABLISHED,
    tcp_state::SYN_SENT,
    tcp_state::SYN_RECV,
    tcp_state::FIN_WAIT1,
    tcp_state::FIN_WAIT2,
    tcp_state::CLOSE_WAIT,
    tcp_state::LAST_ACK,
    tcp_state::LISTEN,
];

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(g.clone())).expect("unique metric name");
    g
}

fn fgauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(g.clone())).expect("unique metric name");
    g
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(c.clone())).expect("unique metric name");
    c
}

impl LeakwatchMetrics {
    pub fn new(target: &str) -> Self {
        let r = Registry::new();
        let t = &["target"];
        let build = gauge(
            &r,
            "leakwatch_build_info",
            "leakwatch build information; always 1.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let m = Self {
            up: gauge(
                &r,
                "leakwatch_up",
                "1 while the target process is found.",
                t,
            ),
            pid: gauge(&r, "leakwatch_target_pid", "Pid of the watched process.", t),
            restarts: counter(
                &r,
                "leakwatch_target_restarts_total",
                "Target restarts seen (new pid or start time).",
                t,
            ),
            ebpf_enabled: gauge(
                &r,
                "leakwatch_ebpf_enabled",
                "1 with eBPF probes attached, 0 in procfs-only mode.",
                t,
            ),
            kernel_live: gauge(
                &r,
                "leakwatch_kernel_live_sockets",
                "Target's TCP connections alive in the kernel (eBPF socket table, listeners excluded).",
                t,
            ),
            kernel_sockets: gauge(
                &r,
                "leakwatch_kernel_sockets",
                "Target's live TCP sockets per state (eBPF).",
                &["target", "state"],
            ),
            kernel_events: counter(
                &r,
                "leakwatch_kernel_events_total",
                "Kernel events of the target counted by the eBPF probes.",
                &["target", "event"],
            ),
            kernel_lost: counter(
                &r,
                "leakwatch_kernel_events_lost_total",
                "Ring-buffer records dropped because the buffer was full (counters stay exact).",
                t,
            ),
            kernel_table_full: counter(
                &r,
                "leakwatch_kernel_table_full_total",
                "Inserts refused because an in-kernel table was at its cap.",
                &["target", "table"],
            ),
            proc_fds: gauge(
                &r,
                "leakwatch_procfs_open_fds",
                "Open fds of the target.",
                t,
            ),
            proc_max_fds: gauge(
                &r,
                "leakwatch_procfs_max_fds",
                "Soft fd limit of the target.",
                t,
            ),
            proc_socket_fds: gauge(
                &r,
                "leakwatch_procfs_socket_fds",
                "Fds of the target that are sockets.",
                t,
            ),
            proc_tcp: gauge(
                &r,
                "leakwatch_procfs_tcp_sockets",
                "Target's TCP sockets per state (fds joined with /proc/net/tcp{,6}).",
                &["target", "state"],
            ),
            proc_threads: gauge(
                &r,
                "leakwatch_procfs_threads",
                "Threads (tasks) of the target.",
                t,
            ),
            proc_rss: gauge(
                &r,
                "leakwatch_procfs_resident_memory_bytes",
                "Resident memory of the target in bytes.",
                t,
            ),
            scrape_up: gauge(
                &r,
                "leakwatch_app_scrape_up",
                "1 if the last scrape of the target's /metrics succeeded.",
                t,
            ),
            scrape_duration: fgauge(
                &r,
                "leakwatch_app_scrape_duration_seconds",
                "Duration of the last scrape of the target's /metrics.",
                t,
            ),
            procfs_disagreement: gauge(
                &r,
                "leakwatch_kernel_procfs_disagreement",
                "procfs' count minus eBPF's at the last full procfs join, per state; the kernel counts are corrected by it (sockets opened before the probes were attached, or a transition the probes missed).",
                &["target", "state"],
            ),
            side: gauge(
                &r,
                "leakwatch_side",
                "1 for the side of the tunnel whose sockets back tunneled connections (server: callers, agent: targets); with --side auto, the one chosen now.",
                &["target", "side"],
            ),
            scrape_errors: counter(
                &r,
                "leakwatch_app_scrape_errors_total",
                "Failed scrapes of the target's /metrics by reason.",
                &["target", "reason"],
            ),
            rd_present: gauge(
                &r,
                "leakwatch_app_remotedialer_present",
                "1 if remotedialer session_server_* series were found.",
                t,
            ),
            ledger_over_cap: gauge(
                &r,
                "leakwatch_app_ledger_rows_over_cap",
                "Ledger rows (clientkey, proto, addr) beyond the cardinality cap in the last scrape, summed into clientkey _other.",
                t,
            ),
            app_live: fgauge(
                &r,
                "leakwatch_app_live_connections",
                "Connections the target believes live (remotedialer add - remove) per clientkey.",
                &["target", "clientkey"],
            ),
            app_goroutines: fgauge(
                &r,
                "leakwatch_app_goroutines",
                "The target's goroutines (or tasks) as it reports them.",
                t,
            ),
            app_heap: fgauge(
                &r,
                "leakwatch_app_heap_inuse_bytes",
                "The target's heap in use as it reports it.",
                t,
            ),
            unbacked: fgauge(
                &r,
                "leakwatch_crosscheck_unbacked_connections",
                "Connections live in the target's ledger with no kernel socket behind them (idle pooled connections and leaks alike).",
                t,
            ),
            idle_beyond_horizon: fgauge(
                &r,
                "leakwatch_crosscheck_idle_beyond_horizon",
                "Tunneled connections open with no caller for longer than the idle horizon, beyond what callers and the starting level explain.",
                t,
            ),
            unanswered: fgauge(
                &r,
                "leakwatch_kernel_unanswered_requests",
                "Requests the target dialed that sent data and got no byte back for longer than 30 s (tcp_info over sock_diag).",
                t,
            ),
            verdict_active: gauge(
                &r,
                "leakwatch_verdict_active",
                "1 while a verdict of this kind is active.",
                &["target", "kind", "severity"],
            ),
            verdicts_raised: counter(
                &r,
                "leakwatch_verdicts_raised_total",
                "Verdicts raised.",
                &["target", "kind"],
            ),
            forecast: fgauge(
                &r,
                "leakwatch_fd_exhaustion_forecast_seconds",
                "Seconds until the fd limit at the current growth rate.",
                t,
            ),
            sample_duration: fgauge(
                &r,
                "leakwatch_sample_duration_seconds",
                "Cost of the last sampling pass per source.",
                &["target", "source"],
            ),
            registry: r,
            target: target.to_string(),
            last_kernel: KernelCounters::default(),
            live_clientkeys: HashSet::new(),
        };
        for kind in VerdictKind::ALL {
            for sev in [Severity::Warning, Severity::Critical] {
                m.verdict_active
                    .with_label_values(&[target, kind.as_str(), sev.as_str()])
                    .set(0);
            }
            m.verdicts_raised
                .with_label_values(&[target, kind.as_str()])
                .inc_by(0);
        }
        m.restarts.with_label_values(&[target]).inc_by(0);
        m.kernel_lost.with_label_values(&[target]).inc_by(0);
        m
    }

    pub fn target_restarted(&self) {
        self.restarts.with_label_values(&[&self.target]).inc();
    }

    pub fn verdict_raised(&self, kind: VerdictKind) {
        self.verdicts_raised
            .with_label_values(&[&self.target, kind.as_str()])
            .inc();
    }

    pub fn scrape_failed(&self, reason: &str) {
        self.scrape_errors
            .with_label_values(&[&self.target, reason])
            .inc();
    }

    pub fn update(
        &mut self,
        snap: &Snapshot,
        mode: &KernelMode,
        costs: &SourceCosts,
        verdicts: &[Verdict],
        derived: &Derived,
    ) {
        let t = self.target.clone();
        let t = t.as_str();
        self.up
            .with_label_values(&[t])
            .set(i64::from(snap.target.is_some()));
        if let Some(id) = &snap.target {
            self.pid.with_label_values(&[t]).set(i64::from(id.pid));
        }
        self.ebpf_enabled
            .with_label_values(&[t])
            .set(i64::from(*mode == KernelMode::Ebpf));
        if let Some(k) = &snap.kernel {
            self.kernel_live
                .with_label_values(&[t])
                .set(k.live_sockets as i64);
            for s in STATES {
                self.kernel_sockets
                    .with_label_values(&[t, tcp_state::name(s)])
                    .set(k.in_state(s) as i64);
            }
            self.mirror_kernel_counters(&k.counters);
        }
        if let Some(p) = &snap.proc {
            self.proc_fds.with_label_values(&[t]).set(p.open_fds as i64);
            if let Some(limit) = p.fd_limit {
                self.proc_max_fds.with_label_values(&[t]).set(limit as i64);
            }
            self.proc_socket_fds
                .with_label_values(&[t])
                .set(p.socket_fds as i64);
            for s in STATES {
                self.proc_tcp
                    .with_label_values(&[t, tcp_state::name(s)])
                    .set(p.tcp_in_state(s) as i64);
            }
            self.proc_threads
                .with_label_values(&[t])
                .set(p.threads as i64);
            self.proc_rss
                .with_label_values(&[t])
                .set(p.rss_bytes as i64);
        }
        match &snap.app {
            ScrapeOutcome::Ok(app) => {
                self.scrape_up.with_label_values(&[t]).set(1);
                self.rd_present
                    .with_label_values(&[t])
                    .set(i64::from(app.remotedialer_present));
                self.ledger_over_cap
                    .with_label_values(&[t])
                    .set(app.ledger_rows_dropped as i64);
                if let Some(g) = app.goroutines {
                    self.app_goroutines.with_label_values(&[t]).set(g);
                }
                if let Some(h) = app.heap_inuse_bytes {
                    self.app_heap.with_label_values(&[t]).set(h);
                }
            }
            ScrapeOutcome::Failed { .. } => self.scrape_up.with_label_values(&[t]).set(0),
            ScrapeOutcome::NotConfigured => {}
        }
        if let Some(k) = &snap.kernel {
            for (state, d) in &k.procfs_disagreement {
                self.procfs_disagreement
                    .with_label_values(&[t, state])
                    .set(*d);
            }
        }
        // Without a metrics URL there is no scrape: no duration to report, not a duration of 0.
        if !matches!(snap.app, ScrapeOutcome::NotConfigured) {
            self.scrape_duration
                .with_label_values(&[t])
                .set(costs.scrape);
        }
        if let Some(side) = derived.side {
            for end in [crate::analysis::End::Server, crate::analysis::End::Agent] {
                self.side
                    .with_label_values(&[t, end.as_str()])
                    .set(i64::from(end == side.end));
            }
        }
        self.sample_duration
            .with_label_values(&[t, "ebpf"])
            .set(costs.ebpf);
        self.sample_duration
            .with_label_values(&[t, "procfs"])
            .set(costs.procfs);
        self.sample_duration
            .with_label_values(&[t, "scrape"])
            .set(costs.scrape);
        self.sample_duration
            .with_label_values(&[t, "procfs_full"])
            .set(costs.procfs_full);

        // Clientkeys that disappeared must not linger as stale series.
        let current: HashSet<String> = derived.app_live_by_clientkey.keys().cloned().collect();
        for gone in self.live_clientkeys.difference(&current) {
            let _ = self.app_live.remove_label_values(&[t, gone]);
        }
        for (key, live) in &derived.app_live_by_clientkey {
            self.app_live.with_label_values(&[t, key]).set(*live);
        }
        self.live_clientkeys = current;
        if let Some(u) = derived.unbacked_connections {
            self.unbacked.with_label_values(&[t]).set(u);
        }
        if let Some(x) = derived.idle_beyond_horizon {
            self.idle_beyond_horizon.with_label_values(&[t]).set(x);
        }
        if let Some(x) = derived.unanswered_requests {
            self.unanswered.with_label_values(&[t]).set(x);
        }
        match derived.fd_exhaustion_seconds {
            Some(s) => self.forecast.with_label_values(&[t]).set(s),
            None => {
                let _ = self.forecast.remove_label_values(&[t]);
            }
        }
        for kind in VerdictKind::ALL {
            for sev in [Severity::Warning, Severity::Critical] {
                let active = verdicts.iter().any(|v| v.kind == kind && v.severity == sev);
                self.verdict_active
                    .with_label_values(&[t, kind.as_str(), sev.as_str()])
                    .set(i64::from(active));
            }
        }
    }

    /// The kernel counters are cumulative since attach; Prometheus counters only go up, so add the
    /// difference, and start over when the probes were reloaded (values went down).
    fn mirror_kernel_counters(&mut self, now: &KernelCounters) {
        let t = self.target.clone();
        for ((def, value), (_, last)) in now.iter().zip(self.last_kernel.iter()) {
            let delta = value.checked_sub(last).unwrap_or(value);
            match def.export {
                Export::Event => self
                    .kernel_events
                    .with_label_values(&[&t, def.name])
                    .inc_by(delta),
                Export::Lost => self.kernel_lost.with_label_values(&[&t]).inc_by(delta),
                Export::TableFull(table) => self
                    .kernel_table_full
                    .with_label_values(&[&t, table])
                    .inc_by(delta),
            }
        }
        self.last_kernel = now.clone();
    }

    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding our own well-formed families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}
