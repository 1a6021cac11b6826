//! `Idempotency-Key` of job submissions: one row per user and key, valid for
//! [`KEY_LIFETIME`], tying the key to the request's hash and the job it created.
//!
//! The row is written in the same transaction as the job ([`claim`]), so of two concurrent
//! submissions with one key exactly one creates a job; the other finds the winner's row.

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::error::DbError;

/// How long a key keeps answering with its job (CONTRACT.md: 24 h). Maintenance deletes
/// older rows; until then they are ignored and may be claimed again.
pub const KEY_LIFETIME: TimeDelta = TimeDelta::hours(24);

/// A live key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// SHA-256 of the first request's body in canonical JSON.
    pub request_hash: String,
    /// The job that request created.
    pub job_id: Uuid,
    /// When the key was first used.
    pub created_at: DateTime<Utc>,
}

/// The key `key` of `user_id`, if it was used within [`KEY_LIFETIME`] before `now`.
///
/// # Errors
/// Database failures.
pub async fn find_live(
    db: impl PgExecutor<'_>,
    user_id: Uuid,
    key: &str,
    now: DateTime<Utc>,
) -> Result<Option<IdempotencyRecord>, DbError> {
    let record = sqlx::query_as!(
        IdempotencyRecord,
        "SELECT request_hash, job_id, created_at FROM idempotency_keys
         WHERE user_id = $1 AND key = $2 AND created_at > $3",
        user_id,
        key,
        now - KEY_LIFETIME,
    )
    .fetch_optional(db)
    .await?;
    Ok(record)
}

/// Ties `key` to `job_id` unless a live row holds it already (an expired one is taken
/// over). Returns whether this call got the key. Run it in the job's transaction: a
/// concurrent claim of the same key waits for that transaction and then finds the key taken.
///
/// # Errors
/// Database failures (the job must exist: foreign key).
pub async fn claim(
    db: impl PgExecutor<'_>,
    user_id: Uuid,
    key: &str,
    request_hash: &str,
    job_id: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    let claimed = sqlx::query!(
        "INSERT INTO idempotency_keys (user_id, key, request_hash, job_id, created_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (user_id, key) DO UPDATE SET
           request_hash = EXCLUDED.request_hash,
           job_id = EXCLUDED.job_id,
           created_at = EXCLUDED.created_at
         WHERE idempotency_keys.created_at <= $6",
        user_id,
        key,
        request_hash,
        job_id,
        now,
        now - KEY_LIFETIME,
    )
    .execute(db)
    .await?;
    Ok(claimed.rows_affected() == 1)
}
