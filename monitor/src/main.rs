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
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
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
            Command::Watch(a) => commands::watch::run(a).await.map(|()| ExitCode::SUCCESS),
            Command::Check(a) => commands::check::run(a).await,
            Command::Verify(a) => commands::verify::run(a).await,
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
