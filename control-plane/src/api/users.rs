//! `/api/v1/users`: the caller (`/me`) and, for admins, creating, listing and deleting users.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::api_keys::NewApiKey;
use super::auth::{Admin, Auth};
use super::fields::{Problems, is_email};
use super::json::ApiJson;
use super::list::List;
use super::openapi::{ErrorBody, PageQuery};
use super::path::ApiPath;
use super::query::QueryParams;
use crate::db::users;
use crate::http::AppState;
use crate::http::error::ApiError;

/// The name of the key a new user gets.
const FIRST_KEY_NAME: &str = "default";
/// Longest display name.
const MAX_NAME: usize = 200;

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/users/me", get(me))
        .route("/api/v1/users", get(list).post(create))
        .route("/api/v1/users/{id}", delete(remove))
}

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sees and changes only their own resources.
    User,
    /// May read and change any resource, and manage users.
    Admin,
}

impl<'de> Deserialize<'de> for Role {
    /// From the strings `user` and `admin` only. (serde's derive would also take the
    /// externally tagged form, `{"admin": null}`, which the contract does not allow.)
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const NAMES: &[&str] = &["user", "admin"];
        let name = String::deserialize(deserializer)?;
        match name.as_str() {
            "user" => Ok(Self::User),
            "admin" => Ok(Self::Admin),
            other => Err(serde::de::Error::unknown_variant(other, NAMES)),
        }
    }
}

impl From<users::Role> for Role {
    fn from(role: users::Role) -> Self {
        match role {
            users::Role::User => Self::User,
            users::Role::Admin => Self::Admin,
        }
    }
}

impl From<Role> for users::Role {
    fn from(role: Role) -> Self {
        match role {
            Role::User => Self::User,
            Role::Admin => Self::Admin,
        }
    }
}

/// The user object.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct User {
    /// UUIDv7.
    pub id: Uuid,
    /// Unique among live users, compared case-insensitively.
    pub email: String,
    /// Display name; `null` when none was given.
    #[schema(required)]
    pub name: Option<String>,
    /// `user` or `admin`.
    pub role: Role,
    /// When the user was created.
    pub created_at: DateTime<Utc>,
}

impl From<users::User> for User {
    fn from(user: users::User) -> Self {
        Self {
            id: user.id,
            email: user.email,
            name: user.name,
            role: user.role.into(),
            created_at: user.created_at,
        }
    }
}

/// The body of `POST /api/v1/users`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// The new user's email; unique, compared case-insensitively.
    #[schema(format = Email, min_length = 3, max_length = 320)]
    pub email: String,
    /// Display name: not blank, at most 200 characters.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub name: Option<String>,
    /// `user` (the default) or `admin`.
    #[serde(default)]
    pub role: Option<Role>,
}

/// The answer to `POST /api/v1/users`: the user and their first key, shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedUser {
    /// The new user.
    pub user: User,
    /// Their first API key, with its plaintext.
    pub api_key: NewApiKey,
}

/// The caller.
#[utoipa::path(get, path = "/api/v1/users/me", operation_id = "get_me", tag = "users",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller.", body = User),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
    ))]
pub async fn me(auth: Auth) -> Json<User> {
    Json(auth.user.into())
}

/// Creates a user with a first API key (admin).
#[utoipa::path(post, path = "/api/v1/users", operation_id = "create_user", tag = "users",
    security(("bearer" = [])),
    request_body = CreateUser,
    responses(
        (status = 201, description = "The user and their first key (its plaintext shown once).", body = CreatedUser),
        (status = 400, description = "The body is not a JSON object.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "The caller is not an admin.", body = ErrorBody),
        (status = 409, description = "The email is taken.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 422, description = "A field is invalid.", body = ErrorBody),
    ))]
pub async fn create(
    _admin: Admin,
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateUser>,
) -> Result<(StatusCode, Json<CreatedUser>), ApiError> {
    let mut problems = Problems::new();
    if !is_email(&body.email) {
        problems.add("email", "must be an email address such as name@example.com");
    }
    if let Some(name) = &body.name {
        problems.text("name", name, MAX_NAME);
    }
    problems.finish()?;
    let role = body.role.unwrap_or(Role::User).into();
    let (user, key) = users::create_with_key(
        &state.db,
        &body.email,
        body.name.as_deref(),
        role,
        FIRST_KEY_NAME,
    )
    .await
    .map_err(|error| match error {
        crate::db::DbError::Conflict { .. } => {
            ApiError::conflict("A user with this email already exists.")
        }
        other => other.into(),
    })?;
    tracing::info!(user_id = %user.id, "user created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedUser {
            user: user.into(),
            api_key: key.into(),
        }),
    ))
}

/// Every live user, newest first (admin).
#[utoipa::path(get, path = "/api/v1/users", operation_id = "list_users", tag = "users",
    security(("bearer" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of users.", body = List<User>),
        (status = 400, description = "The query string is broken.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "The caller is not an admin.", body = ErrorBody),
        (status = 422, description = "A bad `limit` or `cursor`.", body = ErrorBody),
    ))]
pub async fn list(
    _admin: Admin,
    State(state): State<AppState>,
    mut query: QueryParams,
) -> Result<Json<List<User>>, ApiError> {
    let page = query.page();
    query.finish()?;
    let users = users::list(&state.db, page.limit, page.cursor).await?;
    Ok(Json(List::from_page(users, User::from)))
}

/// Deletes a user and revokes all their keys; their jobs stay (admin).
#[utoipa::path(delete, path = "/api/v1/users/{id}", operation_id = "delete_user", tag = "users",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The user's id.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "The caller is not an admin.", body = ErrorBody),
        (status = 404, description = "No such user.", body = ErrorBody),
    ))]
pub async fn remove(
    _admin: Admin,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    users::delete(&state.db, id).await?;
    tracing::info!(user_id = %id, "user deleted");
    Ok(StatusCode::NO_CONTENT)
}
