#![no_main]
//! The target's /metrics body is whatever the far end sends: the parse path must return an error, never
//! panic, and keep the ledger within its cardinality cap.
use libfuzzer_sys::fuzz_target;
use leakwatch::sources::scrape::{MetricNames, parse_app_sample};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(sample) = parse_app_sample(text, &MetricNames::default(), 16) {
            assert!(sample.ledger.len() <= 16);
        }
    }
});
