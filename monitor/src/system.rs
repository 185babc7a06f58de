//! Host set-up the probes need: tracefs mounted, a memlock limit high enough on kernels that still
//! charge BPF maps to it, and BPF run-time statistics for the cost report.
use std::{fs, io, os::fd::OwnedFd, path::Path};

use thiserror::Error;

pub const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, Error)]
pub enum SystemError {
    #[error("tracefs is not mounted at {TRACEFS} and mounting it failed: {0}")]
    TracefsMount(io::Error),
    #[error("cannot read tracepoint format {path}: {source}")]
    Format { path: String, source: io::Error },
    #[error(
        "tracepoint {event} field {field}: kernel has offset {actual_offset} size {actual_size}, probes were built for offset {offset} size {size}"
    )]
    LayoutMismatch {
        event: String,
        field: String,
        offset: usize,
        size: usize,
        actual_offset: usize,
        actual_size: usize,
    },
    #[error("tracepoint {event} has no field {field}")]
    MissingField { event: String, field: String },
}

/// Mounts tracefs at its usual place when it is not there yet (aya attaches tracepoints by reading their
/// ids from it). Returns whether this call mounted it.
pub fn ensure_tracefs() -> Result<bool, SystemError> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(false);
    }
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: valid NUL-terminated strings, no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(SystemError::TracefsMount(io::Error::last_os_error()));
    }
    Ok(true)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; raising it is harmless on newer ones.
pub fn raise_memlock_rlimit() -> io::Result<()> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    // Without CAP_SYS_RESOURCE we may still raise the soft limit up to the hard one.
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) == 0 {
            current.rlim_cur = current.rlim_max;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &current);
        }
    }
    Err(err)
}

/// One field of a tracepoint `format` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatField {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

/// Parses the `field:` lines of a tracepoint format file. Lines that do not parse are skipped: the
/// caller only asks for the fields it needs and reports those that are missing.
pub fn parse_format(text: &str) -> Vec<FormatField> {
    text.lines().filter_map(parse_format_line).collect()
}

fn parse_format_line(line: &str) -> Option<FormatField> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    for part in line.trim().split(';') {
        let part = part.trim();
        if let Some(d) = part.strip_prefix("field:") {
            decl = Some(d.trim());
        } else if let Some(o) = part.strip_prefix("offset:") {
            offset = o.trim().parse().ok();
        } else if let Some(s) = part.strip_prefix("size:") {
            size = s.trim().parse().ok();
        }
    }
    // "const void * skaddr", "__u8 saddr[4]": the name is the last word, without an array suffix.
    let name = decl?.rsplit([' ', '*']).next()?;
    let name = name.split('[').next()?.to_string();
    Some(FormatField {
        name,
        offset: offset?,
        size: size?,
    })
}

/// Checks the running kernel's tracepoint layouts against what the probes were compiled for.
pub fn check_tracepoint_layout(
    expected: &[monitor_ebpf::layout::Field],
) -> Result<(), SystemError> {
    let mut cache: Vec<(&str, Vec<FormatField>)> = Vec::new();
    for &monitor_ebpf::layout::Field {
        event,
        name: field,
        offset,
        size,
    } in expected
    {
        if !cache.iter().any(|(e, _)| *e == event) {
            let path = format!("{TRACEFS}/events/{event}/format");
            let text =
                fs::read_to_string(&path).map_err(|source| SystemError::Format { path, source })?;
            cache.push((event, parse_format(&text)));
        }
        let fields = &cache
            .iter()
            .find(|(e, _)| *e == event)
            .expect("inserted above")
            .1;
        let found =
            fields
                .iter()
                .find(|f| f.name == field)
                .ok_or_else(|| SystemError::MissingField {
                    event: event.to_string(),
                    field: field.to_string(),
                })?;
        if found.offset != offset || found.size != size {
            return Err(SystemError::LayoutMismatch {
                event: event.to_string(),
                field: field.to_string(),
                offset,
                size,
                actual_offset: found.offset,
                actual_size: found.size,
            });
        }
    }
    Ok(())
}

/// Turns on the kernel's per-program run-time statistics while the returned fd lives (`BPF_ENABLE_STATS`),
/// falling back to the `kernel.bpf_stats_enabled` sysctl.
pub fn enable_bpf_stats() -> io::Result<Option<OwnedFd>> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Ok(Some(fd)),
        Err(_) => fs::write("/proc/sys/kernel/bpf_stats_enabled", b"1").map(|()| None),
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Capabilities leakwatch still needs once the probes are attached: reading another process's
/// `/proc/<pid>/fd` needs ptrace-read access (CAP_SYS_PTRACE when the target has capabilities we lack),
/// and DAC_READ_SEARCH covers /proc files of other users.
pub const KEPT_CAPABILITIES: [caps::Capability; 2] = [
    caps::Capability::CAP_SYS_PTRACE,
    caps::Capability::CAP_DAC_READ_SEARCH,
];

/// Whether this kernel refuses `read` (a map read on an open map fd) without CAP_BPF or CAP_SYS_ADMIN:
/// 5.10, with unprivileged BPF disabled, checks them on every bpf() call; 6.1 and later only when maps are
/// created and programs loaded. Tried with both out of this thread's effective set, then restored.
pub fn map_reads_need_cap_bpf(
    read: impl FnOnce() -> bool,
) -> Result<bool, caps::errors::CapsError> {
    use caps::{CapSet, Capability};
    let effective = caps::read(None, CapSet::Effective)?;
    let mut without = effective.clone();
    without.remove(&Capability::CAP_BPF);
    without.remove(&Capability::CAP_SYS_ADMIN);
    caps::set(None, CapSet::Effective, &without)?;
    let ok = read();
    caps::set(None, CapSet::Effective, &effective)?;
    Ok(!ok)
}

/// Drops every capability but [`KEPT_CAPABILITIES`] (and CAP_BPF when `keep_bpf`, for kernels where
/// [`map_reads_need_cap_bpf`]) from all sets (bounding included), so a bug in the sidecar cannot mount
/// anything or, without CAP_BPF, load programs after start-up. Map reads and updates on already-open map
/// fds keep working. Returns what was kept.
pub fn drop_capabilities(keep_bpf: bool) -> Result<Vec<caps::Capability>, caps::errors::CapsError> {
    use caps::{CapSet, Capability, CapsHashSet};
    let mut keep: CapsHashSet = KEPT_CAPABILITIES.into_iter().collect();
    if keep_bpf {
        keep.insert(Capability::CAP_BPF);
    }
    // Dropping from the bounding set needs CAP_SETPCAP, so it goes last.
    let mut order: Vec<Capability> = caps::all()
        .into_iter()
        .filter(|c| *c != Capability::CAP_SETPCAP)
        .collect();
    order.push(Capability::CAP_SETPCAP);
    for cap in order {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())?;
    let kept: CapsHashSet = caps::read(None, CapSet::Permitted)?
        .intersection(&keep)
        .copied()
        .collect();
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)?;
    let mut kept: Vec<_> = kept.into_iter().collect();
    kept.sort_by_key(|c| c.index());
    Ok(kept)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the probes' `bpf_ktime_get_ns` timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// leakwatch's own CPU time (user + system, seconds) and peak RSS (bytes), for reports on its cost.
pub fn own_usage() -> Option<(f64, u64)> {
    let me = procfs::process::Process::myself().ok()?;
    let stat = me.stat().ok()?;
    let hwm_kib = me.status().ok()?.vmhwm?;
    let cpu_s = (stat.utime + stat.stime) as f64 / procfs::ticks_per_second().max(1) as f64;
    Some((cpu_s, hwm_kib * 1024))
}

/// Inode of the host's (initial) pid namespace, fixed by the kernel (`PROC_PID_INIT_INO`).
const INIT_PID_NS_INO: u64 = 0xEFFF_FFFC;

/// `(dev, ino)` of leakwatch's own pid namespace when it is not the host's, else `None`. In a pod with a
/// shared process namespace, the pids leakwatch sees (and watches) are that namespace's; the probes need
/// its identity to translate the kernel's pids (`bpf_get_ns_current_pid_tgid`).
pub fn own_pid_namespace() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/proc/self/ns/pid").ok()?;
    (m.ino() != INIT_PID_NS_INO).then(|| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "name: inet_sock_set_state\nID: 2287\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;\n\
\nprint fmt: \"family=%s\"\n";

    #[test]
    fn parses_pointer_and_array_fields() {
        let fields = parse_format(SAMPLE);
        assert_eq!(fields.len(), 3);
        assert_eq!(
            fields[1],
            FormatField {
                name: "skaddr".into(),
                offset: 8,
                size: 8
            }
        );
        assert_eq!(
            fields[2],
            FormatField {
                name: "saddr_v6".into(),
                offset: 40,
                size: 16
            }
        );
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(parse_format("field:;offset:x;size:\n\u{0}\nfield:int a;offset:1;").is_empty());
    }
}
