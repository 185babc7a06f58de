//! sock_diag against the real kernel: loopback connections held by this test process, its own socket inodes
//! read from /proc/self/fd, and the dump must find exactly those sockets with their addresses, states and
//! idle ages. Tests in this file run in parallel in one process, so each looks only at the sockets of its own
//! listener.
use std::{
    collections::HashSet,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use leakwatch::sources::{
    procfs::{ProcfsSampler, socket_inode},
    sockdiag::{DEFAULT_MAX_SOCKETS, TcpDump, TcpSockInfo, dump_tcp, idle_by_remote},
};
use monitor_ebpf::tcp_state;

/// Jiffies resolution (HZ may be as low as 100) plus the ms rounding of `jiffies_to_msecs`.
const TICK_SLACK_MS: u64 = 25;

fn inode_of(fd: &impl AsRawFd) -> u64 {
    let link =
        fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("readlink /proc/self/fd");
    socket_inode(link.to_str().expect("utf-8 link")).expect("a socket fd")
}

fn own_inodes() -> HashSet<u64> {
    ProcfsSampler::default()
        .socket_inodes(std::process::id())
        .expect("reading /proc/self/fd")
}

struct Pair {
    client: TcpStream,
    server: TcpStream,
}

fn connect(listener: &TcpListener, n: usize) -> Vec<Pair> {
    let addr = listener.local_addr().unwrap();
    (0..n)
        .map(|_| {
            let client = TcpStream::connect(addr).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            Pair { client, server }
        })
        .collect()
}

/// One request/response round trip, so that both ends have sent and received data.
fn exchange(p: &mut Pair) {
    let mut b = [0u8; 1];
    p.client.write_all(b"q").unwrap();
    p.server.read_exact(&mut b).unwrap();
    p.server.write_all(b"a").unwrap();
    p.client.read_exact(&mut b).unwrap();
}

fn dump() -> TcpDump {
    let d = dump_tcp(&own_inodes(), DEFAULT_MAX_SOCKETS).expect("sock_diag dump");
    assert_eq!(d.over_cap, 0);
    d
}

/// The dumped sockets that belong to connections of the listener at `addr`.
fn of_listener(d: &TcpDump, addr: SocketAddr) -> Vec<TcpSockInfo> {
    d.sockets
        .iter()
        .filter(|s| s.local == addr || s.remote == addr)
        .cloned()
        .collect()
}

fn by_inode(d: &TcpDump, inode: u64) -> TcpSockInfo {
    d.sockets
        .iter()
        .find(|s| s.inode == inode)
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "inode {inode} not in the dump of {} sockets",
                d.sockets.len()
            )
        })
}

fn finds_exactly_our_sockets(bind: &str) {
    const N: usize = 5;
    let listener = TcpListener::bind(bind).unwrap();
    let laddr = listener.local_addr().unwrap();
    let pairs = connect(&listener, N);

    let mut want: Vec<(u64, SocketAddr, SocketAddr)> = pairs
        .iter()
        .flat_map(|p| {
            [
                (inode_of(&p.client), p.client.local_addr().unwrap(), laddr),
                (inode_of(&p.server), laddr, p.client.local_addr().unwrap()),
            ]
        })
        .collect();
    want.sort();

    let d = dump();
    let mine = of_listener(&d, laddr);
    let mut got: Vec<(u64, SocketAddr, SocketAddr)> =
        mine.iter().map(|s| (s.inode, s.local, s.remote)).collect();
    got.sort();
    assert_eq!(got, want, "dump of {bind}: {mine:#?}");
    assert!(mine.iter().all(|s| s.state == tcp_state::ESTABLISHED));
    assert_eq!(mine.iter().filter(|s| s.remote == laddr).count(), N);
    // The state filter: the listener is ours too, but LISTEN is not asked for.
    let listener_inode = inode_of(&listener);
    assert!(d.sockets.iter().all(|s| s.inode != listener_inode));
    assert!(d.namespace_sockets >= 2 * N as u64);

    // The inode filter: a socket of ours left out of the set is not reported, the others still are.
    let left_out = inode_of(&pairs[0].client);
    let mut inodes = own_inodes();
    assert!(inodes.remove(&left_out));
    let d = dump_tcp(&inodes, DEFAULT_MAX_SOCKETS).unwrap();
    let mine = of_listener(&d, laddr);
    assert!(mine.iter().all(|s| s.inode != left_out));
    assert_eq!(mine.len(), 2 * N - 1);

    // The cap keeps that many and counts the rest.
    let d = dump_tcp(&own_inodes(), 1).unwrap();
    assert_eq!(d.sockets.len(), 1);
    assert!(d.over_cap >= 2 * N as u64 - 1, "over_cap {}", d.over_cap);
}

#[test]
fn finds_exactly_our_ipv4_sockets() {
    finds_exactly_our_sockets("127.0.0.1:0");
}

#[test]
fn finds_exactly_our_ipv6_sockets() {
    // Loopback IPv6 exists wherever this project runs (CI included); its absence is a failure, not a skip.
    finds_exactly_our_sockets("[::1]:0");
}

/// Ages accrue in real time, so this test holds its sockets for a short, fixed window and measures: that
/// wait is the quantity under test, not a way to wait for something to happen.
#[test]
fn idle_age_grows_on_idle_sockets_and_stays_small_on_active_ones() {
    const WINDOW: Duration = Duration::from_millis(1500);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let laddr = listener.local_addr().unwrap();
    let start = Instant::now();
    let mut pairs = connect(&listener, 3);
    // Every connection was established before this instant.
    let connected = Instant::now();
    let [never_used, used_once, active] = [0, 1, 2];
    exchange(&mut pairs[used_once]);
    exchange(&mut pairs[active]);
    // Both ends of these have moved no data since, at the latest, this instant.
    let idle_since = Instant::now();
    let first = dump();

    while idle_since.elapsed() < WINDOW {
        exchange(&mut pairs[active]);
        std::thread::sleep(Duration::from_millis(50));
    }
    exchange(&mut pairs[active]);
    let last_active = Instant::now();
    let before = Instant::now();
    let second = dump();
    let after = Instant::now();

    let ms = |d: Duration| d.as_millis() as u64;
    for (i, p) in pairs.iter().enumerate() {
        for (end, stream) in [("client", &p.client), ("server", &p.server)] {
            let inode = inode_of(stream);
            let (a, b) = (by_inode(&first, inode), by_inode(&second, inode));
            let idle = u64::from(b.idle_ms());
            // Nothing can be older than the connection.
            assert!(
                idle <= ms(after - start) + TICK_SLACK_MS,
                "pair {i} {end}: {b:?}"
            );
            if i == active {
                assert!(
                    idle <= ms(after - last_active) + TICK_SLACK_MS,
                    "active pair {end}: idle {idle} ms, last exchange {} ms before the dump ended",
                    ms(after - last_active)
                );
            } else {
                let floor = ms(before - idle_since);
                assert!(floor >= ms(WINDOW));
                assert!(
                    idle + TICK_SLACK_MS >= floor,
                    "idle pair {i} {end}: {idle} ms < {floor} ms: {b:?}"
                );
                assert!(
                    u64::from(b.idle_ms()) + TICK_SLACK_MS >= u64::from(a.idle_ms()) + ms(WINDOW),
                    "idle pair {i} {end}: {} ms then {} ms",
                    a.idle_ms(),
                    b.idle_ms()
                );
            }
            if i == never_used {
                // No data ever: both data ages count from the handshake.
                let floor = ms(before - connected);
                assert!(
                    u64::from(b.last_data_sent_ms) + TICK_SLACK_MS >= floor,
                    "{b:?}"
                );
                assert!(
                    u64::from(b.last_data_recv_ms) + TICK_SLACK_MS >= floor,
                    "{b:?}"
                );
            }
        }
    }

    // The aggregation over the real dump: the listener is the dialed target of the three client sockets.
    let clients: Vec<TcpSockInfo> = of_listener(&second, laddr)
        .into_iter()
        .filter(|s| s.remote == laddr)
        .collect();
    let rows = idle_by_remote(&clients, 1_000, 10);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].remote, laddr.to_string());
    assert_eq!((rows[0].established, rows[0].idle_over_horizon), (3, 2));
    assert!(u64::from(rows[0].oldest_idle_ms) + TICK_SLACK_MS >= ms(WINDOW));
}

#[test]
fn a_peer_hang_up_shows_as_close_wait() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let laddr = listener.local_addr().unwrap();
    let mut pairs = connect(&listener, 2);
    let Pair { client, server } = pairs.remove(0);
    let hung_up = client.local_addr().unwrap();
    let server_inode = inode_of(&server);
    drop(client);
    // The FIN crosses loopback asynchronously; poll for the state itself, within a bound.
    let deadline = Instant::now() + Duration::from_secs(5);
    let s = loop {
        let s = by_inode(&dump(), server_inode);
        if s.state == tcp_state::CLOSE_WAIT || Instant::now() > deadline {
            break s;
        }
        std::thread::yield_now();
    };
    assert_eq!(s.state, tcp_state::CLOSE_WAIT, "{s:?}");
    assert_eq!((s.local, s.remote), (laddr, hung_up));

    let accepted: Vec<TcpSockInfo> = of_listener(&dump(), laddr)
        .into_iter()
        .filter(|s| s.local == laddr)
        .collect();
    let rows = idle_by_remote(&accepted, 90_000, 10);
    let row = rows
        .iter()
        .find(|r| r.remote == hung_up.to_string())
        .expect("a row for the peer that left");
    assert_eq!((row.close_wait, row.established), (1, 0));
    drop(server);
}

/// The data-segment counts are read at the right offsets: a request the peer has not answered is
/// "unanswered" on the asking side only, until the first byte of the reply arrives; an idle pair that has
/// exchanged data is neither.
#[test]
fn a_request_with_no_reply_is_unanswered_until_the_reply_comes() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut pairs = connect(&listener, 2);
    exchange(&mut pairs[1]);
    let (asking, answered) = (inode_of(&pairs[0].client), inode_of(&pairs[1].client));
    let waiting_server = inode_of(&pairs[0].server);
    let fresh = by_inode(&dump(), asking);
    assert_eq!(fresh.unanswered_ms(), None, "nothing asked yet: {fresh:?}");
    assert_eq!(
        (fresh.data_segs_in, fresh.data_segs_out),
        (Some(0), Some(0))
    );

    pairs[0]
        .client
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .unwrap();
    // The request has left when the peer can read it.
    let mut req = [0u8; 18];
    pairs[0].server.read_exact(&mut req).unwrap();
    let d = dump();
    let waiting = by_inode(&d, asking);
    assert_eq!(
        (waiting.data_segs_in, waiting.data_segs_out),
        (Some(0), Some(1))
    );
    assert!(waiting.unanswered_ms().is_some(), "{waiting:?}");
    let pooled = by_inode(&d, answered);
    assert_eq!(pooled.unanswered_ms(), None, "answered: {pooled:?}");
    assert_eq!(
        (pooled.data_segs_in, pooled.data_segs_out),
        (Some(1), Some(1))
    );
    // The side that received the request and owes the answer is not waiting for anything.
    assert_eq!(by_inode(&d, waiting_server).unanswered_ms(), None);

    pairs[0].server.write_all(b"H").unwrap();
    let mut b = [0u8; 1];
    pairs[0].client.read_exact(&mut b).unwrap();
    let replied = by_inode(&dump(), asking);
    assert_eq!(replied.unanswered_ms(), None, "{replied:?}");
    assert_eq!(replied.data_segs_in, Some(1));
}

/// The cost of one dump with ~1k and ~10k sockets held by this process (both ends of each connection), with
/// every one of them in the inode set and with only one: the kernel describes the whole namespace either way.
/// The full procfs join over the same sockets is timed for comparison. Run with
/// `cargo test -p monitor --test sockdiag -- --ignored --nocapture dump_cost`.
#[test]
#[ignore = "a measurement: opens up to 10k sockets"]
fn dump_cost() {
    const RUNS: usize = 9;
    raise_fd_limit();
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let time = |f: &mut dyn FnMut()| {
        median(
            (0..RUNS)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed()
                })
                .collect(),
        )
    };
    let procfs = ProcfsSampler::default();
    let pid = std::process::id();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut pairs = Vec::new();
    for conns in [500, 5_000] {
        pairs.extend(connect(&listener, conns - pairs.len()));
        let all = own_inodes();
        let one: HashSet<u64> = all.iter().take(1).copied().collect();
        let d = dump_tcp(&all, DEFAULT_MAX_SOCKETS).unwrap();
        assert!(d.sockets.len() >= 2 * conns, "{} sockets", d.sockets.len());
        let full = time(&mut || {
            dump_tcp(&all, DEFAULT_MAX_SOCKETS).unwrap();
        });
        let single = time(&mut || {
            dump_tcp(&one, DEFAULT_MAX_SOCKETS).unwrap();
        });
        let join = time(&mut || {
            procfs.sockets(pid).unwrap();
        });
        println!(
            "sockdiag dump, {} sockets in the namespace ({} kept): median of {RUNS} {:.2} ms; \
             1 kept: {:.2} ms; procfs fd + /proc/net/tcp join: {:.2} ms",
            d.namespace_sockets,
            d.sockets.len(),
            full.as_secs_f64() * 1e3,
            single.as_secs_f64() * 1e3,
            join.as_secs_f64() * 1e3,
        );
    }
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(
        lim.rlim_cur >= 10_500,
        "RLIMIT_NOFILE hard limit {} is too low",
        lim.rlim_max
    );
}
