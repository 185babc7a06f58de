//! A real Prometheus (Debian's package) loads the project's rules, scrapes a real leakwatch watching the
//! reference tunnel, and must put the leak alert in pending/firing for a leaking tunnel and not for a
//! healthy one. Also lints leakwatch's own /metrics with `promtool check metrics`.
//!
//! The rules are used unchanged; "pending" already proves the alert expression holds, and the `for:`
//! durations are covered by `promtool test rules` (tests/dashboards.rs).
mod support;

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::tunnel::{Leak, Tunnel};
use testsupport::{Proc, http_get};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn rules_file() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../dashboards/rules/leakwatch-rules.yml")
}

struct Stack {
    _tunnel: Tunnel,
    _leakwatch: Proc,
    _prometheus: Proc,
    _dir: tempfile::TempDir,
    prom: String,
    leakwatch: String,
}

fn start(leak: Leak) -> Stack {
    let prometheus = which("prometheus");
    let tunnel = Tunnel::start(leak, Leak::none());
    let lw_port = free_port();
    let leakwatch = Proc::spawn(Command::new(env!("CARGO_BIN_EXE_leakwatch")).args([
        "watch",
        "--pid",
        &tunnel.server.pid().to_string(),
        "--metrics-url",
        &tunnel.metrics_url(),
        "--side",
        "server",
        "--name",
        "reftunnel",
        "--listen",
        &format!("127.0.0.1:{lw_port}"),
    ]))
    .expect("spawn");
    let dir = tempfile::tempdir().expect("tempdir");
    let prom_port = free_port();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: leakwatch\n    static_configs:\n      - targets: ['127.0.0.1:{lw_port}']\n  - job_name: tunnel\n    static_configs:\n      - targets: ['{tunnel}']\n",
        rules = rules_file().display(),
        tunnel = tunnel.server_addr
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).expect("write config");
    let prom = Proc::spawn(
        Command::new(prometheus)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stderr(Stdio::null()),
    )
    .expect("spawn");
    let prom_url = format!("http://127.0.0.1:{prom_port}");
    let lw_url = format!("http://127.0.0.1:{lw_port}");
    wait_until(Duration::from_secs(30), "prometheus ready", || {
        http_get(&format!("{prom_url}/-/ready")).is_some()
    });
    wait_until(Duration::from_secs(30), "leakwatch serving", || {
        http_get(&format!("{lw_url}/healthz")).is_some()
    });
    Stack {
        _tunnel: tunnel,
        _leakwatch: leakwatch,
        _prometheus: prom,
        _dir: dir,
        prom: prom_url,
        leakwatch: lw_url,
    }
}

fn which(prog: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .output()
        .expect("sh");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        !path.is_empty(),
        "{prog} is not installed: `apt-get install prometheus` (cargo xtask setup does it)"
    );
    path
}

fn wait_until(timeout: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("timed out waiting for {what}");
}

/// Alerts currently pending or firing, as (name, state).
fn alerts(prom: &str) -> Vec<(String, String)> {
    let Some(body) = http_get(&format!("{prom}/api/v1/alerts")) else {
        return vec![];
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]["alerts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    (
                        x["labels"]["alertname"].as_str().unwrap_or("").to_string(),
                        x["state"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

const LEAK_ALERTS: [&str; 5] = [
    "LeakwatchBookkeepingLeak",
    "LeakwatchSocketLeak",
    "LeakwatchTaskGrowth",
    "LeakwatchHeapGrowth",
    "LeakwatchQuiescenceFailure",
];

#[test]
fn leaking_tunnel_puts_the_bookkeeping_alert_in_pending_or_firing() {
    if !support::ebpf_tests_enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let stack = start(Leak::mode("skip-remove", 1));
    let _load = stack._tunnel.load_bg("/", 1200, 20, 4);
    let mut seen = Vec::new();
    wait_until(
        Duration::from_secs(90),
        "LeakwatchBookkeepingLeak pending/firing",
        || {
            seen = alerts(&stack.prom);
            seen.iter()
                .any(|(n, s)| n == "LeakwatchBookkeepingLeak" && (s == "pending" || s == "firing"))
        },
    );
    eprintln!("alerts with a leaking tunnel: {seen:?}");

    // leakwatch's own exposition passes promtool's linter.
    let metrics = http_get(&format!("{}/metrics", stack.leakwatch)).expect("leakwatch /metrics");
    let mut lint = Command::new(which("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    lint.stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("feed promtool");
    let out = lint.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn healthy_tunnel_raises_no_leak_alert() {
    if !support::ebpf_tests_enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let stack = start(Leak::none());
    let _load = stack._tunnel.load_bg("/", 600, 20, 4);
    let end = Instant::now() + Duration::from_secs(45);
    let mut evaluated = 0;
    while Instant::now() < end {
        let now = alerts(&stack.prom);
        let bad: Vec<_> = now
            .iter()
            .filter(|(n, _)| LEAK_ALERTS.contains(&n.as_str()))
            .collect();
        assert!(bad.is_empty(), "healthy tunnel raised {bad:?}");
        evaluated += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(evaluated > 30);
    // Prometheus did scrape leakwatch and evaluate the rules meanwhile (not a vacuous pass).
    let up =
        http_get(&format!("{}/api/v1/query?query=leakwatch_up", stack.prom)).unwrap_or_default();
    assert!(
        up.contains("\"1\""),
        "prometheus sees leakwatch_up == 1: {up}"
    );
}
