//! Types shared by the eBPF programs and the userspace loader.
//!
//! Everything here is `#[repr(C)]` with explicit padding fields so that the kernel-side writer and the
//! userspace reader agree byte for byte; the size assertions at the bottom fail the build, not the run, if
//! a field is added carelessly.
#![no_std]

/// Linux TCP states, as numbered by the kernel (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
    /// One past the highest state: the size of per-state tables.
    pub const COUNT: usize = 13;

    pub fn name(state: u8) -> &'static str {
        match state {
            ESTABLISHED => "ESTABLISHED",
            SYN_SENT => "SYN_SENT",
            SYN_RECV => "SYN_RECV",
            FIN_WAIT1 => "FIN_WAIT1",
            FIN_WAIT2 => "FIN_WAIT2",
            TIME_WAIT => "TIME_WAIT",
            CLOSE => "CLOSE",
            CLOSE_WAIT => "CLOSE_WAIT",
            LAST_ACK => "LAST_ACK",
            LISTEN => "LISTEN",
            CLOSING => "CLOSING",
            NEW_SYN_RECV => "NEW_SYN_RECV",
            _ => "UNKNOWN",
        }
    }
}

/// Indices into the per-CPU `COUNTERS` array. Userspace sums each index over all CPUs.
pub mod counter {
    /// A TCP socket was attributed to a watched process (first state change seen for it).
    pub const SOCK_TRACKED: u32 = 0;
    /// A watched socket reached ESTABLISHED.
    pub const SOCK_ESTABLISHED: u32 = 1;
    /// A watched socket reached CLOSE and left the in-kernel table.
    pub const SOCK_CLOSED: u32 = 2;
    /// A watched socket entered CLOSE_WAIT (the peer closed, the process has not yet).
    pub const SOCK_CLOSE_WAIT: u32 = 3;
    /// `socket(2)` returned an fd in a watched process.
    pub const SYS_SOCKET: u32 = 4;
    /// `connect(2)` returned in a watched process (success or EINPROGRESS).
    pub const SYS_CONNECT: u32 = 5;
    /// `accept(2)`/`accept4(2)` returned an fd in a watched process.
    pub const SYS_ACCEPT: u32 = 6;
    /// `close(2)` of an fd that `socket`/`accept` handed to a watched process.
    pub const SYS_CLOSE_SOCKET_FD: u32 = 7;
    /// A watched process created a thread.
    pub const TASK_NEW_THREAD: u32 = 8;
    /// A thread of a watched process exited (the last thread counts too).
    pub const TASK_EXIT: u32 = 9;
    /// A watched process forked a child process.
    pub const PROCESS_FORK: u32 = 10;
    /// The last thread of a watched process exited.
    pub const PROCESS_EXIT: u32 = 11;
    /// The ring buffer was full: an event was dropped (the counters above are still exact).
    pub const EVENTS_LOST: u32 = 12;
    /// The socket table was full: a socket could not be tracked.
    pub const SOCK_TABLE_FULL: u32 = 13;
    /// The socket-fd table was full: an fd could not be tracked.
    pub const FD_TABLE_FULL: u32 = 14;
    /// The listener table was full: accepted children of a listener may be missed.
    pub const LISTEN_TABLE_FULL: u32 = 15;
    /// Transitions of watched sockets into each TCP state, at `STATE_BASE + state`.
    pub const STATE_BASE: u32 = 16;
    /// Transitions of already-tracked sockets out of each state, at `STATE_OUT_BASE + state`. Sockets
    /// live in a state = into - out: exact, whatever the ring buffer dropped.
    pub const STATE_OUT_BASE: u32 = STATE_BASE + super::tcp_state::COUNT as u32;
    /// Sockets tracked per origin, at `ORIGIN_OPEN_BASE + origin`.
    pub const ORIGIN_OPEN_BASE: u32 = STATE_OUT_BASE + super::tcp_state::COUNT as u32;
    /// Tracked sockets closed per origin, at `ORIGIN_CLOSE_BASE + origin`.
    pub const ORIGIN_CLOSE_BASE: u32 = ORIGIN_OPEN_BASE + super::origin::COUNT as u32;
    pub const COUNT: u32 = ORIGIN_CLOSE_BASE + super::origin::COUNT as u32;

    pub const NAMES: [&str; STATE_BASE as usize] = [
        "sock_tracked",
        "sock_established",
        "sock_closed",
        "sock_close_wait",
        "sys_socket",
        "sys_connect",
        "sys_accept",
        "sys_close_socket_fd",
        "task_new_thread",
        "task_exit",
        "process_fork",
        "process_exit",
        "events_lost",
        "sock_table_full",
        "fd_table_full",
        "listen_table_full",
    ];
}

/// All counters of one CPU, in one per-CPU array slot: one (inlined) map lookup per event instead of one
/// per counter touched.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    pub v: [u64; counter::COUNT as usize],
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            v: [0; counter::COUNT as usize],
        }
    }
}

/// Slots of the watched-process array. An array, not a hash: array lookups are inlined by the verifier,
/// and a scan of a few slots is cheaper than hashing on every syscall of every process on the machine.
pub const MAX_WATCHED: u32 = 16;

/// How a socket came to be tracked: on a tunnel server, accepted sockets are callers; on an agent,
/// connected sockets are dials to targets.
pub mod origin {
    pub const ACCEPTED: u8 = 0;
    pub const CONNECTED: u8 = 1;
    pub const LISTENER: u8 = 2;
    /// First seen mid-life (opened before the probes were attached).
    pub const UNKNOWN: u8 = 3;
    pub const COUNT: usize = 4;
}

/// Ring-buffer record kinds: the first byte of every record.
pub mod event_kind {
    pub const SOCK_STATE: u8 = 1;
    pub const PROCESS_FORK: u8 = 2;
    pub const PROCESS_EXIT: u8 = 3;
}

/// One TCP state change of a watched socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockEvent {
    pub kind: u8,
    pub oldstate: u8,
    pub newstate: u8,
    pub _pad0: u8,
    /// The watched process that owns the socket (not the task current when the event fired).
    pub tgid: u32,
    pub ts_ns: u64,
    /// Kernel address of `struct sock`: the socket's identity while it lives.
    pub skaddr: u64,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// Host byte order, as the tracepoint reports them.
    pub sport: u16,
    pub dport: u16,
    pub _pad1: u16,
    /// IPv4 addresses use the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// A watched process forked (`pid` is the child) or exited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessEvent {
    pub kind: u8,
    pub _pad0: [u8; 3],
    pub tgid: u32,
    pub ts_ns: u64,
    pub pid: u32,
    pub _pad1: u32,
}

/// Value of the in-kernel socket table: which watched process a socket belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOwner {
    pub tgid: u32,
    pub origin: u8,
    pub _pad: [u8; 3],
}

/// Key of the listener table: a watched process's listening port, per address family.
pub const fn listen_key(family: u16, port: u16) -> u32 {
    ((family as u32) << 16) | port as u32
}

/// Key of the socket-fd table.
pub const fn fd_key(tgid: u32, fd: u32) -> u64 {
    ((tgid as u64) << 32) | fd as u64
}

/// Tracepoint field offsets the programs are compiled against. Userspace checks them against the running
/// kernel's `format` files before loading, and falls back to procfs-only mode on a mismatch rather than
/// read the wrong bytes.
pub mod layout {
    /// (event, field, offset, size)
    pub const EXPECTED: &[(&str, &str, usize, usize)] = &[
        ("sock/inet_sock_set_state", "skaddr", 8, 8),
        ("sock/inet_sock_set_state", "oldstate", 16, 4),
        ("sock/inet_sock_set_state", "newstate", 20, 4),
        ("sock/inet_sock_set_state", "sport", 24, 2),
        ("sock/inet_sock_set_state", "dport", 26, 2),
        ("sock/inet_sock_set_state", "family", 28, 2),
        ("sock/inet_sock_set_state", "protocol", 30, 2),
        ("sock/inet_sock_set_state", "saddr_v6", 40, 16),
        ("sock/inet_sock_set_state", "daddr_v6", 56, 16),
        ("sock/inet_sock_set_state", "saddr", 32, 4),
        ("sock/inet_sock_set_state", "daddr", 36, 4),
        ("syscalls/sys_exit_socket", "ret", 16, 8),
        ("syscalls/sys_exit_connect", "ret", 16, 8),
        ("syscalls/sys_exit_accept", "ret", 16, 8),
        ("syscalls/sys_exit_accept4", "ret", 16, 8),
        ("syscalls/sys_enter_close", "fd", 16, 8),
        ("task/task_newtask", "pid", 8, 4),
        ("task/task_newtask", "clone_flags", 32, 8),
        ("sched/sched_process_exit", "pid", 24, 4),
        ("sched/sched_process_exit", "group_dead", 32, 1),
    ];
    pub const SOCK_SKADDR: usize = 8;
    pub const SOCK_OLDSTATE: usize = 16;
    pub const SOCK_NEWSTATE: usize = 20;
    pub const SOCK_SPORT: usize = 24;
    pub const SOCK_DPORT: usize = 26;
    pub const SOCK_FAMILY: usize = 28;
    pub const SOCK_PROTOCOL: usize = 30;
    pub const SOCK_SADDR: usize = 32;
    pub const SOCK_DADDR: usize = 36;
    pub const SOCK_SADDR_V6: usize = 40;
    pub const SOCK_DADDR_V6: usize = 56;
    pub const SYSCALL_RET: usize = 16;
    pub const SYSCALL_ARG0: usize = 16;
    pub const NEWTASK_PID: usize = 8;
    pub const NEWTASK_CLONE_FLAGS: usize = 32;
    pub const EXIT_GROUP_DEAD: usize = 32;
}

/// The programs and the tracepoints they attach to: (program name, category, tracepoint name).
pub const PROGRAMS: &[(&str, &str, &str)] = &[
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
    ("sys_exit_socket", "syscalls", "sys_exit_socket"),
    ("sys_exit_connect", "syscalls", "sys_exit_connect"),
    ("sys_exit_accept", "syscalls", "sys_exit_accept"),
    ("sys_exit_accept4", "syscalls", "sys_exit_accept4"),
    ("sys_enter_close", "syscalls", "sys_enter_close"),
    ("task_newtask", "task", "task_newtask"),
    ("sched_process_exit", "sched", "sched_process_exit"),
];

/// Names of the maps, shared so a rename cannot drift between the two sides.
pub mod map_name {
    pub const WATCHED: &str = "WATCHED";
    pub const SOCKS: &str = "SOCKS";
    pub const SOCK_FDS: &str = "SOCK_FDS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const EVENTS: &str = "EVENTS";
}

/// Global set by the loader: non-zero makes forked children of a watched process watched too.
pub const GLOBAL_FOLLOW_FORKS: &str = "FOLLOW_FORKS";

/// Globals set by the loader: device and inode of leakwatch's pid namespace, zero in the host's.
pub const GLOBAL_PIDNS_DEV: &str = "PIDNS_DEV";
pub const GLOBAL_PIDNS_INO: &str = "PIDNS_INO";

const _: () = assert!(core::mem::size_of::<SockEvent>() == 64);
const _: () = assert!(core::mem::size_of::<ProcessEvent>() == 24);
const _: () = assert!(core::mem::size_of::<SockOwner>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and byte arrays with explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for super::SockEvent {}
    unsafe impl aya::Pod for super::ProcessEvent {}
    unsafe impl aya::Pod for super::SockOwner {}
    unsafe impl aya::Pod for super::Counters {}
}
