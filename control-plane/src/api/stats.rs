//! `GET /api/v1/stats` (admin): the fleet at a glance (CONTRACT.md "Operations").

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use chrono::{TimeDelta, Utc};
use emp_shared::status::{JobStatus, MachineStatus};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Admin;
use super::openapi::ErrorBody;
use crate::db::{jobs, machines, users};
use crate::http::AppState;
use crate::http::error::ApiError;

/// Terminal jobs and active users are counted over this window (the seed's 24 hours).
pub const WINDOW: TimeDelta = TimeDelta::hours(24);

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/stats", get(stats))
}

/// The answer of `GET /api/v1/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Stats {
    /// Jobs by status: QUEUED and PROCESSING all, the terminal ones that ended in the last 24 h.
    pub jobs: JobCounts,
    /// Machines by status.
    pub machines: MachineCounts,
    /// Jobs waiting in Redis.
    pub queue_depth: u64,
    /// Users.
    pub users: UserCounts,
}

/// Jobs by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct JobCounts {
    /// Waiting, all of them.
    #[serde(rename = "QUEUED")]
    pub queued: i64,
    /// Running, all of them.
    #[serde(rename = "PROCESSING")]
    pub processing: i64,
    /// Completed in the window.
    #[serde(rename = "COMPLETED")]
    pub completed: i64,
    /// Failed in the window.
    #[serde(rename = "FAILED")]
    pub failed: i64,
    /// Cancelled in the window.
    #[serde(rename = "CANCELLED")]
    pub cancelled: i64,
}

/// Machines by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct MachineCounts {
    /// Registered, warming up.
    #[serde(rename = "STARTING")]
    pub starting: i64,
    /// Ready for work.
    #[serde(rename = "AVAILABLE")]
    pub available: i64,
    /// All slots taken.
    #[serde(rename = "BUSY")]
    pub busy: i64,
    /// Finishing its jobs, taking no new ones.
    #[serde(rename = "DRAINING")]
    pub draining: i64,
    /// Silent too long.
    #[serde(rename = "OFFLINE")]
    pub offline: i64,
    /// Removed by its provider.
    #[serde(rename = "TERMINATED")]
    pub terminated: i64,
}

/// Users.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct UserCounts {
    /// Users not deleted.
    pub total: i64,
    /// Users who submitted a job in the last 24 h.
    pub active_today: i64,
}

/// Counts of jobs, machines, the queue and users.
#[utoipa::path(get, path = "/api/v1/stats", operation_id = "get_stats", tag = "operations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The counts.", body = Stats),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "Not an admin.", body = ErrorBody),
        (status = 503, description = "Postgres is unreachable, with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn stats(_admin: Admin, State(state): State<AppState>) -> Result<Json<Stats>, ApiError> {
    let since = Utc::now() - WINDOW;
    let mut job_counts = JobCounts::default();
    for (status, count) in jobs::counts_by_status(&state.db, since).await? {
        let slot = match status {
            JobStatus::Queued => &mut job_counts.queued,
            JobStatus::Processing => &mut job_counts.processing,
            JobStatus::Completed => &mut job_counts.completed,
            JobStatus::Failed => &mut job_counts.failed,
            JobStatus::Cancelled => &mut job_counts.cancelled,
        };
        *slot += count;
    }
    let mut machine_counts = MachineCounts::default();
    for (status, count) in machines::counts_by_status(&state.db).await? {
        let slot = match status {
            MachineStatus::Starting => &mut machine_counts.starting,
            MachineStatus::Available => &mut machine_counts.available,
            MachineStatus::Busy => &mut machine_counts.busy,
            MachineStatus::Draining => &mut machine_counts.draining,
            MachineStatus::Offline => &mut machine_counts.offline,
            MachineStatus::Terminated => &mut machine_counts.terminated,
        };
        *slot += count;
    }
    let queue_depth = queue_depth(&state, job_counts.queued).await;
    Ok(Json(Stats {
        jobs: job_counts,
        machines: machine_counts,
        queue_depth,
        users: UserCounts {
            total: users::count(&state.db).await?,
            active_today: jobs::active_users_since(&state.db, since).await?,
        },
    }))
}

/// Jobs waiting in Redis; Postgres's QUEUED count when Redis cannot say (the reconciler
/// makes the two agree).
async fn queue_depth(state: &AppState, queued_in_postgres: i64) -> u64 {
    let fallback = u64::try_from(queued_in_postgres).unwrap_or_default();
    let Ok(mut redis) = state.redis.get() else {
        return fallback;
    };
    let count = state.dispatcher.dispatch().queued_count(&mut redis);
    match tokio::time::timeout(std::time::Duration::from_millis(500), count).await {
        Ok(Ok(depth)) => depth,
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot read the queue depth; using postgres's count");
            fallback
        }
        Err(_) => {
            tracing::warn!("redis is slow; using postgres's queue count");
            fallback
        }
    }
}
