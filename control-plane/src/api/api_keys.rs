//! `/api/v1/api-keys`: a caller's own keys, and `/api/v1/users/{id}/api-keys` for an admin to
//! make one for someone else. The plaintext of a key is in the answer that creates it and
//! nowhere else.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::{Admin, Auth};
use super::fields::Problems;
use super::json::{ApiJson, JsonBody};
use super::list::List;
use super::openapi::{ErrorBody, OwnerQuery, PageQuery};
use super::path::ApiPath;
use super::query::QueryParams;
use crate::db::{api_keys, users};
use crate::http::AppState;
use crate::http::error::ApiError;

/// Longest key name (the database's limit).
const MAX_NAME: usize = 200;

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/api-keys", get(list).post(create))
        .route("/api/v1/api-keys/{id}", delete(revoke))
        .route("/api/v1/users/{id}/api-keys", post(create_for_user))
}

/// A key as listed: never its plaintext or hash.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ApiKey {
    /// UUIDv7.
    pub id: Uuid,
    /// The owner's label.
    pub name: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it last authenticated a request (to the minute); `null` until then.
    #[schema(required)]
    pub last_used_at: Option<DateTime<Utc>>,
    /// `false` once revoked.
    pub is_active: bool,
}

impl From<api_keys::ApiKey> for ApiKey {
    fn from(key: api_keys::ApiKey) -> Self {
        Self {
            id: key.id,
            name: key.name,
            created_at: key.created_at,
            last_used_at: key.last_used,
            is_active: key.is_active,
        }
    }
}

/// A key just made, with its plaintext: shown this once.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NewApiKey {
    /// UUIDv7.
    pub id: Uuid,
    /// The owner's label.
    pub name: String,
    /// `emp_` + 64 lowercase hex characters; send as `Authorization: Bearer <key>`.
    pub key: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

impl From<api_keys::NewKey> for NewApiKey {
    fn from(new: api_keys::NewKey) -> Self {
        Self {
            id: new.key.id,
            name: new.key.name,
            key: new.plaintext,
            created_at: new.key.created_at,
        }
    }
}

/// The body of `POST /api/v1/api-keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// A label: not blank, 1–200 characters.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub name: String,
}

async fn create_key(
    state: &AppState,
    user_id: Uuid,
    body: &CreateApiKey,
) -> Result<(StatusCode, Json<NewApiKey>), ApiError> {
    let mut problems = Problems::new();
    problems.text("name", &body.name, MAX_NAME);
    problems.finish()?;
    let new = api_keys::create(&state.db, user_id, &body.name).await?;
    tracing::info!(%user_id, key_id = %new.key.id, "api key created");
    Ok((StatusCode::CREATED, Json(new.into())))
}

/// Makes a key for the caller.
#[utoipa::path(post, path = "/api/v1/api-keys", operation_id = "create_api_key", tag = "api-keys",
    security(("bearer" = [])),
    request_body = CreateApiKey,
    responses(
        (status = 201, description = "The key, with its plaintext shown this once.", body = NewApiKey),
        (status = 400, description = "The body is not a JSON object.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 422, description = "A field is invalid.", body = ErrorBody),
    ))]
pub async fn create(
    auth: Auth,
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateApiKey>,
) -> Result<(StatusCode, Json<NewApiKey>), ApiError> {
    create_key(&state, auth.user_id(), &body).await
}

/// Makes a key for another user (admin).
#[utoipa::path(post, path = "/api/v1/users/{id}/api-keys", operation_id = "create_api_key_for_user", tag = "api-keys",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The user's id.")),
    request_body = CreateApiKey,
    responses(
        (status = 201, description = "The key, with its plaintext shown this once.", body = NewApiKey),
        (status = 400, description = "The body is not a JSON object.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "The caller is not an admin.", body = ErrorBody),
        (status = 404, description = "No such user.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 422, description = "A field is invalid.", body = ErrorBody),
    ))]
pub async fn create_for_user(
    _admin: Admin,
    State(state): State<AppState>,
    ApiPath(user_id): ApiPath<Uuid>,
    body: JsonBody,
) -> Result<(StatusCode, Json<NewApiKey>), ApiError> {
    // The user first: an unknown one is 404 whatever the body says.
    users::find_by_id(&state.db, user_id).await?;
    let body: CreateApiKey = body.parse().await?;
    create_key(&state, user_id, &body).await
}

/// The caller's keys, revoked ones included, newest first; an admin may pass `user_id`.
#[utoipa::path(get, path = "/api/v1/api-keys", operation_id = "list_api_keys", tag = "api-keys",
    security(("bearer" = [])),
    params(PageQuery, OwnerQuery),
    responses(
        (status = 200, description = "A page of keys.", body = List<ApiKey>),
        (status = 400, description = "The query string is broken.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "A plain user passed `user_id`.", body = ErrorBody),
        (status = 422, description = "A bad `limit`, `cursor` or `user_id`.", body = ErrorBody),
    ))]
pub async fn list(
    auth: Auth,
    State(state): State<AppState>,
    mut query: QueryParams,
) -> Result<Json<List<ApiKey>>, ApiError> {
    let owner = query.user_id(&auth)?.unwrap_or(auth.user_id());
    let page = query.page();
    query.finish()?;
    let keys = api_keys::list_of_user(&state.db, owner, page.limit, page.cursor).await?;
    Ok(Json(List::from_page(keys, ApiKey::from)))
}

/// Revokes a key: it stops working at once and stays listed as inactive. A user may revoke
/// their own keys; an admin any.
#[utoipa::path(delete, path = "/api/v1/api-keys/{id}", operation_id = "revoke_api_key", tag = "api-keys",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The key's id.")),
    responses(
        (status = 204, description = "Revoked (also when it already was)."),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 404, description = "No such key among the caller's.", body = ErrorBody),
    ))]
pub async fn revoke(
    auth: Auth,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let key = api_keys::find_by_id(&state.db, id).await?;
    if !auth.may_act_on(key.user_id) {
        return Err(ApiError::not_found());
    }
    api_keys::revoke(&state.db, key.user_id, id).await?;
    tracing::info!(user_id = %key.user_id, key_id = %id, by = %auth.user_id(), "api key revoked");
    Ok(StatusCode::NO_CONTENT)
}
