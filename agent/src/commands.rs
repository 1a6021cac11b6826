//! The subcommands, each returning the process exit code (CONTRACT.md section 2).

use std::io::Write;
use std::process::ExitCode;

use crate::config::{Config, ConfigOverrides};
use crate::exit_code;

/// `emp-agent detect`: prints the capabilities JSON (pretty) on stdout. A box without GPU or
/// without ComfyUI is reported, not an error: the exit code is 0 unless the configuration is
/// bad (64) or stdout cannot be written (74).
pub fn detect(overrides: &ConfigOverrides) -> ExitCode {
    let config = match load_config(overrides) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "could not start the async runtime");
            return ExitCode::from(exit_code::SOFTWARE);
        }
    };
    let capabilities = runtime.block_on(crate::detect::detect(&config));
    let json = match serde_json::to_string_pretty(&capabilities) {
        Ok(json) => json,
        Err(error) => {
            tracing::error!(%error, "could not serialise the capabilities");
            return ExitCode::from(exit_code::SOFTWARE);
        }
    };
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = writeln!(stdout, "{json}").and_then(|()| stdout.flush()) {
        tracing::error!(%error, "could not write the capabilities to stdout");
        return ExitCode::from(exit_code::IO);
    }
    ExitCode::from(exit_code::OK)
}

/// `emp-agent run`: not in this build yet. The configuration is still checked, so a bad one
/// is reported as such (64) rather than hidden behind "not available" (70).
pub fn run(overrides: &ConfigOverrides) -> ExitCode {
    if let Err(code) = load_config(overrides) {
        return code;
    }
    eprintln!("emp-agent run: not available in this build yet (only `emp-agent detect` is)");
    ExitCode::from(exit_code::SOFTWARE)
}

/// Loads the configuration from the process environment and starts logging; a bad value is
/// printed on stderr and becomes exit code 64.
fn load_config(overrides: &ConfigOverrides) -> Result<Config, ExitCode> {
    match Config::from_process(overrides) {
        Ok(config) => {
            crate::logging::init(&config);
            tracing::debug!(?config, "configuration loaded");
            Ok(config)
        }
        Err(error) => {
            // Logging is not set up yet (its own settings may be the bad ones).
            eprintln!("emp-agent: {error}");
            Err(ExitCode::from(exit_code::CONFIG))
        }
    }
}
