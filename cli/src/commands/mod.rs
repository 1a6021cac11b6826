//! One module per command group; each turns its arguments into API calls and prints the
//! answer (a table, or the API's JSON with `--json`).
//!
//! - [`submit`]: `emp submit` (and the shared end of `--wait`: follow, download, exit code).
//! - [`jobs`]: `emp jobs list|get|cancel|outputs|executions|wait`.
//! - [`templates`]: `emp templates list|get|create|update|delete`.
//! - [`machines`]: `emp machines list|get|drain|undrain`.
//! - [`keys`]: `emp keys create|list|revoke`.
//! - [`stats`]: `emp stats`.
//! - [`login`]: `emp login`.

pub mod jobs;
pub mod keys;
pub mod login;
pub mod machines;
pub mod stats;
pub mod submit;
pub mod templates;

use crate::cli::{Cli, Command, PageArgs};
use crate::client::ApiClient;
use crate::config::{self, FileConfig};
use crate::error::CliError;

/// What every command needs.
pub struct Context {
    /// The API.
    pub client: ApiClient,
    /// `--json`.
    pub json: bool,
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    if let Command::Completions { shell } = cli.command {
        crate::completions::print(shell);
        return Ok(());
    }
    let file = match config::config_path() {
        Some(path) => config::read_file(&path)?,
        None => FileConfig::default(),
    };
    let settings = config::resolve(cli.api_url.as_deref(), cli.api_key.as_deref(), &file)?;
    let context = Context {
        client: ApiClient::new(&settings)?,
        json: cli.json,
    };
    match cli.command {
        Command::Submit(args) => submit::run(&context, args).await,
        Command::Jobs(command) => jobs::run(&context, command).await,
        Command::Templates(command) => templates::run(&context, command).await,
        Command::Machines(command) => machines::run(&context, command).await,
        Command::Keys(command) => keys::run(&context, command).await,
        Command::Stats => stats::run(&context).await,
        Command::Login => login::run(&context, &settings).await,
        Command::Completions { .. } => Ok(()),
    }
}

/// The `limit`/`cursor` query of a list.
pub fn page_query(page: &PageArgs) -> Vec<(&'static str, String)> {
    let mut query = Vec::new();
    if let Some(limit) = page.limit {
        query.push(("limit", limit.to_string()));
    }
    if let Some(cursor) = &page.cursor {
        query.push(("cursor", cursor.clone()));
    }
    query
}
