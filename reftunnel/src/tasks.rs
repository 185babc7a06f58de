//! Named task registry: a small analogue of Go's goroutine profile.
//!
//! Every task the tunnel spawns goes through [`spawn`] with a static kind ("server.proxy_pipe",
//! "agent.dial_pipe", ...). The live count per kind is what `/debug/tasks` prints and what the
//! `reftunnel_tasks{kind}` gauge exports, so a leak shows *which* code path holds tasks, not just
//! that `go_goroutines` grows.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;

use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, Default)]
pub struct KindCount {
    pub live: i64,
    pub spawned: u64,
}

static REGISTRY: Mutex<BTreeMap<&'static str, KindCount>> = Mutex::new(BTreeMap::new());

fn with_registry<R>(f: impl FnOnce(&mut BTreeMap<&'static str, KindCount>) -> R) -> R {
    // A poisoned registry only means a panic elsewhere; the counts are still usable.
    let mut g = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut g)
}

/// Decrements the live count when the task's future is dropped: on completion, on abort and on
/// runtime shutdown alike.
struct LiveGuard(&'static str);

impl LiveGuard {
    fn new(kind: &'static str) -> Self {
        with_registry(|r| {
            let c = r.entry(kind).or_default();
            c.live += 1;
            c.spawned += 1;
        });
        LiveGuard(kind)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        with_registry(|r| {
            if let Some(c) = r.get_mut(self.0) {
                c.live -= 1;
            }
        });
    }
}

pub fn spawn<F>(kind: &'static str, fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let guard = LiveGuard::new(kind);
    tokio::spawn(async move {
        let _guard = guard;
        fut.await
    })
}

pub fn snapshot() -> Vec<(&'static str, KindCount)> {
    with_registry(|r| r.iter().map(|(k, v)| (*k, *v)).collect())
}

/// Text like pprof's `goroutine?debug=1` summary: live count, then the kind.
pub fn render() -> String {
    let mut out = String::new();
    let snap = snapshot();
    let total: i64 = snap.iter().map(|(_, c)| c.live).sum();
    out.push_str(&format!("tasks: total {total} (named)\n"));
    for (kind, c) in snap {
        out.push_str(&format!("{:>8} @ {kind} (spawned {})\n", c.live, c.spawned));
    }
    out
}

/// The live tasks in the text layout of Go's `/debug/pprof/goroutine?debug=2`, one block per live task
/// with its kind as the only frame, so tools built for Go targets (leakwatch's stack evidence) can read it.
/// Tokio keeps no stacks: the "stack" is the code path that spawned the task, and there is no source
/// location (the indented line says so rather than inventing one).
pub fn render_goroutine_dump() -> String {
    let mut out = String::new();
    let mut n = 1u64;
    for (kind, c) in snapshot() {
        for _ in 0..c.live.max(0) {
            out.push_str(&format!(
                "goroutine {n} [tokio task]:\nreftunnel.{kind}()\n\t(reftunnel task registry: no source location)\n\n"
            ));
            n += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn goroutine_dump_has_one_block_per_live_task() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let h = spawn("test.parked", async move {
            let _ = rx.await;
        });
        let dump = render_goroutine_dump();
        assert_eq!(dump.matches("reftunnel.test.parked()").count(), 1, "{dump}");
        assert!(dump.starts_with("goroutine 1 ["));
        let _ = tx.send(());
        h.await.unwrap();
        assert_eq!(
            render_goroutine_dump()
                .matches("reftunnel.test.parked()")
                .count(),
            0
        );
    }
}
