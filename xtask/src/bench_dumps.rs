//! What reading a Go target's goroutine profile costs the target: its stall, measured as the longest
//! latency of a steady request loop to it (one `GET /ping` every 2 ms on a keep-alive connection), with
//! nothing reading its profile against while Go's aggregated profile (`debug=1`), a full dump (`debug=2`)
//! or leakwatch's confirm path (`goroutine_profiles confirm`: a scrape of `go_goroutines`, then the
//! profiler's gated dump) is read, at 1k, 10k and 100k parked goroutines. The target is our own Go program
//! (`xtask/bench-target/main.go`, built here with Debian's Go 1.19, installed with apt when missing).
use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testsupport::Proc;

use crate::{setup, util::workspace_root};

const GO: &str = "/usr/lib/go-1.19/bin/go";
const PING_EVERY: Duration = Duration::from_millis(2);

/// Builds the Go bench target (installing Go 1.19 with apt if it is missing) and returns its path.
fn build_target() -> Result<PathBuf> {
    if !std::path::Path::new(GO).exists() {
        setup::apt_install(&setup::apt_missing(&["golang-1.19-go"]))?;
    }
    let dir = workspace_root().join("target/go");
    let out = dir.join("bench-target");
    let status = Command::new(GO)
        .current_dir(workspace_root().join("xtask/bench-target"))
        .env("GOCACHE", dir.join("cache"))
        .env("GOPATH", dir.join("path"))
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .args(["build", "-o"])
        .arg(&out)
        .arg("main.go")
        .status()
        .context("running go build")?;
    if !status.success() {
        bail!("go build of xtask/bench-target failed");
    }
    Ok(out)
}

/// Latencies (ms) of one `GET /ping` every [`PING_EVERY`] on one keep-alive connection until `stop`.
fn ping_loop(addr: &str, stop: &AtomicBool) -> Result<Vec<f64>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut lat = Vec::new();
    let mut buf = [0u8; 1024];
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        s.write_all(b"GET /ping HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        let mut got = Vec::new();
        while !got.ends_with(b"pong") {
            let n = s.read(&mut buf)?;
            if n == 0 {
                bail!("the target closed the ping connection");
            }
            got.extend_from_slice(&buf[..n]);
        }
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        // A steady rate: a late answer delays the next request, it does not cause a burst.
        next = (next + PING_EVERY).max(Instant::now());
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    Ok(lat)
}

/// A whole GET (`Connection: close`): (bytes, seconds).
fn fetch(addr: &str, path: &str) -> Result<(usize, f64)> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    Ok((body.len(), t.elapsed().as_secs_f64()))
}

/// Runs the ping loop while `work` runs (plus 1 s before and after it); returns the ping loop's max and
/// p99 latency and what `work` returned.
fn phase<T>(addr: &str, work: impl FnOnce() -> Result<T>) -> Result<(f64, f64, T)> {
    let stop = Arc::new(AtomicBool::new(false));
    let (a, s) = (addr.to_string(), stop.clone());
    let pinger = std::thread::spawn(move || ping_loop(&a, &s));
    std::thread::sleep(Duration::from_secs(1));
    let out = work();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let mut lat = pinger
        .join()
        .map_err(|_| anyhow::anyhow!("ping thread panicked"))??;
    let out = out?;
    lat.sort_by(f64::total_cmp);
    let max = lat.last().copied().unwrap_or(f64::NAN);
    let p99 = lat.get(lat.len() * 99 / 100).copied().unwrap_or(f64::NAN);
    Ok((max, p99, out))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn example(name: &str) -> PathBuf {
    workspace_root().join("target/release/examples").join(name)
}

fn one_size(target: &PathBuf, goroutines: u64) -> Result<Value> {
    let t = Proc::launch(Command::new(target).args(["-goroutines", &goroutines.to_string()]))
        .name("go-bench-target")
        .spawn()?;
    let line = t.wait_line("listening", Duration::from_secs(60))?;
    let addr = line
        .split_whitespace()
        .nth(1)
        .context("listening line")?
        .to_string();
    let pprof = format!("http://{addr}/debug/pprof/goroutine");
    let compare: Value = {
        let o = Command::new(example("goroutine_profiles"))
            .args(["compare", &pprof])
            .output()?;
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
    };
    let idle = || -> Result<()> {
        std::thread::sleep(Duration::from_secs(4));
        Ok(())
    };
    // A max is a noisy figure on a shared machine: the confirm path, the figure that has a target, is
    // measured in alternating rounds with unwatched ones, and the medians of their maxes are compared.
    let (mut unwatched, mut confirm_max, mut confirm_p99) = (Vec::new(), Vec::new(), Vec::new());
    let mut confirm = Value::Null;
    for _ in 0..3 {
        unwatched.push(phase(&addr, idle)?.0);
        let (max, p99, c) = phase(&addr, || {
            let o = Command::new(example("goroutine_profiles"))
                .args(["confirm", &format!("http://{addr}/metrics"), &pprof, "5"])
                .output()?;
            if !o.status.success() {
                bail!(
                    "goroutine_profiles confirm failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            Ok(serde_json::from_slice::<Value>(&o.stdout)?)
        })?;
        confirm_max.push(max);
        confirm_p99.push(p99);
        confirm = c;
    }
    // debug=1 once a second, as often as the bench can rather than as rarely as leakwatch does.
    let (d1_max, d1_p99, d1) = phase(&addr, || {
        (0..4)
            .map(|_| {
                let r = fetch(&addr, "/debug/pprof/goroutine?debug=1");
                std::thread::sleep(Duration::from_secs(1));
                r
            })
            .collect::<Result<Vec<_>>>()
    })?;
    unwatched.push(phase(&addr, idle)?.0);
    let (d2_max, d2_p99, d2) = phase(&addr, || fetch(&addr, "/debug/pprof/goroutine?debug=2"))?;
    let base = median(unwatched.clone());
    let looks = confirm["looks"].as_array().cloned().unwrap_or_default();
    Ok(json!({
        "goroutines": goroutines,
        "unwatched_max_ms": unwatched,
        "unwatched_max_ms_median": base,
        "debug1_max_ms": d1_max,
        "debug1_p99_ms": d1_p99,
        "debug1_stall_ms": d1_max - base,
        "debug1_bytes": d1.first().map(|r| r.0),
        "debug1_seconds": median(d1.iter().map(|r| r.1).collect()),
        "debug2_max_ms": d2_max,
        "debug2_p99_ms": d2_p99,
        "debug2_stall_ms": d2_max - base,
        "debug2_bytes": d2.0,
        "debug2_seconds": d2.1,
        "debug2_stall_us_per_goroutine": (d2_max - base) * 1e3 / goroutines as f64,
        "confirm_max_ms": confirm_max.clone(),
        "confirm_p99_ms": confirm_p99,
        "confirm_stall_ms": median(confirm_max) - base,
        "confirm_looks": looks.len(),
        "confirm_dumps_read": looks.iter().filter(|l| l["read"] == true).count(),
        "confirm_note": looks.iter().find_map(|l| l["note"].as_str()),
        "layouts_agree": compare["same_stacks"],
        "layouts": compare,
    }))
}

pub fn run() -> Result<Value> {
    let target = build_target()?;
    let mut rows = Vec::new();
    for n in [1_000, 10_000, 100_000] {
        eprintln!("bench: goroutine profile cost to a Go target with {n} goroutines");
        rows.push(one_size(&target, n)?);
    }
    Ok(Value::Array(rows))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// `5.4, 7.3, 9.2` from a JSON array of milliseconds.
fn ms_list(v: &Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|x| format!("{:.1}", f(x)))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn print_rows(rows: &Value) {
    for r in rows.as_array().into_iter().flatten() {
        let n = r["goroutines"].as_u64().unwrap_or(0);
        println!(
            "| Go 1.19 target stall (max latency of a 2 ms /ping loop, minus unwatched {:.1} ms, the median of {}), {n} goroutines: debug=1 (once a second, 4 times) / debug=2 (once; {:.1} MB in {:.2} s) | {:.1} ms / {:.0} ms | - |",
            f(&r["unwatched_max_ms_median"]),
            ms_list(&r["unwatched_max_ms"]),
            f(&r["debug2_bytes"]) / 1e6,
            f(&r["debug2_seconds"]),
            f(&r["debug1_stall_ms"]),
            f(&r["debug2_stall_ms"]),
        );
        let stall = f(&r["confirm_stall_ms"]);
        let target = if n == 100_000 {
            format!("<= 5 ms: {}", if stall <= 5.0 { "met" } else { "NOT met" })
        } else {
            "-".into()
        };
        println!(
            "| target stall caused by leakwatch while a verdict is being confirmed (its confirm path once a second, {} looks and {} dumps read per round; median of 3 rounds' max latency ({} ms) minus unwatched), {n} goroutines | {stall:.1} ms | {target} |",
            r["confirm_looks"],
            r["confirm_dumps_read"],
            ms_list(&r["confirm_max_ms"]),
        );
    }
}
