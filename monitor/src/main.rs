use std::process::ExitCode;

use clap::Parser;
use leakwatch::{
    cli::{Cli, Command, LogFormat},
    commands,
};
use tracing_subscriber::EnvFilter;

fn init_logging(cli: &Cli) {
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
        eprintln!(
            "leakwatch: --log {:?} is not a valid filter ({e}); using `info`",
            cli.log
        );
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in files, pipes or a log collector.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    // The probes are loaded and the capabilities dropped while this is the only thread: the runtime's
    // threads then start with the reduced sets.
    let prepared = match &cli.command {
        Command::Watch(a) => Some(commands::prepare(&a.sidecar)),
        Command::Check(a) => Some(commands::prepare(&a.sidecar)),
        Command::Verify(a) => Some(commands::prepare(&a.sidecar)),
        Command::Observe(_) | Command::Replay(_) => None,
    };
    let prepared = match prepared.transpose() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("leakwatch: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("leakwatch: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Observe(a) => commands::observe::run(a).await.map(|()| ExitCode::SUCCESS),
            Command::Watch(_) => commands::watch::run(prepared.expect("prepared above"))
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Check(a) => commands::check::run(a, prepared.expect("prepared above")).await,
            Command::Verify(a) => commands::verify::run(a, prepared.expect("prepared above")).await,
            Command::Replay(a) => commands::replay::run(a),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("leakwatch: {e:#}");
            ExitCode::from(2)
        }
    }
}
