//! Help texts that state a default: written from the one definition of each (the analysis'
//! [`AnalysisConfig::default`], the socket-table capacity, the procfs scan period), so the number a user
//! reads in `--help` is the number the code uses. `monitor/tests/dashboards.rs` ties the docs and the
//! dashboard to the same table.
use super::AnalysisConfig;

fn d() -> AnalysisConfig {
    AnalysisConfig::default()
}

pub fn max_sockets() -> String {
    format!(
        "Cap of the socket tables (in-kernel, userspace, sock_diag); sockets beyond it are counted as \
         dropped, never tracked [default: {}]",
        monitor_ebpf::DEFAULT_MAX_SOCKETS
    )
}

pub fn procfs_scan_interval() -> String {
    format!(
        "With eBPF on, how often procfs joins the target's fds with /proc/<pid>/net/tcp{{,6}} (that file \
         lists every socket of the network namespace, TIME_WAIT included, and is costly on busy nodes). \
         fds, threads and RSS are still read every interval; without eBPF (and in `observe`) the join runs \
         every interval [default: {}s]",
        crate::args::DEFAULT_PROCFS_SCAN_INTERVAL.as_secs()
    )
}

pub fn idle_timeout() -> String {
    let c = d();
    format!(
        "The longest idle timeout a healthy HTTP transport of the target uses for pooled tunneled \
         connections [default: {}s, Go's http.DefaultTransport]. A tunneled connection open with no caller \
         for longer than this plus a {}s margin (the idle horizon) is a leak; shorter-lived idle \
         connections are healthy pooling and never alarm. Also `[analysis] idle_timeout_s` in the config file",
        c.idle_timeout_s, c.idle_margin_s
    )
}

pub fn verify_settle() -> String {
    let c = d();
    format!(
        "How long the tunnel may take to return to baseline after the load [default: the idle horizon, \
         --idle-timeout + {}s margin = {}s], because a healthy keep-alive transport holds its idle tunneled \
         connections, and their goroutines and memory, for up to its idle timeout after the load",
        c.idle_margin_s,
        c.idle_horizon_s()
    )
}

pub fn verify_tolerance() -> String {
    let c = d();
    format!(
        "Extra tasks/goroutines, fds and CLOSE_WAIT sockets tolerated over the baseline; overrides \
         `[analysis] settle_tasks_tolerance` and `settle_fds_tolerance` for this run [default: the \
         config file's, else {} and {}]",
        c.settle_tasks_tolerance, c.settle_fds_tolerance
    )
}

pub fn verify_heap_tolerance() -> String {
    let c = d();
    format!(
        "Extra heap tolerated over the baseline, as a fraction (0.25 = 25%), and never less than half the \
         heap rule's `heap_min_growth_bytes`; overrides `[analysis] settle_heap_tolerance_ratio` for this \
         run [default: the config file's, else {}]",
        c.settle_heap_tolerance_ratio
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_texts_state_the_defaults_the_code_uses() {
        let c = d();
        assert!(idle_timeout().contains(&format!("[default: {}s", c.idle_timeout_s)));
        assert!(idle_timeout().contains(&format!("{}s margin", c.idle_margin_s)));
        assert!(verify_settle().contains(&format!("= {}s]", c.idle_horizon_s())));
        assert!(max_sockets().contains(&monitor_ebpf::DEFAULT_MAX_SOCKETS.to_string()));
    }
}
