//! The goroutine dump is bounded: a target that serves an endless dump, or hangs, or has too many
//! goroutines to dump gets a clear, bounded answer from leakwatch's profiler, leakwatch's memory stays
//! bounded, and it keeps watching. Real TCP servers on loopback, leakwatch's real profiler and scraper.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use testsupport::{Proc, http_get};

use leakwatch::sources::{
    goroutines::GoroutineProfiler,
    scrape::{ScrapeConfig, Scraper},
};

/// How the fake target answers `?debug=2`; `?debug=1` always gets a small valid profile.
#[derive(Clone, Copy)]
enum Dump {
    /// An endless dump of idle connection goroutines, generated as it is sent (hundreds of MB if read).
    Endless,
    /// Reads the request and never answers.
    Hang,
    /// Never answers `?debug=1` either (the profile leakwatch reads as its baseline).
    HangAll,
}

#[derive(Default)]
struct Seen {
    profiles: AtomicU64,
    dumps: AtomicU64,
    dump_bytes_sent: AtomicU64,
}

const PROFILE: &str = "goroutine profile: total 3\n3 @ 0x1 0x2\n#\t0x1\tnet/http.(*persistConn).readLoop+0x1\t/t.go:1\n#\t0x2\tmain.main+0x1\t/m.go:1\n\n";

fn serve(mut sock: TcpStream, mode: Dump, seen: &Seen) {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&req).to_string();
    if head.starts_with("GET /metrics ") {
        let body = "# TYPE go_goroutines gauge\ngo_goroutines 3\n";
        let _ = sock.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        return;
    }
    if head.contains("debug=1") && matches!(mode, Dump::HangAll) {
        seen.profiles.fetch_add(1, Ordering::SeqCst);
        let _ = sock.read(&mut buf);
        return;
    }
    if head.contains("debug=1") {
        seen.profiles.fetch_add(1, Ordering::SeqCst);
        let _ = sock.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PROFILE}",
                PROFILE.len()
            )
            .as_bytes(),
        );
        return;
    }
    seen.dumps.fetch_add(1, Ordering::SeqCst);
    match mode {
        Dump::Hang | Dump::HangAll => {
            // Holds the connection open, silent, until the client gives up.
            let _ = sock.read(&mut buf);
        }
        Dump::Endless => {
            let _ = sock.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
            );
            // One chunk of goroutine blocks, sent again and again (ids repeat; nothing reads them).
            let mut chunk = String::with_capacity(64 << 10);
            let mut id = 0u64;
            while chunk.len() < 60 << 10 {
                id += 1;
                chunk += &format!(
                    "goroutine {id} [select, 5 minutes]:\nnet/http.(*persistConn).readLoop(0xc000{id:x})\n\t/usr/lib/go/src/net/http/transport.go:2213 +0x1d5\ncreated by net/http.(*Transport).dialConn in goroutine 1\n\t/usr/lib/go/src/net/http/transport.go:1750 +0x1b2\n\n"
                );
            }
            loop {
                if sock.write_all(chunk.as_bytes()).is_err() {
                    return;
                }
                seen.dump_bytes_sent
                    .fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        }
    }
}

/// A fake Go target on loopback; returns its pprof URL and what it was asked.
fn target(mode: Dump) -> (String, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/debug/pprof/goroutine",
        listener.local_addr().unwrap()
    );
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            let s = s.clone();
            std::thread::spawn(move || serve(sock, mode, &s));
        }
    });
    (url, seen)
}

fn scraper(url: &str, timeout: Duration) -> Scraper {
    Scraper::new(ScrapeConfig {
        url: url.to_string(),
        timeout,
        ..ScrapeConfig::default()
    })
    .unwrap()
}

/// Peak resident memory of this test process so far.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib / 1024.0
}

#[tokio::test]
async fn an_endless_dump_is_cut_at_its_cap_read_as_a_lower_bound_in_bounded_memory() {
    let (url, seen) = target(Dump::Endless);
    let timeout = Duration::from_secs(20);
    let s = scraper(&url, timeout);
    let mut p = GoroutineProfiler::new(url);
    let cap = p.limits.max_dump_bytes as u64;
    let rss_before = peak_rss_mib();
    let started = Instant::now();
    // 5,000 goroutines by the target's go_goroutines: below the dump bound, so the dump is read.
    let r = p
        .blocked_beyond(&s, 2, Some(5000))
        .await
        .expect("a reading");
    let took = started.elapsed();
    let grew = peak_rss_mib() - rss_before;
    let note = r.note.clone().unwrap_or_default();
    assert!(r.read, "{r:?}");
    assert!(note.contains("cut at 64 MiB"), "{note}");
    assert!(note.contains("lower bound"), "{note}");
    // Every goroutine of the stream is an idle connection 5 minutes old: all of what was read counts.
    assert!(r.total > 100_000, "{r:?}");
    assert!(took < timeout, "answered within its time bound: {took:?}");
    assert!(
        grew < 24.0,
        "reading 64 MiB of dump raised the peak RSS by {grew:.1} MiB"
    );
    // leakwatch stopped reading at the cap: the target could only push what the socket buffers hold.
    let sent = seen.dump_bytes_sent.load(Ordering::SeqCst);
    assert!(
        sent < cap + (16 << 20),
        "{sent} bytes sent for a cap of {cap}"
    );
    eprintln!(
        "endless dump: cut after {took:?}, {} blocked connection goroutines counted, peak RSS +{grew:.1} MiB, {} MiB sent",
        r.total,
        sent >> 20
    );
    // At most one dump per interval: asking again at once sends nothing.
    assert!(p.blocked_beyond(&s, 2, Some(5000)).await.is_none());
    assert_eq!(seen.dumps.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_hanging_dump_is_a_timeout_note_and_the_profiler_keeps_watching() {
    let (url, seen) = target(Dump::Hang);
    let timeout = Duration::from_millis(800);
    let s = scraper(&url, timeout);
    let mut p = GoroutineProfiler::new(url);
    let started = Instant::now();
    let r = p.blocked_beyond(&s, 2, Some(300)).await.expect("a reading");
    let took = started.elapsed();
    assert!(!r.read, "{r:?}");
    let note = r.note.unwrap_or_default();
    assert!(
        note.starts_with("the goroutine dump failed: timeout"),
        "{note}"
    );
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(700),
        "{took:?}"
    );
    // Not given up on: the cheap profile still answers.
    let grown = p.growth(&s, Some(300)).await.expect("not rate-limited");
    assert_eq!(
        grown,
        Ok(vec![(
            "http.(*persistConn).readLoop <- main.main".to_string(),
            3
        )])
    );
    assert_eq!(seen.profiles.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn too_many_goroutines_to_dump_is_a_note_with_the_stall_it_avoided_and_no_request() {
    let (url, seen) = target(Dump::Endless);
    let s = scraper(&url, Duration::from_secs(5));
    let mut p = GoroutineProfiler::new(url);
    let r = p
        .blocked_beyond(&s, 2, Some(100_000))
        .await
        .expect("a reading");
    assert!(!r.read, "{r:?}");
    let note = r.note.unwrap_or_default();
    assert!(
        note.contains("skipped: the target has 100000 goroutines") && note.contains("about 4.0 s"),
        "{note}"
    );
    // Far more: not even the aggregated profile is read.
    let g = p
        .growth(&s, Some(3_600_000))
        .await
        .expect("not rate-limited");
    assert!(
        g.as_ref()
            .is_err_and(|n| n.contains("not read: 3600000 goroutines")),
        "{g:?}"
    );
    assert_eq!(seen.dumps.load(Ordering::SeqCst), 0);
    assert_eq!(seen.profiles.load(Ordering::SeqCst), 0);
}

/// The sidecar itself, watching a process whose pprof never answers: its ticks go on (the profile read is
/// bounded by the scrape timeout, once, for the baseline), and it stays healthy.
#[test]
fn leakwatch_keeps_ticking_when_the_targets_pprof_hangs() {
    let (url, seen) = target(Dump::HangAll);
    let metrics = url.replace("/debug/pprof/goroutine", "/metrics");
    let mut watched = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _lw = Proc::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_leakwatch"))
            .args(["watch", "--no-ebpf", "--pid", &watched.id().to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-url", &metrics, "--pprof-url", &url])
            .args(["--scrape-timeout", "1s", "--interval", "200ms"])
            .stderr(std::process::Stdio::null()),
    )
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let tick = || -> Option<f64> {
        let s: serde_json::Value =
            serde_json::from_str(&http_get(&format!("{base}/status"))?).ok()?;
        s["snapshot"]["t"].as_f64()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.profiles.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "leakwatch never asked for the baseline profile"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The hung baseline holds one tick for at most the scrape timeout; after it, ticks go on.
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = tick().expect("a tick after the hung profile");
    std::thread::sleep(Duration::from_secs(2));
    let t1 = tick().expect("a later tick");
    assert!(t1 - t0 >= 1.0, "ticks went on: t {t0} then {t1}");
    assert!(http_get(&format!("{base}/healthz")).is_some());
    assert_eq!(
        seen.dumps.load(Ordering::SeqCst),
        0,
        "no dump without a verdict"
    );
    let _ = watched.kill();
    let _ = watched.wait();
}
