//! `emp completions bash|zsh|fish|elvish|powershell`: the shell completion script on stdout.

use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cli::Cli;

/// Prints the completion script of `shell`.
pub fn print(shell: Shell) {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "emp", &mut std::io::stdout());
}
