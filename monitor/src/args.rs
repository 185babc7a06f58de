//! The command-line arguments of every command, as clap structs. Shared by [`crate::cli`] (the parser),
//! [`crate::config`] (which resolves the sidecar options against the environment and a file) and
//! [`crate::commands`]; this module imports none of them.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};
use regex::Regex;
use serde::Deserialize;

use crate::target::TargetSelector;

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
    // Cap of the socket tables; the help text states the default from its one definition.
    #[arg(long, env = "LEAKWATCH_MAX_SOCKETS", help = crate::analysis::help::max_sockets(), value_parser = clap::value_parser!(u32).range(MAX_SOCKETS_RANGE))]
    pub max_sockets: Option<u32>,
    /// Also watch processes forked by the target.
    #[arg(long, env = "LEAKWATCH_FOLLOW_FORKS")]
    pub follow_forks: bool,
    #[arg(long, env = "LEAKWATCH_PROCFS_SCAN_INTERVAL", help = crate::analysis::help::procfs_scan_interval(), value_parser = parse_duration)]
    pub procfs_scan_interval: Option<Duration>,
}

/// How often the full procfs join runs with eBPF on, unless told.
pub const DEFAULT_PROCFS_SCAN_INTERVAL: Duration = Duration::from_secs(15);

/// Accepted values of `--max-sockets` (and `max_sockets` in the config file).
pub const MAX_SOCKETS_RANGE: std::ops::RangeInclusive<i64> = 64..=4_194_304;

impl KernelArgs {
    /// The options are optional so that a config file can set them too; these are the defaults.
    pub fn max_sockets(&self) -> u32 {
        self.max_sockets
            .unwrap_or(monitor_ebpf::DEFAULT_MAX_SOCKETS)
    }

    pub fn procfs_scan_interval(&self) -> Duration {
        self.procfs_scan_interval
            .unwrap_or(DEFAULT_PROCFS_SCAN_INTERVAL)
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

/// Options shared by `watch`, `check` and `verify`.
#[derive(Args, Debug, Clone)]
pub struct SidecarArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub kernel: KernelArgs,
    /// TOML file with any of these options (keys in snake_case) plus [analysis] and [metric_names] tables.
    #[arg(long, env = "LEAKWATCH_CONFIG", value_parser = existing_file)]
    pub config: Option<PathBuf>,
    /// Name of the target in metrics and logs (default: the process name).
    #[arg(long, env = "LEAKWATCH_NAME")]
    pub name: Option<String>,
    /// The target's Prometheus endpoint, e.g. http://127.0.0.1:8080/metrics. Without it only the kernel
    /// side is watched.
    #[arg(long, env = "LEAKWATCH_METRICS_URL")]
    pub metrics_url: Option<String>,
    /// File holding a bearer token for the metrics endpoint (re-read when it changes; never logged).
    #[arg(long, env = "LEAKWATCH_BEARER_TOKEN_FILE")]
    pub bearer_token_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify an https metrics endpoint.
    #[arg(long, env = "LEAKWATCH_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Timeout of one scrape.
    #[arg(long, env = "LEAKWATCH_SCRAPE_TIMEOUT", value_parser = parse_duration)]
    pub scrape_timeout: Option<Duration>,
    /// Sampling interval.
    #[arg(long, env = "LEAKWATCH_INTERVAL", value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// Address for /metrics and /healthz, where Prometheus and the kubelet reach them [default:
    /// 127.0.0.1:9477]. The live page and /status (peers, clientkeys, stacks) are served here too only
    /// when this is a loopback address; otherwise on --status-listen, or here with --status-token-file.
    #[arg(long, env = "LEAKWATCH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address for the live page, /status and /healthz when --listen is not loopback [default:
    /// 127.0.0.1:9478]. Keep it on loopback (`kubectl port-forward` reaches it) unless the network in
    /// between is trusted.
    #[arg(long, env = "LEAKWATCH_STATUS_LISTEN")]
    pub status_listen: Option<SocketAddr>,
    /// File holding a bearer token: with it, the live page and /status are served on --listen too, to
    /// requests carrying `Authorization: Bearer <token>` (re-read at start; never logged).
    #[arg(long, env = "LEAKWATCH_STATUS_TOKEN_FILE", value_parser = existing_file)]
    pub status_token_file: Option<PathBuf>,
    /// Which side of the tunnel the target is: the server (callers' sockets are the kernel truth) or the
    /// agent (targets' sockets are). `auto` decides from the sockets seen.
    #[arg(long, env = "LEAKWATCH_SIDE", value_enum)]
    pub side: Option<SideArg>,
    #[arg(long, env = "LEAKWATCH_IDLE_TIMEOUT", help = crate::analysis::help::idle_timeout(), value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Where the target serves Go's goroutine profiles (default: /debug/pprof/goroutine next to
    /// --metrics-url; a `debug` parameter given here is replaced). The aggregated profile (?debug=1,
    /// collected concurrently) is read once as a baseline and per task-growth verdict, at most once a
    /// minute, up to 250,000 goroutines; the full dump (?debug=2, which stops the target's world for all
    /// its goroutines) only to confirm an idle-connection verdict, at most every 5 min, up to 10,000
    /// goroutines (the target's go_goroutines) and 64 MiB; a skipped dump is said in the verdict.
    #[arg(long, env = "LEAKWATCH_PPROF_URL")]
    pub pprof_url: Option<String>,
    /// Never fetch goroutine profiles from the target.
    #[arg(long, env = "LEAKWATCH_NO_PPROF")]
    pub no_pprof: bool,
    /// Append every snapshot to this file as a JSON line, for `leakwatch replay` (stops at 256 MiB).
    #[arg(long, env = "LEAKWATCH_RECORD")]
    pub record: Option<PathBuf>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SideArg {
    Server,
    Agent,
    Auto,
}

/// `leakwatch watch`.
#[derive(Args, Debug)]
pub struct WatchArgs {
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

/// `leakwatch check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub sidecar: SidecarArgs,
    /// How long to watch.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also serve /metrics, /status and /healthz while checking (on --listen).
    #[arg(long)]
    pub serve: bool,
}

/// `leakwatch verify`.
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
    #[arg(long, help = crate::analysis::help::verify_settle(), value_parser = parse_duration)]
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
    #[arg(long, help = crate::analysis::help::verify_tolerance())]
    pub tolerance: Option<f64>,
    #[arg(long, help = crate::analysis::help::verify_heap_tolerance())]
    pub heap_tolerance: Option<f64>,
    #[arg(long)]
    pub json: bool,
    /// Also write the run as one self-contained HTML file: charts over time with the baseline, load and
    /// settle window shaded, verdicts and each criterion marked.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

/// `leakwatch replay`.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// A recording written by `watch --record` / `check --record` (one JSON snapshot per line).
    pub recording: PathBuf,
    /// TOML file with an [analysis] table of thresholds to try (same keys as the sidecar's config file).
    #[arg(long, value_parser = existing_file)]
    pub config: Option<PathBuf>,
    /// Which side of the tunnel was recorded.
    #[arg(long, value_enum, default_value = "auto")]
    pub side: SideArg,
    /// Print the verdict changes as JSON lines.
    #[arg(long)]
    pub json: bool,
    /// Also write the recording as one self-contained HTML file (the charts of `verify --report`, with
    /// the load phases and verdicts this replay found).
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}
