//! The subcommands. Each builds its sources with [`crate::collect::Collector`] and loops over snapshots.
pub mod check;
pub mod observe;
pub mod replay;
pub mod verify;
pub mod watch;
