//! Goroutine profiles: when tasks grow, which code paths hold them. The seed investigation found
//! remotedialer's `clientDial`, `pipe` and `pipe.func2` by reading pprof's `goroutine?debug=2` by hand;
//! this groups that text by stack and diffs it against a baseline taken before the growth.
//!
//! The format (Go's `runtime.Stack` with all goroutines): blocks separated by blank lines, each starting
//! `goroutine N [state...]:`, then pairs of lines, a function call and an indented `file:line +0x..`,
//! optionally ending with `created by F in goroutine M` and its location.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::scrape::Scraper;

/// Frames kept per stack: enough to tell `pipe.func2` under `pipe` under `clientDial` apart.
const MAX_FRAMES: usize = 6;
/// Distinct stacks kept: a profile of a million goroutines must not become a million keys.
const MAX_STACKS: usize = 2000;

/// Goroutine counts per stack (innermost frame first, joined with " <- ").
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct StackProfile {
    pub goroutines: u64,
    pub by_stack: BTreeMap<String, u64>,
    /// Goroutines whose stack did not fit under the cap of distinct stacks.
    pub other: u64,
    /// Per stack, how many goroutines have been blocked for how many whole minutes (Go prints the age of
    /// a goroutine blocked for a minute or more: `goroutine 7 [select, 12 minutes]:`).
    pub blocked_minutes: BTreeMap<String, BTreeMap<u64, u64>>,
}

/// The connection-holding code of a tunnel: a goroutine blocked here holds a tunneled connection (an idle
/// pooled connection waits in `persistConn.readLoop`; remotedialer's pipes wait in `connection.Read`).
const CONNECTION_FRAMES: [&str; 3] = [
    "remotedialer",
    "net/http.(*persistConn)",
    "http.(*persistConn)",
];

/// The whole minutes a goroutine header says it has been blocked, if it says so.
fn blocked_minutes(header: &str) -> Option<u64> {
    let inside = header.split_once('[')?.1.split_once(']')?.0;
    // `[select, 12 minutes]`, or with a suffix: `[select, 12 minutes, locked to thread]`.
    inside
        .split(", ")
        .find_map(|part| part.strip_suffix(" minutes")?.trim().parse().ok())
}

/// Goroutines of connection-holding stacks blocked for at least `min_minutes`, total and per stack
/// (most first). Go prints whole minutes rounded down, so `min_minutes = ceil(horizon / 60)` counts only
/// goroutines certainly blocked for longer than the horizon.
pub fn blocked_connections(p: &StackProfile, min_minutes: u64) -> (u64, Vec<(String, u64)>) {
    let mut per_stack: Vec<(String, u64)> = p
        .blocked_minutes
        .iter()
        .filter(|(stack, _)| CONNECTION_FRAMES.iter().any(|f| stack.contains(f)))
        .map(|(stack, ages)| {
            let n = ages.range(min_minutes..).map(|(_, c)| c).sum();
            (stack.clone(), n)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    per_stack.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    (per_stack.iter().map(|(_, n)| n).sum(), per_stack)
}

/// `pkg/path.(*T).Method(0xc000, ...)` -> `path.(*T).Method`: the arguments and the module path prefix
/// change from build to build and from goroutine to goroutine; the function does not.
fn function_name(call: &str) -> &str {
    let call = call.trim();
    let without_args = match call.rfind('(') {
        Some(i) if call.ends_with(')') && i > 0 => &call[..i],
        _ => call,
    };
    match without_args.rfind('/') {
        Some(i) => &without_args[i + 1..],
        None => without_args,
    }
}

pub fn parse_goroutine_dump(text: &str) -> StackProfile {
    let mut profile = StackProfile::default();
    for block in text.split("\n\n") {
        let mut lines = block.lines().map(str::trim_end).filter(|l| !l.is_empty());
        let Some(header) = lines.next() else { continue };
        if !header.starts_with("goroutine ") {
            continue;
        }
        let frames: Vec<&str> = lines
            .filter(|l| {
                !l.starts_with('\t') && !l.starts_with(' ') && !l.starts_with("created by ")
            })
            .map(function_name)
            .filter(|f| !f.is_empty())
            .take(MAX_FRAMES)
            .collect();
        profile.goroutines += 1;
        let key = if frames.is_empty() {
            "(no frames)".to_string()
        } else {
            frames.join(" <- ")
        };
        if profile.by_stack.len() < MAX_STACKS || profile.by_stack.contains_key(&key) {
            if let Some(minutes) = blocked_minutes(header) {
                *profile
                    .blocked_minutes
                    .entry(key.clone())
                    .or_default()
                    .entry(minutes)
                    .or_default() += 1;
            }
            *profile.by_stack.entry(key).or_default() += 1;
        } else {
            profile.other += 1;
        }
    }
    profile
}

/// Stacks that gained the most goroutines since `base`, largest first.
pub fn top_growth(base: &StackProfile, now: &StackProfile, n: usize) -> Vec<(String, i64)> {
    let mut grown: Vec<(String, i64)> = now
        .by_stack
        .iter()
        .map(|(k, &c)| {
            (
                k.clone(),
                c as i64 - base.by_stack.get(k).copied().unwrap_or(0) as i64,
            )
        })
        .filter(|(_, g)| *g > 0)
        .collect();
    grown.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    grown.truncate(n);
    grown
}

/// The pprof goroutine URL of a target whose metrics are at `metrics_url` (same scheme, host and port).
pub fn pprof_url_for(metrics_url: &str) -> Option<String> {
    let scheme_end = metrics_url.find("://")? + 3;
    let path_start = metrics_url[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(metrics_url.len());
    Some(format!(
        "{}/debug/pprof/goroutine?debug=2",
        &metrics_url[..path_start]
    ))
}

/// Fetches profiles from the target, rarely: a baseline once, then one per task-growth verdict at most
/// every `min_interval` (a full goroutine dump stops the Go world for a moment; it must stay an exception).
pub struct GoroutineProfiler {
    url: String,
    baseline: Option<StackProfile>,
    baseline_tried: bool,
    /// When the last verdict-time profile was taken (the baseline does not count).
    last_fetch: Option<Instant>,
    min_interval: Duration,
    /// Set when the target turned out to serve no profiles: asking again would only add load.
    disabled: bool,
    /// When connection ages were last asked for: an unconfirmed idle verdict asks again, at most once a
    /// minute (ages only grow, so the next look can confirm what the last could not yet).
    last_age_fetch: Option<Instant>,
}

impl GoroutineProfiler {
    pub fn new(url: String) -> Self {
        Self {
            url,
            baseline: None,
            baseline_tried: false,
            last_fetch: None,
            min_interval: Duration::from_secs(300),
            disabled: false,
            last_age_fetch: None,
        }
    }

    async fn fetch(&mut self, scraper: &Scraper) -> Option<StackProfile> {
        match scraper.fetch_url(&self.url).await {
            Ok(body) => {
                let p = parse_goroutine_dump(&body);
                if p.goroutines == 0 {
                    info!(url = %self.url, "the target's pprof answer holds no goroutine profile; stack evidence is off");
                    self.disabled = true;
                    return None;
                }
                Some(p)
            }
            Err(e) => {
                info!(url = %self.url, "no goroutine profile from the target ({e}); stack evidence is off");
                self.disabled = true;
                None
            }
        }
    }

    /// Forgets the baseline (the target restarted); the next call to `ensure_baseline` takes a new one.
    pub fn reset(&mut self) {
        self.baseline = None;
        self.baseline_tried = false;
    }

    /// Takes the baseline the first time it is called (the sidecar calls it once the target is scraped).
    pub async fn ensure_baseline(&mut self, scraper: &Scraper) {
        if !self.baseline_tried && !self.disabled {
            self.baseline_tried = true;
            self.baseline = self.fetch(scraper).await;
        }
    }

    /// Goroutines of connection-holding stacks blocked for at least `min_minutes` (see
    /// [`blocked_connections`]); `None` when rate-limited, disabled or failed.
    pub async fn blocked_beyond(
        &mut self,
        scraper: &Scraper,
        min_minutes: u64,
    ) -> Option<(u64, Vec<(String, u64)>)> {
        if self.disabled
            || self
                .last_age_fetch
                .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return None;
        }
        self.last_age_fetch = Some(Instant::now());
        let now = self.fetch(scraper).await?;
        Some(blocked_connections(&now, min_minutes))
    }

    /// The stacks that grew since the baseline, or `None` when rate-limited, disabled or failed.
    pub async fn growth(&mut self, scraper: &Scraper) -> Option<Vec<(String, i64)>> {
        if self.disabled
            || self
                .last_fetch
                .is_some_and(|t| t.elapsed() < self.min_interval)
        {
            return None;
        }
        self.last_fetch = Some(Instant::now());
        let now = self.fetch(scraper).await?;
        let base = self.baseline.clone().unwrap_or_default();
        let top = top_growth(&base, &now, 5);
        if top.is_empty() {
            warn!("tasks grew but no goroutine stack grew since the baseline");
        }
        Some(top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like the seed's pprof output: goroutines stuck in remotedialer's pipe and clientDial.
    fn dump(pipes: usize) -> String {
        let mut s = String::from(
            "goroutine 1 [IO wait]:\ninternal/poll.runtime_pollWait(0x7f, 0x72)\n\t/usr/lib/go/src/runtime/netpoll.go:345 +0x85\nmain.main()\n\t/src/main.go:10 +0x1d\n",
        );
        for i in 0..pipes {
            s += &format!(
                "\ngoroutine {} [select, 3 minutes]:\ngithub.com/rancher/remotedialer.(*connection).Read(0xc000{i:x}, {{0xc0, 0x8000, 0x8000}})\n\t/go/pkg/mod/github.com/rancher/remotedialer/connection.go:61 +0x10f\ngithub.com/rancher/remotedialer.pipe.func2()\n\t/go/pkg/mod/github.com/rancher/remotedialer/client_dialer.go:49 +0x6b\ncreated by github.com/rancher/remotedialer.pipe in goroutine 77\n\t/go/pkg/mod/github.com/rancher/remotedialer/client_dialer.go:46 +0x1a5\n",
                100 + i
            );
        }
        s
    }

    #[test]
    fn groups_by_stack_without_arguments_or_module_paths() {
        let p = parse_goroutine_dump(&dump(3));
        assert_eq!(p.goroutines, 4);
        assert_eq!(
            p.by_stack["remotedialer.(*connection).Read <- remotedialer.pipe.func2"],
            3
        );
        assert_eq!(p.by_stack["poll.runtime_pollWait <- main.main"], 1);
    }

    #[test]
    fn growth_names_the_stuck_stack() {
        let (base, now) = (
            parse_goroutine_dump(&dump(2)),
            parse_goroutine_dump(&dump(50)),
        );
        let top = top_growth(&base, &now, 3);
        assert_eq!(
            top,
            vec![(
                "remotedialer.(*connection).Read <- remotedialer.pipe.func2".to_string(),
                48
            )]
        );
    }

    #[test]
    fn blocked_ages_are_counted_per_stack_in_whole_minutes() {
        // dump() blocks every pipe goroutine for 3 minutes; the main goroutine has no age.
        let p = parse_goroutine_dump(&dump(5));
        let stack = "remotedialer.(*connection).Read <- remotedialer.pipe.func2";
        assert_eq!(p.blocked_minutes[stack][&3], 5);
        assert_eq!(
            blocked_connections(&p, 2),
            (5, vec![(stack.to_string(), 5)])
        );
        assert_eq!(blocked_connections(&p, 4).0, 0, "3 minutes is not 4");
        assert_eq!(blocked_minutes("goroutine 9 [IO wait]:"), None);
        assert_eq!(
            blocked_minutes("goroutine 9 [sync.Cond.Wait, 1 minutes]:"),
            Some(1)
        );
        assert_eq!(
            blocked_minutes("goroutine 9 [select, 12 minutes, locked to thread]:"),
            Some(12)
        );
    }

    #[test]
    fn garbage_is_an_empty_profile_and_huge_ones_are_capped() {
        assert_eq!(
            parse_goroutine_dump("<html>not a profile</html>").goroutines,
            0
        );
        let mut s = String::new();
        for i in 0..(MAX_STACKS + 10) {
            s += &format!("goroutine {i} [running]:\nf{i}()\n\tx.go:1\n\n");
        }
        let p = parse_goroutine_dump(&s);
        assert_eq!(p.by_stack.len(), MAX_STACKS);
        assert_eq!(p.other, 10);
    }

    #[test]
    fn pprof_url_from_the_metrics_url() {
        assert_eq!(
            pprof_url_for("https://rancher:8443/metrics").as_deref(),
            Some("https://rancher:8443/debug/pprof/goroutine?debug=2")
        );
        assert_eq!(
            pprof_url_for("http://127.0.0.1:80").as_deref(),
            Some("http://127.0.0.1:80/debug/pprof/goroutine?debug=2")
        );
        assert_eq!(pprof_url_for("nonsense"), None);
    }
}
