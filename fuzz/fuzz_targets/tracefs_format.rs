#![no_main]
//! Tracepoint `format` files come from the kernel, but a parser that panics on an odd one would take the
//! sidecar down at start-up.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = leakwatch::system::parse_format(text);
    }
});
