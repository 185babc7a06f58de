//! `cargo xtask demo`: the story of the Rancher v2.10.3 tunnel leak, on one machine, told as it happened.
//!
//! 1. The bug and the fix side by side. Two reference tunnels proxy through a keep-alive HTTP transport
//!    built per request: v2.10.3's has no idle timeout (`--proxy-transport per-request`), v2.10.5's closes
//!    idle connections after Go's 90 s (`per-request-idle=90s`). The same keep-alive load goes through
//!    both. For 90 s they look identical: every request leaves an idle tunneled connection with no caller.
//!    Then the fix's pool drains and the bug's keeps growing, and leakwatch raises `idle_connection_leak`
//!    on the bug only.
//! 2. The fix's verification recipe (`leakwatch verify`) on both: it waits the idle horizon for the
//!    ledger to drain, passes on the fix and fails on the bug, and writes a report of each.
//! 3. Another leak shape for contrast: callers that left while their pipes stay stuck (CLOSE_WAIT, tasks
//!    held, the stacks that grew).
use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde_json::Value;

use testsupport::{Proc, http_get, load_args, release_bin};

use crate::{
    tunnel::{Tunnel, start_tunnel, start_tunnel_with},
    util::{wait_http, workspace_root},
};

const LEAKWATCH: &str = "127.0.0.1:9477";
/// The second leakwatch of the side-by-side act (the fixed tunnel's).
const LEAKWATCH_FIX: &str = "127.0.0.1:9478";

fn start_leakwatch(t: &Tunnel) -> Result<Proc> {
    start_leakwatch_on(t, LEAKWATCH, "reftunnel-server")
}

fn start_leakwatch_on(t: &Tunnel, listen: &str, name: &str) -> Result<Proc> {
    let bin = release_bin("leakwatch");
    let lw = Proc::launch(Command::new(bin).args([
        "watch",
        "--pid",
        &t.server.pid().to_string(),
        "--name",
        name,
        "--metrics-url",
        &t.metrics_url(),
        "--side",
        "server",
        "--listen",
        listen,
    ]))
    .name("leakwatch")
    .echo()
    .spawn()?;
    wait_http(&format!("http://{listen}/healthz"), Duration::from_secs(20))?;
    Ok(lw)
}

/// The load driver through `t`: fresh connections, or with `keep_alive` one caller connection reused
/// (as kubectl or a browser does).
fn start_load_with(t: &Tunnel, requests: u64, rate: u64, keep_alive: bool) -> Result<Proc> {
    let bin = release_bin("reftunnel");
    let mut cmd = Command::new(bin);
    let concurrency = if keep_alive { 1 } else { 4 };
    cmd.args(load_args(
        &t.proxy_url("/"),
        requests,
        rate as f64,
        concurrency,
    ));
    if keep_alive {
        cmd.arg("--keep-alive");
    }
    Ok(Proc::launch(&mut cmd).name("load").spawn()?)
}

fn start_load(t: &Tunnel, requests: u64, rate: u64) -> Result<Proc> {
    start_load_with(t, requests, rate, false)
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
    let saved = save_live_page(LEAKWATCH, mode);
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

/// Keeps a copy of a leakwatch's live page (`/`) under target/leakwatch-results.
fn save_live_page(listen: &str, name: &str) -> Option<std::path::PathBuf> {
    let page = http_get(&format!("http://{listen}/"))?;
    let path = results_dir().join(format!("demo-live-{name}.html"));
    std::fs::create_dir_all(results_dir()).ok()?;
    std::fs::write(&path, page).ok()?;
    Some(path)
}

/// leakwatch's view of one tunnel in a few words: live connections in the ledger, those idle past the
/// horizon beyond their rows' bounded sets, goroutines, and the verdicts.
fn brief(listen: &str) -> (String, Vec<String>, Vec<String>) {
    let doc: Value = http_get(&format!("http://{listen}/status"))
        .and_then(|b| serde_json::from_str(&b).ok())
        .unwrap_or_default();
    let app = &doc["snapshot"]["app"]["Ok"];
    let live: f64 = app["ledger"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["added"].as_f64().unwrap_or(0.0) - r["removed"].as_f64().unwrap_or(0.0))
        .sum();
    let kinds: Vec<String> = doc["verdicts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["kind"].as_str().map(str::to_string))
        .collect();
    let explained: Vec<String> = doc["verdicts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            format!(
                "{}: {}",
                v["kind"].as_str().unwrap_or("?"),
                v["explanation"].as_str().unwrap_or("")
            )
        })
        .collect();
    let line = format!(
        "live={:<4} idle>horizon={:<4} goroutines={:<5} {}",
        live,
        num(&doc["crosscheck"]["idle_beyond_horizon"]),
        num(&app["goroutines"]),
        if kinds.is_empty() {
            "green".to_string()
        } else {
            kinds.join(",")
        }
    );
    (line, kinds, explained)
}

/// The fix's idle timeout, seconds: Go's `http.DefaultTransport` default, which v2.10.5's transport clones.
const FIX_IDLE_TIMEOUT_S: u32 = 90;

/// Act 1: v2.10.3 and v2.10.5 under the same load, side by side.
fn bug_and_fix_side_by_side() -> Result<(Tunnel, Tunnel, Proc, Proc)> {
    println!(
        "\n=== 1/3  The v2.10.3 bug and the v2.10.5 fix, side by side ===\n\
         Both tunnels proxy through a keep-alive HTTP transport built for every request. v2.10.3's never\n\
         closes an idle connection; v2.10.5's closes it after Go's {FIX_IDLE_TIMEOUT_S} s. Each gets 5 requests/s for 60 s from\n\
         one keep-alive caller. Callers are served normally and no socket goes to CLOSE_WAIT: every request\n\
         leaves an idle tunneled connection with no caller behind it, on both. leakwatch must page on the\n\
         bug and stay silent on the fix, which only pools.\n"
    );
    let bug = start_tunnel_with(None, &["--proxy-transport", "per-request"])?;
    let fix_transport = format!("per-request-idle={FIX_IDLE_TIMEOUT_S}s");
    let fix = start_tunnel_with(None, &["--proxy-transport", &fix_transport])?;
    let lw_bug = start_leakwatch_on(&bug, LEAKWATCH, "v2.10.3")?;
    let lw_fix = start_leakwatch_on(&fix, LEAKWATCH_FIX, "v2.10.5")?;
    println!("live pages: http://{LEAKWATCH}/ (v2.10.3) and http://{LEAKWATCH_FIX}/ (v2.10.5)\n");
    let _loads = (
        start_load_with(&bug, 300, 5, true)?,
        start_load_with(&fix, 300, 5, true)?,
    );
    let t0 = Instant::now();
    let (mut bug_seen, mut fix_seen, mut explained) = (Vec::new(), Vec::new(), Vec::new());
    while t0.elapsed() < Duration::from_secs(170) {
        std::thread::sleep(Duration::from_secs(5));
        let (b, bk, be) = brief(LEAKWATCH);
        let (f, fk, _) = brief(LEAKWATCH_FIX);
        println!(
            "t={:>3}s  v2.10.3: {b:<58} | v2.10.5: {f}",
            t0.elapsed().as_secs()
        );
        for k in bk {
            if !bug_seen.contains(&k) {
                bug_seen.push(k);
            }
        }
        fix_seen.extend(fk);
        // The latest explanation: it has the most evidence (the goroutine dump confirms it later).
        if !be.is_empty() {
            explained = be;
        }
    }
    save_live_page(LEAKWATCH, "v2.10.3");
    save_live_page(LEAKWATCH_FIX, "v2.10.5");
    if !bug_seen.iter().any(|k| k == "idle_connection_leak") {
        bail!("leakwatch did not report idle_connection_leak on v2.10.3 (saw: {bug_seen:?})");
    }
    if !fix_seen.is_empty() {
        bail!("leakwatch raised {fix_seen:?} on v2.10.5, which only pools");
    }
    // The horizon as leakwatch has it (its /status), not a copy of its defaults.
    let analysis = http_get(&format!("http://{LEAKWATCH}/status"))
        .and_then(|b| serde_json::from_str::<Value>(&b).ok())
        .map(|d| d["analysis"].clone())
        .unwrap_or_default();
    let (timeout, margin) = (
        analysis["idle_timeout_s"].as_f64().unwrap_or(f64::NAN),
        analysis["idle_margin_s"].as_f64().unwrap_or(f64::NAN),
    );
    println!(
        "\nHow leakwatch told them apart: for the first {FIX_IDLE_TIMEOUT_S} s the two are the same (a connection per request,\n\
         idle, no caller). A healthy pool never holds a connection idle past its idle timeout, so leakwatch\n\
         counts, per clientkey/addr, the connections opened more than the idle horizon ({timeout} s + {margin} s\n\
         margin) ago that are still open, beyond the set that aged past it together (what a pool or watches\n\
         hold). On v2.10.5 that stays 0; on v2.10.3 it climbs by 5 a second:"
    );
    for e in explained {
        println!("  - {e}");
    }
    println!(
        "  pages saved: {}\n",
        results_dir().join("demo-live-v2.10.3.html").display()
    );
    Ok((bug, fix, lw_bug, lw_fix))
}

/// Act 2: `leakwatch verify` on both tunnels at once.
fn verify_both(bug: &Tunnel, fix: &Tunnel) -> Result<()> {
    println!(
        "=== 2/3  The fix's verification recipe, automated: leakwatch verify on both ===\n\
         200 requests, then up to the idle horizon for the ledger, goroutines and heap to come back.\n"
    );
    std::fs::create_dir_all(results_dir())?;
    let bin = release_bin("leakwatch");
    let verify = |t: &Tunnel, name: &str| -> Result<std::process::Child> {
        let report = results_dir().join(format!("demo-verify-{name}.html"));
        Ok(Command::new(&bin)
            .args(["verify", "--pid", &t.server.pid().to_string()])
            .args(["--metrics-url", &t.metrics_url()])
            .args(["--load-url", &t.proxy_url("/")])
            .args([
                "--requests",
                "200",
                "--concurrency",
                "4",
                "--side",
                "server",
            ])
            .arg("--report")
            .arg(report)
            .stdout(std::process::Stdio::piped())
            .spawn()?)
    };
    let (bug_run, fix_run) = (verify(bug, "v2.10.3")?, verify(fix, "v2.10.5")?);
    let (bug_out, fix_out) = (bug_run.wait_with_output()?, fix_run.wait_with_output()?);
    println!("v2.10.3:\n{}", String::from_utf8_lossy(&bug_out.stdout));
    println!("v2.10.5:\n{}", String::from_utf8_lossy(&fix_out.stdout));
    if bug_out.status.success() || !fix_out.status.success() {
        bail!("verify should fail on v2.10.3 and pass on v2.10.5");
    }
    println!(
        "reports (charts of each run, every criterion marked): {}\n",
        results_dir().join("demo-verify-v2.10.5.html").display()
    );
    Ok(())
}

pub fn run() -> Result<()> {
    let (bug, fix, mut lw_bug, mut lw_fix) = bug_and_fix_side_by_side()?;
    lw_bug.terminate();
    lw_fix.terminate();
    verify_both(&bug, &fix)?;
    drop((bug, fix));
    leak_phase(
        "=== 3/3  Another shape: stuck pipes (--leak stuck-pipe), tasks held for callers that left ===\n",
        "stuck-pipe",
        "task_growth",
        30,
    )?;
    println!(
        "demo complete: leakwatch paged on the v2.10.3 transport and stayed silent on the v2.10.5 pool,\n\
         verify failed the bug and passed the fix, and held pipes were caught with their stacks."
    );
    Ok(())
}
