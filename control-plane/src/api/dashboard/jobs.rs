//! `GET /api/v1/stats/jobs` (admin): the newest jobs of every user, as job objects, for the
//! dashboard's live list (the plain job list holds only the caller's own).

use axum::Json;
use axum::extract::State;
use emp_shared::status::JobStatus;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::api::auth::Admin;
use crate::api::jobs::view::{self, JobView};
use crate::api::list::List;
use crate::api::openapi::{ErrorBody, JobStatusName};
use crate::api::query::{DEFAULT_LIMIT, MAX_LIMIT, QueryParams};
use crate::db::dashboard;
use crate::http::AppState;
use crate::http::error::ApiError;

/// The query of `GET /api/v1/stats/jobs` (documentation only; [`QueryParams`] reads it).
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct NewestJobsQuery {
    /// How many, 1–200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
    /// Only jobs in this status.
    status: Option<JobStatusName>,
}

/// The newest jobs of every user, newest first; `next_cursor` is always `null`.
#[utoipa::path(get, path = "/api/v1/stats/jobs", operation_id = "get_newest_jobs", tag = "operations",
    security(("bearer" = [])),
    params(NewestJobsQuery),
    responses(
        (status = 200, description = "The newest jobs.", body = List<JobView>),
        (status = 400, description = "The query string is broken.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "Not an admin.", body = ErrorBody),
        (status = 422, description = "A bad `limit` or `status`.", body = ErrorBody),
        (status = 503, description = "Postgres is unreachable, with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn newest(
    _admin: Admin,
    State(state): State<AppState>,
    mut query: QueryParams,
) -> Result<Json<List<JobView>>, ApiError> {
    let limit = query
        .parse(
            "limit",
            |raw| {
                raw.parse::<usize>()
                    .ok()
                    .filter(|limit| (1..=MAX_LIMIT).contains(limit))
            },
            "must be an integer from 1 to 200",
        )
        .unwrap_or(DEFAULT_LIMIT);
    let status = query.parse(
        "status",
        |raw| raw.parse::<JobStatus>().ok(),
        "must be QUEUED, PROCESSING, COMPLETED, FAILED or CANCELLED",
    );
    query.finish()?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let jobs = dashboard::newest_jobs(&state.db, status, limit).await?;
    let items = view::views(&state, jobs).await?;
    Ok(Json(List {
        items,
        next_cursor: None,
    }))
}
