//! `cargo xtask fuzz`: runs every cargo-fuzz target for a bounded time. libFuzzer needs a nightly
//! compiler (sanitizer flags); where there is none, this says so loudly and the proptest properties in the
//! unit tests remain the only cover of the parsers.
use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::util::{self, workspace_root};

fn nightly() -> bool {
    util::runs("rustup", &["run", "nightly", "rustc", "--version"])
}

fn ensure_cargo_fuzz() -> Result<()> {
    if util::runs("cargo", &["fuzz", "--version"]) {
        return Ok(());
    }
    util::run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))
}

pub fn targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let manifest =
        std::fs::read_to_string(fuzz_dir.join("Cargo.toml")).context("reading fuzz/Cargo.toml")?;
    let mut names = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin {
            if let Some(v) = line.strip_prefix("name = ") {
                names.push(v.trim_matches('"').to_string());
            }
        }
    }
    Ok(names)
}

/// Runs each target for `seconds`; fails if any target finds a crash.
pub fn run(seconds: u64, required: bool) -> Result<()> {
    if !nightly() {
        let msg = "!!! FUZZING SKIPPED: no nightly toolchain (`rustup toolchain install nightly`); only the proptest properties cover the parsers !!!";
        if required {
            bail!("{msg}");
        }
        eprintln!("{msg}");
        return Ok(());
    }
    ensure_cargo_fuzz()?;
    let dir = workspace_root().join("fuzz");
    let targets = targets(&dir)?;
    let mut summary = Vec::new();
    for t in &targets {
        let corpus = dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let seeds = dir.join("seeds").join(t);
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "nightly", "cargo", "fuzz", "run", "--fuzz-dir"])
            .arg(&dir)
            .arg(t)
            .arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args([
                "-rss_limit_mb=1024",
                "-malloc_limit_mb=256",
                "-max_len=65536",
                "-print_final_stats=1",
            ])
            .current_dir(workspace_root());
        util::run(&mut cmd)
            .with_context(|| format!("fuzz target {t} failed (crash or error; see above)"))?;
        summary.push(t.clone());
    }
    eprintln!(
        "xtask: fuzzed {} targets for {seconds}s each, no crash: {}",
        summary.len(),
        summary.join(", ")
    );
    Ok(())
}
