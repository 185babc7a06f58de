//! The sidecar's configuration, resolved from the command line, the environment and an optional TOML
//! file (in that order of precedence). Unknown keys in the file are errors, not silently ignored: a typo
//! in an alert-relevant threshold must not go unnoticed.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::{
    analysis::AnalysisConfig,
    args::{KernelArgs, SideArg, SidecarArgs, TargetArgs},
    outputs::http::Listeners,
    sources::scrape::MetricNames,
    target::TargetSelector,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    pid: Option<u32>,
    #[serde(rename = "match")]
    match_: Option<String>,
    name: Option<String>,
    metrics_url: Option<String>,
    bearer_token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    #[serde(default, with = "opt_duration")]
    scrape_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    interval: Option<Duration>,
    listen: Option<SocketAddr>,
    status_listen: Option<SocketAddr>,
    status_token_file: Option<PathBuf>,
    side: Option<SideArg>,
    no_ebpf: Option<bool>,
    analysis: Option<AnalysisConfig>,
    metric_names: Option<MetricNames>,
    record: Option<PathBuf>,
    pprof_url: Option<String>,
    no_pprof: Option<bool>,
    idle_timeout: Option<String>,
    max_sockets: Option<u32>,
    follow_forks: Option<bool>,
    #[serde(default, with = "opt_duration")]
    procfs_scan_interval: Option<Duration>,
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| crate::args::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Everything the sidecar needs, with defaults applied.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub selector: TargetSelector,
    pub name: Option<String>,
    pub metrics_url: Option<String>,
    pub bearer_token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub scrape_timeout: Duration,
    pub interval: Duration,
    /// Where each HTTP audience is served (see [`crate::outputs::http`]).
    pub listeners: Listeners,
    pub no_ebpf: bool,
    pub kernel: KernelArgs,
    pub analysis: AnalysisConfig,
    pub metric_names: MetricNames,
    pub record: Option<PathBuf>,
    /// `None` when profiles are off or there is no metrics URL to derive the address from.
    pub pprof_url: Option<String>,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9477";

/// The status bearer token: a file that is missing, unreadable or empty is a start-up error, never an
/// open /status.
fn read_token(path: &Path) -> Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the status token file {}", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        bail!("the status token file {} is empty", path.display());
    }
    Ok(token.to_string())
}

fn load_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

impl SidecarArgs {
    pub fn resolve(&self) -> Result<SidecarConfig> {
        let file = match &self.config {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        let selector = match self.target.selector()? {
            Some(s) => s,
            None => {
                let from_file = TargetArgs {
                    pid: file.pid,
                    match_: file.match_.clone(),
                };
                match from_file.selector()? {
                    Some(s) => s,
                    None => bail!(
                        "no target: give --pid N or --match REGEX (or pid/match in the config file)"
                    ),
                }
            }
        };
        let mut analysis = file.analysis.unwrap_or_default();
        if let Some(side) = self.side.or(file.side) {
            analysis.side = match side {
                SideArg::Server => crate::analysis::Side::Server,
                SideArg::Agent => crate::analysis::Side::Agent,
                SideArg::Auto => crate::analysis::Side::Auto,
            };
        }
        if let Some(idle) = self.idle_timeout.or(file
            .idle_timeout
            .as_deref()
            .map(crate::args::parse_duration)
            .transpose()
            .map_err(|e| anyhow::anyhow!("idle_timeout in the config file: {e}"))?)
        {
            analysis.idle_timeout_s = idle.as_secs_f64();
        }
        if !(analysis.idle_timeout_s.is_finite() && analysis.idle_timeout_s >= 0.0) {
            bail!(
                "the idle timeout must be a non-negative duration, got {}s",
                analysis.idle_timeout_s
            );
        }
        let metrics_url = self.metrics_url.clone().or(file.metrics_url);
        if let Some(url) = &metrics_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("--metrics-url {url:?} must start with http:// or https://");
            }
        }
        let pprof_url = if self.no_pprof || file.no_pprof.unwrap_or(false) {
            None
        } else {
            self.pprof_url.clone().or(file.pprof_url).or_else(|| {
                metrics_url
                    .as_deref()
                    .and_then(crate::sources::goroutines::pprof_url_for)
            })
        };
        Ok(SidecarConfig {
            selector,
            name: self.name.clone().or(file.name),
            metrics_url,
            bearer_token_file: self.bearer_token_file.clone().or(file.bearer_token_file),
            ca_file: self.ca_file.clone().or(file.ca_file),
            scrape_timeout: self
                .scrape_timeout
                .or(file.scrape_timeout)
                .unwrap_or(Duration::from_secs(5)),
            interval: self
                .interval
                .or(file.interval)
                .unwrap_or(Duration::from_secs(1)),
            listeners: Listeners::plan(
                self.listen
                    .or(file.listen)
                    .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
                self.status_listen.or(file.status_listen),
                match self.status_token_file.clone().or(file.status_token_file) {
                    Some(path) => Some(read_token(&path)?),
                    None => None,
                },
            ),
            no_ebpf: self.kernel.no_ebpf || file.no_ebpf.unwrap_or(false),
            kernel: KernelArgs {
                no_ebpf: self.kernel.no_ebpf || file.no_ebpf.unwrap_or(false),
                max_sockets: match self.kernel.max_sockets.or(file.max_sockets) {
                    Some(n) if !crate::args::MAX_SOCKETS_RANGE.contains(&i64::from(n)) => bail!(
                        "max_sockets must be within {:?}, got {n}",
                        crate::args::MAX_SOCKETS_RANGE
                    ),
                    n => n,
                },
                follow_forks: self.kernel.follow_forks || file.follow_forks.unwrap_or(false),
                procfs_scan_interval: self
                    .kernel
                    .procfs_scan_interval
                    .or(file.procfs_scan_interval),
            },
            analysis,
            metric_names: file.metric_names.unwrap_or_default(),
            record: self.record.clone().or(file.record),
            pprof_url,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sidecar: SidecarArgs,
    }

    fn resolve(file: &str, args: &[&str]) -> Result<SidecarConfig> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("leakwatch.toml");
        std::fs::write(&path, file).expect("write config");
        let path = path.display().to_string();
        let mut argv = vec!["leakwatch", "--config", &path];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .expect("arguments parse")
            .sidecar
            .resolve()
    }

    #[test]
    fn every_option_comes_from_the_file_too_and_the_command_line_wins() {
        let file = r#"
            pid = 1
            max_sockets = 4096
            follow_forks = true
            procfs_scan_interval = "30s"
            idle_timeout = "120s"
            [analysis]
            window_s = 60.0
        "#;
        let cfg = resolve(file, &[]).expect("valid file");
        assert_eq!(cfg.kernel.max_sockets(), 4096);
        assert!(cfg.kernel.follow_forks);
        assert_eq!(cfg.kernel.procfs_scan_interval(), Duration::from_secs(30));
        assert_eq!(cfg.analysis.idle_timeout_s, 120.0);
        assert_eq!(cfg.analysis.window_s, 60.0);
        let cfg =
            resolve(file, &["--max-sockets", "1024", "--idle-timeout", "30s"]).expect("valid");
        assert_eq!(cfg.kernel.max_sockets(), 1024);
        assert_eq!(cfg.analysis.idle_timeout_s, 30.0);
    }

    #[test]
    fn bad_values_in_the_file_are_refused_with_the_key_named() {
        let err = resolve("pid = 1\nmax_sockets = 3\n", &[]).expect_err("out of range");
        assert!(err.to_string().contains("max_sockets"), "{err:#}");
        let err = resolve("pid = 1\nidle_timeout = \"soon\"\n", &[]).expect_err("not a duration");
        assert!(format!("{err:#}").contains("idle_timeout"), "{err:#}");
        let err = resolve("pid = 1\nmax_socket = 3\n", &[]).expect_err("unknown key");
        assert!(format!("{err:#}").contains("max_socket"), "{err:#}");
    }
}
