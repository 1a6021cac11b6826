//! `/api/v1/jobs`: submit ([`submit`]), read, list, cancel, executions and the live event
//! stream ([`events`]); the job object is assembled in [`view`].
//!
//! Another user's job answers `404` everywhere, as if it did not exist; admins reach every
//! job by id.

pub mod events;
pub mod submit;
pub mod view;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use emp_shared::status::JobStatus;
use uuid::Uuid;

use self::view::{ExecutionView, JobView};
use super::auth::Auth;
use super::list::List;
use super::openapi::{ErrorBody, JobListQuery, OwnerQuery, PageQuery};
use super::path::ApiPath;
use super::query::QueryParams;
use crate::db::jobs::{self, Job};
use crate::db::{executions, users};
use crate::dispatch::{Cancelled, DispatchFailure};
use crate::http::AppState;
use crate::http::error::{ApiError, RETRY_AFTER_SECS};

/// What `Retry-After` says on `429 queue_full`: time for agents to take some jobs.
pub const QUEUE_FULL_RETRY_AFTER_SECS: u64 = 10;

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/jobs", get(list).post(submit::submit))
        .route("/api/v1/jobs/{id}", get(show).delete(delete))
        .route("/api/v1/jobs/{id}/cancel", post(cancel))
        .route("/api/v1/jobs/{id}/executions", get(list_executions))
        .route("/api/v1/jobs/{id}/events", get(events::events))
        .route("/api/v1/users/{id}/jobs", get(list_of_user))
}

/// A job the caller may see: their own, or any for an admin; else `404`.
///
/// # Errors
/// `404 not_found`; Postgres failures.
pub async fn find_visible(state: &AppState, auth: &Auth, id: Uuid) -> Result<Job, ApiError> {
    let job = jobs::find_by_id(&state.db, id).await?;
    if auth.may_act_on(job.user_id) {
        Ok(job)
    } else {
        Err(ApiError::not_found())
    }
}

/// The answer for a dispatcher failure.
pub fn dispatch_error(failure: DispatchFailure) -> ApiError {
    match failure {
        DispatchFailure::QueueFull { queued } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("The queue is full ({queued} jobs are waiting); try again later."),
        )
        .with_retry_after(QUEUE_FULL_RETRY_AFTER_SECS),
        DispatchFailure::Finished(status) => ApiError::new(
            StatusCode::CONFLICT,
            "job_finished",
            format!("The job is {status} already; there is nothing to cancel."),
        ),
        DispatchFailure::RedisUnavailable(error) => {
            tracing::warn!(error = ?error, "redis unavailable");
            ApiError::unavailable().with_retry_after(RETRY_AFTER_SECS)
        }
        DispatchFailure::Db(error) => error.into(),
        other => ApiError::internal(&other),
    }
}

/// One job.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", operation_id = "get_job", tag = "jobs",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "The job.", body = JobView),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 404, description = "No such job among the caller's.", body = ErrorBody),
    ))]
pub async fn show(
    auth: Auth,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<JobView>, ApiError> {
    let job = find_visible(&state, &auth, id).await?;
    Ok(Json(view::view(&state, job).await?))
}

/// The `status` filter of job lists.
fn status_filter(query: &mut QueryParams) -> Option<JobStatus> {
    query.parse(
        "status",
        |raw| raw.parse::<JobStatus>().ok(),
        "must be QUEUED, PROCESSING, COMPLETED, FAILED or CANCELLED",
    )
}

/// A page of `owner`'s jobs as job objects.
async fn page_of(
    state: &AppState,
    owner: Uuid,
    mut query: QueryParams,
) -> Result<Json<List<JobView>>, ApiError> {
    let page = query.page();
    let status = status_filter(&mut query);
    query.finish()?;
    let found = jobs::history(&state.db, owner, status, page.limit, page.cursor).await?;
    let next_cursor = found.next_cursor.map(|cursor| cursor.encode());
    let items = view::views(state, found.items).await?;
    Ok(Json(List { items, next_cursor }))
}

/// The caller's jobs, newest first; an admin may pass `user_id` for another user's.
#[utoipa::path(get, path = "/api/v1/jobs", operation_id = "list_jobs", tag = "jobs",
    security(("bearer" = [])),
    params(PageQuery, JobListQuery, OwnerQuery),
    responses(
        (status = 200, description = "A page of jobs.", body = List<JobView>),
        (status = 400, description = "The query string is broken.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "A plain user passed `user_id`.", body = ErrorBody),
        (status = 422, description = "A bad `limit`, `cursor`, `status` or `user_id`.", body = ErrorBody),
    ))]
pub async fn list(
    auth: Auth,
    State(state): State<AppState>,
    mut query: QueryParams,
) -> Result<Json<List<JobView>>, ApiError> {
    let owner = query.user_id(&auth)?.unwrap_or(auth.user_id());
    page_of(&state, owner, query).await
}

/// One user's jobs, newest first: the caller's own, or any user's for an admin.
#[utoipa::path(get, path = "/api/v1/users/{id}/jobs", operation_id = "list_user_jobs", tag = "jobs",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The user's id."), PageQuery, JobListQuery),
    responses(
        (status = 200, description = "A page of jobs.", body = List<JobView>),
        (status = 400, description = "The query string is broken.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 404, description = "Another user (for a plain user) or an unknown user.", body = ErrorBody),
        (status = 422, description = "A bad `limit`, `cursor` or `status`.", body = ErrorBody),
    ))]
pub async fn list_of_user(
    auth: Auth,
    State(state): State<AppState>,
    ApiPath(user_id): ApiPath<Uuid>,
    query: QueryParams,
) -> Result<Json<List<JobView>>, ApiError> {
    if user_id != auth.user_id() {
        if !auth.is_admin() {
            return Err(ApiError::not_found());
        }
        users::find_by_id(&state.db, user_id).await?;
    }
    page_of(&state, user_id, query).await
}

/// A job's executions in start order (all of them; `next_cursor` is always `null`).
#[utoipa::path(get, path = "/api/v1/jobs/{id}/executions", operation_id = "list_job_executions", tag = "jobs",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "The executions, oldest first.", body = List<ExecutionView>),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 404, description = "No such job among the caller's.", body = ErrorBody),
    ))]
pub async fn list_executions(
    auth: Auth,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<List<ExecutionView>>, ApiError> {
    let job = find_visible(&state, &auth, id).await?;
    let items = executions::list_of_job(&state.db, job.id)
        .await?
        .into_iter()
        .map(ExecutionView::from)
        .collect();
    Ok(Json(List {
        items,
        next_cursor: None,
    }))
}

/// Cancels a job: a QUEUED one at once (`200`), a PROCESSING one by asking its agent to stop
/// (`202`, `cancel_requested: true`; it ends CANCELLED). Also `DELETE /api/v1/jobs/{id}`.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", operation_id = "cancel_job", tag = "jobs",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "It was QUEUED and is CANCELLED now.", body = JobView),
        (status = 202, description = "It runs: its agent was asked to stop it.", body = JobView),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 404, description = "No such job among the caller's.", body = ErrorBody),
        (status = 409, description = "`job_finished`: it is COMPLETED, FAILED or CANCELLED.", body = ErrorBody),
        (status = 503, description = "Postgres or Redis is unreachable, with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn cancel(
    auth: Auth,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let job = find_visible(&state, &auth, id).await?;
    let (status, job) = match state
        .dispatcher
        .cancel(&job)
        .await
        .map_err(dispatch_error)?
    {
        Cancelled::Now(job) => (StatusCode::OK, job),
        Cancelled::Requested(job) => (StatusCode::ACCEPTED, job),
    };
    tracing::info!(job_id = %job.id, by = %auth.user_id(), accepted = %status, "job cancel");
    Ok((status, Json(view::view(&state, job).await?)))
}

/// `DELETE /api/v1/jobs/{id}`: the same as `POST /api/v1/jobs/{id}/cancel`.
#[utoipa::path(delete, path = "/api/v1/jobs/{id}", operation_id = "delete_job", tag = "jobs",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "It was QUEUED and is CANCELLED now.", body = JobView),
        (status = 202, description = "It runs: its agent was asked to stop it.", body = JobView),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 404, description = "No such job among the caller's.", body = ErrorBody),
        (status = 409, description = "`job_finished`: it is COMPLETED, FAILED or CANCELLED.", body = ErrorBody),
        (status = 503, description = "Postgres or Redis is unreachable, with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn delete(
    auth: Auth,
    state: State<AppState>,
    path: ApiPath<Uuid>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    cancel(auth, state, path).await
}
