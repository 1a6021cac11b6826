//! Users: who submits jobs. Deleted softly, so their jobs keep their owner.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use super::api_keys::{self, NewKey};
use super::cursor::{Cursor, Page, fetch_limit};
use super::error::DbError;

/// What a user may do: `user` sees only their own resources, `admin` any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "user_role", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A submitter.
    User,
    /// An operator: every resource, the machines, the stats.
    Admin,
}

/// A row of `users`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// UUIDv7.
    pub id: Uuid,
    /// Unique among users that are not deleted, compared case-insensitively.
    pub email: String,
    /// Display name, optional.
    pub name: Option<String>,
    /// `user` or `admin`.
    pub role: Role,
    /// When the user was created.
    pub created_at: DateTime<Utc>,
}

impl User {
    /// Whether this user may act on resources of every user.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// Creates a user.
///
/// # Errors
/// [`DbError::Conflict`] when another live user has the same email (case-insensitively).
pub async fn create(
    db: impl PgExecutor<'_>,
    email: &str,
    name: Option<&str>,
    role: Role,
) -> Result<User, DbError> {
    let user = sqlx::query_as!(
        User,
        r#"INSERT INTO users (id, email, name, role) VALUES ($1, $2, $3, $4)
           RETURNING id, email, name, role AS "role: Role", created_at"#,
        Uuid::now_v7(),
        email,
        name,
        role as Role,
    )
    .fetch_one(db)
    .await?;
    Ok(user)
}

/// Creates a user and their first API key in one transaction, as `POST /api/v1/users` and
/// `emp-control-plane admin create-user` need: either both exist afterwards or neither.
///
/// # Errors
/// [`DbError::Conflict`] when the email is taken.
pub async fn create_with_key(
    pool: &PgPool,
    email: &str,
    name: Option<&str>,
    role: Role,
    key_name: &str,
) -> Result<(User, NewKey), DbError> {
    let mut tx = pool.begin().await?;
    let user = create(&mut *tx, email, name, role).await?;
    let key = api_keys::create(&mut *tx, user.id, key_name).await?;
    tx.commit().await?;
    Ok((user, key))
}

/// A user that is not deleted.
///
/// # Errors
/// [`DbError::NotFound`] when there is none.
pub async fn find_by_id(db: impl PgExecutor<'_>, id: Uuid) -> Result<User, DbError> {
    let user = sqlx::query_as!(
        User,
        r#"SELECT id, email, name, role AS "role: Role", created_at
           FROM users WHERE id = $1 AND deleted_at IS NULL"#,
        id,
    )
    .fetch_optional(db)
    .await?;
    user.ok_or(DbError::NotFound)
}

/// A live user by email, compared case-insensitively.
///
/// # Errors
/// [`DbError::NotFound`] when there is none.
pub async fn find_by_email(db: impl PgExecutor<'_>, email: &str) -> Result<User, DbError> {
    let user = sqlx::query_as!(
        User,
        r#"SELECT id, email, name, role AS "role: Role", created_at
           FROM users WHERE lower(email) = lower($1) AND deleted_at IS NULL"#,
        email,
    )
    .fetch_optional(db)
    .await?;
    user.ok_or(DbError::NotFound)
}

/// Live users, newest first.
///
/// # Errors
/// Database failures.
pub async fn list(
    db: impl PgExecutor<'_>,
    limit: usize,
    after: Option<Cursor>,
) -> Result<Page<User>, DbError> {
    let after = after.unwrap_or_else(Cursor::start);
    let rows = sqlx::query_as!(
        User,
        r#"SELECT id, email, name, role AS "role: Role", created_at
           FROM users
           WHERE deleted_at IS NULL AND (created_at, id) < ($1, $2)
           ORDER BY created_at DESC, id DESC
           LIMIT $3"#,
        after.at,
        after.id,
        fetch_limit(limit),
    )
    .fetch_all(db)
    .await?;
    Ok(Page::from_rows(rows, limit, |u| Cursor {
        at: u.created_at,
        id: u.id,
    }))
}

/// Deletes a user softly and revokes all their keys, in one transaction. Their jobs stay.
///
/// # Errors
/// [`DbError::NotFound`] when no live user has this id.
pub async fn delete(pool: &PgPool, id: Uuid) -> Result<(), DbError> {
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query!(
        "UPDATE users SET deleted_at = now(), updated_at = now() WHERE id = $1 AND deleted_at IS NULL",
        id,
    )
    .execute(&mut *tx)
    .await?;
    if deleted.rows_affected() == 0 {
        return Err(DbError::NotFound);
    }
    api_keys::revoke_all_of_user(&mut *tx, id).await?;
    tx.commit().await?;
    Ok(())
}

/// How many live users exist.
///
/// # Errors
/// Database failures.
pub async fn count(db: impl PgExecutor<'_>) -> Result<i64, DbError> {
    let count =
        sqlx::query_scalar!(r#"SELECT count(*) AS "count!" FROM users WHERE deleted_at IS NULL"#)
            .fetch_one(db)
            .await?;
    Ok(count)
}
