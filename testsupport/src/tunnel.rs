use std::{process::Command, time::Duration};

use crate::{Proc, Result};

/// The agent's client id; the server's proxy path names it (`/proxy/downstream-1/...`).
pub const CLIENT: &str = "downstream-1";

/// How long the server may take to see the agent's websocket.
const AGENT_TIMEOUT: Duration = Duration::from_secs(20);

/// What differs between the callers that start a tunnel: which build of reftunnel and in what
/// environment (a closure, as every process of the topology, and any the caller adds later, must be
/// started the same way), the agents' token, and the leak modes or transports under test.
pub struct TunnelSpec<'a> {
    pub reftunnel: &'a dyn Fn() -> Command,
    pub token: &'a str,
    /// More `reftunnel server` arguments: `--leak ...`, `--proxy-transport ...`, peering.
    pub server_extra: Vec<String>,
    /// More `reftunnel agent` arguments for the tunnel's agent.
    pub agent_extra: Vec<String>,
}

/// The arguments every tunnel server takes: where it listens, the agents' token, remotedialer's
/// metrics (which leakwatch and the tests read) and the backend it serves itself.
pub fn server_args(listen: &str, token: &str, backend: &str) -> Vec<String> {
    [
        "server",
        "--listen",
        listen,
        "--token",
        token,
        "--remotedialer-metrics",
        "--backend",
        backend,
    ]
    .map(String::from)
    .to_vec()
}

/// The arguments of an agent `id` dialing the server at `server_addr`.
pub fn agent_args(server_addr: &str, token: &str, id: &str) -> Vec<String> {
    let url = format!("ws://{server_addr}/connect");
    ["agent", "--server", &url, "--token", token, "--id", id]
        .map(String::from)
        .to_vec()
}

impl TunnelSpec<'_> {
    /// The spec's server listening on `listen` (a port to take again after a restart, say).
    pub fn server_cmd(&self, listen: &str, backend: &str) -> Command {
        let mut cmd = (self.reftunnel)();
        cmd.args(server_args(listen, self.token, backend))
            .args(&self.server_extra);
        cmd
    }
}

/// backend + server + agent on loopback, the agent connected.
pub struct Tunnel {
    pub backend: Proc,
    pub server: Proc,
    pub agent: Proc,
    pub backend_addr: String,
    /// The server's listening address: the tunnel's front, /metrics, the agents' /connect.
    pub server_addr: String,
}

impl Tunnel {
    pub fn start(spec: &TunnelSpec) -> Result<Self> {
        let backend = Proc::launch((spec.reftunnel)().args(["backend", "--listen", "127.0.0.1:0"]))
            .name("backend")
            .spawn()?;
        let backend_addr = backend.listening_addr()?;
        let server = Proc::launch(&mut spec.server_cmd("127.0.0.1:0", &backend_addr))
            .name("server")
            .spawn()?;
        let server_addr = server.listening_addr()?;
        let agent = Proc::launch(
            (spec.reftunnel)()
                .args(agent_args(&server_addr, spec.token, CLIENT))
                .args(&spec.agent_extra),
        )
        .name("agent")
        .spawn()?;
        server.wait_line(&format!("agent {CLIENT} connected"), AGENT_TIMEOUT)?;
        Ok(Self {
            backend,
            server,
            agent,
            backend_addr,
            server_addr,
        })
    }

    /// The URL of `path` on the backend, through the tunnel.
    pub fn proxy_url(&self, path: &str) -> String {
        proxy_url_on(&self.server_addr, path)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.server_addr)
    }
}

/// The load driver's arguments: `requests` GETs of `url`, at most `rate` a second (0: as fast as
/// it can) and `concurrency` at once. Callers add what their measurement needs (keep-alive, a time
/// limit, JSON).
pub fn load_args(url: &str, requests: u64, rate: f64, concurrency: u64) -> Vec<String> {
    [
        "load",
        "--url",
        url,
        "--requests",
        &requests.to_string(),
        "--rate",
        &rate.to_string(),
        "--concurrency",
        &concurrency.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// [`Tunnel::proxy_url`] on the server at `addr` (a peer of the tunnel's server, say).
pub fn proxy_url_on(addr: &str, path: &str) -> String {
    format!(
        "http://{addr}/proxy/{CLIENT}/{}",
        path.trim_start_matches('/')
    )
}
