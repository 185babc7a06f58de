//! Goroutine profiles: when tasks grow, which code paths hold them, and how long connection goroutines
//! have been blocked. The seed investigation found remotedialer's `clientDial`, `pipe` and `pipe.func2` by
//! reading pprof's `goroutine?debug=2` by hand; this groups profiles by stack and diffs them against a
//! baseline taken before the growth.
//!
//! Go serves two text layouts at `/debug/pprof/goroutine`, at very different costs to the target:
//!
//! - `?debug=1`: goroutines aggregated by stack, `goroutine profile: total N`, then blocks
//!   `COUNT @ 0xpc 0xpc...` followed by `#\t0xpc\tfunc+0xoff\tfile:line` lines. Since Go 1.19 it is
//!   collected concurrently (`goroutineProfileWithLabelsConcurrent`: the world stops twice, briefly). It
//!   has the counts per stack, so the growth per stack, but no ages. This is what leakwatch reads.
//! - `?debug=2`: every goroutine with its wait reason and, blocked for a minute or more, its age
//!   (`goroutine 7 [select, 12 minutes]:`), then pairs of lines (a call, an indented `file:line +0x..`),
//!   optionally `created by F in goroutine M`. It is `runtime.Stack(all)`, which stops the world for the
//!   whole traceback of every goroutine (Go truncates it at 64 MiB, retrying from 1 MiB doubling, each try
//!   a full stop). Only it has ages, so it is read only to confirm an idle-connection verdict, below a
//!   goroutine bound, rarely, and streamed under a byte cap.
//!
//! Measured by `cargo xtask bench` (Go 1.19, this project's shared 2-core VM, three runs): one `debug=2`
//! at 10k goroutines (8.9 MB) stalled a steady request loop to the target by 0.2-0.42 s (20-40 µs per
//! goroutine), at 100k by 5.4-9.1 s (cut by Go at 64 MiB, served in 15-20 s); one `debug=1` (6 KB) by
//! 10-25 ms at 10k, near the loop's own noise, and 27-64 ms at 100k. The two layouts give the same
//! stacks on the real runtime (the bench checks it at 1k and 10k; at 100k Go's cut leaves the dump
//! short). Go offers nothing cheaper for ages: `debug=1` and the protobuf profile (`debug=0`) carry none, the execution
//! tracer records states but not since when, and Go 1.26's `goroutineleak` profile (experimental, behind
//! `GOEXPERIMENT=goroutineleakprofile` at build time) finds goroutines blocked on unreachable channels,
//! which an idle pooled connection (blocked on a live socket) is not. What Go does offer for free is the
//! goroutine count, `go_goroutines` in the target's own metrics: the bounds below are checked against it
//! before anything is fetched, so a target in trouble is not asked for a profile at all.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::scrape::{ScrapeError, Scraper};
use crate::sample::AgeReading;

/// Frames kept per stack: enough to tell `pipe.func2` under `pipe` under `clientDial` apart.
const MAX_FRAMES: usize = 6;
/// Distinct stacks kept: a profile of a million goroutines must not become a million keys.
const MAX_STACKS: usize = 2000;
/// A goroutine block longer than this is not Go's (Go elides frames past 100): the rest of it is skipped.
const MAX_BLOCK_BYTES: usize = 1 << 20;

/// How much a profile costs the target, per goroutine, measured by `cargo xtask bench` on this project's
/// machine (see the module doc); used to say how long a skipped read would have stalled the target, until
/// a dump of the target itself has been timed.
const DUMP_COST_PER_GOROUTINE: Duration = Duration::from_micros(40);
const PROFILE_COST_PER_GOROUTINE: Duration = Duration::from_nanos(650);

/// When and how much leakwatch reads from the target's pprof.
#[derive(Clone, Debug)]
pub struct ProfileLimits {
    /// The aggregated profile (`debug=1`) is read only up to this many goroutines: at 250k it stalls the
    /// target for ~0.16 s and makes it allocate 64 MB of stack records (256 bytes each); a target with
    /// millions of goroutines is told nothing more by it than `go_goroutines` already says.
    pub max_profile_goroutines: u64,
    /// Stack growth is read at most this often (one `debug=1` per task-growth verdict, the baseline aside).
    pub growth_interval: Duration,
    /// Full dumps (`debug=2`) are read only up to this many goroutines: 0.2-0.4 s of stopped world at the
    /// measured cost. The 50k a Rancher in trouble quickly reaches would be 1-2 s.
    pub max_dump_goroutines: u64,
    /// At most one full dump this often. Ages only grow, so a later look loses nothing but time: at 5 min
    /// the stall is at most 0.4 s in 300 s, and an idle verdict the first dump could not confirm yet (its
    /// connections not yet `ceil(horizon / 1 min)` minutes old) is confirmed within 5 more minutes.
    pub dump_interval: Duration,
    /// Bytes of a full dump read (Go's own cap; at ~0.9 KB per goroutine, 70k goroutines). The dump is
    /// parsed as it streams in: leakwatch holds the counts, not the text.
    pub max_dump_bytes: usize,
}

impl Default for ProfileLimits {
    fn default() -> Self {
        Self {
            max_profile_goroutines: 250_000,
            growth_interval: Duration::from_secs(60),
            max_dump_goroutines: 10_000,
            dump_interval: Duration::from_secs(300),
            max_dump_bytes: 64 << 20,
        }
    }
}

/// Goroutine counts per stack (innermost frame first, joined with " <- ").
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct StackProfile {
    pub goroutines: u64,
    pub by_stack: BTreeMap<String, u64>,
    /// Goroutines whose stack did not fit under the cap of distinct stacks.
    pub other: u64,
    /// Per stack, how many goroutines have been blocked for how many whole minutes (Go prints the age of
    /// a goroutine blocked for a minute or more: `goroutine 7 [select, 12 minutes]:`). Full dumps only.
    pub blocked_minutes: BTreeMap<String, BTreeMap<u64, u64>>,
}

impl StackProfile {
    /// Counts `count` goroutines of stack `key`, blocked for `minutes` if known.
    fn add(&mut self, key: String, count: u64, minutes: Option<u64>) {
        self.goroutines += count;
        if self.by_stack.len() >= MAX_STACKS && !self.by_stack.contains_key(&key) {
            self.other += count;
            return;
        }
        // Looked up before inserting: a dump repeats a few keys many times, and a key is a String.
        if let Some(m) = minutes {
            match self.blocked_minutes.get_mut(&key) {
                Some(ages) => *ages.entry(m).or_default() += count,
                None => {
                    self.blocked_minutes
                        .insert(key.clone(), BTreeMap::from([(m, count)]));
                }
            }
        }
        match self.by_stack.get_mut(&key) {
            Some(c) => *c += count,
            None => {
                self.by_stack.insert(key, count);
            }
        }
    }
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

/// `pkg/path.(*T).Method(0xc000, ...)` (a dump's call line) or `pkg/path.(*T).Method+0x1d5` (a profile's
/// function field) -> `path.(*T).Method`: the arguments, offsets and module path prefix change from build
/// to build and from goroutine to goroutine; the function does not.
fn function_name(call: &str) -> &str {
    let call = call.trim();
    let without_args = match call.rfind('(') {
        Some(i) if call.ends_with(')') && i > 0 => &call[..i],
        _ => call,
    };
    let without_offset = match without_args.rfind("+0x") {
        Some(i) if i > 0 => &without_args[..i],
        _ => without_args,
    };
    match without_offset.rfind('/') {
        Some(i) => &without_offset[i + 1..],
        None => without_offset,
    }
}

/// `runtime.gopark`, `runtime.selectgo`: Go's traceback (a dump) hides these by default.
fn is_unexported_runtime(f: &str) -> bool {
    f.strip_prefix("runtime.")
        .and_then(|rest| rest.chars().next())
        .is_some_and(|c| !c.is_uppercase())
}

/// The key of a stack, from its function names innermost first. A dump hides the runtime's unexported
/// functions and shows exported ones; a profile hides every runtime function at the top of a stack and
/// shows the rest (`runtime.main` under `main.main`). Dropping both gives the two layouts the same keys.
fn stack_key<'a>(functions: impl Iterator<Item = &'a str>) -> String {
    let kept: Vec<&str> = functions
        .filter(|f| !f.is_empty() && !is_unexported_runtime(f))
        .skip_while(|f| f.starts_with("runtime."))
        .take(MAX_FRAMES)
        .collect();
    if kept.is_empty() {
        "(no frames)".to_string()
    } else {
        kept.join(" <- ")
    }
}

/// One `goroutine N [...]:` block of a dump.
fn add_dump_block(profile: &mut StackProfile, block: &str) {
    let mut lines = block.lines().map(str::trim_end).filter(|l| !l.is_empty());
    let Some(header) = lines.next() else { return };
    if !header.starts_with("goroutine ") {
        return;
    }
    let functions = lines
        .filter(|l| {
            !l.starts_with('\t')
                && !l.starts_with(' ')
                && !l.starts_with("created by ")
                && !l.starts_with("...")
        })
        .map(function_name);
    profile.add(stack_key(functions), 1, blocked_minutes(header));
}

/// Reads a full dump (`debug=2`) as it streams in, one goroutine block at a time: memory holds the counts
/// and at most one block, however large the dump.
#[derive(Default)]
pub struct DumpParser {
    profile: StackProfile,
    pending: Vec<u8>,
    /// Bytes of `pending` already searched for a block end.
    scanned: usize,
}

/// The offset of the next blank line (`\n\n`) in `buf` at or after `from`.
fn blank_line(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(off) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let at = i + off;
        if buf.get(at + 1) == Some(&b'\n') {
            return Some(at);
        }
        i = at + 1;
    }
    None
}

impl DumpParser {
    pub fn feed(&mut self, chunk: &[u8]) {
        self.pending.extend_from_slice(chunk);
        let mut start = 0;
        let mut from = self.scanned.saturating_sub(1);
        while let Some(end) = blank_line(&self.pending, from) {
            add_dump_block(
                &mut self.profile,
                &String::from_utf8_lossy(&self.pending[start..end]),
            );
            start = end + 2;
            from = start;
        }
        self.pending.drain(..start);
        if self.pending.len() > MAX_BLOCK_BYTES {
            self.pending.clear();
        }
        self.scanned = self.pending.len();
    }

    /// Goroutines read so far (complete blocks).
    pub fn goroutines(&self) -> u64 {
        self.profile.goroutines
    }

    /// The profile of the whole blocks read, dropping a block not yet ended.
    pub fn complete_blocks(self) -> StackProfile {
        self.profile
    }

    pub fn finish(mut self) -> StackProfile {
        let rest = std::mem::take(&mut self.pending);
        add_dump_block(&mut self.profile, &String::from_utf8_lossy(&rest));
        self.profile
    }
}

/// A full dump (`debug=2`, `runtime.Stack` of all goroutines) grouped by stack, with blocked ages.
pub fn parse_goroutine_dump(text: &str) -> StackProfile {
    let mut p = DumpParser::default();
    p.feed(text.as_bytes());
    p.finish()
}

/// An aggregated profile (`debug=1`) grouped by the same stack keys as [`parse_goroutine_dump`] (it has
/// no ages). `None` when the text is not one (no `goroutine profile: total N` line).
pub fn parse_goroutine_profile(text: &str) -> Option<StackProfile> {
    let mut profile = StackProfile::default();
    let mut blocks = text.split("\n\n");
    let first = blocks.next()?;
    let (head, first_block) = first.split_once('\n').unwrap_or((first, ""));
    let total: u64 = head
        .trim()
        .strip_prefix("goroutine profile: total ")?
        .trim()
        .parse()
        .ok()?;
    for block in std::iter::once(first_block).chain(blocks) {
        let mut lines = block.lines().map(str::trim).filter(|l| !l.is_empty());
        // `12 @ 0x43a0c5 0x44b2f8 ...`
        let Some(count) = lines
            .next()
            .and_then(|l| l.split_once(" @")?.0.trim().parse::<u64>().ok())
        else {
            continue;
        };
        // `#\t0x43a0c5\truntime.gopark+0xe5\t\t/usr/lib/go/src/runtime/proc.go:363`: Go aligns the
        // columns with runs of tabs. A `# labels: {...}` line and frames without a function are skipped.
        let functions = lines.filter_map(|l| {
            let mut fields = l.split('\t').filter(|f| !f.is_empty());
            (fields.next()? == "#").then_some(())?;
            fields.next()?; // the pc
            Some(function_name(fields.next()?))
        });
        profile.add(stack_key(functions), count, None);
    }
    // Goroutines created while the profile was taken are in the total but in no block; the total is Go's.
    profile.goroutines = total.max(profile.goroutines);
    Some(profile)
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
        "{}/debug/pprof/goroutine",
        &metrics_url[..path_start]
    ))
}

/// `url` asking for `debug=N`, whatever `debug` it asked for (users pass the `?debug=2` URL they know).
fn with_debug(url: &str, n: u8) -> String {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let mut params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("debug="))
        .collect();
    let debug = format!("debug={n}");
    params.push(&debug);
    format!("{path}?{}", params.join("&"))
}

/// `0.4 s`, `64 ms`.
fn human(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// A look at connection ages that read no dump, and why.
fn not_read(min_minutes: u64, note: String) -> AgeReading {
    AgeReading {
        min_minutes,
        read: false,
        total: 0,
        per_stack: Vec::new(),
        note: Some(note),
    }
}

/// A full dump as read: the goroutines parsed, and why it stopped early if it did.
struct Dump {
    profile: StackProfile,
    cut: Option<String>,
    elapsed: Duration,
}

/// Reads the target's profiles, rarely and within [`ProfileLimits`]: an aggregated profile as a baseline
/// and per task-growth verdict, a full dump only to confirm an idle-connection verdict. Each call is
/// bounded by the scrape timeout; a target that fails or hangs gets a note, not silence, and the next call
/// tries again (only a target that serves no profile at all is asked no more).
pub struct GoroutineProfiler {
    profile_url: String,
    dump_url: String,
    pub limits: ProfileLimits,
    baseline: Option<StackProfile>,
    baseline_tried: bool,
    last_growth: Option<Instant>,
    /// When ages were last asked for (read or skipped).
    last_dump: Option<Instant>,
    /// Wall time per goroutine of the last complete dump of this target, once one has been taken.
    dump_cost: Option<Duration>,
    /// Set when the target turned out to serve no profiles: asking again would only add load.
    disabled: bool,
}

impl GoroutineProfiler {
    /// `url`: the target's `/debug/pprof/goroutine`, with or without a `debug` parameter.
    pub fn new(url: String) -> Self {
        Self {
            profile_url: with_debug(&url, 1),
            dump_url: with_debug(&url, 2),
            limits: ProfileLimits::default(),
            baseline: None,
            baseline_tried: false,
            last_growth: None,
            last_dump: None,
            dump_cost: None,
            disabled: false,
        }
    }

    /// Why an aggregated profile of `goroutines` is not read, if it is not.
    fn profile_skipped(&self, goroutines: Option<u64>) -> Option<String> {
        let n = goroutines.filter(|&n| n > self.limits.max_profile_goroutines)?;
        Some(format!(
            "the goroutine profile was not read: {n} goroutines (go_goroutines), and collecting it would stall \
             the target for about {} and make it allocate {} MB of stack records; it is read up to {} goroutines",
            human(PROFILE_COST_PER_GOROUTINE.mul_f64(n as f64)),
            n * 256 / 1_000_000,
            self.limits.max_profile_goroutines
        ))
    }

    /// One aggregated profile (`debug=1`): a few KB, bounded by the scrape's timeout and size cap.
    async fn fetch_profile(&mut self, scraper: &Scraper) -> Result<StackProfile, String> {
        let body = scraper.fetch_url(&self.profile_url).await.map_err(|e| {
            if matches!(e, ScrapeError::Status(404)) {
                info!(url = %self.profile_url, "the target serves no goroutine profile (HTTP 404); stack evidence is off");
                self.disabled = true;
            }
            format!("no goroutine profile from the target ({e})")
        })?;
        parse_goroutine_profile(&body).ok_or_else(|| {
            info!(url = %self.profile_url, "the target's pprof answer is not a goroutine profile; stack evidence is off");
            self.disabled = true;
            "the target's pprof answer is not a goroutine profile".to_string()
        })
    }

    /// Forgets the baseline alone (the target's start-up ended); the next `ensure_baseline` takes anew.
    pub fn forget_baseline(&mut self) {
        self.baseline = None;
        self.baseline_tried = false;
    }

    /// Forgets the baseline (the target restarted); the next call to `ensure_baseline` takes a new one.
    pub fn reset(&mut self) {
        self.baseline = None;
        self.baseline_tried = false;
        self.dump_cost = None;
    }

    /// Takes the baseline the first time it is called (the sidecar calls it once the target is scraped),
    /// `goroutines` being the target's `go_goroutines` if it exports it.
    pub async fn ensure_baseline(&mut self, scraper: &Scraper, goroutines: Option<u64>) {
        if self.baseline_tried || self.disabled {
            return;
        }
        self.baseline_tried = true;
        if let Some(note) = self.profile_skipped(goroutines) {
            info!("no goroutine baseline: {note}");
            return;
        }
        match self.fetch_profile(scraper).await {
            Ok(p) => self.baseline = Some(p),
            Err(e) => info!(url = %self.profile_url, "no goroutine baseline: {e}"),
        }
    }

    /// The stacks that grew since the baseline (`Err`: why they could not be read), or `None` when
    /// rate-limited or disabled.
    pub async fn growth(
        &mut self,
        scraper: &Scraper,
        goroutines: Option<u64>,
    ) -> Option<Result<Vec<(String, i64)>, String>> {
        if self.disabled
            || self
                .last_growth
                .is_some_and(|t| t.elapsed() < self.limits.growth_interval)
        {
            return None;
        }
        self.last_growth = Some(Instant::now());
        if let Some(note) = self.profile_skipped(goroutines) {
            return Some(Err(note));
        }
        let now = match self.fetch_profile(scraper).await {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let base = self.baseline.clone().unwrap_or_default();
        let top = top_growth(&base, &now, 5);
        if top.is_empty() {
            warn!("tasks grew but no goroutine stack grew since the baseline");
        }
        Some(Ok(top))
    }

    /// How long a full dump of `n` goroutines would stop the target's world, and how that is known.
    fn dump_stall(&self, n: u64) -> (Duration, &'static str) {
        match self.dump_cost {
            Some(c) => (c.mul_f64(n as f64), "timed on this target's last dump"),
            None => (
                DUMP_COST_PER_GOROUTINE.mul_f64(n as f64),
                "measured by leakwatch's bench on Go 1.19",
            ),
        }
    }

    /// Connection goroutines blocked for at least `min_minutes` (see [`blocked_connections`]), from a full
    /// dump; `None` when rate-limited or disabled. `goroutines` is the target's `go_goroutines` if it
    /// exports it; otherwise an aggregated profile is read first for the count.
    pub async fn blocked_beyond(
        &mut self,
        scraper: &Scraper,
        min_minutes: u64,
        goroutines: Option<u64>,
    ) -> Option<AgeReading> {
        if self.disabled
            || self
                .last_dump
                .is_some_and(|t| t.elapsed() < self.limits.dump_interval)
        {
            return None;
        }
        self.last_dump = Some(Instant::now());
        let n = match goroutines {
            Some(n) => n,
            None => match self.fetch_profile(scraper).await {
                Ok(p) => p.goroutines,
                Err(e) => return Some(not_read(min_minutes, e)),
            },
        };
        if n > self.limits.max_dump_goroutines {
            let (stall, how) = self.dump_stall(n);
            return Some(not_read(
                min_minutes,
                format!(
                    "the goroutine dump was skipped: the target has {n} goroutines, and a full dump stops its world \
                 for all of them, about {} ({} per goroutine, {how}); dumps are read up to {} goroutines",
                    human(stall),
                    human_per_goroutine(stall.div_f64(n.max(1) as f64)),
                    self.limits.max_dump_goroutines
                ),
            ));
        }
        let dump = match self.read_dump(scraper).await {
            Ok(d) => d,
            Err(e) => {
                return Some(not_read(
                    min_minutes,
                    format!("the goroutine dump failed: {e}"),
                ));
            }
        };
        if dump.profile.goroutines == 0 {
            return Some(not_read(
                min_minutes,
                match dump.cut {
                    Some(cut) => format!("the goroutine dump gave no goroutine: {cut}"),
                    None => "the target's goroutine dump holds no goroutine".into(),
                },
            ));
        }
        if dump.cut.is_none() && dump.profile.goroutines >= 1000 {
            self.dump_cost = Some(dump.elapsed / dump.profile.goroutines as u32);
        }
        let (total, per_stack) = blocked_connections(&dump.profile, min_minutes);
        Some(AgeReading {
            min_minutes,
            read: true,
            total,
            per_stack,
            note: dump.cut,
        })
    }

    /// Streams one full dump through [`DumpParser`], stopping at the byte cap or the scrape timeout (what
    /// was read by then is kept: counts of blocked goroutines are then a lower bound).
    async fn read_dump(&self, scraper: &Scraper) -> Result<Dump, ScrapeError> {
        let started = Instant::now();
        let timeout = scraper.cfg.timeout;
        let mut resp = scraper.get(&self.dump_url).await?;
        let mut parser = DumpParser::default();
        let mut bytes = 0usize;
        let cut = loop {
            let left = timeout.saturating_sub(started.elapsed());
            let chunk = match tokio::time::timeout(left, resp.chunk()).await {
                Err(_) => break Some(format!("no complete dump within {timeout:?}")),
                Ok(Err(e)) if e.is_timeout() => {
                    break Some(format!("no complete dump within {timeout:?}"));
                }
                Ok(Err(e)) => break Some(format!("the dump broke off: {}", e.without_url())),
                Ok(Ok(None)) => break None,
                Ok(Ok(Some(c))) => c,
            };
            let room = self.limits.max_dump_bytes - bytes;
            if chunk.len() > room {
                parser.feed(&chunk[..room]);
                break Some(format!(
                    "the dump was cut at {} MiB",
                    self.limits.max_dump_bytes >> 20
                ));
            }
            bytes += chunk.len();
            parser.feed(&chunk);
        };
        let cut = cut.map(|c| {
            format!(
                "{c} after {} goroutines: its counts are a lower bound",
                parser.goroutines()
            )
        });
        Ok(Dump {
            // A cut dump ends inside a goroutine's block: only whole blocks are counted.
            profile: if cut.is_some() {
                parser.complete_blocks()
            } else {
                parser.finish()
            },
            cut,
            elapsed: started.elapsed(),
        })
    }
}

/// `40 µs`, `650 ns`.
fn human_per_goroutine(d: Duration) -> String {
    if d >= Duration::from_micros(10) {
        format!("{} µs", d.as_micros())
    } else {
        format!("{} ns", d.as_nanos())
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
    fn pprof_url_from_the_metrics_url_and_both_layouts_from_any_given_url() {
        assert_eq!(
            pprof_url_for("https://rancher:8443/metrics").as_deref(),
            Some("https://rancher:8443/debug/pprof/goroutine")
        );
        assert_eq!(
            pprof_url_for("http://127.0.0.1:80").as_deref(),
            Some("http://127.0.0.1:80/debug/pprof/goroutine")
        );
        assert_eq!(pprof_url_for("nonsense"), None);
        let p = GoroutineProfiler::new("http://h:1/debug/pprof/goroutine?debug=2".into());
        assert_eq!(p.profile_url, "http://h:1/debug/pprof/goroutine?debug=1");
        assert_eq!(p.dump_url, "http://h:1/debug/pprof/goroutine?debug=2");
        assert_eq!(
            with_debug("http://h/g?seconds=1&debug=0", 1),
            "http://h/g?seconds=1&debug=1"
        );
    }

    /// One goroutine as Go prints it in each layout: its frames (function, file:line) innermost first,
    /// the runtime's own frames included, as the runtime has them.
    struct G {
        frames: &'static [(&'static str, &'static str)],
        state: &'static str,
    }

    const IDLE_CONN: G = G {
        frames: &[
            ("runtime.gopark", "/usr/lib/go/src/runtime/proc.go:363"),
            ("runtime.selectgo", "/usr/lib/go/src/runtime/select.go:328"),
            (
                "net/http.(*persistConn).readLoop",
                "/usr/lib/go/src/net/http/transport.go:2213",
            ),
            ("runtime.goexit", "/usr/lib/go/src/runtime/asm_amd64.s:1594"),
        ],
        state: "select, 3 minutes",
    };
    const PIPE: G = G {
        frames: &[
            ("runtime.gopark", "/usr/lib/go/src/runtime/proc.go:363"),
            ("runtime.chanrecv", "/usr/lib/go/src/runtime/chan.go:583"),
            (
                "github.com/rancher/remotedialer.(*connection).Read",
                "/go/pkg/mod/github.com/rancher/remotedialer/connection.go:61",
            ),
            (
                "github.com/rancher/remotedialer.pipe.func2",
                "/go/pkg/mod/github.com/rancher/remotedialer/client_dialer.go:49",
            ),
            ("runtime.goexit", "/usr/lib/go/src/runtime/asm_amd64.s:1594"),
        ],
        state: "chan receive",
    };
    const MAIN: G = G {
        frames: &[
            ("runtime.gopark", "/usr/lib/go/src/runtime/proc.go:363"),
            ("runtime.Gosched", "/usr/lib/go/src/runtime/proc.go:320"),
            ("main.main", "/src/main.go:10"),
            ("runtime.main", "/usr/lib/go/src/runtime/proc.go:250"),
            ("runtime.goexit", "/usr/lib/go/src/runtime/asm_amd64.s:1594"),
        ],
        state: "IO wait",
    };

    /// `runtime.Stack(all)` at the default GOTRACEBACK: unexported runtime functions hidden.
    fn render_dump(gs: &[(&G, usize)]) -> String {
        let mut out = String::new();
        let mut id = 1;
        for (g, n) in gs {
            for _ in 0..*n {
                out += &format!("goroutine {id} [{}]:\n", g.state);
                for (f, at) in g.frames.iter().filter(|(f, _)| !is_unexported_runtime(f)) {
                    out += &format!("{f}(0xc000{id:x}, 0x1)\n\t{at} +0x1d5\n");
                }
                out += "created by main.main in goroutine 1\n\t/src/main.go:9 +0x25\n\n";
                id += 1;
            }
        }
        out
    }

    /// pprof's `printCountProfile` + `printStackRecord`: leading runtime frames and `runtime.goexit`
    /// hidden, columns aligned with tabs, most frequent stack first.
    fn render_profile(gs: &[(&G, usize)]) -> String {
        let total: usize = gs.iter().map(|(_, n)| n).sum();
        let mut out = format!("goroutine profile: total {total}\n");
        for (i, (g, n)) in gs.iter().enumerate() {
            let pcs: Vec<String> = (0..g.frames.len())
                .map(|j| format!("{:#x}", 0x43a0c5 + i * 0x100 + j))
                .collect();
            out += &format!("{n} @ {}\n", pcs.join(" "));
            let mut show = false;
            for (j, (f, at)) in g.frames.iter().enumerate() {
                if *f != "runtime.goexit" && (show || !f.starts_with("runtime.")) {
                    show = true;
                    out += &format!("#\t{}\t{f}+0xe5\t\t\t{at}\n", pcs[j]);
                }
            }
            out += "\n";
        }
        out
    }

    #[test]
    fn a_profile_and_a_dump_of_the_same_goroutines_give_the_same_stacks() {
        let gs = [(&IDLE_CONN, 7), (&PIPE, 3), (&MAIN, 1)];
        let dump = parse_goroutine_dump(&render_dump(&gs));
        let profile = parse_goroutine_profile(&render_profile(&gs)).expect("a profile");
        assert_eq!(dump.goroutines, 11);
        assert_eq!(profile.goroutines, 11);
        assert_eq!(profile.by_stack, dump.by_stack);
        assert_eq!(
            dump.by_stack.keys().collect::<Vec<_>>(),
            [
                "http.(*persistConn).readLoop",
                "main.main",
                "remotedialer.(*connection).Read <- remotedialer.pipe.func2",
            ]
        );
        // Only the dump has ages.
        assert!(profile.blocked_minutes.is_empty());
        assert_eq!(dump.blocked_minutes["http.(*persistConn).readLoop"][&3], 7);
    }

    #[test]
    fn a_profile_with_labels_and_unknown_frames_still_counts() {
        let text = "goroutine profile: total 5\n4 @ 0x1 0x2\n# labels: {\"k\":\"v\"}\n#\t0x1\n#\t0x2\tmain.worker+0x10\t/src/w.go:3\n\n1 @ 0x3\n#\t0x3\tmain.main+0x1\t/src/main.go:1\n\n";
        let p = parse_goroutine_profile(text).unwrap();
        assert_eq!(p.goroutines, 5);
        assert_eq!(p.by_stack["main.worker"], 4);
        assert_eq!(p.by_stack["main.main"], 1);
        assert_eq!(parse_goroutine_profile("<html>no</html>"), None);
        assert_eq!(
            parse_goroutine_profile(&dump(2)),
            None,
            "a dump is not a profile"
        );
    }

    #[test]
    fn a_dump_parsed_in_any_chunks_gives_the_whole_dump() {
        let text = render_dump(&[(&IDLE_CONN, 20), (&PIPE, 5)]) + &dump(9);
        let whole = parse_goroutine_dump(&text);
        for size in [1, 7, 64, 4096] {
            let mut p = DumpParser::default();
            for c in text.as_bytes().chunks(size) {
                p.feed(c);
            }
            assert_eq!(p.finish(), whole, "chunks of {size}");
        }
        // A cut dump counts whole blocks only.
        let mut p = DumpParser::default();
        p.feed(&text.as_bytes()[..text.len() - 40]);
        assert_eq!(p.complete_blocks().goroutines, whole.goroutines - 1);
    }
}
