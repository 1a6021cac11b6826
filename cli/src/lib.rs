//! # emp-cli
//!
//! `emp`, the command line of emp. It talks only to the control plane's REST API
//! (CONTRACT.md section 1).
//!
//! - [`cli`]: the commands and flags (clap), the help text with the exit codes.
//! - [`config`]: API URL and key from flags, environment or the config file `emp login`
//!   writes.
//! - [`client`]: the HTTP client; the API's error envelope becomes [`error::ApiError`].
//! - [`error`]: every failure and its stable exit code ([`error::ExitStatus`]).
//! - [`inputs`]: `--require`, `--param`, `--metadata` and workflow files into API values.
//! - [`sse`]: the parser of the job events stream.
//! - [`watch`]: following a job to its end with a progress bar, downloading its outputs.
//! - [`output`]: tables and `--json`.
//! - [`commands`]: one module per command group.
//! - [`completions`]: shell completion scripts.

pub mod cli;
pub mod client;
pub mod commands;
pub mod completions;
pub mod config;
pub mod error;
pub mod inputs;
pub mod output;
pub mod sse;
pub mod watch;
