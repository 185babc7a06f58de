//! Verdicts: what the analysis concludes, with the evidence an on-call engineer needs to act on it.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::sample::Seconds;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    /// The app's ledger counts connections live that hold nothing: it grows while the tasks and sockets
    /// that would back live connections do not (a remove that is never recorded).
    BookkeepingLeak,
    /// Tunneled connections outlive every plausible idle timeout with no caller, and keep piling up
    /// (Rancher v2.10.3: a keep-alive transport per request with no idle timeout).
    IdleConnectionLeak,
    /// Sockets/fds keep growing or sit in CLOSE_WAIT while the app's live count and traffic fall back.
    SocketLeak,
    /// Tasks/goroutines/threads keep rising while live connections return to baseline.
    TaskGrowth,
    /// Heap keeps rising, correlated with task growth.
    HeapGrowth,
    /// After a burst, counters/tasks/fds/heap did not return to baseline within the settle time.
    QuiescenceFailure,
    /// At the current growth rate the fd limit is reached soon.
    FdExhaustion,
}

impl VerdictKind {
    pub const ALL: [VerdictKind; 7] = [
        VerdictKind::BookkeepingLeak,
        VerdictKind::IdleConnectionLeak,
        VerdictKind::SocketLeak,
        VerdictKind::TaskGrowth,
        VerdictKind::HeapGrowth,
        VerdictKind::QuiescenceFailure,
        VerdictKind::FdExhaustion,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VerdictKind::BookkeepingLeak => "bookkeeping_leak",
            VerdictKind::IdleConnectionLeak => "idle_connection_leak",
            VerdictKind::SocketLeak => "socket_leak",
            VerdictKind::TaskGrowth => "task_growth",
            VerdictKind::HeapGrowth => "heap_growth",
            VerdictKind::QuiescenceFailure => "quiescence_failure",
            VerdictKind::FdExhaustion => "fd_exhaustion",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// What a verdict rests on. One condition per kind and scope, stable from tick to tick (the subject may
/// change as the evidence does); it also tells a server's idle verdict (the ledger's) from an agent's
/// (the kernel's idle sockets), and which source's silence voids it (see [`Scope::sources`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The ledger's live connections against tasks and kernel sockets (server).
    Ledger,
    /// Ledger rows' connections older than the idle horizon (server).
    LedgerIdle,
    /// Dialed sockets idle past the horizon, from tcp_info (agent).
    SocketIdle,
    /// Dialed requests with no byte of answer, from tcp_info.
    Unanswered,
    CloseWait,
    Fds,
    Tasks,
    Heap,
    FdLimit,
    /// The quiescence recipe: several levels after a burst.
    Recipe,
}

/// Where evidence comes from, for freshness: a source that stops answering voids what rests on it alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The target's /metrics.
    App,
    /// NETLINK_SOCK_DIAG tcp_info, with the full procfs pass.
    SockDiag,
    /// The eBPF probes.
    Kernel,
    /// /proc/<pid>.
    Procfs,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::App => "the target's metrics",
            Source::SockDiag => "sock_diag",
            Source::Kernel => "the eBPF probes",
            Source::Procfs => "procfs",
        }
    }
}

impl Scope {
    pub const ALL: [Scope; 10] = [
        Scope::Ledger,
        Scope::LedgerIdle,
        Scope::SocketIdle,
        Scope::Unanswered,
        Scope::CloseWait,
        Scope::Fds,
        Scope::Tasks,
        Scope::Heap,
        Scope::FdLimit,
        Scope::Recipe,
    ];

    /// The sources a finding of this scope reads; it stands while any of them is fresh.
    pub fn sources(self) -> &'static [Source] {
        match self {
            Scope::Ledger | Scope::LedgerIdle | Scope::Heap => &[Source::App],
            Scope::SocketIdle | Scope::Unanswered => &[Source::SockDiag],
            Scope::CloseWait => &[Source::Kernel, Source::Procfs],
            Scope::Fds | Scope::FdLimit => &[Source::Procfs],
            Scope::Tasks => &[Source::App, Source::Procfs],
            Scope::Recipe => &[Source::App, Source::Kernel, Source::Procfs],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub kind: VerdictKind,
    pub scope: Scope,
    pub severity: Severity,
    /// When the condition began (watch-relative seconds), not when it was confirmed.
    pub since: Seconds,
    /// What the verdict is about, e.g. `clientkey=c1 addr=127.0.0.1:8080`, or the quantity (`fds`, `heap`).
    pub subject: String,
    /// Numbers from each source, named `<source>.<quantity>` (e.g. `app.live_connections`).
    pub evidence: BTreeMap<String, f64>,
    /// One line a human reads at 3 a.m.
    pub explanation: String,
}

/// A verdict as it was raised, with when it was raised (detection time, as opposed to `since`).
#[derive(Clone, Debug, Serialize)]
pub struct Raised {
    pub verdict: Verdict,
    pub raised_t: f64,
    pub raised_unix: f64,
}

/// A verdict appearing or clearing, for logs and event counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum VerdictChange {
    Raised(Verdict),
    /// A raised verdict became more severe (severity never drops within one episode).
    Escalated(Verdict),
    Cleared {
        kind: VerdictKind,
        subject: String,
        at: Seconds,
        /// Set when it cleared because its evidence went silent, not because the condition went away.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The target restarted: baselines were reset, nothing is read as a leak across the restart.
    TargetRestarted {
        at: Seconds,
        old_pid: u32,
        new_pid: u32,
    },
}
