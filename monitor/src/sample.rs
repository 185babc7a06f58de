//! Samples: what each source saw at one instant. Sources produce them, analysis consumes them; nothing in
//! here does I/O, so recorded series can be replayed into the analysis in unit tests.
use serde::{Deserialize, Serialize};

/// Seconds since the watch started, from a monotonic clock.
pub type Seconds = f64;

/// Identity of one incarnation of the target process: a restart changes `start_ticks` (and usually `pid`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TargetId {
    pub pid: u32,
    /// Process start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
}

macro_rules! define_kernel_counters {
    ($(($konst:ident, $field:ident, $index:literal, $export:ident $(($table:literal))?, $help:literal);)*) => {
        /// Cumulative in-kernel counters (summed over CPUs) since the probes were attached: one field per
        /// row of `monitor_ebpf::with_counters`.
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct KernelCounters {
            $(#[doc = $help] pub $field: u64,)*
        }

        impl KernelCounters {
            /// Builds the counters from a reader of the kernel's counter array.
            pub fn from_indexed(get: impl Fn(u32) -> u64) -> Self {
                Self { $($field: get(monitor_ebpf::counter::$konst),)* }
            }

            /// Every counter with its row of the table, in index order.
            pub fn iter(&self) -> impl Iterator<Item = (&'static monitor_ebpf::CounterDef, u64)> {
                monitor_ebpf::counter::SCALARS.iter().zip([$(self.$field),*])
            }
        }
    };
}
monitor_ebpf::with_counters!(define_kernel_counters);

/// What the eBPF probes say about the target.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelSample {
    pub counters: KernelCounters,
    /// TCP sockets of the target alive in the kernel (the live socket table, fed by the ring buffer).
    pub live_sockets: u64,
    /// Live sockets per TCP state, indexed by the kernel's state number (0 unused).
    pub sockets_by_state: [u64; 13],
    /// Live sockets that came from `accept` on one of the target's listeners (callers, on a tunnel server).
    pub accepted_live: u64,
    /// Live sockets the target connected out (targets, on a tunnel agent).
    pub connected_live: u64,
    /// Connections opened since attach: sockets seen being connected or accepted. A socket from before the
    /// probes, first seen when it closes, is not an opening: counting it would read a wave of old
    /// connections going away as load.
    #[serde(default)]
    pub opened: u64,
    /// CLOSE_WAIT sockets grouped by peer (from the socket table), most first, capped: who hung up on
    /// sockets the process never closed.
    #[serde(default)]
    pub close_wait_peers: Vec<(String, u64)>,
    /// At the last full procfs pass: procfs' count minus eBPF's, for the states procfs is the truth of
    /// (sockets the process holds an fd for). Sockets opened before the probes were attached make it
    /// positive; a transition the probes missed makes it negative. `sockets_by_state` is already
    /// corrected by it.
    #[serde(default)]
    pub procfs_disagreement: Vec<(String, i64)>,
}

impl KernelSample {
    pub fn in_state(&self, state: u8) -> u64 {
        self.sockets_by_state
            .get(state as usize)
            .copied()
            .unwrap_or(0)
    }
}

/// Upper bounds (exclusive) of the idle-age buckets, in ms; the last bucket holds everything older. 90 s is
/// Go's default `IdleConnTimeout`: a pooled connection of a healthy Go client never gets past the 90 s
/// bucket. 60 s is the unanswered rule's default patience: a threshold between two bounds rounds up to the
/// next, so without it a 60 s patience would wait until 90 s.
pub const IDLE_BUCKET_BOUNDS_MS: [u32; 6] = [10_000, 30_000, 60_000, 90_000, 300_000, 1_800_000];
pub const IDLE_BUCKETS: usize = IDLE_BUCKET_BOUNDS_MS.len() + 1;
/// Names of the buckets, for labels and reports, in the order of [`RemoteIdle::buckets`]: `lt_<bound>`,
/// then `ge_<last bound>` (a test holds them to the bounds).
pub const IDLE_BUCKET_LABELS: [&str; IDLE_BUCKETS] = [
    "lt_10s", "lt_30s", "lt_60s", "lt_90s", "lt_5m", "lt_30m", "ge_30m",
];

/// The name of the row that `sources::sockdiag::idle_by_remote` folds the groups beyond its cap into.
pub const OTHER_REMOTE: &str = "_other";

/// Idle ages of the ESTABLISHED sockets to one remote address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteIdle {
    /// `ip:port` (IPv4-mapped IPv6 addresses written as IPv4), or [`OTHER_REMOTE`] for the folded tail.
    pub remote: String,
    pub established: u64,
    /// Counted apart and left out of the ages: a CLOSE_WAIT socket is the peer's hang-up waiting on the
    /// process, a different leak with its own verdict.
    pub close_wait: u64,
    /// ESTABLISHED sockets idle for strictly longer than the horizon.
    pub idle_over_horizon: u64,
    /// The largest idle age among the ESTABLISHED sockets (0 when there are none).
    pub oldest_idle_ms: u32,
    /// ESTABLISHED sockets per idle-age bucket ([`IDLE_BUCKET_BOUNDS_MS`]).
    #[serde(deserialize_with = "idle_counts")]
    pub buckets: [u64; IDLE_BUCKETS],
    /// ESTABLISHED sockets that sent data and have not received one byte back since they were
    /// established, per bucket of time since they last sent: requests the target never began to answer.
    /// An idle pooled connection got its answer, and a watch got its headers: neither is counted.
    #[serde(default, deserialize_with = "idle_counts")]
    pub unanswered: [u64; IDLE_BUCKETS],
    /// The longest of those waits (0 when there are none).
    #[serde(default)]
    pub oldest_unanswered_ms: u32,
}

/// The bounds before the 60 s one was added. Recordings made then still replay (`leakwatch replay`).
const IDLE_BUCKET_BOUNDS_MS_BEFORE_60S: [u32; 5] = [10_000, 30_000, 90_000, 300_000, 1_800_000];

/// Bucket counts in the current layout, or in the one before the 60 s bound. Each old count goes to the new
/// bucket holding its old lower bound: an old 30-90 s count is only known to be at least 30 s old, so it
/// lands in 30-60 s and never passes a 60 s threshold it might not have reached.
fn idle_counts<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u64; IDLE_BUCKETS], D::Error> {
    let counts = Vec::<u64>::deserialize(d)?;
    if let Ok(now) = <[u64; IDLE_BUCKETS]>::try_from(counts.as_slice()) {
        return Ok(now);
    }
    if counts.len() != IDLE_BUCKET_BOUNDS_MS_BEFORE_60S.len() + 1 {
        return Err(serde::de::Error::invalid_length(
            counts.len(),
            &"one count per idle-age bucket",
        ));
    }
    let mut out = [0; IDLE_BUCKETS];
    for (i, n) in counts.into_iter().enumerate() {
        let floor = i
            .checked_sub(1)
            .map_or(0, |j| IDLE_BUCKET_BOUNDS_MS_BEFORE_60S[j]);
        let to = IDLE_BUCKET_BOUNDS_MS
            .iter()
            .position(|&bound| floor < bound)
            .unwrap_or(IDLE_BUCKET_BOUNDS_MS.len());
        out[to] += n;
    }
    Ok(out)
}

/// The lower bound (inclusive) of idle-age bucket `i`, ms.
pub fn idle_bucket_floor_ms(i: usize) -> u32 {
    i.checked_sub(1)
        .and_then(|j| IDLE_BUCKET_BOUNDS_MS.get(j))
        .copied()
        .unwrap_or(0)
}

impl RemoteIdle {
    /// Unanswered sockets whose wait is surely at least `at_least_ms`: the buckets whose lower bound reaches
    /// it (a threshold between two bounds rounds up to the next one).
    pub fn unanswered_for(&self, at_least_ms: u32) -> u64 {
        self.unanswered
            .iter()
            .enumerate()
            .filter(|(i, _)| idle_bucket_floor_ms(*i) >= at_least_ms)
            .map(|(_, n)| n)
            .sum()
    }
}

/// What procfs says about the target.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcSample {
    pub open_fds: u64,
    /// Soft "Max open files" limit; `None` when unlimited or unreadable.
    pub fd_limit: Option<u64>,
    pub socket_fds: u64,
    /// The target's TCP sockets (socket fds joined with /proc/<pid>/net/tcp{,6}) per state.
    pub tcp_by_state: [u64; 13],
    pub threads: u64,
    pub rss_bytes: u64,
    /// Seconds since the target started; `None` where unknown (recordings made before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_s: Option<f64>,
    /// Idle ages of the ESTABLISHED sockets the target dialed (not accepted), per remote address, from
    /// the kernel's tcp_info (sock_diag), taken with the full procfs pass; empty when unavailable.
    #[serde(default)]
    pub dialed_idle: Vec<RemoteIdle>,
    /// The idle horizon `dialed_idle` counts against, seconds (0 when not measured).
    #[serde(default)]
    pub dialed_idle_horizon_s: f64,
}

impl ProcSample {
    pub fn tcp_in_state(&self, state: u8) -> u64 {
        self.tcp_by_state.get(state as usize).copied().unwrap_or(0)
    }
    pub fn tcp_total(&self) -> u64 {
        self.tcp_by_state.iter().sum()
    }
}

/// The clientkey of the ledger row that the scraper sums the rows beyond its cap into. The rows in it change
/// as the ledger grows (which rows fit under the cap follows the exposition's order), so it counts in the
/// totals but is never judged as one row.
pub const OTHER_CLIENTKEY: &str = "_other";

/// One row of remotedialer's connection ledger: cumulative add/remove counters for one label set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LedgerRow {
    pub clientkey: String,
    pub proto: String,
    pub addr: String,
    pub added: f64,
    pub removed: f64,
}

/// One row of the websocket-session ledger (per clientkey and peer).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionRow {
    pub clientkey: String,
    pub peer: String,
    pub added: f64,
    pub removed: f64,
}

/// What the target's own /metrics said.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AppSample {
    /// The connection ledger, one row per (clientkey, proto, addr), capped by the scraper.
    pub ledger: Vec<LedgerRow>,
    pub sessions: Vec<SessionRow>,
    /// Whether any remotedialer `session_server_*` series were present.
    pub remotedialer_present: bool,
    /// Rows dropped because the label-cardinality cap was reached.
    pub ledger_rows_dropped: u64,
    pub goroutines: Option<f64>,
    pub heap_inuse_bytes: Option<f64>,
    pub threads: Option<f64>,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
}

/// Outcome of one scrape: a sample, or why there is none (never mistaken for a leak).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ScrapeOutcome {
    Ok(AppSample),
    Failed {
        /// What kind of failure, the `reason` label of `leakwatch_app_scrape_errors_total`. Recordings made
        /// before the class was recorded read as [`ScrapeErrorClass::Other`].
        #[serde(default)]
        class: ScrapeErrorClass,
        reason: String,
    },
    NotConfigured,
}

/// Why a scrape produced no sample, as a closed set (one metric label value each).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScrapeErrorClass {
    Connect,
    Timeout,
    Status,
    TooLarge,
    Parse,
    Token,
    #[default]
    Other,
}

impl ScrapeErrorClass {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Status => "status",
            Self::TooLarge => "too_large",
            Self::Parse => "parse",
            Self::Token => "token",
            Self::Other => "other",
        }
    }
}

/// What the target's goroutine profiles said at one tick. Read only when the analysis asked for it (a
/// task-growth verdict wants stacks, a server's idle verdict wants ages), and recorded with the snapshot,
/// so that `replay` attaches the evidence `watch` attached.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GoroutineReading {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub growth: Option<StackGrowth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ages: Option<AgeReading>,
}

/// What the analysis wants read from the target's goroutine profiles after a tick. The profiler bounds
/// how often and how much each read costs the target; asking is free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvidenceWanted {
    /// The stacks that grew since the baseline (a task-growth verdict was just raised).
    pub stacks: bool,
    /// Connection goroutines blocked for this many whole minutes or more (a server's idle verdict was
    /// just raised, or is active and not yet confirmed: ages only grow, so a later look may confirm it).
    pub ages_min_minutes: Option<u64>,
    /// The target's start-up just ended: the stacks it grew while starting are no growth of a leak, so
    /// stack growth is measured from a baseline taken now.
    pub new_baseline: bool,
}

/// The goroutine stacks that grew since the baseline (aggregated profile), most grown first, or why
/// they could not be read.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StackGrowth {
    pub top: Vec<(String, i64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What a look at connection ages (the full dump) found, for a server's idle-connection verdict.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgeReading {
    /// Goroutines blocked this many whole minutes or more were counted (Go rounds ages down).
    pub min_minutes: u64,
    /// Whether a dump was read (false: skipped or failed; `note` says why).
    pub read: bool,
    /// Connection goroutines blocked for `min_minutes` or more, total and per stack (most first).
    pub total: u64,
    pub per_stack: Vec<(String, u64)>,
    /// Why the dump was skipped, failed or was cut short (its counts are then a lower bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl AgeReading {
    /// A reading that confirms: a dump was read and it found connection goroutines past the horizon.
    pub fn confirmed(&self) -> bool {
        self.read && self.total > 0
    }
}

/// Everything known at one instant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub t: Seconds,
    /// Wall-clock time (Unix seconds), for reports.
    pub unix: f64,
    /// `None` while the target is not running.
    pub target: Option<TargetId>,
    /// `None` in procfs-only mode.
    pub kernel: Option<KernelSample>,
    pub proc: Option<ProcSample>,
    pub app: ScrapeOutcome,
    /// Goroutine profiles, on the ticks the analysis asked for them (see [`GoroutineReading`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub goroutines: Option<GoroutineReading>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_labels_name_their_bounds() {
        let name = |ms: u32| match ms {
            ms if ms % 60_000 == 0 && ms > 60_000 => format!("{}m", ms / 60_000),
            ms => format!("{}s", ms / 1000),
        };
        let mut want: Vec<String> = IDLE_BUCKET_BOUNDS_MS
            .iter()
            .map(|&b| format!("lt_{}", name(b)))
            .collect();
        want.push(format!(
            "ge_{}",
            name(*IDLE_BUCKET_BOUNDS_MS.last().unwrap())
        ));
        assert_eq!(IDLE_BUCKET_LABELS.to_vec(), want);
    }

    #[test]
    fn a_row_recorded_before_the_60s_bound_replays_without_overstating_a_wait() {
        let old = r#"{"remote":"10.0.0.5:80","established":9,"close_wait":0,"idle_over_horizon":0,
            "oldest_idle_ms":80000,"buckets":[1,2,3,0,0,0],"unanswered":[0,0,4,1,0,2],"oldest_unanswered_ms":0}"#;
        let g: RemoteIdle = serde_json::from_str(old).unwrap();
        assert_eq!(g.buckets, [1, 2, 3, 0, 0, 0, 0]);
        assert_eq!(g.unanswered, [0, 0, 4, 0, 1, 0, 2]);
        // The four that waited 30-90 s may not have reached 60 s.
        assert_eq!(g.unanswered_for(60_000), 3);
        assert_eq!(g.unanswered_for(30_000), 7);
        let now: RemoteIdle = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(now, g);
        let torn = old.replace("[1,2,3,0,0,0]", "[1,2,3]");
        assert!(serde_json::from_str::<RemoteIdle>(&torn).is_err());
    }
}
