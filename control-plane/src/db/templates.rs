//! Job templates: reusable ComfyUI graphs with `{{placeholders}}`, private or public.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::cursor::{Cursor, Page, fetch_limit};
use super::error::DbError;

/// A row of `job_templates`.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// UUIDv7.
    pub id: Uuid,
    /// The owner.
    pub user_id: Uuid,
    /// Label.
    pub name: String,
    /// Optional description.
    pub description: Option<String>,
    /// Optional category (seed index: category + is_public).
    pub category: Option<String>,
    /// The graph with placeholders (the seed's `schema` column).
    pub workflow: Value,
    /// Whether every user may read and use it.
    pub is_public: bool,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A template to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTemplate {
    /// The owner.
    pub user_id: Uuid,
    /// Label.
    pub name: String,
    /// Optional description.
    pub description: Option<String>,
    /// Optional category.
    pub category: Option<String>,
    /// The graph.
    pub workflow: Value,
    /// Public or private.
    pub is_public: bool,
}

/// A partial change: `None` leaves a field as it is; `Some(None)` clears a nullable one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TemplatePatch {
    /// New label.
    pub name: Option<String>,
    /// New description, or `Some(None)` to clear it.
    pub description: Option<Option<String>>,
    /// New category, or `Some(None)` to clear it.
    pub category: Option<Option<String>>,
    /// New graph.
    pub workflow: Option<Value>,
    /// New visibility.
    pub is_public: Option<bool>,
}

/// Inserts a template.
///
/// # Errors
/// Database failures.
pub async fn create(db: impl PgExecutor<'_>, new: &NewTemplate) -> Result<Template, DbError> {
    let template = sqlx::query_as!(
        Template,
        r#"INSERT INTO job_templates (id, user_id, name, description, category, schema, is_public)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           RETURNING id, user_id, name, description, category, schema AS workflow, is_public,
             created_at, updated_at"#,
        Uuid::now_v7(),
        new.user_id,
        new.name,
        new.description,
        new.category,
        new.workflow,
        new.is_public,
    )
    .fetch_one(db)
    .await?;
    Ok(template)
}

/// The template with this id, whoever owns it (callers decide visibility with
/// [`Template::visible_to`]).
///
/// # Errors
/// [`DbError::NotFound`] for an unknown id.
pub async fn find_by_id(db: impl PgExecutor<'_>, id: Uuid) -> Result<Template, DbError> {
    let template = sqlx::query_as!(
        Template,
        r#"SELECT id, user_id, name, description, category, schema AS workflow, is_public,
             created_at, updated_at
           FROM job_templates WHERE id = $1"#,
        id,
    )
    .fetch_optional(db)
    .await?;
    template.ok_or(DbError::NotFound)
}

impl Template {
    /// Whether `user_id` may read and use it: their own, or a public one.
    pub fn visible_to(&self, user_id: Uuid) -> bool {
        self.is_public || self.user_id == user_id
    }
}

/// The templates `user_id` may see (their own and every public one), newest first.
///
/// # Errors
/// Database failures.
pub async fn list_visible(
    db: impl PgExecutor<'_>,
    user_id: Uuid,
    limit: usize,
    after: Option<Cursor>,
) -> Result<Page<Template>, DbError> {
    let after = after.unwrap_or_else(Cursor::start);
    let rows = sqlx::query_as!(
        Template,
        r#"SELECT id, user_id, name, description, category, schema AS workflow, is_public,
             created_at, updated_at
           FROM job_templates
           WHERE (user_id = $1 OR is_public) AND (created_at, id) < ($2, $3)
           ORDER BY created_at DESC, id DESC
           LIMIT $4"#,
        user_id,
        after.at,
        after.id,
        fetch_limit(limit),
    )
    .fetch_all(db)
    .await?;
    Ok(Page::from_rows(rows, limit, |t| Cursor {
        at: t.created_at,
        id: t.id,
    }))
}

/// Applies `patch` to the template.
///
/// # Errors
/// [`DbError::NotFound`] for an unknown id.
pub async fn update(
    db: impl PgExecutor<'_>,
    id: Uuid,
    patch: &TemplatePatch,
) -> Result<Template, DbError> {
    let template = sqlx::query_as!(
        Template,
        r#"UPDATE job_templates SET
             name = COALESCE($2, name),
             description = CASE WHEN $3 THEN $4 ELSE description END,
             category = CASE WHEN $5 THEN $6 ELSE category END,
             schema = COALESCE($7, schema),
             is_public = COALESCE($8, is_public),
             updated_at = now()
           WHERE id = $1
           RETURNING id, user_id, name, description, category, schema AS workflow, is_public,
             created_at, updated_at"#,
        id,
        patch.name,
        patch.description.is_some(),
        patch.description.clone().flatten(),
        patch.category.is_some(),
        patch.category.clone().flatten(),
        patch.workflow,
        patch.is_public,
    )
    .fetch_optional(db)
    .await?;
    template.ok_or(DbError::NotFound)
}

/// Deletes a template; jobs made from it keep their rendered graph (`template_id` becomes NULL).
///
/// # Errors
/// [`DbError::NotFound`] for an unknown id.
pub async fn delete(db: impl PgExecutor<'_>, id: Uuid) -> Result<(), DbError> {
    let deleted = sqlx::query!("DELETE FROM job_templates WHERE id = $1", id)
        .execute(db)
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(DbError::NotFound);
    }
    Ok(())
}
