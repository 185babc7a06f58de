//! The Grafana dashboard and the Prometheus rules are checked against the code:
//! - `promtool check rules` and `promtool test rules` (Debian's prometheus package) must pass;
//! - every metric a dashboard query or a rule names is exported by leakwatch (taken from the exporter itself,
//!   `LeakwatchMetrics`, fed one full snapshot), by the tunnel (remotedialer/Go names of docs/metrics.md), by
//!   Prometheus (`up`), or is a recording rule of the rules file;
//! - docs/metrics.md's table and the exporter list the same names;
//! - the dashboard uses the `${datasource}` variable everywhere, sets units, defines every `$variable` it uses,
//!   and each of its PromQL queries parses (promtool checks them as recording rules);
//! - there is an alert per verdict kind, and every alert has `for:`, a severity, summary, description, runbook
//!   and at least one `promtool test rules` case.
//!
//! Metric names are taken from PromQL by a small tokenizer: strings, label matchers `{...}`, ranges `[...]`
//! and the label lists of `by`/`without`/`on`/`ignoring`/`group_*` are skipped, identifiers followed by `(`
//! are functions, aggregation operators and keywords are dropped; what is left are metric names.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use leakwatch::{
    analysis::Derived,
    collect::{KernelMode, SourceCosts},
    outputs::metrics::LeakwatchMetrics,
    sample::{AppSample, KernelSample, ProcSample, ScrapeOutcome, Snapshot, TargetId},
    verdict::VerdictKind,
};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rules_path() -> PathBuf {
    root().join("dashboards/rules/leakwatch-rules.yml")
}

fn rules_test_path() -> PathBuf {
    root().join("dashboards/rules/leakwatch-rules.test.yml")
}

fn dashboard_path() -> PathBuf {
    root().join("dashboards/grafana/leakwatch.json")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "promtool is not installed, so the Prometheus rules cannot be checked. Install Debian's prometheus \
             package: `cargo xtask setup` does it (or `apt-get install prometheus`)."
        )
    })
}

/// Runs promtool; returns stdout+stderr, panicking with them if it failed.
fn run_promtool(args: &[&str], cwd: &Path) -> String {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "`promtool {}` failed:\n{text}",
        args.join(" ")
    );
    text
}

// ---- PromQL tokenizing ---------------------------------------------------------------------------------

const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
    "start",
    "end",
];
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Keywords whose parenthesised argument is a list of label names, not an expression.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Index just past the closing `close` of a group opened at `i` (quotes inside are skipped).
fn skip_group(b: &[u8], mut i: usize, open: u8, close: u8) -> usize {
    let mut depth = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'' | b'`') => i = skip_string(b, i, q) - 1,
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    panic!(
        "unbalanced {} in PromQL: {}",
        open as char,
        String::from_utf8_lossy(b)
    );
}

fn skip_string(b: &[u8], mut i: usize, q: u8) -> usize {
    i += 1;
    while i < b.len() && b[i] != q {
        if b[i] == b'\\' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// Metric names referenced by a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if matches!(c, b'"' | b'\'' | b'`') {
            i = skip_string(b, i, c);
        } else if c == b'{' {
            i = skip_group(b, i, b'{', b'}');
        } else if c == b'[' {
            i = skip_group(b, i, b'[', b']');
        } else if c == b'#' {
            // A comment runs to the end of the line.
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            // Numbers and durations (1e3, 0x1f, 5m, 1h30m).
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
        } else if c == b'$' {
            panic!("unsubstituted variable outside a matcher or range in {expr:?}");
        } else if is_ident_start(c) {
            let start = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let mut j = i;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            let lower = word.to_ascii_lowercase();
            if LABEL_LISTS.contains(&lower.as_str()) {
                if b.get(j) == Some(&b'(') {
                    i = skip_group(b, j, b'(', b')');
                }
            } else if b.get(j) == Some(&b'(')
                || KEYWORDS.contains(&lower.as_str())
                || AGGREGATIONS.contains(&lower.as_str())
            {
                // A function call, an aggregation (`sum by (x) (...)`) or a keyword.
            } else {
                names.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// `$name` and `${name}` references (Grafana variables) in a string.
fn variables(s: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)").expect("valid regex");
    re.captures_iter(s).map(|c| c[1].to_string()).collect()
}

/// Replaces Grafana variables by values that keep the query valid PromQL.
fn substitute(expr: &str) -> String {
    let re = regex::Regex::new(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?").expect("valid regex");
    re.replace_all(expr, |c: &regex::Captures| match &c[1] {
        "__rate_interval" | "__interval" => "5m".to_string(),
        "__range" => "1h".to_string(),
        other if other.starts_with("__") => "1".to_string(),
        _ => "x".to_string(),
    })
    .into_owned()
}

#[test]
fn tokenizer_finds_metric_names_only() {
    let got = metric_names(
        r#"sum by (clientkey, target) (rate(foo_total{a="b", c=~"x|y"}[5m] offset 1h)) / on (target) group_left(kind)
           max without (x) (bar) > 0.5 and baz unless absent(qux{n="}"}) or histogram_quantile(0.9, h_bucket) * 1e3"#,
    );
    let want: BTreeSet<String> = ["foo_total", "bar", "baz", "qux", "h_bucket"]
        .map(String::from)
        .into();
    assert_eq!(got, want);
    assert_eq!(
        metric_names("clientkey:session_server_live_connections:sum"),
        ["clientkey:session_server_live_connections:sum".to_string()].into()
    );
    assert_eq!(
        variables(r#"rate(x{pod=~"$pod", a="${datasource}"}[$__rate_interval])"#),
        ["__rate_interval", "datasource", "pod"]
            .map(String::from)
            .into()
    );
}

// ---- the names that exist --------------------------------------------------------------------------------

/// Every metric family leakwatch's exporter produces, from the exporter itself after one full update.
fn exporter_names() -> BTreeSet<String> {
    let mut m = LeakwatchMetrics::new("t");
    let snap = Snapshot {
        t: 1.0,
        unix: 0.0,
        target: Some(TargetId {
            pid: 1,
            start_ticks: 1,
        }),
        kernel: Some(KernelSample {
            procfs_disagreement: vec![("CLOSE_WAIT".into(), 0)],
            ..KernelSample::default()
        }),
        proc: Some(ProcSample {
            fd_limit: Some(1024),
            ..ProcSample::default()
        }),
        goroutines: None,
        app: ScrapeOutcome::Ok(AppSample {
            remotedialer_present: true,
            goroutines: Some(1.0),
            heap_inuse_bytes: Some(1.0),
            ..AppSample::default()
        }),
    };
    let derived = Derived {
        side: Some(leakwatch::analysis::SideInEffect {
            end: leakwatch::analysis::End::Server,
            auto: false,
        }),
        app_live_by_clientkey: [("c1".to_string(), 1.0)].into(),
        unbacked_connections: Some(0.0),
        idle_beyond_horizon: Some(0.0),
        unanswered_requests: Some(0.0),
        fd_exhaustion_seconds: Some(60.0),
    };
    m.update(
        &snap,
        &KernelMode::Ebpf,
        &SourceCosts::default(),
        &[],
        &derived,
    );
    m.scrape_failed("connect");
    m.verdict_raised(VerdictKind::SocketLeak);
    m.target_restarted();
    let names: BTreeSet<String> = m
        .encode()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect();
    assert!(
        names.len() > 20,
        "the exporter produced too few families: {names:?}"
    );
    names
}

/// docs/metrics.md: leakwatch's names (first column of the table) and the tunnel's names (the backticked
/// names of the paragraph about the reference tunnel).
fn documented_names() -> (BTreeSet<String>, BTreeSet<String>) {
    let doc = read(&root().join("docs/metrics.md"));
    let cell = regex::Regex::new(r"^\|\s*`([a-z_:][a-z0-9_:]*)`\s*\|").expect("valid regex");
    let leakwatch: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| cell.captures(l).map(|c| c[1].to_string()))
        .collect();
    let tail = doc
        .split_once("reference tunnel")
        .map(|(_, t)| t)
        .expect("docs/metrics.md describes the reference tunnel's metrics");
    let tick = regex::Regex::new(r"`([a-z_:][a-z0-9_:]*)(\{[^`]*\})?`").expect("valid regex");
    let tunnel: BTreeSet<String> = tick
        .captures_iter(tail)
        .map(|c| c[1].to_string())
        .filter(|n| n.contains('_'))
        .collect();
    assert!(
        tunnel.contains("session_server_total_add_connections") && tunnel.contains("go_goroutines"),
        "could not read the tunnel's metric names from docs/metrics.md: {tunnel:?}"
    );
    (leakwatch, tunnel)
}

#[test]
fn docs_table_and_exporter_agree() {
    let exported = exporter_names();
    let (documented, _) = documented_names();
    let undocumented: Vec<_> = exported.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&exported).collect();
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "docs/metrics.md and the exporter disagree.\nexported but not in the docs table: {undocumented:?}\n\
         in the docs table but not exported: {missing:?}"
    );
}

/// The `event` and `table` label values of the kernel counters come from the one counter table in
/// monitor-ebpf: docs/metrics.md must list exactly those, and no dashboard, rule or rule test may name a
/// value that no longer exists (the syscall counters and the `sock_fds` table were removed).
#[test]
fn kernel_counter_label_values_match_the_counter_table() {
    use monitor_ebpf::{Export, counter::SCALARS};
    let events: BTreeSet<&str> = SCALARS
        .iter()
        .filter(|d| d.export == Export::Event)
        .map(|d| d.name)
        .collect();
    let tables: BTreeSet<&str> = SCALARS
        .iter()
        .filter_map(|d| match d.export {
            Export::TableFull(t) => Some(t),
            _ => None,
        })
        .collect();
    let doc = read(&root().join("docs/metrics.md"));
    let row = |metric: &str| -> BTreeSet<String> {
        let line = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{metric}`")))
            .unwrap_or_else(|| panic!("docs/metrics.md has a row for {metric}"));
        let meaning = line.rsplit('|').nth(1).unwrap_or_default();
        let meaning = meaning.split(" (").next().unwrap_or_default();
        regex::Regex::new(r"`([a-z_]+)`")
            .expect("valid regex")
            .captures_iter(meaning)
            .map(|c| c[1].to_string())
            .collect()
    };
    let as_strings = |s: &BTreeSet<&str>| s.iter().map(|v| v.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(row("leakwatch_kernel_events_total"), as_strings(&events));
    assert_eq!(
        row("leakwatch_kernel_table_full_total"),
        as_strings(&tables)
    );
    let label = regex::Regex::new(r#"(event|table)=~?\\?"([a-z_|]+)\\?""#).expect("valid regex");
    for path in [
        root().join("dashboards/grafana/leakwatch.json"),
        rules_path(),
        rules_test_path(),
    ] {
        let text = read(&path);
        for c in label.captures_iter(&text) {
            let known = if &c[1] == "event" { &events } else { &tables };
            for v in c[2].split('|') {
                assert!(
                    known.contains(v),
                    "{} names {}=\"{v}\", which the counter table does not export",
                    path.display(),
                    &c[1]
                );
            }
        }
    }
}

// ---- the rules file ------------------------------------------------------------------------------------

#[derive(Debug)]
struct Rule {
    /// `alert` or `record`.
    kind: &'static str,
    name: String,
    expr: String,
    /// The rule's whole text, for checking its keys.
    text: String,
}

/// The rules of leakwatch-rules.yml, read with a small line parser (the crate has no YAML parser); the
/// count is checked against promtool's own count so nothing is silently skipped.
fn rules() -> Vec<Rule> {
    let text = read(&rules_path());
    let lines: Vec<&str> = text.lines().collect();
    let head = regex::Regex::new(r"^\s*- (alert|record):\s*(\S+)\s*$").expect("valid regex");
    let mut starts: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| head.is_match(l))
        .map(|(i, _)| i)
        .collect();
    starts.push(lines.len());
    let mut out = Vec::new();
    for w in starts.windows(2) {
        let block = &lines[w[0]..w[1]];
        let caps = head.captures(block[0]).expect("rule head");
        let kind = if &caps[1] == "alert" {
            "alert"
        } else {
            "record"
        };
        let (i, line) = block
            .iter()
            .enumerate()
            .find(|(_, l)| l.trim_start().starts_with("expr:"))
            .unwrap_or_else(|| panic!("rule {} has no expr", &caps[2]));
        let indent = line.len() - line.trim_start().len();
        let rest = line.trim_start()["expr:".len()..].trim();
        let expr = if rest.starts_with('|') || rest.starts_with('>') {
            block[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            rest.trim_matches(|c| c == '\'' || c == '"').to_string()
        };
        out.push(Rule {
            kind,
            name: caps[2].to_string(),
            expr,
            text: block.join("\n"),
        });
    }
    out
}

#[test]
fn promtool_checks_and_unit_tests_pass() {
    let dir = rules_path().parent().expect("rules dir").to_path_buf();
    let check = run_promtool(&["check", "rules", "leakwatch-rules.yml"], &dir);
    let count: usize = regex::Regex::new(r"SUCCESS: (\d+) rules found")
        .expect("valid regex")
        .captures(&check)
        .unwrap_or_else(|| panic!("unexpected promtool output: {check}"))[1]
        .parse()
        .expect("a number");
    assert_eq!(
        count,
        rules().len(),
        "this test's rule parser and promtool disagree on the number of rules"
    );
    assert!(
        !check.to_lowercase().contains("warning"),
        "promtool check rules warns:\n{check}"
    );
    let test = run_promtool(&["test", "rules", "leakwatch-rules.test.yml"], &dir);
    assert!(test.contains("SUCCESS"), "promtool test rules: {test}");
    eprintln!("{check}{test}");
}

/// The promtool cases are generated from the rules' templates: a committed file that the generator would
/// no longer produce tests yesterday's rules.
#[test]
fn the_rule_tests_are_what_the_generator_makes_now() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fresh = dir.path().join("leakwatch-rules.test.yml");
    let generator = rules_path()
        .parent()
        .expect("rules dir")
        .join("gen-tests.py");
    let out = Command::new("python3")
        .arg(&generator)
        .arg(&fresh)
        .output()
        .expect("python3 runs (cargo xtask setup installs it, with PyYAML)");
    assert!(
        out.status.success(),
        "gen-tests.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        read(&fresh) == read(&rules_test_path()),
        "dashboards/rules/leakwatch-rules.test.yml is stale: run `python3 dashboards/rules/gen-tests.py`"
    );
}

#[test]
fn every_alert_is_complete_and_unit_tested() {
    let tests = read(&rules_test_path());
    let rules = rules();
    let alerts: Vec<&Rule> = rules.iter().filter(|r| r.kind == "alert").collect();
    assert!(alerts.len() >= 12, "expected the full set of alerts");
    for a in &alerts {
        for key in ["for:", "severity:", "summary:", "description:", "runbook:"] {
            assert!(a.text.contains(key), "alert {} has no {key}", a.name);
        }
        assert!(
            tests.contains(&format!("alertname: {}\n", a.name)),
            "alert {} has no case in leakwatch-rules.test.yml",
            a.name
        );
    }
    // One alert per verdict kind, named as the alerting integration test expects, driven by the verdict.
    for kind in VerdictKind::ALL {
        let camel: String = kind
            .as_str()
            .split('_')
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect();
        let name = format!("Leakwatch{camel}");
        let alert = alerts
            .iter()
            .find(|a| a.name == name)
            .unwrap_or_else(|| panic!("no alert {name} for verdict kind {}", kind.as_str()));
        assert!(
            alert.expr.contains("leakwatch_verdict_active")
                && alert.expr.contains(&format!("kind=\"{}\"", kind.as_str())),
            "{name} must be driven by leakwatch_verdict_active{{kind=\"{}\"}}: {}",
            kind.as_str(),
            alert.expr
        );
    }
    let itest = read(&root().join("monitor/tests/prometheus_alerts.rs"));
    let quoted = regex::Regex::new(r#""(Leakwatch[A-Za-z]+)""#).expect("valid regex");
    for c in quoted.captures_iter(&itest) {
        assert!(
            alerts.iter().any(|a| a.name == c[1]),
            "prometheus_alerts.rs expects alert {} which the rules do not define",
            &c[1]
        );
    }
}

// ---- the dashboard -------------------------------------------------------------------------------------

fn dashboard() -> Value {
    serde_json::from_str(&read(&dashboard_path()))
        .expect("dashboards/grafana/leakwatch.json is JSON")
}

/// All panels, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels array") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner.iter());
        }
    }
    out
}

/// Every PromQL string of the dashboard: panel targets, annotations, and the selectors of variable queries
/// (`label_values(selector, label)`), each with where it comes from.
fn dashboard_queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {:?}: target without expr", p["title"]));
            out.push((format!("panel {:?}", p["title"]), expr.to_string()));
        }
    }
    for a in d["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(e) = a["expr"].as_str() {
            out.push((format!("annotation {:?}", a["name"]), e.to_string()));
        }
    }
    let lv = regex::Regex::new(r"^label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)$")
        .expect("valid regex");
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .expect("variable query");
            let sel = lv.captures(q).unwrap_or_else(|| {
                panic!(
                    "variable {:?}: expected label_values(selector, label): {q}",
                    v["name"]
                )
            });
            out.push((format!("variable {:?}", v["name"]), sel[1].to_string()));
        }
    }
    out
}

#[test]
fn dashboard_uses_the_datasource_variable_units_and_current_schema() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().unwrap_or(0) >= 39,
        "schemaVersion must be 39 or later"
    );
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a `datasource` variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for name in ["namespace", "pod", "target"] {
        let v = vars
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("a `{name}` variable"));
        let q = v["query"]["query"].as_str().unwrap_or_default();
        assert!(
            q.starts_with("label_values(leakwatch_up"),
            "${name} comes from leakwatch_up: {q}"
        );
    }

    let want_ds = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let current = [
        "timeseries",
        "stat",
        "table",
        "state-timeline",
        "status-history",
        "gauge",
        "bargauge",
        "text",
        "row",
        "heatmap",
        "logs",
    ];
    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or_default();
        let ty = p["type"].as_str().unwrap_or_default();
        assert!(
            current.contains(&ty),
            "panel {title:?}: type {ty:?} is not a current panel plugin"
        );
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id in {title:?}"
        );
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap_or(99) + g["w"].as_u64().unwrap_or(99) <= 24,
            "panel {title:?} overflows the 24-column grid"
        );
        if ty == "row" {
            continue;
        }
        assert!(
            !p["description"].as_str().unwrap_or_default().is_empty(),
            "panel {title:?} has no description"
        );
        assert_eq!(p["datasource"], want_ds, "panel {title:?} datasource");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            assert_eq!(t["datasource"], want_ds, "a query of panel {title:?}");
        }
        if matches!(ty, "timeseries" | "stat" | "gauge" | "bargauge") {
            let unit = p["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .unwrap_or_default();
            assert!(!unit.is_empty(), "panel {title:?} has no unit");
        }
    }
    assert!(ids.len() >= 15, "expected a full dashboard");

    // No hard-coded datasource anywhere: every datasource reference is the variable (or Grafana's built-in
    // annotation source).
    fn walk(v: &Value, want: &Value, path: &str) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "datasource" && x.is_object() && x["uid"] != "-- Grafana --" {
                        assert_eq!(x, want, "datasource at {path}.{k}");
                    }
                    if k == "datasource" && x.is_string() {
                        panic!("datasource given by name at {path}.{k}: {x}");
                    }
                    walk(x, want, &format!("{path}.{k}"));
                }
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    walk(x, want, &format!("{path}[{i}]"));
                }
            }
            _ => {}
        }
    }
    walk(&d, &want_ds, "");
}

#[test]
fn dashboard_variables_resolve() {
    let d = dashboard();
    let defined: BTreeSet<String> = d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str().map(String::from))
        .collect();
    let mut strings = dashboard_queries(&d);
    for p in panels(&d) {
        strings.push((
            "panel title".into(),
            p["title"].as_str().unwrap_or_default().into(),
        ));
        if let Some(r) = p["repeat"].as_str() {
            strings.push(("panel repeat".into(), format!("${r}")));
        }
    }
    for (from, s) in strings {
        for var in variables(&s) {
            assert!(
                var.starts_with("__") || defined.contains(&var),
                "{from} uses ${var}, which is not a dashboard variable: {s}"
            );
        }
    }
}

#[test]
fn dashboard_queries_are_valid_promql() {
    let d = dashboard();
    let rules: Vec<Value> = dashboard_queries(&d)
        .iter()
        .enumerate()
        .map(|(i, (_, q))| serde_json::json!({"record": format!("dashboard_query_{i}"), "expr": substitute(q)}))
        .collect();
    let n = rules.len();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = tempfile::tempdir().expect("tempdir");
    // JSON is YAML: promtool parses every query with Prometheus' own parser.
    std::fs::write(dir.path().join("queries.yml"), file.to_string()).expect("write queries");
    let out = run_promtool(&["check", "rules", "queries.yml"], dir.path());
    assert!(
        out.contains(&format!("SUCCESS: {n} rules found")),
        "promtool: {out}"
    );
}

#[test]
fn every_metric_named_exists() {
    let exported = exporter_names();
    let (_, tunnel) = documented_names();
    let rules = rules();
    let recorded: BTreeSet<String> = rules
        .iter()
        .filter(|r| r.kind == "record")
        .map(|r| r.name.clone())
        .collect();
    let known =
        |n: &str| n == "up" || exported.contains(n) || tunnel.contains(n) || recorded.contains(n);

    let mut unknown: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut used = BTreeSet::new();
    let d = dashboard();
    let sources = dashboard_queries(&d)
        .into_iter()
        .map(|(from, q)| (from, substitute(&q)))
        .chain(
            rules
                .iter()
                .map(|r| (format!("rule {}", r.name), r.expr.clone())),
        );
    for (from, expr) in sources {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "{from}: no metric found in {expr:?}");
        for n in names {
            if !known(&n) {
                unknown.entry(n.clone()).or_default().push(from.clone());
            }
            used.insert(n);
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics named by the dashboard or the rules that neither leakwatch, the tunnel (docs/metrics.md) nor \
         a recording rule provides: {unknown:#?}"
    );
    // The cross-check is on the dashboard: app, kernel and procfs views of live connections.
    for n in [
        "leakwatch_app_live_connections",
        "leakwatch_kernel_live_sockets",
        "leakwatch_procfs_tcp_sockets",
        "leakwatch_crosscheck_unbacked_connections",
        "leakwatch_verdict_active",
        "session_server_total_add_connections",
        "session_server_total_remove_connections",
    ] {
        assert!(used.contains(n), "{n} is used by no panel or rule");
    }
}

#[test]
fn prometheusrule_manifest_wraps_the_rules_unchanged() {
    let rules = read(&rules_path());
    let groups = &rules[rules.find("\ngroups:").expect("rules file has groups") + 1..];
    let indented: String = groups
        .lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("  {l}\n")
            }
        })
        .collect();
    let manifest = read(&root().join("deploy/kubernetes/leakwatch-prometheusrule.yaml"));
    let body = manifest
        .split_once("  # BEGIN RULES\n")
        .map(|(_, b)| b)
        .expect("the PrometheusRule manifest has its BEGIN RULES marker");
    assert!(
        body == indented,
        "deploy/kubernetes/leakwatch-prometheusrule.yaml is out of date with dashboards/rules/leakwatch-rules.yml: \
         regenerate it with the command in its header"
    );
}

/// Issue 19, item 5: the thresholds and defaults the docs, the dashboard and the runbooks state are the
/// analysis' own (`AnalysisConfig::default()`, the one table everything reads), not copies that drift.
#[test]
fn docs_dashboard_and_runbooks_state_the_analysis_defaults() {
    let c = leakwatch::analysis::AnalysisConfig::default();
    let dashboard: Value = serde_json::from_str(&read(&dashboard_path())).expect("dashboard JSON");
    let panel = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .find(|p| p["title"] == "Unbacked and idle-beyond-horizon connections")
        .expect("the idle panel");
    let steps: Vec<f64> = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        .as_array()
        .expect("threshold steps")
        .iter()
        .filter_map(|s| s["value"].as_f64())
        .collect();
    let (warn, crit) = (c.idle_tolerance, c.critical_factor * c.idle_tolerance);
    assert_eq!(
        steps,
        [warn, crit],
        "the idle panel draws the idle rule's warning and critical levels"
    );
    let description = panel["description"].as_str().expect("description");
    for says in [
        format!("Threshold lines: {warn} (warning) and {crit} (critical)"),
        format!("{}x it", c.critical_factor),
        format!("({} s for Go)", c.idle_timeout_s),
        format!("for over {} s", c.unanswered_after_s),
    ] {
        assert!(
            description.contains(&says),
            "the panel says {says:?}: {description}"
        );
    }
    let legend = format!("unanswered requests (dialed, > {} s)", c.unanswered_after_s);
    assert!(
        panel["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .any(|t| t["legendFormat"] == legend.as_str()),
        "the idle panel's legend says {legend:?}"
    );
    let metrics_md = read(&root().join("docs/metrics.md"));
    for says in [
        format!("(`--idle-timeout` + {} s)", c.idle_margin_s),
        format!("longer than {} s", c.unanswered_after_s),
        format!(
            "every `--procfs-scan-interval`, {} s by default",
            leakwatch::args::DEFAULT_PROCFS_SCAN_INTERVAL.as_secs()
        ),
    ] {
        assert!(metrics_md.contains(&says), "docs/metrics.md says {says:?}");
    }
    let rules = read(&rules_path());
    let horizon = format!("{}s by default", c.idle_horizon_s());
    assert!(
        rules.contains(&format!("(idle timeout\n            + margin, {horizon})")),
        "the idle runbook states the horizon: {horizon}"
    );
    let readme = read(&root().join("README.md"));
    assert!(
        readme.contains(&format!(
            "(`--idle-timeout`, {} s, + {} s margin)",
            c.idle_timeout_s, c.idle_margin_s
        )),
        "README states the idle horizon's parts"
    );
    for says in [
        format!("received not one byte for over {} s", c.unanswered_after_s),
        format!("(`socket_leak`, after {} s)", c.unanswered_after_s),
    ] {
        assert!(readme.contains(&says), "README says {says:?}");
    }
}
