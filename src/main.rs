//! The `veil` command: boot a guest, probe the host.

mod cli;
mod commands;
mod ctl;
mod keep_listening;
mod owner;
mod progress;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging(cli.log_level.as_deref());
    if prints_and_exits(&cli.command) {
        // `veil ctl status | head` should end quietly, as other tools do, not panic on a
        // closed stdout. VMM commands keep ignoring SIGPIPE: their sockets report errors.
        // SAFETY: restoring a signal's default disposition has no memory-safety preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match commands::dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            report(&*e);
            ExitCode::FAILURE
        }
    }
}

/// Commands that only print an answer (not a VMM, and not a migration that must be able to
/// report a lost VMM connection).
fn prints_and_exits(command: &cli::Command) -> bool {
    match command {
        cli::Command::Ctl(args) => !matches!(args.command, cli::CtlCommand::Migrate { .. }),
        cli::Command::HostInfo(_) | cli::Command::Sev(_) | cli::Command::Kit { .. } => true,
        _ => false,
    }
}

fn init_logging(level: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VEIL_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level.unwrap_or("warn")))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Prints an error and its whole cause chain, one cause per line.
fn report(error: &(dyn std::error::Error + 'static)) {
    eprintln!("veil: error: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        eprintln!("  caused by: {cause}");
        source = cause.source();
    }
}
