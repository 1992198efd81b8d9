//! The `edgefn` binary: parse the command line, set up logging, hand over.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // The daemon logs at info; the demo's screen is its live counts table.
    // rmqtt's accept loop warns of every TLS handshake it refuses, which
    // anyone on the network can cause at will: those stay out of the
    // journal unless asked for (EDGEFN_LOG=info,rmqtt::server=warn).
    let default = match cli.command {
        #[cfg(feature = "embedded-broker")]
        cli::Command::Demo(_) => "error",
        _ => "info,rmqtt=warn,rmqtt::server=error,rmqtt_net=warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGEFN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        // No colour codes in the journal or a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
