//! Input assets: files a user uploaded, deduplicated per user by SHA-256, named in workflows
//! as `asset://<id>`. Deleting one that a queued or running job names only marks it
//! (`deleted_at`): its owner no longer sees it, agents still fetch it, and it is purged once
//! no such job is left.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::cursor::{Cursor, Page, fetch_limit};
use super::error::DbError;

/// A row of `assets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asset {
    /// UUIDv7.
    pub id: Uuid,
    /// The owner.
    pub user_id: Uuid,
    /// The file name the upload gave (made safe).
    pub filename: String,
    /// The media type the upload gave.
    pub content_type: String,
    /// Bytes.
    pub size: i64,
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Where the bytes live in the artifact store.
    pub storage_key: String,
    /// Upload time.
    pub created_at: DateTime<Utc>,
    /// Set when its owner deleted it while jobs still named it.
    pub deleted_at: Option<DateTime<Utc>>,
}

/// What [`delete`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletion {
    /// The row is gone; the bytes at this key may be removed.
    Removed(String),
    /// A queued or running job names it: marked deleted, bytes kept for now.
    Marked,
}

/// Records a new asset, unless the user already has a live one with the same SHA-256: then
/// `None` (the caller answers the existing one, see [`find_live_by_sha256`]).
///
/// # Errors
/// Database failures.
pub async fn insert(db: impl PgExecutor<'_>, asset: &Asset) -> Result<Option<Asset>, DbError> {
    let inserted = sqlx::query_as!(
        Asset,
        r#"INSERT INTO assets (id, user_id, filename, content_type, size, sha256, storage_key)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (user_id, sha256) WHERE deleted_at IS NULL DO NOTHING
           RETURNING id, user_id, filename, content_type, size, sha256, storage_key, created_at,
             deleted_at"#,
        asset.id,
        asset.user_id,
        asset.filename,
        asset.content_type,
        asset.size,
        asset.sha256,
        asset.storage_key,
    )
    .fetch_optional(db)
    .await?;
    Ok(inserted)
}

/// The user's live asset with these bytes, if any.
///
/// # Errors
/// Database failures.
pub async fn find_live_by_sha256(
    db: impl PgExecutor<'_>,
    user_id: Uuid,
    sha256: &str,
) -> Result<Option<Asset>, DbError> {
    let asset = sqlx::query_as!(
        Asset,
        r#"SELECT id, user_id, filename, content_type, size, sha256, storage_key, created_at,
             deleted_at
           FROM assets WHERE user_id = $1 AND sha256 = $2 AND deleted_at IS NULL"#,
        user_id,
        sha256,
    )
    .fetch_optional(db)
    .await?;
    Ok(asset)
}

/// The asset with this id, marked deleted or not (agents fetch both; owners only live ones).
///
/// # Errors
/// [`DbError::NotFound`] for an unknown (or purged) id.
pub async fn find_by_id(db: impl PgExecutor<'_>, id: Uuid) -> Result<Asset, DbError> {
    let asset = sqlx::query_as!(
        Asset,
        r#"SELECT id, user_id, filename, content_type, size, sha256, storage_key, created_at,
             deleted_at
           FROM assets WHERE id = $1"#,
        id,
    )
    .fetch_optional(db)
    .await?;
    asset.ok_or(DbError::NotFound)
}

/// The user's live assets, newest first.
///
/// # Errors
/// Database failures.
pub async fn list(
    db: impl PgExecutor<'_>,
    user_id: Uuid,
    limit: usize,
    after: Option<Cursor>,
) -> Result<Page<Asset>, DbError> {
    let after = after.unwrap_or_else(Cursor::start);
    let rows = sqlx::query_as!(
        Asset,
        r#"SELECT id, user_id, filename, content_type, size, sha256, storage_key, created_at,
             deleted_at
           FROM assets
           WHERE user_id = $1 AND deleted_at IS NULL AND (created_at, id) < ($2, $3)
           ORDER BY created_at DESC, id DESC
           LIMIT $4"#,
        user_id,
        after.at,
        after.id,
        fetch_limit(limit),
    )
    .fetch_all(db)
    .await?;
    Ok(Page::from_rows(rows, limit, |a| Cursor {
        at: a.created_at,
        id: a.id,
    }))
}

/// Which of `ids` are live assets of `user_id`.
///
/// # Errors
/// Database failures.
pub async fn live_of_user(
    db: impl PgExecutor<'_>,
    user_id: Uuid,
    ids: &[Uuid],
) -> Result<Vec<Uuid>, DbError> {
    let found = sqlx::query_scalar!(
        r#"SELECT id FROM assets WHERE id = ANY($1) AND user_id = $2 AND deleted_at IS NULL"#,
        ids,
        user_id,
    )
    .fetch_all(db)
    .await?;
    Ok(found)
}

/// Deletes a live asset: the row goes when no queued or running job of its owner names it,
/// else it is only marked.
///
/// # Errors
/// [`DbError::NotFound`] when there is no such live asset.
pub async fn delete(db: &sqlx::PgPool, id: Uuid) -> Result<Deletion, DbError> {
    let mut tx = db.begin().await?;
    let asset = sqlx::query!(
        r#"SELECT user_id FROM assets WHERE id = $1 AND deleted_at IS NULL FOR UPDATE"#,
        id,
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(DbError::NotFound)?;
    let in_use = sqlx::query_scalar!(
        r#"SELECT EXISTS (
             SELECT 1 FROM job_requests
             WHERE user_id = $1 AND status IN ('QUEUED', 'PROCESSING')
               AND strpos(COALESCE(custom_workflow, rendered_workflow)::text,
                          '"asset://' || $2::uuid::text || '"') > 0
           ) AS "in_use!""#,
        asset.user_id,
        id,
    )
    .fetch_one(&mut *tx)
    .await?;
    let outcome = if in_use {
        sqlx::query!("UPDATE assets SET deleted_at = now() WHERE id = $1", id)
            .execute(&mut *tx)
            .await?;
        Deletion::Marked
    } else {
        let key = sqlx::query_scalar!("DELETE FROM assets WHERE id = $1 RETURNING storage_key", id)
            .fetch_one(&mut *tx)
            .await?;
        Deletion::Removed(key)
    };
    tx.commit().await?;
    Ok(outcome)
}

/// Removes the rows of marked assets that no queued or running job names any more (of one
/// user, or of everybody), returning their storage keys for the caller to delete.
///
/// # Errors
/// Database failures.
pub async fn purge_unused(
    db: impl PgExecutor<'_>,
    user_id: Option<Uuid>,
) -> Result<Vec<String>, DbError> {
    let keys = sqlx::query_scalar!(
        r#"DELETE FROM assets a
           WHERE a.deleted_at IS NOT NULL AND ($1::uuid IS NULL OR a.user_id = $1)
             AND NOT EXISTS (
               SELECT 1 FROM job_requests j
               WHERE j.user_id = a.user_id AND j.status IN ('QUEUED', 'PROCESSING')
                 AND strpos(COALESCE(j.custom_workflow, j.rendered_workflow)::text,
                            '"asset://' || a.id::text || '"') > 0)
           RETURNING a.storage_key"#,
        user_id,
    )
    .fetch_all(db)
    .await?;
    Ok(keys)
}
