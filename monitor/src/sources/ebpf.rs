//! The eBPF source: loads the embedded probes, attaches them, keeps the watched-process set in the kernel
//! up to date, and reads the per-CPU counters and the ring buffer of per-socket events.
//!
//! Loading can fail for reasons outside our control (no CAP_BPF, lockdown, an old kernel, a tracepoint
//! whose layout changed). Every such failure becomes one [`ProbeError`] whose message is the one line the
//! sidecar logs before carrying on in procfs-only mode; nothing here can take the target down.
use std::{os::fd::OwnedFd, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{ProgramError, TracePoint},
};
use monitor_ebpf::{
    Counters, EXIT_MAIN_THREAD_PROGRAM, GLOBAL_FOLLOW_FORKS, GLOBAL_PIDNS_DEV, GLOBAL_PIDNS_INO,
    GLOBAL_RING_BYTES, MAX_WATCHED, PROGRAMS, ProcessEvent, SockEvent, WatchSet, WatchSlot,
    counter, event_kind, layout, listen_key, map_name, origin, tcp_state,
};
use thiserror::Error;
use tokio::io::unix::AsyncFd;

use crate::{
    sample::{KernelCounters, KernelSample},
    system,
};

/// The probes object, embedded at build time (empty when built without an eBPF toolchain). Aligned: the
/// ELF parser reads its headers and instructions in place, as 8-byte words.
static PROBES_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leakwatch-probes.o"));

/// Whether this binary carries the eBPF object at all.
pub fn object_embedded() -> bool {
    !PROBES_OBJECT.is_empty()
}

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "this leakwatch binary was built without its eBPF object (run `cargo xtask build-ebpf`, then rebuild)"
    )]
    NoObject,
    #[error(transparent)]
    System(#[from] system::SystemError),
    #[error("the kernel refused the eBPF object: {0} (needs CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN)")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("already watching {MAX_WATCHED} processes")]
    WatchSetFull,
}

#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Cap of the in-kernel socket table.
    pub max_sockets: u32,
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Follow processes forked by a watched process.
    pub follow_forks: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            max_sockets: monitor_ebpf::DEFAULT_MAX_SOCKETS,
            ring_bytes: 1 << 22,
            follow_forks: false,
        }
    }
}

/// A decoded ring-buffer record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeEvent {
    Sock(SockEvent),
    Process(ProcessEvent),
}

/// Decodes one ring-buffer record; `None` for anything malformed (never trusts the length).
pub fn decode_event(bytes: &[u8]) -> Option<ProbeEvent> {
    match *bytes.first()? {
        event_kind::SOCK_STATE if bytes.len() >= size_of::<SockEvent>() => {
            // SAFETY: length checked; SockEvent is plain old data, read unaligned.
            Some(ProbeEvent::Sock(unsafe {
                std::ptr::read_unaligned(bytes.as_ptr().cast())
            }))
        }
        event_kind::PROCESS_FORK | event_kind::PROCESS_EXIT
            if bytes.len() >= size_of::<ProcessEvent>() =>
        {
            // SAFETY: as above.
            Some(ProbeEvent::Process(unsafe {
                std::ptr::read_unaligned(bytes.as_ptr().cast())
            }))
        }
        _ => None,
    }
}

/// Raw counter values, summed over CPUs, indexed by `monitor_ebpf::counter`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawCounters(pub Vec<u64>);

impl RawCounters {
    pub fn get(&self, index: u32) -> u64 {
        self.0.get(index as usize).copied().unwrap_or(0)
    }

    /// Transitions into a TCP state since attach.
    pub fn transitions_into(&self, state: u8) -> u64 {
        self.get(counter::STATE_BASE + state as u32)
    }

    /// Sockets alive per state and per origin, from the counters alone: exact even when the ring buffer
    /// dropped events, and constant-time however many sockets there are.
    pub fn to_kernel_sample(&self) -> KernelSample {
        let mut s = KernelSample {
            counters: self.to_kernel_counters(),
            ..KernelSample::default()
        };
        for state in 1..tcp_state::COUNT as u32 {
            if state == u32::from(tcp_state::CLOSE) {
                continue;
            }
            let into = self.get(counter::STATE_BASE + state);
            let out = self.get(counter::STATE_OUT_BASE + state);
            s.sockets_by_state[state as usize] = into.saturating_sub(out);
        }
        let live = |o: u8| {
            self.get(counter::ORIGIN_OPEN_BASE + u32::from(o))
                .saturating_sub(self.get(counter::ORIGIN_CLOSE_BASE + u32::from(o)))
        };
        s.opened = [origin::ACCEPTED, origin::CONNECTED]
            .iter()
            .map(|&o| self.get(counter::ORIGIN_OPEN_BASE + u32::from(o)))
            .sum();
        s.accepted_live = live(origin::ACCEPTED);
        s.connected_live = live(origin::CONNECTED);
        s.live_sockets = s.accepted_live + s.connected_live + live(origin::UNKNOWN);
        s
    }

    pub fn to_kernel_counters(&self) -> KernelCounters {
        KernelCounters::from_indexed(|index| self.get(index))
    }
}

/// Kernel run-time statistics of one program (needs BPF stats enabled).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProgramStats {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

impl ProgramStats {
    pub fn ns_per_event(&self) -> Option<f64> {
        (self.run_count > 0).then(|| self.run_time_ns as f64 / self.run_count as f64)
    }
}

/// Loaded and attached probes. Dropping it detaches everything (nothing is pinned).
pub struct Probes {
    ebpf: Ebpf,
    watched: Array<MapData, WatchSet>,
    /// Whether the kernel's host pids are the ones userspace sees (no pid namespace of our own).
    host_pids: bool,
    listeners: BpfHashMap<MapData, u32, u32>,
    counters: PerCpuArray<MapData, Counters>,
    ring: Option<RingBuf<MapData>>,
    fallback: Option<String>,
    _stats: Option<OwnedFd>,
}

/// Kernels up to 6.12 have no `group_dead` in `sched_process_exit`: the exit program then reads a process's
/// exit from its main thread's (see the probe). Any other layout problem is the usual hard failure.
fn exit_fallback() -> Result<Option<String>, ProbeError> {
    match system::check_tracepoint_layout(layout::OPTIONAL) {
        Ok(()) => Ok(None),
        Err(system::SystemError::MissingField { event, field }) => Ok(Some(format!(
            "tracepoint {event} has no field {field}: a process's exit is read from its main thread's"
        ))),
        Err(e) => Err(e.into()),
    }
}

impl Probes {
    /// Checks the host, loads and attaches every program. `stats` turns on kernel run-time statistics.
    pub fn load(opts: &ProbeOptions, stats: bool) -> Result<Self, ProbeError> {
        if !object_embedded() {
            return Err(ProbeError::NoObject);
        }
        system::ensure_tracefs()?;
        system::check_tracepoint_layout(layout::EXPECTED)?;
        let fallback = exit_fallback()?;
        // Only matters on kernels < 5.11; a failure here surfaces as a load error below if it mattered.
        let _ = system::raise_memlock_rlimit();
        let follow = u8::from(opts.follow_forks);
        let (pidns_dev, pidns_ino) = system::own_pid_namespace().unwrap_or((0, 0));
        let ring_bytes = u64::from(opts.ring_bytes);
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_FOLLOW_FORKS, &follow, true)
            .override_global(GLOBAL_PIDNS_DEV, &pidns_dev, true)
            .override_global(GLOBAL_PIDNS_INO, &pidns_ino, true)
            .override_global(GLOBAL_RING_BYTES, &ring_bytes, true)
            .map_max_entries(map_name::SOCKS, opts.max_sockets)
            .map_max_entries(map_name::EVENTS, opts.ring_bytes)
            .load(PROBES_OBJECT)?;
        let stats_fd = if stats {
            system::enable_bpf_stats().ok().flatten()
        } else {
            None
        };
        for &(name, category, tracepoint) in PROGRAMS {
            let name = match fallback {
                Some(_) if name == "sched_process_exit" => EXIT_MAIN_THREAD_PROGRAM,
                _ => name,
            };
            let program: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or(ProbeError::Program {
                    name,
                    source: ProgramError::NotLoaded,
                })?
                .try_into()
                .map_err(|source| ProbeError::Program { name, source })?;
            program
                .load()
                .map_err(|source| ProbeError::Program { name, source })?;
            program
                .attach(category, tracepoint)
                .map_err(|source| ProbeError::Program { name, source })?;
        }
        let watched = take_map(&mut ebpf, map_name::WATCHED)?;
        let listeners = take_map(&mut ebpf, map_name::LISTENERS)?;
        let counters = take_map(&mut ebpf, map_name::COUNTERS)?;
        let ring = Some(take_map(&mut ebpf, map_name::EVENTS)?);
        Ok(Self {
            ebpf,
            watched,
            host_pids: pidns_ino == 0,
            listeners,
            counters,
            ring,
            fallback,
            _stats: stats_fd,
        })
    }

    /// What this kernel lacks and what the probes do instead, in one line; `None` when nothing is missing.
    pub fn fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    fn set(&self) -> WatchSet {
        self.watched.get(&0, 0).unwrap_or_default()
    }

    fn store(&mut self, set: &WatchSet) -> Result<(), ProbeError> {
        self.watched
            .set(0, set, 0)
            .map_err(|source| ProbeError::Map {
                name: map_name::WATCHED,
                source,
            })
    }

    pub fn watch(&mut self, tgid: u32) -> Result<(), ProbeError> {
        let mut set = self.set();
        if set.slots.iter().any(|s| s.tgid == tgid) {
            return Ok(());
        }
        let free = set
            .slots
            .iter()
            .position(|s| s.tgid == 0)
            .ok_or(ProbeError::WatchSetFull)?;
        // In a pid namespace of our own the host pid is unknown here: 0 asks the probes to learn it.
        set.slots[free] = WatchSlot {
            tgid,
            host_tgid: if self.host_pids { tgid } else { 0 },
        };
        set.used = set.used.max(free as u32 + 1);
        self.store(&set)
    }

    pub fn unwatch(&mut self, tgid: u32) {
        // Already gone is fine: the exit probe frees a process's slot itself.
        let mut set = self.set();
        for s in set.slots.iter_mut().filter(|s| s.tgid == tgid) {
            *s = WatchSlot::default();
        }
        let _ = self.store(&set);
    }

    pub fn watched(&self) -> Vec<u32> {
        self.set()
            .slots
            .iter()
            .map(|s| s.tgid)
            .filter(|&t| t != 0)
            .collect()
    }

    /// Tells the kernel which listening ports belong to `tgid`, for listeners opened before attach:
    /// without this their accepted children could not be attributed.
    pub fn seed_listeners(&mut self, tgid: u32, ports: &[(u16, u16)]) -> Result<(), ProbeError> {
        for &(family, port) in ports {
            self.listeners
                .insert(listen_key(family, port), tgid, 0)
                .map_err(|source| ProbeError::Map {
                    name: map_name::LISTENERS,
                    source,
                })?;
        }
        Ok(())
    }

    pub fn counters(&self) -> Result<RawCounters, ProbeError> {
        let per_cpu = self.counters.get(&0, 0).map_err(|source| ProbeError::Map {
            name: map_name::COUNTERS,
            source,
        })?;
        let mut values = vec![0u64; counter::COUNT as usize];
        for cpu in per_cpu.iter() {
            for (sum, v) in values.iter_mut().zip(cpu.v.iter()) {
                *sum += v;
            }
        }
        Ok(RawCounters(values))
    }

    /// The ring buffer, for the event pump; `None` once taken.
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }

    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some(ProgramStats {
                    name: name.to_string(),
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                })
            })
            .collect()
    }
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, ProbeError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(ProbeError::MissingMap(name))?;
    M::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

/// Drains every record currently in the ring buffer, without waiting.
pub fn drain_ring(ring: &mut RingBuf<MapData>, mut on_event: impl FnMut(ProbeEvent)) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        if let Some(ev) = decode_event(&item) {
            on_event(ev);
        }
        n += 1;
    }
    n
}

/// Waits until the probes wake the reader (a quarter of the ring is full) or `timeout` passes, then drains
/// the ring. The probes do not wake the reader per record, so the timeout is what bounds the latency of a
/// quiet ring: keep it short.
pub async fn pump_ring(
    ring: &mut AsyncFd<RingBuf<MapData>>,
    timeout: Duration,
    on_event: impl FnMut(ProbeEvent),
) -> std::io::Result<usize> {
    let Ok(guard) = tokio::time::timeout(timeout, ring.readable_mut()).await else {
        return Ok(drain_ring(ring.get_mut(), on_event));
    };
    let mut guard = guard?;
    let n = drain_ring(guard.get_inner_mut(), on_event);
    guard.clear_ready();
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_rejects_short_and_unknown_records() {
        assert_eq!(decode_event(&[]), None);
        assert_eq!(decode_event(&[event_kind::SOCK_STATE; 10]), None);
        assert_eq!(decode_event(&[99; 64]), None);
    }

    #[test]
    fn decode_round_trips_a_sock_event() {
        let ev = SockEvent {
            kind: event_kind::SOCK_STATE,
            oldstate: 7,
            newstate: 2,
            tgid: 9,
            skaddr: 5,
            ..Default::default()
        };
        // SAFETY: SockEvent is repr(C) plain data.
        let bytes: [u8; 64] = unsafe { std::mem::transmute(ev) };
        assert_eq!(decode_event(&bytes), Some(ProbeEvent::Sock(ev)));
    }
}

#[cfg(test)]
mod sample_tests {
    use super::*;

    #[test]
    fn live_counts_are_into_minus_out_per_state_and_origin() {
        let mut v = vec![0u64; counter::COUNT as usize];
        let mut set = |i: u32, x: u64| v[i as usize] = x;
        set(counter::STATE_BASE + u32::from(tcp_state::ESTABLISHED), 10);
        set(
            counter::STATE_OUT_BASE + u32::from(tcp_state::ESTABLISHED),
            7,
        );
        set(counter::STATE_BASE + u32::from(tcp_state::CLOSE), 99);
        set(counter::ORIGIN_OPEN_BASE + u32::from(origin::ACCEPTED), 6);
        set(counter::ORIGIN_CLOSE_BASE + u32::from(origin::ACCEPTED), 4);
        set(counter::ORIGIN_OPEN_BASE + u32::from(origin::CONNECTED), 5);
        set(counter::ORIGIN_CLOSE_BASE + u32::from(origin::CONNECTED), 4);
        set(counter::ORIGIN_OPEN_BASE + u32::from(origin::LISTENER), 1);
        // Sockets from before the probes, first seen on their way out.
        set(counter::ORIGIN_OPEN_BASE + u32::from(origin::UNKNOWN), 50);
        let s = RawCounters(v).to_kernel_sample();
        assert_eq!(s.opened, 11, "connected and accepted only");
        assert_eq!(s.in_state(tcp_state::ESTABLISHED), 3);
        assert_eq!(s.in_state(tcp_state::CLOSE), 0, "CLOSE is not a live state");
        assert_eq!((s.accepted_live, s.connected_live), (2, 1));
        assert_eq!(
            s.live_sockets, 53,
            "listeners are not connections; old sockets still live are"
        );
    }
}
