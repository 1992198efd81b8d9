//! The `edgefn` command line. Each subcommand is one file of this
//! directory, holding its arguments and what it does; this file lists
//! them. The library (src/lib.rs) knows nothing of them.

pub mod check;
pub mod dead_letters;
#[cfg(feature = "embedded-broker")]
pub mod demo;
pub mod deploy;
pub mod fleet;
pub mod invoke;
pub mod new;
pub mod run;
pub mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Lambda-style WebAssembly functions on edge devices.
#[derive(Debug, Parser)]
#[command(name = "edgefn", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
// Made once per process: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the gateway daemon.
    Run(ConfigFile),
    /// Check a configuration and every module it names; print a summary.
    Check(ConfigFile),
    /// Run a self-contained demo: the gateway with its built-in broker,
    /// simulated devices and a stand-in cloud broker, with live counts.
    #[cfg(feature = "embedded-broker")]
    Demo(demo::Args),
    /// Run one event through a module locally and print what it did.
    Invoke(invoke::Args),
    /// Write a new function's skeleton in Python, JavaScript, Rust or C,
    /// with its build command and a README (build, invoke, deploy).
    New(new::Args),
    /// Make a new private signing key; print its public key, for
    /// `deploy.trusted_keys`.
    Keygen(deploy::KeygenArgs),
    /// Make a signed bundle of a function, for gateways to run: checked
    /// here as strictly as a gateway checks it.
    Deploy(deploy::DeployArgs),
    /// Show what every gateway on a control broker runs, from their
    /// retained status topics (--broker); or, on a gateway, its figures
    /// (--config): from the running daemon, or from its database.
    Status(status::Args),
    /// Inspect, replay or delete the gateway's dead letters (safe while
    /// the daemon runs).
    DeadLetters(dead_letters::Args),
    /// Make a signed tombstone: the targeted gateways stop running the
    /// function.
    Remove(deploy::RemoveArgs),
}

/// The gateway's configuration file.
#[derive(Debug, clap::Args)]
pub struct ConfigFile {
    /// The configuration file.
    #[arg(
        long,
        short,
        env = "EDGEFN_CONFIG",
        default_value = "/etc/edgefn/edgefn.toml"
    )]
    pub config: PathBuf,
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(&args.config),
        Command::Check(args) => check::run(&args.config),
        #[cfg(feature = "embedded-broker")]
        Command::Demo(args) => demo::command(args),
        Command::Invoke(args) => invoke::command(args),
        Command::New(args) => new::command(args),
        Command::Keygen(args) => deploy::keygen(args),
        Command::Deploy(args) => deploy::deploy(args),
        Command::Status(args) => status::command(args),
        Command::DeadLetters(args) => dead_letters::command(args),
        Command::Remove(args) => deploy::remove(args),
    }
}

/// `--env KEY=VALUE`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}
