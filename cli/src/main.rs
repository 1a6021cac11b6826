//! `emp`: parses the command line, runs the command, and exits with the code its outcome
//! maps to (see `emp --help`).

use std::process::ExitCode;

use clap::Parser as _;
use emp_cli::cli::Cli;
use emp_cli::error::ExitStatus;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("emp: cannot start: {error}");
            return ExitCode::from(ExitStatus::Failure.code());
        }
    };
    match runtime.block_on(emp_cli::commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("emp: {error}");
            ExitCode::from(error.exit_status().code())
        }
    }
}
