#![no_main]
//! The target's /metrics body is whatever the far end sends, in whatever chunks the network makes: the
//! streaming reader must return an error, never panic, keep the ledger within its cardinality cap, and
//! read the same sample (or the same error) however the body is split into chunks.
use leakwatch::sources::{
    exposition::{Reader, parse},
    scrape::MetricNames,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first bytes choose the chunk sizes; the rest is the body.
    let (sizes, body) = data.split_at(data.len().min(8));
    let names = MetricNames::default();
    let whole = parse(body, &names, 16);
    if let Ok(sample) = &whole {
        assert!(sample.ledger.len() <= 17, "16 rows and _other");
    }
    let mut r = Reader::new(&names, 16);
    let mut rest = body;
    let mut fed = Ok(());
    for n in sizes.iter().cycle() {
        if rest.is_empty() || fed.is_err() {
            break;
        }
        let (chunk, tail) = rest.split_at((*n as usize + 1).min(rest.len()));
        fed = r.feed(chunk);
        rest = tail;
    }
    let chunked = fed.and_then(|()| r.finish());
    assert_eq!(chunked, whole);
});
