//! `cargo xtask demo`: the story of the Rancher v2.10.3 tunnel leak, on one machine. The reference tunnel
//! runs with remotedialer's v2.10.3 symptom switched on (`--leak skip-remove`), load goes through it, and
//! leakwatch reports the leak live; then stuck pipes (`--leak stuck-pipe`: tasks and CLOSE_WAIT sockets held
//! for callers that left, with the task stacks that grew); then a healthy tunnel under the same load stays
//! green, and the verification recipe of the fix passes.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde_json::Value;

use crate::{
    procs::{Proc, http_get, release_bin, wait_http},
    tunnel::{CLIENT, Tunnel, start_tunnel},
    util::workspace_root,
};

const LEAKWATCH: &str = "127.0.0.1:9477";

fn start_leakwatch(t: &Tunnel) -> Result<Proc> {
    let bin = release_bin(&workspace_root(), "leakwatch");
    let lw = Proc::spawn(
        "leakwatch",
        Command::new(bin).args([
            "watch",
            "--pid",
            &t.server.pid().to_string(),
            "--name",
            "reftunnel-server",
            "--metrics-url",
            &format!("http://{}/metrics", t.addr),
            "--side",
            "server",
            "--listen",
            LEAKWATCH,
        ]),
        true,
    )?;
    wait_http(
        &format!("http://{LEAKWATCH}/healthz"),
        Duration::from_secs(20),
    )?;
    Ok(lw)
}

fn start_load(t: &Tunnel, requests: u64, rate: u64) -> Result<Proc> {
    let bin = release_bin(&workspace_root(), "reftunnel");
    Proc::spawn(
        "load",
        Command::new(bin).args([
            "load",
            "--url",
            &format!("http://{}/proxy/{CLIENT}/", t.addr),
            "--requests",
            &requests.to_string(),
            "--rate",
            &rate.to_string(),
            "--concurrency",
            "4",
        ]),
        false,
    )
}

fn num(v: &Value) -> String {
    v.as_f64()
        .map(|v| format!("{v:.0}"))
        .unwrap_or_else(|| "-".into())
}

/// One line of what leakwatch's /status says right now: the tunnel's own ledger next to what the kernel
/// holds, then tasks, heap and the verdicts.
fn status_line(t0: Instant, doc: &Value) -> (String, Vec<String>) {
    let snap = &doc["snapshot"];
    let app = &snap["app"]["Ok"];
    let (mut added, mut removed) = (0.0, 0.0);
    for row in app["ledger"].as_array().into_iter().flatten() {
        added += row["added"].as_f64().unwrap_or(0.0);
        removed += row["removed"].as_f64().unwrap_or(0.0);
    }
    let kinds: Vec<String> = doc["verdicts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            format!(
                "{} ({})",
                v["kind"].as_str().unwrap_or("?"),
                v["severity"].as_str().unwrap_or("?")
            )
        })
        .collect();
    let line = format!(
        "t={:>3}s  ledger add={:<5} remove={:<5} live={:<5}| kernel: callers={:<4} CLOSE_WAIT={:<4}| tasks={:<5} heap={:>5.1}MiB | {}",
        t0.elapsed().as_secs(),
        added,
        removed,
        added - removed,
        num(&snap["kernel"]["accepted_live"]),
        num(&snap["kernel"]["sockets_by_state"][8]),
        num(&app["goroutines"]),
        app["heap_inuse_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        if kinds.is_empty() {
            "no verdict (green)".to_string()
        } else {
            kinds.join(", ")
        }
    );
    (line, kinds)
}

/// Prints /status lines every 3 s for `seconds`; returns every verdict seen, and the explanations.
fn watch_phase(seconds: u64) -> (Vec<String>, Vec<String>) {
    let t0 = Instant::now();
    let (mut seen, mut explained) = (Vec::new(), Vec::new());
    while t0.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(3));
        let doc: Value = http_get(&format!("http://{LEAKWATCH}/status"))
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or_default();
        let (line, kinds) = status_line(t0, &doc);
        println!("{line}");
        for k in kinds {
            if !seen.contains(&k) {
                seen.push(k);
            }
        }
        for v in doc["verdicts"].as_array().into_iter().flatten() {
            let kind = v["kind"].as_str().unwrap_or("?");
            if !explained.iter().any(|e: &String| e.starts_with(kind)) {
                explained.push(format!(
                    "{kind}: {}",
                    v["explanation"].as_str().unwrap_or("")
                ));
            }
        }
    }
    (seen, explained)
}

fn leak_phase(title: &str, mode: &str, expect: &str, seconds: u64) -> Result<()> {
    println!("{title}");
    let leaky = start_tunnel(Some(mode))?;
    let mut lw = start_leakwatch(&leaky)?;
    println!("leakwatch draws it live at http://{LEAKWATCH}/ (charts, verdicts with evidence)\n");
    let _load = start_load(&leaky, 20 * seconds, 20)?;
    let (seen, explained) = watch_phase(seconds);
    // The live page is self-contained: a copy outlives the demo's leakwatch.
    let saved = save_live_page(mode);
    lw.terminate();
    if !seen.iter().any(|k| k.starts_with(expect)) {
        bail!("leakwatch did not report {expect} during the demo (saw: {seen:?})");
    }
    println!("\nleakwatch caught it: {}", seen.join(", "));
    for e in explained {
        println!("  - {e}");
    }
    if let Some(path) = saved {
        println!("  the live page as it was at the end: {}", path.display());
    }
    println!();
    Ok(())
}

fn results_dir() -> std::path::PathBuf {
    workspace_root().join("target/leakwatch-results")
}

/// Keeps a copy of leakwatch's live page (`/`) under target/leakwatch-results.
fn save_live_page(name: &str) -> Option<std::path::PathBuf> {
    let page = http_get(&format!("http://{LEAKWATCH}/"))?;
    let path = results_dir().join(format!("demo-live-{name}.html"));
    std::fs::create_dir_all(results_dir()).ok()?;
    std::fs::write(&path, page).ok()?;
    Some(path)
}

pub fn run() -> Result<()> {
    leak_phase(
        "\n=== 1/4  The v2.10.3 leak: reftunnel server with --leak skip-remove, 20 requests/s through the tunnel ===\n\
         leakwatch watches the server process (eBPF + procfs) and scrapes its remotedialer metrics.\n",
        "skip-remove",
        "bookkeeping_leak",
        45,
    )?;
    leak_phase(
        "=== 2/4  Stuck pipes: reftunnel server with --leak stuck-pipe (tasks held for callers that left) ===\n",
        "stuck-pipe",
        "task_growth",
        30,
    )?;

    println!("=== 3/4  The v2.10.5 fix: the same load through a healthy tunnel ===\n");
    let healthy = start_tunnel(None)?;
    let mut lw = start_leakwatch(&healthy)?;
    let _load = start_load(&healthy, 600, 20)?;
    let (seen, _) = watch_phase(36);
    lw.terminate();
    if !seen.is_empty() {
        bail!("leakwatch raised {seen:?} on a healthy tunnel");
    }
    println!("\nhealthy tunnel: no verdict, as it should be.\n");

    println!("=== 4/4  The fix's verification recipe, automated: leakwatch verify ===\n");
    let bin = release_bin(&workspace_root(), "leakwatch");
    std::fs::create_dir_all(results_dir())?;
    let report = results_dir().join("demo-verify.html");
    let status = Command::new(bin)
        .args([
            "verify",
            "--pid",
            &healthy.server.pid().to_string(),
            "--metrics-url",
            &format!("http://{}/metrics", healthy.addr),
        ])
        .args([
            "--load-url",
            &format!("http://{}/proxy/{CLIENT}/", healthy.addr),
            "--requests",
            "400",
            "--concurrency",
            "8",
        ])
        .args(["--side", "server", "--baseline", "4s", "--settle", "30s"])
        .arg("--report")
        .arg(&report)
        .status()?;
    if !status.success() {
        bail!("leakwatch verify failed on the healthy tunnel");
    }
    println!(
        "\nverify's report (charts of the run, each criterion marked): {}",
        report.display()
    );
    println!(
        "\ndemo complete: the leak was caught live, the healthy tunnel stayed green, and the recipe passed."
    );
    Ok(())
}
