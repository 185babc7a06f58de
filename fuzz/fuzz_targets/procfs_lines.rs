#![no_main]
//! procfs lines are read from a process that may be exiting or hostile (its comm and cmdline are its own
//! to choose): every line parser must reject garbage without panicking.
use libfuzzer_sys::fuzz_target;
use leakwatch::sources::procfs::{parse_fd_limit, parse_stat, parse_tcp_line, socket_inode};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for line in text.lines() {
            let _ = parse_tcp_line(line);
            let _ = socket_inode(line);
        }
        let _ = parse_fd_limit(text);
        let _ = parse_stat(text);
    }
});
