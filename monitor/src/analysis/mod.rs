//! Pure analysis: series of [`crate::sample::Snapshot`]s in, [`crate::verdict::Verdict`]s out. No I/O.
