//! Measures what the probes cost per event, from the kernel's own BPF statistics (run_time_ns / run_cnt),
//! under a loopback connection storm made by a watched child process.
//!
//! `cargo run --release -p monitor --example ebpf_cost -- [connections] [--json] [--unwatched]` (root).
//! `-- --syscalls [--json]` instead measures what every other process on the node pays while the probes
//! are loaded: wall time per `getpid()` (untraced) and per `close(-1)` of this unwatched process, probes
//! loaded (watching an idle process) against not loaded, in alternating rounds. Used by `cargo xtask bench`.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use leakwatch::sources::ebpf::{self, ProbeOptions, Probes};

fn storm(connections: u64) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        for stream in listener.incoming().take(connections as usize) {
            let Ok(mut s) = stream else { continue };
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
            let _ = s.write_all(&b);
        }
    });
    for _ in 0..connections {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.write_all(b"x").expect("write");
        let mut b = [0u8; 1];
        let _ = c.read(&mut b);
    }
    server.join().expect("server thread");
}

/// Wall time per call of `f`, in ns, over `n` calls.
fn per_call_ns(n: u32, f: impl Fn()) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// getpid() and close(-1) of this (unwatched) process, probes loaded and not, alternating.
fn syscalls(json: bool) {
    const CALLS: u32 = 2_000_000;
    const ROUNDS: usize = 7;
    // SAFETY: plain syscalls without memory arguments; close(-1) fails with EBADF and touches nothing.
    let getpid = || unsafe {
        libc::syscall(libc::SYS_getpid);
    };
    let close = || unsafe {
        libc::close(-1);
    };
    let mut idle = Command::new("sleep")
        .arg("3600")
        .spawn()
        .expect("spawn an idle process to watch");
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        off.push((per_call_ns(CALLS, getpid), per_call_ns(CALLS, close)));
        let mut probes = Probes::load(&ProbeOptions::default(), false).unwrap_or_else(|e| {
            eprintln!("ebpf_cost: cannot load probes: {e}");
            std::process::exit(2);
        });
        probes.watch(idle.id()).expect("watch the idle process");
        on.push((per_call_ns(CALLS, getpid), per_call_ns(CALLS, close)));
        drop(probes);
    }
    let _ = idle.kill();
    let _ = idle.wait();
    let col = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(v.iter().map(f).collect());
    let (g0, g1) = (col(&off, |r| r.0), col(&on, |r| r.0));
    let (c0, c1) = (col(&off, |r| r.1), col(&on, |r| r.1));
    if json {
        println!(
            "{}",
            serde_json::json!({
                "rounds": ROUNDS,
                "calls_per_round": CALLS,
                "getpid_ns_not_loaded": g0,
                "getpid_ns_loaded": g1,
                "getpid_added_ns": g1 - g0,
                "close_ns_not_loaded": c0,
                "close_ns_loaded": c1,
                "close_added_ns": c1 - c0,
            })
        );
    } else {
        println!(
            "getpid: {g0:.1} ns not loaded, {g1:.1} ns loaded ({:+.1})",
            g1 - g0
        );
        println!(
            "close(-1): {c0:.1} ns not loaded, {c1:.1} ns loaded ({:+.1})",
            c1 - c0
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--syscalls") {
        syscalls(args.iter().any(|a| a == "--json"));
        return;
    }
    if args.get(1).map(String::as_str) == Some("--storm") {
        let n = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10_000);
        // Wait for the parent to watch us before starting.
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        storm(n);
        return;
    }
    let connections: u64 = args
        .iter()
        .skip(1)
        .find_map(|s| s.parse().ok())
        .unwrap_or(20_000);
    let json = args.iter().any(|a| a == "--json");
    // --unwatched: the storm runs but is not watched, which is what every other process on the machine
    // costs (the in-kernel filter path).
    let unwatched = args.iter().any(|a| a == "--unwatched");

    let mut probes = Probes::load(&ProbeOptions::default(), true).unwrap_or_else(|e| {
        eprintln!("ebpf_cost: cannot load probes: {e}");
        std::process::exit(2);
    });
    let mut ring = probes.take_ring().expect("ring");
    let before = probes.program_stats();
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .args(["--storm", &connections.to_string()])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn storm");
    // Unwatched, the probes still watch one (idle) process, as leakwatch does: the storm then takes the
    // path every other process on the node takes, a pid compare against slot 0.
    let mut idle = Command::new("sleep")
        .arg("3600")
        .spawn()
        .expect("spawn an idle process");
    let watched_pid = if unwatched { idle.id() } else { child.id() };
    probes.watch(watched_pid).expect("watch");
    let start = Instant::now();
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("start storm");
    let mut events = 0usize;
    loop {
        events += ebpf::drain_ring(&mut ring, |_| {});
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    events += ebpf::drain_ring(&mut ring, |_| {});
    let elapsed = start.elapsed();
    let after = probes.program_stats();
    let _ = idle.kill();
    let _ = idle.wait();
    let counters = probes.counters().expect("counters").to_kernel_counters();

    let mut rows = Vec::new();
    for a in &after {
        let b = before.iter().find(|b| b.name == a.name);
        let runs = a.run_count - b.map_or(0, |b| b.run_count);
        let ns = a.run_time_ns - b.map_or(0, |b| b.run_time_ns);
        rows.push((
            a.name.clone(),
            runs,
            ns,
            if runs > 0 {
                ns as f64 / runs as f64
            } else {
                f64::NAN
            },
        ));
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    if json {
        let programs: Vec<_> = rows
            .iter()
            .map(|(n, r, t, p)| serde_json::json!({"program": n, "runs": r, "run_time_ns": t, "ns_per_event": p}))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "connections": connections,
                "watched": !unwatched,
                "seconds": elapsed.as_secs_f64(),
                "ring_events": events,
                "sock_tracked": counters.sock_tracked,
                "events_lost": counters.events_lost,
                "programs": programs,
            })
        );
    } else {
        println!(
            "storm: {connections} loopback connections in {:.2}s, {events} ring events, {} lost",
            elapsed.as_secs_f64(),
            counters.events_lost
        );
        println!(
            "{:<22} {:>12} {:>14} {:>10}",
            "program", "runs", "run_time_ns", "ns/event"
        );
        for (n, r, t, p) in rows {
            println!("{n:<22} {r:>12} {t:>14} {p:>10.1}");
        }
    }
}
