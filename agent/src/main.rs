//! # emp-agent
//!
//! Runs on every GPU box: detects what the box can do, registers, heartbeats, claims the jobs it
//! can run from Redis and runs them on the local ComfyUI (CONTRACT.md section 2).
//!
//! This version carries the command line only; detection (`detect`) and the run loop (`run`)
//! are built on top of the dispatch scripts in `emp-shared`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "emp-agent",
    version,
    about = "emp's agent: runs jobs from Redis on the local ComfyUI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    let name = match cli.command {
        Command::Detect => "detect",
        Command::Run => "run",
    };
    eprintln!("emp-agent {name}: not available in this version yet");
    ExitCode::from(70)
}
