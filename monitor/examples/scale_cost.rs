//! The scale figures of issue 17, for `cargo xtask bench`: one scrape + parse of a big `/metrics` over a
//! real HTTP fetch from a local server (1,000 / 50,000 / 200,000 unrelated series beside the ledger of 10 /
//! 1,000 / 5,000 clientkeys), and one analysis tick of a ledger of 5,000 clientkeys x 4 addresses.
//! Prints one JSON object; medians of repeated runs within this run.
use std::time::Instant;

use leakwatch::{
    analysis::{AnalysisConfig, Analyzer},
    sample::{AppSample, KernelSample, LedgerRow, ProcSample, ScrapeOutcome, Snapshot, TargetId},
    sources::scrape::{ScrapeConfig, Scraper},
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Serves `body` to every request, one response per connection.
async fn serve(body: String) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/metrics", l.local_addr().expect("addr"));
    let page = std::sync::Arc::new(
        [
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes(),
            body.into_bytes(),
        ]
        .concat(),
    );
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let page = page.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&page).await;
            });
        }
    });
    url
}

async fn scrape_cost(series: usize, clientkeys: usize) -> serde_json::Value {
    let body = testsupport::big_exposition(series, clientkeys, 1);
    let (bytes, lines) = (body.len(), body.lines().count());
    let url = serve(body).await;
    let scraper = Scraper::new(ScrapeConfig {
        url,
        ..ScrapeConfig::default()
    })
    .expect("scraper");
    let rounds = if series >= 200_000 { 15 } else { 31 };
    let mut ms = Vec::new();
    let mut rows = 0;
    let mut outcome = String::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let out = scraper.scrape().await;
        ms.push(started.elapsed().as_secs_f64() * 1e3);
        match out {
            ScrapeOutcome::Ok(s) => {
                rows = s.ledger.len();
                outcome = "ok".into();
            }
            ScrapeOutcome::Failed { reason, .. } => outcome = reason,
            ScrapeOutcome::NotConfigured => {}
        }
    }
    json!({
        "series": series,
        "clientkeys": clientkeys,
        "body_bytes": bytes,
        "body_lines": lines,
        "ledger_rows": rows,
        "outcome": outcome,
        "scrape_ms_median": median(ms),
    })
}

fn snapshot(t: f64, ledger: Vec<LedgerRow>) -> Snapshot {
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
            ledger,
            remotedialer_present: true,
            goroutines: Some(500.0),
            heap_inuse_bytes: Some(1e8),
            ..AppSample::default()
        }),
    }
}

/// One analysis tick with `clientkeys` x 4 rows, after the series have filled past the idle horizon.
fn tick_cost(clientkeys: usize) -> serde_json::Value {
    let ledger: Vec<LedgerRow> = (0..clientkeys)
        .flat_map(|k| {
            (0..4).map(move |r| LedgerRow {
                clientkey: format!("c-{k:05}"),
                proto: "tcp".into(),
                addr: format!("10.{}.{}.{r}:6443", k / 250, k % 250),
                added: 100.0,
                removed: 99.0,
            })
        })
        .collect();
    let mut snap = snapshot(0.0, ledger);
    let mut an = Analyzer::new(AnalysisConfig::default());
    let mut ms = Vec::new();
    for tick in 1..=260u32 {
        snap.t = f64::from(tick);
        if let ScrapeOutcome::Ok(app) = &mut snap.app {
            // A tenth of the rows take a connection and give one back every tick.
            for (i, r) in app.ledger.iter_mut().enumerate() {
                if (i + tick as usize).is_multiple_of(10) {
                    r.added += 1.0;
                    r.removed += 1.0;
                }
            }
        }
        let started = Instant::now();
        an.observe(&snap);
        // The first 200 ticks fill the series (the idle horizon is 105 s, rows keep 165 s).
        if tick > 200 {
            ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    json!({ "clientkeys": clientkeys, "rows": clientkeys * 4, "tick_ms_median": median(ms) })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut scrapes = Vec::new();
    for series in [1_000, 50_000, 200_000] {
        for clientkeys in [10, 1_000, 5_000] {
            scrapes.push(scrape_cost(series, clientkeys).await);
        }
    }
    let ticks: Vec<_> = [1_000, 5_000].into_iter().map(tick_cost).collect();
    println!("{}", json!({ "scrapes": scrapes, "ticks": ticks }));
}
