//! Output uploads in flight: what the control plane promised an agent when it handed out a
//! presigned `PUT` URL, read back when the agent reports the upload complete.

use sqlx::PgExecutor;
use uuid::Uuid;

use super::error::DbError;

/// A row of `output_uploads`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputUpload {
    /// The opaque id handed to the agent.
    pub id: Uuid,
    /// The job.
    pub job_id: Uuid,
    /// The execution uploading.
    pub execution_id: Uuid,
    /// The ComfyUI node that wrote the file.
    pub node_id: String,
    /// The safe file name.
    pub filename: String,
    /// The media type.
    pub content_type: String,
    /// Where the agent puts the bytes.
    pub storage_key: String,
}

/// Records an upload about to happen.
///
/// # Errors
/// Database failures.
pub async fn create(db: impl PgExecutor<'_>, upload: &OutputUpload) -> Result<(), DbError> {
    sqlx::query!(
        r#"INSERT INTO output_uploads
             (id, job_id, execution_id, node_id, filename, content_type, storage_key)
           VALUES ($1, $2, $3, $4, $5, $6, $7)"#,
        upload.id,
        upload.job_id,
        upload.execution_id,
        upload.node_id,
        upload.filename,
        upload.content_type,
        upload.storage_key,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// The upload `id` of execution `execution_id`.
///
/// # Errors
/// [`DbError::NotFound`] when there is no such upload of that execution.
pub async fn find(
    db: impl PgExecutor<'_>,
    execution_id: Uuid,
    id: Uuid,
) -> Result<OutputUpload, DbError> {
    let upload = sqlx::query_as!(
        OutputUpload,
        r#"SELECT id, job_id, execution_id, node_id, filename, content_type, storage_key
           FROM output_uploads WHERE id = $1 AND execution_id = $2"#,
        id,
        execution_id,
    )
    .fetch_optional(db)
    .await?;
    upload.ok_or(DbError::NotFound)
}

/// Forgets an upload (completed or refused).
///
/// # Errors
/// Database failures.
pub async fn remove(db: impl PgExecutor<'_>, id: Uuid) -> Result<(), DbError> {
    sqlx::query!("DELETE FROM output_uploads WHERE id = $1", id)
        .execute(db)
        .await?;
    Ok(())
}
