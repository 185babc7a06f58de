//! Long-lived tasks a real Rancher server holds that are not tunneled connections, so that a
//! detector can be tested on task counts that move for other reasons:
//!
//! * the start-up ramp (`--startup-tasks N --startup-over T`): Rancher starts thousands of
//!   controllers and informers in its first minute, each a goroutine that then parks for the life
//!   of the process. Task `i` starts at `i * T / N`, and each parks on a resync interval.
//! * a delayed goroutine leak (`--task-leak-after D --task-leak-rate R`): from `D` after start,
//!   `R` tasks a second that never end, forever, with a stack of their own, so that a leak that
//!   begins long after start-up (and after a detector's baseline) can be checked.
//!
//! Both count in `go_goroutines` (every tokio task does) and appear in `/debug/tasks` and the
//! goroutine dump under their own kinds and frames, none of which is a connection's.

use std::str::FromStr;
use std::time::Duration;

use crate::{say, tasks};

/// Where a Rancher controller's worker goroutine parks between resyncs (innermost first).
const CONTROLLER_FRAMES: &[&str] = &[
    "k8s.io/client-go/util/workqueue.(*Typed[...]).Get",
    "github.com/rancher/lasso/pkg/controller.(*controller).processNextWorkItem",
    "github.com/rancher/lasso/pkg/controller.(*controller).runWorker",
    "k8s.io/apimachinery/pkg/util/wait.BackoffUntil",
];
/// The leaked goroutines' stack: a handler that started a worker nobody stops.
const LEAK_FRAMES: &[&str] = &[
    "time.Sleep",
    "github.com/rancher/rancher/pkg/leaky.(*forgottenWorker).run",
    "github.com/rancher/rancher/pkg/leaky.startWorker.func1",
];
/// How often a parked controller wakes (a resync); long, so that 3,000 of them cost nothing.
const RESYNC: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Default)]
pub struct ControllersConfig {
    pub startup_tasks: u64,
    pub startup_over: Duration,
    /// When the leak begins, counted from start; `None`: no leak.
    pub leak_after: Option<Duration>,
    pub leak_rate: Option<Rate>,
}

impl ControllersConfig {
    pub fn validate(&self) -> Result<(), RateError> {
        if self.leak_after.is_some() != self.leak_rate.is_some() {
            return Err(RateError::LeakNeedsBoth);
        }
        Ok(())
    }
}

/// Tasks per second, as `2/s`, `30/m`, `1/h` or a bare number (per second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateError {
    #[error("bad rate {0:?}: expected <n>/s, <n>/m, <n>/h or <n> (per second), above zero")]
    Bad(String),
    #[error("--task-leak-after and --task-leak-rate go together")]
    LeakNeedsBoth,
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || RateError::Bad(s.to_owned());
        let (n, per) = match s.trim().split_once('/') {
            Some((n, unit)) => {
                let per = match unit.trim() {
                    "s" | "sec" => 1.0,
                    "m" | "min" => 60.0,
                    "h" => 3600.0,
                    _ => return Err(bad()),
                };
                (n, per)
            }
            None => (s, 1.0),
        };
        let n: f64 = n.trim().parse().map_err(|_| bad())?;
        if !n.is_finite() || n <= 0.0 {
            return Err(bad());
        }
        Ok(Rate {
            per_second: n / per,
        })
    }
}

impl Rate {
    /// The gap between two leaked tasks.
    pub fn period(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_second)
    }
}

/// When the `i`-th of `n` start-up tasks starts: evenly over `over`, the first at once.
pub fn ramp_offset(i: u64, n: u64, over: Duration) -> Duration {
    if n == 0 {
        return Duration::ZERO;
    }
    over.mul_f64(i as f64 / n as f64)
}

async fn park_as_controller() {
    let mut tick = tokio::time::interval(RESYNC);
    loop {
        tasks::wait("chan receive");
        tick.tick().await;
    }
}

/// Starts the ramp and the leak in the background; prints `startup tasks: <N> started` once the
/// ramp is complete and `task leak started` when the leak begins (what tests wait for).
pub fn start(cfg: ControllersConfig) {
    if cfg.startup_tasks > 0 {
        let (n, over) = (cfg.startup_tasks, cfg.startup_over);
        tasks::spawn("server.startup_ramp", async move {
            let t0 = tokio::time::Instant::now();
            for i in 0..n {
                tokio::time::sleep_until(t0 + ramp_offset(i, n, over)).await;
                tasks::spawn_with_frames(
                    "server.controller",
                    CONTROLLER_FRAMES,
                    park_as_controller(),
                );
            }
            say!("startup tasks: {n} started");
        });
    }
    if let (Some(after), Some(rate)) = (cfg.leak_after, cfg.leak_rate) {
        tasks::spawn("server.task_leak", async move {
            tokio::time::sleep(after).await;
            say!("task leak started: {} tasks/s", rate.per_second);
            let mut tick = tokio::time::interval(rate.period());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                tasks::spawn_with_frames("server.leaked_worker", LEAK_FRAMES, async {
                    tasks::wait("sleep");
                    std::future::pending::<()>().await;
                });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        let r = |s: &str| s.parse::<Rate>().map(|r| r.per_second);
        assert_eq!(r("2/s"), Ok(2.0));
        assert_eq!(r("30/m"), Ok(0.5));
        assert_eq!(r("3600/h"), Ok(1.0));
        assert_eq!(r("0.5"), Ok(0.5));
        for bad in ["", "0/s", "-1/s", "2/d", "x/s", "inf", "NaN"] {
            assert!(r(bad).is_err(), "{bad}");
        }
        assert_eq!(
            "2/s".parse::<Rate>().unwrap().period(),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn the_ramp_spreads_tasks_evenly_from_the_start() {
        let over = Duration::from_secs(60);
        assert_eq!(ramp_offset(0, 3000, over), Duration::ZERO);
        assert_eq!(ramp_offset(1500, 3000, over), Duration::from_secs(30));
        assert!(ramp_offset(2999, 3000, over) < over);
        assert_eq!(ramp_offset(5, 10, Duration::ZERO), Duration::ZERO);
        assert_eq!(ramp_offset(0, 0, over), Duration::ZERO);
    }

    #[test]
    fn a_leak_needs_a_delay_and_a_rate() {
        let mut c = ControllersConfig {
            leak_after: Some(Duration::from_secs(300)),
            ..Default::default()
        };
        assert_eq!(c.validate(), Err(RateError::LeakNeedsBoth));
        c.leak_rate = Some(Rate { per_second: 2.0 });
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(ControllersConfig::default().validate(), Ok(()));
    }

    #[tokio::test]
    async fn controllers_and_leaked_tasks_are_registered_under_their_own_stacks() {
        start(ControllersConfig {
            startup_tasks: 3,
            startup_over: Duration::ZERO,
            leak_after: Some(Duration::ZERO),
            leak_rate: Some(Rate { per_second: 100.0 }),
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let snap = tasks::snapshot();
            let live = |k: &str| {
                snap.iter()
                    .find(|(kind, _)| *kind == k)
                    .map_or(0, |(_, c)| c.live)
            };
            if live("server.controller") == 3 && live("server.leaked_worker") >= 2 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{snap:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let dump = tasks::render_goroutine_dump();
        // Other tests of this binary register connection stacks at the same time: look at ours.
        let ours: Vec<&str> = dump
            .split("\n\n")
            .filter(|b| {
                b.contains("reftunnel.server.controller()")
                    || b.contains("reftunnel.server.leaked_worker()")
            })
            .collect();
        assert!(
            ours.iter().any(|b| b.contains("processNextWorkItem(...)")),
            "{dump}"
        );
        assert!(
            ours.iter()
                .any(|b| b.contains("(*forgottenWorker).run(...)")),
            "{dump}"
        );
        for b in ours {
            assert!(
                !b.contains("remotedialer") && !b.contains("persistConn"),
                "not a connection's stack: {b}"
            );
        }
    }
}
