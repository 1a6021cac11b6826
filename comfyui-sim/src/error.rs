//! The errors the library API can return (handlers map their own errors to HTTP statuses).

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A configuration value is unusable; the message names the setting.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A directory the simulator needs could not be prepared.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The listener handed to `spawn` has no usable local address.
    #[error("the listener has no local address: {0}")]
    Listener(io::Error),
    /// The HTTP server task ended with an error or panicked.
    #[error("the simulator's server failed: {0}")]
    Server(String),
}

impl SimError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        SimError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
