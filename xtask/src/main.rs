//! `cargo xtask <command>`: everything a newcomer or CI runs, each command doing its own set-up.
mod bench;
mod demo;
mod ebpf;
mod fuzz;
mod lint;
mod report;
mod setup;
mod tunnel;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, set up, demo, test and bench leakwatch", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing (eBPF toolchain, Prometheus/promtool, python3) and mount tracefs.
    Setup {
        /// Only report what is missing and the commands that would install it.
        #[arg(long)]
        check: bool,
    },
    /// Compile the eBPF probes for bpfel-unknown-none with whichever toolchain is present.
    BuildEbpf,
    /// Build the probes, then leakwatch and reftunnel in release mode.
    Build,
    /// The main job: reference tunnel with the v2.10.3 leak, load, leakwatch catching it live; then a
    /// healthy tunnel staying green and the fix's verification recipe passing.
    Demo,
    /// Benchmarks: eBPF cost per event, leakwatch CPU/RSS under churn, tunnel overhead, sampling cost,
    /// detection scorecard. Prints one table and writes target/leakwatch-results/bench.json.
    Bench {
        /// Only the scale rows (issue 17: a big /metrics, thousands of clientkeys), a few minutes.
        #[arg(long)]
        scale_only: bool,
    },
    /// Run every fuzz target for a bounded time (needs a nightly toolchain; installs cargo-fuzz).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// fmt check, clippy with warnings as errors, unused dependencies (run by `test` too).
    Lint,
    /// Set up, build the probes, and run the whole test suite (the README's test command).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
}

fn build_release() -> Result<()> {
    setup::run(false)?;
    ebpf::build()?;
    util::cargo(&["build", "--release", "-p", "monitor", "-p", "reftunnel"])
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup { check } => setup::run(check),
        Command::BuildEbpf => ebpf::build(),
        Command::Build => build_release(),
        Command::Demo => {
            build_release()?;
            demo::run()
        }
        Command::Bench { scale_only } => {
            build_release()?;
            bench::run(scale_only)
        }
        Command::Fuzz { seconds } => fuzz::run(seconds, true),
        Command::Lint => lint::run(),
        Command::Test { cargo_args } => {
            setup::run(false)?;
            ebpf::build()?;
            // Lint first: a warning fails the run before half an hour of scenarios is spent on it.
            lint::run()?;
            // The scenario and alerting tests run the reftunnel and leakwatch binaries: build them first.
            util::cargo(&["build", "-p", "reftunnel", "-p", "monitor", "--bins"])?;
            let results = util::workspace_root().join("target/leakwatch-results");
            let _ = std::fs::remove_file(results.join("scenarios.jsonl"));
            let mut args = vec!["test", "--workspace", "--no-fail-fast"];
            if !cargo_args.is_empty() {
                args.push("--");
                args.extend(cargo_args.iter().map(String::as_str));
            }
            // Bounded fuzzing of the parsers first, so the test summary is the last thing printed.
            let fuzzing = fuzz::run(20, false);
            let ((passed, failed, ignored), ok) = util::cargo_test(&args)?;
            report::print_scenarios(&results);
            if let Err(e) = &fuzzing {
                eprintln!("xtask: fuzzing failed: {e:#}");
            }
            println!("\ntests: {passed} passed, {failed} failed, {ignored} skipped");
            if !ok || failed > 0 {
                anyhow::bail!("the test suite failed");
            }
            fuzzing
        }
    }
}
