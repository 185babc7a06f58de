//! Tables printed after the tests: the scenario suite's detection results.
use std::path::Path;

use serde_json::Value;

pub fn scenario_rows(results: &Path) -> Vec<Value> {
    std::fs::read_to_string(results.join("scenarios.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn print_scenarios(results: &Path) {
    let rows = scenario_rows(results);
    if rows.is_empty() {
        return;
    }
    println!("\nScenario suite (real reference tunnel, real leakwatch, eBPF on):");
    println!(
        "| scenario | expected | fired (s after leak start) | detection | false alarms | leakwatch CPU | leakwatch peak RSS | result |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let list = |v: &Value| {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        println!(
            "| {} | {} | {} | {} | {} | {:.2}% | {:.1} MiB | {} |",
            r["scenario"].as_str().unwrap_or("?"),
            list(&r["expected"]).if_empty("nothing"),
            list(&r["fired"]).if_empty("nothing"),
            r["detection_s"]
                .as_f64()
                .map(|d| format!("{d:.1} s"))
                .unwrap_or_else(|| "-".into()),
            r["false_alarms"].as_array().map(|a| a.len()).unwrap_or(0),
            r["leakwatch_cpu_percent"].as_f64().unwrap_or(f64::NAN),
            r["leakwatch_peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
            if r["pass"].as_bool() == Some(true) {
                "pass"
            } else {
                "FAIL"
            }
        );
    }
}

trait IfEmpty {
    fn if_empty(self, other: &str) -> String;
}

impl IfEmpty for String {
    fn if_empty(self, other: &str) -> String {
        if self.is_empty() {
            other.to_string()
        } else {
            self
        }
    }
}
