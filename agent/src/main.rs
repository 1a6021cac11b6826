//! The `emp-agent` binary: parses the command line and hands over to the library (see
//! `lib.rs` for the layout).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use emp_agent::commands;
use emp_agent::config::ConfigOverrides;

#[derive(Parser)]
#[command(
    name = "emp-agent",
    version,
    about = "emp's agent: runs jobs from Redis on the local ComfyUI",
    long_about = "emp's agent: runs jobs from Redis on the local ComfyUI.\n\nSettings come from \
                  the environment (CONTRACT.md section 2); each flag below overrides its variable."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    config: ConfigOverrides,
}

#[derive(Subcommand)]
enum Command {
    /// Print the capabilities JSON of this box and exit.
    Detect,
    /// Register, heartbeat and run jobs until SIGTERM/SIGINT.
    Run,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Detect => commands::detect(&cli.config),
        Command::Run => commands::run(&cli.config),
    }
}
