#!/usr/bin/env python3
# Regenerate leakwatch-rules.test.yml after changing the rules or the cases below (needs PyYAML):
#   python3 dashboards/rules/gen-tests.py && promtool test rules dashboards/rules/leakwatch-rules.test.yml
"""Writes dashboards/rules/leakwatch-rules.test.yml: the cases below, with the expected annotations rendered from
the rules file's templates (so the test also checks that every template expands to the text we expect)."""
import re, sys, yaml

import os
HERE = os.path.dirname(os.path.abspath(__file__))
RULES = os.path.join(HERE, "leakwatch-rules.yml")
# An optional argument writes elsewhere: monitor/tests/dashboards.rs regenerates into a temporary file and
# fails when the committed test file differs from what this script makes now.
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "leakwatch-rules.test.yml")
rules = yaml.safe_load(open(RULES))
alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}

def render(tmpl, labels, value):
    def lab(m):
        return labels.get(m.group(1), "")
    s = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lab, tmpl)
    s = re.sub(r"\{\{\s*\$value\s*\|\s*humanizePercentage\s*\}\}", lambda m: ("%.4g" % (value * 100)) + "%", s)
    s = re.sub(r'\{\{\s*\$value\s*\|\s*printf\s*"([^"]*)"\s*\}\}', lambda m: m.group(1) % value, s)
    assert "{{" not in s, s
    return s

def fmt_labels(d):
    return "{" + ",".join('%s="%s"' % (k, v) for k, v in d.items()) + "}"

LW = {"job": "leakwatch", "instance": "lw:9477", "namespace": "ns", "pod": "tunnel-0", "target": "reftunnel"}
TUN = {"job": "tunnel", "instance": "tunnel-0:8080", "namespace": "ns", "pod": "tunnel-0"}

def series(name, labels, values):
    return {"series": name + fmt_labels(labels), "values": values}

def expect(alertname, labels, value=None):
    """An expected firing alert: labels of the series after the expression, plus alertname and severity."""
    r = alerts[alertname]
    sev = r["labels"]["severity"]
    full = dict(labels)
    full["severity"] = render(sev, labels, value)
    ann = {k: render(v, labels, value) for k, v in r["annotations"].items()}
    return {"exp_labels": full, "exp_annotations": ann}

def case(alertname, at, exp):
    return {"eval_time": at, "alertname": alertname, "exp_alerts": exp}

tests = []

# --- leak verdicts: one group per kind -----------------------------------------------------------------
kinds = {
    "bookkeeping_leak": "LeakwatchBookkeepingLeak",
    "idle_connection_leak": "LeakwatchIdleConnectionLeak",
    "socket_leak": "LeakwatchSocketLeak",
    "task_growth": "LeakwatchTaskGrowth",
    "heap_growth": "LeakwatchHeapGrowth",
    "quiescence_failure": "LeakwatchQuiescenceFailure",
    "fd_exhaustion": "LeakwatchFdExhaustion",
}
for kind, name in kinds.items():
    warn = dict(LW, kind=kind, severity="warning")
    crit = dict(LW, kind=kind, severity="critical")
    healthy = dict(LW, target="healthy", kind=kind, severity="warning")
    blip = dict(LW, target="blip", kind=kind, severity="warning")
    other = dict(LW, target="other", kind=kind, severity="critical")
    # leaking target: verdict (warning) from 2m on; "other" target: critical verdict from 0 on; "healthy" never;
    # "blip" active for one evaluation only (shorter than for: 1m).
    t = {
        "interval": "1m",
        "input_series": [
            series("leakwatch_verdict_active", warn, "0 0 1 1 1 1 1 1 1 1"),
            series("leakwatch_verdict_active", crit, "0x9"),
            series("leakwatch_verdict_active", healthy, "0x9"),
            series("leakwatch_verdict_active", dict(healthy, severity="critical"), "0x9"),
            series("leakwatch_verdict_active", blip, "0 0 0 0 1 0 0 0 0 0"),
            series("leakwatch_verdict_active", other, "1x9"),
        ],
        "alert_rule_test": [
            # 0m: nothing has been active for 1m yet.
            case(name, "0m", []),
            # 2m: the verdict just appeared: pending only, "other" fires (active since 0m).
            case(name, "2m", [expect(name, {"alertname": name, **other})]),
            # 3m30s: active for 1m30s: firing with leakwatch's severity.
            case(name, "3m30s", [expect(name, {"alertname": name, **warn}), expect(name, {"alertname": name, **other})]),
            # 5m: the blip at 4m never fires.
            case(name, "5m", [expect(name, {"alertname": name, **warn}), expect(name, {"alertname": name, **other})]),
        ],
    }
    for a in t["alert_rule_test"]:
        for e in a["exp_alerts"]:
            e["exp_labels"].pop("alertname")
    tests.append(t)

# A verdict that flaps on and off every 30s never stays active for 1m: no alert.
flap = dict(LW, kind="bookkeeping_leak", severity="warning")
tests.append({
    "interval": "30s",
    "input_series": [series("leakwatch_verdict_active", flap, "1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1")],
    "alert_rule_test": [case("LeakwatchBookkeepingLeak", t, []) for t in ["1m", "2m", "4m", "6m", "10m"]],
})

def simple(alertname, input_series, cases):
    out = []
    for at, exp in cases:
        out.append(case(alertname, at, [expect(alertname, lab, v) for lab, v in exp]))
    return {"interval": "1m", "input_series": input_series, "alert_rule_test": out}

# --- fd usage --------------------------------------------------------------------------------------------
hi = dict(LW)
tests.append(simple("LeakwatchFdUsageHigh", [
    series("leakwatch_procfs_open_fds", hi, "950x10"),
    series("leakwatch_procfs_max_fds", hi, "1000x10"),
    series("leakwatch_procfs_open_fds", dict(LW, target="ok"), "500x10"),
    series("leakwatch_procfs_max_fds", dict(LW, target="ok"), "1000x10"),
    # Above 90% for 3 minutes only.
    series("leakwatch_procfs_open_fds", dict(LW, target="blip"), "500 950 950 950 500 500 500 500 500 500"),
    series("leakwatch_procfs_max_fds", dict(LW, target="blip"), "1000x10"),
    # No limit known (0): never divided by.
    series("leakwatch_procfs_open_fds", dict(LW, target="nolimit"), "950x10"),
    series("leakwatch_procfs_max_fds", dict(LW, target="nolimit"), "0x10"),
], [("4m", []), ("6m", [(hi, 0.95)]), ("9m", [(hi, 0.95)])]))  # 6m: rule groups may run in any order

# --- leakwatch itself --------------------------------------------------------------------------------------
up = {"job": "leakwatch", "instance": "lw:9477", "namespace": "ns", "pod": "tunnel-0"}
tests.append(simple("LeakwatchDown", [
    series("up", up, "1 1 0 0 0 0 0 0 0 0 0"),
    series("up", dict(up, instance="lw2:9477"), "1 0 0 1 1 1 0 1 1 1 1"),
    series("up", {"job": "tunnel", "instance": "tunnel-0:8080"}, "0x10"),
], [("6m", []), ("7m", [(up, None)]), ("10m", [(up, None)])]))
# No leakwatch scraped at all: fires on absent() with no labels.
tests.append(simple("LeakwatchDown", [
    series("up", {"job": "tunnel", "instance": "tunnel-0:8080"}, "1x10"),
], [("4m", []), ("5m", [({}, None)])]))

tests.append(simple("LeakwatchTargetNotFound", [
    series("leakwatch_up", LW, "0x10"),
    series("leakwatch_up", dict(LW, target="ok"), "1x10"),
    series("leakwatch_up", dict(LW, target="restarting"), "1 0 0 1 1 0 0 0 1 1 1"),
], [("4m", []), ("5m", [(LW, None)])]))

tests.append(simple("LeakwatchProcfsOnly", [
    series("leakwatch_ebpf_enabled", LW, "0x20"),
    series("leakwatch_up", LW, "1x20"),
    series("leakwatch_ebpf_enabled", dict(LW, target="ebpf"), "1x20"),
    series("leakwatch_up", dict(LW, target="ebpf"), "1x20"),
    # Target not found: that is LeakwatchTargetNotFound, not this.
    series("leakwatch_ebpf_enabled", dict(LW, target="gone"), "0x20"),
    series("leakwatch_up", dict(LW, target="gone"), "0x20"),
], [("14m", []), ("15m", [(LW, None)])]))

tests.append(simple("LeakwatchLosingEvents", [
    series("leakwatch_kernel_events_lost_total", LW, "0+60x20"),
    series("leakwatch_kernel_events_lost_total", dict(LW, target="ok"), "0x20"),
    # One burst of losses: the 5m rate stays above zero for 5 minutes only.
    series("leakwatch_kernel_events_lost_total", dict(LW, target="burst"), "0 0 100 100 100 100 100 100 100 100 100 100 100 100 100 100 100 100 100 100 100"),
], [("9m", []), ("12m", [(LW, 1.0)]), ("15m", [(LW, 1.0)])]))

tf = dict(LW, table="socks")
tests.append(simple("LeakwatchTableFull", [
    series("leakwatch_kernel_table_full_total", tf, "0 0 0 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5"),
    series("leakwatch_kernel_table_full_total", dict(LW, table="listeners"), "0x20"),
], [("3m", []), ("5m", [(tf, None)]), ("20m", [])]))

tests.append(simple("LeakwatchTunnelScrapeFailing", [
    series("leakwatch_app_scrape_up", LW, "0x10"),
    series("leakwatch_app_scrape_up", dict(LW, target="ok"), "1x10"),
    series("leakwatch_app_scrape_up", dict(LW, target="flaky"), "1 0 1 0 0 1 0 0 0 1 0"),
], [("4m", []), ("5m", [(LW, None)])]))

tests.append(simple("LeakwatchRemotedialerMetricsMissing", [
    series("leakwatch_app_scrape_up", LW, "1x20"),
    series("leakwatch_app_remotedialer_present", LW, "0x20"),
    series("leakwatch_app_scrape_up", dict(LW, target="ok"), "1x20"),
    series("leakwatch_app_remotedialer_present", dict(LW, target="ok"), "1x20"),
    # Scrape failing: no verdict on presence (that is LeakwatchTunnelScrapeFailing).
    series("leakwatch_app_scrape_up", dict(LW, target="down"), "0x20"),
    series("leakwatch_app_remotedialer_present", dict(LW, target="down"), "0x20"),
], [("14m", []), ("15m", [(LW, None)])]))

tests.append(simple("LeakwatchTargetRestarting", [
    series("leakwatch_target_restarts_total", LW, "0+1x30"),
    series("leakwatch_target_restarts_total", dict(LW, target="once"), "0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"),
], [("2m", []), ("10m", [(LW, 10.0)])]))

# --- the tunnel's own counters ----------------------------------------------------------------------------
c1 = dict(TUN, clientkey="c1")
c2 = dict(TUN, clientkey="c2")
ok = dict(TUN, clientkey="ok")
short = dict(TUN, clientkey="short")
conn = lambda lab, proto="tcp", addr="10.0.0.1:443": dict(lab, proto=proto, addr=addr)
tests.append({
    "interval": "1m",
    "input_series": [
        # c1: 10 added, 5 removed per minute: 300 per hour never removed.
        series("session_server_total_add_connections", conn(c1), "0+10x200"),
        series("session_server_total_remove_connections", conn(c1), "0+5x200"),
        # c2: nothing is ever removed (no remove series at all).
        series("session_server_total_add_connections", conn(c2), "0+5x200"),
        # ok: balanced, on two addresses.
        series("session_server_total_add_connections", conn(ok), "0+10x200"),
        series("session_server_total_add_connections", conn(ok, addr="10.0.0.2:443"), "0+10x200"),
        series("session_server_total_remove_connections", conn(ok), "0+10x200"),
        series("session_server_total_remove_connections", conn(ok, addr="10.0.0.2:443"), "0+10x200"),
        # short: a pile-up of 100 connections over 20 minutes, then balanced: never more than 100 per hour.
        series("session_server_total_add_connections", conn(short), "0+10x19 200+5x180"),
        series("session_server_total_remove_connections", conn(short), "0+5x200"),
    ],
    "alert_rule_test": [
        case("RemotedialerConnectionsNotRemoved", "60m", []),
        case("RemotedialerConnectionsNotRemoved", "120m", [
            expect("RemotedialerConnectionsNotRemoved", c1, 300.0),
            expect("RemotedialerConnectionsNotRemoved", c2, 300.0),
        ]),
    ],
})

tests.append(simple("TunnelFdUsageHigh", [
    series("process_open_fds", TUN, "900x20"),
    series("process_max_fds", TUN, "1000x20"),
    series("session_server_total_add_connections", conn(c1), "0+1x20"),
    # A process that is not a tunnel (no session_server_* series): not this alert's business.
    series("process_open_fds", {"job": "node", "instance": "n:9100"}, "900x20"),
    series("process_max_fds", {"job": "node", "instance": "n:9100"}, "1000x20"),
], [("14m", []), ("15m", [(TUN, 0.9)])]))

# --- recording rules --------------------------------------------------------------------------------------
tests.append({
    "interval": "1m",
    "input_series": [
        series("session_server_total_add_connections", conn(c1), "10+10x10"),
        series("session_server_total_add_connections", conn(c1, addr="10.0.0.2:443"), "5x10"),
        series("session_server_total_remove_connections", conn(c1), "0+8x10"),
        series("session_server_total_add_connections", conn(c2), "7x10"),
        series("session_server_total_add_websocket_session", dict(TUN, clientkey="c1", peer="false"), "3x10"),
        series("session_server_total_remove_websocket_session", dict(TUN, clientkey="c1", peer="false"), "1x10"),
        series("leakwatch_app_live_connections", dict(LW, clientkey="c1"), "4x10"),
        series("leakwatch_app_live_connections", dict(LW, clientkey="_other"), "2x10"),
        series("leakwatch_procfs_open_fds", LW, "250x10"),
        series("leakwatch_procfs_max_fds", LW, "1000x10"),
        series("leakwatch_verdict_active", dict(LW, kind="socket_leak", severity="warning"), "1x10"),
        series("leakwatch_verdict_active", dict(LW, kind="task_growth", severity="warning"), "1x10"),
        series("leakwatch_verdict_active", dict(LW, kind="heap_growth", severity="warning"), "0x10"),
    ],
    "promql_expr_test": [
        {"expr": "clientkey:session_server_live_connections:sum", "eval_time": "10m", "exp_samples": [
            # c1: (110 + 5) - 80; c2: 7 - 0 (no remove series yet).
            {"labels": "clientkey:session_server_live_connections:sum" + fmt_labels(c1), "value": 35},
            {"labels": "clientkey:session_server_live_connections:sum" + fmt_labels(c2), "value": 7},
        ]},
        {"expr": "clientkey:session_server_add_connections:rate5m", "eval_time": "10m", "exp_samples": [
            {"labels": "clientkey:session_server_add_connections:rate5m" + fmt_labels(c1), "value": 0.16666666666666669},  # 10 per minute, as Prometheus computes it
            {"labels": "clientkey:session_server_add_connections:rate5m" + fmt_labels(c2), "value": 0},
        ]},
        {"expr": "clientkey:session_server_websocket_sessions:sum", "eval_time": "10m", "exp_samples": [
            {"labels": "clientkey:session_server_websocket_sessions:sum" + fmt_labels(dict(TUN, clientkey="c1")), "value": 2},
        ]},
        {"expr": "target:leakwatch_app_live_connections:sum", "eval_time": "10m", "exp_samples": [
            {"labels": "target:leakwatch_app_live_connections:sum" + fmt_labels(LW), "value": 6},
        ]},
        {"expr": "target:leakwatch_fd_usage:ratio", "eval_time": "10m", "exp_samples": [
            {"labels": "target:leakwatch_fd_usage:ratio" + fmt_labels(LW), "value": 0.25},
        ]},
        {"expr": "target:leakwatch_verdicts_active:sum", "eval_time": "10m", "exp_samples": [
            {"labels": "target:leakwatch_verdicts_active:sum" + fmt_labels(LW), "value": 2},
        ]},
    ],
})

doc = {"rule_files": ["leakwatch-rules.yml"], "evaluation_interval": "30s", "tests": tests}
with open(OUT, "w") as f:
    f.write("# promtool test rules leakwatch-rules.test.yml (run by monitor/tests/dashboards.rs).\n")
    f.write("# Every alert has cases that must fire and cases that must not (healthy, flapping, blips shorter\n")
    f.write("# than `for:`); expected annotations are the rendered templates. Generated by gen-tests.py: edit that.\n")
    yaml.safe_dump(doc, f, sort_keys=False, width=110, allow_unicode=True)
