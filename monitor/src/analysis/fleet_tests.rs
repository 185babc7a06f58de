//! The analysis on a Rancher-shaped server: many clusters (a ledger row each), each with its own kind of
//! transport, beside hundreds of accepted sockets that are nobody's tunneled connection. One snapshot per
//! second, replayed through the same [`Analyzer`] the sidecar runs.
use monitor_ebpf::tcp_state::ESTABLISHED;

use super::*;
use crate::sample::{AppSample, KernelSample, LedgerRow, ProcSample, RemoteIdle, ScrapeOutcome};

/// How one cluster's proxied requests reach it.
#[derive(Clone, Copy)]
enum Transport {
    /// A new keep-alive pool per request: the connection stays, idle, until the timeout (v2.10.5:
    /// 90 s) or forever (v2.10.3: none).
    PerRequest { idle_timeout: Option<f64> },
    /// One pool for the cluster, its idle connections reused (most recent first) and closed after the
    /// timeout, if any (Go's `&http.Transport{}` has none).
    Shared { idle_timeout: Option<f64> },
}

/// One ledger row: a cluster's connections to one addr.
struct Row {
    clientkey: String,
    addr: String,
    transport: Transport,
    /// Per open connection: when it was last used.
    idle_since: Vec<f64>,
    added: f64,
    removed: f64,
}

impl Row {
    fn new(clientkey: &str, addr: &str, transport: Transport) -> Self {
        Self {
            clientkey: clientkey.into(),
            addr: addr.into(),
            transport,
            idle_since: Vec::new(),
            added: 0.0,
            removed: 0.0,
        }
    }

    /// One second at `t`: `n` requests.
    fn tick(&mut self, t: f64, n: u64) {
        let (timeout, shared) = match self.transport {
            Transport::PerRequest { idle_timeout } => (idle_timeout, false),
            Transport::Shared { idle_timeout } => (idle_timeout, true),
        };
        if let Some(timeout) = timeout {
            let before = self.idle_since.len();
            self.idle_since.retain(|&since| t - since < timeout);
            self.removed += (before - self.idle_since.len()) as f64;
        }
        // Requests in the same second run at once: a shared pool reuses what was idle before them.
        let idle_before = self.idle_since.len();
        for i in 0..n as usize {
            if shared && i < idle_before {
                self.idle_since.sort_by(f64::total_cmp);
                self.idle_since.pop();
            } else {
                self.added += 1.0;
            }
        }
        self.idle_since.extend(std::iter::repeat_n(t, n as usize));
    }

    fn ledger(&self) -> LedgerRow {
        LedgerRow {
            clientkey: self.clientkey.clone(),
            proto: "tcp".into(),
            addr: self.addr.clone(),
            added: self.added,
            removed: self.removed,
        }
    }
}

/// A tunnel server holding `rows`, with `callers` accepted sockets that are no tunneled connection's
/// (agents' websockets, UI and kubectl clients idling on keep-alive, watches' callers).
struct Fleet {
    t: f64,
    rows: Vec<Row>,
    callers: u64,
    /// Tasks that are no connection's (controllers, informers), and the process's age if known.
    other_tasks: f64,
    age: Option<f64>,
}

impl Default for Fleet {
    fn default() -> Self {
        Self {
            t: 0.0,
            rows: Vec::new(),
            callers: 0,
            other_tasks: 400.0,
            age: None,
        }
    }
}

impl Fleet {
    fn snapshot(&self) -> Snapshot {
        let live: usize = self.rows.iter().map(|r| r.idle_since.len()).sum();
        let mut by_state = [0u64; 13];
        by_state[ESTABLISHED as usize] = self.callers;
        Snapshot {
            t: self.t,
            unix: 1.7e9 + self.t,
            target: Some(TargetId {
                pid: 100,
                start_ticks: 1,
            }),
            kernel: Some(KernelSample {
                live_sockets: self.callers,
                sockets_by_state: by_state,
                accepted_live: self.callers,
                ..KernelSample::default()
            }),
            proc: Some(ProcSample {
                open_fds: 20 + self.callers,
                fd_limit: Some(1 << 20),
                socket_fds: self.callers,
                tcp_by_state: by_state,
                threads: 12,
                rss_bytes: 300 << 20,
                age_s: self.age.map(|a| a + self.t),
                ..ProcSample::default()
            }),
            app: ScrapeOutcome::Ok(AppSample {
                ledger: self.rows.iter().map(Row::ledger).collect(),
                remotedialer_present: true,
                goroutines: Some(self.other_tasks + self.callers as f64 + 2.0 * live as f64),
                heap_inuse_bytes: Some(20.0 * 1048576.0 + live as f64 * 40_000.0),
                ..AppSample::default()
            }),
            goroutines: None,
        }
    }

    /// Replays `secs` seconds; `load(row, second)` gives the row's requests in that second.
    fn replay(
        &mut self,
        an: &mut Analyzer,
        secs: u32,
        load: impl Fn(usize, u32) -> u64,
    ) -> Vec<Verdict> {
        self.replay_with(an, secs, load, |_, _| {})
    }

    /// The same, letting `step(fleet, second)` change the rest of the process before each second.
    fn replay_with(
        &mut self,
        an: &mut Analyzer,
        secs: u32,
        load: impl Fn(usize, u32) -> u64,
        mut step: impl FnMut(&mut Fleet, u32),
    ) -> Vec<Verdict> {
        let mut raised = Vec::new();
        for i in 0..secs {
            self.t += 1.0;
            step(self, i);
            let t = self.t;
            for (k, row) in self.rows.iter_mut().enumerate() {
                row.tick(t, load(k, i));
            }
            for c in an.observe(&self.snapshot()) {
                if let VerdictChange::Raised(v) = c {
                    raised.push(v);
                }
            }
        }
        raised
    }
}

const FIX: Transport = Transport::PerRequest {
    idle_timeout: Some(90.0),
};
const BUG: Transport = Transport::PerRequest { idle_timeout: None };

/// 50 clusters on the fix, each a burst of 10 requests every 47 s (phase by cluster), and cluster
/// `c-bug` on v2.10.3's transport.
fn fifty_fixed_and_one_bug(callers: u64) -> Fleet {
    let mut rows: Vec<Row> = (0..50)
        .map(|k| Row::new(&format!("c-{k:02}"), "127.0.0.1:6080", FIX))
        .collect();
    rows.push(Row::new("c-bug", "127.0.0.1:6080", BUG));
    Fleet {
        rows,
        callers,
        ..Fleet::default()
    }
}

/// Bursts of 10 requests: with the fix's pools holding each connection (and its 40 KB of buffers) for
/// 90 s, 50 clusters move the heap by tens of MiB.
fn fix_bursts(k: usize, i: u32) -> u64 {
    if (i + 7 * k as u32).is_multiple_of(47) {
        10
    } else {
        0
    }
}

#[test]
fn a_leak_on_one_cluster_is_named_alone_through_fifty_healthy_ones_and_200_unrelated_callers() {
    let mut an = Analyzer::new(AnalysisConfig::default());
    let mut fleet = fifty_fixed_and_one_bug(200);
    let first_request = 30;
    // The bug at 0.5 requests/s from second 30.
    let raised = fleet.replay(&mut an, 400, |k, i| match k {
        50 => u64::from(i >= first_request && i % 2 == 0),
        k => fix_bursts(k, i),
    });
    let idle: Vec<&Verdict> = raised
        .iter()
        .filter(|v| v.kind == VerdictKind::IdleConnectionLeak)
        .collect();
    assert_eq!(idle.len(), 1, "{raised:#?}");
    let v = idle[0];
    assert_eq!(v.subject, "clientkey=c-bug proto=tcp addr=127.0.0.1:6080");
    let after = v.since - f64::from(first_request);
    assert!(after <= 150.0, "raised {after}s after the first request");
    assert!(
        v.evidence["app.idle_beyond_horizon[clientkey=c-bug proto=tcp addr=127.0.0.1:6080]"] > 5.0
    );
    // The count is in the evidence, not in the subject, which stays the same as the leak grows.
    let now = an
        .active()
        .into_iter()
        .find(|v| v.kind == VerdictKind::IdleConnectionLeak)
        .expect("still active");
    assert_eq!(now.subject, v.subject);
    // Nothing else: the heap the fix's bursts lift stays up for its pools' idle timeout, and the leak's
    // own connections are too few to show in it.
    let others: Vec<_> = raised
        .iter()
        .filter(|v| v.kind != VerdictKind::IdleConnectionLeak)
        .collect();
    assert!(others.is_empty(), "{others:#?}");
}

#[test]
fn the_same_fleet_without_the_bug_raises_nothing_in_ten_minutes() {
    let mut an = Analyzer::new(AnalysisConfig::default());
    let mut fleet = fifty_fixed_and_one_bug(200);
    fleet.rows.pop();
    let raised = fleet.replay(&mut an, 600, fix_bursts);
    assert!(raised.is_empty(), "{raised:#?}");
}

#[test]
fn a_shared_pool_without_idle_timeout_over_twenty_addrs_is_a_bounded_set() {
    let mut an = Analyzer::new(AnalysisConfig::default());
    // Go's `&http.Transport{}`: 20 addrs of one cluster, 2 requests at once on each, then a request now
    // and then that reuses a pooled connection; nothing ever closes.
    let rows = (0..20)
        .map(|a| {
            Row::new(
                "c-2",
                &format!("10.0.0.{a}:8440"),
                Transport::Shared { idle_timeout: None },
            )
        })
        .collect();
    let mut fleet = Fleet {
        rows,
        callers: 150,
        ..Fleet::default()
    };
    let raised = fleet.replay(&mut an, 720, |a, i| match i {
        5 => 2,
        i if i > 5 && (i + a as u32).is_multiple_of(97) => 1,
        _ => 0,
    });
    assert!(raised.is_empty(), "{raised:#?}");
    // Forty connections older than the horizon, none of them a leak.
    assert_eq!(an.signals().old_open.last(), Some(40.0));
    assert_eq!(an.derived().idle_beyond_horizon, Some(0.0));
}

#[test]
fn a_pool_that_fills_in_one_burst_and_stays_is_not_a_leak_but_one_that_keeps_growing_is() {
    // 60 connections at once on a pool with no idle timeout (60 watches, or a pool a burst filled):
    // a step, then nothing. The same row then opening 1 more a second keeps climbing.
    let shared = Transport::Shared { idle_timeout: None };
    let mut an = Analyzer::new(AnalysisConfig::default());
    let mut fleet = Fleet {
        rows: vec![Row::new("c-1", "127.0.0.1:6443", shared)],
        callers: 100,
        ..Fleet::default()
    };
    let raised = fleet.replay(&mut an, 400, |_, i| if i == 20 { 60 } else { 0 });
    assert!(raised.is_empty(), "{raised:#?}");
    // Now requests that all arrive while the pool is busy (a per-request transport on the same addr).
    fleet.rows[0].transport = BUG;
    let raised = fleet.replay(&mut an, 200, |_, _| 1);
    let v = raised
        .iter()
        .find(|v| v.kind == VerdictKind::IdleConnectionLeak)
        .unwrap_or_else(|| panic!("no idle verdict: {raised:#?}"));
    assert_eq!(v.subject, "clientkey=c-1 proto=tcp addr=127.0.0.1:6443");
}

#[test]
fn watches_held_through_bursts_are_load_that_has_not_ended() {
    // 50 watches (a connection each through the tunnel, its caller's socket accepted) opened at 30 s and
    // held 15 minutes, while bursts of ordinary requests on the fix come and go on 20 clusters.
    let mut rows: Vec<Row> = (0..20)
        .map(|k| Row::new(&format!("c-{k:02}"), "127.0.0.1:6080", FIX))
        .collect();
    rows.push(Row::new(
        "c-watch",
        "127.0.0.1:6443",
        Transport::PerRequest { idle_timeout: None },
    ));
    let mut an = Analyzer::new(AnalysisConfig::default());
    let mut fleet = Fleet {
        rows,
        callers: 120,
        other_tasks: 2000.0,
        ..Fleet::default()
    };
    let raised = fleet.replay_with(
        &mut an,
        960,
        |k, i| match k {
            20 => u64::from(i == 30) * 50,
            k if i % 120 < 20 => fix_bursts(k, i) * 2,
            _ => 0,
        },
        |f, i| {
            if i == 30 {
                f.callers += 50;
            }
            // A process of 2,000 goroutines moves by a few dozen on its own.
            f.other_tasks = 2000.0 + f64::from((i * 37) % 61) - 30.0;
        },
    );
    assert!(raised.is_empty(), "{raised:#?}");
}

#[test]
fn a_start_up_of_3000_tasks_is_no_leak_and_a_goroutine_leak_five_minutes_later_is_found() {
    // The sidecar starts with the target: 3,000 controller tasks over 60 s, 100 agents joining in the
    // first 40 s, light traffic through the fix; at 300 s a goroutine leak of 2 tasks/s begins.
    let rows: Vec<Row> = (0..10)
        .map(|k| Row::new(&format!("c-{k:02}"), "127.0.0.1:6080", FIX))
        .collect();
    let mut an = Analyzer::new(AnalysisConfig::default());
    // The sidecar is up first: 20 s of ticks that find no target (no procfs, no metrics).
    for t in 1..=20 {
        let nothing = Snapshot {
            t: f64::from(t) - 20.0,
            unix: 1.7e9,
            target: None,
            kernel: None,
            proc: None,
            app: ScrapeOutcome::NotConfigured,
            goroutines: None,
        };
        assert!(an.observe(&nothing).is_empty());
    }
    let mut fleet = Fleet {
        rows,
        other_tasks: 20.0,
        age: Some(0.0),
        ..Fleet::default()
    };
    let leak_at = 300;
    let raised = fleet.replay_with(
        &mut an,
        420,
        |k, i| u64::from(i % 10 == k as u32),
        |f, i| {
            let ramp = 3000.0 * (f64::from(i) / 60.0).min(1.0);
            let leak = 2.0 * f64::from(i.saturating_sub(leak_at));
            f.other_tasks = 20.0 + ramp + leak;
            f.callers = u64::from(i.min(40) * 100 / 40) + 2;
        },
    );
    let before: Vec<_> = raised
        .iter()
        .filter(|v| v.since < f64::from(leak_at))
        .collect();
    assert!(before.is_empty(), "{before:#?}");
    let v = raised
        .iter()
        .find(|v| v.kind == VerdictKind::TaskGrowth)
        .unwrap_or_else(|| panic!("the later goroutine leak: {raised:#?}"));
    let after = v.since - f64::from(leak_at);
    assert!(after <= 60.0, "found {after}s after it began");
    assert!(
        v.explanation.contains("not explained by connections"),
        "{}",
        v.explanation
    );
}

#[test]
fn a_goroutine_leak_from_the_first_second_is_found_once_start_up_is_over() {
    // A target that never settles: tasks rise 5/s from birth with no connection behind them.
    let mut an = Analyzer::new(AnalysisConfig::default());
    let mut fleet = Fleet {
        other_tasks: 20.0,
        age: Some(0.0),
        ..Fleet::default()
    };
    let raised = fleet.replay_with(
        &mut an,
        300,
        |_, _| 0,
        |f, i| f.other_tasks = 20.0 + 5.0 * f64::from(i),
    );
    let v = raised
        .iter()
        .find(|v| v.kind == VerdictKind::TaskGrowth)
        .unwrap_or_else(|| panic!("no task growth: {raised:#?}"));
    let startup_s = AnalysisConfig::default().startup_s;
    assert!(
        (startup_s..=startup_s + 5.0).contains(&v.since),
        "raised at {}s",
        v.since
    );
}

/// The agent's view of one target: sockets idle past the horizon, as sock_diag groups them.
fn idle_group(remote: &str, established: u64, idle_over_horizon: u64) -> RemoteIdle {
    RemoteIdle {
        remote: remote.into(),
        established,
        idle_over_horizon,
        oldest_idle_ms: 200_000,
        ..RemoteIdle::default()
    }
}

/// An agent (no ledger) whose full procfs pass, every 5 s, reads `groups(second)`.
fn agent_replay(secs: u32, groups: impl Fn(u32) -> Vec<RemoteIdle>) -> Vec<Verdict> {
    let mut an = Analyzer::new(AnalysisConfig {
        side: Side::Agent,
        ..AnalysisConfig::default()
    });
    let mut raised = Vec::new();
    let mut seen = Vec::new();
    for i in 0..secs {
        let t = f64::from(i + 1);
        if i % 5 == 0 {
            seen = groups(i);
        }
        let established: u64 = seen.iter().map(|g| g.established).sum();
        let mut by_state = [0u64; 13];
        by_state[ESTABLISHED as usize] = established + 1;
        let snap = Snapshot {
            t,
            unix: 1.7e9 + t,
            target: Some(TargetId {
                pid: 200,
                start_ticks: 1,
            }),
            kernel: Some(KernelSample {
                live_sockets: established + 1,
                sockets_by_state: by_state,
                connected_live: established + 1,
                ..KernelSample::default()
            }),
            proc: Some(ProcSample {
                open_fds: 10 + established,
                socket_fds: established + 1,
                tcp_by_state: by_state,
                threads: 8,
                dialed_idle: seen.clone(),
                dialed_idle_horizon_s: 105.0,
                ..ProcSample::default()
            }),
            app: ScrapeOutcome::NotConfigured,
            goroutines: None,
        };
        for c in an.observe(&snap) {
            if let VerdictChange::Raised(v) = c {
                raised.push(v);
            }
        }
    }
    raised
}

#[test]
fn an_agent_pool_of_two_idle_per_target_over_twenty_targets_and_other_raises_nothing() {
    // 20 targets with 2 idle pooled sockets each once they age past the horizon, and the remotes past
    // the grouping cap folded into `_other`, whose count changes as remotes come and go.
    let raised = agent_replay(720, |i| {
        let old = if i > 110 { 2 } else { 0 };
        let mut g: Vec<RemoteIdle> = (0..20)
            .map(|a| idle_group(&format!("10.0.0.{a}:8440"), 2, old))
            .collect();
        g.push(idle_group(
            crate::sample::OTHER_REMOTE,
            40,
            u64::from(i / 20),
        ));
        g
    });
    assert!(raised.is_empty(), "{raised:#?}");
}

#[test]
fn an_agent_target_whose_idle_sockets_keep_climbing_is_named() {
    // One request every 2 s to 127.0.0.1:6080, each leaving its socket idle; 20 other targets hold 2.
    let raised = agent_replay(400, |i| {
        let mut g: Vec<RemoteIdle> = (0..20)
            .map(|a| idle_group(&format!("10.0.0.{a}:8440"), 2, 2))
            .collect();
        let opened = u64::from(i / 2);
        g.push(idle_group(
            "127.0.0.1:6080",
            opened.max(1),
            u64::from(i.saturating_sub(105) / 2),
        ));
        g
    });
    let v = raised
        .iter()
        .find(|v| v.kind == VerdictKind::IdleConnectionLeak)
        .unwrap_or_else(|| panic!("no idle verdict: {raised:#?}"));
    assert_eq!(v.subject, "target=127.0.0.1:6080");
    assert!(v.since <= 150.0, "raised at {}s", v.since);
}
