//! Stdout lines that other processes (tests, xtask) wait for through a pipe.

use std::io::Write;

/// Writes one line and flushes at once, so a reader on a pipe sees it immediately.
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    // Stdout going away (reader exited) must not take the tunnel down with it.
    let _ = out.write_fmt(args);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::out::line(format_args!($($arg)*)) };
}
