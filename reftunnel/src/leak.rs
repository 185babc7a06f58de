//! Deliberate leak injection (off by default). Each mode is a real code path in the tunnel:
//!
//! * `skip-remove` (server): a closed tunneled connection stays in the session's connection map
//!   with its per-connection buffer, and `session_server_total_remove_connections` is not
//!   incremented. The caller's socket is still closed normally.
//! * `stuck-pipe` (server): when the far side closes, the server's proxy pipe task never
//!   finishes; it keeps the caller's socket open (CLOSE_WAIT once the caller closes) and the
//!   connection is never removed.
//! * `hold-abandoned` (server): a caller that hangs up does not end the pipe; the server waits for
//!   the target to answer or close, however long it hangs, and only then closes the caller's socket
//!   (CLOSE_WAIT meanwhile). Held for a caller that left; released when the target gives up.
//! * `no-close` (agent): the agent never closes the backend socket once the tunneled connection
//!   ends; the backend's FIN leaves it in CLOSE_WAIT and the fd stays open.
//!
//! `--leak-every N` makes one connection in N leak (the N-th, 2N-th, ...).

use std::net::TcpStream as StdTcpStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServerLeak {
    /// Closed connections are not removed from the session map nor counted as removed.
    SkipRemove,
    /// The proxy pipe task hangs after the far side closes, holding the caller socket.
    StuckPipe,
    /// A caller that leaves is held (CLOSE_WAIT) until the target answers or closes.
    HoldAbandoned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AgentLeak {
    /// The agent never closes backend sockets.
    NoClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeakMode {
    SkipRemove,
    StuckPipe,
    HoldAbandoned,
    NoClose,
}

impl LeakMode {
    pub fn name(self) -> &'static str {
        match self {
            LeakMode::SkipRemove => "skip-remove",
            LeakMode::StuckPipe => "stuck-pipe",
            LeakMode::HoldAbandoned => "hold-abandoned",
            LeakMode::NoClose => "no-close",
        }
    }
}

impl From<ServerLeak> for LeakMode {
    fn from(v: ServerLeak) -> Self {
        match v {
            ServerLeak::SkipRemove => LeakMode::SkipRemove,
            ServerLeak::StuckPipe => LeakMode::StuckPipe,
            ServerLeak::HoldAbandoned => LeakMode::HoldAbandoned,
        }
    }
}

impl From<AgentLeak> for LeakMode {
    fn from(v: AgentLeak) -> Self {
        match v {
            AgentLeak::NoClose => LeakMode::NoClose,
        }
    }
}

/// Decides, per new tunneled connection, whether it is one that leaks.
#[derive(Debug)]
pub struct LeakPolicy {
    mode: Option<LeakMode>,
    every: u64,
    seen: AtomicU64,
}

impl LeakPolicy {
    pub fn new(mode: Option<LeakMode>, every: u64) -> Self {
        Self {
            mode,
            every: every.max(1),
            seen: AtomicU64::new(0),
        }
    }

    pub fn off() -> Self {
        Self::new(None, 1)
    }

    pub fn mode(&self) -> Option<LeakMode> {
        self.mode
    }

    pub fn pick(&self) -> Option<LeakMode> {
        let mode = self.mode?;
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        n.is_multiple_of(self.every).then_some(mode)
    }
}

/// Sockets the agent "forgot" to close (no-close). Holding them here rather than
/// `mem::forget` keeps them countable.
static HELD_SOCKETS: Mutex<Vec<StdTcpStream>> = Mutex::new(Vec::new());

pub fn hold_socket(s: StdTcpStream) {
    HELD_SOCKETS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(s);
}

pub fn held_sockets() -> usize {
    HELD_SOCKETS.lock().unwrap_or_else(|e| e.into_inner()).len()
}
