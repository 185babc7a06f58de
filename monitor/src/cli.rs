//! Command-line interface. Every option can also come from an environment variable (`LEAKWATCH_*`), and
//! the `watch`-family options from a TOML file (`--config`); the command line wins over the environment,
//! which wins over the file.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use regex::Regex;

use crate::target::TargetSelector;

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
    Watch(crate::commands::watch::WatchArgs),
    /// Watch for a fixed time and exit non-zero with a report if a leak was found (for CI and smoke tests).
    Check(crate::commands::check::CheckArgs),
    /// Run the leak-fix verification recipe against a running tunnel: drive load, wait for quiescence,
    /// report pass/fail per criterion.
    Verify(crate::commands::verify::VerifyArgs),
    /// Run a recording (`--record`) through the analysis again, offline, optionally with other thresholds.
    Replay(crate::commands::replay::ReplayArgs),
}

/// Which process to watch.
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// Watch this pid. A restart under the same pid (new start time) is followed.
    #[arg(long, env = "LEAKWATCH_PID", conflicts_with = "match_")]
    pub pid: Option<u32>,
    /// Watch the process whose name or command line matches this regular expression; re-discovered
    /// when it restarts with a new pid.
    #[arg(
        long = "match",
        id = "match_",
        env = "LEAKWATCH_MATCH",
        value_name = "REGEX"
    )]
    pub match_: Option<String>,
}

impl TargetArgs {
    pub fn selector(&self) -> anyhow::Result<Option<TargetSelector>> {
        match (self.pid, &self.match_) {
            (Some(pid), _) => Ok(Some(TargetSelector::Pid(pid))),
            (None, Some(re)) => {
                let re = Regex::new(re)
                    .map_err(|e| anyhow::anyhow!("--match: invalid regular expression: {e}"))?;
                Ok(Some(TargetSelector::Match(re)))
            }
            (None, None) => Ok(None),
        }
    }
}

/// How the kernel is observed.
#[derive(Args, Debug, Clone)]
pub struct KernelArgs {
    /// Do not load eBPF probes; observe through procfs only.
    #[arg(long, env = "LEAKWATCH_NO_EBPF")]
    pub no_ebpf: bool,
    /// Cap of the in-kernel socket table; sockets beyond it are counted as dropped, never tracked
    /// [default: 65536].
    #[arg(long, env = "LEAKWATCH_MAX_SOCKETS", value_parser = clap::value_parser!(u32).range(MAX_SOCKETS_RANGE))]
    pub max_sockets: Option<u32>,
    /// Also watch processes forked by the target.
    #[arg(long, env = "LEAKWATCH_FOLLOW_FORKS")]
    pub follow_forks: bool,
    /// With eBPF on, how often procfs joins the target's fds with /proc/<pid>/net/tcp{,6} (that file lists
    /// every socket of the network namespace, TIME_WAIT included, and is costly on busy nodes). fds,
    /// threads and RSS are still read every interval; without eBPF (and in `observe`) the join runs every interval.
    /// [default: 15s]
    #[arg(long, env = "LEAKWATCH_PROCFS_SCAN_INTERVAL", value_parser = parse_duration)]
    pub procfs_scan_interval: Option<Duration>,
}

/// Accepted values of `--max-sockets` (and `max_sockets` in the config file).
pub const MAX_SOCKETS_RANGE: std::ops::RangeInclusive<i64> = 64..=4_194_304;

impl KernelArgs {
    /// The options are optional so that a config file can set them too; these are the defaults.
    pub fn max_sockets(&self) -> u32 {
        self.max_sockets.unwrap_or(65_536)
    }

    pub fn procfs_scan_interval(&self) -> Duration {
        self.procfs_scan_interval.unwrap_or(Duration::from_secs(15))
    }
}

#[derive(Args, Debug)]
pub struct ObserveArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub kernel: KernelArgs,
    /// Sampling interval (e.g. `1s`, `500ms`).
    #[arg(long, env = "LEAKWATCH_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Stop after this many lines (default: run until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
    /// Print each snapshot as a JSON line instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Parses `1s`, `250ms`, `2m`... with a floor that keeps a typo from turning into a busy loop.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 1s, 500ms, 2m)"))?;
    if d < Duration::from_millis(10) {
        return Err("must be at least 10ms".into());
    }
    Ok(d)
}

pub fn existing_file(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{s}: no such file"))
    }
}
