//! The live table of the target's TCP sockets, rebuilt in userspace from the probes' ring-buffer events.
//! Pure: events in, table and counts out, so it is unit-tested without a kernel.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use monitor_ebpf::{SockEvent, tcp_state};
use serde::Serialize;

const AF_INET: u16 = 2;

/// How the table first learned of a socket, which tells callers' sockets from targets' sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Accepted on one of the target's listeners: on a tunnel server, a caller.
    Accepted,
    /// Connected out by the target: on a tunnel agent, a dial to a target.
    Connected,
    Listener,
    /// First seen mid-life (the probes were attached after it was opened).
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SocketEntry {
    pub tgid: u32,
    pub state: u8,
    pub origin: Origin,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Kernel monotonic time of the first event seen for it.
    pub first_seen_ns: u64,
    pub last_change_ns: u64,
}

#[derive(Debug)]
pub struct SocketTable {
    entries: HashMap<u64, SocketEntry>,
    cap: usize,
    /// Sockets not tracked because the table was at its cap.
    pub dropped: u64,
}

impl SocketTable {
    pub fn new(cap: usize) -> Self {
        Self {
            entries: HashMap::new(),
            cap,
            dropped: 0,
        }
    }

    pub fn apply(&mut self, ev: &SockEvent) {
        if ev.newstate == tcp_state::CLOSE {
            self.entries.remove(&ev.skaddr);
            return;
        }
        if let Some(entry) = self.entries.get_mut(&ev.skaddr) {
            entry.state = ev.newstate;
            entry.last_change_ns = ev.ts_ns;
            // Addresses are only complete once connected; keep the latest.
            entry.local = local_addr(ev);
            entry.remote = remote_addr(ev);
            return;
        }
        if self.entries.len() >= self.cap {
            self.dropped += 1;
            return;
        }
        let origin = match (ev.oldstate, ev.newstate) {
            (tcp_state::CLOSE, tcp_state::SYN_SENT) => Origin::Connected,
            (_, tcp_state::SYN_RECV) => Origin::Accepted,
            (_, tcp_state::LISTEN) => Origin::Listener,
            _ => Origin::Unknown,
        };
        let entry = SocketEntry {
            tgid: ev.tgid,
            state: ev.newstate,
            origin,
            local: local_addr(ev),
            remote: remote_addr(ev),
            first_seen_ns: ev.ts_ns,
            last_change_ns: ev.ts_ns,
        };
        self.entries.insert(ev.skaddr, entry);
    }

    /// Forgets a process's sockets (after it exited and its sockets can no longer be reported closed).
    pub fn forget_process(&mut self, tgid: u32) {
        self.entries.retain(|_, e| e.tgid != tgid);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> impl Iterator<Item = &SocketEntry> {
        self.entries.values()
    }

    /// CLOSE_WAIT sockets grouped by who hung up, most first, at most `max` groups. A caller (accepted
    /// socket) is named by its address alone, its port being ephemeral; a target the process dialed is
    /// named by address and port, which is the service.
    pub fn close_wait_by_peer(&self, max: usize) -> Vec<(String, u64)> {
        let mut groups: HashMap<String, u64> = HashMap::new();
        for e in self
            .entries
            .values()
            .filter(|e| e.state == tcp_state::CLOSE_WAIT)
        {
            let peer = match e.origin {
                Origin::Connected => e.remote.to_string(),
                _ => format!("{} (callers)", e.remote.ip()),
            };
            *groups.entry(peer).or_default() += 1;
        }
        let mut v: Vec<(String, u64)> = groups.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(max);
        v
    }

    /// The `n` oldest sockets that are not listeners, oldest first: what has been held longest.
    pub fn oldest(&self, n: usize) -> Vec<&SocketEntry> {
        let mut v: Vec<&SocketEntry> = self
            .entries
            .values()
            .filter(|e| e.state != tcp_state::LISTEN)
            .collect();
        v.sort_by_key(|e| e.first_seen_ns);
        v.truncate(n);
        v
    }

    /// Live entries per TCP state (for cross-checking against the in-kernel counts).
    pub fn count_by_state(&self) -> [u64; 13] {
        let mut by_state = [0; 13];
        for e in self.entries.values() {
            if let Some(slot) = by_state.get_mut(e.state as usize) {
                *slot += 1;
            }
        }
        by_state
    }
}

fn addr(family: u16, bytes: &[u8; 16], port: u16) -> SocketAddr {
    let ip = if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    };
    SocketAddr::new(ip, port)
}

fn local_addr(ev: &SockEvent) -> SocketAddr {
    addr(ev.family, &ev.saddr, ev.sport)
}

fn remote_addr(ev: &SockEvent) -> SocketAddr {
    addr(ev.family, &ev.daddr, ev.dport)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcp_state::*;

    fn ev(sk: u64, old: u8, new: u8) -> SockEvent {
        SockEvent {
            kind: monitor_ebpf::event_kind::SOCK_STATE,
            oldstate: old,
            newstate: new,
            tgid: 42,
            skaddr: sk,
            family: AF_INET,
            sport: 1000,
            dport: 2000,
            saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..SockEvent::default()
        }
    }

    #[test]
    fn follows_lifecycles_and_classifies_origin() {
        let mut t = SocketTable::new(16);
        for e in [
            ev(1, CLOSE, LISTEN),
            ev(2, CLOSE, SYN_SENT),
            ev(2, SYN_SENT, ESTABLISHED),
            ev(3, LISTEN, SYN_RECV),
            ev(3, SYN_RECV, ESTABLISHED),
            ev(3, ESTABLISHED, CLOSE_WAIT),
            ev(4, CLOSE, SYN_SENT),
            ev(4, SYN_SENT, CLOSE),
        ] {
            t.apply(&e);
        }
        assert_eq!(t.len(), 3);
        let by_state = t.count_by_state();
        assert_eq!(
            (
                by_state[LISTEN as usize],
                by_state[ESTABLISHED as usize],
                by_state[CLOSE_WAIT as usize]
            ),
            (1, 1, 1)
        );
        let origin_of = |o| t.entries().filter(|e| e.origin == o).count();
        assert_eq!(
            (
                origin_of(Origin::Accepted),
                origin_of(Origin::Connected),
                origin_of(Origin::Listener)
            ),
            (1, 1, 1)
        );
        let connected = t.entries().find(|e| e.origin == Origin::Connected).unwrap();
        assert_eq!(connected.remote.to_string(), "127.0.0.1:2000");
    }

    #[test]
    fn cap_is_counted_not_exceeded() {
        let mut t = SocketTable::new(2);
        for sk in 0..5 {
            t.apply(&ev(sk, CLOSE, SYN_SENT));
        }
        assert_eq!(t.len(), 2);
        assert_eq!(t.dropped, 3);
    }

    #[test]
    fn forgetting_a_process_drops_its_sockets() {
        let mut t = SocketTable::new(8);
        t.apply(&ev(1, CLOSE, SYN_SENT));
        t.forget_process(42);
        assert!(t.is_empty());
    }

    #[test]
    fn close_wait_is_grouped_by_peer_and_oldest_come_first() {
        let mut t = SocketTable::new(64);
        // Three dialed targets on port 2000 and one caller hung up; one dialed socket is still open.
        for sk in 10..13 {
            for (i, (old, new)) in [
                (CLOSE, SYN_SENT),
                (SYN_SENT, ESTABLISHED),
                (ESTABLISHED, CLOSE_WAIT),
            ]
            .into_iter()
            .enumerate()
            {
                t.apply(&SockEvent {
                    ts_ns: sk * 100 + i as u64,
                    ..ev(sk, old, new)
                });
            }
        }
        for (old, new) in [
            (LISTEN, SYN_RECV),
            (SYN_RECV, ESTABLISHED),
            (ESTABLISHED, CLOSE_WAIT),
        ] {
            t.apply(&SockEvent {
                ts_ns: 5,
                ..ev(20, old, new)
            });
        }
        t.apply(&SockEvent {
            ts_ns: 1,
            ..ev(30, CLOSE, SYN_SENT)
        });
        t.apply(&SockEvent {
            ts_ns: 2,
            ..ev(31, CLOSE, LISTEN)
        });
        assert_eq!(
            t.close_wait_by_peer(5),
            vec![
                ("127.0.0.1:2000".to_string(), 3),
                ("127.0.0.1 (callers)".to_string(), 1)
            ]
        );
        assert_eq!(t.close_wait_by_peer(1).len(), 1, "capped");
        let oldest: Vec<u64> = t.oldest(3).iter().map(|e| e.first_seen_ns).collect();
        assert_eq!(oldest, vec![1, 5, 1000], "oldest first, listeners left out");
    }
}
