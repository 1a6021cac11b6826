//! The dashboard's reads: the newest jobs of every user, the QUEUED backlog by priority, and
//! per-minute throughput and latency of the jobs that ended recently.
//!
//! Each query walks an index of `job_requests` and touches only the rows it reports:
//! `job_requests_created_status_idx` backwards for the newest jobs, the partial
//! `idx_job_requests_queue_priority` for the backlog, `job_requests_finished_idx` for the
//! window of ended jobs.

use chrono::{DateTime, Utc};
use emp_shared::status::JobStatus;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::error::DbError;
use super::jobs::Job;

/// Up to `limit` jobs of every user, newest first, optionally only those in `status`.
///
/// # Errors
/// Database failures.
pub async fn newest_jobs(
    db: impl PgExecutor<'_>,
    status: Option<JobStatus>,
    limit: i64,
) -> Result<Vec<Job>, DbError> {
    // Two statements rather than `$1 IS NULL OR status = $1`, so each has a plan that walks
    // its index in order and stops after `limit` rows.
    let rows = match status {
        None => {
            sqlx::query_as!(
                Job,
                r#"SELECT id, user_id, template_id, custom_workflow, rendered_workflow, parameters,
                     status AS "status: JobStatus", priority, requirements, attempts, max_attempts,
                     timeout_seconds, cancel_requested, include_temp_outputs, created_at, updated_at,
                     started_at, completed_at, failed_at, cancelled_at, error_message, error, metadata,
                     webhook_url, webhook_events
                   FROM job_requests
                   ORDER BY created_at DESC, id DESC
                   LIMIT $1"#,
                limit,
            )
            .fetch_all(db)
            .await?
        }
        Some(status) => {
            sqlx::query_as!(
                Job,
                r#"SELECT id, user_id, template_id, custom_workflow, rendered_workflow, parameters,
                     status AS "status: JobStatus", priority, requirements, attempts, max_attempts,
                     timeout_seconds, cancel_requested, include_temp_outputs, created_at, updated_at,
                     started_at, completed_at, failed_at, cancelled_at, error_message, error, metadata,
                     webhook_url, webhook_events
                   FROM job_requests
                   WHERE status = $1
                   ORDER BY created_at DESC, id DESC
                   LIMIT $2"#,
                status as JobStatus,
                limit,
            )
            .fetch_all(db)
            .await?
        }
    };
    Ok(rows)
}

/// QUEUED jobs of one priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorityBacklog {
    /// 0–100.
    pub priority: i32,
    /// How many wait.
    pub depth: i64,
    /// When the oldest of them was submitted.
    pub oldest_created_at: DateTime<Utc>,
}

/// QUEUED jobs by priority, highest first.
///
/// # Errors
/// Database failures.
pub async fn backlog_by_priority(db: impl PgExecutor<'_>) -> Result<Vec<PriorityBacklog>, DbError> {
    let rows = sqlx::query_as!(
        PriorityBacklog,
        r#"SELECT priority, count(*) AS "depth!", min(created_at) AS "oldest_created_at!"
           FROM job_requests WHERE status = 'QUEUED'
           GROUP BY priority ORDER BY priority DESC"#,
    )
    .fetch_all(db)
    .await?;
    Ok(rows)
}

/// When each of `ids` was submitted (ids that are not jobs are left out).
///
/// # Errors
/// Database failures.
pub async fn created_at_of(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, DateTime<Utc>)>, DbError> {
    let rows = sqlx::query!(
        "SELECT id, created_at FROM job_requests WHERE id = ANY($1)",
        ids,
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.id, row.created_at))
        .collect())
}

/// The jobs that ended in one minute.
#[derive(Debug, Clone, PartialEq)]
pub struct MinuteStats {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// COMPLETED in it.
    pub completed: i64,
    /// FAILED in it.
    pub failed: i64,
    /// CANCELLED in it.
    pub cancelled: i64,
    /// Median seconds from submission to first start, of the jobs that started.
    pub wait_p50: Option<f64>,
    /// 95th percentile of the same.
    pub wait_p95: Option<f64>,
    /// Median seconds from first start to the end.
    pub run_p50: Option<f64>,
    /// 95th percentile of the same.
    pub run_p95: Option<f64>,
}

/// Per-minute counts and latencies of the jobs that ended after `since`, oldest minute first;
/// minutes with no ended job are absent.
///
/// # Errors
/// Database failures.
pub async fn minutes_since(
    db: impl PgExecutor<'_>,
    since: DateTime<Utc>,
) -> Result<Vec<MinuteStats>, DbError> {
    let rows = sqlx::query_as!(
        MinuteStats,
        r#"SELECT date_trunc('minute', finished_at) AS "minute!",
             count(*) FILTER (WHERE status = 'COMPLETED') AS "completed!",
             count(*) FILTER (WHERE status = 'FAILED') AS "failed!",
             count(*) FILTER (WHERE status = 'CANCELLED') AS "cancelled!",
             percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at)::float8) AS wait_p50,
             percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at)::float8) AS wait_p95,
             percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)::float8) AS run_p50,
             percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)::float8) AS run_p95
           FROM job_requests
           WHERE finished_at > $1
           GROUP BY 1 ORDER BY 1"#,
        since,
    )
    .fetch_all(db)
    .await?;
    Ok(rows)
}
