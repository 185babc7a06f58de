use aya_ebpf::{
    EbpfContext,
    bindings::bpf_pidns_info,
    helpers::{bpf_get_current_pid_tgid, bpf_get_ns_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use monitor_ebpf::{
    Counters, MAX_WATCHED, ProcessEvent, SockEvent, SockOwner, counter, event_kind, fd_key, layout,
    listen_key, origin, tcp_state,
};

const IPPROTO_TCP: u16 = 6;
const AF_INET: u16 = 2;
const CLONE_THREAD: u64 = 0x0001_0000;
const EINPROGRESS: i64 = 115;

/// Watched process ids, one per slot, 0 = free. Userspace fills it; forks are added here when following.
#[map]
static WATCHED: Array<u32> = Array::with_max_entries(MAX_WATCHED, 0);

/// Sockets attributed to a watched process, by `struct sock` address. Max entries are set by the loader.
#[map]
static SOCKS: HashMap<u64, SockOwner> = HashMap::with_max_entries(65536, 0);

/// Socket fds handed out by socket()/accept() to a watched process: key (tgid << 32 | fd).
#[map]
static SOCK_FDS: HashMap<u64, u32> = HashMap::with_max_entries(65536, 0);

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

/// This CPU's counters. Looked up once per event; `None` cannot happen for index 0 of a per-CPU array,
/// but the verifier wants the check.
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

/// Set by the loader (rodata) when leakwatch runs in a pid namespace of its own (a pod with
/// `shareProcessNamespace`): the device and inode of that namespace. The pids userspace puts in `WATCHED`
/// are then that namespace's, while the kernel's current pid is the host's, so the probes must ask the
/// kernel for the pid as that namespace sees it. Zero (the host namespace) keeps the cheaper helper.
#[unsafe(no_mangle)]
static PIDNS_DEV: u64 = 0;
#[unsafe(no_mangle)]
static PIDNS_INO: u64 = 0;

#[inline(always)]
fn current_tgid() -> u32 {
    // SAFETY: rodata globals written by the loader before load.
    let (dev, ino) = unsafe {
        (
            core::ptr::read_volatile(&PIDNS_DEV),
            core::ptr::read_volatile(&PIDNS_INO),
        )
    };
    if ino == 0 {
        return (bpf_get_current_pid_tgid() >> 32) as u32;
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
    // A task outside leakwatch's namespace (the host's or a sibling pod's) has no pid in it: tgid 0, which
    // is_watched() never matches.
    if rc == 0 { info.tgid } else { 0 }
}

#[inline(always)]
fn in_pid_namespace() -> bool {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&PIDNS_INO) != 0 }
}

#[inline(always)]
fn is_watched(tgid: u32) -> bool {
    // tgid 0 is the idle task (softirq on an idle CPU), and 0 also marks a free slot.
    if tgid == 0 {
        return false;
    }
    let mut i = 0;
    while i < MAX_WATCHED {
        if WATCHED.get(i).is_some_and(|w| *w == tgid) {
            return true;
        }
        i += 1;
    }
    false
}

/// Reads a tracepoint field straight from the context: the verifier allows aligned loads from a
/// tracepoint's record, which saves a `bpf_probe_read` helper call per field on the hot path.
#[inline(always)]
fn read<T: Copy>(ctx: &TracePointContext, offset: usize) -> Option<T> {
    // SAFETY: offsets and sizes are checked against the running kernel's tracepoint format before load,
    // and every field we read is naturally aligned in the record.
    Some(unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(offset) as *const T) })
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_sock_state(&ctx);
    0
}

fn try_sock_state(ctx: &TracePointContext) -> Option<()> {
    if read::<u16>(ctx, layout::SOCK_PROTOCOL)? != IPPROTO_TCP {
        return None;
    }
    let skaddr: u64 = read(ctx, layout::SOCK_SKADDR)?;
    let old = read::<i32>(ctx, layout::SOCK_OLDSTATE)? as u8;
    let new = read::<i32>(ctx, layout::SOCK_NEWSTATE)? as u8;

    let mut c = counters();
    let (tgid, origin) = match SOCKS.get_ptr(skaddr) {
        Some(owner) => {
            // SAFETY: value is a plain struct; a concurrent delete can at worst give a stale owner.
            let o = unsafe { *owner };
            bump(&mut c, counter::STATE_OUT_BASE + old as u32);
            (o.tgid, o.origin)
        }
        None => {
            let tgid = attribute(ctx, old, new)?;
            let origin = match (old, new) {
                (tcp_state::CLOSE, tcp_state::SYN_SENT) => origin::CONNECTED,
                (_, tcp_state::SYN_RECV) => origin::ACCEPTED,
                (_, tcp_state::LISTEN) => origin::LISTENER,
                _ => origin::UNKNOWN,
            };
            // A socket we cannot remember is not counted at all: counting its opening but never its
            // close would leave a phantom live socket behind.
            if SOCKS
                .insert(
                    skaddr,
                    SockOwner {
                        tgid,
                        origin,
                        _pad: [0; 3],
                    },
                    0,
                )
                .is_err()
            {
                bump(&mut c, counter::SOCK_TABLE_FULL);
                return None;
            }
            bump(&mut c, counter::SOCK_TRACKED);
            bump(&mut c, counter::ORIGIN_OPEN_BASE + origin as u32);
            (tgid, origin)
        }
    };

    bump(&mut c, counter::STATE_BASE + new as u32);
    match new {
        tcp_state::ESTABLISHED => bump(&mut c, counter::SOCK_ESTABLISHED),
        tcp_state::CLOSE_WAIT => bump(&mut c, counter::SOCK_CLOSE_WAIT),
        tcp_state::LISTEN => {
            let family: u16 = read(ctx, layout::SOCK_FAMILY)?;
            let port: u16 = read(ctx, layout::SOCK_SPORT)?;
            if LISTENERS.insert(listen_key(family, port), tgid, 0).is_err() {
                bump(&mut c, counter::LISTEN_TABLE_FULL);
            }
        }
        tcp_state::CLOSE => {
            bump(&mut c, counter::SOCK_CLOSED);
            bump(&mut c, counter::ORIGIN_CLOSE_BASE + origin as u32);
            let _ = SOCKS.remove(skaddr);
            if old == tcp_state::LISTEN {
                let family: u16 = read(ctx, layout::SOCK_FAMILY)?;
                let port: u16 = read(ctx, layout::SOCK_SPORT)?;
                let _ = LISTENERS.remove(listen_key(family, port));
            }
        }
        _ => {}
    }
    emit_sock_event(ctx, &mut c, tgid, skaddr, old, new);
    Some(())
}

/// Decides whether an untracked socket belongs to a watched process; see the module comment.
#[inline(always)]
fn attribute(ctx: &TracePointContext, old: u8, new: u8) -> Option<u32> {
    use tcp_state::*;
    let in_owner_context = matches!(
        (old, new),
        (CLOSE, SYN_SENT) | (CLOSE, LISTEN) | (ESTABLISHED, FIN_WAIT1) | (CLOSE_WAIT, LAST_ACK)
    );
    if in_owner_context {
        let tgid = current_tgid();
        return is_watched(tgid).then_some(tgid);
    }
    if new == SYN_RECV {
        let family: u16 = read(ctx, layout::SOCK_FAMILY)?;
        let port: u16 = read(ctx, layout::SOCK_SPORT)?;
        let owner = LISTENERS.get_ptr(listen_key(family, port))?;
        // SAFETY: plain u32 value.
        return Some(unsafe { *owner });
    }
    None
}

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_RING_SIZE: u64 = 1;

/// Wake the reader only once a quarter of the ring is waiting. Waking it per record costs an irq_work
/// here and an epoll wake-up plus a task switch in userspace, for records it would happily read in a
/// batch: userspace also drains on a short timer, so a quiet ring is never left unread for long.
#[inline(always)]
fn wakeup_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) > EVENTS.query(BPF_RB_RING_SIZE) / 4 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
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
        family: read(ctx, layout::SOCK_FAMILY).unwrap_or(0),
        sport: read(ctx, layout::SOCK_SPORT).unwrap_or(0),
        dport: read(ctx, layout::SOCK_DPORT).unwrap_or(0),
        ..SockEvent::default()
    };
    // Whole-word loads keep every access aligned, as the verifier requires for context reads.
    if ev.family == AF_INET {
        let s: u32 = read(ctx, layout::SOCK_SADDR).unwrap_or_default();
        let d: u32 = read(ctx, layout::SOCK_DADDR).unwrap_or_default();
        ev.saddr[..4].copy_from_slice(&s.to_ne_bytes());
        ev.daddr[..4].copy_from_slice(&d.to_ne_bytes());
    } else {
        for (i, off) in [(0, layout::SOCK_SADDR_V6), (8, layout::SOCK_SADDR_V6 + 8)] {
            let w: u64 = read(ctx, off).unwrap_or_default();
            ev.saddr[i..i + 8].copy_from_slice(&w.to_ne_bytes());
        }
        for (i, off) in [(0, layout::SOCK_DADDR_V6), (8, layout::SOCK_DADDR_V6 + 8)] {
            let w: u64 = read(ctx, off).unwrap_or_default();
            ev.daddr[i..i + 8].copy_from_slice(&w.to_ne_bytes());
        }
    }
    entry.write(ev);
    entry.submit(wakeup_flags());
}

#[inline(always)]
fn on_new_socket_fd(ctx: &TracePointContext, which: u32) {
    let tgid = current_tgid();
    if !is_watched(tgid) {
        return;
    }
    let Some(ret) = read::<i64>(ctx, layout::SYSCALL_RET) else {
        return;
    };
    if ret < 0 {
        return;
    }
    let mut c = counters();
    bump(&mut c, which);
    if SOCK_FDS.insert(fd_key(tgid, ret as u32), 0, 0).is_err() {
        bump(&mut c, counter::FD_TABLE_FULL);
    }
}

#[tracepoint]
pub fn sys_exit_socket(ctx: TracePointContext) -> u32 {
    on_new_socket_fd(&ctx, counter::SYS_SOCKET);
    0
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    on_new_socket_fd(&ctx, counter::SYS_ACCEPT);
    0
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    on_new_socket_fd(&ctx, counter::SYS_ACCEPT);
    0
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    if is_watched(current_tgid()) {
        let ret = read::<i64>(&ctx, layout::SYSCALL_RET).unwrap_or(-1);
        if ret == 0 || ret == -EINPROGRESS {
            bump(&mut counters(), counter::SYS_CONNECT);
        }
    }
    0
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let tgid = current_tgid();
    if !is_watched(tgid) {
        return 0;
    }
    if let Some(fd) = read::<u64>(&ctx, layout::SYSCALL_ARG0) {
        let key = fd_key(tgid, fd as u32);
        if SOCK_FDS.get_ptr(key).is_some() {
            let _ = SOCK_FDS.remove(key);
            bump(&mut counters(), counter::SYS_CLOSE_SOCKET_FD);
        }
    }
    0
}

#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let tgid = current_tgid();
    if !is_watched(tgid) {
        return 0;
    }
    let flags: u64 = read(&ctx, layout::NEWTASK_CLONE_FLAGS).unwrap_or(0);
    let mut c = counters();
    if flags & CLONE_THREAD != 0 {
        bump(&mut c, counter::TASK_NEW_THREAD);
        return 0;
    }
    bump(&mut c, counter::PROCESS_FORK);
    let child: u32 = read(&ctx, layout::NEWTASK_PID).unwrap_or(0);
    // SAFETY: rodata global written by the loader before load.
    let follow = unsafe { core::ptr::read_volatile(&FOLLOW_FORKS) };
    // The child's pid in the tracepoint is the host's; in a pid namespace it would never match, and
    // userspace follows forks there by rediscovery instead.
    if follow != 0 && child != 0 && !in_pid_namespace() {
        add_watched(child);
    }
    emit_process_event(&mut c, tgid, child, event_kind::PROCESS_FORK);
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let tgid = current_tgid();
    if !is_watched(tgid) {
        return 0;
    }
    let mut c = counters();
    bump(&mut c, counter::TASK_EXIT);
    let group_dead: u8 = read(&ctx, layout::EXIT_GROUP_DEAD).unwrap_or(0);
    if group_dead != 0 {
        bump(&mut c, counter::PROCESS_EXIT);
        // Forget the pid now: if the kernel reuses it, the new process must not be watched by accident.
        remove_watched(tgid);
        emit_process_event(&mut c, tgid, tgid, event_kind::PROCESS_EXIT);
    }
    0
}

/// Puts a pid in the first free slot (racy between CPUs, which at worst loses a fork to follow).
fn add_watched(pid: u32) {
    let mut i = 0;
    while i < MAX_WATCHED {
        if let Some(slot) = WATCHED.get_ptr_mut(i) {
            // SAFETY: array slot of a map we own.
            unsafe {
                if *slot == 0 {
                    *slot = pid;
                    return;
                }
            }
        }
        i += 1;
    }
}

fn remove_watched(pid: u32) {
    let mut i = 0;
    while i < MAX_WATCHED {
        if let Some(slot) = WATCHED.get_ptr_mut(i) {
            // SAFETY: as above.
            unsafe {
                if *slot == pid {
                    *slot = 0;
                }
            }
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
