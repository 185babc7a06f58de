//! The reference tunnel in the shapes of a real Rancher server (tests/rancher.rs): many agents in one
//! process, several backend addrs, per-clientkey transports, watches, idle API clients, a start-up ramp of
//! controllers. Every topology has its own ports and token, so several run side by side, each watched by
//! its own leakwatch.
use std::{
    collections::BTreeSet,
    net::TcpListener,
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use testsupport::{Proc, agent_args, server_args};

use super::{scaled, tunnel::reftunnel};

/// What one topology is made of.
#[derive(Clone, Debug, Default)]
pub struct Shape {
    /// Backend ports (`backend --count`); the first is the server's `--backend`.
    pub backends: u64,
    /// Agents in one `agent --count` process, as `c-0` ... `c-<n-1>`; 1 is the single agent `c`.
    pub agents: u64,
    /// More `reftunnel server` arguments (transports, start-up tasks).
    pub server_extra: Vec<String>,
}

/// The agents' clientid prefix: `c-0` ... with several agents, `c` with one.
pub const AGENT_ID: &str = "c";

/// backend(s) + server + agent process on loopback, every agent connected.
pub struct Topology {
    pub backend: Proc,
    pub backend_addrs: Vec<String>,
    pub server: Proc,
    pub server_addr: String,
    pub agents: Proc,
    pub agent_count: u64,
    /// Unique per topology: a `--match` on it finds this server and no other.
    pub token: String,
}

/// A free loopback port, for a server that must listen where a leakwatch started before it already
/// looks (its `--metrics-url`). The kernel does not hand the same ephemeral port out again at once.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn unique_token() -> String {
    format!(
        "rtok{}x{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

/// A topology whose backend runs and whose server is yet to start: what a leakwatch started before the
/// target needs to know (the server's command-line pattern and metrics URL).
pub struct Pending {
    shape: Shape,
    backend: Proc,
    backend_addrs: Vec<String>,
    pub server_addr: String,
    pub token: String,
}

impl Pending {
    /// A `--match` pattern that finds this topology's server.
    pub fn server_pattern(&self) -> String {
        format!("reftunnel server .*{}", self.token)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.server_addr)
    }

    /// Starts the server and the agents; returns once every agent is connected.
    pub fn start(self) -> Topology {
        let server = Proc::launch(
            reftunnel()
                .args(server_args(
                    &self.server_addr,
                    &self.token,
                    &self.backend_addrs[0],
                ))
                .args(&self.shape.server_extra),
        )
        .name("server")
        .spawn()
        .expect("spawn the server");
        let got = server.listening_addr().expect("the server listens");
        assert_eq!(
            got, self.server_addr,
            "the server took the port it was given"
        );
        let n = self.shape.agents.max(1);
        let agents = Proc::launch(
            reftunnel()
                .args(agent_args(&self.server_addr, &self.token, AGENT_ID))
                .args(["--count", &n.to_string()]),
        )
        .name("agents")
        .spawn()
        .expect("spawn the agents");
        // Each agent's session is announced once; reconnects would repeat an id, so count distinct ones.
        let mut up = BTreeSet::new();
        while (up.len() as u64) < n {
            let line = server
                .wait_line(" connected (session", scaled(Duration::from_secs(60)))
                .expect("every agent connects");
            if let Some(id) = line
                .strip_prefix("agent ")
                .and_then(|l| l.split(' ').next())
            {
                up.insert(id.to_string());
            }
        }
        Topology {
            backend: self.backend,
            backend_addrs: self.backend_addrs,
            server,
            server_addr: self.server_addr,
            agents,
            agent_count: n,
            token: self.token,
        }
    }
}

impl Topology {
    /// Starts the backends; the server and agents follow with [`Pending::start`].
    pub fn prepare(shape: Shape) -> Pending {
        let count = shape.backends.max(1);
        let backend = Proc::launch(reftunnel().args([
            "backend",
            "--listen",
            "127.0.0.1:0",
            "--count",
            &count.to_string(),
        ]))
        .name("backend")
        .spawn()
        .expect("spawn the backend");
        let backend_addrs = (0..count)
            .map(|_| {
                backend
                    .listening_addr()
                    .expect("each backend port is printed")
            })
            .collect();
        Pending {
            shape,
            backend,
            backend_addrs,
            server_addr: format!("127.0.0.1:{}", free_port()),
            token: unique_token(),
        }
    }

    pub fn start(shape: Shape) -> Self {
        Self::prepare(shape).start()
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.server_addr)
    }

    /// The clientid of agent `i` (`c-<i>`, or `c` when there is one agent).
    pub fn client(&self, i: u64) -> String {
        if self.agent_count > 1 {
            format!("{AGENT_ID}-{i}")
        } else {
            AGENT_ID.to_string()
        }
    }

    /// `http://<server>/proxy/<client>/<path>`.
    pub fn proxy_url(&self, client: &str, path: &str) -> String {
        format!(
            "http://{}/proxy/{client}/{}",
            self.server_addr,
            path.trim_start_matches('/')
        )
    }

    /// `http://<server>/proxy/c/<path>`: the base URL `load --clientkeys` and `--addrs` spread from.
    pub fn spread_url(&self, path: &str) -> String {
        self.proxy_url(AGENT_ID, path)
    }

    /// `count` keep-alive API clients of the server that are not tunneled connections; returns once each
    /// has been served.
    pub fn idle_clients(&self, count: u32, period: &str) -> Proc {
        super::tunnel::spawn_idle_clients(
            &self.server_addr,
            count,
            period,
            scaled(Duration::from_secs(60)),
        )
    }

    /// `count` watches of `/watch/<every_s>` held for `hold`, spread over the first `clientkeys` agents
    /// (0: the single agent); returns once all are established.
    pub fn watches(&self, count: u64, every_s: u64, clientkeys: u64, hold: Duration) -> Proc {
        let watches = Proc::spawn(reftunnel().args([
            "watches",
            "--url",
            &self.spread_url(&format!("/watch/{every_s}")),
            "--count",
            &count.to_string(),
            "--clientkeys",
            &clientkeys.to_string(),
            "--hold",
            &format!("{}s", hold.as_secs()),
        ]))
        .expect("spawn watches");
        watches
            .wait_line("watches established", scaled(Duration::from_secs(60)))
            .unwrap();
        watches
    }

    /// The load driver: `requests` GETs of `url` (spread by `extra`, e.g. `--clientkeys 50`), `rate` a
    /// second, `concurrency` at once, over keep-alive caller connections.
    pub fn load(url: &str, requests: u64, rate: f64, concurrency: u64, extra: &[&str]) -> Command {
        let mut cmd = reftunnel();
        cmd.args(testsupport::load_args(url, requests, rate, concurrency))
            .args(["--keep-alive", "--duration-limit", "30min"])
            .args(extra);
        cmd
    }
}

/// Runs a load driver to completion and fails the test if it did not go through.
pub fn finish(mut cmd: Command, what: &str) {
    let out = cmd.output().expect("run the load driver");
    assert!(
        out.status.success(),
        "{what}: the load driver failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits for a held background driver (watches) to end by itself and checks it went well.
pub fn finish_proc(proc: Proc, what: &str, within: Duration) -> String {
    let (status, out) = proc.collect(within).expect("the driver ends");
    assert!(status.success(), "{what} failed: {out}");
    out
}
