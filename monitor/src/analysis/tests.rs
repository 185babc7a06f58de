//! The analysis on recorded-style series: one snapshot per second, built the way the collector builds them,
//! replayed through the same [`Analyzer`] the sidecar runs.
use monitor_ebpf::tcp_state::{CLOSE_WAIT, ESTABLISHED};

use super::*;
use crate::sample::{AppSample, KernelSample, LedgerRow, ProcSample, ScrapeOutcome};

/// The state of a simulated tunnel server at one instant.
#[derive(Clone)]
struct Tunnel {
    t: f64,
    pid: u32,
    start_ticks: u64,
    added: f64,
    removed: f64,
    /// Sockets accepted from callers, alive in the kernel (incl. the agent's websocket and the scrape).
    accepted: u64,
    established: u64,
    close_wait: u64,
    fds: u64,
    fd_limit: u64,
    threads: u64,
    goroutines: f64,
    heap: f64,
    scrape_ok: bool,
}

impl Tunnel {
    fn new() -> Self {
        Self {
            t: 0.0,
            pid: 100,
            start_ticks: 1,
            added: 0.0,
            removed: 0.0,
            accepted: 2,
            established: 2,
            close_wait: 0,
            fds: 20,
            fd_limit: 1024,
            threads: 4,
            goroutines: 12.0,
            heap: 8.0 * 1048576.0,
            scrape_ok: true,
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut by_state = [0u64; 13];
        by_state[ESTABLISHED as usize] = self.established;
        by_state[CLOSE_WAIT as usize] = self.close_wait;
        let app = if self.scrape_ok {
            ScrapeOutcome::Ok(AppSample {
                ledger: vec![LedgerRow {
                    clientkey: "downstream-1".into(),
                    proto: "tcp".into(),
                    addr: "127.0.0.1:8080".into(),
                    added: self.added,
                    removed: self.removed,
                }],
                remotedialer_present: true,
                goroutines: Some(self.goroutines),
                heap_inuse_bytes: Some(self.heap),
                ..AppSample::default()
            })
        } else {
            ScrapeOutcome::Failed {
                reason: "connect: connection refused".into(),
            }
        };
        Snapshot {
            t: self.t,
            unix: 1.7e9 + self.t,
            target: Some(TargetId {
                pid: self.pid,
                start_ticks: self.start_ticks,
            }),
            kernel: Some(KernelSample {
                live_sockets: self.established + self.close_wait,
                sockets_by_state: by_state,
                accepted_live: self.accepted,
                // On the agent side, the dialed backend is who hangs up.
                close_wait_peers: if self.close_wait > 0 {
                    vec![("127.0.0.1:8080".to_string(), self.close_wait)]
                } else {
                    Vec::new()
                },
                ..KernelSample::default()
            }),
            proc: Some(ProcSample {
                open_fds: self.fds,
                fd_limit: Some(self.fd_limit),
                socket_fds: self.established + self.close_wait,
                tcp_by_state: by_state,
                threads: self.threads,
                rss_bytes: 30 << 20,
            }),
            app,
        }
    }
}

/// Replays `secs` one-second ticks, letting `step` change the tunnel before each, and returns every
/// change with the time it happened.
fn replay(
    an: &mut Analyzer,
    tun: &mut Tunnel,
    secs: u32,
    mut step: impl FnMut(&mut Tunnel, u32),
) -> Vec<VerdictChange> {
    let mut out = Vec::new();
    for i in 0..secs {
        tun.t += 1.0;
        step(tun, i);
        out.extend(an.observe(&tun.snapshot()));
    }
    out
}

fn raised(changes: &[VerdictChange]) -> Vec<(VerdictKind, f64)> {
    changes
        .iter()
        .filter_map(|c| match c {
            VerdictChange::Raised(v) => Some((v.kind, v.since)),
            _ => None,
        })
        .collect()
}

/// A healthy request: the caller connects, the tunneled connection is added, then removed and closed.
/// `n` requests per second with `inflight` of them open at the sampling instant.
fn healthy_traffic(t: &mut Tunnel, n: f64, inflight: u64) {
    t.added += n;
    t.removed = t.added - inflight as f64;
    t.accepted = 2 + inflight;
    t.established = 2 + inflight;
    t.goroutines = 12.0 + 3.0 * inflight as f64;
}

fn analyzer() -> Analyzer {
    Analyzer::new(AnalysisConfig {
        side: Side::Server,
        ..AnalysisConfig::default()
    })
}

#[test]
fn healthy_steady_load_raises_nothing() {
    let (mut an, mut tun) = (analyzer(), Tunnel::new());
    let changes = replay(&mut an, &mut tun, 300, |t, i| {
        healthy_traffic(t, 20.0, (i % 5) as u64)
    });
    assert_eq!(raised(&changes), vec![], "{changes:?}");
    assert_eq!(an.derived().unbacked_connections, Some(0.0));
}

#[test]
fn noisy_but_flat_series_raise_nothing() {
    let (mut an, mut tun) = (analyzer(), Tunnel::new());
    // Deterministic noise: tasks, fds, heap and in-flight connections jump around a flat level.
    let noise = [0.0, 7.0, -5.0, 3.0, -8.0, 9.0, -2.0, 4.0, -6.0, 1.0];
    let changes = replay(&mut an, &mut tun, 400, |t, i| {
        let k = noise[i as usize % noise.len()];
        healthy_traffic(t, 10.0, (4.0 + k / 2.0) as u64);
        t.goroutines = 60.0 + 2.0 * k;
        t.fds = (40.0 + k) as u64;
        t.threads = (6.0 + k / 4.0).max(1.0) as u64;
        t.heap = (20.0 + k / 3.0) * 1048576.0;
    });
    assert_eq!(raised(&changes), vec![], "{changes:?}");
}

#[test]
fn skip_remove_is_a_bookkeeping_leak_within_seconds() {
    let (mut an, mut tun) = (analyzer(), Tunnel::new());
    replay(&mut an, &mut tun, 20, |t, i| {
        healthy_traffic(t, 0.0, (i % 2) as u64)
    });
    let leak_start = tun.t;
    // v2.10.3: every connection is added and never removed; the kernel closes the callers' sockets.
    let changes = replay(&mut an, &mut tun, 30, |t, _| {
        t.added += 20.0;
        t.heap += 60_000.0;
    });
    let bk: Vec<_> = changes
        .iter()
        .filter_map(|c| match c {
            VerdictChange::Raised(v) if v.kind == VerdictKind::BookkeepingLeak => Some(v.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(bk.len(), 1, "{changes:?}");
    let v = &bk[0];
    assert!(
        v.since - leak_start <= 2.0,
        "condition starts with the leak: {}",
        v.since - leak_start
    );
    assert_eq!(v.severity, crate::verdict::Severity::Critical);
    assert!(
        v.subject.contains("clientkey=downstream-1"),
        "subject names the clientkey: {}",
        v.subject
    );
    assert!(v.evidence["crosscheck.unbacked_connections"] > 100.0);
    assert!(an.derived().unbacked_connections.unwrap() > 500.0);
    assert!(
        raised(&changes)
            .iter()
            .all(|(k, _)| matches!(k, VerdictKind::BookkeepingLeak | VerdictKind::HeapGrowth))
    );
}

#[test]
fn slow_one_in_a_hundred_leak_is_caught_within_a_minute() {
    let (mut an, mut tun) = (analyzer(), Tunnel::new());
    replay(&mut an, &mut tun, 20, |t, i| {
        healthy_traffic(t, 40.0, (i % 4) as u64)
    });
    let leak_start = tun.t;
    let mut leaked: f64 = 0.0;
    let mut detected = None;
    for i in 0..90u32 {
        tun.t += 1.0;
        // 40 requests/s, one in a hundred never removed: 0.4 leaked per second.
        tun.added += 40.0;
        leaked += 0.4;
        let inflight = (i % 4) as f64;
        tun.removed = tun.added - inflight - leaked.floor();
        tun.accepted = 2 + inflight as u64;
        tun.established = tun.accepted;
        let changes = an.observe(&tun.snapshot());
        if detected.is_none()
            && raised(&changes)
                .iter()
                .any(|(k, _)| *k == VerdictKind::BookkeepingLeak)
        {
            detected = Some(tun.t - leak_start);
        }
    }
    let d = detected.expect("the partial leak was detected");
    assert!(d <= 60.0, "detected after {d}s");
}

#[test]
fn stuck_pipes_are_task_growth_with_close_wait() {
    let (mut an, mut tun) = (analyzer(), Tunnel::new());
    replay(&mut an, &mut tun, 20, |t, i| {
        healthy_traffic(t, 20.0, (i % 3) as u64)
    });
    let leak_start = tun.t;
    let changes = replay(&mut an, &mut tun, 40, |t, _| {
        // Callers left (CLOSE_WAIT), the tasks piping for them never finish; the ledger keeps them too.
        t.added += 20.0;
        t.close_wait += 20;
        t.accepted += 20;
        t.fds += 20;
        t.goroutines += 40.0;
    });
    let kinds = raised(&changes);
    let tg = kinds
        .iter()
        .find(|(k, _)| *k == VerdictKind::TaskGrowth)
        .expect("task growth raised");
    assert!(tg.1 - leak_start <= 20.0, "{kinds:?}");
    assert!(
        kinds.iter().any(|(k, _)| *k == VerdictKind::SocketLeak),
        "CLOSE_WAIT is a socket leak: {kinds:?}"
    );
    // The ledger and the kernel agree (the sockets are still open): no bookkeeping divergence.
    assert!(
        !kinds
            .iter()
            .any(|(k, _)| *k == VerdictKind::BookkeepingLeak),
        "{kinds:?}"
    );
}

#[test]
fn tasks_that_follow_live_connections_are_not_a_leak() {
    let (mut an, mut tun) = (analyzer(), Tunnel::new());
    // Load ramps up: 200 long-lived connections established over 40 s, 3 tasks each, then released.
    let changes = replay(&mut an, &mut tun, 120, |t, i| {
        let live = if i < 40 {
            5 * i as u64
        } else if i < 80 {
            200
        } else {
            0
        };
        t.added += 5.0;
        t.removed = t.added - live as f64;
        t.accepted = 2 + live;
        t.established = 2 + live;
        t.goroutines = 12.0 + 3.0 * live as f64;
        t.fds = 20 + live;
    });
    assert_eq!(raised(&changes), vec![], "{changes:?}");
}

#[test]
fn a_scrape_gap_is_not_a_leak_and_a_stale_ledger_is_not_evidence() {
    let (mut an, mut tun) = (analyzer(), Tunnel::new());
    let changes = replay(&mut an, &mut tun, 120, |t, i| {
        t.scrape_ok = !(40..70).contains(&i);
        healthy_traffic(t, 20.0, (i % 3) as u64);
    });
    assert_eq!(raised(&changes), vec![], "{changes:?}");

    // A leak that was active when the endpoint went away clears once its data is stale, rather than
    // being asserted on numbers nobody can see any more.
    let (mut an, mut tun) = (analyzer(), Tunnel::new());
    let changes = replay(&mut an, &mut tun, 80, |t, i| {
        if i < 30 {
            t.added += 20.0;
        } else {
            t.scrape_ok = false;
        }
    });
    assert!(
        raised(&changes)
            .iter()
            .any(|(k, _)| *k == VerdictKind::BookkeepingLeak)
    );
    assert!(
        changes.iter().any(|c| matches!(
            c,
            VerdictChange::Cleared {
                kind: VerdictKind::BookkeepingLeak,
                ..
            }
        )),
        "{changes:?}"
    );
}

#[test]
fn a_restart_resets_counters_without_a_verdict() {
    let (mut an, mut tun) = (analyzer(), Tunnel::new());
    let mut changes = replay(&mut an, &mut tun, 60, |t, i| {
        healthy_traffic(t, 20.0, (i % 3) as u64)
    });
    // New incarnation: counters from zero, fresh goroutines and fds.
    tun.pid = 200;
    tun.start_ticks = 999;
    tun.added = 0.0;
    tun.removed = 0.0;
    tun.goroutines = 8.0;
    changes.extend(replay(&mut an, &mut tun, 60, |t, i| {
        healthy_traffic(t, 20.0, (i % 3) as u64)
    }));
    assert_eq!(raised(&changes), vec![], "{changes:?}");
    assert!(
        changes.iter().any(|c| matches!(
            c,
            VerdictChange::TargetRestarted {
                old_pid: 100,
                new_pid: 200,
                ..
            }
        )),
        "the restart is reported"
    );
}

#[test]
fn a_counter_reset_under_the_same_pid_is_handled_like_rate() {
    // A container restart seen through a pid namespace can keep the pid: the counters drop to zero. The
    // live count is recomputed from the new counters and the open rate never goes negative.
    let (mut an, mut tun) = (analyzer(), Tunnel::new());
    let mut changes = replay(&mut an, &mut tun, 40, |t, i| {
        healthy_traffic(t, 20.0, (i % 3) as u64)
    });
    tun.added = 0.0;
    tun.removed = 0.0;
    changes.extend(replay(&mut an, &mut tun, 40, |t, i| {
        healthy_traffic(t, 20.0, (i % 3) as u64)
    }));
    assert_eq!(raised(&changes), vec![], "{changes:?}");
    let rate = an.signals.open_rate(tun.t, 10.0).expect("rate");
    assert!((15.0..=25.0).contains(&rate), "reset-safe open rate {rate}");
}

#[test]
fn slow_task_leak_is_caught() {
    let (mut an, mut tun) = (analyzer(), Tunnel::new());
    replay(&mut an, &mut tun, 20, |t, i| {
        healthy_traffic(t, 5.0, (i % 2) as u64)
    });
    // One goroutine a second, nothing else moves: a slow leak that no single sample reveals.
    let changes = replay(&mut an, &mut tun, 120, |t, i| {
        healthy_traffic(t, 5.0, (i % 2) as u64);
        t.goroutines = 12.0 + (i % 2) as f64 * 3.0 + i as f64;
    });
    assert!(
        raised(&changes)
            .iter()
            .any(|(k, _)| *k == VerdictKind::TaskGrowth),
        "{changes:?}"
    );
}

#[test]
fn fd_growth_forecasts_exhaustion() {
    let (mut an, mut tun) = (analyzer(), Tunnel::new());
    let changes = replay(&mut an, &mut tun, 60, |t, _| {
        t.fds += 5;
    });
    let kinds = raised(&changes);
    assert!(
        kinds.iter().any(|(k, _)| *k == VerdictKind::FdExhaustion),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().any(|(k, _)| *k == VerdictKind::SocketLeak),
        "{kinds:?}"
    );
    let secs = an.derived().fd_exhaustion_seconds.expect("forecast");
    // (1024 - 320) / 5 per s
    assert!((100.0..180.0).contains(&secs), "{secs}");
}

#[test]
fn quiescence_failure_after_a_burst_that_leaves_tasks_behind() {
    let cfg = AnalysisConfig {
        side: Side::Server,
        settle_s: 20.0,
        ..AnalysisConfig::default()
    };
    let (mut an, mut tun) = (Analyzer::new(cfg.clone()), Tunnel::new());
    replay(&mut an, &mut tun, 30, |_, _| {});
    // A burst: 30 s of load; each request leaves one task behind, slowly enough that no trend rule
    // fires on its own (0.4/s, under the 0.5/s slope floor).
    let mut changes = replay(&mut an, &mut tun, 30, |t, i| {
        healthy_traffic(t, 10.0, (i % 2) as u64);
        t.goroutines = 12.0 + 0.4 * i as f64 + 3.0 * (i % 2) as f64;
    });
    let held = tun.goroutines - 3.0;
    changes.extend(replay(&mut an, &mut tun, 60, |t, _| {
        healthy_traffic(t, 0.0, 0);
        t.goroutines = held;
    }));
    let q: Vec<_> = changes
        .iter()
        .filter_map(|c| match c {
            VerdictChange::Raised(v) if v.kind == VerdictKind::QuiescenceFailure => Some(v),
            _ => None,
        })
        .collect();
    assert_eq!(q.len(), 1, "{changes:?}");
    assert!(
        q[0].evidence["tasks.now"] > q[0].evidence["tasks.baseline"] + 5.0,
        "{:?}",
        q[0].evidence
    );

    // The same burst with everything released: the recipe passes, nothing is raised.
    let (mut an, mut tun) = (Analyzer::new(cfg), Tunnel::new());
    replay(&mut an, &mut tun, 30, |_, _| {});
    let mut changes = replay(&mut an, &mut tun, 30, |t, i| {
        healthy_traffic(t, 10.0, (i % 2) as u64)
    });
    changes.extend(replay(&mut an, &mut tun, 60, |t, _| {
        healthy_traffic(t, 0.0, 0)
    }));
    assert_eq!(raised(&changes), vec![], "{changes:?}");
    assert_eq!(an.load_phase(), "idle");
}

#[test]
fn agent_side_close_wait_without_a_ledger_is_a_socket_leak() {
    let cfg = AnalysisConfig {
        side: Side::Agent,
        ..AnalysisConfig::default()
    };
    let (mut an, mut tun) = (Analyzer::new(cfg), Tunnel::new());
    replay(&mut an, &mut tun, 10, |t, _| t.scrape_ok = false);
    let changes = replay(&mut an, &mut tun, 30, |t, _| {
        t.scrape_ok = false;
        t.close_wait += 20;
        t.fds += 20;
    });
    let kinds = raised(&changes);
    assert!(
        kinds.iter().any(|(k, _)| *k == VerdictKind::SocketLeak),
        "{kinds:?}"
    );
    assert!(
        !kinds
            .iter()
            .any(|(k, _)| *k == VerdictKind::BookkeepingLeak),
        "{kinds:?}"
    );
    let cw = an
        .active()
        .into_iter()
        .find(|v| v.subject.starts_with("state=CLOSE_WAIT"))
        .expect("CLOSE_WAIT verdict");
    assert_eq!(
        cw.subject, "state=CLOSE_WAIT peer=127.0.0.1:8080",
        "names who hung up"
    );
    assert_eq!(
        cw.evidence["kernel.close_wait_peer[127.0.0.1:8080]"],
        tun.close_wait as f64
    );
}

#[test]
fn a_verdict_clears_when_the_condition_clears() {
    let (mut an, mut tun) = (analyzer(), Tunnel::new());
    let mut changes = replay(&mut an, &mut tun, 30, |t, _| t.close_wait += 2);
    assert!(
        raised(&changes)
            .iter()
            .any(|(k, _)| *k == VerdictKind::SocketLeak)
    );
    changes = replay(&mut an, &mut tun, 20, |t, _| t.close_wait = 0);
    assert!(
        changes.iter().any(|c| matches!(
            c,
            VerdictChange::Cleared {
                kind: VerdictKind::SocketLeak,
                ..
            }
        )),
        "{changes:?}"
    );
    assert!(an.active().is_empty());
}
