//! Two peered servers (Rancher HA) end to end, real processes on loopback: the agent is on A,
//! callers come to B, and B reaches the agent through the websocket A opened to it
//! (`downstream-1::tcp`). Every wait polls `/metrics`, `/peers` or /proc with a deadline.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const SETTLE: Duration = Duration::from_secs(15);
const PEER_TOKEN: &str = "peer-s3cret";

/// The value of one series: `name` with every `label="value"` given (absent = 0).
fn series(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.0.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with('{')))
        .filter(|l| {
            let set = &l[..l.find('}').unwrap_or(l.len())];
            labels
                .iter()
                .all(|(k, v)| set.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn conn_rows(m: &Metrics, clientkey: &str, proto: &str) -> (f64, f64) {
    let l = [("clientkey", clientkey), ("proto", proto)];
    (
        series(m, "session_server_total_add_connections", &l),
        series(m, "session_server_total_remove_connections", &l),
    )
}

fn metrics_of(addr: &str) -> Metrics {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    Metrics(String::from_utf8(body).expect("utf8 metrics"))
}

fn peers_of(addr: &str) -> String {
    let (status, body) = http_get(addr, "/peers");
    assert_eq!(status, 200);
    String::from_utf8(body).expect("utf8")
}

/// `POST /peers` on `addr`: remotedialer's AddPeer at run time (`-id` removes).
fn post_peer(addr: &str, body: &str, token: &str) -> (u16, Vec<u8>) {
    http_request(
        addr,
        &format!(
            "POST /peers HTTP/1.1\r\nHost: {addr}\r\nX-API-Tunnel-Token: {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn delete(addr: &str, path: &str) -> (u16, Vec<u8>) {
    http_request(
        addr,
        &format!("DELETE {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
}

/// backend, server A with the agent, server B peered with A (both ways).
struct Pair {
    _backend: Proc,
    a: Proc,
    b: Proc,
    _agent: Proc,
    backend_addr: String,
    a_addr: String,
    b_addr: String,
}

fn peer_args<'a>(id: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--peer-id",
        id,
        "--peer-token",
        PEER_TOKEN,
        "--peer-reconnect-delay",
        "200ms",
    ];
    v.extend_from_slice(extra);
    v
}

impl Pair {
    /// A starts knowing no peer; B starts with A as its peer, so its first dial is refused (A
    /// does not know B: it falls through to the agents' authentication, 401). A then learns B
    /// with `POST /peers`, dials B, and B's next dial is accepted.
    fn start(a_extra: &[&str], b_extra: &[&str]) -> Pair {
        let backend = spawn(&["backend", "--listen", "127.0.0.1:0"]);
        let backend_addr = backend.listening_addr().unwrap();
        let (a, a_addr) = start_server(
            "127.0.0.1:0",
            &backend_addr,
            &peer_args("server-a", a_extra),
        );
        let agent = start_agent(&a_addr, TOKEN, &[]);
        agent.wait_line("connected to", secs(10)).unwrap();
        a.wait_line(&format!("agent {CLIENT} connected"), secs(10))
            .unwrap();
        let a_peer = format!("server-a:{PEER_TOKEN}:ws://{a_addr}/connect");
        let mut b_args = peer_args("server-b", b_extra);
        b_args.extend_from_slice(&["--peers", &a_peer]);
        let (b, b_addr) = start_server("127.0.0.1:0", &backend_addr, &b_args);
        b.wait_line("peer server-a connect failed", secs(10))
            .unwrap();
        let (status, body) = post_peer(
            &a_addr,
            &format!("server-b:{PEER_TOKEN}:ws://{b_addr}/connect"),
            PEER_TOKEN,
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        b.wait_line("peer server-a connected (session", secs(10))
            .unwrap();
        b.wait_line("peer server-a connected to", secs(10)).unwrap();
        let pair = Pair {
            _backend: backend,
            a,
            b,
            _agent: agent,
            backend_addr,
            a_addr,
            b_addr,
        };
        pair.wait_b_learns_client();
        pair
    }

    /// Until A's AddClient for the agent has reached B.
    fn wait_b_learns_client(&self) {
        let mut last = String::new();
        let ok = eventually(SETTLE, || {
            last = peers_of(&self.b_addr);
            last.lines()
                .any(|l| l.starts_with("session server-a ") && l.contains(CLIENT))
        });
        assert!(ok, "B never learnt {CLIENT} from A: {last}");
    }

    fn b_url(&self, path: &str) -> String {
        format!("http://{}/proxy/{CLIENT}{path}", self.b_addr)
    }

    fn a(&self) -> Metrics {
        metrics_of(&self.a_addr)
    }

    fn b(&self) -> Metrics {
        metrics_of(&self.b_addr)
    }
}

const PEERED: &str = "downstream-1::tcp";

#[test]
fn requests_through_b_reach_the_agent_on_a_and_both_ledgers_balance() {
    let p = Pair::start(&[], &[]);
    let backend = p.backend_addr.as_str();
    let (status, body) = http_get(&p.b_addr, &format!("/proxy/{CLIENT}/bytes/100000"));
    assert_eq!((status, body.len()), (200, 100_000));
    let s = run_load(&p.b_url("/"), 10, 2, &[]);
    assert_eq!(s["ok"], 10, "{s}");
    let mut last = String::new();
    let ok = eventually(SETTLE, || {
        let (a, b) = (p.a(), p.b());
        last = format!(
            "B {:?} A peer {:?} A agent {:?}",
            conn_rows(&b, "server-a", PEERED),
            conn_rows(&a, "client", PEERED),
            conn_rows(&a, CLIENT, "tcp")
        );
        conn_rows(&b, "server-a", PEERED) == (11.0, 11.0)
            && conn_rows(&a, "client", PEERED) == (11.0, 11.0)
            && conn_rows(&a, CLIENT, "tcp") == (11.0, 11.0)
    });
    assert!(ok, "ledgers after 11 requests through B: {last}");
    let (a, b) = (p.a(), p.b());
    // Every row has the backend as addr; B has exactly one connection row family, A two.
    let rows = |m: &Metrics, clientkey: &str| {
        m.0.lines()
            .filter(|l| l.starts_with("session_server_total_add_connections{"))
            .filter(|l| l.contains(&format!("clientkey=\"{clientkey}\"")))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        rows(&b, "server-a"),
        vec![format!(
            "session_server_total_add_connections{{addr=\"{backend}\",clientkey=\"server-a\",proto=\"{PEERED}\"}} 11"
        )]
    );
    assert_eq!(b.add(), 11.0, "{}", b.0);
    assert_eq!(a.add(), 22.0, "{}", a.0);
    // The websockets: each side holds the other's as a peer session, A also the agent's.
    let ws = |m: &Metrics, name: &str, key: &str, peer: &str| {
        series(m, name, &[("clientkey", key), ("peer", peer)])
    };
    let add_ws = "session_server_total_add_websocket_session";
    assert_eq!(ws(&a, add_ws, "server-b", "true"), 1.0);
    assert_eq!(ws(&a, add_ws, CLIENT, "false"), 1.0);
    assert_eq!(ws(&b, add_ws, "server-a", "true"), 1.0);
    assert_eq!(b.sum(add_ws), 1.0);
    // Peer dials: A connected to B at once; B was refused once before A knew it.
    let peer = |m: &Metrics, name: &str, id: &str| {
        series(
            m,
            &format!("session_server_total_peer_ws_{name}"),
            &[("peer", id)],
        )
    };
    assert_eq!(peer(&a, "attempt", "server-b"), 1.0);
    assert_eq!(peer(&a, "connected", "server-b"), 1.0);
    assert!(peer(&b, "attempt", "server-a") >= 2.0, "{}", b.0);
    assert_eq!(peer(&b, "connected", "server-a"), 1.0);
    // As in remotedialer, nothing increments the disconnected counter: no series.
    assert!(!a.0.contains("session_server_total_peer_ws_disconnected{"));
    // Bytes: B counts them on the peer session, A on the peer's client session and the agent's.
    assert!(
        series(
            &b,
            "session_server_total_receive_bytes",
            &[("clientkey", "server-a")]
        ) > 100_000.0
    );
    assert!(
        series(
            &a,
            "session_server_total_transmit_bytes",
            &[("clientkey", "client")]
        ) > 100_000.0
    );
    assert!(
        series(
            &a,
            "session_server_total_receive_bytes",
            &[("clientkey", CLIENT)]
        ) > 100_000.0
    );
    // A client nobody has: B answers as remotedialer's getDialer fails.
    let (status, body) = http_get(&p.b_addr, "/proxy/nobody/");
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("failed to find Session for client nobody"));
}

#[test]
fn long_lived_callers_on_b_are_live_rows_on_a_without_callers_on_a() {
    let p = Pair::start(&[], &[]);
    let a_port = port_of(&p.a_addr);
    let b_port = port_of(&p.b_addr);
    // Accepted on A before: the agent's websocket and B's peer websocket.
    assert_eq!(accepted_on_port(p.a.pid(), a_port), 2);
    let load = Command::new(BIN)
        .args(["load", "--url", &p.b_url("/slow/6000"), "--requests", "4"])
        .args(["--rate", "0", "--concurrency", "4", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("load");
    let mut last = String::new();
    let mut seen = Vec::new();
    let live = eventually(SETTLE, || {
        let (a, b) = (p.a(), p.b());
        let live = |(add, rem): (f64, f64)| add - rem;
        // Each value read once: /proc/net/tcp is not a snapshot, two reads can differ.
        let now = (
            live(conn_rows(&b, "server-a", PEERED)),
            live(conn_rows(&a, "client", PEERED)),
            live(conn_rows(&a, CLIENT, "tcp")),
            accepted_on_port(p.a.pid(), a_port),
            accepted_on_port(p.b.pid(), b_port),
            // Go's clientDial and pipe goroutines on A, for each peered connection.
            series(&a, "reftunnel_tasks", &[("kind", "server.peer_pipe")])
                + series(&a, "reftunnel_tasks", &[("kind", "server.peer_pipe_copy")]),
        );
        last = format!(
            "B live {} A peer live {} A agent live {} A accepted {} B accepted {} A relay tasks {}",
            now.0, now.1, now.2, now.3, now.4, now.5
        );
        if seen.last() != Some(&last) {
            seen.push(last.clone());
        }
        // The callers are B's: A still only has the two websockets.
        now.0 == 4.0 && now.1 == 4.0 && now.2 == 4.0 && now.3 == 2 && now.4 >= 5 && now.5 == 8.0
    });
    assert!(
        live,
        "slow callers on B not live on A: {last}; before: {seen:#?}"
    );
    let out = load.wait_with_output().expect("load");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let balanced = eventually(SETTLE, || {
        let (a, b) = (p.a(), p.b());
        last = format!(
            "A {} / {}, B {} / {}",
            a.add(),
            a.remove(),
            b.add(),
            b.remove()
        );
        a.add() == 8.0 && a.remove() == 8.0 && b.add() == 4.0 && b.remove() == 4.0
    });
    assert!(balanced, "not balanced after the slow callers: {last}");
}

/// Each pooled transport on B dials through the peer session; what its pool keeps open is live on
/// A as well (both of A's rows).
#[test]
fn pooled_transports_on_b_work_through_the_peer() {
    for (transport, after) in [
        ("per-request", 10.0),
        ("per-request-idle=1s", 0.0),
        ("shared=30s", -1.0),
    ] {
        let p = Pair::start(&[], &["--proxy-transport", transport]);
        let s = run_load(&p.b_url("/"), 10, 2, &["--keep-alive"]);
        assert_eq!(s["ok"], 10, "{transport}: {s}");
        let mut last = String::new();
        let ok = eventually(SETTLE, || {
            let (a, b) = (p.a(), p.b());
            let (badd, brem) = conn_rows(&b, "server-a", PEERED);
            let (padd, prem) = conn_rows(&a, "client", PEERED);
            let (cadd, crem) = conn_rows(&a, CLIENT, "tcp");
            last = format!("B {badd}/{brem} A peer {padd}/{prem} A agent {cadd}/{crem}");
            let same = padd == badd && cadd == badd && prem == brem && crem == brem;
            same && if after < 0.0 {
                // shared: reused connections, at most one per caller connection, kept idle.
                badd <= 2.0 && badd - brem == badd
            } else {
                badd == 10.0 && badd - brem == after
            }
        });
        assert!(ok, "{transport}: {last}");
    }
}

#[test]
fn lost_peer_sessions_are_redialed_and_a_restarted_a_is_found_again() {
    let mut p = Pair::start(&[], &[]);
    // Close, on B, the session A opened (the one B routes through): A redials it.
    let (status, _) = delete(&p.b_addr, "/debug/sessions/server-a");
    assert_eq!(status, 200);
    let mut last = String::new();
    let ok = eventually(SETTLE, || {
        let (a, b) = (p.a(), p.b());
        last = format!("A: {}\nB: {}", a.0, b.0);
        series(
            &a,
            "session_server_total_peer_ws_connected",
            &[("peer", "server-b")],
        ) == 2.0
            && series(
                &b,
                "session_server_total_add_websocket_session",
                &[("clientkey", "server-a")],
            ) == 2.0
            && series(
                &b,
                "session_server_total_remove_websocket_session",
                &[("clientkey", "server-a"), ("peer", "true")],
            ) == 1.0
    });
    assert!(ok, "A did not redial B: {last}");
    p.wait_b_learns_client();
    assert_eq!(http_get(&p.b_addr, &format!("/proxy/{CLIENT}/")).0, 200);
    // Close, on A, the session B opened: B redials it.
    assert_eq!(delete(&p.a_addr, "/debug/sessions/server-b").0, 200);
    let ok = eventually(SETTLE, || {
        let (a, b) = (p.a(), p.b());
        last = format!("A: {}\nB: {}", a.0, b.0);
        series(
            &b,
            "session_server_total_peer_ws_connected",
            &[("peer", "server-a")],
        ) == 2.0
            && series(
                &a,
                "session_server_total_add_websocket_session",
                &[("clientkey", "server-b"), ("peer", "true")],
            ) == 2.0
    });
    assert!(ok, "B did not redial A: {last}");

    // A dies: B forgets A's clients; A comes back on its port knowing B, and everything returns.
    p.a.kill();
    let gone = eventually(SETTLE, || {
        let (status, body) = http_get(&p.b_addr, &format!("/proxy/{CLIENT}/"));
        status == 503 && String::from_utf8_lossy(&body).contains("failed to find Session")
    });
    assert!(gone, "B still routes to a dead A");
    let b_peer = format!("server-b:{PEER_TOKEN}:ws://{}/connect", p.b_addr);
    let mut a_args = peer_args("server-a", &[]);
    a_args.extend_from_slice(&["--peers", &b_peer]);
    let (a, _) = start_server(&p.a_addr, &p.backend_addr, &a_args);
    p.a = a;
    p.a.wait_line(&format!("agent {CLIENT} connected"), secs(20))
        .unwrap();
    p.wait_b_learns_client();
    let s = run_load(&p.b_url("/"), 5, 1, &[]);
    assert_eq!(s["ok"], 5, "{s}");
    let m = p.b();
    assert!(
        series(
            &m,
            "session_server_total_peer_ws_connected",
            &[("peer", "server-a")]
        ) >= 3.0
    );
}

#[test]
fn peer_changes_need_the_peer_token_and_peering() {
    let backend = spawn(&["backend", "--listen", "127.0.0.1:0"]);
    let backend_addr = backend.listening_addr().unwrap();
    let (_plain, plain_addr) = start_server("127.0.0.1:0", &backend_addr, &[]);
    let (status, _) = post_peer(&plain_addr, "x:t:ws://127.0.0.1:1/connect", "t");
    assert_eq!(status, 409);
    let (_a, a_addr) = start_server("127.0.0.1:0", &backend_addr, &peer_args("server-a", &[]));
    let (status, _) = post_peer(&a_addr, "x:t:ws://127.0.0.1:1/connect", "wrong");
    assert_eq!(status, 401);
    let (status, _) = post_peer(&a_addr, "x:t", PEER_TOKEN);
    assert_eq!(status, 400);
    let (status, _) = post_peer(&a_addr, "x:t:ws://127.0.0.1:1/connect", PEER_TOKEN);
    assert_eq!(status, 200);
    assert!(peers_of(&a_addr).contains("peer x ws://127.0.0.1:1/connect"));
    assert!(eventually(SETTLE, || {
        series(
            &metrics_of(&a_addr),
            "session_server_total_peer_ws_attempt",
            &[("peer", "x")],
        ) >= 2.0
    }));
    assert_eq!(post_peer(&a_addr, "-x", PEER_TOKEN).0, 200);
    assert_eq!(post_peer(&a_addr, "-x", PEER_TOKEN).0, 404);
    // --peers without an identity is refused.
    let out = Command::new(BIN)
        .args(["server", "--token", "t", "--backend", &backend_addr])
        .args(["--peers", "x:t:ws://127.0.0.1:1/connect"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--peer-id"));
}
