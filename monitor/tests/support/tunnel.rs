//! The reference tunnel as real processes: backend, server (watched), agent, and the load driver.
use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Finds a workspace binary built by `cargo build` (xtask test builds them before the tests run).
pub fn workspace_bin(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} is not built: run `cargo build -p reftunnel -p monitor` (cargo xtask test does)"
    );
}

/// A child process that is killed when dropped, with its stdout lines on a channel (and, when asked
/// for, its stderr lines on another, still echoed to the test's output).
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub err_lines: Option<mpsc::Receiver<String>>,
}

fn forward_lines(
    stream: impl std::io::Read + Send + 'static,
    echo: bool,
) -> mpsc::Receiver<String> {
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if echo {
                eprintln!("{line}");
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        Self {
            child,
            lines: forward_lines(stdout, false),
            err_lines: None,
        }
    }

    /// Like [`Proc::spawn`], also reading stderr (where leakwatch logs) for [`Proc::wait_err_line`].
    pub fn spawn_reading_stderr(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        Self {
            child,
            lines: forward_lines(stdout, false),
            err_lines: Some(forward_lines(stderr, true)),
        }
    }

    /// Waits for a stderr line containing `needle` (needs [`Proc::spawn_reading_stderr`]).
    pub fn wait_err_line(&self, needle: &str, timeout: Duration) -> String {
        let errs = self
            .err_lines
            .as_ref()
            .expect("spawned with spawn_reading_stderr");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match errs.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("no stderr line containing {needle:?} within {timeout:?}"),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stdout line containing `needle` and returns it.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("no line containing {needle:?} within {timeout:?}"),
            }
        }
    }

    /// Parses `listening on ADDR` from stdout.
    pub fn listening_addr(&self) -> String {
        let line = self.wait_line("listening on", Duration::from_secs(20));
        line.rsplit(' ').next().expect("address").to_string()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub const CLIENT: &str = "downstream-1";

/// Leak settings of one side.
#[derive(Clone, Debug, Default)]
pub struct Leak {
    pub mode: Option<&'static str>,
    pub every: u32,
}

impl Leak {
    pub fn none() -> Self {
        Self::default()
    }
    pub fn mode(mode: &'static str, every: u32) -> Self {
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
        let bin = workspace_bin("reftunnel");
        let backend = Proc::spawn(Command::new(&bin).args(["backend", "--listen", "127.0.0.1:0"]));
        let backend_addr = backend.listening_addr();
        let token = format!(
            "tok{}x{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let peer_token = format!("ptk{}", &token[3..]);
        let server = Self::spawn_server(
            &backend_addr,
            &server_leak,
            "127.0.0.1:0",
            &token,
            &server_extra,
            &peer_token,
            &[],
        );
        let server_addr = server.listening_addr();
        let agent = Self::spawn_agent(&server_addr, &agent_leak, &token);
        server.wait_line(CLIENT, Duration::from_secs(20));
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
    fn spawn_server(
        backend: &str,
        leak: &Leak,
        listen: &str,
        token: &str,
        extra: &[String],
        peer_token: &str,
        peers: &[String],
    ) -> Proc {
        let mut peer_args = vec![
            "--peer-id".to_string(),
            PEER_ID.to_string(),
            "--peer-token".to_string(),
            peer_token.to_string(),
            "--peer-reconnect-delay".to_string(),
            "200ms".to_string(),
        ];
        if !peers.is_empty() {
            peer_args.push("--peers".into());
            peer_args.push(peers.join(","));
        }
        let bin = workspace_bin("reftunnel");
        Proc::spawn(
            Command::new(bin)
                .args([
                    "server",
                    "--listen",
                    listen,
                    "--token",
                    token,
                    "--remotedialer-metrics",
                    "--backend",
                    backend,
                ])
                .args(leak.args())
                .args(extra)
                .args(peer_args),
        )
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
            Command::new(workspace_bin("reftunnel"))
                .args(["server", "--listen", "127.0.0.1:0", "--token", &own_token])
                .args(["--remotedialer-metrics", "--backend", &self.backend_addr])
                .args(["--peer-id", &id, "--peer-token", &self.peer_token])
                .args(["--peers", &first, "--peer-reconnect-delay", "200ms"])
                .args(leak.args())
                .args(extra),
        );
        let addr = proc.listening_addr();
        // remotedialer's AddPeer on the first server, as Rancher's peer manager does when a
        // replica appears: the first server then dials the new one and announces its agents.
        let spec = format!("{id}:{}:ws://{addr}/connect", self.peer_token);
        let reply = post(
            &self.server_addr,
            "/peers",
            &[("X-API-Tunnel-Token", self.peer_token.as_str())],
            &spec,
        );
        assert!(
            reply
                .as_deref()
                .is_some_and(|r| r.starts_with("HTTP/1.1 200")),
            "POST /peers to the first server: {reply:?}"
        );
        peers.push(spec);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let routes = super::http_get(&format!("http://{addr}/peers")).unwrap_or_default();
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

    fn spawn_agent(server_addr: &str, leak: &Leak, token: &str) -> Proc {
        Self::spawn_agent_as(server_addr, leak, token, CLIENT)
    }

    /// Another agent with its own client id: one more websocket the server holds open.
    pub fn extra_agent(&self, id: &str) -> Proc {
        let agent = Self::spawn_agent_as(&self.server_addr, &Leak::none(), &self.token, id);
        self.server.wait_line(id, Duration::from_secs(20));
        agent
    }

    /// Long-lived keep-alive callers of the server that are not tunneled connections (UI sessions,
    /// watches): `count` connections, each asking for /healthz every `period`.
    pub fn idle_clients(&self, count: u32, period: &str) -> Proc {
        let clients = Proc::spawn(Command::new(workspace_bin("reftunnel")).args([
            "idle-clients",
            "--url",
            &format!("http://{}", self.server_addr),
            "--count",
            &count.to_string(),
            "--period",
            period,
        ]));
        clients.wait_line("idle-clients holding", Duration::from_secs(30));
        clients
    }

    fn spawn_agent_as(server_addr: &str, leak: &Leak, token: &str, id: &str) -> Proc {
        let bin = workspace_bin("reftunnel");
        Proc::spawn(
            Command::new(bin)
                .args([
                    "agent",
                    "--server",
                    &format!("ws://{server_addr}/connect"),
                    "--token",
                    token,
                    "--id",
                    id,
                ])
                .args(leak.args()),
        )
    }

    /// Kills the server and starts a new one on the same port (a restart: new pid, counters reset),
    /// then waits for the agent to reconnect.
    pub fn restart_server(&mut self) {
        self.server.kill();
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.server = Self::spawn_server(
            &self.backend_addr,
            &self.server_leak.clone(),
            &self.server_addr,
            &self.token,
            &self.server_extra,
            &self.peer_token,
            &peers,
        );
        self.server.listening_addr();
        self.server.wait_line(CLIENT, Duration::from_secs(30));
    }

    /// The proxy URL of `path` on another server (a peer from [`Tunnel::start_peer_server`]).
    pub fn proxy_url_on(addr: &str, path: &str) -> String {
        format!(
            "http://{addr}/proxy/{CLIENT}/{}",
            path.trim_start_matches('/')
        )
    }

    /// A `--match` pattern that finds this tunnel's server, across restarts.
    pub fn server_pattern(&self) -> String {
        format!("reftunnel server .*{}", self.token)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.server_addr)
    }

    pub fn proxy_url(&self, path: &str) -> String {
        format!(
            "http://{}/proxy/{CLIENT}/{}",
            self.server_addr,
            path.trim_start_matches('/')
        )
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
        let mut cmd = Command::new(workspace_bin("reftunnel"));
        cmd.args(["load", "--url", &Self::proxy_url_on(addr, path)])
            .args(["--requests", &requests.to_string()])
            .args(["--rate", &rate.to_string()])
            .args(["--concurrency", &concurrency.to_string()])
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
        Proc::spawn(&mut Self::load_cmd(
            addr,
            path,
            requests,
            rate,
            concurrency,
            true,
        ))
    }

    /// Starts the load driver in the background.
    pub fn load_bg(&self, path: &str, requests: u64, rate: u64, concurrency: u64) -> Proc {
        Proc::spawn(&mut Self::load_cmd(
            &self.server_addr,
            path,
            requests,
            rate as f64,
            concurrency,
            false,
        ))
    }
}

/// A one-shot HTTP/1.1 POST on loopback; the whole response, or None if the exchange failed.
fn post(addr: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut req = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}
