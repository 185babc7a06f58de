//! Named task registry: a small analogue of Go's goroutine profile.
//!
//! Every task the tunnel spawns goes through [`spawn`] (or [`spawn_with_frames`]) with a static
//! kind ("server.conn", "agent.dial_pipe", ...). The live count per kind is what `/debug/tasks`
//! prints and what the `reftunnel_tasks{kind}` gauge exports, so a leak shows *which* code path
//! holds tasks, not just that `go_goroutines` grows.
//!
//! Each live task also has an id (stable for its life, like a goroutine id) and, when its code
//! says so through [`wait`] / [`run`], a wait reason and the instant it started waiting. The
//! goroutine dump prints them the way Go's runtime does (`goroutine 42 [select, 12 minutes]:`),
//! which is what tells an idle pooled connection that has sat for an hour from a busy one.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, Default)]
pub struct KindCount {
    pub live: i64,
    pub spawned: u64,
}

/// What a task is blocked on, in Go's words (`select`, `IO wait`, `sync.Cond.Wait`), and since
/// when. `None`: the task has not said, or is running.
#[derive(Debug, Clone, Copy, Default)]
struct WaitState {
    reason: Option<&'static str>,
    since: Option<Instant>,
}

/// One live task as the dump shows it.
pub struct TaskInfo {
    pub id: u64,
    pub kind: &'static str,
    /// Go-style frames, innermost first, printed above the `reftunnel.<kind>()` frame. Empty for
    /// tasks whose only honest "stack" is the code path that spawned them.
    frames: &'static [&'static str],
    wait: Mutex<WaitState>,
}

impl TaskInfo {
    fn wait_state(&self) -> MutexGuard<'_, WaitState> {
        self.wait.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The task blocks from now on `reason` (a Go wait reason). Called again after every bit of
    /// progress, so the age is the time since the task last did something.
    pub fn wait(&self, reason: &'static str) {
        *self.wait_state() = WaitState {
            reason: Some(reason),
            since: Some(Instant::now()),
        };
    }

    /// The task is doing work (or no longer reports a wait).
    pub fn run(&self) {
        *self.wait_state() = WaitState::default();
    }
}

pub type TaskRef = Arc<TaskInfo>;

#[derive(Default)]
struct Registry {
    kinds: BTreeMap<&'static str, KindCount>,
    live: BTreeMap<u64, TaskRef>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    kinds: BTreeMap::new(),
    live: BTreeMap::new(),
});
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

tokio::task_local! {
    static CURRENT: TaskRef;
}

fn with_registry<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    // A poisoned registry only means a panic elsewhere; the counts are still usable.
    let mut g = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut g)
}

/// Unregisters the task when its future is dropped: on completion, on abort and on runtime
/// shutdown alike.
struct LiveGuard(TaskRef);

impl LiveGuard {
    fn new(kind: &'static str, frames: &'static [&'static str]) -> Self {
        let info = Arc::new(TaskInfo {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            kind,
            frames,
            wait: Mutex::new(WaitState::default()),
        });
        with_registry(|r| {
            let c = r.kinds.entry(kind).or_default();
            c.live += 1;
            c.spawned += 1;
            r.live.insert(info.id, info.clone());
        });
        LiveGuard(info)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        with_registry(|r| {
            if let Some(c) = r.kinds.get_mut(self.0.kind) {
                c.live -= 1;
            }
            r.live.remove(&self.0.id);
        });
    }
}

pub fn spawn<F>(kind: &'static str, fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    spawn_with_frames(kind, &[], fut).0
}

/// Like [`spawn`], with Go-style frames for the dump; also returns the task's entry so that
/// code outside the task (a connection pool) can report the task's wait state.
pub fn spawn_with_frames<F>(
    kind: &'static str,
    frames: &'static [&'static str],
    fut: F,
) -> (JoinHandle<F::Output>, TaskRef)
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let guard = LiveGuard::new(kind, frames);
    let info = guard.0.clone();
    let h = tokio::spawn(CURRENT.scope(info.clone(), async move {
        let _guard = guard;
        fut.await
    }));
    (h, info)
}

/// The calling task starts waiting on `reason` (no-op outside a registered task).
pub fn wait(reason: &'static str) {
    let _ = CURRENT.try_with(|t| t.wait(reason));
}

/// The calling task is running again.
pub fn run() {
    let _ = CURRENT.try_with(|t| t.run());
}

pub fn snapshot() -> Vec<(&'static str, KindCount)> {
    with_registry(|r| r.kinds.iter().map(|(k, v)| (*k, *v)).collect())
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

/// Go's goroutine header (runtime/traceback.go `goroutineheader`): the wait reason, then the
/// whole minutes blocked, printed only from one minute on, always as "minutes" (Go prints
/// "1 minutes" too). Tasks that report no wait show `tokio task`: their state is unknown, and
/// inventing `running` would be read as a fact.
pub fn goroutine_header(
    id: u64,
    reason: Option<&str>,
    since: Option<Instant>,
    now: Instant,
) -> String {
    let status = reason.unwrap_or("tokio task");
    let minutes = match (reason, since) {
        (Some(_), Some(s)) => now.saturating_duration_since(s).as_secs() / 60,
        _ => 0,
    };
    if minutes >= 1 {
        format!("goroutine {id} [{status}, {minutes} minutes]:")
    } else {
        format!("goroutine {id} [{status}]:")
    }
}

/// The live tasks in the text layout of Go's `/debug/pprof/goroutine?debug=2`, one block per live
/// task, so tools built for Go targets (leakwatch's stack evidence) can read it. Tokio keeps no
/// stacks: a task's frames are the Go-style frames it was spawned with (the Go code path it
/// stands for) above `reftunnel.<kind>()`, the code path that spawned it; there are no source
/// locations (the indented lines say so rather than inventing them).
pub fn render_goroutine_dump() -> String {
    render_goroutine_dump_at(Instant::now())
}

pub fn render_goroutine_dump_at(now: Instant) -> String {
    let live: Vec<TaskRef> = with_registry(|r| r.live.values().cloned().collect());
    let mut out = String::new();
    for t in live {
        let w = *t.wait_state();
        out.push_str(&goroutine_header(t.id, w.reason, w.since, now));
        out.push('\n');
        for f in t.frames {
            out.push_str(f);
            out.push_str("(...)\n\t(reftunnel task registry: no source location)\n");
        }
        out.push_str(&format!(
            "reftunnel.{}()\n\t(reftunnel task registry: no source location)\n\n",
            t.kind
        ));
    }
    out
}

/// A stable made-up program counter for a frame's function: the aggregated profile names each stack by
/// its pcs (`COUNT @ 0xpc 0xpc...`), and tokio tasks have none.
fn fake_pc(function: &str) -> u64 {
    // FNV-1a: the same function gets the same pc in every profile of the process.
    let h = function.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    0x40_0000 + (h & 0xf_ffff)
}

/// The live tasks in the text layout of Go's `/debug/pprof/goroutine?debug=1`: `goroutine profile: total
/// N`, then one block per distinct stack, most frequent first, `COUNT @ 0xpc...` followed by one
/// `#\t0xpc\tfunction+0xoff\tfile:line` line per frame. Go collects this layout without stopping the
/// world for the whole dump and it carries no wait ages; like Go, it is what a sidecar should read
/// routinely. The frames are the dump's (see [`render_goroutine_dump`]), with no source location.
pub fn render_goroutine_profile() -> String {
    let live: Vec<TaskRef> = with_registry(|r| r.live.values().cloned().collect());
    let mut by_stack: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    for t in &live {
        let mut frames: Vec<String> = t.frames.iter().map(|f| f.to_string()).collect();
        frames.push(format!("reftunnel.{}", t.kind));
        *by_stack.entry(frames).or_default() += 1;
    }
    let mut stacks: Vec<(Vec<String>, u64)> = by_stack.into_iter().collect();
    stacks.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut out = format!("goroutine profile: total {}\n", live.len());
    for (frames, count) in stacks {
        let pcs: Vec<String> = frames
            .iter()
            .map(|f| format!("{:#x}", fake_pc(f)))
            .collect();
        out.push_str(&format!("{count} @ {}\n", pcs.join(" ")));
        for (f, pc) in frames.iter().zip(&pcs) {
            out.push_str(&format!(
                "#\t{pc}\t{f}+0x0\t(reftunnel task registry: no source location)\n"
            ));
        }
        out.push('\n');
    }
    out
}

/// What `/debug/pprof/goroutine` serves for a request's query, as Go does: `debug=1` the aggregated
/// profile, anything else the full dump (Go's default is its binary protobuf, which this does not
/// speak; the dump is what a reader of text asks for).
pub fn render_goroutine_endpoint(query: &str) -> String {
    if query.split('&').any(|p| p == "debug=1") {
        render_goroutine_profile()
    } else {
        render_goroutine_dump()
    }
}

/// The longest current wait among live tasks of `kind` (for tests and diagnostics).
pub fn longest_wait(kind: &str, now: Instant) -> Option<Duration> {
    with_registry(|r| {
        r.live
            .values()
            .filter(|t| t.kind == kind)
            .filter_map(|t| t.wait_state().since)
            .map(|s| now.saturating_duration_since(s))
            .max()
    })
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
        assert!(dump.starts_with("goroutine "));
        let _ = tx.send(());
        h.await.unwrap();
        assert_eq!(
            render_goroutine_dump()
                .matches("reftunnel.test.parked()")
                .count(),
            0
        );
    }

    #[test]
    fn header_prints_whole_minutes_from_one_minute_on_as_go_does() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let h = |reason, s| goroutine_header(7, reason, Some(t0), at(s));
        assert_eq!(h(Some("select"), 0), "goroutine 7 [select]:");
        assert_eq!(h(Some("select"), 59), "goroutine 7 [select]:");
        assert_eq!(h(Some("select"), 60), "goroutine 7 [select, 1 minutes]:");
        assert_eq!(
            h(Some("sync.Cond.Wait"), 12 * 60 + 59),
            "goroutine 7 [sync.Cond.Wait, 12 minutes]:"
        );
        assert_eq!(
            h(Some("IO wait"), 3 * 3600),
            "goroutine 7 [IO wait, 180 minutes]:"
        );
        // No reported wait: no age, whatever the clock says.
        assert_eq!(h(None, 600), "goroutine 7 [tokio task]:");
        assert_eq!(
            goroutine_header(7, Some("select"), None, at(600)),
            "goroutine 7 [select]:"
        );
    }

    #[tokio::test]
    async fn waiting_tasks_show_their_reason_and_age_in_the_dump() {
        const FRAMES: &[&str] = &["net/http.(*persistConn).readLoop"];
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let (h, info) = spawn_with_frames("test.idle", FRAMES, async move {
            wait("select");
            let _ = ready_tx.send(());
            let _ = rx.await;
            run();
        });
        ready_rx.await.unwrap();
        // A fake clock 5 minutes ahead rather than waiting 5 minutes.
        let dump = render_goroutine_dump_at(Instant::now() + Duration::from_secs(5 * 60 + 1));
        let block = dump
            .split("\n\n")
            .find(|b| b.contains("reftunnel.test.idle()"))
            .expect("block");
        assert!(
            block.starts_with(&format!("goroutine {} [select, 5 minutes]:\n", info.id)),
            "{block}"
        );
        assert!(
            block.contains("\nnet/http.(*persistConn).readLoop(...)\n\t"),
            "{block}"
        );
        assert!(
            longest_wait("test.idle", Instant::now() + Duration::from_secs(61))
                .is_some_and(|d| d >= Duration::from_secs(60))
        );
        let _ = tx.send(());
        h.await.unwrap();
    }

    #[tokio::test]
    async fn the_aggregated_profile_counts_live_tasks_per_stack() {
        const FRAMES: &[&str] = &["net/http.(*persistConn).readLoop"];
        let mut stop = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            stop.push(tx);
            handles.push(
                spawn_with_frames("test.profiled", FRAMES, async move {
                    let _ = rx.await;
                })
                .0,
            );
        }
        let profile = render_goroutine_endpoint("debug=1");
        assert!(
            profile.starts_with("goroutine profile: total "),
            "{profile}"
        );
        let (_, blocks) = profile.split_once('\n').unwrap();
        let block = blocks
            .split("\n\n")
            .find(|b| b.contains("reftunnel.test.profiled+0x0"))
            .expect("a block for the kind");
        let mut lines = block.lines();
        let head = lines.next().unwrap();
        assert!(head.starts_with("3 @ 0x"), "{block}");
        assert_eq!(
            head.split(' ').count(),
            4,
            "count, @ and one pc per frame: {block}"
        );
        assert!(
            lines.next().unwrap().starts_with("#\t0x")
                && block.contains("\tnet/http.(*persistConn).readLoop+0x0\t"),
            "{block}"
        );
        // The same stack always gets the same pcs; other queries get the full dump.
        assert!(render_goroutine_profile().contains(head));
        assert!(render_goroutine_endpoint("debug=2").starts_with("goroutine "));
        assert!(!render_goroutine_endpoint("debug=2").contains(" @ 0x"));
        for tx in stop {
            let _ = tx.send(());
        }
        for h in handles {
            h.await.unwrap();
        }
    }
}
