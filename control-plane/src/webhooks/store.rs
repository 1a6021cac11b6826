//! The webhook tables: users' secrets, the deliveries outbox (claimed with
//! `FOR UPDATE SKIP LOCKED` and a lease, so replicas never send one delivery at the same time)
//! and the log of tries.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::signing;
use crate::db::DbError;

/// How long a rotated-out secret keeps signing.
pub const PREVIOUS_SECRET_OVERLAP_HOURS: i32 = 24;

/// A user's secrets that currently sign: the current one first.
#[derive(Clone, PartialEq, Eq)]
pub struct Secrets {
    /// The current secret.
    pub current: String,
    /// The previous one, while its overlap lasts.
    pub previous: Option<String>,
}

impl std::fmt::Debug for Secrets {
    // Secrets never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(<hidden>)")
    }
}

impl Secrets {
    /// Every secret that signs now.
    pub fn all(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.current.as_str()).chain(self.previous.as_deref())
    }
}

/// `user_id`'s secrets, made on first use (so every user has one from the start).
///
/// # Errors
/// Postgres failures.
pub async fn secrets_of(db: &sqlx::PgPool, user_id: Uuid) -> Result<Secrets, DbError> {
    sqlx::query!(
        "INSERT INTO webhook_secrets (user_id, secret) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING",
        user_id,
        signing::new_secret(),
    )
    .execute(db)
    .await?;
    let row = sqlx::query!(
        r#"SELECT secret,
                  CASE WHEN previous_expires_at > now() THEN previous_secret END AS previous
           FROM webhook_secrets WHERE user_id = $1"#,
        user_id
    )
    .fetch_one(db)
    .await?;
    Ok(Secrets {
        current: row.secret,
        previous: row.previous,
    })
}

/// Replaces `user_id`'s secret with a new one; the old one keeps signing for 24 hours.
/// Returns the new secret.
///
/// # Errors
/// Postgres failures.
pub async fn rotate_secret(db: impl PgExecutor<'_>, user_id: Uuid) -> Result<String, DbError> {
    Ok(sqlx::query_scalar!(
        r#"INSERT INTO webhook_secrets (user_id, secret) VALUES ($1, $2)
           ON CONFLICT (user_id) DO UPDATE SET
             previous_secret = webhook_secrets.secret,
             previous_expires_at = now() + make_interval(hours => $3),
             secret = EXCLUDED.secret,
             rotated_at = now()
           RETURNING secret"#,
        user_id,
        signing::new_secret(),
        PREVIOUS_SECRET_OVERLAP_HOURS,
    )
    .fetch_one(db)
    .await?)
}

/// A delivery as the sender needs it.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    /// Its id, also the `webhook-id` header.
    pub id: Uuid,
    /// The job.
    pub job_id: Uuid,
    /// The job's owner, whose secrets sign.
    pub user_id: Uuid,
    /// The payload's `type`.
    pub event_type: String,
    /// Where to POST.
    pub url: String,
    /// The payload's `timestamp`.
    pub occurred_at: DateTime<Utc>,
    /// Event data laid over the job object (progress).
    pub event_data: Option<Value>,
    /// The fixed body, once the first try has made it.
    pub body: Option<String>,
    /// Tries in all.
    pub attempts: i32,
    /// Tries since it was (re)queued.
    pub round_attempts: i32,
}

/// Takes up to `limit` due deliveries for `owner` until `lease_secs` from now. Another
/// replica skips them (row locks while claiming, the lease afterwards).
///
/// # Errors
/// Postgres failures.
pub async fn claim_due(
    db: impl PgExecutor<'_>,
    owner: &str,
    limit: i64,
    lease_secs: f64,
) -> Result<Vec<DueDelivery>, DbError> {
    Ok(sqlx::query_as!(
        DueDelivery,
        r#"WITH due AS (
             SELECT id FROM webhook_deliveries
             WHERE status = 'PENDING' AND next_attempt_at <= now()
               AND (lease_until IS NULL OR lease_until < now())
             ORDER BY next_attempt_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED
           )
           UPDATE webhook_deliveries d SET
             lease_owner = $1,
             lease_until = now() + make_interval(secs => $3),
             updated_at = now()
           FROM due, job_requests j
           WHERE d.id = due.id AND j.id = d.job_id
           RETURNING d.id, d.job_id, j.user_id, d.event_type, d.url, d.occurred_at, d.event_data,
                     d.body, d.attempts, d.round_attempts"#,
        owner,
        limit,
        lease_secs,
    )
    .fetch_all(db)
    .await?)
}

/// Fixes a delivery's body unless another try fixed one first; returns the body to send.
///
/// # Errors
/// Postgres failures.
pub async fn fix_body(db: impl PgExecutor<'_>, id: Uuid, body: &str) -> Result<String, DbError> {
    Ok(sqlx::query_scalar!(
        r#"UPDATE webhook_deliveries SET body = COALESCE(body, $2) WHERE id = $1
           RETURNING body AS "body!""#,
        id,
        body,
    )
    .fetch_one(db)
    .await?)
}

/// How one try ended.
#[derive(Debug, Clone)]
pub struct TryOutcome {
    /// When the request was sent.
    pub sent_at: DateTime<Utc>,
    /// How long it took.
    pub duration_ms: i32,
    /// The receiver's status, when it answered.
    pub status_code: Option<i32>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Whether it counts as delivered (2xx).
    pub delivered: bool,
    /// When to try again; `None` after the last try (then FAILED) or on success.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// The state of a delivery after a recorded try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// PENDING, DELIVERED or FAILED.
    pub status: String,
    /// Tries in all.
    pub attempts: i32,
    /// When the next try is due (PENDING only).
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// Records a try of a delivery `owner` holds and releases the lease. Returns `None` when the
/// lease was lost (another replica took it over after it ran out): nothing is written then.
///
/// # Errors
/// Postgres failures.
pub async fn record_try(
    db: &sqlx::PgPool,
    id: Uuid,
    owner: &str,
    outcome: &TryOutcome,
) -> Result<Option<Recorded>, DbError> {
    let mut tx = db.begin().await?;
    let status = if outcome.delivered {
        "DELIVERED"
    } else if outcome.next_attempt_at.is_some() {
        "PENDING"
    } else {
        "FAILED"
    };
    let row = sqlx::query!(
        r#"UPDATE webhook_deliveries SET
             status = $3,
             attempts = attempts + 1,
             round_attempts = round_attempts + 1,
             next_attempt_at = COALESCE($4, next_attempt_at),
             last_status_code = $5,
             last_error = $6,
             delivered_at = CASE WHEN $3 = 'DELIVERED' THEN now() ELSE delivered_at END,
             lease_owner = NULL,
             lease_until = NULL,
             updated_at = now()
           WHERE id = $1 AND lease_owner = $2 AND status = 'PENDING'
           RETURNING attempts, status, next_attempt_at"#,
        id,
        owner,
        status,
        outcome.next_attempt_at,
        outcome.status_code,
        outcome.error,
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    sqlx::query!(
        r#"INSERT INTO webhook_delivery_attempts (delivery_id, attempt, sent_at, duration_ms, status_code, error)
           VALUES ($1, $2, $3, $4, $5, $6)"#,
        id,
        row.attempts,
        outcome.sent_at,
        outcome.duration_ms,
        outcome.status_code,
        outcome.error,
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Recorded {
        next_attempt_at: (row.status == "PENDING").then_some(row.next_attempt_at),
        status: row.status,
        attempts: row.attempts,
    }))
}

/// A delivery as the API lists it.
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    /// Its id (the `webhook-id`).
    pub id: Uuid,
    /// The payload's `type`.
    pub event_type: String,
    /// PENDING, DELIVERED or FAILED.
    pub status: String,
    /// Tries in all.
    pub attempts: i32,
    /// The receiver's status at the latest try.
    pub last_status_code: Option<i32>,
    /// Why the latest try failed.
    pub last_error: Option<String>,
    /// When the next try is due.
    pub next_attempt_at: DateTime<Utc>,
    /// When it was delivered.
    pub delivered_at: Option<DateTime<Utc>>,
}

/// A job's deliveries in the order of their events.
///
/// # Errors
/// Postgres failures.
pub async fn list_of_job(
    db: impl PgExecutor<'_>,
    job_id: Uuid,
) -> Result<Vec<DeliveryRow>, DbError> {
    Ok(sqlx::query_as!(
        DeliveryRow,
        r#"SELECT id, event_type, status, attempts, last_status_code, last_error, next_attempt_at,
                  delivered_at
           FROM webhook_deliveries WHERE job_id = $1 ORDER BY occurred_at, id"#,
        job_id
    )
    .fetch_all(db)
    .await?)
}

/// Queues delivery `id` of `job_id` for an immediate try and a fresh run of the retry
/// schedule, whatever its status; the body and `webhook-id` stay the same.
///
/// # Errors
/// [`DbError::NotFound`] when the job has no such delivery; Postgres failures.
pub async fn redeliver(
    db: impl PgExecutor<'_>,
    job_id: Uuid,
    id: Uuid,
) -> Result<DeliveryRow, DbError> {
    Ok(sqlx::query_as!(
        DeliveryRow,
        r#"UPDATE webhook_deliveries SET
             status = 'PENDING', round_attempts = 0, next_attempt_at = now(), updated_at = now()
           WHERE id = $1 AND job_id = $2
           RETURNING id, event_type, status, attempts, last_status_code, last_error,
                     next_attempt_at, delivered_at"#,
        id,
        job_id,
    )
    .fetch_one(db)
    .await?)
}
