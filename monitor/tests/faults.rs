//! Fault tests: eBPF refused, tracefs missing, a ring buffer too small for the load, a broken metrics
//! endpoint, and SIGTERM. Each uses real processes and the real kernel.
mod support;

use std::{
    io::{Read, Write},
    net::TcpListener,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use leakwatch::sources::ebpf::{self, ProbeOptions, Probes};
use support::ScriptedChild;
use testsupport::{Proc, http_get};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `leakwatch watch` on `pid` with its own port, once it serves /healthz.
fn start_watch(pid: u32, extra: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let lw = Proc::spawn(
        leakwatch()
            .args([
                "watch",
                "--pid",
                &pid.to_string(),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(extra)
            .stderr(Stdio::null()),
    )
    .expect("spawn");
    wait_healthz(&format!("127.0.0.1:{port}"));
    (lw, port)
}

fn leakwatch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_leakwatch"))
}

#[test]
fn ebpf_refused_falls_back_to_procfs_with_a_one_line_reason() {
    if !support::ebpf_tests_enabled() {
        return;
    }
    let mut child = ScriptedChild::spawn("socket_child.py", &[3, 0, 1, 0]);
    child.go();
    child.wait_for_line("done");
    // Drop every capability that can load BPF programs from the bounding set: root without them.
    let out = Command::new("setpriv")
        .args([
            "--bounding-set=-bpf,-perfmon,-sys_admin",
            "--inh-caps=-all",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_leakwatch"))
        .args([
            "observe",
            "--pid",
            &child.pid.to_string(),
            "--count",
            "2",
            "--interval",
            "200ms",
        ])
        .output()
        .expect("setpriv (util-linux) runs leakwatch");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "observe must carry on without eBPF: {stdout}{stderr}"
    );
    let mode_line = stdout.lines().next().unwrap_or("");
    assert!(
        mode_line.starts_with("mode: procfs-only ("),
        "first line states the mode: {stdout}"
    );
    assert!(
        mode_line.contains("refused")
            || mode_line.contains("permission")
            || mode_line.contains("Operation not permitted"),
        "reason given: {mode_line}"
    );
    let warn_lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("eBPF unavailable"))
        .collect();
    assert_eq!(
        warn_lines.len(),
        1,
        "exactly one log line says why: {stderr}"
    );
    // procfs still sees the child's sockets: listener + 2 open pairs + 1 CLOSE_WAIT server side.
    let data = stdout.lines().last().unwrap_or("");
    assert!(
        data.contains("sock_fds=6") && data.contains("close_wait=1"),
        "procfs numbers: {data}"
    );
    assert!(
        !data.contains("ebpf live="),
        "no eBPF numbers in procfs-only mode: {data}"
    );
    child.finish();
}

#[test]
fn missing_tracefs_is_mounted_by_leakwatch() {
    if !support::ebpf_tests_enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = ScriptedChild::spawn("socket_child.py", &[1, 0, 0, 0]);
    // A private mount namespace, so unmounting tracefs there does not disturb anything else.
    let script = format!(
        "umount /sys/kernel/tracing 2>/dev/null; test -d /sys/kernel/tracing/events && {{ echo still-mounted; exit 3; }}; exec {} observe --pid {} --count 1",
        env!("CARGO_BIN_EXE_leakwatch"),
        child.pid
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("mode: ebpf"),
        "leakwatch mounted tracefs itself and attached: {stdout}"
    );
    child.go();
    child.finish();
}

#[test]
fn ring_buffer_overflow_is_counted_and_counters_stay_exact() {
    if !support::ebpf_tests_enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = 300u64;
    let mut child = ScriptedChild::spawn("socket_child.py", &[n, n, 0, 0]);
    // One page: a few dozen records. We do not read it while the child runs, so it must overflow.
    let opts = ProbeOptions {
        ring_bytes: 4096,
        ..ProbeOptions::default()
    };
    let mut probes = Probes::load(&opts, false).expect("load probes");
    probes.watch(child.pid).expect("watch");
    let mut ring = probes.take_ring().expect("ring");
    child.go();
    child.wait_for_line("done");
    let deadline = Instant::now() + Duration::from_secs(5);
    let c = loop {
        let c = probes.counters().expect("counters").to_kernel_counters();
        if c.sock_closed >= 2 * n || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let delivered = ebpf::drain_ring(&mut ring, |_| {});
    assert!(
        c.events_lost > 0,
        "a 4 KiB ring must overflow under {n} connections"
    );
    assert_eq!(
        c.sock_tracked,
        1 + 2 * n,
        "counters are exact despite the overflow"
    );
    assert_eq!(c.sock_closed, 2 * n);
    let live = probes.counters().expect("counters").to_kernel_sample();
    assert_eq!(
        live.live_sockets, 0,
        "live counts come from counters, so lost events leave no phantom sockets"
    );
    assert_eq!(live.in_state(monitor_ebpf::tcp_state::LISTEN), 1);
    let transitions: u64 = (0..monitor_ebpf::tcp_state::COUNT as u8)
        .map(|s| probes.counters().unwrap().transitions_into(s))
        .sum();
    assert_eq!(
        delivered as u64 + c.events_lost,
        transitions + c.process_exit + c.process_fork,
        "every event is either delivered or counted lost"
    );
    child.finish();
}

/// Serves the same canned response to every connection, for a broken-endpoint test.
fn canned_server(response: &'static [u8]) -> (String, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let h = std::thread::spawn(move || {
        for s in l.incoming().take(200) {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(response);
        }
    });
    (addr, h)
}

#[test]
fn garbage_metrics_endpoint_is_reported_never_a_leak() {
    if !support::ebpf_tests_enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (addr, _server) = canned_server(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nsession_server_total_add_connections{clientkey=\"a\" 12\n\x00\x01garbage{{{\n");
    let mut child = ScriptedChild::spawn("socket_child.py", &[2, 0, 0, 0]);
    child.go();
    child.wait_for_line("done");
    let out = leakwatch()
        .args([
            "check",
            "--pid",
            &child.pid.to_string(),
            "--duration",
            "6s",
            "--json",
            "--interval",
            "500ms",
        ])
        .args([
            "--metrics-url",
            &format!("http://{addr}/metrics"),
            "--serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run leakwatch check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Never a leak (1), and never "no leak found" (0) either: the ledger it was told to judge was never read.
    assert_eq!(
        out.status.code(),
        Some(3),
        "no leak from a garbage endpoint, and no clean bill of health: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("json report");
    assert!(report["verdicts"].as_array().is_some_and(Vec::is_empty));
    child.finish();
}

#[test]
fn sigterm_detaches_cleanly_and_leaves_nothing_loaded() {
    if !support::ebpf_tests_enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The kernel keeps 15 characters of a program's name.
    let ours = |name: &str| {
        monitor_ebpf::PROGRAMS
            .iter()
            .any(|(p, _, _)| &p[..p.len().min(15)] == name)
    };
    let count = || {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| p.name_as_str().is_some_and(ours))
            .count()
    };
    let before = count();
    let mut child = ScriptedChild::spawn("socket_child.py", &[1, 0, 0, 0]);
    let (mut lw, _) = start_watch(child.pid, &[]);
    assert_eq!(
        count(),
        before + monitor_ebpf::PROGRAMS.len(),
        "all programs loaded while watching"
    );
    let status = lw.terminate().expect("leakwatch exits on SIGTERM");
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while count() != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(count(), before, "no program left behind");
    let pins = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().contains("leakwatch"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(pins, 0, "nothing pinned");
    child.go();
    child.finish();
}

/// Least privilege: once the probes are attached, every thread of the sidecar holds only SYS_PTRACE and
/// DAC_READ_SEARCH (for other processes' /proc), and the kernel numbers keep coming (map reads on open
/// fds need no capability).
#[test]
fn capabilities_are_dropped_after_attaching_and_counting_goes_on() {
    if !support::ebpf_tests_enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = ScriptedChild::spawn("socket_child.py", &[4, 0, 0, 0]);
    let (lw, port) = start_watch(child.pid, &["--interval", "300ms"]);
    // CAP_DAC_READ_SEARCH = 2, CAP_SYS_PTRACE = 19; and CAP_BPF = 39 on kernels that check it on every
    // bpf() call (5.10), which this test asks the kernel itself: a map read from a thread without it.
    let kept: u64 = (1 << 2) | (1 << 19) | (u64::from(map_reads_need_cap_bpf()) << 39);
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{}/task", lw.pid()))
        .expect("leakwatch's threads")
        .flatten()
        .collect();
    assert!(tasks.len() > 1, "the runtime's threads are there too");
    for task in tasks {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
            let value = status
                .lines()
                .find_map(|l| l.strip_prefix(set))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap_or_else(|| panic!("{set} of {:?}", task.path()));
            assert_eq!(
                value,
                kept,
                "{set} {value:#x} of thread {:?}",
                task.file_name()
            );
        }
    }
    child.go();
    child.wait_for_line("done");
    let deadline = Instant::now() + support::scaled(Duration::from_secs(10));
    loop {
        let status: serde_json::Value = http_get(&format!("http://127.0.0.1:{port}/status"))
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or_default();
        let kernel = &status["snapshot"]["kernel"];
        if kernel["counters"]["sock_established"] == 8 && kernel["connected_live"] == 4 {
            assert_eq!(status["mode"], "ebpf");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kernel counts after the drop: {kernel}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(lw);
    child.finish();
}

/// Whether a map read on an open map fd fails without CAP_BPF and CAP_SYS_ADMIN, tried on a thread of
/// its own (capabilities are per thread) that drops both from its effective set.
fn map_reads_need_cap_bpf() -> bool {
    use caps::{CapSet, Capability};
    let probes = Probes::load(&ProbeOptions::default(), false).expect("load probes");
    std::thread::scope(|s| {
        s.spawn(|| {
            for cap in [Capability::CAP_BPF, Capability::CAP_SYS_ADMIN] {
                caps::drop(None, CapSet::Effective, cap).expect("drop from the effective set");
            }
            probes.counters().is_err()
        })
        .join()
        .expect("probe thread")
    })
}

/// Reads leakwatch's stderr until a line containing each of `needles` has been seen, in any order;
/// returns those lines in the order of `needles`.
fn err_lines_with(proc: &Proc, needles: &[&str], within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut found: Vec<Option<String>> = vec![None; needles.len()];
    while found.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let missing: Vec<&str> = needles
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(n, _)| *n)
            .collect();
        assert!(!left.is_zero(), "no stderr line with {missing:?}");
        let line = proc.wait_err_line("", left).unwrap();
        for (n, f) in needles.iter().zip(found.iter_mut()) {
            if f.is_none() && line.contains(n) {
                *f = Some(line.clone());
            }
        }
    }
    found.into_iter().flatten().collect()
}

fn watch_cmd(args: &[&str]) -> Command {
    let mut cmd = leakwatch();
    cmd.args(["watch", "--interval", "500ms", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    cmd
}

fn listen_addr(line: &str) -> String {
    line.split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string()
}

/// Issue 12, item 8: what a user reads on day one. No process matching is said; several matching is a
/// WARN that says how to choose; the target is named by its process name, not by the pattern; the side
/// `--side auto` chose is logged, in /status and in a metric; failing scrapes are logged; and there is no
/// scrape-duration series when nothing is scraped.
#[test]
fn day_one_logs_and_labels_say_what_leakwatch_chose_and_why() {
    if !support::ebpf_tests_enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A pattern no process has yet.
    let marker = unique_marker("3600.");
    let pattern = format!("sleep {marker}");
    let closed_port = free_port();
    let metrics_url = format!("http://127.0.0.1:{closed_port}/metrics");
    let lw = Proc::launch(&mut watch_cmd(&[
        "--match",
        &pattern,
        "--side",
        "auto",
        "--metrics-url",
        &metrics_url,
    ]))
    .read_stderr()
    .spawn()
    .expect("spawn leakwatch");
    let waiting = err_lines_with(&lw, &["no process matches"], Duration::from_secs(30));
    assert!(waiting[0].contains(&pattern), "{}", waiting[0]);

    let older = Proc::spawn(Command::new("sleep").arg(&marker)).expect("spawn");
    let _younger = Proc::spawn(Command::new("sleep").arg(&marker)).expect("spawn");
    let lines = err_lines_with(
        &lw,
        &[
            "several processes match",
            "target found",
            "cannot read the tunnel's metrics",
            "tunneled connections are backed by",
        ],
        Duration::from_secs(30),
    );
    assert!(
        lines[0].contains("WARN") && lines[0].contains("Give --pid"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains(&format!("pid={}", older.pid())),
        "the oldest is chosen: {}",
        lines[1]
    );
    assert!(lines[2].contains("WARN"), "{}", lines[2]);
    assert!(lines[3].contains("side=server (auto)"), "{}", lines[3]);
    drop(lw);

    // The same target by pid, once with the dead metrics endpoint and once without any.
    let pid = older.pid().to_string();
    let mut addrs = Vec::new();
    let mut procs = Vec::new();
    for extra in [vec!["--metrics-url", metrics_url.as_str()], vec![]] {
        let mut args = vec!["--pid", pid.as_str(), "--side", "auto"];
        args.extend(extra);
        let p = Proc::launch(&mut watch_cmd(&args))
            .read_stderr()
            .spawn()
            .expect("spawn leakwatch");
        let line = err_lines_with(&p, &["leakwatch watching"], Duration::from_secs(30));
        addrs.push(listen_addr(&line[0]));
        err_lines_with(
            &p,
            &["tunneled connections are backed by"],
            Duration::from_secs(30),
        );
        procs.push(p);
    }
    let metrics: Vec<String> = addrs
        .iter()
        .map(|a| http_get(&format!("http://{a}/metrics")).expect("/metrics"))
        .collect();
    let status: serde_json::Value =
        serde_json::from_str(&http_get(&format!("http://{}/status", addrs[0])).expect("/status"))
            .expect("json");
    assert_eq!(status["crosscheck"]["side"], "server (auto)", "{status:#}");
    assert!(
        metrics[0].contains(r#"leakwatch_side{side="server",target="sleep"} 1"#),
        "the side as a metric, the target by its process name:\n{}",
        metrics[0]
    );
    assert!(metrics[0].contains("leakwatch_app_scrape_duration_seconds"));
    assert!(
        !metrics[1].contains("leakwatch_app_scrape_duration_seconds"),
        "no scrape, no scrape duration:\n{}",
        metrics[1]
    );
}

/// Issue 19, items 1 and 2: a check that never saw its target, or never read the metrics it was told
/// to judge, is inconclusive (exit 3 with a one-line reason), never "no leak found"; and the wrappers
/// whose command lines hold the pattern (`timeout`, `sh -c`) are never taken for the target.
#[test]
fn a_check_that_never_saw_its_target_or_its_metrics_is_inconclusive() {
    let marker = unique_marker("no-such-process-");
    let lw = env!("CARGO_BIN_EXE_leakwatch");
    let check = format!("{lw} check --no-ebpf --match {marker} --duration 3s --interval 500ms");
    // Under `timeout` and under a shell that stays (the `; true` keeps it from exec'ing leakwatch):
    // both are ancestors of leakwatch whose command lines contain the pattern.
    let wrapped: [Vec<String>; 2] = [
        ["timeout", "30"]
            .into_iter()
            .map(String::from)
            .chain(check.split(' ').map(String::from))
            .collect(),
        vec!["sh".into(), "-c".into(), format!("{check}; true")],
    ];
    for argv in &wrapped {
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .env("NO_COLOR", "1")
            .output()
            .expect("run leakwatch check");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            !stderr.contains("target found"),
            "{argv:?}: a wrapper was taken for the target:\n{stderr}"
        );
        if argv[0] == "timeout" {
            assert_eq!(
                out.status.code(),
                Some(3),
                "{argv:?}: inconclusive, not 'no leak found':\n{stdout}{stderr}"
            );
        }
        assert!(
            stdout.contains(&format!(
                "inconclusive: the target was never sampled: no process matched --match \"{marker}\""
            )),
            "{argv:?}: the reason in one line:\n{stdout}{stderr}"
        );
    }

    // The target is there, its metrics endpoint is not.
    let target = Proc::spawn(Command::new("sleep").arg("30")).expect("spawn sleep");
    let closed = format!("127.0.0.1:{}", free_port());
    let out = leakwatch()
        .args([
            "check",
            "--no-ebpf",
            "--pid",
            &target.pid().to_string(),
            "--metrics-url",
            &format!("http://{closed}/metrics"),
            "--duration",
            "3s",
            "--interval",
            "500ms",
        ])
        .output()
        .expect("run leakwatch check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.contains("inconclusive: the target's metrics were never read")
            && stdout.contains("connect"),
        "{stdout}"
    );
}

/// A pattern, with this test's pid and a clock reading, that no other process has.
fn unique_marker(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}{}{nanos}", std::process::id())
}

/// Waits (bounded) until leakwatch at `addr` answers /healthz: it has started and ticked.
fn wait_healthz(addr: &str) {
    let deadline = Instant::now() + support::scaled(Duration::from_secs(20));
    while http_get(&format!("http://{addr}/healthz")).is_none() {
        assert!(
            Instant::now() < deadline,
            "leakwatch at {addr} did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A free loopback port (bound and released: the same small race every test of this file accepts).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` on `addr` with extra header lines; the status and body.
fn get_with(addr: &str, path: &str, headers: &str) -> (u16, String) {
    let raw = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n");
    let r = testsupport::http_request(addr, &raw, Duration::from_secs(5)).expect("answer");
    (r.status, r.body_text())
}

/// Issue 19, item 4: on a pod-network address, /metrics and /healthz are served and /status and the live
/// page are not (they are on the loopback status listener); a bearer token opts in to serving them on
/// the public address, to requests that carry it.
#[test]
fn status_and_the_page_stay_off_the_pod_network_unless_opted_in() {
    let target = Proc::spawn(Command::new("sleep").arg("60")).expect("spawn sleep");
    let (public, private) = (free_port(), free_port());
    let lw = Proc::launch(
        leakwatch()
            .args(["watch", "--no-ebpf", "--interval", "500ms", "--pid"])
            .arg(target.pid().to_string())
            .args(["--listen", &format!("0.0.0.0:{public}")])
            .args(["--status-listen", &format!("127.0.0.1:{private}")])
            .env("NO_COLOR", "1"),
    )
    .read_stderr()
    .spawn()
    .expect("spawn leakwatch");
    let line = lw
        .wait_err_line("leakwatch watching", Duration::from_secs(30))
        .unwrap();
    assert!(
        line.contains(&format!("/status on http://127.0.0.1:{private}/")),
        "the start-up line says where /status is: {line}"
    );
    let public_addr = format!("127.0.0.1:{public}");
    wait_healthz(&public_addr);
    let (code, body) = get_with(&public_addr, "/metrics", "");
    assert_eq!(code, 200);
    assert!(body.contains("leakwatch_"), "{body}");
    for path in ["/status", "/"] {
        let (code, body) = get_with(&public_addr, path, "");
        assert_eq!(code, 404, "{path} on the pod network: {body}");
        assert!(
            body.contains("--status-listen"),
            "says where instead: {body}"
        );
    }
    let (code, body) = get_with(&format!("127.0.0.1:{private}"), "/status", "");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"target\""), "{body}");
    drop(lw);

    // Opted in: a bearer token serves them on the public address, and only to who carries it.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let public = free_port();
    let lw = Proc::launch(
        leakwatch()
            .args(["watch", "--no-ebpf", "--interval", "500ms", "--pid"])
            .arg(target.pid().to_string())
            .args(["--listen", &format!("0.0.0.0:{public}")])
            .arg("--status-token-file")
            .arg(&token)
            .env("NO_COLOR", "1"),
    )
    .read_stderr()
    .spawn()
    .expect("spawn leakwatch");
    lw.wait_err_line("leakwatch watching", Duration::from_secs(30))
        .unwrap();
    let public_addr = format!("127.0.0.1:{public}");
    wait_healthz(&public_addr);
    assert_eq!(get_with(&public_addr, "/status", "").0, 401);
    assert_eq!(
        get_with(&public_addr, "/status", "Authorization: Bearer wrong\r\n").0,
        401
    );
    let (code, body) = get_with(
        &public_addr,
        "/status",
        "Authorization: Bearer s3cret-token\r\n",
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        get_with(&public_addr, "/metrics", "").0,
        200,
        "/metrics needs no token"
    );
    drop(lw);
}

/// Offers every connection 200 MB of valid exposition, made up as it is written (never held), and
/// records the most one connection took before the client went away.
fn endless_metrics_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::{Arc, atomic::AtomicU64, atomic::Ordering};
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let most = Arc::new(AtomicU64::new(0));
    let m = most.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let m = m.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n# TYPE go_goroutines gauge\ngo_goroutines 5\n");
                let (mut sent, mut i, mut block) = (0u64, 0u64, String::new());
                while sent < 200 << 20 {
                    block.clear();
                    while block.len() < 64 << 10 {
                        block +=
                            &format!("unrelated_series{{shard=\"{}\",i=\"{i}\"}} {i}\n", i % 97);
                        i += 1;
                    }
                    if s.write_all(block.as_bytes()).is_err() {
                        break;
                    }
                    sent += block.len() as u64;
                }
                m.fetch_max(sent, Ordering::Relaxed);
            });
        }
    });
    (addr, most)
}

#[test]
fn a_200_mb_metrics_endpoint_is_cut_at_the_bound_and_the_watch_goes_on() {
    let (addr, most) = endless_metrics_server();
    let mut target = Command::new("sleep").arg("60").spawn().expect("sleep");
    let out = leakwatch()
        .args(["check", "--pid", &target.id().to_string()])
        .args(["--duration", "6s", "--json", "--interval", "500ms"])
        .args(["--metrics-url", &format!("http://{addr}/metrics")])
        .output()
        .expect("run leakwatch check");
    let _ = target.kill();
    let _ = target.wait();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    // Never a leak, and never a clean bill of health: the ledger it was told to judge was never read.
    assert_eq!(out.status.code(), Some(3), "inconclusive: {stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("json report");
    let run = &report["run"];
    // Every scrape got the clear answer, and the ticks went on between them.
    assert_eq!(run["scrapes_ok"], 0, "{report}");
    assert!(run["scrapes_failed"].as_u64() >= Some(3), "{report}");
    assert!(run["ticks"].as_u64() >= Some(4), "{report}");
    assert!(
        stderr.contains("too_large: body over 16777216 bytes (reading stopped there)"),
        "{stderr}"
    );
    // Bounded: reading stopped at the 16 MiB bound (plus what the sockets' buffers hold), nowhere near
    // the 200 MB on offer, and the body was never held.
    let wrote = most.load(std::sync::atomic::Ordering::Relaxed);
    assert!(wrote < 32 << 20, "a connection took {wrote} bytes");
    let rss = report["leakwatch_peak_rss_mib"]
        .as_f64()
        .unwrap_or(f64::NAN);
    assert!(rss < 64.0, "peak RSS {rss} MiB");
}
