//! Process and runtime numbers exported under Go's metric names so that dashboards and
//! leakwatch rules written for Rancher apply unchanged. The mapping is an honest analogue, not an
//! identity:
//!
//! | exported | source |
//! | --- | --- |
//! | `reftunnel_tokio_alive_tasks`, `go_goroutines` | tokio `RuntimeMetrics::num_alive_tasks()` |
//! | `reftunnel_heap_allocated_bytes`, `go_memstats_heap_inuse_bytes` | jemalloc `stats.allocated` (epoch advanced first) |
//! | `go_threads` | `Threads:` in /proc/self/status |
//! | `process_open_fds` | entries of /proc/self/fd |
//! | `process_max_fds` | soft RLIMIT_NOFILE |
//! | `process_resident_memory_bytes` | resident pages in /proc/self/statm |

#[derive(Debug, Clone, Copy, Default)]
pub struct RuntimeStats {
    pub alive_tasks: Option<usize>,
    pub heap_allocated: Option<u64>,
    pub threads: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub rss_bytes: Option<u64>,
}

pub fn collect() -> RuntimeStats {
    RuntimeStats {
        alive_tasks: tokio::runtime::Handle::try_current()
            .ok()
            .map(|h| h.metrics().num_alive_tasks()),
        heap_allocated: heap_allocated(),
        threads: threads(),
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64),
        max_fds: max_fds(),
        rss_bytes: rss_bytes(),
    }
}

#[cfg(feature = "jemalloc")]
pub fn heap_allocated() -> Option<u64> {
    use tikv_jemalloc_ctl::{epoch, stats};
    // jemalloc caches its statistics; without advancing the epoch the number is stale.
    epoch::advance().ok()?;
    stats::allocated::read().ok().map(|v| v as u64)
}

#[cfg(not(feature = "jemalloc"))]
pub fn heap_allocated() -> Option<u64> {
    None
}

fn threads() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

fn max_fds() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    (rc == 0).then_some(r.rlim_cur)
}

fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}
