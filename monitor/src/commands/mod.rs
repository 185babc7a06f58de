//! The subcommands. Each builds its sources with [`crate::collect::Collector`] and loops over snapshots.
pub mod check;
pub mod observe;
pub mod replay;
pub mod verify;
pub mod watch;

use anyhow::Result;
use tracing::{info, warn};

use crate::{
    collect::{CollectorOptions, KernelMode, load_kernel},
    config::{SidecarArgs, SidecarConfig},
    sources::ebpf::{ProbeOptions, Probes},
    system,
};

/// What `watch`, `check` and `verify` start from: the resolved configuration and the kernel side,
/// set up before the async runtime exists.
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

/// Resolves the configuration, loads and attaches the probes, then drops every capability leakwatch
/// no longer needs. Runs before any other thread exists: capabilities are per thread, and threads
/// started afterwards (the runtime's workers) inherit the reduced sets.
pub fn prepare(args: &SidecarArgs) -> Result<Prepared> {
    let cfg = args.resolve()?;
    let kernel = load_kernel(&collector_options(&cfg));
    if system::is_root() {
        let done = if kernel.0.is_some() {
            "probes attached"
        } else {
            "no probes"
        };
        match system::drop_capabilities() {
            Ok(()) => info!(
                kept = ?system::KEPT_CAPABILITIES,
                "{done}; dropped every other capability (no further BPF loads or mounts possible)"
            ),
            Err(e) => warn!("could not drop capabilities after attaching: {e}"),
        }
    }
    Ok(Prepared { cfg, kernel })
}
