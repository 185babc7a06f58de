//! The procfs sampler: the target's fds, its sockets joined with the namespace's TCP tables, threads,
//! memory and fd limit. Everything is read with a size bound and parsed by small pure functions (fuzzed);
//! the target vanishing mid-scan is an expected outcome ([`ProcError::Gone`]), not a failure.
//!
//! `stat`, `limits`, `cmdline` and the pid listing are the `procfs` crate's (the only `/proc/<pid>/stat`
//! parser of leakwatch, also used for its own usage in [`crate::system::own_usage`]). The TCP join stays
//! hand-written: see [`ProcfsSampler::tcp_entries`].
use std::{
    collections::HashSet,
    fs,
    io::{self, BufRead, BufReader, Read},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use procfs::{
    FromRead,
    process::{LimitValue, Limits, Stat},
};
use thiserror::Error;

use crate::sample::{ProcSample, TargetId};

/// /proc/<pid>/net/tcp can be large on a busy node, but not unbounded.
const MAX_TABLE_BYTES: u64 = 256 << 20;
const MAX_SMALL_FILE: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum ProcError {
    #[error("the process is gone")]
    Gone,
    #[error("permission denied reading {0} (needs CAP_SYS_PTRACE or the same user as the target)")]
    Permission(String),
    #[error("reading {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("unexpected content in {path}: {what}")]
    Parse { path: String, what: String },
}

fn io_err(path: &Path, e: io::Error) -> ProcError {
    match e.kind() {
        io::ErrorKind::NotFound => ProcError::Gone,
        io::ErrorKind::PermissionDenied => ProcError::Permission(path.display().to_string()),
        // ESRCH: the process exited while we read its files.
        _ if e.raw_os_error() == Some(libc::ESRCH) => ProcError::Gone,
        _ => ProcError::Io {
            path: path.display().to_string(),
            source: e,
        },
    }
}

fn read_bounded(path: &Path, limit: u64) -> Result<String, ProcError> {
    let f = fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut s = String::new();
    f.take(limit)
        .read_to_string(&mut s)
        .map_err(|e| io_err(path, e))?;
    Ok(s)
}

/// One line of /proc/net/tcp{,6}.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    pub inode: u64,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed /proc/net/tcp line: {0}")]
pub struct LineError(pub &'static str);

/// Parses `0100007F:1F90` (IPv4) or the 32-hex-digit IPv6 form. The kernel prints each 32-bit word of the
/// address in host byte order, hence the per-word swap.
pub fn parse_hex_addr(s: &str) -> Result<SocketAddr, LineError> {
    let (ip, port) = s.split_once(':').ok_or(LineError("address without port"))?;
    let port = u16::from_str_radix(port, 16).map_err(|_| LineError("bad port"))?;
    let ip = match ip.len() {
        8 => {
            let w = u32::from_str_radix(ip, 16).map_err(|_| LineError("bad IPv4 address"))?;
            IpAddr::V4(Ipv4Addr::from(w.to_le_bytes()))
        }
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                let word = ip
                    .get(i * 8..i * 8 + 8)
                    .ok_or(LineError("bad IPv6 address"))?;
                let w = u32::from_str_radix(word, 16).map_err(|_| LineError("bad IPv6 address"))?;
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return Err(LineError("address of unexpected length")),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Parses one data line of /proc/net/tcp or tcp6 (not the header).
pub fn parse_tcp_line(line: &str) -> Result<TcpEntry, LineError> {
    let mut f = line.split_whitespace();
    let _slot = f.next().ok_or(LineError("empty line"))?;
    let local = parse_hex_addr(f.next().ok_or(LineError("no local address"))?)?;
    let remote = parse_hex_addr(f.next().ok_or(LineError("no remote address"))?)?;
    let state = u8::from_str_radix(f.next().ok_or(LineError("no state"))?, 16)
        .map_err(|_| LineError("bad state"))?;
    // tx_queue:rx_queue, tr:tm->when, retrnsmt, uid, timeout, then the inode.
    let inode = f
        .nth(5)
        .ok_or(LineError("no inode"))?
        .parse()
        .map_err(|_| LineError("bad inode"))?;
    Ok(TcpEntry {
        local,
        remote,
        state,
        inode,
    })
}

/// The inode of a `socket:[12345]` fd link.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// `Max open files` soft limit from /proc/<pid>/limits (the `procfs` crate's parser); `None` when
/// unlimited, absent or garbled.
pub fn parse_fd_limit(limits: &str) -> Option<u64> {
    // The crate indexes each line from its end assuming the kernel's layout (at least a name, two
    // values and a unit); a shorter line would underflow there, so garbage is dropped first.
    let lines: String = limits
        .lines()
        .filter(|l| l.split_whitespace().count() >= 4)
        .map(|l| format!("{l}\n"))
        .collect();
    match Limits::from_read(lines.as_bytes())
        .ok()?
        .max_open_files
        .soft_limit
    {
        LimitValue::Value(v) => Some(v),
        LimitValue::Unlimited => None,
    }
}

/// `/proc/<pid>/stat` parsed by the `procfs` crate; `None` when garbled.
pub fn parse_stat_full(stat: &str) -> Option<Stat> {
    // The crate slices around the command name assuming the kernel's `pid (comm) state ...` layout;
    // input of another shape is refused here rather than left to panic there.
    let t = stat.trim();
    let open = t.find('(')?;
    let close = t.rfind(')')?;
    let shaped = open >= 2
        && t.as_bytes()[open - 1] == b' '
        && t[..open - 1].bytes().all(|b| b.is_ascii_digit())
        && close > open
        && t.as_bytes().get(close + 1) == Some(&b' ')
        && close + 2 < t.len();
    if !shaped {
        return None;
    }
    Stat::from_read(t.as_bytes()).ok()
}

/// (threads, rss pages, start time in ticks) from /proc/<pid>/stat.
pub fn parse_stat(stat: &str) -> Option<(u64, u64, u64)> {
    let s = parse_stat_full(stat)?;
    Some((u64::try_from(s.num_threads).ok()?, s.rss, s.starttime))
}

/// One socket of the target, for /status and for seeding the probes' listener table.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProcSocket {
    pub inode: u64,
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

#[derive(Clone, Debug)]
pub struct ProcfsSampler {
    root: PathBuf,
    page_size: u64,
}

impl Default for ProcfsSampler {
    fn default() -> Self {
        Self::new("/proc")
    }
}

impl ProcfsSampler {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Self {
            root: root.into(),
            page_size: if page > 0 { page as u64 } else { 4096 },
        }
    }

    fn pid_path(&self, pid: u32, rel: &str) -> PathBuf {
        self.root.join(pid.to_string()).join(rel)
    }

    /// (threads, RSS pages, start time) from `/proc/<pid>/stat`.
    fn stat(&self, pid: u32) -> Result<(u64, u64, u64), ProcError> {
        let path = self.pid_path(pid, "stat");
        let stat = read_bounded(&path, MAX_SMALL_FILE)?;
        parse_stat(&stat).ok_or(ProcError::Parse {
            path: path.display().to_string(),
            what: "stat".into(),
        })
    }

    /// Seconds since the process started (`/proc/uptime` minus its start time); `None` if unreadable.
    fn age_s(&self, start_ticks: u64) -> Option<f64> {
        let uptime = read_bounded(&self.root.join("uptime"), MAX_SMALL_FILE).ok()?;
        let up: f64 = uptime.split_whitespace().next()?.parse().ok()?;
        let hz = procfs::ticks_per_second();
        (hz > 0).then(|| (up - start_ticks as f64 / hz as f64).max(0.0))
    }

    /// Identity of the process (pid + start time), `Gone` if it does not exist.
    pub fn target_id(&self, pid: u32) -> Result<TargetId, ProcError> {
        let (_, _, start) = self.stat(pid)?;
        Ok(TargetId {
            pid,
            start_ticks: start,
        })
    }

    /// The number of open fds alone: one readdir, no readlink per fd.
    fn fd_count(&self, pid: u32) -> Result<u64, ProcError> {
        let dir = self.pid_path(pid, "fd");
        let entries = fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?;
        Ok(entries.count() as u64)
    }

    /// Socket inodes behind the process's fds, and the number of fds.
    fn fds(&self, pid: u32) -> Result<(u64, HashSet<u64>), ProcError> {
        let dir = self.pid_path(pid, "fd");
        let entries = fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?;
        let mut count = 0;
        let mut sockets = HashSet::new();
        for entry in entries {
            let Ok(entry) = entry else { continue };
            count += 1;
            // An fd closed between readdir and readlink is simply no longer there.
            if let Ok(link) = fs::read_link(entry.path()) {
                if let Some(inode) = link.to_str().and_then(socket_inode) {
                    sockets.insert(inode);
                }
            }
        }
        Ok((count, sockets))
    }

    /// The inodes of the process's sockets (every family), from its `/proc/<pid>/fd` links: what picks the
    /// target's sockets out of a namespace-wide listing such as a sock_diag dump.
    pub fn socket_inodes(&self, pid: u32) -> Result<HashSet<u64>, ProcError> {
        Ok(self.fds(pid)?.1)
    }

    /// Streams the namespace's TCP tables, keeping the entries whose inode is in `inodes`.
    ///
    /// Hand-written on purpose, not the `procfs` crate's `net::tcp`: the table lists every socket of the
    /// network namespace (TIME_WAIT included), and the crate parses every line into an entry before any
    /// can be skipped. This streams the lines and drops those whose inode is not the target's before
    /// parsing addresses. Measured (README "Figures"): one line parsed costs 239 ns, and a full join
    /// takes 107 / 155 / 268 ms with 1,000 / 10,000 / 19,800 sockets in the target, against 0.04-0.15 ms
    /// for the eBPF path; which is why it runs every `--procfs-scan-interval` when eBPF is on.
    fn tcp_entries(
        &self,
        pid: u32,
        inodes: &HashSet<u64>,
        mut keep: impl FnMut(TcpEntry),
    ) -> Result<(), ProcError> {
        for table in ["net/tcp", "net/tcp6"] {
            let path = self.pid_path(pid, table);
            let f = match fs::File::open(&path) {
                Ok(f) => f,
                // No IPv6 in this kernel or namespace.
                Err(e) if e.kind() == io::ErrorKind::NotFound && table == "net/tcp6" => continue,
                Err(e) => return Err(io_err(&path, e)),
            };
            for line in BufReader::new(f.take(MAX_TABLE_BYTES)).lines().skip(1) {
                let line = line.map_err(|e| io_err(&path, e))?;
                // Cheap pre-filter: skip lines whose inode is not ours without parsing addresses.
                let Some(inode) = line
                    .split_whitespace()
                    .nth(9)
                    .and_then(|i| i.parse::<u64>().ok())
                else {
                    continue;
                };
                if !inodes.contains(&inode) {
                    continue;
                }
                if let Ok(entry) = parse_tcp_line(&line) {
                    keep(entry);
                }
            }
        }
        Ok(())
    }

    /// The cheap part of a sample (threads, RSS, fd count), with the socket join carried over from `last`
    /// (a full sample of the same process). `/proc/<pid>/net/tcp` lists every socket of the network
    /// namespace, TIME_WAIT included: on a busy node that is tens of thousands of lines the kernel formats
    /// on every read, so with eBPF counting the sockets the join runs only now and then.
    pub fn sample_light(&self, pid: u32, last: &ProcSample) -> Result<ProcSample, ProcError> {
        let (threads, rss_pages, start) = self.stat(pid)?;
        Ok(ProcSample {
            open_fds: self.fd_count(pid)?,
            threads,
            age_s: self.age_s(start),
            rss_bytes: rss_pages * self.page_size,
            ..last.clone()
        })
    }

    pub fn sample(&self, pid: u32) -> Result<ProcSample, ProcError> {
        Ok(self.sample_with_sockets(pid)?.0)
    }

    /// A full sample, and from the same pass the target's socket inodes and its listening ports: what a
    /// sock_diag dump needs to pick out the sockets the target dialed, without reading the tables twice.
    pub fn sample_with_sockets(
        &self,
        pid: u32,
    ) -> Result<(ProcSample, HashSet<u64>, HashSet<u16>), ProcError> {
        let (threads, rss_pages, start) = self.stat(pid)?;
        let (open_fds, inodes) = self.fds(pid)?;
        let mut tcp_by_state = [0u64; 13];
        let mut listening = HashSet::new();
        self.tcp_entries(pid, &inodes, |e| {
            if let Some(slot) = tcp_by_state.get_mut(e.state as usize) {
                *slot += 1;
            }
            if e.state == monitor_ebpf::tcp_state::LISTEN {
                listening.insert(e.local.port());
            }
        })?;
        let limits = read_bounded(&self.pid_path(pid, "limits"), MAX_SMALL_FILE)?;
        let sample = ProcSample {
            open_fds,
            fd_limit: parse_fd_limit(&limits),
            socket_fds: inodes.len() as u64,
            tcp_by_state,
            threads,
            rss_bytes: rss_pages * self.page_size,
            age_s: self.age_s(start),
            ..ProcSample::default()
        };
        Ok((sample, inodes, listening))
    }

    /// The target's TCP sockets with addresses and states.
    pub fn sockets(&self, pid: u32) -> Result<Vec<ProcSocket>, ProcError> {
        let (_, inodes) = self.fds(pid)?;
        let mut out = Vec::new();
        self.tcp_entries(pid, &inodes, |e| {
            out.push(ProcSocket {
                inode: e.inode,
                state: e.state,
                local: e.local,
                remote: e.remote,
            })
        })?;
        Ok(out)
    }

    /// (address family, port) of each listening socket of the target.
    pub fn listening_ports(&self, pid: u32) -> Result<Vec<(u16, u16)>, ProcError> {
        const AF_INET: u16 = 2;
        const AF_INET6: u16 = 10;
        let mut ports: Vec<(u16, u16)> = self
            .sockets(pid)?
            .into_iter()
            .filter(|s| s.state == monitor_ebpf::tcp_state::LISTEN)
            .map(|s| {
                (
                    if s.local.is_ipv4() { AF_INET } else { AF_INET6 },
                    s.local.port(),
                )
            })
            .collect();
        ports.sort_unstable();
        ports.dedup();
        Ok(ports)
    }

    /// Process name (`comm`).
    pub fn comm(&self, pid: u32) -> Option<String> {
        read_bounded(&self.pid_path(pid, "comm"), 4096)
            .ok()
            .map(|s| s.trim_end().to_string())
    }

    /// Command line with its arguments joined by spaces.
    pub fn cmdline(&self, pid: u32) -> Option<String> {
        let p = procfs::process::Process::new_with_root(self.root.join(pid.to_string())).ok()?;
        Some(p.cmdline().ok()?.join(" "))
    }

    /// Pids of all processes.
    pub fn pids(&self) -> Vec<u32> {
        procfs::process::all_processes_with_root(&self.root)
            .map(|all| {
                all.flatten()
                    .filter_map(|p| u32::try_from(p.pid()).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Parent pid, from /proc/<pid>/stat.
    pub fn ppid(&self, pid: u32) -> Option<u32> {
        let stat = read_bounded(&self.pid_path(pid, "stat"), MAX_SMALL_FILE).ok()?;
        u32::try_from(parse_stat_full(&stat)?.ppid).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_and_ipv6_lines() {
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0";
        let e = parse_tcp_line(v4).unwrap();
        assert_eq!(e.local.to_string(), "127.0.0.1:8080");
        assert_eq!((e.state, e.inode), (10, 12345));
        let v6 = "   1: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:D431 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 20 4 30 10 -1";
        let e = parse_tcp_line(v6).unwrap();
        assert_eq!(e.local.to_string(), "[::1]:8080");
        assert_eq!(e.remote.port(), 0xD431);
        assert_eq!((e.state, e.inode), (1, 777));
        let mapped = "   2: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:C350 08 00000000:00000000 00:00000000 00000000     0        0 9 1 0 20 4 30 10 -1";
        let e = parse_tcp_line(mapped).unwrap();
        assert_eq!(e.local.ip().to_string(), "::ffff:127.0.0.1");
        assert_eq!(e.state, 8);
    }

    #[test]
    fn malformed_lines_are_errors() {
        for bad in [
            "",
            "0:",
            "0: zz:1 00000000:0000 0A",
            "0: 0100007F:1F90 00000000:0000 0A 0 0 0 0 0 notanumber",
            "0: 0100007F 00000000:0000 0A",
        ] {
            assert!(parse_tcp_line(bad).is_err(), "{bad:?}");
        }
    }

    /// A whole `/proc/<pid>/stat` line, as the kernel writes it, with `comm` and the threads, start time
    /// and RSS fields filled in.
    pub(super) fn stat_line(comm: &str, threads: u64, start: u64, rss: u64) -> String {
        format!(
            "42 ({comm}) S 1 42 42 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 {threads} 0 {start} 1000000 {rss} \
             18446744073709551615 1 2 3 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 4 5 6 7 8 9 10 0"
        )
    }

    /// A whole `/proc/<pid>/limits` with this `Max open files` soft limit.
    pub(super) fn limits_file(open_files: &str) -> String {
        LIMITS.replace("OPEN_FILES", open_files)
    }

    const LIMITS: &str = "\
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max file size             unlimited            unlimited            bytes
Max data size             unlimited            unlimited            bytes
Max stack size            8388608              unlimited            bytes
Max core file size        0                    unlimited            bytes
Max resident set          unlimited            unlimited            bytes
Max processes             unlimited            unlimited            processes
Max open files            OPEN_FILES           524288               files
Max locked memory         8388608              8388608              bytes
Max address space         unlimited            unlimited            bytes
Max file locks            unlimited            unlimited            locks
Max pending signals       63388                63388                signals
Max msgqueue size         819200               819200               bytes
Max nice priority         0                    0
Max realtime priority     0                    0
Max realtime timeout      unlimited            unlimited            us
";

    #[test]
    fn stat_with_spaces_and_parens_in_comm() {
        let stat = stat_line("we ird) (name)", 7, 123456, 250);
        assert_eq!(parse_stat(&stat), Some((7, 250, 123456)));
        assert_eq!(parse_stat_full(&stat).unwrap().ppid, 1);
    }

    #[test]
    fn garbled_stat_and_limits_are_none_not_a_panic() {
        for bad in [
            "",
            "(",
            ")(",
            "1 (a)",
            "1 (a) ",
            "(a) S 1",
            "x (a) S 1",
            "1 (a)x S 1",
            "1 (a) S",
            "12 (\u{e9}) \u{e9}",
        ] {
            assert_eq!(parse_stat(bad), None, "{bad:?}");
        }
        for bad in [
            "",
            "Max",
            "Max open files",
            "a\nb c\n",
            "Max open files 1 2",
        ] {
            assert_eq!(parse_fd_limit(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn fd_limit_soft_value_or_unlimited() {
        assert_eq!(parse_fd_limit(&limits_file("1024")), Some(1024));
        assert_eq!(parse_fd_limit(&limits_file("unlimited")), None);
        let real = std::fs::read_to_string("/proc/self/limits").unwrap();
        assert!(parse_fd_limit(&real).is_some(), "{real}");
        let real = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_stat(&real).is_some(), "{real}");
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode("socket:[123]"), Some(123));
        assert_eq!(socket_inode("pipe:[123]"), None);
        assert_eq!(socket_inode("socket:[x]"), None);
    }

    #[test]
    fn a_vanished_process_is_gone_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let s = ProcfsSampler::new(dir.path());
        assert!(matches!(s.sample(999_999), Err(ProcError::Gone)));
    }

    #[test]
    fn fake_proc_root_with_unlimited_fds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("7");
        fs::create_dir_all(p.join("fd")).unwrap();
        fs::create_dir_all(p.join("net")).unwrap();
        fs::write(p.join("stat"), stat_line("a) b", 3, 99, 10)).unwrap();
        fs::write(p.join("limits"), limits_file("unlimited")).unwrap();
        fs::write(p.join("net/tcp"), "  sl  local_address rem_address   st\n").unwrap();
        std::os::unix::fs::symlink("socket:[5]", p.join("fd/3")).unwrap();
        std::os::unix::fs::symlink("/dev/null", p.join("fd/4")).unwrap();
        let sample = ProcfsSampler::new(dir.path()).sample(7).unwrap();
        assert_eq!(
            (
                sample.open_fds,
                sample.socket_fds,
                sample.threads,
                sample.fd_limit
            ),
            (2, 1, 3, None)
        );
        assert_eq!(sample.rss_bytes, 10 * ProcfsSampler::default().page_size);
    }
}
