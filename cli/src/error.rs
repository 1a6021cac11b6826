//! What can go wrong in a command, and the exit code each failure maps to.
//!
//! The codes are part of the CLI's contract (scripts branch on them), so they live in one
//! place, [`ExitStatus`], and `emp --help` and README.md list them.

use std::fmt;

use serde_json::Value;

/// The process exit codes `emp` uses. Stable: scripts rely on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitStatus {
    /// The command did what it was asked (and, under `--wait`, the job ended COMPLETED).
    Success = 0,
    /// A local failure: a file that cannot be written, a broken config file.
    Failure = 1,
    /// The command line is wrong (clap's own code): unknown flag, bad `--require` key…
    Usage = 2,
    /// Under `--wait`, the job ended FAILED or CANCELLED.
    JobUnsuccessful = 3,
    /// The API refused the key (401) or the role (403).
    Auth = 4,
    /// The API does not know the resource (404).
    NotFound = 5,
    /// The API refused the input (400, 413, 422), or a local input (workflow file) is unusable.
    InvalidInput = 6,
    /// Any other refusal (409 conflict, 429 queue full, …).
    Refused = 7,
    /// The API failed (5xx) or could not be reached.
    Unavailable = 8,
    /// Ctrl-C while waiting for a job (128 + SIGINT, as shells report it); the job goes on.
    Interrupted = 130,
}

impl ExitStatus {
    /// The numeric code.
    pub const fn code(self) -> u8 {
        self as u8
    }
}

/// The exit codes as `emp --help` prints them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
    0  success (under --wait: the job ended COMPLETED)
    1  local failure (cannot write a file, unreadable config file)
    2  usage error (bad flag or argument, no API URL or key configured)
    3  under --wait: the job ended FAILED or CANCELLED
    4  the API refused the key or the role (401, 403)
    5  not found (404)
    6  invalid input (400, 413, 422, or an unusable workflow file)
    7  other refusal (409 conflict, 429 queue full, other 4xx)
    8  the API failed (5xx) or cannot be reached
  130  interrupted (Ctrl-C) while waiting; the job goes on";

/// The API's error envelope `{"error": {"code", "message", "details"?}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// `error.code` (`not_found`, `validation_failed`, …); `http_<status>` when the body was
    /// not an envelope.
    pub code: String,
    /// `error.message`.
    pub message: String,
    /// `error.details`, when given.
    pub details: Option<Value>,
}

impl ApiError {
    /// Reads the envelope from a response body; falls back to the status alone.
    pub fn from_body(status: u16, body: &str) -> Self {
        let parsed: Option<Value> = serde_json::from_str(body).ok();
        let envelope = parsed.as_ref().and_then(|v| v.get("error"));
        let text = |name: &str| {
            envelope
                .and_then(|e| e.get(name))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        Self {
            status,
            code: text("code").unwrap_or_else(|| format!("http_{status}")),
            message: text("message").unwrap_or_else(|| {
                let trimmed = body.trim();
                if trimmed.is_empty() {
                    format!("the API answered HTTP {status}")
                } else {
                    trimmed.chars().take(300).collect()
                }
            }),
            details: envelope.and_then(|e| e.get("details")).cloned(),
        }
    }

    /// The exit status this refusal maps to.
    pub fn exit_status(&self) -> ExitStatus {
        match self.status {
            401 | 403 => ExitStatus::Auth,
            404 => ExitStatus::NotFound,
            400 | 413 | 422 => ExitStatus::InvalidInput,
            500..=599 => ExitStatus::Unavailable,
            _ => ExitStatus::Refused,
        }
    }

    /// What the user can do about it, when there is something to say.
    fn hint(&self) -> Option<&'static str> {
        match self.status {
            401 => {
                Some("check EMP_API_KEY (or run `emp login`); a revoked key stops working at once")
            }
            403 => Some("this needs an admin key"),
            429 => Some("the queue is full; retry later"),
            500..=599 => Some("the control plane failed; retry later or check its logs"),
            _ => None,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} {})", self.message, self.status, self.code)?;
        if let Some(fields) = self
            .details
            .as_ref()
            .and_then(|d| d.get("fields"))
            .and_then(Value::as_array)
        {
            for field in fields {
                let name = field.get("field").and_then(Value::as_str).unwrap_or("?");
                let problem = field.get("problem").and_then(Value::as_str).unwrap_or("");
                write!(f, "\n  {name}: {problem}")?;
            }
        }
        if let Some(hint) = self.hint() {
            write!(f, "\nhint: {hint}")?;
        }
        Ok(())
    }
}

/// Every failure of a command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The API answered with an error.
    #[error("{0}")]
    Api(ApiError),
    /// The API could not be reached or the connection broke.
    #[error(
        "cannot reach the API at {url}: {reason}\nhint: check EMP_API_URL (or run `emp login --api-url URL`) and that the control plane is running"
    )]
    Unreachable {
        /// The base URL tried.
        url: String,
        /// What the HTTP client said.
        reason: String,
    },
    /// The API answered something that is not what the contract says.
    #[error("unexpected answer from the API: {0}")]
    Protocol(String),
    /// No API URL or key configured.
    #[error("{0}\nhint: set EMP_API_URL and EMP_API_KEY, or run `emp login`")]
    NotConfigured(String),
    /// The command line is wrong in a way clap cannot see.
    #[error("{0}")]
    Usage(String),
    /// A local input (workflow file, parameter) is unusable.
    #[error("{0}")]
    InvalidInput(String),
    /// The job ended FAILED or CANCELLED under `--wait`.
    #[error("{0}")]
    JobUnsuccessful(String),
    /// A local failure (file system, config file).
    #[error("{0}")]
    Local(String),
    /// Ctrl-C while waiting for a job.
    #[error("{0}")]
    Interrupted(String),
}

impl CliError {
    /// The exit status of this failure.
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            Self::Api(error) => error.exit_status(),
            Self::Unreachable { .. } | Self::Protocol(_) => ExitStatus::Unavailable,
            Self::NotConfigured(_) | Self::Usage(_) => ExitStatus::Usage,
            Self::InvalidInput(_) => ExitStatus::InvalidInput,
            Self::JobUnsuccessful(_) => ExitStatus::JobUnsuccessful,
            Self::Local(_) => ExitStatus::Failure,
            Self::Interrupted(_) => ExitStatus::Interrupted,
        }
    }

    /// A local failure with context.
    pub fn local(what: impl fmt::Display, error: impl fmt::Display) -> Self {
        Self::Local(format!("{what}: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_their_exit_codes() {
        let code = |status| ApiError::from_body(status, "").exit_status().code();
        assert_eq!(code(401), 4);
        assert_eq!(code(403), 4);
        assert_eq!(code(404), 5);
        assert_eq!(code(400), 6);
        assert_eq!(code(413), 6);
        assert_eq!(code(422), 6);
        assert_eq!(code(409), 7);
        assert_eq!(code(429), 7);
        assert_eq!(code(500), 8);
        assert_eq!(code(503), 8);
    }

    #[test]
    fn the_envelope_is_read_and_fields_are_listed() {
        let body = r#"{"error":{"code":"validation_failed","message":"invalid body","details":{"fields":[{"field":"priority","problem":"must be 0-100"}]}}}"#;
        let error = ApiError::from_body(422, body);
        assert_eq!(error.code, "validation_failed");
        let text = error.to_string();
        assert!(
            text.contains("invalid body (422 validation_failed)"),
            "{text}"
        );
        assert!(text.contains("priority: must be 0-100"), "{text}");
    }

    #[test]
    fn a_body_that_is_no_envelope_keeps_the_status() {
        let error = ApiError::from_body(502, "Bad Gateway");
        assert_eq!(error.code, "http_502");
        assert_eq!(error.message, "Bad Gateway");
        assert_eq!(error.exit_status(), ExitStatus::Unavailable);
    }
}
