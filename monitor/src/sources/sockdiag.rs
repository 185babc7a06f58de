//! Per-socket idle ages from the kernel: TCP sockets with their `tcp_info`, dumped over NETLINK_SOCK_DIAG.
//!
//! On the agent side of a tunnel the v2.10.3 leak is a pile of ESTABLISHED sockets to one target, each idle
//! for longer than any plausible HTTP idle timeout (Go's default is 90 s); a healthy pool holds idle sockets
//! too, but never for longer than that. Telling the two apart needs each socket's idle age, which only the
//! kernel knows.
//!
//! # Why netlink
//!
//! `/proc/net/tcp{,6}` has no idle times (its `tm->when` is the pending timer, not the last activity), and
//! `getsockopt(TCP_INFO)` needs the socket's fd, which belongs to another process. `inet_diag` over
//! NETLINK_SOCK_DIAG returns, for every TCP socket of the network namespace, the same `struct tcp_info` that
//! `TCP_INFO` returns; `ss -ti` reads it the same way. It needs no capability: sockets of every user are
//! listed, `tcp_info` included. The dump is of the namespace of the calling thread, which is the target's when
//! leakwatch runs as a sidecar in the target's pod (or on the host next to a host-network process); that is
//! why the target's sockets are picked out by inode, which [`super::procfs::ProcfsSampler::socket_inodes`]
//! reads from `/proc/<pid>/fd`.
//!
//! # What "idle" means
//!
//! `tcp_info` gives three ages in milliseconds, each counted from the connection's establishment while nothing
//! of its kind has happened yet (jiffies resolution, so a few ms):
//! - `tcpi_last_data_sent`: since the socket last sent a segment carrying data (`lsndtime`);
//! - `tcpi_last_data_recv`: since it last received data (`icsk_ack.lrcvtime`);
//! - `tcpi_last_ack_recv`: since it last received an ACK (`rcv_tstamp`).
//!
//! A connection is idle while no application data moves in either direction, so its idle age is the smaller
//! of the two data ages ([`TcpSockInfo::idle_ms`]). The ACK age is deliberately left out: TCP keepalive probes
//! (Go turns them on every 15 s for every dialed connection) are answered by bare ACKs, which would make a
//! pooled connection that nobody uses look busy. It is kept as a liveness sign: a small `last_ack_recv_ms` on
//! an idle socket says the peer is still there, so the socket is held, not dead.
//!
//! # What "unanswered" means
//!
//! `tcpi_data_segs_in` and `tcpi_data_segs_out` (Linux 4.6+) count segments that carried data; a SYN-ACK,
//! a bare ACK or a keepalive probe carries none. A socket that sent data and has not received one data
//! segment since it was established is waiting for the first byte of an answer, for as long as its last
//! send ([`TcpSockInfo::unanswered_ms`]). Every HTTP server answers with its headers at once, long polls and
//! watches included, so a pile of such sockets is a target that hangs, or callers that left while the tunnel
//! kept their connections: the agent side of abandoned callers, whose sockets stay ESTABLISHED.
//!
//! # Bounds
//!
//! The kernel lists every socket of the namespace in the requested states (ESTABLISHED and CLOSE_WAIT: the
//! states a held connection sits in), whoever owns it; each reply datagram is at most 32 KiB and read into a
//! fixed buffer. Only sockets whose inode is in the given set are kept, and at most `max_sockets` of them
//! ([`DEFAULT_MAX_SOCKETS`]); the rest of the dump is still read, so that the number left out
//! ([`TcpDump::over_cap`]) is exact. A receive timeout ([`RECV_TIMEOUT`]) bounds a dump that never ends.
//! Nothing the kernel sends can make this panic: a message that does not parse is counted
//! ([`TcpDump::malformed`]) and skipped, and only a framing error that loses the message boundaries ends
//! the dump with an error. [`dump_tcp`] blocks for the whole dump: from async code, call it on a blocking
//! thread.
//!
//! The cost is the kernel describing every socket of the namespace, so it grows with the namespace, not
//! with the target: a dump took 2.3 ms with 1,000 ESTABLISHED sockets in the namespace and 38 ms with
//! 10,000 (27 ms of which remain when only one socket is kept), against 42 and 217 ms for the procfs join
//! of the same sockets (release build, medians of 9, this project's 2-core VM; `dump_cost` in
//! `tests/sockdiag.rs`).
use std::{
    collections::{HashMap, HashSet},
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    time::Duration,
};

use monitor_ebpf::tcp_state;
use netlink_packet_core::{
    ErrorBuffer, NLA_TYPE_MASK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NLMSG_DONE,
    NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NlasIterator, Parseable,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, INET_DIAG_INFO, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};
use serde::Serialize;

pub use crate::sample::{
    IDLE_BUCKET_BOUNDS_MS, IDLE_BUCKET_LABELS, IDLE_BUCKETS, OTHER_REMOTE, RemoteIdle,
};
use thiserror::Error;

/// How many of the target's sockets one dump keeps when not told (`--max-sockets` sets it for the
/// sidecar): the cap bounds memory (about 64 bytes a socket).
pub const DEFAULT_MAX_SOCKETS: usize = monitor_ebpf::DEFAULT_MAX_SOCKETS as usize;

/// A healthy dump of even 100k sockets takes well under a second; a kernel or sandbox that accepts the
/// request and never answers must not stall the sampler forever.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// The kernel fills each dump datagram up to 32 KiB (`netlink_recvmsg` caps its allocation hint there);
/// twice that leaves room, and `MSG_TRUNC` still reports anything larger instead of silently cutting it.
const RECV_BUF: usize = 64 << 10;

/// `sizeof(struct inet_diag_msg)`: the fixed part of each reply, before its attributes.
const INET_DIAG_MSG_LEN: usize = 72;

/// Offsets of the three ages in `struct tcp_info` (unchanged since Linux 2.6; later kernels only append).
const TCPI_LAST_DATA_SENT: usize = 44;
const TCPI_LAST_DATA_RECV: usize = 52;
const TCPI_LAST_ACK_RECV: usize = 56;
/// Segments carrying data, received and sent (`tcpi_data_segs_in`/`_out`, Linux 4.6 and later). A bare ACK,
/// a SYN-ACK or a keepalive probe carries none, so `in == 0` means the peer never sent one byte.
const TCPI_DATA_SEGS_IN: usize = 152;
const TCPI_DATA_SEGS_OUT: usize = 156;

/// One TCP socket of the target, as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TcpSockInfo {
    pub inode: u64,
    /// A `monitor_ebpf::tcp_state` value.
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub last_data_sent_ms: u32,
    pub last_data_recv_ms: u32,
    pub last_ack_recv_ms: u32,
    /// Data segments received and sent; `None` on kernels whose tcp_info predates them.
    pub data_segs_in: Option<u32>,
    pub data_segs_out: Option<u32>,
}

impl TcpSockInfo {
    /// How long an ESTABLISHED socket has waited for the first byte of an answer: it sent data and has
    /// received none since it was established, so its wait is the age of its last send. `None` when it got
    /// data, sent none, or the kernel cannot say.
    pub fn unanswered_ms(&self) -> Option<u32> {
        let waiting = self.state == tcp_state::ESTABLISHED
            && self.data_segs_out? > 0
            && self.data_segs_in? == 0;
        waiting.then_some(self.last_data_sent_ms)
    }

    /// How long no application data has moved either way: the younger of the two data ages. ACKs are left
    /// out because keepalive probes produce them on connections nobody uses (see the module doc).
    pub fn idle_ms(&self) -> u32 {
        self.last_data_sent_ms.min(self.last_data_recv_ms)
    }
}

/// The result of one dump.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TcpDump {
    /// The target's sockets (inode in the set), at most `max_sockets` of them, in the kernel's order.
    pub sockets: Vec<TcpSockInfo>,
    /// Sockets of the whole namespace in the requested states: what the kernel had to describe.
    pub namespace_sockets: u64,
    /// The target's sockets left out because `sockets` was full.
    pub over_cap: u64,
    /// Replies that did not parse (or carried no usable `tcp_info`), skipped.
    pub malformed: u64,
    /// The kernel flagged the dump as interrupted by a concurrent change of its tables (`NLM_F_DUMP_INTR`):
    /// a socket may be missing or listed twice.
    pub interrupted: bool,
}

#[derive(Debug, Error)]
pub enum SockDiagError {
    /// This kernel or sandbox has no NETLINK_SOCK_DIAG, or no `tcp_diag` behind it: fall back to procfs.
    #[error("NETLINK_SOCK_DIAG is not available here (no idle ages; fall back to procfs): {0}")]
    Unsupported(io::Error),
    /// A seccomp or LSM policy refused the socket or the dump: fall back to procfs.
    #[error("permission denied for NETLINK_SOCK_DIAG (no idle ages; fall back to procfs): {0}")]
    PermissionDenied(io::Error),
    /// The kernel answered the request with an error (`NLMSG_ERROR`, or an error in `NLMSG_DONE`).
    #[error("the kernel refused the socket dump: {0}")]
    Kernel(io::Error),
    #[error("netlink I/O: {0}")]
    Io(io::Error),
    #[error("no complete reply from the kernel within {0:?}")]
    Timeout(Duration),
    /// The reply could not be framed; nothing after the fault can be trusted.
    #[error("malformed netlink reply: {0}")]
    Malformed(String),
}

impl SockDiagError {
    /// Whether the interface is missing or forbidden here, so that retrying is pointless and the caller should
    /// go on without idle ages rather than report a failure every tick.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unsupported(_) | Self::PermissionDenied(_))
    }

    fn from_errno(errno: i32, io_err: io::Error) -> Self {
        match errno {
            libc::EPERM | libc::EACCES => Self::PermissionDenied(io_err),
            // ENOENT: no handler for this family/protocol (tcp_diag not built or loadable); the others are
            // how socket(2) and sandboxes say the protocol does not exist.
            libc::ENOENT
            | libc::EOPNOTSUPP
            | libc::EPROTONOSUPPORT
            | libc::EAFNOSUPPORT
            | libc::ESOCKTNOSUPPORT => Self::Unsupported(io_err),
            _ => Self::Kernel(io_err),
        }
    }
}

/// The states a held connection sits in: open, or half-closed by the peer and not yet by the process.
fn dump_states() -> StateFlags {
    StateFlags::ESTABLISHED | StateFlags::CLOSE_WAIT
}

/// Dumps the TCP sockets (IPv4 and IPv6) of the current network namespace in ESTABLISHED or CLOSE_WAIT,
/// with their `tcp_info`, keeping those whose inode is in `inodes`, at most `max_sockets` of them.
pub fn dump_tcp(inodes: &HashSet<u64>, max_sockets: usize) -> Result<TcpDump, SockDiagError> {
    let socket = Socket::new(NETLINK_SOCK_DIAG).map_err(|e| match e.raw_os_error() {
        Some(errno) => SockDiagError::from_errno(errno, e),
        None => SockDiagError::Io(e),
    })?;
    set_recv_timeout(&socket, RECV_TIMEOUT).map_err(SockDiagError::Io)?;
    let mut acc = Accumulator::new(inodes, max_sockets);
    let mut buf = vec![0u8; RECV_BUF];
    for (seq, family) in [(1, AF_INET), (2, AF_INET6)] {
        match dump_family(&socket, family, seq, &mut buf, &mut acc) {
            Ok(()) => {}
            // A kernel built without IPv6 has no AF_INET6 handler; its IPv4 sockets are all there is.
            Err(SockDiagError::Unsupported(_)) if family == AF_INET6 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(acc.dump)
}

fn set_recv_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid fd, and a pointer to a timeval that outlives the call with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The dump request for one address family, serialised.
pub fn request(family: u8, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let socket_id = if family == AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let mut msg = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            states: dump_states(),
            socket_id,
        })
        .into(),
    );
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

fn dump_family(
    socket: &Socket,
    family: u8,
    seq: u32,
    buf: &mut [u8],
    acc: &mut Accumulator<'_>,
) -> Result<(), SockDiagError> {
    let req = request(family, seq);
    let kernel = netlink_sys::SocketAddr::new(0, 0);
    loop {
        match socket.send_to(&req, &kernel, 0) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(match e.raw_os_error() {
                    Some(errno) => SockDiagError::from_errno(errno, e),
                    None => SockDiagError::Io(e),
                });
            }
        }
    }
    loop {
        let n = match socket.recv(&mut &mut buf[..], libc::MSG_TRUNC) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(SockDiagError::Timeout(RECV_TIMEOUT));
            }
            Err(e) => return Err(SockDiagError::Io(e)),
        };
        if n > buf.len() {
            return Err(SockDiagError::Malformed(format!(
                "a {n}-byte datagram does not fit the {}-byte buffer",
                buf.len()
            )));
        }
        if parse_datagram(&buf[..n], seq, acc)? == Flow::Done {
            return Ok(());
        }
    }
}

/// Whether a dump goes on after one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    More,
    Done,
}

/// Collects the target's sockets out of the reply datagrams of a dump.
#[derive(Debug)]
pub struct Accumulator<'a> {
    inodes: &'a HashSet<u64>,
    max_sockets: usize,
    pub dump: TcpDump,
}

impl<'a> Accumulator<'a> {
    pub fn new(inodes: &'a HashSet<u64>, max_sockets: usize) -> Self {
        Self {
            inodes,
            max_sockets,
            dump: TcpDump::default(),
        }
    }

    fn inet_reply(&mut self, payload: &[u8]) {
        // The crate's header parser checks the length and the family before reading anything.
        let Ok(header) = InetResponseHeader::parse(payload) else {
            self.dump.malformed += 1;
            return;
        };
        self.dump.namespace_sockets += 1;
        let inode = u64::from(header.inode);
        if !self.inodes.contains(&inode) {
            return;
        }
        if self.dump.sockets.len() >= self.max_sockets {
            self.dump.over_cap += 1;
            return;
        }
        let Some(info) = payload.get(INET_DIAG_MSG_LEN..).and_then(tcp_info_fields) else {
            self.dump.malformed += 1;
            return;
        };
        let id = &header.socket_id;
        self.dump.sockets.push(TcpSockInfo {
            inode,
            state: header.state,
            local: SocketAddr::new(id.source_address, id.source_port),
            remote: SocketAddr::new(id.destination_address, id.destination_port),
            last_data_sent_ms: info.ages[0],
            last_data_recv_ms: info.ages[1],
            last_ack_recv_ms: info.ages[2],
            data_segs_in: info.data_segs.map(|d| d[0]),
            data_segs_out: info.data_segs.map(|d| d[1]),
        });
    }
}

/// The fields of `struct tcp_info` this module reads.
struct TcpInfoFields {
    /// Last data sent, last data received, last ACK received.
    ages: [u32; 3],
    /// Data segments in and out, when the kernel's tcp_info is long enough to have them.
    data_segs: Option<[u32; 2]>,
}

/// The fields from the `INET_DIAG_INFO` attribute, read by offset rather than through a full `struct tcp_info`
/// so that an older kernel's shorter one still serves (without the ages, the socket is not usable at all).
fn tcp_info_fields(attrs: &[u8]) -> Option<TcpInfoFields> {
    // An attribute that does not frame ends the walk: its length is all that locates the next one.
    let nla = NlasIterator::new(attrs)
        .map_while(Result::ok)
        .find(|nla| nla.kind() & NLA_TYPE_MASK == INET_DIAG_INFO)?;
    let info = nla.value();
    let at = |off: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(info.get(off..off + 4)?.try_into().ok()?))
    };
    Some(TcpInfoFields {
        ages: [
            at(TCPI_LAST_DATA_SENT)?,
            at(TCPI_LAST_DATA_RECV)?,
            at(TCPI_LAST_ACK_RECV)?,
        ],
        data_segs: at(TCPI_DATA_SEGS_IN)
            .zip(at(TCPI_DATA_SEGS_OUT))
            .map(|(i, o)| [i, o]),
    })
}

/// The kernel reports errors as negated errnos. The datagram is outside input, so a code
/// of `i32::MIN` (which has no positive twin) must not overflow: it becomes `i32::MAX`,
/// an errno no kernel uses, reported as unknown rather than trusted.
fn errno_of(code: i32) -> i32 {
    code.checked_neg().unwrap_or(i32::MAX)
}

/// Feeds one reply datagram of the dump with sequence number `seq` into `acc`. Pure, so that every shape of
/// reply (multi-part, error, truncated, garbage) is tested without a kernel.
pub fn parse_datagram(
    bytes: &[u8],
    seq: u32,
    acc: &mut Accumulator<'_>,
) -> Result<Flow, SockDiagError> {
    let mut off = 0;
    while off < bytes.len() {
        let msg = NetlinkBuffer::new_checked(&bytes[off..])
            .map_err(|e| SockDiagError::Malformed(format!("at byte {off}: {e}")))?;
        let len = msg.length() as usize;
        // Messages are 4-byte aligned; the last one's padding may be missing from the datagram.
        off = off.saturating_add((len + 3) & !3);
        if msg.sequence_number() != seq {
            continue;
        }
        if msg.flags() & NLM_F_DUMP_INTR != 0 {
            acc.dump.interrupted = true;
        }
        let payload = msg.payload();
        match msg.message_type() {
            SOCK_DIAG_BY_FAMILY => acc.inet_reply(payload),
            NLMSG_DONE => {
                // The dump callback's own error, if it failed part-way, rides in NLMSG_DONE.
                if let Some(code) = payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                {
                    if code < 0 {
                        return Err(SockDiagError::Kernel(io::Error::from_raw_os_error(
                            errno_of(code),
                        )));
                    }
                }
                return Ok(Flow::Done);
            }
            NLMSG_ERROR => {
                let err = ErrorBuffer::new_checked(payload)
                    .map_err(|e| SockDiagError::Malformed(format!("NLMSG_ERROR: {e}")))?;
                if let Some(code) = err.code() {
                    let errno = errno_of(code.get());
                    return Err(SockDiagError::from_errno(
                        errno,
                        io::Error::from_raw_os_error(errno),
                    ));
                }
                // A bare ACK ends nothing: dumps end with NLMSG_DONE.
            }
            NLMSG_OVERRUN => {
                return Err(SockDiagError::Malformed("NLMSG_OVERRUN: data lost".into()));
            }
            NLMSG_NOOP => {}
            _ => acc.dump.malformed += 1,
        }
    }
    Ok(Flow::More)
}

impl RemoteIdle {
    fn absorb(&mut self, other: &RemoteIdle) {
        self.established += other.established;
        self.close_wait += other.close_wait;
        self.idle_over_horizon += other.idle_over_horizon;
        self.oldest_idle_ms = self.oldest_idle_ms.max(other.oldest_idle_ms);
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        for (a, b) in self.unanswered.iter_mut().zip(other.unanswered) {
            *a += b;
        }
        self.oldest_unanswered_ms = self.oldest_unanswered_ms.max(other.oldest_unanswered_ms);
    }
}

/// The bucket of an idle age: the first whose bound it is under.
pub fn idle_bucket(idle_ms: u32) -> usize {
    IDLE_BUCKET_BOUNDS_MS
        .iter()
        .position(|&bound| idle_ms < bound)
        .unwrap_or(IDLE_BUCKET_BOUNDS_MS.len())
}

/// Groups sockets by remote `ip:port` (a dialed target is named by address and port), worst first: by
/// `idle_over_horizon`, then `established`, then `oldest_idle_ms`, descending, then by name. At most
/// `max_groups` rows: beyond that, the last row is [`OTHER_REMOTE`] holding the sum of every group that did
/// not fit, so that the named rows are always the worst ones. Sockets in other states than ESTABLISHED and
/// CLOSE_WAIT are ignored.
pub fn idle_by_remote(
    socks: &[TcpSockInfo],
    horizon_ms: u32,
    max_groups: usize,
) -> Vec<RemoteIdle> {
    let mut groups: HashMap<SocketAddr, RemoteIdle> = HashMap::new();
    for s in socks {
        if s.state != tcp_state::ESTABLISHED && s.state != tcp_state::CLOSE_WAIT {
            continue;
        }
        // A dual-stack socket dialing an IPv4 target reports it as ::ffff:a.b.c.d; it is the same target.
        let remote = SocketAddr::new(s.remote.ip().to_canonical(), s.remote.port());
        let g = groups.entry(remote).or_default();
        if s.state == tcp_state::CLOSE_WAIT {
            g.close_wait += 1;
            continue;
        }
        let idle = s.idle_ms();
        g.established += 1;
        g.idle_over_horizon += u64::from(idle > horizon_ms);
        g.oldest_idle_ms = g.oldest_idle_ms.max(idle);
        g.buckets[idle_bucket(idle)] += 1;
        if let Some(wait) = s.unanswered_ms() {
            g.unanswered[idle_bucket(wait)] += 1;
            g.oldest_unanswered_ms = g.oldest_unanswered_ms.max(wait);
        }
    }
    let mut rows: Vec<RemoteIdle> = groups
        .into_iter()
        .map(|(remote, g)| RemoteIdle {
            remote: remote.to_string(),
            ..g
        })
        .collect();
    rows.sort_by(|a, b| {
        b.idle_over_horizon
            .cmp(&a.idle_over_horizon)
            .then(b.established.cmp(&a.established))
            .then(b.oldest_idle_ms.cmp(&a.oldest_idle_ms))
            .then_with(|| a.remote.cmp(&b.remote))
    });
    if rows.len() > max_groups {
        let tail = rows.split_off(max_groups.saturating_sub(1));
        if max_groups > 0 {
            let mut other = RemoteIdle {
                remote: OTHER_REMOTE.into(),
                ..RemoteIdle::default()
            };
            tail.iter().for_each(|g| other.absorb(g));
            rows.push(other);
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use netlink_packet_sock_diag::inet::{InetResponse, nlas::Nla};

    use super::*;

    fn sock(remote: &str, state: u8, sent: u32, recv: u32) -> TcpSockInfo {
        TcpSockInfo {
            inode: 1,
            state,
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: remote.parse().unwrap(),
            last_data_sent_ms: sent,
            last_data_recv_ms: recv,
            last_ack_recv_ms: 0,
            // A request answered: the pooled and busy sockets of a healthy client.
            data_segs_in: Some(1),
            data_segs_out: Some(1),
        }
    }

    /// A socket that sent a request `wait` ms ago and never got a byte back.
    fn unanswered(remote: &str, wait: u32) -> TcpSockInfo {
        TcpSockInfo {
            data_segs_in: Some(0),
            data_segs_out: Some(1),
            ..sock(remote, tcp_state::ESTABLISHED, wait, wait + 5)
        }
    }

    fn est(remote: &str, idle: u32) -> TcpSockInfo {
        sock(remote, tcp_state::ESTABLISHED, idle, idle)
    }

    #[test]
    fn idle_is_the_younger_data_age_and_ignores_acks() {
        let mut s = sock("1.2.3.4:80", tcp_state::ESTABLISHED, 5_000, 120_000);
        s.last_ack_recv_ms = 3;
        assert_eq!(s.idle_ms(), 5_000);
        s.last_data_sent_ms = 200_000;
        assert_eq!(s.idle_ms(), 120_000);
    }

    #[test]
    fn bucket_edges() {
        let cases = [
            (0, 0),
            (9_999, 0),
            (10_000, 1),
            (29_999, 1),
            (30_000, 2),
            (59_999, 2),
            (60_000, 3),
            (89_999, 3),
            (90_000, 4),
            (299_999, 4),
            (300_000, 5),
            (1_799_999, 5),
            (1_800_000, 6),
            (u32::MAX, 6),
        ];
        for (ms, bucket) in cases {
            assert_eq!(idle_bucket(ms), bucket, "{ms} ms");
        }
        assert_eq!(IDLE_BUCKET_LABELS.len(), IDLE_BUCKET_BOUNDS_MS.len() + 1);
        assert!(IDLE_BUCKET_BOUNDS_MS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn groups_by_remote_address_and_port() {
        let socks = [
            est("127.0.0.1:6080", 1_000),
            est("127.0.0.1:6080", 100_000),
            // The same target through a dual-stack socket.
            est("[::ffff:127.0.0.1]:6080", 2_000_000),
            // Same address, other port: another target.
            est("127.0.0.1:6443", 95_000),
            sock("127.0.0.1:6443", tcp_state::CLOSE_WAIT, 999_999, 999_999),
            // Neither ESTABLISHED nor CLOSE_WAIT: not counted anywhere.
            sock("127.0.0.1:6443", tcp_state::FIN_WAIT1, 999_999, 999_999),
        ];
        let rows = idle_by_remote(&socks, 90_000, 10);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0],
            RemoteIdle {
                remote: "127.0.0.1:6080".into(),
                established: 3,
                close_wait: 0,
                idle_over_horizon: 2,
                oldest_idle_ms: 2_000_000,
                buckets: [1, 0, 0, 0, 1, 0, 1],
                ..RemoteIdle::default()
            }
        );
        assert_eq!(
            rows[1],
            RemoteIdle {
                remote: "127.0.0.1:6443".into(),
                established: 1,
                close_wait: 1,
                idle_over_horizon: 1,
                oldest_idle_ms: 95_000,
                buckets: [0, 0, 0, 0, 1, 0, 0],
                ..RemoteIdle::default()
            }
        );
    }

    #[test]
    fn horizon_is_strict() {
        let rows = idle_by_remote(
            &[est("1.1.1.1:1", 90_000), est("1.1.1.1:1", 90_001)],
            90_000,
            5,
        );
        assert_eq!(rows[0].idle_over_horizon, 1);
    }

    #[test]
    fn unanswered_means_sent_data_and_never_got_a_byte_back() {
        let s = unanswered("1.1.1.1:1", 40_000);
        assert_eq!(s.unanswered_ms(), Some(40_000));
        let answered = TcpSockInfo {
            data_segs_in: Some(1),
            ..s.clone()
        };
        assert_eq!(answered.unanswered_ms(), None, "a reply came");
        let silent = TcpSockInfo {
            data_segs_out: Some(0),
            ..s.clone()
        };
        assert_eq!(silent.unanswered_ms(), None, "nothing was asked");
        let old_kernel = TcpSockInfo {
            data_segs_in: None,
            ..s.clone()
        };
        assert_eq!(old_kernel.unanswered_ms(), None, "cannot say: not counted");
        let closing = TcpSockInfo {
            state: tcp_state::CLOSE_WAIT,
            ..s
        };
        assert_eq!(closing.unanswered_ms(), None, "CLOSE_WAIT has its own rule");
    }

    #[test]
    fn unanswered_sockets_are_bucketed_by_their_wait() {
        let socks = [
            unanswered("10.0.0.5:80", 2_000),
            unanswered("10.0.0.5:80", 45_000),
            unanswered("10.0.0.5:80", 400_000),
            // An idle pooled socket as old as any of them: answered, so not counted.
            est("10.0.0.5:80", 400_000),
        ];
        let rows = idle_by_remote(&socks, 90_000, 10);
        assert_eq!(rows[0].established, 4);
        assert_eq!(rows[0].unanswered, [1, 0, 1, 0, 0, 1, 0]);
        assert_eq!(rows[0].oldest_unanswered_ms, 400_000);
        assert_eq!(rows[0].unanswered_for(30_000), 2);
        // A threshold between two bounds rounds up to the next bound.
        assert_eq!(rows[0].unanswered_for(45_000), 1);
        // The slow answer at 45 s is not yet past a minute.
        assert_eq!(rows[0].unanswered_for(60_000), 1);
        assert_eq!(rows[0].unanswered_for(0), 3);
    }

    #[test]
    fn sorted_worst_first_with_stable_ties() {
        let socks = [
            est("10.0.0.9:1", 1),
            est("10.0.0.9:1", 1),
            est("10.0.0.9:1", 1),
            est("10.0.0.2:1", 100_000),
            est("10.0.0.3:1", 100_000),
            est("10.0.0.3:1", 5),
            est("10.0.0.1:1", 1),
            est("10.0.0.4:1", 200_000),
        ];
        let order: Vec<String> = idle_by_remote(&socks, 90_000, 10)
            .into_iter()
            .map(|r| r.remote)
            .collect();
        // 10.0.0.3 and .4 and .2 have one idle socket each: .3 has more sockets, .4 the older one.
        assert_eq!(
            order,
            [
                "10.0.0.3:1",
                "10.0.0.4:1",
                "10.0.0.2:1",
                "10.0.0.9:1",
                "10.0.0.1:1"
            ]
        );
    }

    #[test]
    fn cap_folds_the_tail_into_other() {
        let socks: Vec<TcpSockInfo> = (0..5u32)
            .flat_map(|i| {
                // Group i has i+1 idle sockets, so the order is 4, 3, 2, 1, 0.
                (0..=i).map(move |_| est(&format!("10.0.0.{i}:80"), 100_000 + i))
            })
            .chain([sock("10.0.0.0:80", tcp_state::CLOSE_WAIT, 1, 1)])
            .collect();
        let rows = idle_by_remote(&socks, 90_000, 3);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].remote, "10.0.0.4:80");
        assert_eq!(rows[1].remote, "10.0.0.3:80");
        let other = &rows[2];
        assert_eq!(other.remote, OTHER_REMOTE);
        assert_eq!(
            (other.established, other.idle_over_horizon, other.close_wait),
            (6, 6, 1)
        );
        assert_eq!(other.oldest_idle_ms, 100_002);
        assert_eq!(other.buckets, [0, 0, 0, 0, 6, 0, 0]);
        let total: u64 = rows.iter().map(|r| r.established).sum();
        assert_eq!(total, 15);

        // Exactly at the cap nothing is folded.
        assert!(
            idle_by_remote(&socks, 90_000, 5)
                .iter()
                .all(|r| r.remote != OTHER_REMOTE)
        );
        let one = idle_by_remote(&socks, 90_000, 1);
        assert_eq!(
            (one.len(), one[0].remote.as_str(), one[0].established),
            (1, OTHER_REMOTE, 15)
        );
        assert!(idle_by_remote(&socks, 90_000, 0).is_empty());
        assert!(idle_by_remote(&[], 90_000, 3).is_empty());
    }

    // ---- reply parsing, on datagrams built with the crate's own emitters ----

    const SEQ: u32 = 7;

    /// A `struct tcp_info` of `len` bytes, with the data segment counts in 3 and out 4 when it is that long.
    fn tcp_info(sent: u32, recv: u32, ack: u32, len: usize) -> Vec<u8> {
        let mut info = vec![0u8; len];
        for (off, v) in [
            (TCPI_LAST_DATA_SENT, sent),
            (TCPI_LAST_DATA_RECV, recv),
            (TCPI_LAST_ACK_RECV, ack),
            (TCPI_DATA_SEGS_IN, 3),
            (TCPI_DATA_SEGS_OUT, 4),
        ] {
            if let Some(slot) = info.get_mut(off..off + 4) {
                slot.copy_from_slice(&v.to_ne_bytes());
            }
        }
        info
    }

    fn inet_reply(inode: u32, v6: bool, nlas: Vec<Nla>) -> NetlinkMessage<SockDiagMessage> {
        let (family, src, dst): (u8, IpAddr, IpAddr) = if v6 {
            (
                AF_INET6,
                Ipv6Addr::LOCALHOST.into(),
                Ipv6Addr::LOCALHOST.into(),
            )
        } else {
            (
                AF_INET,
                Ipv4Addr::new(10, 0, 0, 1).into(),
                Ipv4Addr::new(10, 0, 0, 2).into(),
            )
        };
        let response = InetResponse {
            header: InetResponseHeader {
                family,
                state: tcp_state::ESTABLISHED,
                timer: None,
                socket_id: SocketId {
                    source_port: 40_000,
                    destination_port: 6080,
                    source_address: src,
                    destination_address: dst,
                    interface_id: 0,
                    cookie: [0; 8],
                },
                recv_queue: 0,
                send_queue: 0,
                uid: 0,
                inode,
            },
            nlas: nlas.into(),
        };
        let mut header = NetlinkHeader::default();
        header.flags = netlink_packet_core::NLM_F_MULTIPART;
        header.sequence_number = SEQ;
        NetlinkMessage::new(
            header,
            SockDiagMessage::InetResponse(Box::new(response)).into(),
        )
    }

    fn control(message_type: u16, code: i32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&20u32.to_ne_bytes());
        out.extend_from_slice(&message_type.to_ne_bytes());
        out.extend_from_slice(&netlink_packet_core::NLM_F_MULTIPART.to_ne_bytes());
        out.extend_from_slice(&SEQ.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&code.to_ne_bytes());
        if message_type == NLMSG_ERROR {
            // NLMSG_ERROR carries the offending request's header after the code.
            out.extend_from_slice(&[0u8; 16]);
            out[..4].copy_from_slice(&36u32.to_ne_bytes());
        }
        out
    }

    fn bytes(mut msg: NetlinkMessage<SockDiagMessage>) -> Vec<u8> {
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    fn datagram(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    fn full_reply(inode: u32) -> Vec<u8> {
        bytes(inet_reply(
            inode,
            false,
            vec![
                Nla::Shutdown(0),
                Nla::Other(netlink_packet_core::DefaultNla::new(250, vec![1, 2, 3])),
                Nla::TcpInfo(tcp_info(1_500, 2_500, 10, 232)),
            ],
        ))
    }

    #[test]
    fn multipart_dump_keeps_only_the_inodes_asked_for() {
        let inodes = HashSet::from([11, 13]);
        let mut acc = Accumulator::new(&inodes, 100);
        let first = datagram(&[full_reply(11), full_reply(12)]);
        assert_eq!(parse_datagram(&first, SEQ, &mut acc).unwrap(), Flow::More);
        let v6 = bytes(inet_reply(
            13,
            true,
            vec![Nla::TcpInfo(tcp_info(7, 8, 9, 104))],
        ));
        let second = datagram(&[v6, control(NLMSG_DONE, 0)]);
        assert_eq!(parse_datagram(&second, SEQ, &mut acc).unwrap(), Flow::Done);
        let d = acc.dump;
        assert_eq!(
            (d.namespace_sockets, d.over_cap, d.malformed, d.interrupted),
            (3, 0, 0, false)
        );
        assert_eq!(
            d.sockets[0],
            TcpSockInfo {
                inode: 11,
                state: tcp_state::ESTABLISHED,
                local: "10.0.0.1:40000".parse().unwrap(),
                remote: "10.0.0.2:6080".parse().unwrap(),
                last_data_sent_ms: 1_500,
                last_data_recv_ms: 2_500,
                last_ack_recv_ms: 10,
                data_segs_in: Some(3),
                data_segs_out: Some(4),
            }
        );
        // The IPv6 reply's tcp_info is 104 bytes, from before the data segment counts.
        assert_eq!(d.sockets[1].data_segs_in, None);
        assert_eq!(d.sockets[1].remote, "[::1]:6080".parse().unwrap());
        assert_eq!(d.sockets[1].idle_ms(), 7);
    }

    #[test]
    fn cap_counts_what_it_leaves_out() {
        let inodes: HashSet<u64> = (1..=5).collect();
        let mut acc = Accumulator::new(&inodes, 2);
        let parts: Vec<Vec<u8>> = (1..=5)
            .map(full_reply)
            .chain([control(NLMSG_DONE, 0)])
            .collect();
        assert_eq!(
            parse_datagram(&datagram(&parts), SEQ, &mut acc).unwrap(),
            Flow::Done
        );
        assert_eq!(acc.dump.sockets.len(), 2);
        assert_eq!((acc.dump.over_cap, acc.dump.namespace_sockets), (3, 5));
    }

    #[test]
    fn kernel_errors_are_typed() {
        let inodes = HashSet::new();
        let cases = [
            (control(NLMSG_ERROR, -libc::EPERM), "perm"),
            (control(NLMSG_ERROR, -libc::ENOENT), "unsupported"),
            (control(NLMSG_ERROR, -libc::EINVAL), "kernel"),
            (control(NLMSG_DONE, -libc::ENOBUFS), "kernel"),
            (control(NLMSG_OVERRUN, 0), "malformed"),
            // No positive twin: found by the fuzzer, once a panic.
            (control(NLMSG_DONE, i32::MIN), "kernel"),
            (control(NLMSG_ERROR, i32::MIN), "kernel"),
        ];
        for (dg, want) in cases {
            let mut acc = Accumulator::new(&inodes, 10);
            let err = parse_datagram(&dg, SEQ, &mut acc).unwrap_err();
            let got = match err {
                SockDiagError::PermissionDenied(_) => "perm",
                SockDiagError::Unsupported(_) => "unsupported",
                SockDiagError::Kernel(_) => "kernel",
                SockDiagError::Malformed(_) => "malformed",
                _ => "other",
            };
            assert_eq!(got, want, "{err}");
            assert_eq!(err.is_unavailable(), matches!(want, "perm" | "unsupported"));
        }
        // An ACK (code 0) is not an error and does not end the dump.
        let mut acc = Accumulator::new(&inodes, 10);
        assert_eq!(
            parse_datagram(&control(NLMSG_ERROR, 0), SEQ, &mut acc).unwrap(),
            Flow::More
        );
    }

    #[test]
    fn other_sequences_are_ignored_and_interruptions_reported() {
        let inodes = HashSet::from([11]);
        let mut acc = Accumulator::new(&inodes, 10);
        let mut stale = inet_reply(11, false, vec![Nla::TcpInfo(tcp_info(1, 1, 1, 64))]);
        stale.header.sequence_number = SEQ + 1;
        let mut intr = inet_reply(11, false, vec![Nla::TcpInfo(tcp_info(2, 2, 2, 64))]);
        intr.header.flags |= NLM_F_DUMP_INTR;
        let dg = datagram(&[
            bytes(stale),
            bytes(intr),
            control(NLMSG_NOOP, 0),
            control(NLMSG_DONE, 0),
        ]);
        assert_eq!(parse_datagram(&dg, SEQ, &mut acc).unwrap(), Flow::Done);
        assert_eq!(acc.dump.sockets.len(), 1);
        assert_eq!(acc.dump.sockets[0].last_data_sent_ms, 2);
        assert!(acc.dump.interrupted);
    }

    #[test]
    fn short_or_missing_tcp_info_is_skipped_not_trusted() {
        let inodes = HashSet::from([1, 2, 3]);
        let mut acc = Accumulator::new(&inodes, 10);
        let dg = datagram(&[
            // Ends before tcpi_last_ack_recv.
            bytes(inet_reply(
                1,
                false,
                vec![Nla::TcpInfo(tcp_info(1, 1, 1, 58))],
            )),
            // No INET_DIAG_INFO at all.
            bytes(inet_reply(2, false, vec![Nla::Shutdown(0)])),
            // The oldest layout that has all three ages.
            bytes(inet_reply(
                3,
                false,
                vec![Nla::TcpInfo(tcp_info(4, 5, 6, 60))],
            )),
        ]);
        assert_eq!(parse_datagram(&dg, SEQ, &mut acc).unwrap(), Flow::More);
        assert_eq!(acc.dump.malformed, 2);
        assert_eq!(acc.dump.sockets.len(), 1);
        assert_eq!(acc.dump.sockets[0].last_ack_recv_ms, 6);
    }

    #[test]
    fn a_broken_attribute_list_or_family_is_counted_not_fatal() {
        let inodes = HashSet::from([1, 2]);
        let mut acc = Accumulator::new(&inodes, 10);
        let mut broken_nla = full_reply(1);
        // The first attribute (right after the 16-byte netlink header and the 72-byte inet_diag_msg) claims
        // more bytes than the message has.
        broken_nla[16 + INET_DIAG_MSG_LEN..16 + INET_DIAG_MSG_LEN + 2]
            .copy_from_slice(&4000u16.to_ne_bytes());
        let mut bad_family = full_reply(2);
        bad_family[16] = 99;
        let dg = datagram(&[broken_nla, bad_family, full_reply(2)]);
        assert_eq!(parse_datagram(&dg, SEQ, &mut acc).unwrap(), Flow::More);
        assert_eq!(acc.dump.malformed, 2);
        assert_eq!(acc.dump.sockets.len(), 1);
    }

    #[test]
    fn framing_errors_are_errors() {
        let inodes = HashSet::from([1]);
        let good = full_reply(1);
        // Cut in the middle of the message: its length field points past the datagram.
        let mut acc = Accumulator::new(&inodes, 10);
        assert!(matches!(
            parse_datagram(&good[..good.len() - 8], SEQ, &mut acc),
            Err(SockDiagError::Malformed(_))
        ));
        // A length smaller than the header would loop forever if trusted.
        let mut zero = good.clone();
        zero[..4].copy_from_slice(&0u32.to_ne_bytes());
        let mut acc = Accumulator::new(&inodes, 10);
        assert!(matches!(
            parse_datagram(&zero, SEQ, &mut acc),
            Err(SockDiagError::Malformed(_))
        ));
    }

    /// Every truncation and every single-byte corruption of a real-shaped datagram: never a panic, never a
    /// socket invented out of a reply that was cut.
    #[test]
    fn no_input_panics() {
        let inodes = HashSet::from([1, 2]);
        let dg = datagram(&[
            full_reply(1),
            bytes(inet_reply(
                2,
                true,
                vec![Nla::TcpInfo(tcp_info(3, 4, 5, 232))],
            )),
            control(NLMSG_ERROR, -libc::EPERM),
            control(NLMSG_DONE, 0),
        ]);
        for cut in 0..dg.len() {
            let mut acc = Accumulator::new(&inodes, 10);
            let _ = parse_datagram(&dg[..cut], SEQ, &mut acc);
            assert!(acc.dump.sockets.len() <= 2);
        }
        for i in 0..dg.len() {
            for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut bad = dg.clone();
                bad[i] = v;
                let mut acc = Accumulator::new(&inodes, 10);
                let _ = parse_datagram(&bad, SEQ, &mut acc);
            }
        }
    }

    #[test]
    fn request_is_a_tcp_dump_with_tcp_info_for_held_states() {
        let req = request(AF_INET6, 42);
        let msg = NetlinkBuffer::new_checked(&req[..]).unwrap();
        assert_eq!(msg.length() as usize, req.len());
        assert_eq!(msg.message_type(), SOCK_DIAG_BY_FAMILY);
        assert_eq!(msg.flags(), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(msg.sequence_number(), 42);
        let r = InetRequest::parse(msg.payload()).unwrap();
        assert_eq!((r.family, r.protocol), (AF_INET6, IPPROTO_TCP));
        assert_eq!(r.extensions, ExtensionFlags::INFO);
        assert_eq!(r.states, StateFlags::ESTABLISHED | StateFlags::CLOSE_WAIT);
    }
}
