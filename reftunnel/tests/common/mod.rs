//! Process, HTTP, metrics and /proc helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use testsupport::{CLIENT, Proc, Tunnel};
use testsupport::{TunnelSpec, agent_args, load_args, server_args};

pub const BIN: &str = env!("CARGO_BIN_EXE_reftunnel");
pub const TOKEN: &str = "s3cret-token";

/// reftunnel as every test runs it: quiet logs, no metrics switch from the environment, nothing on
/// stdin, stderr dropped (the tests read stdout).
pub fn reftunnel_cmd() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("RUST_LOG", "warn")
        .env_remove("CATTLE_PROMETHEUS_METRICS")
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

pub fn spawn(args: &[&str]) -> Proc {
    Proc::spawn(reftunnel_cmd().args(args)).expect("spawn reftunnel")
}

/// backend + server + agent, the agent connected, with extra server and agent arguments.
pub fn start_tunnel(server_extra: &[&str], agent_extra: &[&str]) -> Tunnel {
    let owned = |a: &[&str]| a.iter().map(|s| s.to_string()).collect();
    let t = Tunnel::start(&TunnelSpec {
        reftunnel: &reftunnel_cmd,
        token: TOKEN,
        server_extra: owned(server_extra),
        agent_extra: owned(agent_extra),
    })
    .expect("start the tunnel");
    t.agent
        .wait_line("connected to", secs(10))
        .expect("the agent connects");
    t
}

pub trait TunnelMetrics {
    fn metrics(&self) -> Metrics;
}

impl TunnelMetrics for Tunnel {
    fn metrics(&self) -> Metrics {
        let (status, body) = http_get(&self.server_addr, "/metrics");
        assert_eq!(status, 200);
        Metrics(String::from_utf8(body).expect("utf8 metrics"))
    }
}

pub fn start_server(listen: &str, backend: &str, extra: &[&str]) -> (Proc, String) {
    let p = Proc::launch(
        reftunnel_cmd()
            .args(server_args(listen, TOKEN, backend))
            .args(extra),
    )
    .name("server")
    .spawn()
    .expect("spawn the server");
    let addr = p.listening_addr().expect("the server listens");
    (p, addr)
}

pub fn start_agent(server_addr: &str, token: &str, extra: &[&str]) -> Proc {
    start_agent_id(server_addr, token, CLIENT, extra)
}

pub fn start_agent_id(server_addr: &str, token: &str, id: &str, extra: &[&str]) -> Proc {
    Proc::launch(
        reftunnel_cmd()
            .args(agent_args(server_addr, token, id))
            .args(extra),
    )
    .name("agent")
    .spawn()
    .expect("spawn the agent")
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Blocking one-shot GET with `Connection: close`, reading to EOF.
pub fn http_get(addr: &str, path: &str) -> (u16, Vec<u8>) {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
}

pub fn http_request(addr: &str, raw: &str) -> (u16, Vec<u8>) {
    let r = testsupport::http_request(addr, raw, secs(15)).expect("HTTP exchange");
    (r.status, r.body)
}

pub struct Metrics(pub String);

impl Metrics {
    /// Sum over all series of `name` (absent = 0).
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
    pub fn has(&self, name: &str) -> bool {
        self.0.lines().any(|l| l.starts_with(name))
    }
    pub fn add(&self) -> f64 {
        self.sum("session_server_total_add_connections")
    }
    pub fn remove(&self) -> f64 {
        self.sum("session_server_total_remove_connections")
    }
    pub fn tasks(&self) -> f64 {
        self.sum("reftunnel_tokio_alive_tasks")
    }
    pub fn heap(&self) -> f64 {
        self.sum("go_memstats_heap_inuse_bytes")
    }
}

pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut out = HashSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for e in dir.flatten() {
        if let Ok(t) = std::fs::read_link(e.path()) {
            let t = t.to_string_lossy().into_owned();
            if let Some(i) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                if let Ok(i) = i.parse() {
                    out.insert(i);
                }
            }
        }
    }
    out
}

/// Sockets of `pid` whose /proc/net/tcp{,6} row passes `keep` (the row's columns: 1 local address,
/// 2 remote address, 3 state in hex, 9 inode), joining the process's socket inodes with the tables.
pub fn count_tcp(pid: u32, keep: impl Fn(&[&str]) -> bool) -> usize {
    let inodes = socket_inodes(pid);
    let mut n = 0;
    for f in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{f}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9
                && cols[9].parse::<u64>().is_ok_and(|i| inodes.contains(&i))
                && keep(&cols)
            {
                n += 1;
            }
        }
    }
    n
}

/// The port of a /proc/net/tcp address column (`0100007F:1F90`).
pub fn hex_port(addr: &str) -> Option<u16> {
    u16::from_str_radix(addr.rsplit(':').next()?, 16).ok()
}

/// Sockets of `pid` in TCP state `state` (hex, e.g. "08" = CLOSE_WAIT).
pub fn tcp_state_count(pid: u32, state: &str) -> usize {
    count_tcp(pid, |cols| cols[3] == state)
}

pub fn close_wait(pid: u32) -> usize {
    tcp_state_count(pid, "08")
}

/// ESTABLISHED sockets of `pid` whose remote port is `port` (e.g. the agent's sockets to the
/// backend).
pub fn established_to_port(pid: u32, port: u16) -> usize {
    count_tcp(pid, |cols| {
        cols[3] == "01" && hex_port(cols[2]) == Some(port)
    })
}

/// ESTABLISHED sockets of `pid` whose *local* port is `port`: on a server, the connections it
/// accepted (callers, agents' and peers' websockets).
pub fn accepted_on_port(pid: u32, port: u16) -> usize {
    count_tcp(pid, |cols| {
        cols[3] == "01" && hex_port(cols[1]) == Some(port)
    })
}

pub fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

/// Polls `f` until it returns true or the timeout passes; returns the last result.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the load driver to completion and returns its JSON summary.
pub fn run_load(url: &str, requests: u32, concurrency: u32, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(load_args(url, requests.into(), 0.0, concurrency.into()))
        .args(["--timeout", "10s", "--json"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "load failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("load json")
}
