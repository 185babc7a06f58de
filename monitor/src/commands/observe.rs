//! `leakwatch observe`: the raw numbers, one line per interval, so a user can see the sources working.
use anyhow::{Result, bail};
use monitor_ebpf::tcp_state::{CLOSE_WAIT, ESTABLISHED};

use crate::{
    args::ObserveArgs,
    collect::{Collector, CollectorOptions, KernelMode},
    sample::Snapshot,
    sources::ebpf::ProbeOptions,
};

pub async fn run(args: ObserveArgs) -> Result<()> {
    let Some(selector) = args.target.selector()? else {
        bail!("observe needs a target: --pid N or --match REGEX");
    };
    let opts = CollectorOptions {
        selector,
        no_ebpf: args.kernel.no_ebpf,
        probes: ProbeOptions {
            max_sockets: args.kernel.max_sockets(),
            follow_forks: args.kernel.follow_forks,
            ..ProbeOptions::default()
        },
        bpf_stats: false,
        // The raw view shows kernel and procfs side by side: both fresh on every line.
        procfs_scan_interval: std::time::Duration::ZERO,
        idle_horizon: std::time::Duration::from_secs_f64(
            crate::analysis::AnalysisConfig::default().idle_horizon_s(),
        ),
    };
    let mut collector = Collector::new(opts, None);
    if let KernelMode::ProcfsOnly(reason) = collector.mode() {
        println!("mode: procfs-only ({reason})");
    } else if let Some(fallback) = collector.probes().and_then(|p| p.fallback()) {
        println!("mode: ebpf (fallback: {fallback})");
    } else {
        println!("mode: ebpf");
    }
    let mut ticker = tokio::time::interval(args.interval);
    let mut printed = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let (snap, events) = collector.tick().await;
        for e in events {
            println!("target: {e:?}");
        }
        if args.json {
            println!("{}", serde_json::to_string(&snap)?);
        } else {
            println!("{}", render_line(&snap));
        }
        printed += 1;
        if args.count.is_some_and(|c| printed >= c) {
            return Ok(());
        }
    }
}

/// One human line: what the kernel saw (eBPF) and what procfs sees, side by side.
pub fn render_line(s: &Snapshot) -> String {
    let mut line = format!("t={:.0}s", s.t);
    match &s.target {
        Some(id) => line += &format!(" pid={}", id.pid),
        None => return line + " target not running",
    }
    if let Some(k) = &s.kernel {
        let c = &k.counters;
        line += &format!(
            " | ebpf live={} est={} close_wait={} accepted={} connected={} opened={} closed={} threads+{}/-{} lost={}",
            k.live_sockets,
            k.in_state(ESTABLISHED),
            k.in_state(CLOSE_WAIT),
            k.accepted_live,
            k.connected_live,
            c.sock_tracked,
            c.sock_closed,
            c.task_new_thread,
            c.task_exit,
            c.events_lost
        );
    }
    if let Some(p) = &s.proc {
        line += &format!(
            " | procfs fds={} sock_fds={} est={} close_wait={} threads={} rss={:.1}MiB",
            p.open_fds,
            p.socket_fds,
            p.tcp_in_state(ESTABLISHED),
            p.tcp_in_state(CLOSE_WAIT),
            p.threads,
            p.rss_bytes as f64 / 1048576.0
        );
    }
    line
}
