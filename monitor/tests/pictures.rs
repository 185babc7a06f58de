//! The pictures in a real browser: headless Chromium (Debian's `chromium`, installed by `cargo xtask setup`)
//! opens the live page of a real `leakwatch watch` on the real reference tunnel, and the report files of
//! `verify --report` and `replay --report`, takes screenshots, and reads the rendered DOM back. The charts
//! must hold the points of the run (the last "app live" the browser shows equals what /status says; the
//! point count grows), name each line's source, survive a target restart and procfs-only mode, and no
//! console message may appear (the pages have no script, so any is a fault).
//!
//! Screenshots are written to `target/leakwatch-results/` (live-leak.png, report-healthy.png,
//! live-procfs-restart.png, report-replay.png). The eBPF test needs root and the embedded probes, and every
//! test needs chromium: a missing one fails, loudly.
mod support;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant},
};

use regex::Regex;
use serde_json::Value;
use support::tunnel::{Leak, Tunnel};
use testsupport::{Proc, http_get};

/// One scenario at a time: each runs a tunnel, leakwatch and a browser on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn results_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/leakwatch-results");
    std::fs::create_dir_all(&dir).expect("create target/leakwatch-results");
    dir
}

fn chromium_bin() -> PathBuf {
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "chromium is not installed: the picture tests need it (`apt-get install chromium`; `cargo xtask setup` does it)"
    );
}

/// What one browser run left: its stdout (the DOM for --dump-dom) and every console message it logged.
struct BrowserRun {
    stdout: String,
    console: Vec<String>,
}

/// Runs headless Chromium once on `url` with a fresh profile; fails the test after 90 s.
fn chromium(url: &str, action: &[String]) -> BrowserRun {
    let profile = tempfile::tempdir().expect("browser profile dir");
    let mut cmd = Command::new(chromium_bin());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(action);
    let child = cmd
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(90)) {
        Ok(out) => out.expect("chromium ran"),
        Err(_) => {
            // SAFETY: plain kill(2) of the browser this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("chromium did not finish within 90 s on {url}");
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "chromium failed on {url}: {}\n{stderr}",
        out.status
    );
    BrowserRun {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        console: stderr
            .lines()
            .filter(|l| l.contains(":CONSOLE") || l.contains("Uncaught"))
            .map(str::to_string)
            .collect(),
    }
}

/// The DOM after Chromium rendered the page; asserts no console message appeared.
fn rendered_dom(url: &str) -> String {
    let run = chromium(url, &["--dump-dom".into()]);
    assert!(
        run.console.is_empty(),
        "console messages on {url}: {:#?}",
        run.console
    );
    assert!(
        run.stdout.contains("</html>"),
        "no DOM from chromium for {url}: {}",
        run.stdout
    );
    run.stdout
}

/// A screenshot of the page, saved under target/leakwatch-results; asserts no console message appeared.
fn screenshot(url: &str, name: &str) -> PathBuf {
    let path = results_dir().join(name);
    let _ = std::fs::remove_file(&path);
    let run = chromium(
        url,
        &[
            format!("--screenshot={}", path.display()),
            "--window-size=1400,2000".into(),
        ],
    );
    assert!(
        run.console.is_empty(),
        "console messages on {url}: {:#?}",
        run.console
    );
    let png = std::fs::read(&path).unwrap_or_else(|e| panic!("no screenshot at {path:?}: {e}"));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{path:?} is not a real screenshot ({} bytes)",
        png.len()
    );
    eprintln!("screenshot: {}", path.display());
    path
}

/// One line of a chart's legend as the browser rendered it.
#[derive(Debug)]
struct Line {
    source: String,
    points: usize,
    last: Option<f64>,
    /// The text of the row: label, source, numbers.
    text: String,
}

/// The first legend row of `series` in the page (the same line appears in more than one chart).
fn line(dom: &str, series: &str) -> Option<Line> {
    let re = Regex::new(&format!(
        r#"<tr class="line" data-series="{series}" data-source="([^"]*)" data-points="(\d+)"(?: data-last="([^"]*)")?>(.*?)</tr>"#
    ))
    .expect("regex");
    let c = re.captures(dom)?;
    let text = Regex::new("<[^>]+>")
        .expect("regex")
        .replace_all(&c[4], " ")
        .into_owned();
    Some(Line {
        source: c[1].to_string(),
        points: c[2].parse().ok()?,
        last: c.get(3).and_then(|m| m.as_str().parse().ok()),
        text,
    })
}

/// Polylines of `series` in the charts' SVG, with the points each holds.
fn polylines(dom: &str, series: &str) -> Vec<usize> {
    let re = Regex::new(&format!(
        r#"<polyline class="series" data-series="{series}" data-drawn-points="(\d+)"[^>]*points="([^"]*)""#
    ))
    .expect("regex");
    re.captures_iter(dom)
        .map(|c| {
            let declared: usize = c[1].parse().unwrap_or(0);
            let actual = c[2].split_whitespace().count();
            assert_eq!(
                declared, actual,
                "a polyline of {series} holds what it says"
            );
            actual
        })
        .collect()
}

fn attr(dom: &str, name: &str) -> Option<String> {
    Regex::new(&format!(r#"<body[^>]* {name}="([^"]*)""#))
        .expect("regex")
        .captures(dom)
        .map(|c| c[1].to_string())
}

fn assert_all_charts(dom: &str) {
    for chart in [
        "timeline",
        "ledger",
        "crosscheck",
        "tasks",
        "heap",
        "fds",
        "close_wait",
    ] {
        assert!(
            dom.contains(&format!("id=\"chart-{chart}\"")),
            "chart {chart} missing"
        );
    }
    // Nothing depends on JavaScript: no script, no handlers; the numbers are in the page as text.
    assert!(!dom.contains("<script"), "the pages carry no script");
    assert!(
        !Regex::new(r#"\son[a-z]+=""#).expect("regex").is_match(dom),
        "the pages carry no event handlers"
    );
    assert!(
        !Regex::new(r#"(src|href)="https?://"#)
            .expect("regex")
            .is_match(dom),
        "the pages fetch nothing"
    );
}

/// `leakwatch watch` with its port discovered from its start-up log line.
struct Watch {
    /// Held for its lifetime: dropping it stops leakwatch.
    _proc: Proc,
    base: String,
}

impl Watch {
    fn start(args: &[&str]) -> Self {
        let proc = Proc::launch(
            Command::new(env!("CARGO_BIN_EXE_leakwatch"))
                .arg("watch")
                .args(args)
                .args(["--listen", "127.0.0.1:0", "--interval", "1s"])
                .args(["--log-format", "text"]),
        )
        .read_stderr()
        .spawn()
        .expect("start leakwatch watch");
        let line = proc
            .wait_err_line("live page on http://", Duration::from_secs(30))
            .expect("leakwatch watch announces its live page");
        let re = Regex::new(r"live page on http://([0-9.:]+)/").expect("regex");
        let base = format!("http://{}", &re.captures(&line).expect("an address")[1]);
        Self { _proc: proc, base }
    }

    fn status(&self) -> Value {
        let body = http_get(&format!("{}/status", self.base)).expect("/status answers");
        serde_json::from_str(&body).expect("/status is JSON")
    }

    fn page(&self) -> String {
        format!("{}/", self.base)
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// What the tunnel believes open, from /status's snapshot, computed as the chart computes it.
fn app_live(status: &Value) -> Option<f64> {
    let ledger = status["snapshot"]["app"]["Ok"]["ledger"].as_array()?;
    Some(
        ledger
            .iter()
            .map(|r| {
                (r["added"].as_f64().unwrap_or(0.0) - r["removed"].as_f64().unwrap_or(0.0)).max(0.0)
            })
            .sum(),
    )
}

/// The browser shows the same "app live" as /status: reads /status, renders the page, reads /status
/// again, and compares when nothing moved in between (a tick may fall between the two reads).
fn assert_page_matches_status(w: &Watch) -> String {
    wait_for(
        "a page rendered between two equal /status reads",
        Duration::from_secs(60),
        || {
            let before = w.status();
            let dom = rendered_dom(&w.page());
            let after = w.status();
            let (b, a) = (app_live(&before)?, app_live(&after)?);
            if a != b {
                return None;
            }
            let shown = line(&dom, "app_live").expect("the page has an app_live line");
            assert_eq!(
                shown.last,
                Some(a),
                "the browser shows app live {:?}, /status says {a}",
                shown.last
            );
            let t: f64 = attr(&dom, "data-t")
                .and_then(|t| t.parse().ok())
                .expect("data-t");
            let (t0, t1) = (
                before["snapshot"]["t"].as_f64().unwrap_or(f64::NAN),
                after["snapshot"]["t"].as_f64().unwrap_or(f64::NAN),
            );
            assert!(
                t0 <= t && t <= t1,
                "the page's tick {t} lies between /status reads {t0} and {t1}"
            );
            Some(dom)
        },
    )
}

#[test]
fn the_console_check_sees_errors() {
    // Without this, "no console message" could pass because nothing is ever caught.
    let _g = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let page = dir.path().join("bad.html");
    std::fs::write(
        &page,
        "<html><head><link rel=\"icon\" href=\"data:,\"></head><body>\
         <script>console.error('boom'); missingFunction();</script></body></html>",
    )
    .expect("write page");
    let run = chromium(
        &format!("file://{}", page.display()),
        &["--dump-dom".into()],
    );
    assert!(
        run.console.iter().any(|l| l.contains("boom"))
            && run.console.iter().any(|l| l.contains("Uncaught")),
        "chromium's console is not being read: {:?}",
        run.console
    );
}

#[test]
fn live_page_of_a_leaking_tunnel_matches_status() {
    if !support::ebpf_tests_enabled() {
        return;
    }
    let _g = serial();
    chromium_bin();
    let tunnel = Tunnel::start(Leak::mode("skip-remove", 1), Leak::none());
    let pattern = tunnel.server_pattern();
    let w = Watch::start(&[
        "--match",
        &pattern,
        "--metrics-url",
        &tunnel.metrics_url(),
        "--side",
        "server",
        "--name",
        "reftunnel-leaking",
    ]);
    wait_for(
        "leakwatch's first snapshot of the target",
        Duration::from_secs(30),
        || app_live(&w.status()),
    );
    let early = rendered_dom(&w.page());
    let early_points = line(&early, "app_live").expect("app_live line").points;

    let out = tunnel.load("/", 300, 100, 4);
    assert!(out.status.success(), "load driver failed");
    let status = wait_for("the bookkeeping verdict", Duration::from_secs(60), || {
        let s = w.status();
        s["verdicts"]
            .as_array()?
            .iter()
            .any(|v| v["kind"] == "bookkeeping_leak")
            .then_some(s)
    });
    assert_eq!(status["mode"], "ebpf");

    let dom = assert_page_matches_status(&w);
    assert_all_charts(&dom);
    assert_eq!(attr(&dom, "data-mode").as_deref(), Some("ebpf"));
    let live = line(&dom, "app_live").expect("app_live line");
    assert!(
        live.points > early_points,
        "points grow: {early_points} before the load, {} after",
        live.points
    );
    assert!(
        live.last.is_some_and(|v| v >= 300.0),
        "the leak is drawn: {live:?}"
    );
    assert_eq!(live.source, "app");
    assert!(live.text.contains("app metrics"), "{live:?}");
    // Every point held is drawn (no reduction at this length), split only where the data breaks.
    assert_eq!(
        polylines(&dom, "app_live").iter().sum::<usize>() / 2,
        live.points,
        "app_live appears in two charts"
    );
    let kernel = line(&dom, "kernel_conn").expect("kernel line");
    assert_eq!(kernel.source, "ebpf");
    assert!(
        kernel.text.contains("callers") && kernel.text.contains("eBPF"),
        "{kernel:?}"
    );
    let close_wait = line(&dom, "close_wait").expect("CLOSE_WAIT line");
    assert_eq!(close_wait.source, "ebpf");
    let tasks = line(&dom, "tasks").expect("tasks line");
    assert!(
        tasks.text.contains("goroutines") && tasks.text.contains("app metrics"),
        "{tasks:?}"
    );
    let fds = line(&dom, "fds").expect("fds line");
    assert_eq!(fds.source, "procfs");
    assert!(fds.last.is_some_and(|f| f > 0.0), "{fds:?}");
    assert!(
        dom.contains("data-verdict=\"bookkeeping_leak\""),
        "the active verdict is shown with its evidence"
    );
    assert!(dom.contains("app.live_connections"), "evidence listed");
    assert!(
        dom.contains("bookkeeping_leak clientkey="),
        "the verdict is on the time axis"
    );
    screenshot(&w.page(), "live-leak.png");
}

#[test]
fn verify_report_of_a_healthy_tunnel_renders_its_criteria() {
    if !support::ebpf_tests_enabled() {
        return;
    }
    let _g = serial();
    chromium_bin();
    let tunnel = Tunnel::start(Leak::none(), Leak::none());
    let report = results_dir().join("report-healthy.html");
    let _ = std::fs::remove_file(&report);
    let out = Command::new(env!("CARGO_BIN_EXE_leakwatch"))
        .args(["verify", "--pid", &tunnel.server.pid().to_string()])
        .args(["--metrics-url", &tunnel.metrics_url(), "--side", "server"])
        .args(["--load-url", &tunnel.proxy_url("/")])
        .args(["--requests", "3000", "--concurrency", "2"])
        .args([
            "--baseline",
            "4s",
            "--settle",
            "30s",
            "--interval",
            "500ms",
            "--json",
        ])
        .arg("--report")
        .arg(&report)
        .output()
        .expect("run leakwatch verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a healthy tunnel passes: {stdout}{stderr}"
    );
    assert!(
        stderr.contains("report written to"),
        "verify says where: {stderr}"
    );
    let json: Value = serde_json::from_str(stdout.trim()).expect("verify --json");
    let criteria = json["criteria"].as_array().expect("criteria");

    let url = format!("file://{}", report.display());
    let dom = rendered_dom(&url);
    assert_all_charts(&dom);
    assert_eq!(attr(&dom, "data-passed").as_deref(), Some("true"));
    let rows: Vec<String> = Regex::new(r#"<tr class="criterion" data-pass="([^"]*)">"#)
        .expect("regex")
        .captures_iter(&dom)
        .map(|c| c[1].to_string())
        .collect();
    let expected: Vec<String> = criteria
        .iter()
        .map(|c| {
            c["pass"]
                .as_bool()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "n/a".into())
        })
        .collect();
    assert_eq!(
        rows, expected,
        "each criterion's pass/fail is in the report"
    );
    for c in criteria {
        let name = c["name"].as_str().unwrap_or_default();
        assert!(dom.contains(name), "criterion {name} named");
    }
    assert!(
        dom.contains("criteria checked: all pass"),
        "the check is on the time axis"
    );
    for phase in ["baseline", "load", "settle window"] {
        assert!(
            dom.contains(&format!(">{phase}<")),
            "phase {phase} shaded and named"
        );
    }
    // The ledger's last value is what verify judged: everything added was removed.
    let ledger = criteria
        .iter()
        .find(|c| c["name"] == "add and remove grew together")
        .expect("ledger criterion");
    let live = line(&dom, "app_live").expect("app_live line");
    assert_eq!(live.last, ledger["after"].as_f64());
    let added = line(&dom, "added").expect("added line");
    assert!(
        added.points >= 5 && added.last.is_some_and(|a| a >= 3000.0),
        "{added:?}"
    );
    let threshold_lines = dom.matches("must come back under this").count();
    assert!(
        threshold_lines >= 3,
        "criteria thresholds drawn: {threshold_lines}"
    );
    screenshot(&url, "report-healthy.png");
}

#[test]
fn live_page_in_procfs_only_mode_across_a_restart_and_its_replay_report() {
    let _g = serial();
    chromium_bin();
    let mut tunnel = Tunnel::start(Leak::mode("skip-remove", 1), Leak::none());
    let dir = tempfile::tempdir().expect("tempdir");
    let recording = dir.path().join("run.jsonl");
    let pattern = tunnel.server_pattern();
    let w = Watch::start(&[
        "--match",
        &pattern,
        "--metrics-url",
        &tunnel.metrics_url(),
        "--side",
        "server",
        "--no-ebpf",
        "--name",
        "reftunnel-procfs",
        "--record",
        recording.to_str().expect("utf-8 path"),
    ]);
    let first_pid = wait_for("the first incarnation", Duration::from_secs(30), || {
        let s = w.status();
        app_live(&s)?;
        s["snapshot"]["target"]["pid"].as_u64()
    });
    assert!(tunnel.load("/", 100, 100, 4).status.success());
    wait_for("the load in the ledger", Duration::from_secs(30), || {
        app_live(&w.status()).filter(|v| *v >= 100.0)
    });
    tunnel.restart_server();
    wait_for("the restart seen", Duration::from_secs(30), || {
        let s = w.status();
        (s["restarts"].as_u64() >= Some(1)
            && s["snapshot"]["target"]["pid"].as_u64() != Some(first_pid)
            && app_live(&s).is_some())
        .then_some(())
    });
    assert!(tunnel.load("/", 50, 100, 4).status.success());
    wait_for(
        "the second load in the ledger",
        Duration::from_secs(30),
        || app_live(&w.status()).filter(|v| *v >= 50.0),
    );

    let dom = assert_page_matches_status(&w);
    assert_all_charts(&dom);
    assert_eq!(attr(&dom, "data-mode").as_deref(), Some("procfs-only"));
    assert!(
        dom.contains("procfs-only mode"),
        "the page says why the kernel side is procfs"
    );
    let kernel = line(&dom, "kernel_conn").expect("kernel line");
    assert_eq!(kernel.source, "procfs", "{kernel:?}");
    assert!(
        kernel.text.contains("ESTABLISHED sockets") && kernel.text.contains("procfs"),
        "{kernel:?}"
    );
    assert_eq!(
        line(&dom, "close_wait").expect("CLOSE_WAIT").source,
        "procfs"
    );
    assert!(
        dom.contains("restart: pid"),
        "the restart is on the time axis"
    );
    // The counters restart from zero with the process: the lines break there instead of plunging.
    assert!(
        polylines(&dom, "added").len() >= 2,
        "the added line breaks at the restart"
    );
    screenshot(&w.page(), "live-procfs-restart.png");
    drop(w);

    let lines = std::fs::read_to_string(&recording)
        .expect("recording")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    let report = results_dir().join("report-replay.html");
    let out = Command::new(env!("CARGO_BIN_EXE_leakwatch"))
        .args(["replay", "--side", "server"])
        .arg(&recording)
        .arg("--report")
        .arg(&report)
        .output()
        .expect("run leakwatch replay");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("report written to"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = format!("file://{}", report.display());
    let dom = rendered_dom(&url);
    assert_all_charts(&dom);
    let ticks: usize = attr(&dom, "data-ticks")
        .and_then(|t| t.parse().ok())
        .expect("data-ticks");
    // A torn last line is skipped by the reader: the recording was cut off by the kill.
    assert!(
        ticks + 1 >= lines && ticks <= lines,
        "{ticks} ticks charted from {lines} snapshots"
    );
    assert!(
        dom.contains("restart: pid"),
        "the replay finds the restart too"
    );
    assert_eq!(
        line(&dom, "kernel_conn").expect("kernel line").source,
        "procfs"
    );
    screenshot(&url, "report-replay.png");
}
