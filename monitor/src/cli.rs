//! Command-line interface. Every option can also come from an environment variable (`LEAKWATCH_*`), and
//! the `watch`-family options from a TOML file (`--config`); the command line wins over the environment,
//! which wins over the file.
use clap::{Parser, Subcommand, ValueEnum};

use crate::args::{CheckArgs, ObserveArgs, ReplayArgs, VerifyArgs, WatchArgs};

#[derive(Parser, Debug)]
#[command(
    name = "leakwatch",
    version,
    about = "Catches connection and task leaks in tunnel processes (remotedialer and the like)",
    long_about = "leakwatch watches one process (the tunnel) through the kernel (eBPF tracepoints and procfs) and \
through its own Prometheus metrics, cross-checks what the application says is open against what the kernel \
says is open, and flags leaked connections and task growth with evidence.\n\n\
Start with `leakwatch observe --match <name>` to see the raw numbers, then run `leakwatch watch` as a sidecar."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, global = true, env = "LEAKWATCH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `leakwatch=debug`).
    #[arg(long, global = true, env = "LEAKWATCH_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print a live one-line view of the kernel and procfs numbers of the target, once per interval.
    Observe(ObserveArgs),
    /// Run as a sidecar: all sources, analysis, and /metrics, /status, /healthz.
    Watch(WatchArgs),
    /// Watch for a fixed time and exit non-zero with a report if a leak was found (for CI and smoke tests).
    ///
    /// Exit codes: 0 no leak, 1 a leak was found, 2 bad usage or set-up, 3 inconclusive (the target was
    /// never found or sampled, or --metrics-url was never read: no verdict then proves nothing).
    Check(CheckArgs),
    /// Run the leak-fix verification recipe against a running tunnel: drive load, wait for quiescence,
    /// report pass/fail per criterion.
    ///
    /// Exit codes: 0 every criterion passed, 1 one failed, 2 bad usage or set-up, 3 inconclusive (a
    /// criterion could not be judged, e.g. no remotedialer ledger or no heap metric; n/a is not a pass).
    Verify(VerifyArgs),
    /// Run a recording (`--record`) through the analysis again, offline, optionally with other thresholds.
    Replay(ReplayArgs),
}
