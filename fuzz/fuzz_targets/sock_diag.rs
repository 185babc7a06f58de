#![no_main]
//! sock_diag replies come from the kernel, and their lengths, families and attributes are read from the
//! bytes: the parser must never trust one of them, nor keep more sockets than its cap.
use std::collections::HashSet;

use leakwatch::sources::sockdiag::{Accumulator, parse_datagram};
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
});
