//! `cargo xtask <command>`: everything a newcomer or CI runs, each command doing its own set-up.
mod bench;
mod bench_dumps;
mod demo;
mod ebpf;
mod fuzz;
mod kernels;
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
    /// detection scorecard, the stall goroutine profiles cause a Go target, the scale rows. Prints one
    /// table and writes target/leakwatch-results/bench.json.
    Bench {
        /// Only the goroutine-profile part (a Go target's stall at 1k/10k/100k goroutines).
        #[arg(long, conflicts_with = "scale_only")]
        goroutines_only: bool,
        /// Only the scale rows (a big /metrics, thousands of clientkeys), a few minutes.
        #[arg(long)]
        scale_only: bool,
    },
    /// Run every fuzz target for a bounded time (needs a nightly toolchain; installs cargo-fuzz).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// The kernel tests on the kernels users' nodes run (Debian's 5.10, 6.1 and 6.12 cloud kernels, each
    /// booted in qemu) and natively on this machine's; one row per kernel.
    Kernels {
        /// Only these (e.g. `--kernel 5.10 --kernel native`); all by default.
        #[arg(long = "kernel", value_name = "VERSION")]
        kernels: Vec<String>,
    },
    /// fmt check, clippy with warnings as errors, unused dependencies (run by `test` too).
    Lint,
    /// Set up, build the probes, and run the whole test suite and the kernel matrix (the README's test
    /// command).
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
        Command::Bench {
            goroutines_only,
            scale_only,
        } => {
            build_release()?;
            bench::run(goroutines_only, scale_only)
        }
        Command::Fuzz { seconds } => fuzz::run(seconds, true),
        Command::Lint => lint::run(),
        Command::Kernels { kernels } => {
            setup::run(false)?;
            ebpf::build()?;
            kernels::run(&kernels)
        }
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
            // The kernel tests ran natively above; here they run on the kernels users' nodes run, each
            // booted once in qemu (about 2 minutes a kernel, see the README's Kernels section).
            let emulated: Vec<String> = kernels::KERNELS
                .iter()
                .map(|k| k.version.to_string())
                .collect();
            let matrix = kernels::run(&emulated);
            if let Err(e) = &fuzzing {
                eprintln!("xtask: fuzzing failed: {e:#}");
            }
            if let Err(e) = &matrix {
                eprintln!("xtask: kernel matrix failed: {e:#}");
            }
            println!("\ntests: {passed} passed, {failed} failed, {ignored} skipped");
            if !ok || failed > 0 {
                anyhow::bail!("the test suite failed");
            }
            fuzzing.and(matrix)
        }
    }
}
