//! Job executions: one row per claim of a job by a box; its id is the claim's fencing token.

use chrono::{DateTime, Utc};
use emp_shared::status::ExecutionStatus;
use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::error::DbError;

/// A row of `job_executions`.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    /// UUIDv7 made at claim time.
    pub id: Uuid,
    /// The job.
    pub job_request_id: Uuid,
    /// The box that claimed it.
    pub machine_id: Uuid,
    /// RUNNING until it ends.
    pub status: ExecutionStatus,
    /// Claim time.
    pub started_at: DateTime<Utc>,
    /// Set when COMPLETED.
    pub completed_at: Option<DateTime<Utc>>,
    /// Set when FAILED (also LOST / STALE: when it was given up).
    pub failed_at: Option<DateTime<Utc>>,
    /// `{code, message, …}` of the failure.
    pub error: Option<Value>,
}

/// Records a claim. Idempotent: the same execution id twice keeps the first row.
///
/// # Errors
/// Database failures (an unknown job or machine is a foreign-key error).
pub async fn record_start(
    db: impl PgExecutor<'_>,
    id: Uuid,
    job_id: Uuid,
    machine_id: Uuid,
    started_at: DateTime<Utc>,
) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO job_executions (id, job_request_id, machine_id, started_at)
         VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
        id,
        job_id,
        machine_id,
        started_at,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Ends a RUNNING execution with `status`; an execution that already ended is left as it is
/// (returns false), so replayed events change nothing.
///
/// # Errors
/// Database failures.
pub async fn finish(
    db: impl PgExecutor<'_>,
    id: Uuid,
    status: ExecutionStatus,
    at: DateTime<Utc>,
    error: Option<&Value>,
) -> Result<bool, DbError> {
    let updated = sqlx::query!(
        "UPDATE job_executions SET
           status = $2::execution_status,
           completed_at = CASE WHEN $2::execution_status = 'COMPLETED' THEN $3 ELSE completed_at END,
           failed_at = CASE WHEN $2::execution_status <> 'COMPLETED' THEN $3 ELSE failed_at END,
           error = COALESCE($4, error),
           error_message = COALESCE($4->>'message', error_message)
         WHERE id = $1 AND status = 'RUNNING'",
        id,
        status as ExecutionStatus,
        at,
        error,
    )
    .execute(db)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// A job's executions in start order.
///
/// # Errors
/// Database failures.
pub async fn list_of_job(db: impl PgExecutor<'_>, job_id: Uuid) -> Result<Vec<Execution>, DbError> {
    let rows = sqlx::query_as!(
        Execution,
        r#"SELECT id, job_request_id, machine_id, status AS "status: ExecutionStatus",
             started_at, completed_at, failed_at, error
           FROM job_executions WHERE job_request_id = $1
           ORDER BY started_at, id"#,
        job_id,
    )
    .fetch_all(db)
    .await?;
    Ok(rows)
}

/// The execution with this id.
///
/// # Errors
/// [`DbError::NotFound`] when Postgres does not know it (yet: the persister writes it).
pub async fn find_by_id(db: impl PgExecutor<'_>, id: Uuid) -> Result<Execution, DbError> {
    let row = sqlx::query_as!(
        Execution,
        r#"SELECT id, job_request_id, machine_id, status AS "status: ExecutionStatus",
             started_at, completed_at, failed_at, error
           FROM job_executions WHERE id = $1"#,
        id,
    )
    .fetch_optional(db)
    .await?;
    row.ok_or(DbError::NotFound)
}

/// The latest execution (by start) of each of these jobs that has one.
///
/// # Errors
/// Database failures.
pub async fn latest_of_jobs(
    db: impl PgExecutor<'_>,
    job_ids: &[Uuid],
) -> Result<Vec<Execution>, DbError> {
    let rows = sqlx::query_as!(
        Execution,
        r#"SELECT DISTINCT ON (job_request_id)
             id, job_request_id, machine_id, status AS "status: ExecutionStatus",
             started_at, completed_at, failed_at, error
           FROM job_executions WHERE job_request_id = ANY($1)
           ORDER BY job_request_id, started_at DESC, id DESC"#,
        job_ids,
    )
    .fetch_all(db)
    .await?;
    Ok(rows)
}

/// How many RUNNING executions each of these machines has, as Postgres knows it (machines
/// without any are left out).
///
/// # Errors
/// Database failures.
pub async fn running_counts(
    db: impl PgExecutor<'_>,
    machine_ids: &[Uuid],
) -> Result<Vec<(Uuid, i64)>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT machine_id, count(*) AS "count!" FROM job_executions
           WHERE status = 'RUNNING' AND machine_id = ANY($1)
           GROUP BY machine_id"#,
        machine_ids,
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.machine_id, row.count))
        .collect())
}
