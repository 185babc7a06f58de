#![no_main]
//! sock_diag replies come from the kernel, and their lengths, families and attributes are read from the
//! bytes: the parser must never trust one of them, nor keep more sockets than its cap.
use std::collections::HashSet;

use leakwatch::sources::sockdiag::{Accumulator, idle_by_remote, parse_datagram};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small inodes, so that fuzzed replies do match some of them.
    let inodes: HashSet<u64> = (0..64).collect();
    let mut acc = Accumulator::new(&inodes, 4);
    let seq = data
        .get(8..12)
        .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let _ = parse_datagram(data, seq, &mut acc);
    assert!(acc.dump.sockets.len() <= 4);
    // Whatever ages and segment counts the kernel claims, the grouping counts each socket at most once.
    let rows = idle_by_remote(&acc.dump.sockets, seq, 2);
    let counted: u64 = rows.iter().map(|r| r.established + r.close_wait).sum();
    assert!(counted <= acc.dump.sockets.len() as u64);
    for r in &rows {
        assert!(r.unanswered.iter().sum::<u64>() <= r.established);
    }
});
