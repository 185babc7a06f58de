//! The reference tunnel as real processes: backend, server (watched), agent, and the load driver.
use std::{
    process::Command,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use testsupport::{
    CLIENT, Proc, TunnelSpec, agent_args, http_get, http_post, load_args, proxy_url_on, server_args,
};

/// The debug build of reftunnel (`cargo xtask test` builds it before the tests run).
pub fn reftunnel() -> Command {
    Command::new(testsupport::workspace_bin("reftunnel").expect("reftunnel is built"))
}

/// Leak settings of one side.
#[derive(Clone, Debug, Default)]
pub struct Leak {
    pub mode: Option<&'static str>,
    pub every: u32,
}

impl Leak {
    pub const fn none() -> Self {
        Self {
            mode: None,
            every: 0,
        }
    }
    pub const fn mode(mode: &'static str, every: u32) -> Self {
        Self {
            mode: Some(mode),
            every,
        }
    }
    fn args(&self) -> Vec<String> {
        match self.mode {
            Some(m) => vec![
                "--leak".into(),
                m.into(),
                "--leak-every".into(),
                self.every.max(1).to_string(),
            ],
            None => vec![],
        }
    }
}

/// backend + server + agent, wired together on loopback.
pub struct Tunnel {
    pub backend: Proc,
    pub server: Proc,
    pub agent: Proc,
    pub server_addr: String,
    pub backend_addr: String,
    /// Unique per tunnel, so a `--match` on it finds this server and no other.
    pub token: String,
    server_leak: Leak,
    /// Extra server arguments (a proxy transport, say), kept for restarts.
    server_extra: Vec<String>,
    /// The token peered servers authenticate with (`--peer-token`); the server's peer id is
    /// [`PEER_ID`]. Not derived by appending to `token`, so that a peer's command line does not
    /// match [`Tunnel::server_pattern`].
    pub peer_token: String,
    /// `id:token:url` of every server started by [`Tunnel::start_peer_server`], kept for restarts.
    peers: Mutex<Vec<String>>,
}

/// The first server's peer id (remotedialer's `PeerID`).
pub const PEER_ID: &str = "server-a";

impl Tunnel {
    pub fn start(server_leak: Leak, agent_leak: Leak) -> Self {
        Self::start_with(server_leak, agent_leak, &[])
    }

    /// Like [`Tunnel::start`], with extra `reftunnel server` arguments, e.g.
    /// `["--proxy-transport", "per-request"]`.
    pub fn start_with(server_leak: Leak, agent_leak: Leak, server_extra: &[&str]) -> Self {
        let server_extra: Vec<String> = server_extra.iter().map(|s| s.to_string()).collect();
        let token = format!(
            "tok{}x{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let peer_token = format!("ptk{}", &token[3..]);
        let mut spec = Self::spec(&token, &server_leak, &server_extra, &peer_token, &[]);
        spec.agent_extra = agent_leak.args();
        let testsupport::Tunnel {
            backend,
            server,
            agent,
            backend_addr,
            server_addr,
        } = testsupport::Tunnel::start(&spec).expect("start the tunnel");
        Self {
            backend,
            server,
            agent,
            server_addr,
            backend_addr,
            token,
            server_leak,
            server_extra,
            peer_token,
            peers: Mutex::new(Vec::new()),
        }
    }

    /// The first server: peering is on (a peer id and token) so that peers can be added later,
    /// with `peers` (`id:token:url`) to dial from the start (after a restart).
    fn spec<'a>(
        token: &'a str,
        leak: &Leak,
        extra: &[String],
        peer_token: &str,
        peers: &[String],
    ) -> TunnelSpec<'a> {
        let mut server_extra = leak.args();
        server_extra.extend_from_slice(extra);
        server_extra.extend(
            [
                "--peer-id",
                PEER_ID,
                "--peer-token",
                peer_token,
                "--peer-reconnect-delay",
                "200ms",
            ]
            .map(String::from),
        );
        if !peers.is_empty() {
            server_extra.push("--peers".into());
            server_extra.push(peers.join(","));
        }
        TunnelSpec {
            reftunnel: &reftunnel,
            token,
            server_extra,
            agent_extra: Vec::new(),
        }
    }

    /// A second server peered with the first, as in Rancher HA: same backend, no agent of its
    /// own, the first server's transport (`server_extra`) and no leak. Requests to
    /// `http://<addr>/proxy/downstream-1/...` reach the agent through the first server
    /// (`downstream-1::tcp` rows on both). Returns once the new server can route to the agent.
    pub fn start_peer_server(&self) -> (Proc, String) {
        let extra: Vec<&str> = self.server_extra.iter().map(String::as_str).collect();
        self.start_peer_server_with(&Leak::none(), &extra)
    }

    /// [`Tunnel::start_peer_server`] with the peer's own leak and extra `reftunnel server`
    /// arguments (say, `["--proxy-transport", "per-request"]`).
    pub fn start_peer_server_with(&self, leak: &Leak, extra: &[&str]) -> (Proc, String) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let id = format!("server-b{}", peers.len() + 1);
        // Its own agent token: its command line must not match `server_pattern()`.
        let own_token = format!("btk{}", &self.token[3..]);
        let first = format!(
            "{PEER_ID}:{}:ws://{}/connect",
            self.peer_token, self.server_addr
        );
        let proc = Proc::spawn(
            reftunnel()
                .args(server_args("127.0.0.1:0", &own_token, &self.backend_addr))
                .args(["--peer-id", &id, "--peer-token", &self.peer_token])
                .args(["--peers", &first, "--peer-reconnect-delay", "200ms"])
                .args(leak.args())
                .args(extra),
        )
        .expect("spawn");
        let addr = proc.listening_addr().unwrap();
        // remotedialer's AddPeer on the first server, as Rancher's peer manager does when a
        // replica appears: the first server then dials the new one and announces its agents.
        let spec = format!("{id}:{}:ws://{addr}/connect", self.peer_token);
        let reply = http_post(
            &self.server_addr,
            "/peers",
            &[("X-API-Tunnel-Token", self.peer_token.as_str())],
            &spec,
        );
        assert!(
            reply.as_ref().is_ok_and(|r| r.status == 200),
            "POST /peers to the first server: {reply:?}"
        );
        peers.push(spec);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let routes = http_get(&format!("http://{addr}/peers")).unwrap_or_default();
            if routes
                .lines()
                .any(|l| l.starts_with(&format!("session {PEER_ID} ")) && l.contains(CLIENT))
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "peer {id} never learnt {CLIENT} from the first server: {routes}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        (proc, addr)
    }

    /// Another agent with its own client id: one more websocket the server holds open.
    pub fn extra_agent(&self, id: &str) -> Proc {
        let agent = Self::spawn_agent_as(&self.server_addr, &Leak::none(), &self.token, id);
        self.server.wait_line(id, Duration::from_secs(20)).unwrap();
        agent
    }

    /// Long-lived keep-alive callers of the server that are not tunneled connections (UI sessions,
    /// watches): `count` connections, each asking for /healthz every `period`.
    pub fn idle_clients(&self, count: u32, period: &str) -> Proc {
        spawn_idle_clients(&self.server_addr, count, period, Duration::from_secs(30))
    }

    fn spawn_agent_as(server_addr: &str, leak: &Leak, token: &str, id: &str) -> Proc {
        Proc::spawn(
            reftunnel()
                .args(agent_args(server_addr, token, id))
                .args(leak.args()),
        )
        .expect("spawn an agent")
    }

    /// Kills the server and starts a new one on the same port (a restart: new pid, counters reset),
    /// then waits for the agent to reconnect.
    pub fn restart_server(&mut self) {
        self.server.kill();
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let spec = Self::spec(
            &self.token,
            &self.server_leak,
            &self.server_extra,
            &self.peer_token,
            &peers,
        );
        let mut cmd = spec.server_cmd(&self.server_addr, &self.backend_addr);
        self.server = Proc::spawn(&mut cmd).expect("restart the server");
        self.server.listening_addr().unwrap();
        self.server
            .wait_line(CLIENT, Duration::from_secs(30))
            .unwrap();
    }

    /// The proxy URL of `path` on another server (a peer from [`Tunnel::start_peer_server`]).
    pub fn proxy_url_on(addr: &str, path: &str) -> String {
        proxy_url_on(addr, path)
    }

    /// A `--match` pattern that finds this tunnel's server, across restarts.
    pub fn server_pattern(&self) -> String {
        format!("reftunnel server .*{}", self.token)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.server_addr)
    }

    pub fn proxy_url(&self, path: &str) -> String {
        proxy_url_on(&self.server_addr, path)
    }

    /// The load driver's command: `requests` GETs of `path` on the server at `addr`, at most `rate` a
    /// second and `concurrency` at once, over fresh connections or, with `keep_alive`, reused ones.
    pub fn load_cmd(
        addr: &str,
        path: &str,
        requests: u64,
        rate: f64,
        concurrency: u64,
        keep_alive: bool,
    ) -> Command {
        let mut cmd = reftunnel();
        cmd.args(load_args(
            &proxy_url_on(addr, path),
            requests,
            rate,
            concurrency,
        ))
        .args(["--duration-limit", "20min"]);
        if keep_alive {
            cmd.arg("--keep-alive");
        }
        cmd
    }

    /// Runs the load driver to completion.
    pub fn load(
        &self,
        path: &str,
        requests: u64,
        rate: u64,
        concurrency: u64,
    ) -> std::process::Output {
        Self::load_cmd(
            &self.server_addr,
            path,
            requests,
            rate as f64,
            concurrency,
            false,
        )
        .output()
        .expect("run the load driver")
    }

    /// Starts `count` long-lived callers on the server at `addr` (like kubectl watches): each holds one
    /// request to the backend's `/slow/<ms>` open for `ms` milliseconds.
    pub fn slow_callers_bg(addr: &str, count: u64, ms: u64) -> Proc {
        Proc::spawn(
            Self::load_cmd(addr, &format!("/slow/{ms}"), count, 0.0, count, false)
                .args(["--timeout", &format!("{}ms", ms + 60_000)]),
        )
        .expect("spawn")
    }

    /// Starts the keep-alive load driver in the background: `concurrency` caller connections, each
    /// reused for its requests, as a browser or kubectl does.
    pub fn keep_alive_load_bg(
        &self,
        path: &str,
        requests: u64,
        rate: f64,
        concurrency: u64,
    ) -> Proc {
        Self::keep_alive_load_on(&self.server_addr, path, requests, rate, concurrency)
    }

    /// [`Tunnel::keep_alive_load_bg`] against the server at `addr` (a peer, say).
    pub fn keep_alive_load_on(
        addr: &str,
        path: &str,
        requests: u64,
        rate: f64,
        concurrency: u64,
    ) -> Proc {
        Self::load_bg_on(addr, path, requests, rate, concurrency, true)
    }

    fn load_bg_on(
        addr: &str,
        path: &str,
        requests: u64,
        rate: f64,
        concurrency: u64,
        keep_alive: bool,
    ) -> Proc {
        let mut cmd = Self::load_cmd(addr, path, requests, rate, concurrency, keep_alive);
        Proc::spawn(&mut cmd).expect("spawn the load driver")
    }

    /// Starts the load driver in the background.
    pub fn load_bg(&self, path: &str, requests: u64, rate: u64, concurrency: u64) -> Proc {
        Self::load_bg_on(
            &self.server_addr,
            path,
            requests,
            rate as f64,
            concurrency,
            false,
        )
    }
}

/// `reftunnel idle-clients` holding `count` keep-alive connections to the server at `server_addr`, each
/// asking for /healthz every `period`; returns once each has been served (within `ready_within`).
pub fn spawn_idle_clients(
    server_addr: &str,
    count: u32,
    period: &str,
    ready_within: Duration,
) -> Proc {
    let clients = Proc::spawn(reftunnel().args([
        "idle-clients",
        "--url",
        &format!("http://{server_addr}"),
        "--count",
        &count.to_string(),
        "--period",
        period,
    ]))
    .expect("spawn idle-clients");
    clients
        .wait_line("idle-clients holding", ready_within)
        .unwrap();
    clients
}
