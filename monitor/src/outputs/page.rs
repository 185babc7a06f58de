//! The pictures as HTML: the live page of `watch` (`/`) and the report file of `verify` and `replay`. One
//! self-contained document each: inline CSS and server-rendered SVG, no script and nothing fetched, so it
//! opens from a mail attachment or an air-gapped node and reads the same with JavaScript off. Every chart
//! has a table of its lines under it (source, points, last, min, max): the text a screen reader, a test
//! or a terminal browser gets.
use std::fmt::Write as _;

use super::{
    charts::{
        self, Bar, ChartSpec, Frame, Marker, Rendered, Span, Threshold, Unit, format_time, hex,
    },
    history::History,
    http::StatusDoc,
};
use crate::{
    analysis::Side,
    verdict::{Raised, Verdict},
};

/// Escapes text for HTML content and attribute values: target names, subjects, peers and explanations
/// come from outside (process names, the target's metric labels).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// What the kernel line of the cross-check is called on this side of the tunnel.
pub fn callers_label(side: Side) -> &'static str {
    match side {
        Side::Server => "callers (accepted sockets)",
        Side::Agent => "targets (connected sockets)",
        Side::Auto => "callers or targets (accepted / connected sockets)",
    }
}

const CSS: &str = "
body{font-family:sans-serif;margin:16px 24px;color:#222;max-width:1340px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:22px 0 6px}
.meta{color:#555;margin:0 0 8px}
.ok{color:#176317;font-weight:bold}.bad{color:#b00;font-weight:bold}.na{color:#777}
table{border-collapse:collapse;font-size:13px}
td,th{padding:3px 8px;border-bottom:1px solid #e4e4e4;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:14px 0 18px}
figcaption{font-weight:bold;margin:0 0 2px}
svg{display:block;max-width:100%;height:auto}
.sw{display:inline-block;width:12px;height:12px;margin-right:6px;vertical-align:middle;border-radius:2px}
.verdict{border-left:4px solid #b00;padding:4px 10px;margin:8px 0;background:#fff6f6}
.verdict.warning{border-color:#e08a00;background:#fffaf0}
.evidence td{font-family:monospace;font-size:12px;border:0;padding:1px 8px}
.note{color:#8a5a00}
.key span{margin-right:14px}
";

fn head(out: &mut String, title: &str, refresh: Option<u32>) {
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">"
    );
    if let Some(r) = refresh {
        let _ = write!(out, "<meta http-equiv=\"refresh\" content=\"{r}\">");
    }
    // An empty icon: otherwise the browser asks for /favicon.ico, and a report opened from disk has none.
    let _ = writeln!(
        out,
        "<link rel=\"icon\" href=\"data:,\"><title>{}</title><style>{CSS}</style></head>",
        esc(title)
    );
}

fn num(v: Option<f64>, unit: Unit) -> String {
    v.map(|v| unit.format(v)).unwrap_or_else(|| "-".into())
}

fn chart_figure(
    out: &mut String,
    spec: &ChartSpec,
    rendered: Result<Rendered, charts::ChartError>,
) {
    let _ = write!(
        out,
        "<figure class=\"chart\" id=\"chart-{key}\" data-chart=\"{key}\"><figcaption>{}</figcaption>",
        esc(spec.title),
        key = spec.key
    );
    match rendered {
        Ok(r) => {
            out.push_str(&r.svg);
            out.push_str(
                "<table class=\"legend\"><tr><th>line</th><th>source</th><th>last</th><th>min</th>\
                 <th>max</th><th>points</th></tr>",
            );
            for row in &r.legend {
                let sources: Vec<&str> = row.sources.iter().map(|s| s.label()).collect();
                let keys: Vec<&str> = row.sources.iter().map(|s| s.key()).collect();
                let _ = write!(
                    out,
                    "<tr class=\"line\" data-series=\"{}\" data-source=\"{}\" data-points=\"{}\"",
                    esc(&row.series),
                    keys.join(" "),
                    row.points
                );
                if let Some(last) = row.last {
                    let _ = write!(out, " data-last=\"{last}\"");
                }
                let _ = write!(
                    out,
                    "><td><span class=\"sw\" style=\"background:{}\"></span>{}{}</td><td>{}</td>\
                     <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                    hex(row.color),
                    esc(&row.label),
                    if row.off_scale {
                        " (off scale, not drawn)"
                    } else {
                        ""
                    },
                    if sources.is_empty() {
                        "no data".to_string()
                    } else {
                        sources.join(", ")
                    },
                    num(row.last, spec.unit),
                    num(row.min, spec.unit),
                    num(row.max, spec.unit),
                    row.points
                );
            }
            out.push_str("</table>");
        }
        Err(e) => chart_unavailable(out, &e.to_string()),
    }
    out.push_str("</figure>\n");
}

/// What stands in for a chart that could not be drawn: the page still shows everything else.
fn chart_unavailable(out: &mut String, why: &str) {
    let _ = write!(out, "<p class=\"bad\">chart unavailable: {}</p>", esc(why));
}

fn key_of_shading(out: &mut String, spans: &[Span]) {
    let mut seen: Vec<(&str, String)> = Vec::new();
    for s in spans {
        if !seen.iter().any(|(l, _)| *l == s.label) {
            seen.push((&s.label, hex(s.color)));
        }
    }
    out.push_str("<p class=\"key\">");
    for (label, color) in seen {
        let _ = write!(
            out,
            "<span><span class=\"sw\" style=\"background:{color};opacity:.35\"></span>{}</span>",
            esc(label)
        );
    }
    let _ = write!(
        out,
        "<span><span class=\"sw\" style=\"background:{}\"></span>verdict raised</span>\
         <span><span class=\"sw\" style=\"background:{}\"></span>verdict cleared</span>\
         <span><span class=\"sw\" style=\"background:{}\"></span>target restart</span></p>",
        hex(charts::RED),
        hex(charts::GREEN),
        hex(charts::GREY)
    );
}

/// The timeline and every chart of the history over the frame.
fn charts_section(out: &mut String, history: &History, frame: &Frame, side: Side, extra: &[Bar]) {
    let mut bars: Vec<Bar> = frame
        .spans
        .iter()
        .map(|s| Bar {
            row: "load phases".into(),
            from: s.from,
            to: s.to,
            label: s.label.clone(),
            color: s.color,
        })
        .collect();
    bars.extend(charts::verdict_bars(history, frame));
    bars.extend(extra.iter().cloned());
    key_of_shading(out, &frame.spans);
    out.push_str("<figure class=\"chart\" id=\"chart-timeline\" data-chart=\"timeline\"><figcaption>Time axis: load phases, verdicts, restarts and checks</figcaption>");
    if bars.is_empty() {
        out.push_str("<p class=\"na\">no load phase, verdict or restart in this window</p>");
    } else {
        match charts::timeline(&bars, frame) {
            Ok(svg) => out.push_str(&svg),
            Err(e) => chart_unavailable(out, &e.to_string()),
        }
    }
    out.push_str("</figure>\n");
    for spec in charts::standard_charts(history) {
        let r = charts::render(&spec, history, frame, callers_label(side));
        chart_figure(out, &spec, r);
    }
}

fn verdict_block(out: &mut String, v: &Verdict, raised_t: Option<f64>, origin: f64) {
    let _ = write!(
        out,
        "<div class=\"verdict {sev}\" data-verdict=\"{kind}\"><b>{kind}</b> [{sev}] {subject} \
         <span class=\"meta\">since {since}{raised}</span><br>{expl}<table class=\"evidence\">",
        kind = v.kind.as_str(),
        sev = v.severity.as_str(),
        subject = esc(&v.subject),
        since = format_time(v.since - origin),
        raised = raised_t
            .map(|t| format!(", raised at {}", format_time(t - origin)))
            .unwrap_or_default(),
        expl = esc(&v.explanation)
    );
    for (k, val) in &v.evidence {
        let _ = write!(out, "<tr><td>{}</td><td>{val}</td></tr>", esc(k));
    }
    out.push_str("</table></div>\n");
}

/// The live page: the charts over the last `window_s` seconds of the history, the active verdicts, and
/// what /status says about the target. Reloads itself every `refresh_s` seconds.
pub fn live_page(
    status: &StatusDoc,
    history: &History,
    window_s: f64,
    refresh_s: u32,
    side: Side,
) -> String {
    let mut out = String::with_capacity(256 * 1024);
    head(
        &mut out,
        &format!("leakwatch: {}", status.target),
        Some(refresh_s),
    );
    let last_t = history.last().map(|t| t.t).unwrap_or(0.0);
    let from = history
        .ticks()
        .map(|t| t.t)
        .find(|t| *t >= last_t - window_s)
        .unwrap_or(last_t);
    let _ = write!(
        out,
        "<body data-page=\"live\" data-t=\"{last_t}\" data-mode=\"{}\" data-ticks=\"{}\">\
         <h1>leakwatch: {}</h1>",
        esc(&status.mode),
        history.ticks().len(),
        esc(&status.target)
    );
    let pid = status
        .snapshot
        .as_ref()
        .and_then(|s| s.target.as_ref())
        .map(|t| t.pid.to_string())
        .unwrap_or_else(|| "not running".into());
    let _ = write!(
        out,
        "<p class=\"meta\">mode <b>{}</b> · pid {pid} · load phase <b>{}</b> · restarts {} · \
         charts over the last {} (of up to {:.0} min held) · refreshes every {refresh_s}s · \
         <a href=\"/status\">/status</a> · <a href=\"/metrics\">/metrics</a></p>",
        esc(&status.mode),
        esc(&status.load_phase),
        status.restarts,
        format_time(last_t - from),
        window_s / 60.0
    );
    for n in &status.notes {
        let _ = write!(out, "<p class=\"note\">{}</p>", esc(n));
    }
    let _ = write!(
        out,
        "<h2>Active verdicts ({})</h2><section id=\"verdicts\">",
        status.verdicts.len()
    );
    if status.verdicts.is_empty() {
        out.push_str("<p class=\"ok\">none: no leak seen</p>");
    }
    for v in &status.verdicts {
        verdict_block(&mut out, v, None, last_t);
    }
    out.push_str("</section><h2>Charts</h2>");
    let frame = Frame {
        from,
        to: last_t,
        origin: last_t,
        spans: charts::phase_spans(history, from),
        markers: charts::event_markers(history.events(), from),
        thresholds: Vec::new(),
    };
    charts_section(&mut out, history, &frame, side, &[]);
    if !status.oldest_sockets.is_empty() {
        out.push_str("<h2>Longest-held sockets</h2><table><tr><th>state</th><th>origin</th><th>local</th><th>remote</th><th>age</th></tr>");
        for s in &status.oldest_sockets {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{:.0}s</td></tr>",
                esc(&s.state),
                esc(&s.origin),
                esc(&s.local),
                esc(&s.remote),
                s.age_s
            );
        }
        out.push_str("</table>");
    }
    out.push_str("</body></html>\n");
    out
}

/// One pass/fail line of a report (verify's criteria).
#[derive(Clone, Debug)]
pub struct CriterionRow {
    pub name: String,
    pub pass: Option<bool>,
    pub baseline: Option<f64>,
    pub after: Option<f64>,
    pub detail: String,
    /// The chart that shows the quantity, and the level it had to come back under.
    pub chart: Option<&'static str>,
    pub threshold: Option<f64>,
}

/// Everything a report shows besides the history itself.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub title: String,
    pub target: String,
    pub mode: String,
    pub side: Option<Side>,
    /// `None` for a report that judges nothing (replay).
    pub passed: Option<bool>,
    pub summary: Vec<String>,
    pub criteria: Vec<CriterionRow>,
    /// When the criteria were judged.
    pub checked_at: Option<f64>,
    /// Explicit phases (verify's baseline, load and settle window); empty: the quiescence phases.
    pub spans: Vec<Span>,
    pub raised: Vec<Raised>,
    pub active_at_end: Vec<Verdict>,
}

pub fn report_page(report: &Report, history: &History) -> String {
    let mut out = String::with_capacity(512 * 1024);
    head(&mut out, &report.title, None);
    let first = history.ticks().next().map(|t| t.t).unwrap_or(0.0);
    let last = history.last().map(|t| t.t).unwrap_or(first);
    let (verdict_class, verdict_text) = match report.passed {
        Some(true) => ("ok", "PASS"),
        Some(false) => ("bad", "FAIL"),
        None => ("na", ""),
    };
    let _ = write!(
        out,
        "<body data-page=\"report\" data-passed=\"{}\" data-ticks=\"{}\"><h1>{} <span class=\"{verdict_class}\">{verdict_text}</span></h1>",
        report.passed.map(|p| p.to_string()).unwrap_or_default(),
        history.ticks().len(),
        esc(&report.title)
    );
    let started = history.ticks().next().map(|t| t.unix).unwrap_or(0.0);
    let _ = write!(
        out,
        "<p class=\"meta\">target <b>{}</b> · mode <b>{}</b> · {} ticks over {} · started at Unix time {started:.0}</p>",
        esc(&report.target),
        esc(&report.mode),
        history.ticks().len(),
        format_time(last - first)
    );
    for line in &report.summary {
        let _ = write!(out, "<p>{}</p>", esc(line));
    }
    let mut extra = Vec::new();
    if !report.criteria.is_empty() {
        out.push_str(
            "<h2>Criteria</h2><table id=\"criteria\"><tr><th>result</th><th>criterion</th>\
             <th>baseline</th><th>after</th><th>detail</th></tr>",
        );
        for c in &report.criteria {
            let (class, word) = match c.pass {
                Some(true) => ("ok", "pass"),
                Some(false) => ("bad", "FAIL"),
                None => ("na", "n/a"),
            };
            let unit = if c.chart == Some("heap") {
                Unit::Bytes
            } else {
                Unit::Count
            };
            let _ = write!(
                out,
                "<tr class=\"criterion\" data-pass=\"{}\"><td class=\"{class}\">{word}</td><td>{}</td>\
                 <td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
                c.pass
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "n/a".into()),
                esc(&c.name),
                num(c.baseline, unit),
                num(c.after, unit),
                esc(&c.detail)
            );
        }
        out.push_str("</table>");
        if let Some(at) = report.checked_at {
            let failed = report
                .criteria
                .iter()
                .filter(|c| c.pass == Some(false))
                .count();
            extra.push(Bar {
                row: "criteria".into(),
                from: at,
                to: at,
                label: if failed == 0 {
                    "criteria checked: all pass".into()
                } else {
                    format!("criteria checked: {failed} FAIL")
                },
                color: if failed == 0 {
                    charts::GREEN
                } else {
                    charts::RED
                },
            });
        }
    }
    let _ = write!(
        out,
        "<h2>Verdicts raised during the run ({})</h2><section id=\"verdicts\">",
        report.raised.len()
    );
    if report.raised.is_empty() {
        out.push_str("<p class=\"ok\">none</p>");
    }
    for r in &report.raised {
        verdict_block(&mut out, &r.verdict, Some(r.raised_t), first);
    }
    let _ = write!(
        out,
        "<p class=\"meta\">still active at the end: {}</p></section><h2>Charts</h2>",
        report.active_at_end.len()
    );
    let spans = if report.spans.is_empty() {
        charts::phase_spans(history, first)
    } else {
        report.spans.clone()
    };
    let mut markers = charts::event_markers(history.events(), first);
    if let Some(at) = report.checked_at {
        markers.push(Marker {
            t: at,
            label: "criteria checked".into(),
            color: charts::PURPLE,
        });
    }
    let thresholds = report
        .criteria
        .iter()
        .filter_map(|c| {
            Some(Threshold {
                chart: c.chart?,
                value: c.threshold?,
                label: format!("{}: must come back under this", c.name),
            })
        })
        .collect();
    let frame = Frame {
        from: first,
        to: last,
        origin: first,
        spans,
        markers,
        thresholds,
    };
    charts_section(
        &mut out,
        history,
        &frame,
        report.side.unwrap_or_default(),
        &extra,
    );
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The budget the issue sets: 30 min of ticks in fixed memory, and a page that stays small whatever
    /// the length of the run (a day-long replay draws reduced lines).
    #[test]
    fn history_and_pages_stay_small() {
        use crate::{
            analysis::Derived,
            sample::{AppSample, KernelSample, LedgerRow, ProcSample, ScrapeOutcome, Snapshot},
        };
        assert!(
            std::mem::size_of::<super::super::history::Tick>() <= 160,
            "{} bytes a tick",
            std::mem::size_of::<super::super::history::Tick>()
        );
        let fill = |h: &mut History, n: usize| {
            for i in 0..n {
                let snap = Snapshot {
                    t: i as f64,
                    unix: i as f64,
                    target: None,
                    kernel: Some(KernelSample {
                        accepted_live: (i % 7) as u64,
                        ..KernelSample::default()
                    }),
                    proc: Some(ProcSample {
                        open_fds: 20 + (i % 13) as u64,
                        fd_limit: Some(1024),
                        threads: 8,
                        rss_bytes: 20 << 20,
                        ..ProcSample::default()
                    }),
                    goroutines: None,
                    app: ScrapeOutcome::Ok(AppSample {
                        remotedialer_present: true,
                        ledger: vec![LedgerRow {
                            added: i as f64,
                            removed: (i - i % 5) as f64,
                            ..LedgerRow::default()
                        }],
                        goroutines: Some(10.0 + (i % 3) as f64),
                        heap_inuse_bytes: Some(4e6 + (i % 11) as f64 * 1e5),
                        ..AppSample::default()
                    }),
                };
                h.record(&snap, &Derived::default(), "idle", Side::Server, &[]);
            }
        };
        let mut live = History::default();
        fill(&mut live, 2000);
        assert_eq!(live.ticks().len(), 1800);
        let page = live_page(&StatusDoc::default(), &live, 1800.0, 5, Side::Server);
        assert!(
            page.len() < 1_500_000,
            "live page of 30 min: {} bytes",
            page.len()
        );
        assert!(page.contains("data-series=\"app_live\" data-source=\"app\" data-points=\"1800\""));

        let mut day = History::with_capacity(86_400);
        fill(&mut day, 86_400);
        let report = report_page(&Report::default(), &day);
        eprintln!(
            "live page of 30 min: {} bytes; report of a day: {} bytes",
            page.len(),
            report.len()
        );
        assert!(
            report.len() < 2_500_000,
            "report of a day: {} bytes",
            report.len()
        );
        assert!(
            report.contains("data-points=\"86400\""),
            "the legend counts every tick held"
        );
    }

    #[test]
    fn escapes_outside_text() {
        assert_eq!(
            esc("<script>\"a\"&'b'</script>"),
            "&lt;script&gt;&quot;a&quot;&amp;&#39;b&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn pages_are_self_contained_and_name_their_sources() {
        let h = History::with_capacity(10);
        let status = StatusDoc {
            target: "<evil>".into(),
            mode: "procfs-only".into(),
            ..StatusDoc::default()
        };
        let page = live_page(&status, &h, 600.0, 5, Side::Server);
        assert!(page.contains("http-equiv=\"refresh\""));
        assert!(!page.contains("<evil>"));
        assert!(!page.contains("<script"));
        assert!(!page.contains("src=\"http"));
        let report = report_page(
            &Report {
                title: "verify".into(),
                passed: Some(false),
                criteria: vec![CriterionRow {
                    name: "tasks back to baseline".into(),
                    pass: Some(false),
                    baseline: Some(1.0),
                    after: Some(9.0),
                    detail: String::new(),
                    chart: Some("tasks"),
                    threshold: Some(6.0),
                }],
                checked_at: Some(0.0),
                ..Report::default()
            },
            &h,
        );
        assert!(report.contains("data-pass=\"false\""));
        assert!(!report.contains("http-equiv=\"refresh\""));
    }
}
