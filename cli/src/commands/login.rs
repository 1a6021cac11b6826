//! `emp login`: checks a key with `GET /api/v1/users/me` and stores it, with the API URL, in
//! the config file (mode 0600). The key comes from --api-key / EMP_API_KEY, else stdin.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use super::Context;
use crate::client::ApiClient;
use crate::config::{self, FileConfig, Settings};
use crate::error::CliError;
use crate::output::{self, text};

/// Runs `emp login`.
pub async fn run(context: &Context, settings: &Settings) -> Result<(), CliError> {
    let key = match &settings.api_key {
        Some(key) => key.clone(),
        None => read_key()?,
    };
    let settings = Settings {
        api_url: settings.api_url.clone(),
        api_key: Some(key.clone()),
    };
    let client = ApiClient::new(&settings)?;
    let me = client.get("/api/v1/users/me", &[]).await?;
    let path = config::config_path().ok_or_else(|| {
        CliError::Local("cannot tell where the config file goes: set HOME or EMP_CONFIG".into())
    })?;
    config::write_file(
        &path,
        &FileConfig {
            api_url: Some(settings.api_url.clone()),
            api_key: Some(key),
        },
    )?;
    if context.json {
        output::print_json(&me);
    } else {
        println!(
            "logged in to {} as {} ({}); saved in {}",
            settings.api_url,
            text(&me, "email"),
            text(&me, "role"),
            path.display()
        );
    }
    Ok(())
}

/// Reads the key from stdin (with a prompt when stdin is a terminal).
fn read_key() -> Result<String, CliError> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("API key: ");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .map_err(|error| CliError::local("cannot read the key from stdin", error))?;
    let key = line.trim().to_owned();
    if key.is_empty() {
        return Err(CliError::Usage(
            "no API key: give --api-key, set EMP_API_KEY or type it on stdin".into(),
        ));
    }
    Ok(key)
}
