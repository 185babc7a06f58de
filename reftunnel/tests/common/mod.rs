//! Process, HTTP, metrics and /proc helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_reftunnel");
pub const TOKEN: &str = "s3cret-token";

pub struct Proc {
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "warn")
            .env_remove("CATTLE_PROMETHEUS_METRICS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn reftunnel");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stdout line containing `needle` (lines already seen are not re-matched).
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line containing {needle:?} within {timeout:?}; saw {:?}",
                        self.seen
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "process exited before printing {needle:?}; saw {:?}",
                        self.seen
                    )
                }
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn last_token(line: &str) -> String {
    line.split_whitespace().last().expect("token").to_owned()
}

pub struct Tunnel {
    pub backend: Proc,
    pub server: Proc,
    pub agent: Proc,
    pub backend_addr: String,
    pub server_addr: String,
}

impl Tunnel {
    pub fn start(server_extra: &[&str], agent_extra: &[&str]) -> Tunnel {
        let mut backend = Proc::spawn(&["backend", "--listen", "127.0.0.1:0"]);
        let backend_addr = last_token(&backend.wait_line("listening on", secs(10)));
        let (server, server_addr) = start_server("127.0.0.1:0", &backend_addr, server_extra);
        let mut agent = start_agent(&server_addr, TOKEN, agent_extra);
        agent.wait_line("connected to", secs(10));
        let mut t = Tunnel {
            backend,
            server,
            agent,
            backend_addr,
            server_addr,
        };
        t.server.wait_line("agent downstream-1 connected", secs(10));
        t
    }

    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}/proxy/downstream-1{path}", self.server_addr)
    }

    pub fn metrics(&self) -> Metrics {
        let (status, body) = http_get(&self.server_addr, "/metrics");
        assert_eq!(status, 200);
        Metrics(String::from_utf8(body).expect("utf8 metrics"))
    }
}

pub fn start_server(listen: &str, backend: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "server",
        "--listen",
        listen,
        "--token",
        TOKEN,
        "--backend",
        backend,
        "--remotedialer-metrics",
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(&args);
    let addr = last_token(&p.wait_line("listening on", secs(10)));
    (p, addr)
}

pub fn start_agent(server_addr: &str, token: &str, extra: &[&str]) -> Proc {
    start_agent_id(server_addr, token, "downstream-1", extra)
}

pub fn start_agent_id(server_addr: &str, token: &str, id: &str, extra: &[&str]) -> Proc {
    let url = format!("ws://{server_addr}/connect");
    let mut args = vec!["agent", "--server", &url, "--token", token, "--id", id];
    args.extend_from_slice(extra);
    Proc::spawn(&args)
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
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(secs(15))).expect("timeout");
    s.write_all(raw.as_bytes()).expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read");
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head")
        + 4;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, buf[end..].to_vec())
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
        .args([
            "load",
            "--url",
            url,
            "--requests",
            &requests.to_string(),
            "--rate",
            "0",
            "--concurrency",
            &concurrency.to_string(),
            "--timeout",
            "10s",
            "--json",
        ])
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
