//! The pooled proxy transports end to end (real processes, loopback): what Rancher v2.10.3 leaked
//! (`per-request`), its fix (`per-request-idle`), a healthy shared pool, the keep-alive load
//! driver and the idle-clients noise. Every wait polls `/metrics` or /proc with a deadline.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SETTLE: Duration = Duration::from_secs(10);

fn live(m: &Metrics) -> f64 {
    m.add() - m.remove()
}

fn backend_sockets(t: &Tunnel) -> usize {
    established_to_port(t.agent.pid(), port_of(&t.backend_addr))
}

fn dump(t: &Tunnel) -> String {
    let (status, body) = http_get(&t.server_addr, "/debug/pprof/goroutine?debug=2");
    assert_eq!(status, 200);
    String::from_utf8(body).expect("utf8 dump")
}

#[test]
fn per_request_leaves_one_idle_tunneled_connection_per_request() {
    let t = start_tunnel(&["--proxy-transport", "per-request"], &[]);
    let base = t.metrics();
    assert_eq!(live(&base), 0.0);

    let s = run_load(&t.proxy_url("/"), 30, 4, &["--keep-alive"]);
    assert_eq!(s["ok"], 30, "{s}");
    // The callers kept their own connections: at most one per worker.
    assert!(s["connections"].as_u64().expect("connections") <= 4, "{s}");
    let mut last = String::new();
    let leaked = eventually(SETTLE, || {
        let m = t.metrics();
        last = format!(
            "add {} remove {} tasks {} (base {}) agent->backend {} server cw {}",
            m.add(),
            m.remove(),
            m.tasks(),
            base.tasks(),
            backend_sockets(&t),
            close_wait(t.server.pid())
        );
        m.add() == 30.0
            && m.remove() == 0.0
            && backend_sockets(&t) == 30
            // Two tasks per pooled connection (readLoop and idle timer analogues).
            && m.tasks() >= base.tasks() + 60.0
            && m.sum("reftunnel_session_connections") == 30.0
    });
    assert!(leaked, "per-request symptom missing: {last}");
    // Callers were served and closed normally: nothing in CLOSE_WAIT on either side.
    assert_eq!(close_wait(t.server.pid()), 0);
    assert_eq!(close_wait(t.agent.pid()), 0);

    // It grows by one per request, without keep-alive callers too.
    let s = run_load(&t.proxy_url("/"), 20, 4, &[]);
    assert_eq!(s["ok"], 20, "{s}");
    assert!(
        eventually(SETTLE, || {
            let m = t.metrics();
            live(&m) == 50.0 && backend_sockets(&t) == 50
        }),
        "add-remove did not reach 50"
    );
    // And nothing drains it: watched for 3 s (an observation window, not a synchronisation).
    assert!(
        !eventually(secs(3), || live(&t.metrics()) < 50.0
            || backend_sockets(&t) < 50),
        "per-request connections drained"
    );

    // The dump shows each idle pooled connection as Go's idle persistConn over remotedialer.
    let d = dump(&t);
    let idle_read_loops = d
        .split("\n\n")
        .filter(|b| b.contains("reftunnel.server.pool_conn()"))
        .filter(|b| {
            b.contains(" [sync.Cond.Wait")
                && b.contains("\nnet/http.(*persistConn).readLoop(")
                && b.contains("\ngithub.com/rancher/remotedialer.(*connection).Read(")
        })
        .count();
    assert_eq!(idle_read_loops, 50, "{d}");
    let write_loops = d
        .split("\n\n")
        .filter(|b| b.contains("net/http.(*persistConn).writeLoop(") && b.contains(" [select"))
        .count();
    assert_eq!(write_loops, 50);
}

#[test]
fn per_request_idle_drains_after_its_idle_timeout() {
    let t = start_tunnel(&["--proxy-transport", "per-request-idle=2s"], &[]);
    let s = run_load(&t.proxy_url("/"), 30, 4, &["--keep-alive"]);
    let load_done = Instant::now();
    assert_eq!(s["ok"], 30, "{s}");
    let m = t.metrics();
    assert_eq!(m.add(), 30.0);
    // Right after the burst the connections are idle in their pools, not closed yet: what a
    // client that dropped its pool at once would get wrong.
    assert!(
        live(&m) >= 20.0,
        "closed too early: add {} remove {}",
        m.add(),
        m.remove()
    );
    let mut last = String::new();
    let drained = eventually(SETTLE, || {
        let m = t.metrics();
        last = format!(
            "add {} remove {} agent->backend {}",
            m.add(),
            m.remove(),
            backend_sockets(&t)
        );
        m.add() == m.remove() && backend_sockets(&t) == 0
    });
    let took = load_done.elapsed();
    assert!(drained, "did not drain: {last}");
    eprintln!("per-request-idle=2s drained {took:?} after the load ended");
    assert!(
        took >= Duration::from_millis(1500),
        "drained in {took:?}, before the idle timeout"
    );
    let d = dump(&t);
    assert!(!d.contains("reftunnel.server.pool_conn()"), "{d}");
}

#[test]
fn shared_pool_stays_bounded_and_reuses_connections() {
    let t = start_tunnel(&["--proxy-transport", "shared"], &[]);
    let url = t.proxy_url("/");
    let mut load = Command::new(BIN)
        .args(["load", "--url", &url, "--requests", "200", "--rate", "50"])
        .args(["--concurrency", "4", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("load");
    let mut max_live = 0.0f64;
    let mut max_sockets = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while load.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "load did not finish");
        max_live = max_live.max(live(&t.metrics()));
        max_sockets = max_sockets.max(backend_sockets(&t));
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = String::new();
    load.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    let s: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(s["ok"], 200, "{s}");
    let m = t.metrics();
    eprintln!(
        "shared: {} adds for 200 requests, max live {max_live}, max agent sockets {max_sockets}",
        m.add()
    );
    assert!(max_live <= 4.0, "live {max_live} above the concurrency");
    assert!(max_sockets <= 4, "agent sockets {max_sockets}");
    assert!(
        m.add() <= 4.0,
        "no reuse: {} adds for 200 requests",
        m.add()
    );
    // The pool keeps its idle connections (90 s timeout): live, with no caller behind them.
    assert!(live(&m) >= 1.0);
}

#[test]
fn keep_alive_load_against_the_pipe_transport_falls_back_to_one_socket_per_request() {
    let t = start_tunnel(&[], &[]);
    let s = run_load(&t.proxy_url("/"), 40, 4, &["--keep-alive"]);
    assert_eq!(s["ok"], 40, "{s}");
    // The pipe transport answers `Connection: close`: every request needed its own socket.
    assert_eq!(s["connections"], 40, "{s}");
    assert!(eventually(SETTLE, || {
        let m = t.metrics();
        m.add() == 40.0 && m.remove() == 40.0
    }));
}

/// Reads one response with Content-Length from a persistent connection.
fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).expect("read"), 1, "EOF in head");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).expect("utf8 head");
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("content-length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("body");
    (head, body)
}

#[test]
fn backend_keeps_connections_alive_and_honours_close() {
    let backend = spawn(&["backend"]);
    let addr = backend.listening_addr().unwrap();
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.set_read_timeout(Some(secs(10))).expect("timeout");
    for path in ["/", "/bytes/100000", "/healthz"] {
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let (head, _) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(!head.to_ascii_lowercase().contains("connection: close"));
    }
    // HEAD announces a length and sends no body: the next response must parse.
    write!(
        s,
        "HEAD /bytes/5 HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .expect("write");
    let mut byte = [0u8; 1];
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("head");
        head.push(byte[0]);
    }
    let (head2, body) = read_response(&mut s);
    assert!(head2.starts_with("HTTP/1.1 200"), "{head2}");
    assert_eq!(body, b"hello from reftunnel backend\n");
    // Connection: close is answered in kind, and the backend closes its side.
    write!(s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("read to EOF");
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("Connection: close"), "{text}");
}

#[test]
fn idle_clients_hold_keep_alive_connections_and_extra_agents_connect() {
    let t = start_tunnel(&["--proxy-transport", "shared"], &[]);
    let extra: Vec<Proc> = ["other-2", "other-3"]
        .iter()
        .map(|id| {
            let a = start_agent_id(&t.server_addr, TOKEN, id, &[]);
            a.wait_line("connected to", secs(10)).unwrap();
            t.server
                .wait_line(&format!("agent {id} connected"), secs(10))
                .unwrap();
            a
        })
        .collect();
    let (status, body) = http_get(&t.server_addr, "/proxy/other-3/");
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"hello from reftunnel backend\n"[..])
    );

    let url = format!("http://{}", t.server_addr);
    let mut idle = spawn(&[
        "idle-clients",
        "--url",
        &url,
        "--count",
        "20",
        "--period",
        "200ms",
    ]);
    idle.wait_line("idle-clients holding 20 connections", secs(20))
        .unwrap();
    let server_port = port_of(&t.server_addr);
    assert!(
        eventually(SETTLE, || established_to_port(idle.pid(), server_port)
            == 20),
        "idle clients hold {}",
        established_to_port(idle.pid(), server_port)
    );
    let m = t.metrics();
    assert_eq!(m.sum("session_server_total_add_websocket_session"), 3.0);
    // Still the same 20 connections after several request periods: kept alive, not redialed.
    assert!(!eventually(secs(1), || established_to_port(
        idle.pid(),
        server_port
    ) != 20));
    let (_, tasks) = http_get(&t.server_addr, "/debug/tasks");
    let tasks = String::from_utf8_lossy(&tasks);
    assert!(tasks.contains("server.conn"), "{tasks}");

    let st = Command::new("kill")
        .args(["-TERM", &idle.pid().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let deadline = Instant::now() + secs(10);
    let exit = loop {
        if let Some(s) = idle.child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "idle-clients ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
    drop(extra);
}

#[test]
fn stuck_pipe_needs_the_pipe_transport() {
    let out = Command::new(BIN)
        .args(["server", "--token", "t", "--backend", "127.0.0.1:1"])
        .args(["--proxy-transport", "shared", "--leak", "stuck-pipe"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pipe"));
    let out = Command::new(BIN)
        .args(["server", "--token", "t", "--backend", "127.0.0.1:1"])
        .args(["--proxy-transport", "pooled"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("per-request-idle"));
}
