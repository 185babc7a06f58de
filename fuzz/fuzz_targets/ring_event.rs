#![no_main]
//! Ring-buffer records are decoded from raw bytes; the decoder must never trust a length.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = leakwatch::sources::ebpf::decode_event(data);
});
