//! Time-series charts of the [`History`] as SVG, drawn by `plotters` (its SVG backend only: no fonts, no
//! system libraries). Each chart is drawn twice with the same geometry: once for the frame (axes, grid,
//! shaded phases, markers) and once for the data lines alone, whose `<polyline>`s are then tagged with
//! `data-series` and spliced into the frame. That keeps the data addressable from the DOM (tests and
//! curious readers compare it with `/status`) without relying on the order in which plotters draws axes.
use std::fmt::Write as _;

use plotters::{
    coord::Shift,
    prelude::{
        ChartBuilder, Circle, DrawingArea, IntoDrawingArea, LineSeries, RGBColor, Rectangle,
        SVGBackend, ShapeStyle, Text,
    },
    style::{
        Color, IntoFont, TextStyle, WHITE,
        text_anchor::{HPos, Pos, VPos},
    },
};
use thiserror::Error;

use super::history::{Event, EventKind, History, Phase, Quantity, Source, Tick};

const WIDTH: u32 = 1300;
const HEIGHT: u32 = 230;
const LEFT: u32 = 72;
const BOTTOM: u32 = 28;
const MARGIN: u32 = 10;
/// Points drawn per line at most: longer lines are reduced to each stretch's min and max, which keeps
/// spikes visible and a day-long replay's report small.
const MAX_DRAWN: usize = 1200;

#[derive(Debug, Error)]
#[error("drawing the chart: {0}")]
pub struct ChartError(String);

fn err<E: std::fmt::Debug>(e: E) -> ChartError {
    ChartError(format!("{e:?}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Count,
    Bytes,
}

impl Unit {
    pub fn format(self, v: f64) -> String {
        // -0.0 (a rounding of a tiny negative) reads as a sign error.
        let v = v + 0.0;
        match self {
            Unit::Count if v.abs() >= 1e6 => format!("{:.1}M", v / 1e6),
            Unit::Count if v.abs() >= 1e4 => format!("{:.1}k", v / 1e3),
            Unit::Count if v.fract() == 0.0 => format!("{v:.0}"),
            Unit::Count => format!("{v:.1}"),
            Unit::Bytes => format!("{:.1} MiB", v / 1048576.0),
        }
    }
}

/// What a line plots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineOf {
    Quantity(Quantity),
    /// A goroutine blocked-age bucket, by index into [`History::age_buckets`].
    Age(usize),
}

#[derive(Clone, Debug)]
pub struct LineSpec {
    pub of: LineOf,
    pub color: RGBColor,
    /// May sit far above the rest (an fd limit of a million over 30 fds): then it is left off the scale
    /// and the legend says so, rather than flattening every other line.
    pub may_be_off_scale: bool,
}

#[derive(Clone, Debug)]
pub struct ChartSpec {
    pub key: &'static str,
    pub title: &'static str,
    pub unit: Unit,
    pub lines: Vec<LineSpec>,
}

/// A shaded stretch of the time axis (a load phase, verify's settle window).
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub from: f64,
    pub to: f64,
    pub label: String,
    pub color: RGBColor,
}

/// A horizontal line: a criterion's threshold (baseline + tolerance).
#[derive(Clone, Debug, PartialEq)]
pub struct Threshold {
    pub chart: &'static str,
    pub value: f64,
    pub label: String,
}

/// A point of the time axis worth a vertical line (a verdict raised or cleared, a restart, a check).
#[derive(Clone, Debug, PartialEq)]
pub struct Marker {
    pub t: f64,
    pub label: String,
    pub color: RGBColor,
}

/// What every chart of one page shares: the time range, shading and markers.
#[derive(Clone, Debug)]
pub struct Frame {
    pub from: f64,
    pub to: f64,
    /// Time labels read `t - origin` (negative on the live page: minutes ago).
    pub origin: f64,
    pub spans: Vec<Span>,
    pub markers: Vec<Marker>,
    pub thresholds: Vec<Threshold>,
}

/// One row of a chart's legend: the data behind a line, also shown as text.
#[derive(Clone, Debug)]
pub struct LegendRow {
    pub series: String,
    pub label: String,
    pub sources: Vec<Source>,
    pub color: RGBColor,
    /// Points held for this line in the frame's range (before any reduction for drawing).
    pub points: usize,
    pub last: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub off_scale: bool,
}

pub struct Rendered {
    pub svg: String,
    pub legend: Vec<LegendRow>,
}

pub const BLUE: RGBColor = RGBColor(31, 119, 180);
pub const ORANGE: RGBColor = RGBColor(255, 127, 14);
pub const GREEN: RGBColor = RGBColor(44, 160, 44);
pub const RED: RGBColor = RGBColor(214, 39, 40);
pub const PURPLE: RGBColor = RGBColor(148, 103, 189);
pub const BROWN: RGBColor = RGBColor(140, 86, 75);
pub const GREY: RGBColor = RGBColor(127, 127, 127);
pub const TEAL: RGBColor = RGBColor(23, 190, 207);
const AGE_COLORS: [RGBColor; 6] = [
    RGBColor(188, 189, 34),
    RGBColor(227, 119, 194),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
    RGBColor(127, 127, 127),
    RGBColor(148, 103, 189),
];

fn line(q: Quantity, color: RGBColor) -> LineSpec {
    LineSpec {
        of: LineOf::Quantity(q),
        color,
        may_be_off_scale: false,
    }
}

/// The charts of the issue, in page order. The tasks chart gets one line per blocked-age bucket the
/// history has seen.
pub fn standard_charts(history: &History) -> Vec<ChartSpec> {
    use Quantity as Q;
    let mut tasks = vec![line(Q::Tasks, BLUE)];
    for (i, _) in history.age_buckets().iter().enumerate() {
        tasks.push(LineSpec {
            of: LineOf::Age(i),
            color: AGE_COLORS[i % AGE_COLORS.len()],
            may_be_off_scale: false,
        });
    }
    vec![
        ChartSpec {
            key: "ledger",
            title: "Tunnel ledger: connections added, removed, and live (add - remove)",
            unit: Unit::Count,
            lines: vec![
                line(Q::Added, BLUE),
                line(Q::Removed, GREEN),
                line(Q::AppLive, RED),
            ],
        },
        ChartSpec {
            key: "crosscheck",
            title: "What the tunnel says is open versus what the kernel holds",
            unit: Unit::Count,
            lines: vec![
                line(Q::AppLive, RED),
                line(Q::KernelConn, BLUE),
                line(Q::Unbacked, PURPLE),
                line(Q::IdleBeyondHorizon, TEAL),
            ],
        },
        ChartSpec {
            key: "tasks",
            title: "Tasks",
            unit: Unit::Count,
            lines: tasks,
        },
        ChartSpec {
            key: "heap",
            title: "Memory",
            unit: Unit::Bytes,
            lines: vec![line(Q::Heap, ORANGE), line(Q::Rss, BROWN)],
        },
        ChartSpec {
            key: "fds",
            title: "Open file descriptors versus the limit",
            unit: Unit::Count,
            lines: vec![
                line(Q::Fds, BLUE),
                LineSpec {
                    of: LineOf::Quantity(Q::FdLimit),
                    color: GREY,
                    may_be_off_scale: true,
                },
            ],
        },
        ChartSpec {
            key: "close_wait",
            title: "Sockets in CLOSE_WAIT (the peer hung up, the process never closed)",
            unit: Unit::Count,
            lines: vec![line(Q::CloseWait, RED)],
        },
    ]
}

/// What a line is called, given where its latest value came from (the same line is fed by the kernel with
/// eBPF on and by procfs without).
fn line_label(of: LineOf, source: Option<Source>, history: &History, callers: &str) -> String {
    use Quantity as Q;
    match of {
        LineOf::Age(i) => format!(
            "goroutines blocked {}",
            history
                .age_buckets()
                .get(i)
                .map(String::as_str)
                .unwrap_or("?")
        ),
        LineOf::Quantity(q) => match (q, source) {
            (Q::Added, _) => "added (cumulative)".into(),
            (Q::Removed, _) => "removed (cumulative)".into(),
            (Q::AppLive, _) => "app live (add - remove)".into(),
            (Q::KernelConn, Some(Source::Procfs)) => "ESTABLISHED sockets".into(),
            (Q::KernelConn, _) => callers.into(),
            (Q::Unbacked, _) => "app-live connections with no kernel socket".into(),
            (Q::IdleBeyondHorizon, _) => "tunneled connections idle past the horizon".into(),
            (Q::Tasks, Some(Source::Procfs)) => "threads".into(),
            (Q::Tasks, _) => "goroutines".into(),
            (Q::Heap, _) => "heap in use".into(),
            (Q::Rss, _) => "resident memory (RSS)".into(),
            (Q::Fds, _) => "open fds".into(),
            (Q::FdLimit, _) => "fd limit".into(),
            (Q::CloseWait, _) => "CLOSE_WAIT sockets".into(),
        },
    }
}

fn value(tick: &Tick, of: LineOf) -> Option<(f64, Source)> {
    match of {
        LineOf::Quantity(q) => tick.get(q),
        LineOf::Age(i) => tick.age(i).map(|v| (v, Source::Pprof)),
    }
}

/// The continuous stretches of one line: it breaks where a value is missing, where its source changes,
/// and across a target restart (counters start again from zero there).
fn segments<'a>(
    ticks: impl Iterator<Item = &'a Tick>,
    of: LineOf,
) -> (Vec<Vec<(f64, f64)>>, Vec<Source>) {
    let mut segs: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut sources: Vec<Source> = Vec::new();
    let mut prev: Option<(Source, u32)> = None;
    for tick in ticks {
        match value(tick, of) {
            Some((v, s)) => {
                if prev != Some((s, tick.incarnation)) {
                    segs.push(Vec::new());
                }
                if let Some(seg) = segs.last_mut() {
                    seg.push((tick.t, v));
                }
                if !sources.contains(&s) {
                    sources.push(s);
                }
                prev = Some((s, tick.incarnation));
            }
            None => prev = None,
        }
    }
    (segs, sources)
}

/// Keeps each stretch's min and max, in time order, when a segment has more points than can be seen.
fn reduce(seg: &[(f64, f64)], budget: usize) -> Vec<(f64, f64)> {
    if seg.len() <= budget.max(4) {
        return seg.to_vec();
    }
    let stride = seg.len().div_ceil(budget.max(4) / 2);
    let mut out = Vec::with_capacity(budget + 2);
    for chunk in seg.chunks(stride) {
        let lo = chunk.iter().min_by(|a, b| a.1.total_cmp(&b.1));
        let hi = chunk.iter().max_by(|a, b| a.1.total_cmp(&b.1));
        if let (Some(&lo), Some(&hi)) = (lo, hi) {
            if lo.0 <= hi.0 {
                out.extend([lo, hi]);
            } else {
                out.extend([hi, lo]);
            }
        }
    }
    out.dedup();
    out
}

pub fn format_time(secs: f64) -> String {
    let sign = if secs < -0.5 { "-" } else { "" };
    let s = secs.abs().round() as u64;
    if s >= 3600 {
        format!("{sign}{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{sign}{}:{:02}", s / 60, s % 60)
    }
}

/// Shaded spans from the quiescence phases recorded per tick.
pub fn phase_spans(history: &History, from: f64) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    let mut open: Option<(Phase, f64, f64)> = None;
    for tick in history.ticks().filter(|t| t.t >= from) {
        match open {
            Some((p, _, ref mut end)) if p == tick.phase => *end = tick.t,
            _ => {
                if let Some((p, start, end)) = open.take() {
                    spans.extend(phase_span(p, start, end));
                }
                open = Some((tick.phase, tick.t, tick.t));
            }
        }
    }
    if let Some((p, start, end)) = open {
        spans.extend(phase_span(p, start, end));
    }
    spans
}

fn phase_span(p: Phase, from: f64, to: f64) -> Option<Span> {
    let color = match p {
        Phase::Idle => return None,
        Phase::Loaded => ORANGE,
        Phase::Settling => BLUE,
        Phase::Stuck => RED,
    };
    Some(Span {
        from,
        to,
        label: p.name().into(),
        color,
    })
}

/// Vertical markers for verdicts raised and cleared and for restarts.
pub fn event_markers<'a>(events: impl Iterator<Item = &'a Event>, from: f64) -> Vec<Marker> {
    events
        .filter(|e| e.t >= from)
        .map(|e| match &e.kind {
            EventKind::Raised { kind, .. } => Marker {
                t: e.t,
                label: format!("{} raised", kind.as_str()),
                color: RED,
            },
            EventKind::Escalated { kind, severity, .. } => Marker {
                t: e.t,
                label: format!("{} escalated to {}", kind.as_str(), severity.as_str()),
                color: RED,
            },
            EventKind::Cleared { kind, .. } => Marker {
                t: e.t,
                label: format!("{} cleared", kind.as_str()),
                color: GREEN,
            },
            EventKind::Restarted { old_pid, new_pid } => Marker {
                t: e.t,
                label: format!("restart {old_pid}->{new_pid}"),
                color: GREY,
            },
        })
        .collect()
}

pub fn hex(c: RGBColor) -> String {
    format!("#{:02x}{:02x}{:02x}", c.0, c.1, c.2)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

struct Plotted {
    legend: Vec<LegendRow>,
    /// (series, drawn points) per segment, in drawing order.
    drawn: Vec<(String, Vec<(f64, f64)>)>,
    y_max: f64,
}

fn collect(spec: &ChartSpec, history: &History, frame: &Frame, callers: &str) -> Plotted {
    let mut legend = Vec::new();
    let mut drawn = Vec::new();
    let mut per_line = Vec::new();
    for l in &spec.lines {
        let in_range = history
            .ticks()
            .filter(|t| t.t >= frame.from && t.t <= frame.to);
        let (segs, sources) = segments(in_range, l.of);
        let all = || segs.iter().flatten().map(|p| p.1);
        let series = match l.of {
            LineOf::Quantity(q) => q.key().to_string(),
            LineOf::Age(i) => format!("blocked_age_{i}"),
        };
        legend.push(LegendRow {
            label: line_label(l.of, sources.last().copied(), history, callers),
            series,
            sources,
            color: l.color,
            points: segs.iter().map(Vec::len).sum(),
            last: segs.last().and_then(|s| s.last()).map(|p| p.1),
            min: all().reduce(f64::min),
            max: all().reduce(f64::max),
            off_scale: false,
        });
        per_line.push((l.may_be_off_scale, segs));
    }
    let max_of = |rows: &mut dyn Iterator<Item = &LegendRow>| {
        rows.filter_map(|r| r.max).fold(0.0_f64, f64::max)
    };
    let on_scale_max = max_of(
        &mut legend
            .iter()
            .zip(&spec.lines)
            .filter(|(_, l)| !l.may_be_off_scale)
            .map(|(r, _)| r),
    );
    for (row, (may, segs)) in legend.iter_mut().zip(per_line) {
        row.off_scale = may && row.max.is_some_and(|m| m > 10.0 * on_scale_max.max(1.0));
        if row.off_scale {
            continue;
        }
        let budget = MAX_DRAWN / segs.len().max(1);
        for seg in segs {
            let shifted: Vec<(f64, f64)> = reduce(&seg, budget)
                .into_iter()
                .map(|(t, v)| (t - frame.origin, v))
                .collect();
            drawn.push((row.series.clone(), shifted));
        }
    }
    let y_max = max_of(&mut legend.iter().filter(|r| !r.off_scale));
    let with_thresholds = frame
        .thresholds
        .iter()
        .filter(|t| t.chart == spec.key)
        .map(|t| t.value)
        .fold(y_max, f64::max);
    let floor = match spec.unit {
        Unit::Count => 5.0,
        Unit::Bytes => 1048576.0,
    };
    Plotted {
        legend,
        drawn,
        y_max: (with_thresholds * 1.1).max(floor),
    }
}

/// Draws one chart of the history over the frame's time range.
pub fn render(
    spec: &ChartSpec,
    history: &History,
    frame: &Frame,
    callers: &str,
) -> Result<Rendered, ChartError> {
    let plotted = collect(spec, history, frame, callers);
    // The axis counts from the origin, so that plotters picks round ticks of elapsed time.
    let origin = frame.origin;
    let (x0, x1) = (frame.from - origin, frame.to.max(frame.from + 1.0) - origin);
    let y1 = plotted.y_max;
    let unit = spec.unit;

    let mut svg = String::new();
    {
        let root: Area = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(MARGIN)
            .x_label_area_size(BOTTOM)
            .y_label_area_size(LEFT)
            .build_cartesian_2d(x0..x1, 0.0..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_labels(10)
            .y_labels(5)
            .x_label_formatter(&|x| format_time(*x))
            .y_label_formatter(&|y| unit.format(*y))
            .max_light_lines(2)
            .light_line_style(RGBColor(243, 243, 243))
            .bold_line_style(RGBColor(215, 215, 215))
            .label_style(("sans-serif", 12).into_font())
            .draw()
            .map_err(err)?;
        for s in &frame.spans {
            let (a, b) = ((s.from - origin).max(x0), (s.to - origin).min(x1));
            if b <= a {
                continue;
            }
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(a, 0.0), (b, y1)],
                    s.color.mix(0.12).filled(),
                )))
                .map_err(err)?;
        }
        // One pixel wide whatever the range.
        let px = (x1 - x0) / f64::from(WIDTH - LEFT - 2 * MARGIN);
        let small = TextStyle::from(("sans-serif", 11).into_font());
        for m in frame.markers.iter() {
            let x = m.t - origin;
            if x < x0 || x > x1 {
                continue;
            }
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x - px, 0.0), (x + px, y1)],
                    m.color.mix(0.8).filled(),
                )))
                .map_err(err)?;
        }
        for t in frame.thresholds.iter().filter(|t| t.chart == spec.key) {
            let h = y1 / f64::from(HEIGHT - BOTTOM - 2 * MARGIN);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, t.value - h), (x1, t.value + h)],
                    PURPLE.mix(0.7).filled(),
                )))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    t.label.clone(),
                    (x0 + 4.0 * px, t.value + 14.0 * h),
                    small.color(&PURPLE),
                )))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }

    let mut data = String::new();
    {
        let root: Area = SVGBackend::with_string(&mut data, (WIDTH, HEIGHT)).into_drawing_area();
        let mut chart = ChartBuilder::on(&root)
            .margin(MARGIN)
            .x_label_area_size(BOTTOM)
            .y_label_area_size(LEFT)
            .build_cartesian_2d(x0..x1, 0.0..y1)
            .map_err(err)?;
        for (series, pts) in &plotted.drawn {
            let (i, color) = plotted
                .legend
                .iter()
                .enumerate()
                .find(|(_, r)| &r.series == series)
                .map(|(i, r)| (i, r.color))
                .unwrap_or((0, GREY));
            // Earlier lines are drawn wider, so a line hidden under a later one with the same values (added
            // and live while nothing is removed) still shows at its edges.
            let width = (plotted.legend.len() + 1).saturating_sub(i).clamp(2, 4) as u32;
            let style = ShapeStyle::from(color).stroke_width(width);
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), style))
                .map_err(err)?;
            if let [only] = pts.as_slice() {
                chart
                    .draw_series(std::iter::once(Circle::new(*only, 2, style.filled())))
                    .map_err(err)?;
            }
        }
        root.present().map_err(err)?;
    }
    let data = tag_polylines(&data, &plotted.drawn)?;
    let close = svg
        .rfind("</svg>")
        .ok_or_else(|| ChartError("plotters wrote no closing </svg>".into()))?;
    svg.insert_str(close, &data);
    let open_end = svg
        .find('>')
        .ok_or_else(|| ChartError("plotters wrote no <svg> tag".into()))?;
    svg.insert_str(
        open_end,
        &format!(
            " role=\"img\" aria-label=\"{}\" data-chart=\"{}\"",
            super::page::esc(spec.title),
            spec.key
        ),
    );
    Ok(Rendered {
        svg,
        legend: plotted.legend,
    })
}

/// A bar of the timeline: a verdict from raised to cleared, a phase, a check.
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    pub row: String,
    pub from: f64,
    pub to: f64,
    pub label: String,
    pub color: RGBColor,
}

/// Verdicts (raised to cleared, or to now while active) from the history's events, plus restarts.
pub fn verdict_bars(history: &History, frame: &Frame) -> Vec<Bar> {
    let mut bars: Vec<Bar> = Vec::new();
    let mut open: Vec<(String, f64, crate::verdict::Severity)> = Vec::new();
    let row = |kind: crate::verdict::VerdictKind, subject: &str| {
        if subject.is_empty() {
            kind.as_str().to_string()
        } else {
            format!("{} {subject}", kind.as_str())
        }
    };
    let close = |name: String, from: f64, to: f64, sev: crate::verdict::Severity| Bar {
        label: format!("{name} ({})", sev.as_str()),
        row: name,
        from,
        to,
        color: match sev {
            crate::verdict::Severity::Critical => RED,
            crate::verdict::Severity::Warning => ORANGE,
        },
    };
    for e in history.events() {
        match &e.kind {
            EventKind::Raised {
                kind,
                severity,
                subject,
            } => open.push((row(*kind, subject), e.t, *severity)),
            // One episode, drawn in its new colour from here on.
            EventKind::Escalated {
                kind,
                severity,
                subject,
            } => {
                let name = row(*kind, subject);
                if let Some(i) = open.iter().position(|(n, ..)| *n == name) {
                    let (name, from, sev) = open.remove(i);
                    bars.push(close(name.clone(), from, e.t, sev));
                    open.push((name, e.t, *severity));
                }
            }
            EventKind::Cleared { kind, subject } => {
                let name = row(*kind, subject);
                if let Some(i) = open.iter().position(|(n, ..)| *n == name) {
                    let (name, from, sev) = open.remove(i);
                    bars.push(close(name, from, e.t, sev));
                }
            }
            EventKind::Restarted { old_pid, new_pid } => bars.push(Bar {
                row: "target restarts".into(),
                from: e.t,
                to: e.t,
                label: format!("restart: pid {old_pid} -> {new_pid}"),
                color: GREY,
            }),
        }
    }
    for (name, from, sev) in open {
        bars.push(close(name, from, frame.to, sev));
    }
    bars.retain(|b| b.to >= frame.from);
    bars
}

/// The time axis itself as a chart: one row per verdict, phase or check, bars where they held.
pub fn timeline(bars: &[Bar], frame: &Frame) -> Result<String, ChartError> {
    let mut rows: Vec<&str> = Vec::new();
    for b in bars {
        if !rows.contains(&b.row.as_str()) {
            rows.push(&b.row);
        }
    }
    let n = rows.len().max(1);
    let height = 2 * MARGIN + BOTTOM + 24 * n as u32;
    let origin = frame.origin;
    let (x0, x1) = (frame.from - origin, frame.to.max(frame.from + 1.0) - origin);
    let mut svg = String::new();
    {
        let root: Area = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(MARGIN)
            .x_label_area_size(BOTTOM)
            .y_label_area_size(LEFT)
            .build_cartesian_2d(x0..x1, 0.0..n as f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_labels(10)
            .disable_y_mesh()
            .y_labels(0)
            .x_label_formatter(&|x| format_time(*x))
            .max_light_lines(2)
            .light_line_style(RGBColor(243, 243, 243))
            .bold_line_style(RGBColor(215, 215, 215))
            .label_style(("sans-serif", 12).into_font())
            .draw()
            .map_err(err)?;
        let px = (x1 - x0) / f64::from(WIDTH - LEFT - 2 * MARGIN);
        let text = TextStyle::from(("sans-serif", 12).into_font());
        for b in bars {
            let i = rows.iter().position(|r| *r == b.row).unwrap_or(0);
            let y = (n - 1 - i) as f64;
            let (a, z) = ((b.from - origin).max(x0), (b.to - origin).min(x1));
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(a - px, y + 0.15), (z + px, y + 0.85)],
                    b.color.mix(0.35).filled(),
                )))
                .map_err(err)?;
            // Labels of bars that begin in the right half end at the right edge, so they stay on the page.
            let (at, style) = if a > x0 + 0.5 * (x1 - x0) {
                (x1 - 3.0 * px, text.pos(Pos::new(HPos::Right, VPos::Top)))
            } else {
                (a + 3.0 * px, text.clone())
            };
            chart
                .draw_series(std::iter::once(Text::new(
                    b.label.clone(),
                    (at, y + 0.75),
                    style.color(&RGBColor(30, 30, 30)),
                )))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Takes the data pass's elements (everything inside its `<svg>`) and marks each polyline with the line
/// it belongs to. The data pass draws nothing but one polyline per segment, in order, plus a dot for
/// single-point segments; a count that does not match means plotters changed how it draws, which must be
/// noticed rather than mislabel a line.
fn tag_polylines(data: &str, drawn: &[(String, Vec<(f64, f64)>)]) -> Result<String, ChartError> {
    let inner_start = data.find('>').map(|i| i + 1).unwrap_or(0);
    let inner_end = data.rfind("</svg>").unwrap_or(data.len());
    let inner = data.get(inner_start..inner_end).unwrap_or("");
    let pieces: Vec<&str> = inner.split("<polyline ").collect();
    if pieces.len() != drawn.len() + 1 {
        return Err(ChartError(format!(
            "expected {} data polylines, plotters drew {}",
            drawn.len(),
            pieces.len() - 1
        )));
    }
    let mut out = String::with_capacity(inner.len() + drawn.len() * 48);
    out.push_str(pieces[0]);
    for (piece, (series, pts)) in pieces[1..].iter().zip(drawn) {
        let _ = write!(
            out,
            "<polyline class=\"series\" data-series=\"{series}\" data-drawn-points=\"{}\" ",
            pts.len()
        );
        out.push_str(piece);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        analysis::{Derived, Side},
        outputs::history::History,
        sample::{AppSample, LedgerRow, ProcSample, ScrapeOutcome, Snapshot},
    };

    fn history(n: usize) -> History {
        let mut h = History::with_capacity(100);
        for i in 0..n {
            let snap = Snapshot {
                t: i as f64,
                unix: i as f64,
                target: None,
                kernel: None,
                proc: Some(ProcSample {
                    open_fds: 10 + i as u64,
                    fd_limit: Some(1 << 20),
                    threads: 4,
                    ..ProcSample::default()
                }),
                // A scrape gap in the middle breaks the ledger lines.
                goroutines: None,
                app: if i == 5 {
                    ScrapeOutcome::Failed {
                        class: crate::sample::ScrapeErrorClass::Timeout,
                        reason: "timeout".into(),
                    }
                } else {
                    ScrapeOutcome::Ok(AppSample {
                        remotedialer_present: true,
                        ledger: vec![LedgerRow {
                            added: 2.0 * i as f64,
                            removed: i as f64,
                            ..LedgerRow::default()
                        }],
                        ..AppSample::default()
                    })
                },
            };
            h.record(&snap, &Derived::default(), "idle", Side::Server, &[]);
        }
        h
    }

    #[test]
    fn charts_tag_every_line_and_break_at_gaps() {
        let h = history(10);
        let frame = Frame {
            from: 0.0,
            to: 9.0,
            origin: 0.0,
            spans: vec![Span {
                from: 2.0,
                to: 4.0,
                label: "load".into(),
                color: ORANGE,
            }],
            markers: vec![Marker {
                t: 3.0,
                label: "x".into(),
                color: RED,
            }],
            thresholds: vec![],
        };
        let charts = standard_charts(&h);
        let ledger = render(&charts[0], &h, &frame, "callers").unwrap();
        assert_eq!(ledger.svg.matches("data-series=\"app_live\"").count(), 2);
        let live = ledger
            .legend
            .iter()
            .find(|r| r.series == "app_live")
            .unwrap();
        assert_eq!((live.points, live.last), (9, Some(9.0)));
        assert_eq!(live.sources, vec![Source::App]);
        assert!(ledger.svg.starts_with("<svg"));
        assert!(ledger.svg.contains("data-chart=\"ledger\""));
        let fds = render(&charts[4], &h, &frame, "callers").unwrap();
        let limit = fds.legend.iter().find(|r| r.series == "fd_limit").unwrap();
        assert!(limit.off_scale, "a limit of 1M would flatten 20 fds");
        assert_eq!(fds.svg.matches("data-series=\"fd_limit\"").count(), 0);
        assert_eq!(fds.svg.matches("data-series=\"fds\"").count(), 1);
        // Threads from procfs are labelled as threads.
        let tasks = render(&charts[2], &h, &frame, "callers").unwrap();
        assert_eq!(tasks.legend[0].label, "threads");
        assert_eq!(tasks.legend[0].sources, vec![Source::Procfs]);
    }

    #[test]
    fn long_lines_are_reduced_keeping_extremes() {
        let seg: Vec<(f64, f64)> = (0..10_000)
            .map(|i| (i as f64, if i == 5000 { 99.0 } else { 1.0 }))
            .collect();
        let r = reduce(&seg, 100);
        assert!(r.len() <= 102, "{}", r.len());
        assert!(r.iter().any(|p| p.1 == 99.0), "the spike survives");
        assert!(r.windows(2).all(|w| w[0].0 <= w[1].0), "time order kept");
        assert_eq!(format_time(-65.0), "-1:05");
        assert_eq!(format_time(3725.0), "1:02:05");
    }
}
