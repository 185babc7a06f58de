//! The pieces every scenario file shares: `leakwatch check` on a target, the row each scenario records to
//! `target/leakwatch-results/scenarios.jsonl` (which `cargo xtask test` prints as a table), and how a
//! report is judged against what a scenario expects.
use std::{
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use testsupport::Proc;

pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub struct Watch {
    pub proc: Proc,
    output: Option<std::process::Output>,
}

/// Starts `leakwatch check` on a pid for `secs`, with the tunnel's metrics.
pub fn leakwatch_check(
    pid: u32,
    metrics_url: Option<&str>,
    side: &str,
    secs: u64,
    extra: &[&str],
) -> Watch {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leakwatch"));
    cmd.args([
        "check",
        "--pid",
        &pid.to_string(),
        "--duration",
        &format!("{secs}s"),
        "--json",
        "--side",
        side,
    ])
    .args(["--interval", "1s"])
    .args(extra);
    if let Some(url) = metrics_url {
        cmd.args(["--metrics-url", url]);
    }
    Watch::start(&mut cmd)
}

/// Like [`leakwatch_check`] but following the process by a command-line match (survives restarts).
pub fn leakwatch_check_match(pattern: &str, metrics_url: &str, secs: u64) -> Watch {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leakwatch"));
    cmd.args([
        "check",
        "--match",
        pattern,
        "--duration",
        &format!("{secs}s"),
        "--json",
        "--side",
        "server",
    ])
    .args(["--interval", "1s", "--metrics-url", metrics_url]);
    Watch::start(&mut cmd)
}

impl Watch {
    /// Starts leakwatch and returns once it has attached and taken its first sample of the target:
    /// from then on, what the scenario does is seen.
    pub fn start(cmd: &mut Command) -> Self {
        let proc = Proc::launch(cmd)
            .read_stderr()
            .spawn()
            .expect("spawn leakwatch");
        proc.wait_err_line("target found", Duration::from_secs(60))
            .unwrap();
        Watch { proc, output: None }
    }

    /// Starts leakwatch and returns at once, before it has found its target: for a leakwatch that
    /// is there before the target it waits for (`--match`). See [`Watch::wait_found`].
    pub fn launch(cmd: &mut Command) -> Self {
        let proc = Proc::launch(cmd)
            .read_stderr()
            .spawn()
            .expect("spawn leakwatch");
        Watch { proc, output: None }
    }

    /// Waits for a stderr line of leakwatch's containing `needle`.
    pub fn wait_err(&self, needle: &str, timeout: Duration) -> String {
        self.proc.wait_err_line(needle, timeout).unwrap()
    }

    /// Waits for leakwatch to attach to its target and sample it once.
    pub fn wait_found(&self, timeout: Duration) {
        self.wait_err("target found", timeout);
    }

    /// Waits for the check to finish and returns its JSON report.
    pub fn report(self) -> Value {
        self.report_within(Duration::from_secs(180))
    }

    /// [`Watch::report`] for a check that may still run up to `patience` (it prints its report only
    /// when it ends).
    pub fn report_within(mut self, patience: Duration) -> Value {
        let mut text = String::new();
        while let Some(line) = self.proc.next_line(patience) {
            text.push_str(&line);
            text.push('\n');
        }
        let status = self.proc.child.wait().expect("leakwatch exited");
        self.output = None;
        let report: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("leakwatch check printed no JSON report ({e}): {text}"));
        assert_eq!(
            status.code() == Some(1),
            !report["verdicts"]
                .as_array()
                .map(Vec::is_empty)
                .unwrap_or(true),
            "exit code follows the verdicts"
        );
        assert_eq!(report["mode"], "ebpf", "scenarios run with eBPF on");
        report
    }
}

#[derive(serde::Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub expected: Vec<&'static str>,
    pub fired: Vec<String>,
    /// Seconds from the start of the leak (the load) to the first expected verdict.
    pub detection_s: Option<f64>,
    pub false_alarms: Vec<String>,
    pub pass: bool,
    /// leakwatch's own CPU (% of one core) and peak RSS over the scenario.
    pub leakwatch_cpu_percent: f64,
    pub leakwatch_peak_rss_mib: f64,
    /// Every verdict as `kind@s [subject]: explanation`, for rows that are read by people fixing the
    /// analysis (absent from the older rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<String>>,
}

pub fn record(row: &Row) {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/leakwatch-results");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("scenarios.jsonl");
    let line = serde_json::to_string(row).expect("row serializes") + "\n";
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
    eprintln!(
        "SCENARIO {:<28} expected={:?} fired={:?} detection={} false_alarms={:?} cpu={:.2}% rss={:.1}MiB {}",
        row.scenario,
        row.expected,
        row.fired,
        row.detection_s
            .map(|d| format!("{d:.1}s"))
            .unwrap_or_else(|| "-".into()),
        row.false_alarms,
        row.leakwatch_cpu_percent,
        row.leakwatch_peak_rss_mib,
        if row.pass { "PASS" } else { "FAIL" }
    );
}

/// What a scenario must raise: the `primary` kind (the verdict that names the leak) within `within`
/// seconds of `leak_start`; `consequences` may fire too, as they really follow from the leak (held
/// connections hold heap; CLOSE_WAIT sockets hold fds, so the fd forecast moves). Anything else is a false
/// alarm, and a scenario with no primary kind must raise nothing at all.
#[derive(Clone, Copy)]
pub struct Expect {
    pub primary: &'static [&'static str],
    pub consequences: &'static [&'static str],
}

pub const NOTHING: Expect = Expect {
    primary: &[],
    consequences: &[],
};

pub fn evaluate(
    name: &'static str,
    report: &Value,
    expect: Expect,
    leak_start: f64,
    within: f64,
) -> Row {
    let row = judge(name, report, expect, leak_start, within, None);
    record(&row);
    row
}

/// [`evaluate`] for a scenario with a quiet phase before the leak begins: any verdict raised before
/// `leak_start` is a false alarm, whatever its kind (a start-up read as the leak is not its
/// detection). The row carries every verdict's subject and explanation.
pub fn evaluate_strict(
    name: &'static str,
    report: &Value,
    expect: Expect,
    leak_start: f64,
    within: f64,
) -> Row {
    let row = judge(name, report, expect, leak_start, within, Some(leak_start));
    record(&row);
    row
}

/// A report's verdicts as `kind@s [subject]: explanation`, `s` counted from `since`.
pub fn verdict_details(report: &Value, since: f64) -> Vec<String> {
    report["verdicts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            format!(
                "{}@{:.0}s [{}]: {}",
                r["verdict"]["kind"].as_str().unwrap_or(""),
                r["raised_unix"].as_f64().unwrap_or(0.0) - since,
                r["verdict"]["subject"].as_str().unwrap_or(""),
                r["verdict"]["explanation"].as_str().unwrap_or("")
            )
        })
        .collect()
}

fn judge(
    name: &'static str,
    report: &Value,
    expect: Expect,
    leak_start: f64,
    within: f64,
    quiet_until: Option<f64>,
) -> Row {
    let early =
        |r: &Value| quiet_until.is_some_and(|q| r["raised_unix"].as_f64().is_some_and(|t| t < q));
    let kind = |r: &Value| r["verdict"]["kind"].as_str().unwrap_or("").to_string();
    let verdicts = report["verdicts"].as_array().cloned().unwrap_or_default();
    let fired: Vec<String> = verdicts
        .iter()
        .map(|r| {
            format!(
                "{}@{:.0}s",
                kind(r),
                r["raised_unix"].as_f64().unwrap_or(0.0) - leak_start
            )
        })
        .collect();
    let detection_s = verdicts
        .iter()
        .filter(|r| expect.primary.contains(&kind(r).as_str()) && !early(r))
        .filter_map(|r| r["raised_unix"].as_f64())
        .map(|t| t - leak_start)
        .reduce(f64::min);
    let false_alarms: Vec<String> = verdicts
        .iter()
        .filter(|r| {
            let k = kind(r);
            early(r)
                || !expect.primary.contains(&k.as_str())
                    && !expect.consequences.contains(&k.as_str())
        })
        .map(|r| format!("{}: {}", kind(r), r["verdict"]["explanation"]))
        .collect();
    let pass = if expect.primary.is_empty() {
        verdicts.is_empty()
    } else {
        detection_s.is_some_and(|d| d <= within) && false_alarms.is_empty()
    };
    Row {
        scenario: name,
        expected: expect
            .primary
            .iter()
            .chain(expect.consequences)
            .copied()
            .collect(),
        fired,
        detection_s,
        false_alarms,
        pass,
        leakwatch_cpu_percent: report["leakwatch_cpu_percent"].as_f64().unwrap_or(f64::NAN),
        leakwatch_peak_rss_mib: report["leakwatch_peak_rss_mib"]
            .as_f64()
            .unwrap_or(f64::NAN),
        details: quiet_until.map(|_| verdict_details(report, leak_start)),
    }
}

pub fn assert_row(row: Row, report: &Value) {
    assert!(
        row.pass,
        "scenario {} failed: fired {:?}, detection {:?}, false alarms {:?}\nreport: {report:#}",
        row.scenario, row.fired, row.detection_s, row.false_alarms
    );
}
