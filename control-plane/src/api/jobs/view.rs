//! The job object of CONTRACT.md, assembled from the Postgres row (the truth), the job's
//! latest execution and outputs, and Redis's live state (progress of a running job).
//!
//! Redis is only asked about PROCESSING jobs, with a short timeout: a read never fails or
//! hangs because Redis is slow or gone; `progress` is then `null`.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use emp_shared::dispatch::JobState;
use emp_shared::status::{ExecutionStatus, JobStatus};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::db::executions::{self, Execution};
use crate::db::jobs::Job;
use crate::db::outputs::{self, Output};
use crate::http::AppState;
use crate::http::error::ApiError;

/// How long a read waits for Redis's live state before answering without it.
const LIVE_STATE_TIMEOUT: Duration = Duration::from_millis(500);

/// A job (CONTRACT.md "The job object"): every field always present, `null` where unknown.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct JobView {
    /// UUIDv7.
    pub id: Uuid,
    /// The submitter.
    pub user_id: Uuid,
    /// `QUEUED`, `PROCESSING`, `COMPLETED`, `FAILED` or `CANCELLED`.
    #[schema(value_type = crate::api::openapi::JobStatusName)]
    pub status: JobStatus,
    /// 0–100, higher first.
    pub priority: i32,
    /// The template it was made from, or `null`.
    #[schema(required)]
    pub template_id: Option<Uuid>,
    /// Template parameters (`{}` when none).
    #[schema(value_type = Object)]
    pub parameters: Value,
    /// The graph as submitted to ComfyUI (templates already substituted).
    #[schema(value_type = Object)]
    pub workflow: Value,
    /// What a box needs: the given requirements united with those the workflow implies.
    #[schema(value_type = Object)]
    pub requirements: Value,
    /// Executions started so far.
    pub attempts: i32,
    /// The most executions it may get.
    pub max_attempts: i32,
    /// How long one execution may run.
    pub timeout_seconds: i32,
    /// Whether a cancel was asked for.
    pub cancel_requested: bool,
    /// Submission time.
    pub created_at: DateTime<Utc>,
    /// First claim.
    #[schema(required)]
    pub started_at: Option<DateTime<Utc>>,
    /// When it COMPLETED.
    #[schema(required)]
    pub completed_at: Option<DateTime<Utc>>,
    /// When it FAILED.
    #[schema(required)]
    pub failed_at: Option<DateTime<Utc>>,
    /// When it was CANCELLED.
    #[schema(required)]
    pub cancelled_at: Option<DateTime<Utc>>,
    /// The machine (its `id`, not its external id) of the current or last execution.
    #[schema(required)]
    pub machine_id: Option<Uuid>,
    /// The current or last execution.
    #[schema(required)]
    pub execution_id: Option<Uuid>,
    /// Progress of the running execution; `null` when nothing runs.
    #[schema(required)]
    pub progress: Option<ProgressView>,
    /// Files the current or last execution produced (`[]` until there are some).
    pub outputs: Vec<OutputView>,
    /// `{code, message, node_id?, node_type?}` of a failure, else `null`.
    #[schema(value_type = Option<Object>)]
    #[schema(required)]
    pub error: Option<Value>,
    /// The submitter's own JSON (`{}` when none).
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// Where results are POSTed, or `null`.
    #[schema(required)]
    pub webhook_url: Option<String>,
}

/// Progress of a running job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ProgressView {
    /// Steps done.
    pub value: u64,
    /// Steps in all.
    pub max: u64,
    /// The node running, if known.
    #[schema(required)]
    pub node: Option<String>,
}

/// A file a job produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct OutputView {
    /// UUIDv7.
    pub id: Uuid,
    /// The ComfyUI node that wrote it.
    pub node_id: String,
    /// The file's name.
    pub filename: String,
    /// Its media type.
    pub content_type: String,
    /// Bytes.
    pub size: i64,
    /// Where to download it: `/api/v1/jobs/{id}/outputs/{output_id}`.
    pub url: String,
}

impl From<&Output> for OutputView {
    fn from(output: &Output) -> Self {
        Self {
            id: output.id,
            node_id: output.node_id.clone(),
            filename: output.filename.clone(),
            content_type: output.content_type.clone(),
            size: output.size,
            url: output_url(output.job_id, output.id),
        }
    }
}

/// The download path of an output.
pub fn output_url(job_id: Uuid, output_id: Uuid) -> String {
    format!("/api/v1/jobs/{job_id}/outputs/{output_id}")
}

/// One execution of a job.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ExecutionView {
    /// UUIDv7; the claim's fencing token.
    pub id: Uuid,
    /// The job.
    pub job_id: Uuid,
    /// The machine that ran it.
    pub machine_id: Uuid,
    /// `RUNNING`, `COMPLETED`, `FAILED`, `CANCELLED`, `LOST` or `STALE`.
    #[schema(value_type = crate::api::openapi::ExecutionStatusName)]
    pub status: ExecutionStatus,
    /// Claim time.
    pub started_at: DateTime<Utc>,
    /// When it COMPLETED.
    #[schema(required)]
    pub completed_at: Option<DateTime<Utc>>,
    /// When it ended otherwise.
    #[schema(required)]
    pub failed_at: Option<DateTime<Utc>>,
    /// `{code, message, …}` of its failure, else `null`.
    #[schema(value_type = Option<Object>)]
    #[schema(required)]
    pub error: Option<Value>,
}

impl From<Execution> for ExecutionView {
    fn from(execution: Execution) -> Self {
        Self {
            id: execution.id,
            job_id: execution.job_request_id,
            machine_id: execution.machine_id,
            status: execution.status,
            started_at: execution.started_at,
            completed_at: execution.completed_at,
            failed_at: execution.failed_at,
            error: execution.error,
        }
    }
}

/// What is known of a job beyond its row.
#[derive(Debug, Default)]
struct Extras {
    /// The latest execution Postgres knows.
    execution: Option<(Uuid, Uuid)>,
    /// Outputs of that execution.
    outputs: Vec<OutputView>,
    /// Redis's live state, for PROCESSING jobs.
    live: Option<JobState>,
}

/// The job object of a row alone: for a job just submitted, which has nothing else yet.
pub fn fresh(job: Job) -> JobView {
    assemble(job, Extras::default())
}

/// The job object of one row.
///
/// # Errors
/// Postgres failures.
pub async fn view(state: &AppState, job: Job) -> Result<JobView, ApiError> {
    let mut views = views(state, vec![job]).await?;
    Ok(views.pop().expect("one job in, one view out"))
}

/// The job objects of many rows, in the same order, with a fixed number of queries.
///
/// # Errors
/// Postgres failures.
pub async fn views(state: &AppState, jobs: Vec<Job>) -> Result<Vec<JobView>, ApiError> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = jobs.iter().map(|job| job.id).collect();
    let mut extras: HashMap<Uuid, Extras> = HashMap::with_capacity(jobs.len());
    for execution in executions::latest_of_jobs(&state.db, &ids).await? {
        extras
            .entry(execution.job_request_id)
            .or_default()
            .execution = Some((execution.id, execution.machine_id));
    }
    for output in outputs::of_latest_executions(&state.db, &ids).await? {
        extras
            .entry(output.job_id)
            .or_default()
            .outputs
            .push(OutputView::from(&output));
    }
    for job in jobs
        .iter()
        .filter(|job| job.status == JobStatus::Processing)
    {
        if let Some(live) = live_state(state, job.id).await {
            extras.entry(job.id).or_default().live = Some(live);
        }
    }
    Ok(jobs
        .into_iter()
        .map(|job| {
            let extra = extras.remove(&job.id).unwrap_or_default();
            assemble(job, extra)
        })
        .collect())
}

/// The job object from Postgres alone (no live state): for finished jobs, which Redis no
/// longer describes, e.g. in webhook payloads.
///
/// # Errors
/// Postgres failures.
pub async fn stored_view(db: &sqlx::PgPool, job: Job) -> Result<JobView, crate::db::DbError> {
    let ids = [job.id];
    let mut extras = Extras::default();
    if let Some(execution) = executions::latest_of_jobs(db, &ids).await?.pop() {
        extras.execution = Some((execution.id, execution.machine_id));
    }
    extras.outputs = outputs::of_latest_executions(db, &ids)
        .await?
        .iter()
        .map(OutputView::from)
        .collect();
    Ok(assemble(job, extras))
}

/// Redis's state of a job, or `None` when Redis does not know it, fails or is slow.
async fn live_state(state: &AppState, job_id: Uuid) -> Option<JobState> {
    let mut redis = state.redis.get().ok()?;
    let dispatch = state.dispatcher.dispatch();
    match tokio::time::timeout(LIVE_STATE_TIMEOUT, dispatch.job(&mut redis, &job_id)).await {
        Ok(Ok(live)) => live,
        Ok(Err(error)) => {
            tracing::warn!(%job_id, %error, "cannot read the job's live state");
            None
        }
        Err(_) => {
            tracing::warn!(%job_id, "redis is slow; answering without live state");
            None
        }
    }
}

fn assemble(job: Job, extras: Extras) -> JobView {
    // Redis knows the running execution before the persister has written it.
    let running = extras
        .live
        .as_ref()
        .filter(|live| live.status == JobStatus::Processing && job.status == JobStatus::Processing);
    let live_execution = running.and_then(|live| live.execution_id.zip(live.machine_id));
    let (execution_id, machine_id) = live_execution
        .or(extras.execution)
        .map_or((None, None), |(execution, machine)| {
            (Some(execution), Some(machine))
        });
    let progress = running
        .and_then(|live| live.progress.as_ref())
        .map(|progress| ProgressView {
            value: progress.value,
            max: progress.max,
            node: progress.node.clone(),
        });
    // Outputs belong to the execution the object describes; a newer one has none yet.
    let outputs = if live_execution.is_some() && live_execution != extras.execution {
        Vec::new()
    } else {
        extras.outputs
    };
    let workflow = job.workflow().clone();
    JobView {
        id: job.id,
        user_id: job.user_id,
        status: job.status,
        priority: job.priority,
        template_id: job.template_id,
        parameters: job.parameters,
        workflow,
        requirements: job.requirements,
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        timeout_seconds: job.timeout_seconds,
        cancel_requested: job.cancel_requested,
        created_at: job.created_at,
        started_at: job.started_at,
        completed_at: job.completed_at,
        failed_at: job.failed_at,
        cancelled_at: job.cancelled_at,
        machine_id,
        execution_id,
        progress,
        outputs,
        error: job.error,
        metadata: job.metadata,
        webhook_url: job.webhook_url,
    }
}
