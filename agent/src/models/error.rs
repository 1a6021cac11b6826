//! What can go wrong getting a model. Errors are `Clone` so every caller waiting on one shared
//! download gets the same answer, and they name URLs without their query or credentials
//! ([`shown_url`]): signed download links carry tokens there.

use std::path::Path;

use reqwest::{StatusCode, Url};

/// Why a model could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The input name does not say which ComfyUI model folder the file belongs in.
    #[error("input {input:?} is not a model loader input this agent knows a folder for")]
    UnknownInput {
        /// The input's name.
        input: String,
    },
    /// The value is not a URL the agent downloads.
    #[error("{url:?} is not a model URL the agent can download: {reason}")]
    BadUrl {
        /// The value, shortened as [`shown_url`] does when it parses.
        url: String,
        /// Why.
        reason: String,
    },
    /// Model downloads need a ComfyUI models directory and none is configured.
    #[error(
        "model downloads are off: set EMP_COMFYUI_MODELS_DIR (or COMFYUI_PATH) to ComfyUI's models directory"
    )]
    NotConfigured,
    /// The server answered with an error status.
    #[error("GET {url} answered {status}")]
    Http {
        /// The URL asked (shortened).
        url: String,
        /// The status.
        status: u16,
    },
    /// The connection failed or broke off; retried.
    #[error("GET {url}: {reason}")]
    Network {
        /// The URL asked (shortened).
        url: String,
        /// What happened.
        reason: String,
    },
    /// The file's sha256 is not the one expected; the file was removed.
    #[error("{url}: sha256 is {actual}, expected {expected}; the download was discarded")]
    ChecksumMismatch {
        /// The URL (shortened).
        url: String,
        /// The expected digest (hex).
        expected: String,
        /// The digest of what was received (hex).
        actual: String,
    },
    /// A local file operation failed.
    #[error("could not {action} {path}: {reason}")]
    Io {
        /// What was being done (`write`, `link`…).
        action: String,
        /// On which path.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// The boot manifest cannot be used.
    #[error("model manifest {path}: {reason}")]
    Manifest {
        /// The manifest file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Some files of the boot manifest could not be had.
    #[error("{failed} of {total} manifest models could not be downloaded; first: {first}")]
    ManifestIncomplete {
        /// Files that failed.
        failed: usize,
        /// Files in the manifest.
        total: usize,
        /// The first failure.
        first: String,
    },
    /// The agent is stopping.
    #[error("stopped before the download finished")]
    Stopped,
}

impl ModelError {
    /// Whether another try may succeed: network failures and the statuses that say "later".
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Network { .. } => true,
            Self::Http { status, .. } => {
                let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                status.is_server_error()
                    || status == StatusCode::REQUEST_TIMEOUT
                    || status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }

    /// An [`ModelError::Io`] for `action` on `path`.
    pub fn io(action: &str, path: &Path, error: &std::io::Error) -> Self {
        Self::Io {
            action: action.to_owned(),
            path: path.display().to_string(),
            reason: error.to_string(),
        }
    }
}

/// A URL as logs and errors show it: scheme, host, port and path; no user, password or query.
pub fn shown_url(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{}://{host}:{port}{}", url.scheme(), url.path()),
        None => format!("{}://{host}{}", url.scheme(), url.path()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_urls_hide_credentials_and_queries() {
        let url =
            Url::parse("https://user:pw@example.com:8443/a/b.safetensors?token=s3cret#x").unwrap();
        assert_eq!(shown_url(&url), "https://example.com:8443/a/b.safetensors");
    }

    #[test]
    fn transient_errors() {
        let http = |status| ModelError::Http {
            url: String::new(),
            status,
        };
        assert!(http(503).is_transient());
        assert!(http(429).is_transient());
        assert!(!http(404).is_transient());
        assert!(!http(401).is_transient());
        assert!(
            ModelError::Network {
                url: String::new(),
                reason: String::new()
            }
            .is_transient()
        );
        assert!(!ModelError::Stopped.is_transient());
    }
}
