//! Webhook routes (CONTRACT.md "Webhooks"): the caller's signing secret (read and rotate),
//! a job's deliveries and their redelivery. Another user's job is `404`; admins reach any.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Auth;
use super::jobs::find_visible;
use super::list::List;
use super::openapi::ErrorBody;
use super::path::ApiPath;
use crate::db::DbError;
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::webhooks::store::{self, DeliveryRow};

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/v1/webhook-secret",
            get(show_secret).post(rotate_secret),
        )
        .route("/api/v1/jobs/{id}/webhook-deliveries", get(list_deliveries))
        .route(
            "/api/v1/jobs/{id}/webhook-deliveries/{delivery_id}/redeliver",
            post(redeliver),
        )
}

/// The caller's webhook signing secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookSecret {
    /// `whsec_` + base64 of 32 random bytes; the HMAC key is the decoded base64 part.
    pub secret: String,
}

/// One webhook delivery of a job.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookDelivery {
    /// Its id, sent as the `webhook-id` header (the same on every try).
    pub id: Uuid,
    /// The payload's `type`: `job.completed`, `job.failed`, `job.cancelled`, `job.claimed`
    /// or `job.progress`.
    pub event_type: String,
    /// `PENDING`, `DELIVERED` or `FAILED` (every try failed).
    #[schema(value_type = DeliveryStatusName)]
    pub status: String,
    /// Tries made so far.
    pub attempts: i32,
    /// The receiver's HTTP status at the latest try; `null` when it did not answer.
    #[schema(required)]
    pub last_status_code: Option<i32>,
    /// Why the latest try failed; `null` when it did not.
    #[schema(required)]
    pub last_error: Option<String>,
    /// When the next try is due; `null` unless `PENDING`.
    #[schema(required)]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When a receiver took it (2xx); `null` until then.
    #[schema(required)]
    pub delivered_at: Option<DateTime<Utc>>,
}

/// A delivery's status (schema only).
#[derive(ToSchema)]
#[allow(dead_code, clippy::upper_case_acronyms)]
pub enum DeliveryStatusName {
    /// Waiting for a try.
    PENDING,
    /// A receiver answered 2xx.
    DELIVERED,
    /// Every try of the schedule failed.
    FAILED,
}

impl From<DeliveryRow> for WebhookDelivery {
    fn from(row: DeliveryRow) -> Self {
        Self {
            next_attempt_at: (row.status == "PENDING").then_some(row.next_attempt_at),
            id: row.id,
            event_type: row.event_type,
            status: row.status,
            attempts: row.attempts,
            last_status_code: row.last_status_code,
            last_error: row.last_error,
            delivered_at: row.delivered_at,
        }
    }
}

/// The caller's current webhook signing secret.
#[utoipa::path(get, path = "/api/v1/webhook-secret", operation_id = "get_webhook_secret", tag = "webhooks",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The current secret.", body = WebhookSecret),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
    ))]
pub async fn show_secret(
    auth: Auth,
    State(state): State<AppState>,
) -> Result<Json<WebhookSecret>, ApiError> {
    let secrets = store::secrets_of(&state.db, auth.user_id()).await?;
    Ok(Json(WebhookSecret {
        secret: secrets.current,
    }))
}

/// Rotates the caller's webhook signing secret; the previous one keeps signing (a second
/// signature in `webhook-signature`) for 24 hours. Any request body is ignored.
#[utoipa::path(post, path = "/api/v1/webhook-secret", operation_id = "rotate_webhook_secret", tag = "webhooks",
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The new current secret.", body = WebhookSecret),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
    ))]
pub async fn rotate_secret(
    auth: Auth,
    State(state): State<AppState>,
) -> Result<(StatusCode, Json<WebhookSecret>), ApiError> {
    let secret = store::rotate_secret(&state.db, auth.user_id()).await?;
    tracing::info!(user_id = %auth.user_id(), "webhook secret rotated");
    Ok((StatusCode::CREATED, Json(WebhookSecret { secret })))
}

/// A job's webhook deliveries in the order of their events (all of them; `next_cursor` is
/// always `null`).
#[utoipa::path(get, path = "/api/v1/jobs/{id}/webhook-deliveries", operation_id = "list_webhook_deliveries", tag = "webhooks",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "The deliveries, in the order of their events.", body = List<WebhookDelivery>),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 404, description = "No such job among the caller's.", body = ErrorBody),
    ))]
pub async fn list_deliveries(
    auth: Auth,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<List<WebhookDelivery>>, ApiError> {
    let job = find_visible(&state, &auth, id).await?;
    let items = store::list_of_job(&state.db, job.id)
        .await?
        .into_iter()
        .map(WebhookDelivery::from)
        .collect();
    Ok(Json(List {
        items,
        next_cursor: None,
    }))
}

/// Sends a delivery again now, whatever its status, with the same `webhook-id` and body; if
/// that try fails the retry schedule starts over.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/webhook-deliveries/{delivery_id}/redeliver", operation_id = "redeliver_webhook", tag = "webhooks",
    security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "The job's id."),
        ("delivery_id" = Uuid, Path, description = "The delivery's id."),
    ),
    responses(
        (status = 202, description = "Queued for an immediate try.", body = WebhookDelivery),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 404, description = "No such job among the caller's, or no such delivery of it.", body = ErrorBody),
    ))]
pub async fn redeliver(
    auth: Auth,
    State(state): State<AppState>,
    ApiPath((id, delivery_id)): ApiPath<(Uuid, Uuid)>,
) -> Result<(StatusCode, Json<WebhookDelivery>), ApiError> {
    let job = find_visible(&state, &auth, id).await?;
    match store::redeliver(&state.db, job.id, delivery_id).await {
        Ok(row) => {
            tracing::info!(job_id = %job.id, %delivery_id, by = %auth.user_id(), "webhook redelivery");
            Ok((StatusCode::ACCEPTED, Json(WebhookDelivery::from(row))))
        }
        Err(DbError::NotFound) => Err(ApiError::not_found()),
        Err(error) => Err(error.into()),
    }
}
