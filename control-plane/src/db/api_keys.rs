//! API keys: `emp_` + 64 hex characters, shown once and stored only as their SHA-256
//! (seed: "API Key Management").

use chrono::{DateTime, Utc};
use rand::RngCore as _;
use sha2::{Digest, Sha256};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::cursor::{Cursor, Page, fetch_limit};
use super::error::DbError;
use super::users::{Role, User};

/// Every key starts with this, so a leaked key is recognisable (and scannable) as emp's.
pub const KEY_PREFIX: &str = "emp_";

/// A row of `api_keys`, without its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// UUIDv7.
    pub id: Uuid,
    /// The owner's label for the key.
    pub name: String,
    /// The owner.
    pub user_id: Uuid,
    /// False once revoked; a revoked key stops working at once and stays listed.
    pub is_active: bool,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it last authenticated a request, to the minute.
    pub last_used: Option<DateTime<Utc>>,
}

/// A key just made: the only time its plaintext exists.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// `emp_` + 64 lowercase hex characters.
    pub plaintext: String,
    /// The stored row.
    pub key: ApiKey,
}

/// A key that authenticated a request, with its live owner.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The key that was presented.
    pub key: ApiKey,
    /// Its owner, who is not deleted.
    pub user: User,
}

/// SHA-256 of a key, lowercase hex: the only form that is stored.
pub fn hash_key(plaintext: &str) -> String {
    hex::encode(Sha256::digest(plaintext.as_bytes()))
}

/// Whether `text` has the shape of an emp key, so junk never reaches the database.
pub fn looks_like_key(text: &str) -> bool {
    text.strip_prefix(KEY_PREFIX).is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn generate_plaintext() -> String {
    let mut bytes = [0_u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

/// Makes a key for `user_id`; the plaintext is returned once and never stored.
///
/// # Errors
/// Database failures (an unknown user is a foreign-key error).
pub async fn create(db: impl PgExecutor<'_>, user_id: Uuid, name: &str) -> Result<NewKey, DbError> {
    let plaintext = generate_plaintext();
    let key = sqlx::query_as!(
        ApiKey,
        r#"INSERT INTO api_keys (id, name, key_hash, user_id) VALUES ($1, $2, $3, $4)
           RETURNING id, name, user_id, is_active, created_at, last_used"#,
        Uuid::now_v7(),
        name,
        hash_key(&plaintext),
        user_id,
    )
    .fetch_one(db)
    .await?;
    Ok(NewKey { plaintext, key })
}

/// The active key with this plaintext and its live owner, if any. Does not write.
///
/// # Errors
/// Database failures; an unknown, malformed, revoked or orphaned key is `Ok(None)`.
pub async fn validate(
    db: impl PgExecutor<'_>,
    plaintext: &str,
) -> Result<Option<Authenticated>, DbError> {
    if !looks_like_key(plaintext) {
        return Ok(None);
    }
    let row = sqlx::query!(
        r#"SELECT k.id, k.name, k.user_id, k.is_active, k.created_at, k.last_used,
                  u.email, u.name AS user_name, u.role AS "role: Role", u.created_at AS user_created_at
           FROM api_keys k JOIN users u ON u.id = k.user_id
           WHERE k.key_hash = $1 AND k.is_active AND u.deleted_at IS NULL"#,
        hash_key(plaintext),
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(|row| Authenticated {
        key: ApiKey {
            id: row.id,
            name: row.name,
            user_id: row.user_id,
            is_active: row.is_active,
            created_at: row.created_at,
            last_used: row.last_used,
        },
        user: User {
            id: row.user_id,
            email: row.email,
            name: row.user_name,
            role: row.role,
            created_at: row.user_created_at,
        },
    }))
}

/// Records a use of the key at `now`, unless one was recorded less than a minute before
/// (CONTRACT.md), so authenticating a busy key stays a read, not a write per request.
/// Returns whether a write happened.
///
/// # Errors
/// Database failures.
pub async fn touch_last_used(
    db: impl PgExecutor<'_>,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    let updated = sqlx::query!(
        "UPDATE api_keys SET last_used = $2
         WHERE id = $1 AND (last_used IS NULL OR last_used <= $2::timestamptz - interval '1 minute')",
        id,
        now,
    )
    .execute(db)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// A key by id, whoever owns it, revoked or not (an admin may revoke any key by id; callers
/// check ownership).
///
/// # Errors
/// [`DbError::NotFound`] for an unknown id.
pub async fn find_by_id(db: impl PgExecutor<'_>, id: Uuid) -> Result<ApiKey, DbError> {
    let key = sqlx::query_as!(
        ApiKey,
        "SELECT id, name, user_id, is_active, created_at, last_used FROM api_keys WHERE id = $1",
        id,
    )
    .fetch_optional(db)
    .await?;
    key.ok_or(DbError::NotFound)
}

/// Revokes one of `user_id`'s keys. Revoking a key twice is not an error.
///
/// # Errors
/// [`DbError::NotFound`] when `user_id` has no such key.
pub async fn revoke(db: impl PgExecutor<'_>, user_id: Uuid, id: Uuid) -> Result<(), DbError> {
    let found = sqlx::query!(
        "UPDATE api_keys SET is_active = false, revoked_at = COALESCE(revoked_at, now())
         WHERE id = $1 AND user_id = $2",
        id,
        user_id,
    )
    .execute(db)
    .await?;
    if found.rows_affected() == 0 {
        return Err(DbError::NotFound);
    }
    Ok(())
}

/// Revokes every key of a user (their deletion).
///
/// # Errors
/// Database failures.
pub async fn revoke_all_of_user(db: impl PgExecutor<'_>, user_id: Uuid) -> Result<u64, DbError> {
    let revoked = sqlx::query!(
        "UPDATE api_keys SET is_active = false, revoked_at = now() WHERE user_id = $1 AND is_active",
        user_id,
    )
    .execute(db)
    .await?;
    Ok(revoked.rows_affected())
}

/// A user's keys, revoked ones included, newest first.
///
/// # Errors
/// Database failures.
pub async fn list_of_user(
    db: impl PgExecutor<'_>,
    user_id: Uuid,
    limit: usize,
    after: Option<Cursor>,
) -> Result<Page<ApiKey>, DbError> {
    let after = after.unwrap_or_else(Cursor::start);
    let rows = sqlx::query_as!(
        ApiKey,
        r#"SELECT id, name, user_id, is_active, created_at, last_used
           FROM api_keys
           WHERE user_id = $1 AND (created_at, id) < ($2, $3)
           ORDER BY created_at DESC, id DESC
           LIMIT $4"#,
        user_id,
        after.at,
        after.id,
        fetch_limit(limit),
    )
    .fetch_all(db)
    .await?;
    Ok(Page::from_rows(rows, limit, |k| Cursor {
        at: k.created_at,
        id: k.id,
    }))
}
