//! What the monitor tests, the reftunnel tests and xtask all need to drive real processes: a child
//! process whose output can be waited on, the reference tunnel started as backend + server + agent, a
//! one-shot HTTP client, and where the workspace's binaries are.
//!
//! Everything returns [`Result`] so that xtask can report a failure instead of panicking; tests
//! `.expect` it.

mod exposition;
mod http;
mod proc;
mod tunnel;

use std::path::{Path, PathBuf};

pub use exposition::big_exposition;
pub use http::{Response, http_get, http_post, http_request};
pub use proc::{Launch, Proc};
pub use tunnel::{CLIENT, Tunnel, TunnelSpec, agent_args, load_args, proxy_url_on, server_args};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("starting {name} ({cmd}): {source}")]
    Spawn {
        name: String,
        cmd: String,
        source: std::io::Error,
    },
    #[error("{name}: no {stream} line containing {needle:?} within {timeout:?}; saw {seen:?}")]
    Timeout {
        name: String,
        stream: &'static str,
        needle: String,
        timeout: std::time::Duration,
        seen: Vec<String>,
    },
    #[error("{name} exited before printing {needle:?} on {stream}; saw {seen:?}")]
    Exited {
        name: String,
        stream: &'static str,
        needle: String,
        seen: Vec<String>,
    },
    #[error("{0}: its stderr is not read (launch it with read_stderr)")]
    StderrNotRead(String),
    #[error("{name} did not finish within {timeout:?}")]
    NotFinished {
        name: String,
        timeout: std::time::Duration,
    },
    #[error("waiting for {name}: {source}")]
    Wait {
        name: String,
        source: std::io::Error,
    },
    #[error("HTTP exchange with {addr}: {source}")]
    Http {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP response from {addr} has no status line and head: {text:?}")]
    BadResponse { addr: String, text: String },
    #[error("{name} is not built in {target}: run `cargo build -p reftunnel -p monitor`")]
    NotBuilt { name: String, target: PathBuf },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testsupport lives in the workspace")
        .to_path_buf()
}

/// Where cargo puts the workspace's builds: CARGO_TARGET_DIR when set (a worktree, CI), else
/// `target/` in the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A workspace binary from either profile: tests in one crate need binaries of another, which cargo
/// does not build for them (`cargo xtask test` builds them first).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let target = target_dir();
    ["debug", "release"]
        .iter()
        .map(|profile| target.join(profile).join(name))
        .find(|p| p.is_file())
        .ok_or(Error::NotBuilt {
            name: name.to_string(),
            target,
        })
}

/// The release build of a workspace binary: the demo and the benchmarks measure what ships.
pub fn release_bin(name: &str) -> PathBuf {
    target_dir().join("release").join(name)
}
