//! `/api/v1/templates`: reusable workflows with `{{placeholders}}`, private to their owner or
//! public. [`render`] fills them in for the job routes.
//!
//! Visibility: a user reads their own and every public template; another user's private one is
//! `404`, and changing or deleting a public one they do not own is `403`. Admins may read and
//! change any.

pub mod render;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

pub use self::render::render;
use super::auth::Auth;
use super::fields::Problems;
use super::json::{ApiJson, JsonBody, nullable};
use super::list::List;
use super::openapi::{ErrorBody, OwnerQuery, PageQuery};
use super::path::ApiPath;
use super::query::QueryParams;
use crate::db::templates::{self, NewTemplate, TemplatePatch};
use crate::http::AppState;
use crate::http::error::ApiError;

/// Longest template name (the database's limit).
const MAX_NAME: usize = 200;
/// Longest description.
const MAX_DESCRIPTION: usize = 10_000;
/// Longest category.
const MAX_CATEGORY: usize = 100;

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/templates", get(list).post(create))
        .route(
            "/api/v1/templates/{id}",
            get(show).patch(update).delete(remove),
        )
}

/// The template object.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Template {
    /// UUIDv7.
    pub id: Uuid,
    /// The owner.
    pub user_id: Uuid,
    /// Label.
    pub name: String,
    /// `null` when none.
    #[schema(required)]
    pub description: Option<String>,
    /// `null` when none.
    #[schema(required)]
    pub category: Option<String>,
    /// A ComfyUI API-format graph whose strings may hold `{{placeholders}}`.
    #[schema(value_type = Object)]
    pub workflow: Value,
    /// Whether every user may read and use it.
    pub is_public: bool,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl From<templates::Template> for Template {
    fn from(template: templates::Template) -> Self {
        Self {
            id: template.id,
            user_id: template.user_id,
            name: template.name,
            description: template.description,
            category: template.category,
            workflow: template.workflow,
            is_public: template.is_public,
            created_at: template.created_at,
            updated_at: template.updated_at,
        }
    }
}

/// The body of `POST /api/v1/templates`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    /// Label: not blank, 1–200 characters.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub name: String,
    /// Optional description: not blank, at most 10,000 characters.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 10_000, pattern = r"\S")]
    pub description: Option<String>,
    /// Optional category: not blank, at most 100 characters.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 100, pattern = r"\S")]
    pub category: Option<String>,
    /// The graph: a non-empty object of node id → `{"class_type", "inputs"}`, whose strings
    /// may hold `{{placeholders}}`.
    #[schema(value_type = crate::api::openapi::Workflow)]
    pub workflow: Value,
    /// Default `false`.
    #[serde(default)]
    pub is_public: Option<bool>,
}

/// The body of `PATCH /api/v1/templates/{id}`: any of the fields; `null` clears `description`
/// or `category`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTemplate {
    /// New label (not `null`): not blank, 1–200 characters.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = String, required = false, min_length = 1, max_length = 200, pattern = r"\S")]
    pub name: Option<Option<String>>,
    /// New description; `null` clears it.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, min_length = 1, max_length = 10_000, pattern = r"\S")]
    pub description: Option<Option<String>>,
    /// New category; `null` clears it.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, min_length = 1, max_length = 100, pattern = r"\S")]
    pub category: Option<Option<String>>,
    /// New graph (not `null`).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = crate::api::openapi::Workflow, required = false)]
    pub workflow: Option<Option<Value>>,
    /// New visibility (not `null`).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = bool, required = false)]
    pub is_public: Option<Option<bool>>,
}

fn check_optional_text(problems: &mut Problems, field: &str, value: Option<&str>, max: usize) {
    if let Some(value) = value {
        problems.text(field, value, max);
    }
}

/// Creates a template owned by the caller.
#[utoipa::path(post, path = "/api/v1/templates", operation_id = "create_template", tag = "templates",
    security(("bearer" = [])),
    request_body = CreateTemplate,
    responses(
        (status = 201, description = "The template.", body = Template),
        (status = 400, description = "The body is not a JSON object.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 422, description = "A field is invalid.", body = ErrorBody),
    ))]
pub async fn create(
    auth: Auth,
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateTemplate>,
) -> Result<(StatusCode, Json<Template>), ApiError> {
    let mut problems = Problems::new();
    problems.text("name", &body.name, MAX_NAME);
    check_optional_text(
        &mut problems,
        "description",
        body.description.as_deref(),
        MAX_DESCRIPTION,
    );
    check_optional_text(
        &mut problems,
        "category",
        body.category.as_deref(),
        MAX_CATEGORY,
    );
    problems.workflow("workflow", &body.workflow);
    problems.finish()?;
    let template = templates::create(
        &state.db,
        &NewTemplate {
            user_id: auth.user_id(),
            name: body.name,
            description: body.description,
            category: body.category,
            workflow: body.workflow,
            is_public: body.is_public.unwrap_or(false),
        },
    )
    .await?;
    tracing::info!(template_id = %template.id, user_id = %template.user_id, "template created");
    Ok((StatusCode::CREATED, Json(template.into())))
}

/// The caller's templates and every public one, newest first; an admin may pass `user_id` to
/// see the list as that user does.
#[utoipa::path(get, path = "/api/v1/templates", operation_id = "list_templates", tag = "templates",
    security(("bearer" = [])),
    params(PageQuery, OwnerQuery),
    responses(
        (status = 200, description = "A page of templates.", body = List<Template>),
        (status = 400, description = "The query string is broken.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "A plain user passed `user_id`.", body = ErrorBody),
        (status = 422, description = "A bad `limit`, `cursor` or `user_id`.", body = ErrorBody),
    ))]
pub async fn list(
    auth: Auth,
    State(state): State<AppState>,
    mut query: QueryParams,
) -> Result<Json<List<Template>>, ApiError> {
    let owner = query.user_id(&auth)?.unwrap_or(auth.user_id());
    let page = query.page();
    query.finish()?;
    let templates = templates::list_visible(&state.db, owner, page.limit, page.cursor).await?;
    Ok(Json(List::from_page(templates, Template::from)))
}

/// A template the caller may read (`404` for someone else's private one).
///
/// # Errors
/// `404 not_found` for an unknown or invisible template.
pub async fn find_visible(
    state: &AppState,
    auth: &Auth,
    id: Uuid,
) -> Result<templates::Template, ApiError> {
    let template = templates::find_by_id(&state.db, id).await?;
    if template.visible_to(auth.user_id()) || auth.is_admin() {
        Ok(template)
    } else {
        Err(ApiError::not_found())
    }
}

/// A template the caller may change: `404` when they may not even see it, `403` when it is
/// someone else's public one.
async fn find_changeable(
    state: &AppState,
    auth: &Auth,
    id: Uuid,
) -> Result<templates::Template, ApiError> {
    let template = find_visible(state, auth, id).await?;
    if auth.may_act_on(template.user_id) {
        Ok(template)
    } else {
        Err(ApiError::forbidden_because(
            "Only its owner may change a public template.",
        ))
    }
}

/// One template.
#[utoipa::path(get, path = "/api/v1/templates/{id}", operation_id = "get_template", tag = "templates",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The template's id.")),
    responses(
        (status = 200, description = "The template.", body = Template),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 404, description = "No such template among those the caller may read.", body = ErrorBody),
    ))]
pub async fn show(
    auth: Auth,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Template>, ApiError> {
    Ok(Json(find_visible(&state, &auth, id).await?.into()))
}

/// Changes any of a template's fields (owner or admin).
#[utoipa::path(patch, path = "/api/v1/templates/{id}", operation_id = "update_template", tag = "templates",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The template's id.")),
    request_body = UpdateTemplate,
    responses(
        (status = 200, description = "The changed template.", body = Template),
        (status = 400, description = "The body is not a JSON object.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "Someone else's public template.", body = ErrorBody),
        (status = 404, description = "No such template among those the caller may read.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 422, description = "A field is invalid.", body = ErrorBody),
    ))]
pub async fn update(
    auth: Auth,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    body: JsonBody,
) -> Result<Json<Template>, ApiError> {
    find_changeable(&state, &auth, id).await?;
    let body: UpdateTemplate = body.parse().await?;
    let mut problems = Problems::new();
    for (field, is_null) in [
        ("name", matches!(body.name, Some(None))),
        ("workflow", matches!(body.workflow, Some(None))),
        ("is_public", matches!(body.is_public, Some(None))),
    ] {
        if is_null {
            problems.add(field, "cannot be null");
        }
    }
    check_optional_text(
        &mut problems,
        "name",
        body.name.clone().flatten().as_deref(),
        MAX_NAME,
    );
    check_optional_text(
        &mut problems,
        "description",
        body.description.clone().flatten().as_deref(),
        MAX_DESCRIPTION,
    );
    check_optional_text(
        &mut problems,
        "category",
        body.category.clone().flatten().as_deref(),
        MAX_CATEGORY,
    );
    if let Some(Some(workflow)) = &body.workflow {
        problems.workflow("workflow", workflow);
    }
    problems.finish()?;
    let patch = TemplatePatch {
        name: body.name.flatten(),
        description: body.description,
        category: body.category,
        workflow: body.workflow.flatten(),
        is_public: body.is_public.flatten(),
    };
    let template = templates::update(&state.db, id, &patch).await?;
    tracing::info!(template_id = %id, by = %auth.user_id(), "template changed");
    Ok(Json(template.into()))
}

/// Deletes a template (owner or admin); jobs made from it keep their rendered workflow.
#[utoipa::path(delete, path = "/api/v1/templates/{id}", operation_id = "delete_template", tag = "templates",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The template's id.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "Someone else's public template.", body = ErrorBody),
        (status = 404, description = "No such template among those the caller may read.", body = ErrorBody),
    ))]
pub async fn remove(
    auth: Auth,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    find_changeable(&state, &auth, id).await?;
    templates::delete(&state.db, id).await?;
    tracing::info!(template_id = %id, by = %auth.user_id(), "template deleted");
    Ok(StatusCode::NO_CONTENT)
}
