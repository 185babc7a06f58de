//! End-to-end over loopback with the real binary: backend + server + agent, load through
//! `/proxy/<id>/`, and each leak mode's symptom checked in /metrics and in the kernel's view of
//! the processes (fds, CLOSE_WAIT sockets).

mod common;

use std::process::Command;

use common::*;

const SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

#[test]
fn healthy_tunnel_balances_and_returns_to_baseline() {
    let t = start_tunnel(&[], &[]);
    // Warm up so that lazily created runtime/allocator state is part of the baseline.
    run_load(&t.proxy_url("/"), 20, 4, &[]);
    assert!(eventually(SETTLE, || {
        let m = t.metrics();
        m.add() == m.remove()
    }));
    let base = t.metrics();
    let (base_fds_s, base_fds_a) = (fd_count(t.server.pid()), fd_count(t.agent.pid()));

    let (status, body) = http_get(&t.server_addr, "/proxy/downstream-1/bytes/1048576");
    assert_eq!(status, 200);
    assert_eq!(body.len(), 1 << 20);
    let (status, body) = http_get(&t.server_addr, "/proxy/downstream-1/");
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"hello from reftunnel backend\n"[..])
    );

    let s = run_load(&t.proxy_url("/"), 300, 16, &[]);
    assert_eq!(s["ok"], 300, "{s}");

    let mut last = String::new();
    let settled = eventually(SETTLE, || {
        let m = t.metrics();
        let ok = m.add() == base.add() + 302.0
            && m.remove() == m.add()
            && m.tasks() <= base.tasks() + 2.0
            && fd_count(t.server.pid()) <= base_fds_s + 2
            && fd_count(t.agent.pid()) <= base_fds_a + 2
            && close_wait(t.server.pid()) == 0
            && close_wait(t.agent.pid()) == 0
            && m.sum("reftunnel_session_connections") == 0.0;
        last = format!(
            "add {} remove {} tasks {} (base {}) fds {} {} (base {base_fds_s} {base_fds_a}) cw {} {}",
            m.add(),
            m.remove(),
            m.tasks(),
            base.tasks(),
            fd_count(t.server.pid()),
            fd_count(t.agent.pid()),
            close_wait(t.server.pid()),
            close_wait(t.agent.pid()),
        );
        ok
    });
    assert!(settled, "did not return to baseline: {last}");
    let m = t.metrics();
    // Connection state is freed: 300 leaked ballasts alone would be ~4.8 MiB.
    assert!(
        m.heap() < base.heap() + 1024.0 * 1024.0,
        "heap {} vs base {}",
        m.heap(),
        base.heap()
    );
    assert_eq!(m.sum("session_server_total_add_websocket_session"), 1.0);
    assert!(m.sum("session_server_total_transmit_bytes") > 0.0);
    assert!(m.sum("session_server_total_receive_bytes") > (1 << 20) as f64);
    assert_eq!(m.sum("reftunnel_leaks_injected_total"), 0.0);
    assert!(m.sum("go_goroutines") == m.tasks());
    for name in ["go_threads", "process_open_fds", "process_max_fds"] {
        assert!(m.sum(name) > 0.0, "{name} missing");
    }
}

#[test]
fn remotedialer_metrics_are_opt_in() {
    let backend = spawn(&["backend"]);
    let baddr = backend.listening_addr().unwrap();
    let server = spawn(&["server", "--token", TOKEN, "--backend", &baddr]);
    let saddr = server.listening_addr().unwrap();
    let (_, body) = http_get(&saddr, "/metrics");
    let m = Metrics(String::from_utf8(body).expect("utf8"));
    assert!(!m.has("session_server_"), "{}", m.0);
    assert!(m.has("go_goroutines"));
    assert!(m.has("go_memstats_heap_inuse_bytes"));
}

#[test]
fn wrong_or_missing_token_is_refused() {
    let backend = spawn(&["backend"]);
    let baddr = backend.listening_addr().unwrap();
    let (_server, saddr) = start_server("127.0.0.1:0", &baddr, &[]);
    let upgrade = |headers: &str| {
        http_request(
            &saddr,
            &format!(
                "GET /connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}\r\n"
            ),
        )
        .0
    };
    assert_eq!(
        upgrade("X-API-Tunnel-ID: a\r\nX-API-Tunnel-Token: wrong\r\n"),
        401
    );
    assert_eq!(upgrade("X-API-Tunnel-ID: a\r\n"), 401);
    assert_eq!(upgrade(&format!("X-API-Tunnel-Token: {TOKEN}\r\n")), 401);

    let agent = start_agent(&saddr, "wrong", &[]);
    let line = agent.wait_line("connect failed", secs(10)).unwrap();
    assert!(line.contains("401"), "{line}");
    let (_, body) = http_get(&saddr, "/metrics");
    let m = Metrics(String::from_utf8(body).expect("utf8"));
    assert_eq!(m.sum("session_server_total_add_websocket_session"), 0.0);
    // No session: proxying is refused, not hung.
    let (status, _) = http_get(&saddr, "/proxy/downstream-1/");
    assert_eq!(status, 503);
}

#[test]
fn skip_remove_leaks_map_entries_not_sockets() {
    let t = start_tunnel(&["--leak", "skip-remove"], &[]);
    let base = t.metrics();
    let base_fds = fd_count(t.server.pid());
    let s = run_load(&t.proxy_url("/"), 100, 8, &[]);
    assert_eq!(s["ok"], 100, "{s}");
    assert!(eventually(SETTLE, || t.metrics().add() == 100.0));
    let settled = eventually(SETTLE, || {
        close_wait(t.server.pid()) == 0 && fd_count(t.server.pid()) <= base_fds + 2
    });
    assert!(settled, "server sockets not closed");
    let m = t.metrics();
    assert_eq!(m.remove(), 0.0);
    assert_eq!(m.sum("reftunnel_session_connections"), 100.0);
    assert_eq!(m.sum("reftunnel_leaks_injected_total"), 100.0);
    // 100 entries x 16 KiB of per-connection buffer stay allocated.
    assert!(
        m.heap() > base.heap() + 100.0 * 16.0 * 1024.0 * 0.9,
        "heap {} base {}",
        m.heap(),
        base.heap()
    );
}

#[test]
fn stuck_pipe_holds_tasks_and_close_wait() {
    let t = start_tunnel(&["--leak", "stuck-pipe", "--leak-every", "2"], &[]);
    let base = t.metrics();
    let base_fds = fd_count(t.server.pid());
    let s = run_load(&t.proxy_url("/"), 40, 8, &[]);
    assert_eq!(s["ok"], 40, "{s}");
    let mut last = String::new();
    let ok = eventually(SETTLE, || {
        let m = t.metrics();
        last = format!(
            "add {} remove {} tasks {} cw {} fds {}",
            m.add(),
            m.remove(),
            m.tasks(),
            close_wait(t.server.pid()),
            fd_count(t.server.pid())
        );
        m.add() == 40.0
            && m.remove() == 20.0
            && m.tasks() >= base.tasks() + 20.0
            && close_wait(t.server.pid()) == 20
            // -1: the baseline may still count the closing /metrics scrape socket.
            && fd_count(t.server.pid()) >= base_fds + 20 - 1
    });
    assert!(ok, "stuck-pipe symptom missing: {last}");
    let (_, tasks) = http_get(&t.server_addr, "/debug/tasks");
    let tasks = String::from_utf8_lossy(&tasks);
    assert!(tasks.contains("server.conn"), "{tasks}");
    // The agent side is clean: the agent closed its backend sockets.
    assert_eq!(close_wait(t.agent.pid()), 0);
}

#[test]
fn no_close_leaks_agent_fds() {
    let t = start_tunnel(&[], &["--leak", "no-close"]);
    let base_fds = fd_count(t.agent.pid());
    let s = run_load(&t.proxy_url("/"), 40, 8, &[]);
    assert_eq!(s["ok"], 40, "{s}");
    let mut last = String::new();
    let ok = eventually(SETTLE, || {
        let m = t.metrics();
        last = format!(
            "add {} remove {} agent cw {} fds {} (base {base_fds})",
            m.add(),
            m.remove(),
            close_wait(t.agent.pid()),
            fd_count(t.agent.pid())
        );
        m.add() == 40.0
            && m.remove() == 40.0
            && close_wait(t.agent.pid()) == 40
            && fd_count(t.agent.pid()) >= base_fds + 40 - 1
    });
    assert!(ok, "no-close symptom missing: {last}");
    assert_eq!(close_wait(t.server.pid()), 0);
}

#[test]
fn killed_agent_leaves_nothing_live_on_server() {
    let mut t = start_tunnel(&[], &[]);
    let base = t.metrics();
    let base_fds = fd_count(t.server.pid());
    // Slow requests keep tunneled connections open while the agent dies.
    let url = t.proxy_url("/slow/5000");
    let mut load = Command::new(BIN)
        .args(["load", "--url", &url, "--requests", "6", "--rate", "0"])
        .args(["--concurrency", "6", "--max-error-ratio", "1", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("load");
    assert!(eventually(SETTLE, || t.metrics().add() == 6.0));
    t.agent.kill();
    t.server
        .wait_line("agent downstream-1 disconnected", secs(10))
        .unwrap();
    let status = load.wait().expect("load exit");
    assert!(status.success());
    let mut last = String::new();
    let ok = eventually(SETTLE, || {
        let m = t.metrics();
        last = format!(
            "add {} remove {} tasks {} fds {}",
            m.add(),
            m.remove(),
            m.tasks(),
            fd_count(t.server.pid())
        );
        m.remove() == 6.0
            && m.sum("session_server_total_remove_websocket_session") == 1.0
            && m.tasks() <= base.tasks() - 2.0 + 1.0
            && fd_count(t.server.pid()) <= base_fds
            && close_wait(t.server.pid()) == 0
    });
    assert!(ok, "server kept state of a dead agent: {last}");
}

#[test]
fn agent_reconnects_after_server_restart() {
    let mut t = start_tunnel(&[], &["--backoff-max", "500ms"]);
    let addr = t.server_addr.clone();
    t.server.kill();
    t.agent.wait_line("disconnected", secs(10)).unwrap();
    let (server, _) = start_server(&addr, &t.backend_addr, &[]);
    server
        .wait_line("agent downstream-1 connected", secs(30))
        .unwrap();
    t.server = server;
    let (status, _) = http_get(&addr, "/proxy/downstream-1/");
    assert_eq!(status, 200);
}

#[test]
fn leak_mode_of_the_other_side_is_rejected() {
    let out = Command::new(BIN)
        .args([
            "agent",
            "--server",
            "ws://127.0.0.1:1/connect",
            "--token",
            "t",
            "--id",
            "a",
        ])
        .args(["--leak", "skip-remove"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'skip-remove'") && err.contains("no-close"),
        "{err}"
    );
    let out = Command::new(BIN)
        .args([
            "server",
            "--token",
            "t",
            "--backend",
            "127.0.0.1:1",
            "--leak",
            "no-close",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stuck-pipe"));
}

#[test]
fn load_refuses_non_loopback_targets() {
    let out = Command::new(BIN)
        .args(["load", "--url", "http://192.0.2.1:80/", "--requests", "1"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("non-loopback"));
}

#[test]
fn help_explains_every_command() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["backend", "server", "agent", "load"] {
        assert!(text.contains(cmd), "{text}");
        let sub = Command::new(BIN)
            .args([cmd, "--help"])
            .output()
            .expect("run");
        assert!(sub.status.success());
    }
}
