//! The subcommands. `watch`, `check` and `verify` build an [`crate::engine::Engine`] and drive its one tick
//! loop ([`crate::engine::Engine::run_until`]); `observe` and `replay` have no engine.
pub mod check;
pub mod observe;
pub mod replay;
pub mod verify;
pub mod watch;

use anyhow::Result;
use tracing::{info, warn};

pub use crate::engine::Prepared;
use crate::{args::SidecarArgs, collect::load_kernel, engine::collector_options, system};

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
        let keep_bpf = kernel.0.as_ref().is_some_and(|p| {
            system::map_reads_need_cap_bpf(|| p.counters().is_ok()).unwrap_or(false)
        });
        if keep_bpf {
            warn!(
                "eBPF fallback: this kernel checks CAP_BPF on every bpf() call, map reads included: keeping CAP_BPF after attaching"
            );
        }
        match system::drop_capabilities(keep_bpf) {
            Ok(kept) => info!(
                ?kept,
                "{done}; dropped every other capability (no further mounts possible)"
            ),
            Err(e) => warn!("could not drop capabilities after attaching: {e}"),
        }
    }
    Ok(Prepared { cfg, kernel })
}
