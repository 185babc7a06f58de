//! `cargo xtask <command>`: everything a newcomer or CI runs, each command doing its own set-up.
mod ebpf;
mod setup;
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
    /// Set up, build the probes, and run the whole test suite (the README's test command).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup { check } => setup::run(check),
        Command::BuildEbpf => ebpf::build(),
        Command::Build => {
            setup::run(false)?;
            ebpf::build()?;
            util::cargo(&["build", "--release", "-p", "monitor", "-p", "reftunnel"])
        }
        Command::Test { cargo_args } => {
            setup::run(false)?;
            ebpf::build()?;
            let mut args = vec!["test", "--workspace", "--no-fail-fast"];
            if !cargo_args.is_empty() {
                args.push("--");
                args.extend(cargo_args.iter().map(String::as_str));
            }
            util::cargo(&args)
        }
    }
}
