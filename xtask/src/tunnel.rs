//! The reference tunnel as release processes on loopback: backend, server (the watched process) and agent,
//! as the demo and the benchmarks run it.
use std::process::Command;

use anyhow::Result;
pub use testsupport::Tunnel;
use testsupport::{TunnelSpec, release_bin};

pub const TOKEN: &str = "demo-token";

pub fn start_tunnel(leak: Option<&str>) -> Result<Tunnel> {
    start_tunnel_with(leak, &[])
}

/// [`start_tunnel`] with extra `reftunnel server` arguments, e.g. `["--proxy-transport", "per-request"]`.
pub fn start_tunnel_with(leak: Option<&str>, server_extra: &[&str]) -> Result<Tunnel> {
    let bin = release_bin("reftunnel");
    let mut extra: Vec<String> = leak
        .map(|mode| vec!["--leak".into(), mode.into()])
        .unwrap_or_default();
    extra.extend(server_extra.iter().map(|s| s.to_string()));
    Ok(Tunnel::start(&TunnelSpec {
        reftunnel: &|| Command::new(&bin),
        token: TOKEN,
        server_extra: extra,
        agent_extra: Vec::new(),
    })?)
}
