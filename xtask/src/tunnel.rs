//! The reference tunnel as release processes on loopback: backend, server (the watched process) and agent,
//! as the demo and the benchmarks run it.
use std::{process::Command, time::Duration};

use anyhow::Result;

use crate::{
    procs::{Proc, release_bin},
    util::workspace_root,
};

const TOKEN: &str = "demo-token";
pub const CLIENT: &str = "downstream-1";

pub struct Tunnel {
    /// Held for their lifetime: dropping a [`Proc`] kills it.
    _backend: Proc,
    pub server: Proc,
    pub agent: Proc,
    /// The server's listening address (tunnel front, /metrics, agents' /connect).
    pub addr: String,
}

pub fn start_tunnel(leak: Option<&str>) -> Result<Tunnel> {
    start_tunnel_with(leak, &[])
}

/// [`start_tunnel`] with extra `reftunnel server` arguments, e.g. `["--proxy-transport", "per-request"]`.
pub fn start_tunnel_with(leak: Option<&str>, server_extra: &[&str]) -> Result<Tunnel> {
    let bin = release_bin(&workspace_root(), "reftunnel");
    let backend = Proc::spawn(
        "backend",
        Command::new(&bin).args(["backend", "--listen", "127.0.0.1:0"]),
        false,
    )?;
    let backend_addr = backend.listening_addr()?;
    let mut server_cmd = Command::new(&bin);
    server_cmd.args([
        "server",
        "--listen",
        "127.0.0.1:0",
        "--token",
        TOKEN,
        "--remotedialer-metrics",
        "--backend",
        &backend_addr,
    ]);
    if let Some(mode) = leak {
        server_cmd.args(["--leak", mode]);
    }
    server_cmd.args(server_extra);
    let server = Proc::spawn("server", &mut server_cmd, false)?;
    let addr = server.listening_addr()?;
    let agent = Proc::spawn(
        "agent",
        Command::new(&bin).args([
            "agent",
            "--server",
            &format!("ws://{addr}/connect"),
            "--token",
            TOKEN,
            "--id",
            CLIENT,
        ]),
        false,
    )?;
    server.wait_line(CLIENT, Duration::from_secs(20))?;
    Ok(Tunnel {
        _backend: backend,
        server,
        agent,
        addr,
    })
}
