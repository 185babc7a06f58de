//! A big exporter's `/metrics`, made up: what the scraper's benches and tests read.
use std::fmt::Write;

/// `series` unrelated series in histogram families of 500 (lines of about 75 bytes, as the 3.4 MB,
/// 50,000-series body of issue 17) beside remotedialer's ledger for `clientkeys` clientkeys with
/// `rows_per_key` addresses each, and the Go runtime's gauges.
pub fn big_exposition(series: usize, clientkeys: usize, rows_per_key: usize) -> String {
    let mut s = String::with_capacity(series * 76 + clientkeys * rows_per_key * 220 + 256);
    s += "# HELP go_goroutines Number of goroutines.\n# TYPE go_goroutines gauge\ngo_goroutines 1234\n";
    s += "# TYPE go_memstats_heap_inuse_bytes gauge\ngo_memstats_heap_inuse_bytes 1.2345e+08\n";
    for f in 0..series.div_ceil(500) {
        let _ = write!(
            s,
            "# HELP apiserver_family_{f}_seconds Unrelated series.\n# TYPE apiserver_family_{f}_seconds histogram\n"
        );
        for i in 0..500.min(series - f * 500) {
            let _ = writeln!(
                s,
                "apiserver_family_{f}_seconds_bucket{{resource=\"r{}\",verb=\"GET\",le=\"{i}\"}} {}",
                i % 37,
                i * 3
            );
        }
    }
    for (name, v) in [("add", 1000), ("remove", 990)] {
        let _ = write!(
            s,
            "# HELP session_server_total_{name}_connections Total count of {name}ed connections\n# TYPE session_server_total_{name}_connections counter\n"
        );
        for k in 0..clientkeys {
            for r in 0..rows_per_key {
                let _ = writeln!(
                    s,
                    "session_server_total_{name}_connections{{addr=\"10.{}.{}.{r}:6443\",clientkey=\"c-{k:05}\",proto=\"tcp\"}} {}",
                    k / 250,
                    k % 250,
                    v + k
                );
            }
        }
    }
    s
}
