//! The error envelope of CONTRACT.md: every error body is
//! `{"error": {"code", "message"[, "details"]}}`.
//!
//! Handlers return [`ApiError`] built with one of its constructors, one per contract code, so the
//! status, the code and the wording stay together in this file. A repository error becomes an
//! answer through `From<DbError>`, which never lets a database message reach the client.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use emp_shared::workflow::FieldError;
use serde::Serialize;
use serde_json::{Value, json};

use crate::db::DbError;

/// What `Retry-After` says on a `503 unavailable`: long enough for a restarting Postgres or
/// Redis, short enough that clients do not give up.
pub const RETRY_AFTER_SECS: u64 = 5;

/// An error answer: a status, a stable code and a sentence for people.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// One of the contract's codes (`not_found`, `validation_failed`…).
    pub code: &'static str,
    /// What happened, in a sentence; never internals.
    pub message: String,
    /// Only where the contract has details (validation).
    pub details: Option<Value>,
    /// Seconds for a `Retry-After` header (`503 unavailable`, `429 queue_full`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with no details.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    /// The same error with `details`.
    #[must_use]
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// The same error with a `Retry-After: seconds` header.
    #[must_use]
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// `400 malformed_json`: the body is not JSON, not an object, or not `application/json`.
    pub fn malformed_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_json", message)
    }

    /// `400 bad_request`: a syntactically broken query string or header.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// `401 unauthorized`: no, unknown or revoked key.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "A valid API key is required: send `Authorization: Bearer emp_…`.",
        )
    }

    /// `403 forbidden`: authenticated, but not allowed to do this.
    pub fn forbidden() -> Self {
        Self::forbidden_because("You are not allowed to do this.")
    }

    /// `403 forbidden` with a sentence saying why.
    pub fn forbidden_because(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// `404 not_found`: an unknown id or path, or someone else's private resource (whose
    /// existence is not revealed, so the wording is the same).
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "No such resource.")
    }

    /// `405 method_not_allowed`.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "This path does not support that method.",
        )
    }

    /// `409 conflict`: a unique value is taken.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// `413 payload_too_large`: the body is over `limit` bytes.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("The request body is larger than {limit} bytes."),
        )
    }

    /// `422 validation_failed` with `details.fields`: one entry per problem.
    pub fn validation(fields: Vec<FieldError>) -> Self {
        let message = match fields.as_slice() {
            [only] => format!("The request is invalid: {only}."),
            _ => format!("The request is invalid in {} places.", fields.len()),
        };
        let fields = serde_json::to_value(fields).expect("field errors are plain strings");
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            message,
        )
        .with_details(json!({ "fields": fields }))
    }

    /// `422 validation_failed` about a single field.
    pub fn invalid_field(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::validation(vec![FieldError::new(field, problem)])
    }

    /// `503 unavailable` with `Retry-After`: Postgres or Redis cannot be reached.
    pub fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "A service the API depends on is unreachable; try again shortly.",
        )
        .with_retry_after(RETRY_AFTER_SECS)
    }

    /// `500 internal`: a bug. The cause is logged here and never sent to the client.
    pub fn internal(cause: &(dyn std::error::Error + 'static)) -> Self {
        let mut chain = cause.to_string();
        let mut source = cause.source();
        while let Some(inner) = source {
            chain.push_str(": ");
            chain.push_str(&inner.to_string());
            source = inner.source();
        }
        tracing::error!(error = %chain, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Something went wrong on our side.",
        )
    }
}

impl From<DbError> for ApiError {
    fn from(error: DbError) -> Self {
        match error {
            DbError::NotFound => Self::not_found(),
            DbError::Conflict { .. } => Self::conflict("That value is already taken."),
            DbError::Unavailable(ref source) => {
                tracing::warn!(error = %source, "database unavailable");
                Self::unavailable()
            }
            other => Self::internal(&other),
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Envelope {
            error: Body {
                code: self.code,
                message: &self.message,
                details: self.details.as_ref(),
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Unknown path.
pub async fn not_found() -> ApiError {
    ApiError::not_found()
}

/// Known path, unsupported method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(error: ApiError) -> (StatusCode, Option<String>, Value) {
        let response = error.into_response();
        let status = response.status();
        let retry = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, retry, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn validation_lists_the_fields() {
        let (status, retry, body) = body_of(ApiError::validation(vec![
            FieldError::new("email", "is required"),
            FieldError::new("role", "must be user or admin"),
        ]))
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(retry, None);
        assert_eq!(body["error"]["code"], "validation_failed");
        assert_eq!(
            body["error"]["details"]["fields"],
            json!([
                {"field": "email", "problem": "is required"},
                {"field": "role", "problem": "must be user or admin"}
            ])
        );
    }

    #[tokio::test]
    async fn database_errors_map_to_the_contract() {
        let (status, _, body) = body_of(DbError::NotFound.into()).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (StatusCode::NOT_FOUND, &json!("not_found"))
        );
        let (status, _, body) = body_of(
            DbError::Conflict {
                constraint: "users_email_key".into(),
            }
            .into(),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(body["error"]["code"], "conflict");
        assert!(!body.to_string().contains("users_email_key"), "{body}");
        let (status, retry, body) =
            body_of(DbError::Unavailable(sqlx::Error::PoolTimedOut).into()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry.as_deref(), Some("5"));
        assert_eq!(body["error"]["code"], "unavailable");
        let (status, _, body) =
            body_of(DbError::Query(sqlx::Error::Protocol("secret detail".into())).into()).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"]["code"], "internal");
        assert!(!body.to_string().contains("secret detail"), "{body}");
        assert!(body["error"].get("details").is_none());
    }
}
