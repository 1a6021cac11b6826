//! Job requests: create, read, the status lifecycle and each user's history.

use chrono::{DateTime, Utc};
use emp_shared::status::JobStatus;
use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::cursor::{Cursor, Page, fetch_limit};
use super::error::DbError;

/// A row of `job_requests`.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// UUIDv7.
    pub id: Uuid,
    /// The submitter.
    pub user_id: Uuid,
    /// The template it was made from, if any.
    pub template_id: Option<Uuid>,
    /// The graph as submitted directly; `None` for a job made from a template.
    pub custom_workflow: Option<Value>,
    /// The template's graph with the parameters in; `None` for a direct graph.
    pub rendered_workflow: Option<Value>,
    /// Template parameters (`{}` when none).
    pub parameters: Value,
    /// Where the job is in its life.
    pub status: JobStatus,
    /// 0–100, higher first.
    pub priority: i32,
    /// What a box needs to run it (given ∪ derived from the workflow).
    pub requirements: Value,
    /// Executions started so far.
    pub attempts: i32,
    /// The most executions it may get.
    pub max_attempts: i32,
    /// How long one execution may run.
    pub timeout_seconds: i32,
    /// A cancel was asked for while it ran.
    pub cancel_requested: bool,
    /// Whether ComfyUI's `temp` outputs are kept too.
    pub include_temp_outputs: bool,
    /// Submission time.
    pub created_at: DateTime<Utc>,
    /// Last change of the row.
    pub updated_at: DateTime<Utc>,
    /// First claim.
    pub started_at: Option<DateTime<Utc>>,
    /// Set when COMPLETED.
    pub completed_at: Option<DateTime<Utc>>,
    /// Set when FAILED.
    pub failed_at: Option<DateTime<Utc>>,
    /// Set when CANCELLED.
    pub cancelled_at: Option<DateTime<Utc>>,
    /// Human sentence of the failure (seed).
    pub error_message: Option<String>,
    /// `{code, message, node_id?, node_type?}` of the failure.
    pub error: Option<Value>,
    /// The submitter's own JSON.
    pub metadata: Value,
    /// Where results are POSTed.
    pub webhook_url: Option<String>,
    /// Extra event types delivered besides the terminal ones.
    pub webhook_events: Vec<String>,
}

impl Job {
    /// The graph that runs on ComfyUI: the direct one or the rendered template.
    pub fn workflow(&self) -> &Value {
        self.custom_workflow
            .as_ref()
            .or(self.rendered_workflow.as_ref())
            .unwrap_or(&Value::Null)
    }
}

/// Where a new job's graph comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkflowSource {
    /// Submitted as a graph.
    Custom(Value),
    /// Rendered from the template `template_id` with the job's parameters.
    Template {
        /// The template.
        template_id: Uuid,
        /// Its graph with the parameters substituted.
        rendered: Value,
    },
}

/// A job to insert. The API fills in defaults before it gets here.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// UUIDv7, chosen by the caller so that Redis and Postgres agree on it before the insert.
    pub id: Uuid,
    /// The submitter.
    pub user_id: Uuid,
    /// The graph.
    pub workflow: WorkflowSource,
    /// Template parameters.
    pub parameters: Value,
    /// 0–100.
    pub priority: i32,
    /// What a box needs.
    pub requirements: Value,
    /// 1–10.
    pub max_attempts: i32,
    /// 1–86400.
    pub timeout_seconds: i32,
    /// Keep ComfyUI's temp outputs.
    pub include_temp_outputs: bool,
    /// The submitter's JSON.
    pub metadata: Value,
    /// Result delivery.
    pub webhook_url: Option<String>,
    /// Extra webhook event types.
    pub webhook_events: Vec<String>,
}

/// Why a job failed, as stored in `error` (and `error_message`).
#[derive(Debug, Clone, PartialEq)]
pub struct JobError {
    /// Machine-readable code, e.g. `timeout`, `attempts_exhausted`, `comfyui_execution_error`.
    pub code: String,
    /// Human sentence.
    pub message: String,
    /// Extra structured detail (ComfyUI node id and type…), merged into the stored object.
    pub details: Value,
}

impl JobError {
    fn to_json(&self) -> Value {
        let mut object = match &self.details {
            Value::Object(map) => map.clone(),
            _ => serde_json::Map::new(),
        };
        object.insert("code".into(), Value::String(self.code.clone()));
        object.insert("message".into(), Value::String(self.message.clone()));
        Value::Object(object)
    }
}

/// Inserts a QUEUED job.
///
/// # Errors
/// Database failures, including check-constraint violations for out-of-range values.
pub async fn create(db: impl PgExecutor<'_>, new: &NewJob) -> Result<Job, DbError> {
    let (template_id, custom, rendered) = match &new.workflow {
        WorkflowSource::Custom(graph) => (None, Some(graph), None),
        WorkflowSource::Template {
            template_id,
            rendered,
        } => (Some(*template_id), None, Some(rendered)),
    };
    let job = sqlx::query_as!(
        Job,
        r#"INSERT INTO job_requests
             (id, user_id, template_id, custom_workflow, rendered_workflow, parameters, priority,
              requirements, max_attempts, timeout_seconds, include_temp_outputs, metadata,
              webhook_url, webhook_events)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
           RETURNING id, user_id, template_id, custom_workflow, rendered_workflow, parameters,
             status AS "status: JobStatus", priority, requirements, attempts, max_attempts,
             timeout_seconds, cancel_requested, include_temp_outputs, created_at, updated_at,
             started_at, completed_at, failed_at, cancelled_at, error_message, error, metadata,
             webhook_url, webhook_events"#,
        new.id,
        new.user_id,
        template_id,
        custom,
        rendered,
        new.parameters,
        new.priority,
        new.requirements,
        new.max_attempts,
        new.timeout_seconds,
        new.include_temp_outputs,
        new.metadata,
        new.webhook_url,
        &new.webhook_events,
    )
    .fetch_one(db)
    .await?;
    Ok(job)
}

/// The job with this id.
///
/// # Errors
/// [`DbError::NotFound`] when there is none.
pub async fn find_by_id(db: impl PgExecutor<'_>, id: Uuid) -> Result<Job, DbError> {
    let job = sqlx::query_as!(
        Job,
        r#"SELECT id, user_id, template_id, custom_workflow, rendered_workflow, parameters,
             status AS "status: JobStatus", priority, requirements, attempts, max_attempts,
             timeout_seconds, cancel_requested, include_temp_outputs, created_at, updated_at,
             started_at, completed_at, failed_at, cancelled_at, error_message, error, metadata,
             webhook_url, webhook_events
           FROM job_requests WHERE id = $1"#,
        id,
    )
    .fetch_optional(db)
    .await?;
    job.ok_or(DbError::NotFound)
}

/// Up to `limit` jobs in `status`, in queue order: priority descending, then oldest first.
///
/// # Errors
/// Database failures.
pub async fn find_by_status(
    db: impl PgExecutor<'_>,
    status: JobStatus,
    limit: i64,
) -> Result<Vec<Job>, DbError> {
    let jobs = sqlx::query_as!(
        Job,
        r#"SELECT id, user_id, template_id, custom_workflow, rendered_workflow, parameters,
             status AS "status: JobStatus", priority, requirements, attempts, max_attempts,
             timeout_seconds, cancel_requested, include_temp_outputs, created_at, updated_at,
             started_at, completed_at, failed_at, cancelled_at, error_message, error, metadata,
             webhook_url, webhook_events
           FROM job_requests WHERE status = $1
           ORDER BY priority DESC, created_at ASC
           LIMIT $2"#,
        status as JobStatus,
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(jobs)
}

/// Moves a job to `to`, setting the timestamp that goes with it (`started_at` on the first
/// PROCESSING, `completed_at`, `failed_at` with the error, `cancelled_at`).
///
/// The lifecycle is enforced in the same statement (`WHERE status = ANY(sources)`), so two
/// concurrent changes cannot both win, and a finished job never moves again.
///
/// # Errors
/// [`DbError::NotFound`] for an unknown id; [`DbError::IllegalTransition`] when the job's
/// current status may not become `to`.
pub async fn update_status(
    db: &sqlx::PgPool,
    id: Uuid,
    to: JobStatus,
    error: Option<&JobError>,
) -> Result<Job, DbError> {
    let sources: Vec<String> = JobStatus::sources_of(to)
        .iter()
        .map(|s| s.as_str().to_owned())
        .collect();
    let error_json = error.map(JobError::to_json);
    let error_message = error.map(|e| e.message.as_str());
    let updated = sqlx::query_as!(
        Job,
        r#"UPDATE job_requests SET
             status = $2::job_status,
             updated_at = now(),
             started_at = CASE WHEN $2::job_status = 'PROCESSING' THEN COALESCE(started_at, now()) ELSE started_at END,
             completed_at = CASE WHEN $2::job_status = 'COMPLETED' THEN now() ELSE completed_at END,
             failed_at = CASE WHEN $2::job_status = 'FAILED' THEN now() ELSE failed_at END,
             cancelled_at = CASE WHEN $2::job_status = 'CANCELLED' THEN now() ELSE cancelled_at END,
             error = CASE WHEN $2::job_status = 'FAILED' THEN $4 ELSE error END,
             error_message = CASE WHEN $2::job_status = 'FAILED' THEN $5 ELSE error_message END
           WHERE id = $1 AND status::text = ANY($3)
           RETURNING id, user_id, template_id, custom_workflow, rendered_workflow, parameters,
             status AS "status: JobStatus", priority, requirements, attempts, max_attempts,
             timeout_seconds, cancel_requested, include_temp_outputs, created_at, updated_at,
             started_at, completed_at, failed_at, cancelled_at, error_message, error, metadata,
             webhook_url, webhook_events"#,
        id,
        to as JobStatus,
        &sources,
        error_json,
        error_message,
    )
    .fetch_optional(db)
    .await?;
    if let Some(job) = updated {
        return Ok(job);
    }
    let current = sqlx::query_scalar!(
        r#"SELECT status AS "status: JobStatus" FROM job_requests WHERE id = $1"#,
        id
    )
    .fetch_optional(db)
    .await?;
    match current {
        None => Err(DbError::NotFound),
        Some(from) => Err(DbError::IllegalTransition { from, to }),
    }
}

/// QUEUED jobs in submission order (oldest first), created before `older_than` when given,
/// after the `(created_at, id)` key `after`: the reconciler's scan.
///
/// # Errors
/// Database failures.
pub async fn queued_page(
    db: impl PgExecutor<'_>,
    older_than: Option<DateTime<Utc>>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<Job>, DbError> {
    let (after_at, after_id) = after.unwrap_or((DateTime::<Utc>::UNIX_EPOCH, Uuid::nil()));
    let jobs = sqlx::query_as!(
        Job,
        r#"SELECT id, user_id, template_id, custom_workflow, rendered_workflow, parameters,
             status AS "status: JobStatus", priority, requirements, attempts, max_attempts,
             timeout_seconds, cancel_requested, include_temp_outputs, created_at, updated_at,
             started_at, completed_at, failed_at, cancelled_at, error_message, error, metadata,
             webhook_url, webhook_events
           FROM job_requests
           WHERE status = 'QUEUED' AND created_at < COALESCE($1::timestamptz, 'infinity'::timestamptz) AND (created_at, id) > ($2, $3)
           ORDER BY created_at, id
           LIMIT $4"#,
        older_than,
        after_at,
        after_id,
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(jobs)
}

/// Marks a cancel as asked for (`cancel_requested`), for a job that runs; the agent stops it
/// and its end arrives as an event.
///
/// # Errors
/// [`DbError::NotFound`] for an unknown id.
pub async fn request_cancel(db: impl PgExecutor<'_>, id: Uuid) -> Result<Job, DbError> {
    let job = sqlx::query_as!(
        Job,
        r#"UPDATE job_requests SET cancel_requested = true, updated_at = now() WHERE id = $1
           RETURNING id, user_id, template_id, custom_workflow, rendered_workflow, parameters,
             status AS "status: JobStatus", priority, requirements, attempts, max_attempts,
             timeout_seconds, cancel_requested, include_temp_outputs, created_at, updated_at,
             started_at, completed_at, failed_at, cancelled_at, error_message, error, metadata,
             webhook_url, webhook_events"#,
        id,
    )
    .fetch_optional(db)
    .await?;
    job.ok_or(DbError::NotFound)
}

/// One page of a user's jobs, newest first, optionally only those in `status`.
///
/// # Errors
/// Database failures.
pub async fn history(
    db: impl PgExecutor<'_>,
    user_id: Uuid,
    status: Option<JobStatus>,
    limit: usize,
    after: Option<Cursor>,
) -> Result<Page<Job>, DbError> {
    let after = after.unwrap_or_else(Cursor::start);
    // Two statements rather than `$2 IS NULL OR status = $2`, so each has a plan that walks its
    // own index in order and stops after `limit` rows.
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
                   WHERE user_id = $1 AND (created_at, id) < ($2, $3)
                   ORDER BY created_at DESC, id DESC
                   LIMIT $4"#,
                user_id,
                after.at,
                after.id,
                fetch_limit(limit),
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
                   WHERE user_id = $1 AND status = $2 AND (created_at, id) < ($3, $4)
                   ORDER BY created_at DESC, id DESC
                   LIMIT $5"#,
                user_id,
                status as JobStatus,
                after.at,
                after.id,
                fetch_limit(limit),
            )
            .fetch_all(db)
            .await?
        }
    };
    Ok(Page::from_rows(rows, limit, |j| Cursor {
        at: j.created_at,
        id: j.id,
    }))
}

/// Job counts by status: QUEUED and PROCESSING all of them, the terminal statuses those that
/// ended after `since` (the seed's 24-hour window).
///
/// # Errors
/// Database failures.
pub async fn counts_by_status(
    db: impl PgExecutor<'_>,
    since: DateTime<Utc>,
) -> Result<Vec<(JobStatus, i64)>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT status AS "status!: JobStatus", count(*) AS "count!" FROM job_requests
             WHERE status IN ('QUEUED', 'PROCESSING') GROUP BY status
           UNION ALL
           SELECT status, count(*) FROM job_requests
             WHERE finished_at > $1 GROUP BY status"#,
        since,
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.status, row.count))
        .collect())
}

/// How many users submitted a job after `since` (the stats' `active_today`).
///
/// # Errors
/// Database failures.
pub async fn active_users_since(
    db: impl PgExecutor<'_>,
    since: DateTime<Utc>,
) -> Result<i64, DbError> {
    let count = sqlx::query_scalar!(
        r#"SELECT count(DISTINCT user_id) AS "count!" FROM job_requests WHERE created_at > $1"#,
        since,
    )
    .fetch_one(db)
    .await?;
    Ok(count)
}
