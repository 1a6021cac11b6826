//! Job outputs: the files an execution produced, stored in the artifact store under
//! `storage_key` and served to the job's owner.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::error::DbError;

/// A row of `job_outputs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// UUIDv7.
    pub id: Uuid,
    /// The job it belongs to.
    pub job_id: Uuid,
    /// The execution that produced it.
    pub execution_id: Uuid,
    /// The ComfyUI node that wrote it.
    pub node_id: String,
    /// The file's name (already made safe for a path and a header).
    pub filename: String,
    /// The media type the agent reported.
    pub content_type: String,
    /// Bytes.
    pub size: i64,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: Option<String>,
    /// Where the bytes live in the artifact store (a relative path).
    pub storage_key: String,
    /// Upload time.
    pub created_at: DateTime<Utc>,
}

/// An output to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOutput {
    /// Used when the row is new; a re-upload of the same file keeps the first id.
    pub id: Uuid,
    /// The job.
    pub job_id: Uuid,
    /// The execution.
    pub execution_id: Uuid,
    /// The node.
    pub node_id: String,
    /// The safe file name.
    pub filename: String,
    /// The media type.
    pub content_type: String,
    /// Bytes.
    pub size: i64,
    /// Lowercase hex SHA-256 (`None` when an agent's direct upload did not report it).
    pub sha256: Option<String>,
    /// Relative path in the artifact store.
    pub storage_key: String,
}

/// Records an output. The same execution, node and file name again (an agent retrying an
/// upload) replaces the earlier row's content and keeps its id.
///
/// # Errors
/// Database failures; an execution Postgres does not know yet is a foreign-key error.
pub async fn record(db: impl PgExecutor<'_>, new: &NewOutput) -> Result<Output, DbError> {
    let output = sqlx::query_as!(
        Output,
        r#"INSERT INTO job_outputs
             (id, job_id, execution_id, node_id, filename, content_type, size, sha256, storage_key)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
           ON CONFLICT (execution_id, node_id, filename) DO UPDATE SET
             content_type = EXCLUDED.content_type,
             size = EXCLUDED.size,
             sha256 = EXCLUDED.sha256,
             storage_key = EXCLUDED.storage_key
           RETURNING id, job_id, execution_id, node_id, filename, content_type, size, sha256,
             storage_key, created_at"#,
        new.id,
        new.job_id,
        new.execution_id,
        new.node_id,
        new.filename,
        new.content_type,
        new.size,
        new.sha256,
        new.storage_key,
    )
    .fetch_one(db)
    .await?;
    Ok(output)
}

/// Output `id` of job `job_id`.
///
/// # Errors
/// [`DbError::NotFound`] when the job has no such output.
pub async fn find(db: impl PgExecutor<'_>, job_id: Uuid, id: Uuid) -> Result<Output, DbError> {
    let output = sqlx::query_as!(
        Output,
        r#"SELECT id, job_id, execution_id, node_id, filename, content_type, size, sha256,
             storage_key, created_at
           FROM job_outputs WHERE id = $1 AND job_id = $2"#,
        id,
        job_id,
    )
    .fetch_optional(db)
    .await?;
    output.ok_or(DbError::NotFound)
}

/// The outputs of each job's latest execution (the run the job object describes; files of
/// an earlier, abandoned attempt are not the job's result), oldest first per job.
///
/// # Errors
/// Database failures.
pub async fn of_latest_executions(
    db: impl PgExecutor<'_>,
    job_ids: &[Uuid],
) -> Result<Vec<Output>, DbError> {
    let outputs = sqlx::query_as!(
        Output,
        r#"SELECT o.id, o.job_id, o.execution_id, o.node_id, o.filename, o.content_type, o.size,
             o.sha256, o.storage_key, o.created_at
           FROM job_outputs o
           WHERE o.job_id = ANY($1)
             AND o.execution_id = (
               SELECT e.id FROM job_executions e WHERE e.job_request_id = o.job_id
               ORDER BY e.started_at DESC, e.id DESC LIMIT 1)
           ORDER BY o.job_id, o.created_at, o.id"#,
        job_ids,
    )
    .fetch_all(db)
    .await?;
    Ok(outputs)
}
