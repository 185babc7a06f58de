use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, bpf_pidns_info},
    helpers::{bpf_get_current_pid_tgid, bpf_get_ns_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use monitor_ebpf::{
    Counters, DEFAULT_MAX_SOCKETS, MAX_WATCHED, ProcessEvent, SockEvent, SockOwner, WatchSet,
    counter, event_kind,
    layout::{self, Field},
    listen_key, origin, tcp_state,
};

const IPPROTO_TCP: u16 = 6;
const AF_INET: u16 = 2;
const CLONE_THREAD: u64 = 0x0001_0000;

/// The watch set, in slot 0. Userspace fills it; the probes learn host pids and follow forks into it.
#[map]
static WATCHED: Array<WatchSet> = Array::with_max_entries(1, 0);

/// Sockets attributed to a watched process, by `struct sock` address. Max entries are set by the loader.
#[map]
static SOCKS: HashMap<u64, SockOwner> = HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// Tracked sockets per remote port. A TCP state change that may run in softirq (where current says nothing)
/// would otherwise cost every socket of the node a `SOCKS` hash lookup; with this array, an inlined load
/// says "no tracked socket has this remote port" for nearly all of them. The remote port is set before a
/// socket's first tracked transition (connect sets it before SYN_SENT; accept before SYN_RECV on 6.18, and
/// right after it on older kernels, when the socket counts under port 0 until it leaves SYN_RECV) and kept
/// until its CLOSE, so a tracked socket always finds its count non-zero; an untracked one that shares a
/// remote port with a tracked one only pays the lookup it paid before.
#[map]
static PORT_REFS: Array<u64> = Array::with_max_entries(65536, 0);

/// Listening ports of watched processes: key (family << 16 | port) -> tgid.
#[map]
static LISTENERS: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);

#[map]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Set by the loader (rodata): non-zero adds forked children of a watched process to `WATCHED`.
#[unsafe(no_mangle)]
static FOLLOW_FORKS: u8 = 0;

/// Set by the loader (rodata) when leakwatch runs in a pid namespace of its own (a pod with
/// `shareProcessNamespace`): the device and inode of that namespace. Only needed to learn a watched
/// process's host pid, see `watched_current`.
#[unsafe(no_mangle)]
static PIDNS_DEV: u64 = 0;
#[unsafe(no_mangle)]
static PIDNS_INO: u64 = 0;

/// Set by the loader (rodata): the ring's size, which it chose. Known here, it saves asking the ring for it
/// on every record.
#[unsafe(no_mangle)]
static RING_BYTES: u64 = 1 << 20;

/// This CPU's counters. Index 0 of a per-CPU array always exists, but the verifier wants the check.
#[inline(always)]
fn counters() -> Option<&'static mut Counters> {
    // SAFETY: per-CPU slot, no other writer on this CPU while the program runs.
    COUNTERS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn bump(c: &mut Option<&'static mut Counters>, index: u32) {
    if let Some(c) = c.as_deref_mut() {
        if let Some(slot) = c.v.get_mut(index as usize) {
            *slot += 1;
        }
    }
}

#[inline(always)]
fn watch_set() -> Option<&'static mut WatchSet> {
    // SAFETY: array slot of a map we own; concurrent writers (userspace, other CPUs) only store whole u32s.
    WATCHED.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The tgid, as leakwatch sees it, of the current task's process when that process is watched.
///
/// This runs for every event of every process on the machine, so the common case is one helper call and
/// one compare: slot 0's host pid. Only with several targets, or while a target's host pid is still
/// unknown (leakwatch in a pid namespace, before the target ran a probe), does it scan the used slots, and
/// only in the latter case does it call the ns-pid helper, which costs about 100 ns more.
#[inline(always)]
fn watched_current() -> Option<u32> {
    let host = (bpf_get_current_pid_tgid() >> 32) as u32;
    // Host pid 0 is the idle task (softirq on an idle CPU), and 0 also marks an unknown host pid.
    if host == 0 {
        return None;
    }
    let set = watch_set()?;
    if set.slots[0].host_tgid == host {
        return Some(set.slots[0].tgid);
    }
    if set.used <= 1 && (set.slots[0].host_tgid != 0 || set.slots[0].tgid == 0) {
        return None;
    }
    watched_current_slow(set, host)
}

#[inline(always)]
fn watched_current_slow(set: &mut WatchSet, host: u32) -> Option<u32> {
    let mut ns_tgid = 0u32;
    let mut i = 0usize;
    while i < MAX_WATCHED as usize && i < set.used as usize {
        let slot = &mut set.slots[i];
        if slot.host_tgid == host && host != 0 {
            return Some(slot.tgid);
        }
        if slot.host_tgid == 0 && slot.tgid != 0 {
            if ns_tgid == 0 {
                ns_tgid = current_ns_tgid();
            }
            if ns_tgid != 0 && slot.tgid == ns_tgid {
                slot.host_tgid = host;
                return Some(slot.tgid);
            }
        }
        i += 1;
    }
    None
}

/// The current task's tgid in leakwatch's pid namespace; 0 when it has none there (a task of the host or a
/// sibling pod), or when leakwatch runs in the host's namespace (then userspace knows every host pid).
#[inline(always)]
fn current_ns_tgid() -> u32 {
    // SAFETY: rodata globals written by the loader before load.
    let (dev, ino) = unsafe {
        (
            core::ptr::read_volatile(&PIDNS_DEV),
            core::ptr::read_volatile(&PIDNS_INO),
        )
    };
    if ino == 0 {
        return 0;
    }
    let mut info = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: the helper writes at most `size` bytes into `info`, which lives on this stack frame.
    let rc = unsafe {
        bpf_get_ns_current_pid_tgid(
            dev,
            ino,
            &mut info,
            core::mem::size_of::<bpf_pidns_info>() as u32,
        )
    };
    if rc == 0 { info.tgid } else { 0 }
}

#[inline(always)]
fn in_pid_namespace() -> bool {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&PIDNS_INO) != 0 }
}

/// Reads a tracepoint field straight from the context: the verifier allows aligned loads from a
/// tracepoint's record, which saves a `bpf_probe_read` helper call per field on the hot path.
#[inline(always)]
fn read<T: Copy>(ctx: &TracePointContext, field: Field) -> T {
    // SAFETY: offsets and sizes are checked against the running kernel's tracepoint format before load,
    // and every field we read is naturally aligned in the record.
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(field.offset) as *const T) }
}

/// Transitions that only ever run in the syscall context of a task holding the socket (connect, listen,
/// close or shutdown). For these, current is the owner; every other transition may run in softirq, where
/// current is whichever task the CPU interrupted.
#[inline(always)]
fn in_owner_context(old: u8, new: u8) -> bool {
    use tcp_state::*;
    matches!(
        (old, new),
        (CLOSE, SYN_SENT) | (CLOSE, LISTEN) | (ESTABLISHED, FIN_WAIT1) | (CLOSE_WAIT, LAST_ACK)
    )
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_sock_state(&ctx);
    0
}

fn try_sock_state(ctx: &TracePointContext) -> Option<()> {
    if read::<u16>(ctx, layout::SOCK_PROTOCOL) != IPPROTO_TCP {
        return None;
    }
    let old = read::<i32>(ctx, layout::SOCK_OLDSTATE) as u8;
    let new = read::<i32>(ctx, layout::SOCK_NEWSTATE) as u8;
    // An owner-context transition made by an unwatched task is not ours: stop at the pid compare, without
    // the socket-table lookup. The one socket this can skip is a watched process's socket closed by an
    // unwatched process it shared the fd with; its next transition (in softirq, looked up) finds it and
    // moves it out of the state recorded in the table, so the live counts stay exact and only the skipped
    // transition's "into" count is missing.
    let owner_tgid = if in_owner_context(old, new) {
        Some(watched_current()?)
    } else {
        None
    };
    let dport: u16 = read(ctx, layout::SOCK_DPORT);
    // Older kernels (6.1) report an accepted socket's SYN_RECV before its remote port is set: it is tracked
    // under port 0, and while any socket is, a transition out of SYN_RECV is looked up to learn its port.
    let port_unknown = old == tcp_state::SYN_RECV && port_refs(0) != 0;
    if owner_tgid.is_none() && new != tcp_state::SYN_RECV && port_refs(dport) == 0 && !port_unknown
    {
        return None;
    }
    let skaddr: u64 = read(ctx, layout::SOCK_SKADDR);

    let mut c = counters();
    let (tgid, origin, port) = match SOCKS.get_ptr_mut(skaddr) {
        Some(owner) => {
            // SAFETY: value of a preallocated hash slot; a concurrent delete can at worst give a stale owner.
            let o = unsafe { &mut *owner };
            bump(&mut c, counter::STATE_OUT_BASE + o.state as u32);
            o.state = new;
            if o.port == 0 && dport != 0 {
                add_port_ref(0, u64::MAX);
                add_port_ref(dport, 1);
                o.port = dport;
            }
            (o.tgid, o.origin, o.port)
        }
        None => {
            let tgid = match owner_tgid {
                Some(t) => t,
                None if new == tcp_state::SYN_RECV => listener_owner(ctx)?,
                None => return None,
            };
            let origin = match (old, new) {
                (tcp_state::CLOSE, tcp_state::SYN_SENT) => origin::CONNECTED,
                (_, tcp_state::SYN_RECV) => origin::ACCEPTED,
                (_, tcp_state::LISTEN) => origin::LISTENER,
                _ => origin::UNKNOWN,
            };
            // A socket we cannot remember is not counted at all: counting its opening but never its
            // close would leave a phantom live socket behind.
            let owner = SockOwner {
                tgid,
                origin,
                state: new,
                port: dport,
            };
            if SOCKS.insert(skaddr, owner, 0).is_err() {
                bump(&mut c, counter::SOCK_TABLE_FULL);
                return None;
            }
            add_port_ref(dport, 1);
            bump(&mut c, counter::SOCK_TRACKED);
            bump(&mut c, counter::ORIGIN_OPEN_BASE + origin as u32);
            (tgid, origin, dport)
        }
    };

    bump(&mut c, counter::STATE_BASE + new as u32);
    match new {
        tcp_state::ESTABLISHED => bump(&mut c, counter::SOCK_ESTABLISHED),
        tcp_state::CLOSE_WAIT => bump(&mut c, counter::SOCK_CLOSE_WAIT),
        tcp_state::LISTEN => {
            let key = listen_key(
                read(ctx, layout::SOCK_FAMILY),
                read(ctx, layout::SOCK_SPORT),
            );
            if LISTENERS.insert(key, tgid, 0).is_err() {
                bump(&mut c, counter::LISTEN_TABLE_FULL);
            }
        }
        tcp_state::CLOSE => {
            bump(&mut c, counter::SOCK_CLOSED);
            bump(&mut c, counter::ORIGIN_CLOSE_BASE + origin as u32);
            let _ = SOCKS.remove(skaddr);
            add_port_ref(port, u64::MAX);
            if old == tcp_state::LISTEN {
                let key = listen_key(
                    read(ctx, layout::SOCK_FAMILY),
                    read(ctx, layout::SOCK_SPORT),
                );
                let _ = LISTENERS.remove(key);
            }
        }
        _ => {}
    }
    emit_sock_event(ctx, &mut c, tgid, skaddr, old, new);
    Some(())
}

#[inline(always)]
fn port_refs(port: u16) -> u64 {
    PORT_REFS.get(u32::from(port)).copied().unwrap_or(0)
}

/// Adds `delta` (u64::MAX to subtract one) to a port's count, atomically: two CPUs may track or close
/// sockets with the same remote port at once. The BPF target has no `core::sync::atomic` types, so this is
/// the instruction itself: BPF_XADD, a 64-bit atomic add every BPF CPU version has.
#[inline(always)]
fn add_port_ref(port: u16, delta: u64) {
    if let Some(p) = PORT_REFS.get_ptr_mut(u32::from(port)) {
        // SAFETY: `p` points to an aligned u64 slot of an array map, valid while the program runs.
        unsafe {
            core::arch::asm!("lock *(u64 *)({p} + 0) += {d}", p = in(reg) p, d = in(reg) delta);
        }
    }
}

/// The watched process listening on the port an embryonic socket arrived at, if any.
#[inline(always)]
fn listener_owner(ctx: &TracePointContext) -> Option<u32> {
    let key = listen_key(
        read(ctx, layout::SOCK_FAMILY),
        read(ctx, layout::SOCK_SPORT),
    );
    // SAFETY: plain u32 value.
    LISTENERS.get_ptr(key).map(|owner| unsafe { *owner })
}

/// Wake the reader only once a quarter of the ring is waiting. Waking it per record costs an irq_work
/// here and an epoll wake-up plus a task switch in userspace, for records it would happily read in a
/// batch: userspace also drains on a short timer, so a quiet ring is never left unread for long.
#[inline(always)]
fn wakeup_flags() -> u64 {
    // SAFETY: rodata global written by the loader before load.
    let ring_bytes = unsafe { core::ptr::read_volatile(&RING_BYTES) };
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) > ring_bytes / 4 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
fn emit_sock_event(
    ctx: &TracePointContext,
    c: &mut Option<&'static mut Counters>,
    tgid: u32,
    skaddr: u64,
    old: u8,
    new: u8,
) {
    let Some(mut entry) = EVENTS.reserve::<SockEvent>(0) else {
        bump(c, counter::EVENTS_LOST);
        return;
    };
    let mut ev = SockEvent {
        kind: event_kind::SOCK_STATE,
        oldstate: old,
        newstate: new,
        tgid,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        skaddr,
        family: read(ctx, layout::SOCK_FAMILY),
        sport: read(ctx, layout::SOCK_SPORT),
        dport: read(ctx, layout::SOCK_DPORT),
        ..SockEvent::default()
    };
    // Whole-word loads keep every access aligned, as the verifier requires for context reads.
    if ev.family == AF_INET {
        let s: u32 = read(ctx, layout::SOCK_SADDR);
        let d: u32 = read(ctx, layout::SOCK_DADDR);
        ev.saddr[..4].copy_from_slice(&s.to_ne_bytes());
        ev.daddr[..4].copy_from_slice(&d.to_ne_bytes());
    } else {
        for (field, out) in [
            (layout::SOCK_SADDR_V6, &mut ev.saddr),
            (layout::SOCK_DADDR_V6, &mut ev.daddr),
        ] {
            let lo: u64 = read(ctx, field);
            let hi: u64 = read(
                ctx,
                Field {
                    offset: field.offset + 8,
                    ..field
                },
            );
            out[..8].copy_from_slice(&lo.to_ne_bytes());
            out[8..].copy_from_slice(&hi.to_ne_bytes());
        }
    }
    entry.write(ev);
    entry.submit(wakeup_flags());
}

#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let Some(tgid) = watched_current() else {
        return 0;
    };
    let flags: u64 = read(&ctx, layout::NEWTASK_CLONE_FLAGS);
    let mut c = counters();
    if flags & CLONE_THREAD != 0 {
        bump(&mut c, counter::TASK_NEW_THREAD);
        return 0;
    }
    bump(&mut c, counter::PROCESS_FORK);
    let child: u32 = read(&ctx, layout::NEWTASK_PID);
    // SAFETY: rodata global written by the loader before load.
    let follow = unsafe { core::ptr::read_volatile(&FOLLOW_FORKS) };
    // The child's pid in the tracepoint is the host's; in a pid namespace userspace would not know it, and
    // follows forks there by rediscovery instead.
    if follow != 0 && child != 0 && !in_pid_namespace() {
        add_watched(child);
    }
    emit_process_event(&mut c, tgid, child, event_kind::PROCESS_FORK);
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    on_task_exit(|| read::<u8>(&ctx, layout::EXIT_GROUP_DEAD) != 0)
}

/// `sched_process_exit` for kernels whose record has no `group_dead` (6.12 and older): the process counts
/// as exited when its main thread exits. On `exit_group`, a fatal signal or a return from main all threads
/// die together, and exits of threads that come after the main thread's are not counted; a main thread
/// that calls `pthread_exit` while other threads run reads as the process exiting.
#[tracepoint]
pub fn sched_process_exit_main_thread(_ctx: TracePointContext) -> u32 {
    on_task_exit(|| {
        let id = bpf_get_current_pid_tgid();
        id as u32 == (id >> 32) as u32
    })
}

/// Counts a watched task's exit; `process_exits` is asked only then, keeping the unwatched path as short
/// as every other program's.
#[inline(always)]
fn on_task_exit(process_exits: impl FnOnce() -> bool) -> u32 {
    let Some(tgid) = watched_current() else {
        return 0;
    };
    let mut c = counters();
    bump(&mut c, counter::TASK_EXIT);
    if process_exits() {
        bump(&mut c, counter::PROCESS_EXIT);
        // Forget the pid now: if the kernel reuses it, the new process must not be watched by accident.
        remove_watched(tgid);
        emit_process_event(&mut c, tgid, tgid, event_kind::PROCESS_EXIT);
    }
    0
}

/// Puts a host pid in the first free slot (racy between CPUs, which at worst loses a fork to follow).
fn add_watched(pid: u32) {
    let Some(set) = watch_set() else { return };
    let mut i = 0usize;
    while i < MAX_WATCHED as usize {
        let slot = &mut set.slots[i];
        if slot.tgid == 0 {
            slot.tgid = pid;
            slot.host_tgid = pid;
            if set.used <= i as u32 {
                set.used = i as u32 + 1;
            }
            return;
        }
        i += 1;
    }
}

fn remove_watched(tgid: u32) {
    let Some(set) = watch_set() else { return };
    let mut i = 0usize;
    while i < MAX_WATCHED as usize {
        let slot = &mut set.slots[i];
        if slot.tgid == tgid {
            slot.host_tgid = 0;
            slot.tgid = 0;
        }
        i += 1;
    }
}

fn emit_process_event(c: &mut Option<&'static mut Counters>, tgid: u32, pid: u32, kind: u8) {
    let ev = ProcessEvent {
        kind,
        tgid,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid,
        ..ProcessEvent::default()
    };
    if EVENTS.output::<ProcessEvent>(&ev, wakeup_flags()).is_err() {
        bump(c, counter::EVENTS_LOST);
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
