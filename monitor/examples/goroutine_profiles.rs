//! Drives leakwatch's goroutine profiler against a live Go target, for `cargo xtask bench`.
//!
//! `goroutine_profiles compare <pprof-url>`: reads the target's aggregated profile (`debug=1`) and its full
//! dump (`debug=2`) with leakwatch's parsers and prints, as JSON, whether both give the same stacks.
//!
//! `goroutine_profiles confirm <metrics-url> <pprof-url> <seconds>`: runs what `watch` runs while an
//! idle-connection verdict waits to be confirmed (a scrape of the target's metrics for `go_goroutines`,
//! then `GoroutineProfiler::blocked_beyond`), once a second instead of once per dump interval, so that a
//! short window holds several; prints what each look found as JSON.
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use leakwatch::{
    sample::ScrapeOutcome,
    sources::{
        goroutines::{GoroutineProfiler, parse_goroutine_dump, parse_goroutine_profile},
        scrape::{ScrapeConfig, Scraper},
    },
};
use serde_json::json;

fn scraper(url: &str) -> Result<Scraper> {
    Ok(Scraper::new(ScrapeConfig {
        url: url.to_string(),
        timeout: Duration::from_secs(30),
        max_body_bytes: 128 << 20,
        ..ScrapeConfig::default()
    })?)
}

async fn compare(pprof: &str) -> Result<serde_json::Value> {
    let s = scraper(pprof)?;
    let profile = parse_goroutine_profile(&s.fetch_url(&format!("{pprof}?debug=1")).await?)
        .context("not a debug=1 profile")?;
    let dump = parse_goroutine_dump(&s.fetch_url(&format!("{pprof}?debug=2")).await?);
    // The goroutine serving each request differs between the two (it is in pprof's own code): compare
    // the stacks held by more than one goroutine, the parked ones.
    let many = |p: &std::collections::BTreeMap<String, u64>| {
        p.iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, n)| (k.clone(), *n))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (a, b) = (many(&profile.by_stack), many(&dump.by_stack));
    Ok(json!({
        "profile_goroutines": profile.goroutines,
        "dump_goroutines": dump.goroutines,
        "same_stacks": a == b,
        "profile_stacks": a,
        "dump_stacks": b,
    }))
}

async fn confirm(metrics: &str, pprof: &str, seconds: u64) -> Result<serde_json::Value> {
    let s = scraper(metrics)?;
    let mut p = GoroutineProfiler::new(pprof.to_string());
    p.limits.dump_interval = Duration::from_secs(1);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut looks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while Instant::now() < end {
        tick.tick().await;
        let goroutines = match s.scrape().await {
            ScrapeOutcome::Ok(app) => app.goroutines.map(|g| g as u64),
            other => bail!("scrape failed: {other:?}"),
        };
        let started = Instant::now();
        if let Some(r) = p.blocked_beyond(&s, 2, goroutines).await {
            looks.push(json!({
                "goroutines": goroutines,
                "read": r.read,
                "note": r.note,
                "seconds": started.elapsed().as_secs_f64(),
            }));
        }
    }
    Ok(json!({ "looks": looks }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["compare", pprof] => compare(pprof).await?,
        ["confirm", metrics, pprof, seconds] => confirm(metrics, pprof, seconds.parse()?).await?,
        _ => bail!(
            "usage: goroutine_profiles compare <pprof-url> | confirm <metrics-url> <pprof-url> <seconds>"
        ),
    };
    println!("{out}");
    Ok(())
}
