//! Scenarios in the shapes of a real Rancher server (issue item 5): many clusters, idle API clients,
//! watches, the v2.10.5 fix on most clusters with the v2.10.3 bug on one, a shared pool that never closes
//! idle connections, slow targets, a start-up ramp of thousands of controllers and a goroutine leak that
//! begins long after it. The real reftunnel, watched by the real `leakwatch check` with eBPF on; each
//! scenario records its row to `target/leakwatch-results/scenarios.jsonl`.
//!
//! Why one `#[test]` that runs every scenario in its own thread: the scenarios hold load for 5 to 15
//! minutes each, mostly waiting, and CI's budget leaves this file about 17 minutes. libtest runs as many
//! tests at once as there are cores (2 in CI), which would run them in three waves (~35 min); one test
//! that starts them all at once runs them in one wave, whatever cargo is told. They do not take
//! scenarios.rs's serial lock: each has its own ports and token, each leakwatch watches its own pids, and
//! every rate here is modest so that they do not starve each other. Detection times are still checked;
//! the bounds are the issue's.
//!
//! `LEAKWATCH_RANCHER_ONLY=A,E` runs only those scenarios (development). `LEAKWATCH_SCENARIO_SCALE=0.3`
//! shortens every held duration (the 10 quiet minutes, the 15-minute watches, the 5 minutes before the
//! delayed leak) by that factor; the detection bounds, the 90 s idle timeout and the rates stay as they
//! are. The committed default, 1, is the durations.
//!
//! Needs root, the eBPF object and the reftunnel binary; `cargo xtask test` provides all three.
mod support;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::scenario::{Expect, NOTHING, Row, Watch, assert_row, evaluate_strict, now_unix};
use support::shapes::{Shape, Topology, finish, finish_proc};
use testsupport::Proc;

/// The factor of `LEAKWATCH_SCENARIO_SCALE` (default 1: the durations).
fn scale() -> f64 {
    std::env::var("LEAKWATCH_SCENARIO_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|f| *f > 0.0 && *f <= 1.0)
        .unwrap_or(1.0)
}

/// A held duration of the issue's, in minutes, shortened by [`scale`].
fn minutes(m: f64) -> Duration {
    Duration::from_secs_f64(m * 60.0 * scale())
}

/// `leakwatch check` for `dur` on a pid: the server with its metrics, or the agent with the kernel alone.
fn check_cmd(pid: u32, metrics_url: Option<&str>, side: &str, dur: Duration) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leakwatch"));
    cmd.args(["check", "--pid", &pid.to_string()])
        .args(["--duration", &format!("{}s", dur.as_secs())])
        .args(["--json", "--side", side, "--interval", "1s"]);
    if let Some(url) = metrics_url {
        cmd.args(["--metrics-url", url]);
    }
    cmd
}

fn check_server(t: &Topology, dur: Duration) -> Watch {
    Watch::start(&mut check_cmd(
        t.server.pid(),
        Some(&t.metrics_url()),
        "server",
        dur,
    ))
}

fn check_agent(t: &Topology, dur: Duration) -> Watch {
    Watch::start(&mut check_cmd(t.agents.pid(), None, "agent", dur))
}

/// Waits for a check to end; it prints its report only then, up to `left` from now (plus a margin).
fn report(w: Watch, ends_at: Instant) -> Value {
    let left = ends_at.saturating_duration_since(Instant::now());
    w.report_within(left + Duration::from_secs(120))
}

/// Watches outlast the check by this much: callers leaving together are not part of what is judged.
const WATCH_MARGIN: Duration = Duration::from_secs(30);

/// Waits for the watches driver to end (it holds its watches for the check and the margin) and checks
/// every watch was held throughout.
fn finish_watches(watches: Proc) {
    let held = finish_proc(
        watches,
        "the watches",
        WATCH_MARGIN + Duration::from_secs(150),
    );
    assert!(held.contains(" 0 ended early"), "{held}");
}

/// The verdicts of a report of `kind`.
fn verdicts_of<'a>(report: &'a Value, kind: &str) -> Vec<&'a Value> {
    report["verdicts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["verdict"]["kind"] == kind)
        .collect()
}

fn judge(name: &'static str, report: &Value, expect: Expect, start: f64, within: f64) -> Row {
    let row = evaluate_strict(name, report, expect, start, within);
    if let Some(d) = &row.details {
        for v in d {
            eprintln!("SCENARIO {name}: fired {v}");
        }
    }
    row
}

/// A healthy shape watched from both ends: `names` are the server's and the agent's rows, which must
/// both be empty of verdicts. Both rows are recorded before either fails the test.
fn nothing_on_either(names: [&'static str; 2], server: &Value, agent: &Value, start: f64) {
    let s = judge(names[0], server, NOTHING, start, 0.0);
    let a = judge(names[1], agent, NOTHING, start, 0.0);
    assert_row(s, server);
    assert_row(a, agent);
}

/// The fix's bursts on the first `clusters` agents until `until`: every `every`, 100 requests at 50/s
/// (4 at once) spread over them, run to completion. The gap is the schedule, not a wait for anything.
fn bursts(t: &Topology, clusters: u64, every: Duration, until: Instant) {
    let url = t.spread_url("/");
    let k = clusters.to_string();
    while Instant::now() + Duration::from_secs(5) < until {
        let started = Instant::now();
        finish(
            Topology::load(&url, 100, 50.0, 4, &["--clientkeys", &k]),
            "burst",
        );
        let next = started + every;
        if next >= until {
            break;
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

/// A: 100 clusters, 100 idle API clients, 30 watches held throughout, the fix on 50 clusters in bursts,
/// and the bug on one cluster (c-99) at 0.5 requests/s.
const BUG_CLUSTER: &str = "c-99";

fn scenario_a() {
    // The issue gives A no length: long enough for the 150 s bound and a few of the fix's idle
    // timeouts after it.
    let total = minutes(7.0).max(Duration::from_secs(240));
    let t = Topology::start(Shape {
        backends: 1,
        agents: 100,
        server_extra: [
            "--proxy-transport",
            "per-request-idle=90s",
            "--proxy-transport-for",
            &format!("{BUG_CLUSTER}=per-request"),
        ]
        .map(String::from)
        .to_vec(),
    });
    let _clients = t.idle_clients(100, "20s");
    let watches = t.watches(30, 10, 30, total + WATCH_MARGIN);
    let watch = check_server(&t, total);
    let ends_at = Instant::now() + total;
    // The first burst, then the bug begins: leakwatch has seen the fix's shape first.
    finish(
        Topology::load(&t.spread_url("/"), 100, 50.0, 4, &["--clientkeys", "50"]),
        "first burst",
    );
    let bug_start = now_unix();
    let _bug = Proc::spawn(&mut Topology::load(
        &t.proxy_url(BUG_CLUSTER, "/"),
        10_000,
        0.5,
        1,
        &[],
    ))
    .expect("spawn the bug's load");
    bursts(&t, 50, Duration::from_secs(60), ends_at);
    let report = report(watch, ends_at);
    finish_watches(watches);
    let row = judge(
        "rancher A: bug on 1 of 100 clusters",
        &report,
        Expect {
            primary: &["idle_connection_leak"],
            consequences: &[],
        },
        bug_start,
        150.0,
    );
    let idle = verdicts_of(&report, "idle_connection_leak");
    assert_eq!(
        idle.len(),
        1,
        "exactly one idle_connection_leak: {:#?}",
        row.details
    );
    let subject = idle[0]["verdict"]["subject"].as_str().unwrap_or("");
    let named: Vec<&str> = subject
        .split("clientkey=")
        .skip(1)
        .filter_map(|rest| rest.split([' ', ',', ';', ')']).next())
        .collect();
    // The fix's clusters (and the watches' rows) are healthy: a subject that lists them beside the bug
    // sends whoever reads it to 30 clusters that are fine.
    assert!(
        !named.is_empty() && named.iter().all(|k| *k == BUG_CLUSTER),
        "the verdict names the bug's cluster and no other: {subject}"
    );
    assert_row(row, &report);
}

/// B: A without the bug, for 10 minutes.
fn scenario_b() {
    let total = minutes(10.0);
    let t = Topology::start(Shape {
        backends: 1,
        agents: 100,
        server_extra: ["--proxy-transport", "per-request-idle=90s"]
            .map(String::from)
            .to_vec(),
    });
    let _clients = t.idle_clients(100, "20s");
    let watches = t.watches(30, 10, 30, total + WATCH_MARGIN);
    let watch = check_server(&t, total);
    let start = now_unix();
    let ends_at = Instant::now() + total;
    bursts(&t, 50, Duration::from_secs(60), ends_at);
    let report = report(watch, ends_at);
    finish_watches(watches);
    assert_row(
        judge(
            "rancher B: the fix on 50 of 100 clusters",
            &report,
            NOTHING,
            start,
            0.0,
        ),
        &report,
    );
}

/// C: a shared pool that never closes idle connections (Go's `&http.Transport{}`): 2 idle connections to
/// each of 20 addrs, then 10 quiet minutes. Bounded, so not a leak: nothing on either side.
fn scenario_c() {
    let total = minutes(10.0) + Duration::from_secs(30);
    let t = Topology::start(Shape {
        backends: 20,
        agents: 1,
        server_extra: ["--proxy-transport", "shared=never"]
            .map(String::from)
            .to_vec(),
    });
    let server = check_server(&t, total);
    let agent = check_agent(&t, total);
    let start = now_unix();
    let ends_at = Instant::now() + total;
    // 40 requests in flight at once, request i to addr i mod 20: two connections per addr, which the
    // pool then keeps idle forever.
    let addrs = t.backend_addrs.join(",");
    finish(
        Topology::load(
            &t.spread_url("/slow/2000"),
            40,
            0.0,
            40,
            &["--addrs", &addrs],
        ),
        "2 concurrent requests per addr",
    );
    let live = pooled_live(&t);
    assert_eq!(
        live, 40,
        "the pool holds 2 idle connections per addr (remotedialer's add minus remove)"
    );
    let server_report = report(server, ends_at);
    let agent_report = report(agent, ends_at);
    nothing_on_either(
        [
            "rancher C: shared=never, 20 addrs x 2 idle, server",
            "rancher C: shared=never, 20 addrs x 2 idle, agent",
        ],
        &server_report,
        &agent_report,
        start,
    );
    assert_eq!(pooled_live(&t), 40, "still held at the end: never closed");
}

/// Tunneled connections the server believes live: add minus remove over every row of its /metrics.
fn pooled_live(t: &Topology) -> i64 {
    let text = testsupport::http_get(&t.metrics_url()).unwrap_or_default();
    let sum = |family: &str| -> i64 {
        text.lines()
            .filter(|l| l.starts_with(family) && l[family.len()..].starts_with('{'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as i64
    };
    sum("session_server_total_add_connections") - sum("session_server_total_remove_connections")
}

/// D: 50 watches held for 15 minutes while bursts of ordinary requests (the fix) come and go.
fn scenario_d() {
    let total = minutes(15.0);
    let t = Topology::start(Shape {
        backends: 1,
        agents: 10,
        server_extra: ["--proxy-transport", "per-request-idle=90s"]
            .map(String::from)
            .to_vec(),
    });
    let watches = t.watches(50, 10, 10, total + WATCH_MARGIN);
    let server = check_server(&t, total);
    let agent = check_agent(&t, total);
    let start = now_unix();
    let ends_at = Instant::now() + total;
    bursts(&t, 10, Duration::from_secs(90), ends_at);
    let server_report = report(server, ends_at);
    let agent_report = report(agent, ends_at);
    finish_watches(watches);
    nothing_on_either(
        [
            "rancher D: 50 watches for 15 min + bursts, server",
            "rancher D: 50 watches for 15 min + bursts, agent",
        ],
        &server_report,
        &agent_report,
        start,
    );
}

/// E: leakwatch waits for the target, which starts 3,000 controllers over 60 s while 100 agents join
/// under light traffic: nothing. A goroutine leak (2 tasks/s) that begins 5 minutes after start is found
/// within 60 s.
fn scenario_e() {
    let leak_after = minutes(5.0);
    let pending = Topology::prepare(Shape {
        backends: 1,
        agents: 100,
        server_extra: [
            "--proxy-transport",
            "per-request-idle=90s",
            "--startup-tasks",
            "3000",
            "--startup-over",
            "60s",
            "--task-leak-after",
            &format!("{}s", leak_after.as_secs()),
            "--task-leak-rate",
            "2/s",
        ]
        .map(String::from)
        .to_vec(),
    });
    let total = leak_after + Duration::from_secs(150);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leakwatch"));
    cmd.args(["check", "--match", &pending.server_pattern()])
        .args(["--duration", &format!("{}s", total.as_secs())])
        .args(["--json", "--side", "server", "--interval", "1s"])
        .args(["--metrics-url", &pending.metrics_url()]);
    let watch = Watch::launch(&mut cmd);
    watch.wait_err("waiting for one to appear", Duration::from_secs(60));
    let ends_at = Instant::now() + total;
    let start = now_unix();
    let t = pending.start();
    watch.wait_found(Duration::from_secs(60));
    // Light traffic over every cluster, from their joining to the end.
    let _traffic = Proc::spawn(&mut Topology::load(
        &t.spread_url("/"),
        100_000,
        2.0,
        2,
        &["--clientkeys", "100"],
    ))
    .expect("spawn the light traffic");
    t.server
        .wait_line("startup tasks: 3000 started", Duration::from_secs(120))
        .expect("the start-up ramp completes");
    t.server
        .wait_line("task leak started", leak_after + Duration::from_secs(60))
        .expect("the leak begins");
    let leak_start = now_unix();
    eprintln!(
        "SCENARIO rancher E: the leak began {:.0}s after the server started",
        leak_start - start
    );
    let report = report(watch, ends_at);
    // What was still active at the end, for whoever reads a failure: did a verdict from the start-up
    // swallow the later leak?
    for v in report["active_at_end"].as_array().into_iter().flatten() {
        eprintln!(
            "SCENARIO rancher E: active at end: {} [{}]: {}",
            v["kind"].as_str().unwrap_or(""),
            v["subject"].as_str().unwrap_or(""),
            v["explanation"].as_str().unwrap_or("")
        );
    }
    let row = judge(
        "rancher E: 3000-task start-up, leak at 5 min",
        &report,
        Expect {
            primary: &["task_growth"],
            // The leaked tasks hold memory: heap growth follows from the leak itself.
            consequences: &["heap_growth"],
        },
        leak_start,
        60.0,
    );
    assert_row(row, &report);
}

/// F: rounds of 15 requests at once answered after 45 s, for 5 minutes, watched on server and agent.
/// Waiting on a slow target for callers that are still there is not a leak.
fn scenario_f() {
    let total = minutes(5.0) + Duration::from_secs(60);
    let t = Topology::start(Shape {
        backends: 1,
        agents: 1,
        server_extra: ["--proxy-transport", "per-request-idle=90s"]
            .map(String::from)
            .to_vec(),
    });
    let server = check_server(&t, total);
    let agent = check_agent(&t, total);
    let start = now_unix();
    let ends_at = Instant::now() + total;
    let rounds_until = Instant::now() + minutes(5.0);
    let mut rounds = 0;
    while Instant::now() < rounds_until {
        let mut cmd = Topology::load(&t.spread_url("/slow/45000"), 15, 0.0, 15, &[]);
        cmd.args(["--timeout", "60s"]);
        finish(cmd, "a round of slow requests");
        rounds += 1;
    }
    eprintln!("SCENARIO rancher F: {rounds} rounds of 15 slow requests");
    let server_report = report(server, ends_at);
    let agent_report = report(agent, ends_at);
    nothing_on_either(
        [
            "rancher F: 15 x 45 s answers, 5 min, server",
            "rancher F: 15 x 45 s answers, 5 min, agent",
        ],
        &server_report,
        &agent_report,
        start,
    );
}

const SCENARIOS: &[(&str, fn())] = &[
    ("A", scenario_a),
    ("B", scenario_b),
    ("C", scenario_c),
    ("D", scenario_d),
    ("E", scenario_e),
    ("F", scenario_f),
];

#[test]
fn rancher_shapes_all_at_once() {
    if !support::ebpf_tests_enabled() {
        return;
    }
    let only: Option<Vec<String>> = std::env::var("LEAKWATCH_RANCHER_ONLY")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_uppercase()).collect());
    let chosen: Vec<&(&str, fn())> = SCENARIOS
        .iter()
        .filter(|(n, _)| only.as_ref().is_none_or(|o| o.iter().any(|x| x == n)))
        .collect();
    assert!(
        !chosen.is_empty(),
        "LEAKWATCH_RANCHER_ONLY chose no scenario"
    );
    let started = Instant::now();
    let running: Vec<(&str, std::thread::JoinHandle<()>)> = chosen
        .into_iter()
        .map(|&(name, f)| {
            let h = std::thread::Builder::new()
                .name(format!("rancher-{name}"))
                .spawn(f)
                .expect("spawn a scenario thread");
            (name, h)
        })
        .collect();
    let failed: Vec<&str> = running
        .into_iter()
        .filter_map(|(name, h)| h.join().is_err().then_some(name))
        .collect();
    eprintln!(
        "SCENARIO rancher shapes: {:.1} min of wall time",
        started.elapsed().as_secs_f64() / 60.0
    );
    assert!(
        failed.is_empty(),
        "rancher scenarios failed: {failed:?} (their panics are above)"
    );
}
