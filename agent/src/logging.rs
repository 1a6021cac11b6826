//! Tracing to stderr, so stdout stays clean for what a command prints (`detect`'s JSON).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Installs the global subscriber for `config`'s filter and format. A second call (tests
/// running several commands in one process) keeps the first subscriber.
pub fn init(config: &Config) {
    // The filter was checked when the config was loaded.
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in collected container logs.
        .with_ansi(std::io::stderr().is_terminal());
    let _already_set = match config.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
