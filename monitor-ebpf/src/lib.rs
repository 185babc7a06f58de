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

/// The one list of the scalar kernel counters: `(CONSTANT, field_name, index, export, help)`. It is a
/// callback macro so that each side can expand it into what it needs from the same rows: the indices here,
/// `KernelCounters` in userspace, and the exported series. `export` says where the counter goes:
/// `Event` is a `leakwatch_kernel_events_total{event=<field_name>}` series, `Lost` the lost-events counter,
/// `TableFull(<table>)` a `leakwatch_kernel_table_full_total{table=<table>}` series.
#[macro_export]
macro_rules! with_counters {
    ($callback:ident) => {
        $callback! {
            (SOCK_TRACKED, sock_tracked, 0, Event,
                "A TCP socket was attributed to a watched process (first state change seen for it).");
            (SOCK_ESTABLISHED, sock_established, 1, Event, "A watched socket reached ESTABLISHED.");
            (SOCK_CLOSED, sock_closed, 2, Event, "A watched socket reached CLOSE and left the in-kernel table.");
            (SOCK_CLOSE_WAIT, sock_close_wait, 3, Event,
                "A watched socket entered CLOSE_WAIT (the peer closed, the process has not yet).");
            (TASK_NEW_THREAD, task_new_thread, 4, Event, "A watched process created a thread.");
            (TASK_EXIT, task_exit, 5, Event, "A thread of a watched process exited (the last thread counts too).");
            (PROCESS_FORK, process_fork, 6, Event, "A watched process forked a child process.");
            (PROCESS_EXIT, process_exit, 7, Event, "The last thread of a watched process exited.");
            (EVENTS_LOST, events_lost, 8, Lost,
                "The ring buffer was full: an event was dropped (the counters stay exact).");
            (SOCK_TABLE_FULL, sock_table_full, 9, TableFull("socks"),
                "The socket table was full: a socket could not be tracked.");
            (LISTEN_TABLE_FULL, listen_table_full, 10, TableFull("listeners"),
                "The listener table was full: accepted children of a listener may be missed.");
        }
    };
}

/// Where a scalar counter is exported (see [`with_counters`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Export {
    Event,
    Lost,
    TableFull(&'static str),
}

/// One row of [`with_counters`], for code that iterates instead of naming fields.
#[derive(Clone, Copy, Debug)]
pub struct CounterDef {
    pub index: u32,
    pub name: &'static str,
    pub export: Export,
    pub help: &'static str,
}

macro_rules! define_counter_indices {
    ($(($konst:ident, $field:ident, $index:literal, $export:ident $(($table:literal))?, $help:literal);)*) => {
        $(#[doc = $help] pub const $konst: u32 = $index;)*
        /// Every scalar counter, in index order.
        pub const SCALARS: &[$crate::CounterDef] = &[$($crate::CounterDef {
            index: $index,
            name: stringify!($field),
            export: $crate::Export::$export $(($table))?,
            help: $help,
        }),*];
        /// The per-state and per-origin blocks start after the scalars.
        const SCALAR_COUNT: u32 = 0 $(+ { let _ = $index; 1 })*;
    };
}

/// Indices into the per-CPU `COUNTERS` array. Userspace sums each index over all CPUs.
pub mod counter {
    with_counters!(define_counter_indices);

    /// Transitions of watched sockets into each TCP state, at `STATE_BASE + state`.
    pub const STATE_BASE: u32 = SCALAR_COUNT;
    /// Transitions of already-tracked sockets out of each state, at `STATE_OUT_BASE + state`. Sockets
    /// live in a state = into - out: exact, whatever the ring buffer dropped.
    pub const STATE_OUT_BASE: u32 = STATE_BASE + super::tcp_state::COUNT as u32;
    /// Sockets tracked per origin, at `ORIGIN_OPEN_BASE + origin`.
    pub const ORIGIN_OPEN_BASE: u32 = STATE_OUT_BASE + super::tcp_state::COUNT as u32;
    /// Tracked sockets closed per origin, at `ORIGIN_CLOSE_BASE + origin`.
    pub const ORIGIN_CLOSE_BASE: u32 = ORIGIN_OPEN_BASE + super::origin::COUNT as u32;
    pub const COUNT: u32 = ORIGIN_CLOSE_BASE + super::origin::COUNT as u32;

    // The table's indices must be 0..SCALAR_COUNT in order, or two counters would share a slot.
    const _: () = {
        let mut i = 0;
        while i < SCALARS.len() {
            assert!(SCALARS[i].index == i as u32);
            i += 1;
        }
    };
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

/// Slots of the watch set.
pub const MAX_WATCHED: u32 = 16;

/// Default capacity of the socket tables: the in-kernel one (`SOCKS`, resized at load by `--max-sockets`),
/// the userspace mirror, and the sock_diag dump. A tunnel with this many sockets open is already far gone.
pub const DEFAULT_MAX_SOCKETS: u32 = 65_536;

/// One watched process. `tgid` is the pid as leakwatch sees it (its own pid namespace's); `host_tgid` is
/// the kernel's, which is what `bpf_get_current_pid_tgid` returns. In the host namespace userspace writes
/// both; in a pod's namespace the host pid is not visible from there, so userspace leaves it 0 and the
/// probes learn it the first time the process itself runs a probe (with the costly ns-pid helper, once).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchSlot {
    pub tgid: u32,
    pub host_tgid: u32,
}

/// The whole watch set in one array slot: one inlined lookup answers "is current watched?". `used` is one
/// past the highest slot ever filled, so the common single-target case compares slot 0 and stops.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchSet {
    pub used: u32,
    pub _pad: u32,
    pub slots: [WatchSlot; MAX_WATCHED as usize],
}

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

/// Value of the in-kernel socket table: which watched process a socket belongs to, the state it was
/// last seen in, and the remote port its `PORT_REFS` reference was taken under. Out-transitions are counted from `state`, not from the tracepoint's `oldstate`, so a
/// transition the probe skipped (made by an unwatched task on a watched socket, see probes.rs) cannot leave
/// a socket counted in a state it already left.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOwner {
    pub tgid: u32,
    pub origin: u8,
    pub state: u8,
    pub port: u16,
}

/// Key of the listener table: a watched process's listening port, per address family.
pub const fn listen_key(family: u16, port: u16) -> u32 {
    ((family as u32) << 16) | port as u32
}

/// Tracepoint field offsets the programs are compiled against. Userspace checks every one against the
/// running kernel's `format` files before loading, and falls back to procfs-only mode on a mismatch rather
/// than read the wrong bytes; the probes read through the same constants.
pub mod layout {
    /// One field of a tracepoint record.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Field {
        pub event: &'static str,
        pub name: &'static str,
        pub offset: usize,
        pub size: usize,
    }

    const fn f(event: &'static str, name: &'static str, offset: usize, size: usize) -> Field {
        Field {
            event,
            name,
            offset,
            size,
        }
    }

    const SOCK: &str = "sock/inet_sock_set_state";
    pub const SOCK_SKADDR: Field = f(SOCK, "skaddr", 8, 8);
    pub const SOCK_OLDSTATE: Field = f(SOCK, "oldstate", 16, 4);
    pub const SOCK_NEWSTATE: Field = f(SOCK, "newstate", 20, 4);
    pub const SOCK_SPORT: Field = f(SOCK, "sport", 24, 2);
    pub const SOCK_DPORT: Field = f(SOCK, "dport", 26, 2);
    pub const SOCK_FAMILY: Field = f(SOCK, "family", 28, 2);
    pub const SOCK_PROTOCOL: Field = f(SOCK, "protocol", 30, 2);
    pub const SOCK_SADDR: Field = f(SOCK, "saddr", 32, 4);
    pub const SOCK_DADDR: Field = f(SOCK, "daddr", 36, 4);
    pub const SOCK_SADDR_V6: Field = f(SOCK, "saddr_v6", 40, 16);
    pub const SOCK_DADDR_V6: Field = f(SOCK, "daddr_v6", 56, 16);
    pub const NEWTASK_PID: Field = f("task/task_newtask", "pid", 8, 4);
    pub const NEWTASK_CLONE_FLAGS: Field = f("task/task_newtask", "clone_flags", 32, 8);
    pub const EXIT_GROUP_DEAD: Field = f("sched/sched_process_exit", "group_dead", 32, 1);

    /// Every field a probe always reads: what userspace checks before loading.
    pub const EXPECTED: &[Field] = &[
        SOCK_SKADDR,
        SOCK_OLDSTATE,
        SOCK_NEWSTATE,
        SOCK_SPORT,
        SOCK_DPORT,
        SOCK_FAMILY,
        SOCK_PROTOCOL,
        SOCK_SADDR,
        SOCK_DADDR,
        SOCK_SADDR_V6,
        SOCK_DADDR_V6,
        NEWTASK_PID,
        NEWTASK_CLONE_FLAGS,
    ];

    /// Read only when the running kernel has it (6.18 does, 6.12 and older do not): without it the loader
    /// attaches [`super::EXIT_MAIN_THREAD_PROGRAM`] instead, which needs no field.
    pub const OPTIONAL: &[Field] = &[EXIT_GROUP_DEAD];
}

/// The programs and the tracepoints they attach to: (program name, category, tracepoint name). None is a
/// `syscalls:*` tracepoint: attaching any of those puts every task of the machine on the slow syscall path
/// (measured on a 2-vCPU 6.18 VM: +42 ns on every syscall, +175 ns on a traced one), a tax the whole node would pay
/// for leakwatch. fd counts come from procfs instead, and sockets from their TCP state changes.
pub const PROGRAMS: &[(&str, &str, &str)] = &[
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
    ("task_newtask", "task", "task_newtask"),
    ("sched_process_exit", "sched", "sched_process_exit"),
];

/// Attached to `sched/sched_process_exit` in place of `sched_process_exit` on kernels whose record has no
/// `group_dead`: a process exits with its main thread.
pub const EXIT_MAIN_THREAD_PROGRAM: &str = "sched_process_exit_main_thread";

/// Names of the maps, shared so a rename cannot drift between the two sides.
pub mod map_name {
    pub const WATCHED: &str = "WATCHED";
    pub const SOCKS: &str = "SOCKS";
    pub const PORT_REFS: &str = "PORT_REFS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const EVENTS: &str = "EVENTS";
}

/// Global set by the loader: non-zero makes forked children of a watched process watched too.
pub const GLOBAL_FOLLOW_FORKS: &str = "FOLLOW_FORKS";

/// Globals set by the loader: device and inode of leakwatch's pid namespace, zero in the host's.
pub const GLOBAL_PIDNS_DEV: &str = "PIDNS_DEV";
pub const GLOBAL_PIDNS_INO: &str = "PIDNS_INO";

/// Global set by the loader: the ring buffer's size in bytes, as it sized the map.
pub const GLOBAL_RING_BYTES: &str = "RING_BYTES";

const _: () = assert!(core::mem::size_of::<SockEvent>() == 64);
const _: () = assert!(core::mem::size_of::<ProcessEvent>() == 24);
const _: () = assert!(core::mem::size_of::<SockOwner>() == 8);
const _: () = assert!(core::mem::size_of::<WatchSet>() == 8 + 8 * MAX_WATCHED as usize);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and byte arrays with explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for super::SockEvent {}
    unsafe impl aya::Pod for super::ProcessEvent {}
    unsafe impl aya::Pod for super::SockOwner {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::WatchSet {}
}
