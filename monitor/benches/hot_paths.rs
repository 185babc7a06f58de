//! The pure functions on leakwatch's per-tick path, measured in isolation: parsing the target's exposition,
//! parsing /proc/net/tcp lines, the Theil–Sen slope over a window, and one full analysis tick.
//! `cargo bench -p monitor --bench hot_paths` (the figures in the README come from one such run).
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use leakwatch::{
    analysis::{AnalysisConfig, Analyzer, trend::theil_sen},
    sample::{AppSample, KernelSample, LedgerRow, ProcSample, ScrapeOutcome, Snapshot, TargetId},
    sources::{
        procfs::parse_tcp_line,
        scrape::{MetricNames, parse_app_sample},
    },
};

/// An exposition like a busy Rancher's: the remotedialer ledger for `rows` (clientkey, addr) pairs plus the
/// Go runtime series.
fn exposition(rows: usize) -> String {
    let mut s = String::from(
        "# HELP go_goroutines Number of goroutines.\n# TYPE go_goroutines gauge\ngo_goroutines 1234\n",
    );
    s += "# TYPE go_memstats_heap_inuse_bytes gauge\ngo_memstats_heap_inuse_bytes 1.2345e+08\n";
    for (name, v) in [("add", 1000), ("remove", 990)] {
        s += &format!(
            "# HELP session_server_total_{name}_connections Total count of {name}ed connections\n"
        );
        s += &format!("# TYPE session_server_total_{name}_connections counter\n");
        for i in 0..rows {
            s += &format!(
                "session_server_total_{name}_connections{{addr=\"10.0.{}.{}:6443\",clientkey=\"c-{i}\",proto=\"tcp\"}} {}\n",
                i / 250,
                i % 250,
                v + i
            );
        }
    }
    s
}

/// A ledger of `clientkeys` x `rows_per_key` rows, sorted as the scraper sorts it.
fn ledger(clientkeys: usize, rows_per_key: usize, t: f64) -> Vec<LedgerRow> {
    let mut rows = Vec::with_capacity(clientkeys * rows_per_key);
    for k in 0..clientkeys {
        for r in 0..rows_per_key {
            rows.push(LedgerRow {
                clientkey: format!("c-{k:05}"),
                proto: "tcp".into(),
                addr: format!("10.{}.{}.{r}:6443", k / 250, k % 250),
                added: 100.0 * t,
                removed: 100.0 * t - 1.0,
            });
        }
    }
    rows
}

fn snapshot(t: f64) -> Snapshot {
    Snapshot {
        t,
        unix: t,
        target: Some(TargetId {
            pid: 1,
            start_ticks: 1,
        }),
        kernel: Some(KernelSample {
            live_sockets: 40,
            accepted_live: 20,
            ..KernelSample::default()
        }),
        proc: Some(ProcSample {
            open_fds: 80,
            fd_limit: Some(1 << 20),
            threads: 12,
            ..ProcSample::default()
        }),
        goroutines: None,
        app: ScrapeOutcome::Ok(AppSample {
            ledger: ledger(50, 1, t),
            remotedialer_present: true,
            goroutines: Some(500.0 + (t % 7.0)),
            heap_inuse_bytes: Some(1e8),
            ..AppSample::default()
        }),
    }
}

fn benches(c: &mut Criterion) {
    let names = MetricNames::default();
    for rows in [10, 1000] {
        let body = exposition(rows);
        c.bench_function(&format!("parse_app_sample/{rows}_ledger_rows"), |b| {
            b.iter(|| parse_app_sample(black_box(&body), &names, 2000).expect("valid exposition"))
        });
    }
    for (series, clientkeys) in [(1_000, 10), (50_000, 1_000), (200_000, 5_000)] {
        let body = testsupport::big_exposition(series, clientkeys, 1);
        c.bench_function(
            &format!("parse_app_sample/{series}_series_{clientkeys}_clientkeys"),
            |b| {
                b.iter(|| {
                    parse_app_sample(black_box(&body), &names, 25_000).expect("valid exposition")
                })
            },
        );
    }
    let line = "  12: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 123456 1 0000000000000000 20 4 30 10 -1";
    c.bench_function("parse_tcp_line", |b| {
        b.iter(|| parse_tcp_line(black_box(line)).expect("valid line"))
    });
    let window: Vec<(f64, f64)> = (0..120)
        .map(|i| (i as f64, 100.0 + (i % 9) as f64 + 0.3 * i as f64))
        .collect();
    c.bench_function("theil_sen/120_points", |b| {
        b.iter(|| theil_sen(black_box(&window)))
    });
    c.bench_function("analyzer_tick/50_ledger_rows", |b| {
        let mut an = Analyzer::new(AnalysisConfig::default());
        let mut t = 0.0;
        b.iter(|| {
            t += 1.0;
            an.observe(black_box(&snapshot(t)))
        })
    });
    // 5,000 clientkeys with 4 addresses each: the per-tick analysis of a big Rancher HA install. The
    // snapshot is changed in place (time, and a tenth of the rows taking a connection), so the figure is
    // the analysis, not the building of 20,000 rows.
    c.bench_function("analyzer_tick/5000_clientkeys_20000_rows", |b| {
        let mut an = Analyzer::new(AnalysisConfig::default());
        let mut snap = snapshot(0.0);
        let ScrapeOutcome::Ok(app) = &mut snap.app else {
            unreachable!()
        };
        app.ledger = ledger(5_000, 4, 1.0);
        let mut t = 0.0;
        b.iter(|| {
            t += 1.0;
            snap.t = t;
            snap.unix = t;
            if let ScrapeOutcome::Ok(app) = &mut snap.app {
                for (i, r) in app.ledger.iter_mut().enumerate() {
                    if (i + t as usize).is_multiple_of(10) {
                        r.added += 1.0;
                        r.removed += 1.0;
                    }
                }
            }
            an.observe(black_box(&snap))
        })
    });
}

criterion_group!(hot_paths, benches);
criterion_main!(hot_paths);
